"""StoryDiffusion's Semantic Motion Predictor (Zhou et al. 2024, sec. 3.2, eqs. 4-6), built as the paper
describes; no weights were released, so they come only from training (``training/``).

1. The start and end images are encoded by an image encoder E (a CLIP vision model; the paper uses
   OpenCLIP ViT-H-14, whose image embeddings have 1024 features): ``K_s = E(I_s)``, ``K_e = E(I_e)``.
2. They are linearly interpolated to the clip's L frames: ``K_i = K_s + i / (L - 1) (K_e - K_s)`` (eq. 4).
3. A transformer over the L frames predicts the frames' embeddings ``P_1..P_L`` (eq. 5). Here it predicts
   the correction to the interpolation (``P_i = K_i + B(K)_i``, the output layer zero-initialised), so an
   untrained predictor starts from the interpolation, in E's embedding space.
4. Each frame's cross-attention attends to the text tokens and to that frame's predictor tokens, through
   extra key/value projections (eq. 6): ``softmax(Q [W_k T, W_k' P_i]^T / sqrt(d)) [W_v T, W_v' P_i]``.
   ``P_i`` becomes ``tokens`` tokens (``to_tokens``), each layer has its own ``W_k'``, ``W_v'``.

Shape chosen for the paper's "8 layers, hidden 1024, 12 heads": 1024 is not divisible by 12, so the
default keeps the width (1024 = ViT-H-14's embedding width and the paper's stated hidden size) and uses
16 heads of 64 features (the head width of SD1.5's attention); 8 heads of 128 was the other candidate
at the same distance from 12, with coarser heads. ``heads`` is configurable.

Strength: ``s`` multiplies the unnormalised attention mass of the predictor tokens (a ``log s`` bias on
their scores), so ``s = 1`` is eq. 6 and ``s = 0`` is the plain cross-attention exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .checkpoint_io import read_weights
from .errors import MotionModelError, check_finite, describe_keys
from .temporal import linear, sinusoidal_pe

# SD1.5's cross-attention layers as (block, number, transformer index) and their widths
SD15_CROSS_ATTENTION = (
    *((("input", n, 0), w) for n, w in ((1, 320), (2, 320), (4, 640), (5, 640), (7, 1280), (8, 1280))),
    (("middle", 0, 0), 1280),
    *((("output", n, 0), w) for n, w in ((3, 1280), (4, 1280), (5, 1280), (6, 640), (7, 640), (8, 640),
                                        (9, 320), (10, 320), (11, 320))),
)


def layer_name(layer: Sequence) -> str:
    """("input", 1, 0) -> "input_1_0": the module key of a layer's extra projections."""
    return "_".join(str(part) for part in layer)


@dataclass(frozen=True)
class PredictorSpec:
    """Everything needed to rebuild a predictor; saved in its files' metadata.

    Args:
        image_dim: features of the image embeddings (CLIP vision ``image_embeds``; ViT-H-14: 1024).
        layers: (layer key (block, number, index), attention width) of every cross-attention that reads P.
        hidden: the transformer's width (paper: 1024).
        depth: transformer layers (paper: 8).
        heads: attention heads (16: see the module docstring).
        tokens: predictor tokens per frame in the cross-attention.
        token_dim: width of those tokens, before each layer's own key/value projection.
    """

    image_dim: int
    layers: tuple[tuple[tuple[str, int, int], int], ...]
    hidden: int = 1024
    depth: int = 8
    heads: int = 16
    tokens: int = 4
    token_dim: int = 1024

    def __post_init__(self):
        if min(self.image_dim, self.hidden, self.depth, self.heads, self.tokens, self.token_dim) < 1:
            raise ValueError("every size of a predictor must be at least 1")
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        if not self.layers:
            raise ValueError("a predictor needs at least one cross-attention layer to feed")

    @classmethod
    def paper(cls, image_dim: int = 1024, layers=SD15_CROSS_ATTENTION) -> "PredictorSpec":
        """The paper's size (8 layers, hidden 1024) for SD1.5's 16 cross-attention layers."""
        return cls(image_dim, tuple((tuple(key), width) for key, width in layers))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PredictorSpec":
        data = json.loads(text)
        data["layers"] = tuple(((str(k[0]), int(k[1]), int(k[2])), int(w)) for k, w in data["layers"])
        return cls(**data)

    def describe(self) -> str:
        return (f"Semantic Motion Predictor: {self.depth} layers x {self.hidden} ({self.heads} heads), "
                f"image embeddings of {self.image_dim}, {self.tokens} tokens per frame into "
                f"{len(self.layers)} cross-attention layers")


def interpolate(start: torch.Tensor, end: torch.Tensor, frames: int) -> torch.Tensor:
    """Eq. 4: (b, c) start and end embeddings -> (b, frames, c), ``start + i / (frames - 1) (end - start)``
    (one frame: the start)."""
    weights = torch.linspace(0, 1, frames, dtype=start.dtype, device=start.device)  # [0.] for one frame
    return start[:, None] + weights[None, :, None] * (end - start)[:, None]


class PredictorBlock(nn.Module):
    """Pre-norm self-attention over frames and a GELU MLP (4x), both residual."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden)
        self.to_qkv = nn.Linear(hidden, 3 * hidden)
        self.to_out = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, 4 * hidden)
        self.fc2 = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(linear(self.to_qkv, self.norm1(x)), "b f (n h d) -> n b h f d", n=3, h=self.heads)
        x = x + linear(self.to_out, rearrange(F.scaled_dot_product_attention(q, k, v), "b h f d -> b f (h d)"))
        return x + linear(self.fc2, F.gelu(linear(self.fc1, self.norm2(x))))


class ExtraKV(nn.Module):
    """One cross-attention layer's W_k', W_v' (eq. 6)."""

    def __init__(self, token_dim: int, width: int):
        super().__init__()
        self.to_k = nn.Linear(token_dim, width, bias=False)
        self.to_v = nn.Linear(token_dim, width, bias=False)


class MotionPredictor(nn.Module):
    """The predictor B, the per-frame tokens and every layer's extra key/value projections."""

    def __init__(self, spec: PredictorSpec):
        super().__init__()
        self.spec = spec
        self.proj_in = nn.Linear(spec.image_dim, spec.hidden)
        self.blocks = nn.ModuleList([PredictorBlock(spec.hidden, spec.heads) for _ in range(spec.depth)])
        self.norm_out = nn.LayerNorm(spec.hidden)
        self.proj_out = nn.Linear(spec.hidden, spec.image_dim)
        nn.init.zeros_(self.proj_out.weight)  # an untrained predictor gives the interpolation
        nn.init.zeros_(self.proj_out.bias)
        self.to_tokens = nn.Linear(spec.image_dim, spec.tokens * spec.token_dim)
        self.token_norm = nn.LayerNorm(spec.token_dim)
        self.kv = nn.ModuleDict({layer_name(key): ExtraKV(spec.token_dim, width) for key, width in spec.layers})

    def predict(self, start: torch.Tensor, end: torch.Tensor, frames: int) -> torch.Tensor:
        """Eqs. 4-5: (b, image_dim) start and end embeddings -> (b, frames, image_dim) frame embeddings P."""
        interpolated = interpolate(start, end, frames)
        x = linear(self.proj_in, interpolated)
        x = x + sinusoidal_pe(frames, self.spec.hidden).to(device=x.device, dtype=x.dtype)
        for block in self.blocks:
            x = block(x)
        return interpolated + linear(self.proj_out, self.norm_out(x))

    def frame_tokens(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(..., image_dim) frame embeddings -> (..., tokens, token_dim) cross-attention tokens."""
        tokens = linear(self.to_tokens, embeddings)
        return self.token_norm(tokens.reshape(*embeddings.shape[:-1], self.spec.tokens, self.spec.token_dim))

    def extra_kv(self, layer: Sequence, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's W_k' P, W_v' P for (rows, tokens, token_dim) tokens."""
        projections = self.kv[layer_name(layer)]
        return linear(projections.to_k, tokens), linear(projections.to_v, tokens)


def attention_with_tokens(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_extra: torch.Tensor,
                          v_extra: torch.Tensor, heads: int, strength: float = 1.0) -> torch.Tensor:
    """Eq. 6 on projected tensors: per row, softmax over the text keys and that row's extra keys.

    Args:
        q: (b, n, (heads d)); k, v: (b, t, (heads d)) from the text; k_extra, v_extra: (b, m, (heads d)).
        strength: scales the extra tokens' unnormalised attention (``log strength`` added to their scores);
            0 returns plain attention over the text.
    """
    if strength <= 0:
        keys, values, bias = k, v, None
    else:
        keys, values = torch.cat([k, k_extra], dim=1), torch.cat([v, v_extra], dim=1)
        bias = None
        if strength != 1.0:
            bias = torch.zeros(1, keys.shape[1], dtype=q.dtype, device=q.device)  # (queries, keys), broadcast
            bias[:, k.shape[1]:] = math.log(strength)
    split = [rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, keys, values)]
    return rearrange(F.scaled_dot_product_attention(*split, attn_mask=bias), "b h n d -> b n (h d)")


SPEC_METADATA_KEY = "animatediff_suite.motion_predictor"


def save_predictor(model: MotionPredictor, path: str, metadata: dict[str, str] | None = None) -> None:
    """Write ``model`` to a ``.safetensors`` file with its spec in the metadata."""
    from safetensors.torch import save_file

    if not os.fspath(path).lower().endswith(".safetensors"):
        raise MotionModelError(f"'{os.path.basename(path)}': predictors are saved as .safetensors only")
    extra = {**(metadata or {}), SPEC_METADATA_KEY: model.spec.to_json(), "format": "pt"}
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, os.fspath(path), metadata=extra)


def load_predictor(path: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> MotionPredictor:
    """Load a predictor written by ``save_predictor`` (the spec comes from the file's metadata).

    Raises:
        MotionModelError: not a predictor file, or its weights do not match its spec (the message says why).
    """
    source = f"'{os.path.basename(os.fspath(path))}'"
    data, metadata = read_weights(path)
    text = metadata.get(SPEC_METADATA_KEY)
    if not text:
        hint = " (a SparseCtrl or motion model?)" if any(".motion_modules." in k for k in data) else ""
        raise MotionModelError(f"{source}: not a Semantic Motion Predictor file: its metadata has no "
                               f"'{SPEC_METADATA_KEY}' entry{hint}; predictors come from AnimateDiff Suite's "
                               "semantic_motion_predictor training")
    try:
        spec = PredictorSpec.from_json(text)
    except (ValueError, TypeError, KeyError) as exc:
        raise MotionModelError(f"{source}: unreadable predictor spec in the metadata ({exc})") from None
    with torch.device("meta"):
        model = MotionPredictor(spec)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or unexpected:
        raise MotionModelError(f"{source}: weights do not match the predictor spec: missing "
                               f"{describe_keys(missing) or 'none'}; unexpected {describe_keys(unexpected) or 'none'}")
    wrong = [f"{k} {tuple(tensors[k].shape)} (expected {tuple(s)})" for k, s in expected.items() if tensors[k].shape != s]
    if wrong:
        raise MotionModelError(f"{source}: wrong shapes: {'; '.join(wrong[:5])}")
    check_finite(tensors, source)
    dtype = dtype or tensors["proj_in.weight"].dtype
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)

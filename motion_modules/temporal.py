"""The AnimateDiff temporal transformer (Guo et al. 2023, "AnimateDiff", sec. 4.2).

Module and parameter names follow the original checkpoints, so ``state_dict()`` of these
modules has exactly the original keys below ``...motion_modules.N.``.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .context import WindowAccumulator
from .errors import MotionModelError

Windows = Sequence[tuple[Sequence[int], Sequence[float]]]

NORM_MODES = ("per_frame", "across_frames")


def sinusoidal_pe(length: int, dim: int) -> torch.Tensor:
    """Sinusoidal PE (Vaswani et al. 2017), computed in float32 exactly as the original code.

    ``pe[p, 2i] = sin(p * exp(-2i ln(10000) / dim))``, ``pe[p, 2i+1] = cos(same)``.
    Returns a new CPU tensor of shape (1, length, dim), also under a ``torch.device("meta")``
    context. Row p does not depend on ``length``, so a shorter table is a bit-exact prefix
    of a longer one.
    """
    return _sinusoidal_pe(length, dim).clone()


@functools.lru_cache(maxsize=64)
def _sinusoidal_pe(length: int, dim: int) -> torch.Tensor:
    return _pe_at(torch.arange(length, device="cpu"), dim)


def _pe_at(position: torch.Tensor, dim: int) -> torch.Tensor:
    position = position.unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2, device="cpu") * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, position.shape[0], dim, device="cpu")
    pe[0, :, 0::2] = torch.sin(position * div_term)
    pe[0, :, 1::2] = torch.cos(position * div_term)
    return pe


@functools.lru_cache(maxsize=64)
def stretched_pe(frames: int, length: int, dim: int) -> torch.Tensor:
    """PE for ``frames`` > ``length`` positions squeezed into the trained range: frame i gets the
    sinusoid at the fractional position i (length - 1) / (frames - 1), so the first and last
    frames get rows 0 and length - 1 of the table and the spacing shrinks evenly ("PE stretching")."""
    if frames <= length:
        raise ValueError(f"stretching is for more frames ({frames}) than the PE length ({length})")
    position = torch.arange(frames, dtype=torch.float64, device="cpu") * (length - 1) / (frames - 1)
    return _pe_at(position.float(), dim)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, materialising the (f x f) score matrix; a reference path."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.matmul(scores.softmax(dim=-1), v)


# Linear layers run as oneDNN 1x1 convolutions on the CPU (``linear``); False: always ``layer(x)``
# (torch's F.linear), e.g. to compare the two in a benchmark.
ONEDNN_LINEAR = True


def _onednn_applies(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``layer(x)`` may run as a oneDNN 1x1 convolution: fp32 on a CPU with oneDNN, the weight
    already in the input's dtype and device, and no per-call weight functions (a host's casting layers,
    e.g. ComfyUI's, compute the weight on the fly only when those are present or the dtypes differ).
    Not for a weight being trained: the convolution's weight gradient is 1.5-2.5x slower than the GEMM's
    (measured at the motion modules' shapes, full SD1.5 widths, on the project's 2-core CPUs)."""
    weight = getattr(layer, "weight", None)
    return (ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled and isinstance(weight, torch.Tensor) and weight.dtype == x.dtype
            and not (weight.requires_grad and torch.is_grad_enabled())
            and weight.device == x.device and weight.ndim == 2 and x.shape[-1] == weight.shape[1]
            and not getattr(layer, "weight_function", None) and not getattr(layer, "bias_function", None)
            and (layer.bias is None or (layer.bias.dtype == x.dtype and layer.bias.device == x.device)))


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for a Linear layer, on the CPU as oneDNN's 1x1 convolution over the tokens viewed as
    one channels-last image: the same arithmetic (fp32 rounding differs by ~1e-6 relative), 1.7-2.2x
    the speed of the MKL GEMM behind ``F.linear`` at the motion modules' shapes (measured on the
    project's 2-core CPUs: tests/benchmarks/bench_motion_module.py). Elsewhere ``layer(x)``."""
    if not _onednn_applies(layer, x):
        return layer(x)
    tokens = x.reshape(-1, x.shape[-1])
    image = tokens.view(1, tokens.shape[0], 1, tokens.shape[1]).permute(0, 3, 1, 2)  # (1, C, M, 1), NHWC memory
    out = F.conv2d(image, layer.weight[:, :, None, None], layer.bias)
    return out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], layer.weight.shape[0])


# On the CPU, up to this many frames the explicit matmul-softmax-matmul beats the fused SDPA kernel
# (the motion model 16% faster at 16 frames, 256x256: tests/benchmarks/bench_motion_module.py) and
# its scores are small beside the module's activations (2 h f / (20 C) of them: 8% at 32 frames, C 320).
AUTO_NAIVE_FRAMES = 32


def auto_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``naive_attention`` for short sequences on the CPU, else SDPA (flash / memory-efficient kernels)."""
    if q.device.type == "cpu" and q.shape[-2] <= AUTO_NAIVE_FRAMES:
        return naive_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


ATTENTION_BACKENDS = {
    "auto": auto_attention,
    "sdpa": F.scaled_dot_product_attention,
    "naive": naive_attention,
}


class PositionalEncoding(nn.Module):
    """Holds the recomputed PE table (never loaded from a file; not saved by state_dict)."""

    def __init__(self, dim: int, max_len: int):
        super().__init__()
        self.register_buffer("pe", sinusoidal_pe(max_len, dim), persistent=False)

    def forward(self, x: torch.Tensor, stretch: bool = False) -> torch.Tensor:
        frames, length = x.shape[1], self.pe.shape[1]
        pe = stretched_pe(frames, length, x.shape[-1]) if stretch and frames > length else self.pe[:, :frames]
        return x + pe.to(device=x.device, dtype=x.dtype)


def reset_positional_encodings(module: nn.Module, device, dtype: torch.dtype) -> None:
    """Recompute the PE table of every ``PositionalEncoding`` in ``module`` (after building on the meta device
    or a dtype change), on ``device`` in ``dtype``."""
    for child in module.modules():
        if isinstance(child, PositionalEncoding):
            child.pe = sinusoidal_pe(child.pe.shape[1], child.pe.shape[2]).to(device=device, dtype=dtype)


class TemporalSelfAttention(nn.Module):
    """Multi-head self-attention over the frame axis, PE added to its (normed) input."""

    def __init__(self, dim: int, heads: int, max_len: int, ops=nn):
        super().__init__()
        self.heads = heads
        self.backend = "auto"
        self.pos_encoder = PositionalEncoding(dim, max_len)
        self.to_q = ops.Linear(dim, dim, bias=False)
        self.to_k = ops.Linear(dim, dim, bias=False)
        self.to_v = ops.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([ops.Linear(dim, dim)])

    def forward(self, x: torch.Tensor, scale_multiplier: float = 1.0, stretch_pe: bool = False) -> torch.Tensor:
        """x: (n f c), n = batch * spatial positions.

        ``scale_multiplier`` multiplies the softmax scale (d^-0.5): above 1 sharpens attention
        across frames (more motion), below 1 flattens it ("motion scale" in peer packs).
        ``stretch_pe``: more frames than the PE length get stretched positions (``stretched_pe``).
        """
        x = self.pos_encoder(x, stretch_pe)
        q, k, v = (
            rearrange(linear(proj, x), "n f (h d) -> n h f d", h=self.heads)
            for proj in (self.to_q, self.to_k, self.to_v)
        )
        if scale_multiplier != 1.0:
            q = q * scale_multiplier  # scales q k^T exactly like a larger softmax scale
        out = ATTENTION_BACKENDS[self.backend](q, k, v)
        return linear(self.to_out[0], rearrange(out, "n h f d -> n f (h d)"))


class GEGLU(nn.Module):
    """``proj`` to 2 * inner, then hidden * gelu(gate) with the exact erf GELU."""

    def __init__(self, dim: int, inner: int, ops=nn):
        super().__init__()
        self.proj = ops.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = linear(self.proj, x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    """``net.0`` GEGLU, ``net.1`` dropout (identity), ``net.2`` Linear(4C, C)."""

    def __init__(self, dim: int, mult: int = 4, ops=nn):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult, ops), nn.Identity(), ops.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.net[2], self.net[1](self.net[0](x)))


class TemporalTransformerBlock(nn.Module):
    """Pre-norm attention blocks over frames plus a GEGLU feed-forward, all residual."""

    def __init__(self, dim: int, heads: int, max_len: int, attention_blocks: int = 2, ops=nn):
        super().__init__()
        self.attention_blocks = nn.ModuleList(
            [TemporalSelfAttention(dim, heads, max_len, ops) for _ in range(attention_blocks)]
        )
        self.norms = nn.ModuleList([ops.LayerNorm(dim) for _ in range(attention_blocks)])
        self.ff = FeedForward(dim, ops=ops)
        self.ff_norm = ops.LayerNorm(dim)

    def _attend(self, x: torch.Tensor, scale_multiplier: float, stretch_pe: bool) -> torch.Tensor:
        for attention, norm in zip(self.attention_blocks, self.norms):
            x = attention(norm(x), scale_multiplier, stretch_pe) + x
        return x

    def forward(self, x: torch.Tensor, scale_multiplier: float = 1.0, windows: Windows | None = None,
                stretch_pe: bool = False) -> torch.Tensor:
        """x: (n f c). ``windows`` (FreeNoise): (frame indices, fuse weights) pairs; the attention
        blocks run per window (PE restarting at each window's first frame) and their outputs are
        fused per frame by weighted mean before the feed-forward, which sees all frames."""
        if windows is None:
            x = self._attend(x, scale_multiplier, stretch_pe)
        else:
            fused = WindowAccumulator(x.shape[1], None, dim=1)
            for window, weights in windows:
                index = torch.as_tensor(list(window), device=x.device)
                fused.add(window, self._attend(x.index_select(1, index), scale_multiplier, stretch_pe), weights)
            x = fused.result()
        return self.ff(self.ff_norm(x)) + x


class TemporalTransformer3D(nn.Module):
    """GroupNorm, proj_in, transformer blocks over frames, proj_out, residual."""

    def __init__(self, channels: int, heads: int, max_len: int, norm_mode: str,
                 transformer_layers: int = 1, attention_blocks: int = 2, norm_groups: int = 32, ops=nn):
        super().__init__()
        if norm_mode not in NORM_MODES:
            raise ValueError(f"unknown norm mode {norm_mode!r}; expected one of {sorted(NORM_MODES)}")
        self.norm_mode = norm_mode
        self.max_len = max_len
        self.norm = ops.GroupNorm(norm_groups, channels, eps=1e-6, affine=True)
        self.proj_in = ops.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [TemporalTransformerBlock(channels, heads, max_len, attention_blocks, ops)
             for _ in range(transformer_layers)]
        )
        self.proj_out = ops.Linear(channels, channels)

    def _group_norm(self, x: torch.Tensor, frames: int, norm_mode: str | None = None) -> torch.Tensor:
        if (norm_mode or self.norm_mode) == "per_frame":
            return self.norm(x)
        x = rearrange(x, "(b f) c h w -> b c f h w", f=frames)
        return rearrange(self.norm(x), "b c f h w -> (b f) c h w")

    def forward(self, x: torch.Tensor, num_frames: int, scale_multiplier: float = 1.0,
                windows: Windows | None = None, stretch_pe: bool = False, norm_mode: str | None = None) -> torch.Tensor:
        """x: ((b f), c, h, w) -> same shape; ``windows``: see ``TemporalTransformerBlock``;
        ``stretch_pe``: passes longer than the PE length stretch it instead of failing; ``norm_mode``:
        this call's GroupNorm mode instead of the module's own."""
        longest = num_frames if windows is None else max(len(window) for window, _ in windows)
        if longest > self.max_len and not stretch_pe:
            raise MotionModelError(
                f"{longest} frames in one pass, but this motion model's positional encoding "
                f"covers at most {self.max_len} frames; sample at most {self.max_len} frames per pass "
                f"(a latent batch of at most {self.max_len}, or context windows that split longer clips), "
                f"or stretch the PE (Context Options' stretch_pe)"
            )
        if x.shape[0] % num_frames:
            raise ValueError(f"batch of {x.shape[0]} is not a whole number of {num_frames}-frame clips")
        height, width = x.shape[-2:]
        hidden = self._group_norm(x, num_frames, norm_mode)
        hidden = rearrange(hidden, "(b f) c h w -> (b h w) f c", f=num_frames)
        hidden = linear(self.proj_in, hidden)
        for block in self.transformer_blocks:
            hidden = block(hidden, scale_multiplier, windows, stretch_pe)
        hidden = linear(self.proj_out, hidden)
        hidden = rearrange(hidden, "(b h w) f c -> (b f) c h w", h=height, w=width)
        return hidden + x


class VanillaTemporalModule(nn.Module):
    """One motion module as inserted into the UNet: ``module(x, num_frames)``."""

    def __init__(self, channels: int, heads: int, max_len: int, norm_mode: str,
                 transformer_layers: int = 1, attention_blocks: int = 2, zero_init: bool = True, ops=nn):
        super().__init__()
        self.temporal_transformer = TemporalTransformer3D(
            channels, heads, max_len, norm_mode, transformer_layers, attention_blocks, ops=ops
        )
        if zero_init:
            nn.init.zeros_(self.temporal_transformer.proj_out.weight)
            nn.init.zeros_(self.temporal_transformer.proj_out.bias)

    def forward(self, x: torch.Tensor, num_frames: int, scale_multiplier: float = 1.0,
                windows: Windows | None = None, stretch_pe: bool = False, norm_mode: str | None = None) -> torch.Tensor:
        return self.temporal_transformer(x, num_frames, scale_multiplier, windows, stretch_pe, norm_mode)

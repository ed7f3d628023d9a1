"""SparseCtrl (Guo et al. 2023, "SparseCtrl: Adding Sparse Controls to Text-to-Video Diffusion Models"):
the condition encoder of AnimateDiff v3's ``v3_sd15_sparsectrl_rgb`` / ``_scribble`` files.

A ControlNet-style copy of the UNet's down path and mid block with its own motion modules (one
attention block each, the original ``Temporal_Self``). Unlike a ControlNet it ignores the noisy
latent (the released configs set ``set_noisy_sample_input_to_zero``): what it sees is the timestep,
the text, and a condition that is zero on every frame but the keyframes, plus a one-channel mask
saying which frames are keyed. Its outputs are residuals for the UNet's skip connections and mid
block, exactly as a ControlNet's.

- ``rgb``: the condition is the keyframe's VAE latent (times the latent scale factor), 4 channels
  at the latent resolution, through one zero-initialised conv (``use_simplified_condition_embedding``).
- ``scribble``: the condition is the keyframe's pixels in [0, 1], 3 channels at the image
  resolution, through ControlNet's small conv encoder (16, 32, 96, 256 channels, 3 stride-2 convs).

Parameter names follow the released files (which share the diffusers names for the spatial parts);
diffusers' ``SparseControlNetModel`` files load too (its motion modules are renamed as for a
MotionAdapter, REFERENCE §2). Motion-module GroupNorms are per frame, as in the original code;
diffusers normalises them across frames (``norm_mode="across_frames"`` reproduces that).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .errors import MotionModelError
from .temporal import NORM_MODES, FeedForward, VanillaTemporalModule, Windows, linear

KINDS = ("rgb", "scribble")


@dataclass(frozen=True)
class SparseCtrlSpec:
    """Everything needed to rebuild a SparseCtrl encoder; inferred from a file's weights.

    Args:
        channels: output channels of each down block, e.g. (320, 640, 1280, 1280).
        cross_attention: per down block, whether it has spatial transformers (SD1.5: the first three).
        condition_channels: channels of the condition before the mask (rgb 4, scribble 3).
        simplified_embedding: one conv for the condition (rgb) instead of the conv encoder (scribble).
        embedding_channels: the conv encoder's widths (scribble only).
        layers_per_block: ResNet (+ transformer + motion module) layers per down block.
        transformer_depth: transformer blocks per spatial transformer.
        cross_attention_dim: width of the text tokens.
        heads: spatial attention heads (8 for SD1.5: diffusers' ``attention_head_dim``).
        motion_heads: temporal attention heads (8 in both released files).
        pe_length: rows of the motion modules' positional encoding (32).
        linear_projection: spatial transformers project in/out with Linear (SD2-style) not 1x1 convs.
        norm_mode: the motion modules' GroupNorm statistics, "per_frame" (original) or "across_frames".
    """

    channels: tuple[int, ...]
    cross_attention: tuple[bool, ...]
    condition_channels: int
    simplified_embedding: bool
    embedding_channels: tuple[int, ...] = (16, 32, 96, 256)
    layers_per_block: int = 2
    transformer_depth: int = 1
    cross_attention_dim: int = 768
    heads: int = 8
    motion_heads: int = 8
    pe_length: int = 32
    linear_projection: bool = False
    norm_mode: str = "per_frame"
    norm_groups: int = 32

    def __post_init__(self):
        if len(self.channels) != len(self.cross_attention) or not self.channels:
            raise ValueError(f"one cross_attention flag per down block; got {len(self.channels)} blocks "
                             f"and {len(self.cross_attention)} flags")
        if self.norm_mode not in NORM_MODES:
            raise ValueError(f"unknown norm mode {self.norm_mode!r}; expected one of {sorted(NORM_MODES)}")
        bad = [c for c in self.channels if c % self.heads or c % self.motion_heads or c % self.norm_groups]
        if bad:
            raise ValueError(f"block widths {bad} are not divisible by the heads ({self.heads}, "
                             f"{self.motion_heads}) and norm groups ({self.norm_groups})")

    @property
    def kind(self) -> str:
        """"rgb" (latent keyframes) or "scribble" (pixel keyframes)."""
        return "rgb" if self.simplified_embedding else "scribble"

    @property
    def condition_scale(self) -> int:
        """How many times larger than the latent the condition is (1 for rgb, 8 for scribble)."""
        return 1 if self.simplified_embedding else 2 ** (len(self.embedding_channels) - 1)

    @classmethod
    def sd15(cls, kind: str, channels=(320, 640, 1280, 1280), cross_attention_dim: int = 768) -> "SparseCtrlSpec":
        """The released layout: ``SparseCtrlSpec.sd15("rgb")`` is v3_sd15_sparsectrl_rgb's."""
        if kind not in KINDS:
            raise ValueError(f"unknown SparseCtrl kind {kind!r}; expected one of {sorted(KINDS)}")
        return cls(tuple(channels), (True,) * (len(channels) - 1) + (False,),
                   4 if kind == "rgb" else 3, kind == "rgb", cross_attention_dim=cross_attention_dim)

    def with_norm_mode(self, norm_mode: str) -> "SparseCtrlSpec":
        return dataclasses.replace(self, norm_mode=norm_mode)

    def describe(self) -> str:
        return (f"SparseCtrl {self.kind}, {len(self.channels)} down blocks {list(self.channels)}, "
                f"text width {self.cross_attention_dim}, up to {self.pe_length} frames per pass")


def timestep_features(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal timestep features, cosines first, computed in float32 (diffusers ``Timesteps(dim, True, 0)``):
    ``[cos(t w_i), sin(t w_i)]`` with ``w_i = exp(-ln(10000) i / (dim / 2))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the timestep embedding added between, 1x1 shortcut when widths differ."""

    def __init__(self, channels_in: int, channels_out: int, temb: int, groups: int, ops=nn):
        super().__init__()
        self.norm1 = ops.GroupNorm(groups, channels_in, eps=1e-5)
        self.conv1 = ops.Conv2d(channels_in, channels_out, 3, padding=1)
        self.time_emb_proj = ops.Linear(temb, channels_out)
        self.norm2 = ops.GroupNorm(groups, channels_out, eps=1e-5)
        self.conv2 = ops.Conv2d(channels_out, channels_out, 3, padding=1)
        self.conv_shortcut = ops.Conv2d(channels_in, channels_out, 1) if channels_in != channels_out else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Multi-head attention of the spatial transformer: self-attention, or cross-attention to the text."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, ops=nn):
        super().__init__()
        self.heads = heads
        self.to_q = ops.Linear(dim, dim, bias=False)
        self.to_k = ops.Linear(context_dim or dim, dim, bias=False)
        self.to_v = ops.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([ops.Linear(dim, dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (b d c); context: (b t c') or None for self-attention."""
        source = x if context is None else context
        q, k, v = (rearrange(linear(proj, y), "b d (h e) -> b h d e", h=self.heads)
                   for proj, y in ((self.to_q, x), (self.to_k, source), (self.to_v, source)))
        out = F.scaled_dot_product_attention(q, k, v)
        return linear(self.to_out[0], rearrange(out, "b h d e -> b d (h e)"))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, GEGLU feed-forward, all residual."""

    def __init__(self, dim: int, heads: int, context_dim: int, ops=nn):
        super().__init__()
        self.norm1 = ops.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, ops=ops)
        self.norm2 = ops.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim, ops)
        self.norm3 = ops.LayerNorm(dim)
        self.ff = FeedForward(dim, ops=ops)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """GroupNorm, proj_in, transformer blocks over the h*w tokens of each frame, proj_out, residual."""

    def __init__(self, dim: int, spec: SparseCtrlSpec, ops=nn):
        super().__init__()
        self.linear_projection = spec.linear_projection
        self.norm = ops.GroupNorm(spec.norm_groups, dim, eps=1e-6)
        project = (lambda: ops.Linear(dim, dim)) if spec.linear_projection else (lambda: ops.Conv2d(dim, dim, 1))
        self.proj_in = project()
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(dim, spec.heads, spec.cross_attention_dim, ops) for _ in range(spec.transformer_depth)])
        self.proj_out = project()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        h = self.norm(x)
        if self.linear_projection:
            h = linear(self.proj_in, rearrange(h, "b c h w -> b (h w) c"))
        else:
            h = rearrange(self.proj_in(h), "b c h w -> b (h w) c")
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear_projection:
            h = rearrange(linear(self.proj_out, h), "b (h w) c -> b c h w", h=height, w=width)
        else:
            h = self.proj_out(rearrange(h, "b (h w) c -> b c h w", h=height, w=width))
        return h + x


class Downsample(nn.Module):
    def __init__(self, channels: int, ops=nn):
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class DownBlock(nn.Module):
    """``layers_per_block`` x (ResNet, spatial transformer if any, motion module), then a Downsample."""

    def __init__(self, channels_in: int, channels_out: int, cross_attention: bool, downsample: bool,
                 spec: SparseCtrlSpec, ops=nn):
        super().__init__()
        temb = spec.channels[0] * 4
        self.resnets = nn.ModuleList([
            ResnetBlock(channels_in if i == 0 else channels_out, channels_out, temb, spec.norm_groups, ops)
            for i in range(spec.layers_per_block)])
        self.attentions = nn.ModuleList([SpatialTransformer(channels_out, spec, ops)
                                         for _ in range(spec.layers_per_block)]) if cross_attention else None
        self.motion_modules = nn.ModuleList([
            VanillaTemporalModule(channels_out, spec.motion_heads, spec.pe_length, spec.norm_mode,
                                  attention_blocks=1, zero_init=False, ops=ops)
            for _ in range(spec.layers_per_block)])
        self.downsamplers = nn.ModuleList([Downsample(channels_out, ops)]) if downsample else None


class MidBlock(nn.Module):
    """ResNet, spatial transformer, ResNet (no motion module: ``motion_module_mid_block`` is off)."""

    def __init__(self, channels: int, spec: SparseCtrlSpec, ops=nn):
        super().__init__()
        temb = spec.channels[0] * 4
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, temb, spec.norm_groups, ops) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialTransformer(channels, spec, ops)])

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x, emb), context), emb)


class ConditionEmbedding(nn.Module):
    """ControlNet's hint encoder: conv-SiLU, then (conv-SiLU, stride-2 conv-SiLU) per width step, conv_out."""

    def __init__(self, channels_in: int, channels_out: int, widths: Sequence[int], ops=nn):
        super().__init__()
        self.conv_in = ops.Conv2d(channels_in, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for width, wider in zip(widths[:-1], widths[1:]):
            self.blocks.append(ops.Conv2d(width, width, 3, padding=1))
            self.blocks.append(ops.Conv2d(width, wider, 3, padding=1, stride=2))
        self.conv_out = ops.Conv2d(widths[-1], channels_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(x))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, temb: int, ops=nn):
        super().__init__()
        self.linear_1 = ops.Linear(dim, temb)
        self.linear_2 = ops.Linear(temb, temb)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class SparseCtrlModel(nn.Module):
    """The SparseCtrl encoder; ``state_dict()`` has the released files' keys (PE tables aside).

    Args:
        spec: the layout to build.
        operations: namespace providing ``Linear``, ``Conv2d``, ``GroupNorm`` and ``LayerNorm``
            (default ``torch.nn``); a host application can pass its own casting layers.
    """

    def __init__(self, spec: SparseCtrlSpec, operations=nn):
        super().__init__()
        ops = operations
        self.spec = spec
        first = spec.channels[0]
        self.conv_in = ops.Conv2d(4, first, 3, padding=1)
        condition = spec.condition_channels + 1  # + the keyframe mask
        self.controlnet_cond_embedding = (ops.Conv2d(condition, first, 3, padding=1) if spec.simplified_embedding
                                          else ConditionEmbedding(condition, first, spec.embedding_channels, ops))
        self.time_embedding = TimestepEmbedding(first, first * 4, ops)
        self.down_blocks = nn.ModuleList()
        self.controlnet_down_blocks = nn.ModuleList([ops.Conv2d(first, first, 1)])
        previous = first
        for i, (width, cross) in enumerate(zip(spec.channels, spec.cross_attention)):
            last = i == len(spec.channels) - 1
            self.down_blocks.append(DownBlock(previous, width, cross, not last, spec, ops))
            for _ in range(spec.layers_per_block + (0 if last else 1)):
                self.controlnet_down_blocks.append(ops.Conv2d(width, width, 1))
            previous = width
        self.mid_block = MidBlock(spec.channels[-1], spec, ops)
        self.controlnet_mid_block = ops.Conv2d(spec.channels[-1], spec.channels[-1], 1)

    def forward(self, timesteps: torch.Tensor, context: torch.Tensor, condition: torch.Tensor,
                mask: torch.Tensor, frames: int, windows: Windows | None = None,
                stretch_pe: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Residuals for one UNet call of sequences of ``frames`` consecutive frames.

        Args:
            timesteps: (n,) the model timestep of each row, n = sequences x frames.
            context: (n, t, c) text tokens per row.
            condition: (n, condition_channels, H, W) keyframe conditions, zero on unkeyed frames;
                H, W the latent size times ``spec.condition_scale``.
            mask: (n, 1, H, W) 1 on keyed frames, 0 elsewhere.
            frames: frames per sequence (what the motion modules attend over).
            windows, stretch_pe: as for ``VanillaTemporalModule``.

        Returns:
            (the down-path residuals, first to last, the mid-block residual), each (n, c, h, w).
        """
        h = self.controlnet_cond_embedding(torch.cat([condition, mask], dim=1))
        # the noisy latent is zeroed, so conv_in gives its bias: read it through the layer (casting ops)
        h = h + self.conv_in(h.new_zeros(1, self.conv_in.in_channels, 1, 1))
        emb = self.time_embedding(timestep_features(timesteps, self.spec.channels[0]).to(h.dtype))
        skips = [h]
        for block in self.down_blocks:
            for i, resnet in enumerate(block.resnets):
                h = resnet(h, emb)
                if block.attentions is not None:
                    h = block.attentions[i](h, context)
                h = block.motion_modules[i](h, frames, 1.0, windows, stretch_pe)
                skips.append(h)
            if block.downsamplers is not None:
                h = block.downsamplers[0](h)
                skips.append(h)
        h = self.mid_block(h, emb, context)
        residuals = [conv(skip) for conv, skip in zip(self.controlnet_down_blocks, skips)]
        return residuals, self.controlnet_mid_block(h)

    def set_norm_mode(self, norm_mode: str) -> "SparseCtrlModel":
        """Switch the motion modules' GroupNorm statistics between per-frame and across-frame."""
        if norm_mode not in NORM_MODES:
            raise ValueError(f"unknown norm mode {norm_mode!r}; expected one of {sorted(NORM_MODES)}")
        self.spec = self.spec.with_norm_mode(norm_mode)
        for module in self.modules():
            if isinstance(module, VanillaTemporalModule):
                module.temporal_transformer.norm_mode = norm_mode
        return self


def keyframe_positions(indexes: Sequence[int] | None, count: int, frames: int, where: str = "keyframes") -> list[int]:
    """The frame each of ``count`` keyframes sits on in a clip of ``frames`` frames.

    ``indexes`` None or empty spreads them evenly from the first to the last frame
    (``round(i (frames - 1) / (count - 1))``; one keyframe sits on frame 0); negative indexes count
    from the end (-1 is the last frame). Example: 3 keyframes, 16 frames -> [0, 8, 15].
    """
    if count < 1:
        raise MotionModelError(f"{where}: no keyframe images")
    if not indexes:
        if count > frames:
            raise MotionModelError(f"{where}: {count} keyframe images for a clip of {frames} frames; "
                                   "give at most one image per frame")
        return [0] if count == 1 else [math.floor(i * (frames - 1) / (count - 1) + 0.5) for i in range(count)]
    if len(indexes) != count:
        raise MotionModelError(f"{where}: {len(indexes)} keyframe indexes {list(indexes)} for {count} images; "
                               "give one index per image, or none to spread the images evenly")
    positions = []
    for index in indexes:
        if not -frames <= index < frames:
            raise MotionModelError(f"{where}: keyframe index {index} is outside a clip of {frames} frames "
                                   f"(use 0..{frames - 1}, or -1..-{frames} from the end)")
        positions.append(index % frames)
    if len(set(positions)) != len(positions):
        raise MotionModelError(f"{where}: keyframe indexes {list(indexes)} put two images on the same frame "
                               f"of a {frames}-frame clip ({positions})")
    return positions


def sparse_condition(keyframes: torch.Tensor, positions: Sequence[int],
                     rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The condition and mask of the frames ``rows`` (positions in the clip): keyframe ``k`` on the row
    of frame ``positions[k]`` with mask 1, zeros with mask 0 on every other row.

    Args:
        keyframes: (k, c, h, w) encoded keyframes.
        positions: the frame of each keyframe (``keyframe_positions``).
        rows: the clip frame of each output row (a window's frames, repeated per sequence).
    Returns:
        (condition (len(rows), c, h, w), mask (len(rows), 1, h, w)).
    """
    of_frame = {frame: k for k, frame in enumerate(positions)}
    pick = torch.as_tensor([of_frame.get(frame, len(positions)) for frame in rows], device=keyframes.device)
    padded = torch.cat([keyframes, keyframes.new_zeros(1, *keyframes.shape[1:])])
    mask = (pick < len(positions)).to(keyframes.dtype)[:, None, None, None].expand(-1, 1, *keyframes.shape[2:])
    return padded[pick], mask

"""Checks around sampling with an animated model: refuse, before the first step, what would fail
half-way (not enough memory) or silently give a black or noise video (NaN/Inf inputs), and name the
source; after sampling, refuse non-finite results instead of decoding them.

Called from the OUTER_SAMPLE wrapper (context_sampling.py) that Apply Motion Model always installs.
"""

from __future__ import annotations

import torch

import comfy.model_management

from ..motion_modules import MotionModelError
from ..motion_modules.memory import temporal_module_bytes
from ..motion_modules.temporal import AUTO_NAIVE_FRAMES

GIB = 1024 ** 3


def _check_finite(tensor, source: str) -> None:
    if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise MotionModelError(f"{source} contains NaN or Inf values; sampling it would give black or noise "
                               "frames. Fix or replace that input")


def check_inputs(guider, noise: torch.Tensor, latent_image: torch.Tensor) -> None:
    """Latents, noise, conditioning tensors and ControlNet hints must be finite; the latent must have
    the channels of the model's latent format."""
    _check_finite(latent_image, "the latent image given to the sampler")
    _check_finite(noise, "the sampler's initial noise")
    base = guider.model_patcher.model
    channels = getattr(getattr(base, "latent_format", None), "latent_channels", None)
    if channels is not None and latent_image.ndim >= 2 and latent_image.shape[1] != channels \
            and bool(latent_image.any()):
        raise MotionModelError(f"the latent has {latent_image.shape[1]} channels but this "
                               f"{type(base.model_config).__name__} model works on {channels}-channel latents "
                               "(a latent made for another model family?)")
    frames = int(noise.shape[0])
    for name, conds in (getattr(guider, "conds", None) or {}).items():
        for number, cond in enumerate(conds, 1):
            for key in ("cross_attn", "pooled_output", "mask"):
                _check_finite(cond.get(key), f"the {name} conditioning (entry {number}, {key})")
            cross_attn = cond.get("cross_attn")
            if isinstance(cross_attn, torch.Tensor) and cross_attn.shape[0] not in (1, frames):
                raise MotionModelError(f"the {name} conditioning has {cross_attn.shape[0]} entries (per-frame "
                                       f"prompts?) but the latent has {frames} frames; ComfyUI would silently "
                                       "repeat or cut them. Make them equal (Prompt Travel's frames = the "
                                       "latent batch size)")
            control = cond.get("control")
            while control is not None:
                _check_finite(getattr(control, "cond_hint_original", None),
                              f"the hint image of a ControlNet in the {name} conditioning")
                control = getattr(control, "previous_controlnet", None)


def call_plan(frames: int, context, clips: int = 1) -> tuple[int, int, int]:
    """(UNet frames, attention length, sequences) of the largest UNet call one cond chunk makes for a
    latent batch of ``frames`` holding ``clips`` clips, under ``context`` (ContextOptions or None)."""
    clip_frames = frames // clips
    windowed = context is not None and clip_frames > context.context_length
    if not windowed:
        return frames, clip_frames, clips
    windows = clips * max(1, context.window_batch)
    if context.scope == "whole_model":
        return windows * context.context_length, context.context_length, windows
    return frames, context.context_length, clips


def motion_bytes(model, noise_shape, unet_frames: int, attention_frames: int, heads: int, channels: int) -> int:
    """Peak bytes the motion modules add to a UNet call on ``unet_frames`` frames (``temporal_module_bytes``
    of the largest module, in the model's compute dtype; the attention scores count where the "auto"
    kernel materialises them: short sequences on the CPU)."""
    dtype = getattr(model, "manual_cast_dtype", None) or (model.get_dtype() if hasattr(model, "get_dtype") else None)
    dtype_bytes = comfy.model_management.dtype_size(dtype) if dtype is not None else 4
    positions = int(noise_shape[-2]) * int(noise_shape[-1])
    device = getattr(model, "device", None) or comfy.model_management.get_torch_device()
    materialised = torch.device(device).type == "cpu" and attention_frames <= AUTO_NAIVE_FRAMES
    return temporal_module_bytes(positions, unet_frames, channels, attention_frames, heads, dtype_bytes, materialised)


def estimated_peak_bytes(model, noise_shape, unet_frames: int, attention_frames: int, heads: int,
                         channels: int) -> int:
    """ComfyUI's own activation estimate for the smallest UNet call it can make (one cond chunk of the
    frames that must go through the UNet together) plus what the motion modules add to it."""
    call_shape = (unet_frames, *noise_shape[1:])
    memory_required = getattr(model, "memory_required", None)
    unet = int(memory_required(call_shape)) if memory_required is not None else 0
    return unet + motion_bytes(model, noise_shape, unet_frames, attention_frames, heads, channels)


def check_memory(guider, noise: torch.Tensor, context, heads: int, channels: int, clips: int = 1) -> None:
    """Refuse a clip whose estimated peak exceeds the device's total memory, with both numbers."""
    frames = int(noise.shape[0])
    windowed = context is not None and frames // clips > context.context_length
    unet_frames, attention_frames, _ = call_plan(frames, context, clips)
    patcher = guider.model_patcher
    estimate = estimated_peak_bytes(patcher.model, tuple(noise.shape), unet_frames, attention_frames, heads,
                                    channels)
    total = comfy.model_management.get_total_memory(patcher.load_device)
    if estimate > total:
        size = f"{noise.shape[-1] * 8}x{noise.shape[-2] * 8}"
        if not windowed:
            advice = "add Context Options so the UNet sees one window at a time, or use fewer frames or a smaller size"
        elif context.scope != "whole_model":
            advice = ("set Context Options' scope to whole_model (the UNet then sees one window at a time), or use "
                      "fewer frames or a smaller size")
        elif context.window_batch > 1:
            advice = "lower Context Options' window_batch (or 0 = auto), or lower context_length"
        else:
            advice = "lower context_length, or use a smaller size"
        raise MotionModelError(f"{frames} frames at {size} need about {estimate / GIB:.1f} GiB at once "
                               f"(estimate: {unet_frames} frames through the UNet, attention over "
                               f"{attention_frames} frames), more than the {total / GIB:.1f} GiB this device "
                               f"({patcher.load_device}) has; {advice}")


def check_output(output: torch.Tensor) -> None:
    if isinstance(output, torch.Tensor) and not bool(torch.isfinite(output).all()):
        raise MotionModelError("sampling produced NaN or Inf latents although every input was finite: the "
                               "model overflowed (fp16 with a high LoRA or motion strength, or an extreme cfg?); "
                               "lower those, or run the model in fp32/bf16")

"""FreeNoise initial-noise schedules (Qiu et al. 2023, "FreeNoise", sec. 3.2).

Long clips sampled with windows drift because every window starts from unrelated noise.
FreeNoise reuses the noise of the first frames further along the clip. Noise here is laid out
frames first, ``(frames, channels, ...)``, as ComfyUI latents are; the semantics are those of
diffusers' ``_prepare_latents_free_noise``:

- ``default``: the sampler's noise, unchanged.
- ``random``: fresh noise drawn as diffusers draws it, ``randn(1, C, F, H, W)`` from the seed
  (so one seed gives the same starting noise as diffusers' AnimateDiff pipelines).
- ``repeated_context``: frame ``i`` gets the noise of frame ``i % context_length``. (diffusers
  0.42 documents this type but compares a number with a string and returns plain noise instead.)
- ``shuffle_context``: for ``i = L, L + S, L + 2S, ...`` (``L`` the context length, ``S`` the
  window advance ``L - overlap``) the frames ``[i - L, i - L + S)`` are permuted into
  ``[i, i + S)``, in order, so later blocks may copy blocks that were copied themselves.
"""

from __future__ import annotations

import torch

NOISE_TYPES = ("default", "random", "repeated_context", "shuffle_context")


def free_noise(noise: torch.Tensor, noise_type: str, context_length: int, context_stride: int,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Return the FreeNoise version of ``noise`` (frames first); the input is never modified.

    Args:
        noise: (frames, ...) noise.
        noise_type: one of ``NOISE_TYPES``.
        context_length: frames per window (``L``).
        context_stride: frames between window starts (``S``; ``context_length - context_overlap``).
        generator: CPU generator for ``random`` and ``shuffle_context`` (their only randomness).
    """
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"unknown FreeNoise noise type {noise_type!r}; expected one of {list(NOISE_TYPES)}")
    if context_length < 1 or context_stride < 1:
        raise ValueError(f"context_length and context_stride must be at least 1, "
                         f"got {context_length} and {context_stride}")
    if noise.ndim < 2:
        raise ValueError(f"noise must be (frames, channels, ...), got shape {tuple(noise.shape)}")
    frames = noise.shape[0]
    if noise_type == "default":
        return noise
    if noise_type == "random":
        # diffusers layout (batch, channels, frames, ...), drawn on the CPU like ComfyUI's noise
        drawn = torch.randn((1, noise.shape[1], frames, *noise.shape[2:]), generator=generator,
                            dtype=torch.float32, device="cpu")
        return drawn[0].transpose(0, 1).contiguous().to(device=noise.device, dtype=noise.dtype)
    if noise_type == "repeated_context":
        index = torch.arange(frames, device=noise.device) % context_length
        return noise[index]
    out = noise.clone()
    for start in range(context_length, frames, context_stride):
        source = start - context_length
        count = min(context_stride, frames - start)
        order = torch.randperm(min(context_stride, frames - source), generator=generator)[:count]
        out[start:start + count] = out[source + order.to(out.device)]
    return out

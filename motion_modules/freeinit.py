"""FreeInit (Wu et al. 2023, "FreeInit: Bridging Initialization Gap in Video Diffusion Models").

Sampling is repeated ``iterations`` times. After each pass, the result ``x0`` is noised back to
the starting noise level with the *initial* noise, and the low spatio-temporal frequencies of
that are kept while the high frequencies come from fresh noise; the next pass starts from the
mix. The low-pass filters are those of the original code (and of diffusers), over a
(frames, height, width) volume, with

    d^2(t, h, w) = ((ds / dt) (2t/T - 1))^2 + (2h/H - 1)^2 + (2w/W - 1)^2

- ``butterworth``: 1 / (1 + (d^2 / ds^2)^order)
- ``gaussian``: exp(-d^2 / (2 ds^2))
- ``ideal``: 1 where d^2 <= 2 ds, else 0 (the original's threshold, kept for parity)
- ``box``: 1 on the centred box of half-sizes round((H // 2) ds) (rows), round((W // 2) ds)
  (columns; the original uses H for both, which differs only for non-square latents) and
  round((T // 2) dt) (frames), else 0

A stop frequency of 0 gives an all-zero filter (only fresh noise). Frequencies are those of
``fftshift``-ed spectra, so the centre of the volume is the zero frequency.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FILTERS = ("butterworth", "gaussian", "ideal", "box")


@dataclass(frozen=True)
class FreeInitOptions:
    """FreeInit settings (validated on creation).

    Args:
        iterations: sampling passes, 1 = plain sampling (the original uses 3-5).
        method: a name in ``FILTERS``.
        spatial_stop: normalised spatial stop frequency ``ds`` in [0, 1].
        temporal_stop: normalised temporal stop frequency ``dt`` in [0, 1].
        order: butterworth order (larger is closer to ``ideal``).
        fast_sampling: coarse-to-fine: pass ``k`` (0-based) uses ``max(1, int(steps / iterations * (k + 1)))``
            steps, so only the last pass runs them all.
    """

    iterations: int = 3
    method: str = "butterworth"
    spatial_stop: float = 0.25
    temporal_stop: float = 0.25
    order: int = 4
    fast_sampling: bool = False

    def __post_init__(self):
        if self.iterations < 1:
            raise ValueError(f"FreeInit iterations must be at least 1, got {self.iterations}")
        if self.method not in FILTERS:
            raise ValueError(f"unknown FreeInit filter {self.method!r}; expected one of {list(FILTERS)}")
        for name in ("spatial_stop", "temporal_stop"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"FreeInit {name} must be in [0, 1], got {value}")
        if self.order < 1:
            raise ValueError(f"FreeInit butterworth order must be at least 1, got {self.order}")


def low_pass_filter(frames: int, height: int, width: int, method: str, spatial_stop: float,
                    temporal_stop: float, order: int = 4) -> torch.Tensor:
    """The (frames, height, width) float32 low-pass mask of ``method`` (see the module docstring)."""
    if method not in FILTERS:
        raise ValueError(f"unknown FreeInit filter {method!r}; expected one of {list(FILTERS)}")
    if spatial_stop == 0 or temporal_stop == 0:
        return torch.zeros(frames, height, width)
    if method == "box":
        mask = torch.zeros(frames, height, width)
        half_t = round(frames // 2 * temporal_stop)
        half_h, half_w = round(height // 2 * spatial_stop), round(width // 2 * spatial_stop)
        ct, ch, cw = frames // 2, height // 2, width // 2
        mask[ct - half_t:ct + half_t, ch - half_h:ch + half_h, cw - half_w:cw + half_w] = 1.0
        return mask
    t = (spatial_stop / temporal_stop) * (2 * torch.arange(frames, dtype=torch.float64) / frames - 1)
    h = 2 * torch.arange(height, dtype=torch.float64) / height - 1
    w = 2 * torch.arange(width, dtype=torch.float64) / width - 1
    d2 = t.view(-1, 1, 1) ** 2 + h.view(1, -1, 1) ** 2 + w.view(1, 1, -1) ** 2
    if method == "butterworth":
        mask = 1 / (1 + (d2 / spatial_stop ** 2) ** order)
    elif method == "gaussian":
        mask = torch.exp(-d2 / (2 * spatial_stop ** 2))
    else:
        mask = (d2 <= spatial_stop * 2).to(torch.float64)
    return mask.float()


def frequency_mix(low: torch.Tensor, high: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Low frequencies of ``low`` plus high frequencies of ``high``, by ``mask`` over the last three
    dimensions (frames, height, width): ifft(mask * F(low) + (1 - mask) * F(high)), real part, float32."""
    dims = (-3, -2, -1)
    mask = mask.to(low.device)
    spectrum_low = torch.fft.fftshift(torch.fft.fftn(low.float(), dim=dims), dim=dims)
    spectrum_high = torch.fft.fftshift(torch.fft.fftn(high.float(), dim=dims), dim=dims)
    mixed = spectrum_low * mask + spectrum_high * (1 - mask)
    return torch.fft.ifftn(torch.fft.ifftshift(mixed, dim=dims), dim=dims).real


def frames_first_mix(low: torch.Tensor, high: torch.Tensor, options: FreeInitOptions) -> torch.Tensor:
    """``frequency_mix`` for ComfyUI latents laid out (frames, channels, height, width)."""
    if low.shape != high.shape or low.ndim != 4:
        raise ValueError(f"FreeInit mixes two (frames, channels, height, width) latents of one shape, "
                         f"got {tuple(low.shape)} and {tuple(high.shape)}")
    frames, _, height, width = low.shape
    mask = low_pass_filter(frames, height, width, options.method, options.spatial_stop,
                           options.temporal_stop, options.order)
    mixed = frequency_mix(low.transpose(0, 1), high.transpose(0, 1), mask)
    return mixed.transpose(0, 1).contiguous()


def pass_steps(steps: int, options: FreeInitOptions, iteration: int) -> int:
    """Steps of pass ``iteration`` (0-based): all of them, or coarse-to-fine with fast sampling."""
    if not options.fast_sampling:
        return steps
    return max(1, int(steps / options.iterations * (iteration + 1)))


def fewer_sigmas(sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """A ``steps``-step schedule from a longer one: the same first and last sigma, the points in
    between picked evenly, so the schedule keeps its shape (whatever scheduler made it)."""
    total = sigmas.shape[-1] - 1
    if steps >= total:
        return sigmas
    index = torch.tensor([round(k * total / steps) for k in range(steps + 1)], device=sigmas.device)
    return sigmas[index]


def fresh_noise_seed(seed: int | None, iteration: int) -> int:
    """Seed of the fresh noise of pass ``iteration`` (>= 1): reproducible, distinct per pass."""
    return ((seed or 0) + 0x9E3779B1 * iteration) % (1 << 63)

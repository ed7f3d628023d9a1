"""Sliding context windows over frames, and the weights that fuse overlapping windows.

AnimateDiff sees ``context_length`` frames at a time (16 in training); longer clips are sampled
as overlapping windows whose outputs are averaged per frame with fuse weights (FreeNoise, Qiu et
al. 2023, sec. 3.3, for the pyramid weighting). Every schedule has the same contract,
``schedule(num_frames, options, step) -> list of windows`` (a window is a list of frame indices),
and every fuse method ``fuse(window, num_frames, options) -> weights`` (one positive weight per
window position).

Worked example, 40 frames, ``context_length=16, context_overlap=4`` (windows advance by 12):
``standard_static`` gives [0..15], [12..27], [24..39] at every step. ``context_stride=2`` (uniform
schedules) adds windows of 16 frames taken every 2nd frame, e.g. [0, 2, .., 30], which see a span
of 31 frames; a level is used only while such a window fits in the clip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .freenoise import NOISE_TYPES

SCOPES = ("whole_model", "motion_attention")


def ordered_halving(step: int) -> float:
    """Bit-reversed step / 2^64: 0, 1/2, 1/4, 3/4, 1/8, ... (a low-discrepancy offset per step)."""
    return int(f"{step:064b}"[::-1], 2) / (1 << 64)


@dataclass(frozen=True)
class ContextOptions:
    """Window settings (validated on creation).

    Args:
        context_length: frames per window; at most the motion model's frame limit.
        context_overlap: frames shared by neighbouring windows, ``0 <= overlap < length``.
        context_stride: uniform schedules only: levels of dilated windows (1 = contiguous only).
        closed_loop: looped schedule only: add windows across the end-to-start seam.
        schedule: a name in ``SCHEDULES``.
        fuse_method: a name in ``FUSE_METHODS``.
        noise_type: FreeNoise initial noise, a name in ``freenoise.NOISE_TYPES``.
        scope: ``whole_model``: the UNet runs once per window and its outputs are fused (memory
            stays flat); ``motion_attention`` (FreeNoise): the UNet runs on all frames at once and
            only the motion modules' attention is windowed and fused (memory grows with frames).
        stretch_pe: allow ``context_length`` beyond the motion model's frame limit; longer passes
            get stretched positional encodings (``temporal.stretched_pe``).
        window_batch: ``whole_model`` scope: windows run together in one UNet call, at most this
            many (1 = one window per call; 0 = as many as the free memory allows, decided per step).
    """

    context_length: int = 16
    context_overlap: int = 4
    context_stride: int = 1
    closed_loop: bool = False
    schedule: str = "standard_static"
    fuse_method: str = "pyramid"
    noise_type: str = "default"
    scope: str = "whole_model"
    stretch_pe: bool = False
    window_batch: int = 1

    def __post_init__(self):
        if self.context_length < 1:
            raise ValueError(f"context_length must be at least 1, got {self.context_length}")
        if not 0 <= self.context_overlap < self.context_length:
            raise ValueError(f"context_overlap must be in [0, context_length) = [0, {self.context_length}), "
                             f"got {self.context_overlap}")
        if self.context_stride < 1:
            raise ValueError(f"context_stride must be at least 1, got {self.context_stride}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown context schedule {self.schedule!r}; expected one of {sorted(SCHEDULES)}")
        if self.fuse_method not in FUSE_METHODS:
            raise ValueError(f"unknown fuse method {self.fuse_method!r}; expected one of {sorted(FUSE_METHODS)}")
        if self.noise_type not in NOISE_TYPES:
            raise ValueError(f"unknown noise type {self.noise_type!r}; expected one of {list(NOISE_TYPES)}")
        if self.window_batch < 0:
            raise ValueError(f"window_batch must be 0 (auto) or more, got {self.window_batch}")
        if self.scope not in SCOPES:
            raise ValueError(f"unknown window scope {self.scope!r}; expected one of {list(SCOPES)}")

    @property
    def advance(self) -> int:
        """Frames between the starts of neighbouring windows (FreeNoise's stride)."""
        return self.context_length - self.context_overlap


def context_windows(num_frames: int, options: ContextOptions, step: int = 0) -> list[list[int]]:
    """The windows for one sampling step; clips of at most ``context_length`` frames are one window."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if num_frames <= options.context_length:
        return [list(range(num_frames))]
    return SCHEDULES[options.schedule](num_frames, options, step)


def _dilations(num_frames: int, options: ContextOptions) -> list[int]:
    """Frame steps 1, 2, 4, ... up to ``context_stride`` levels, while a window's span fits."""
    return [2 ** k for k in range(options.context_stride)
            if (options.context_length - 1) * 2 ** k + 1 <= num_frames]


def _static(num_frames: int, options: ContextOptions, step: int = 0, offset: int = 0, dilation: int = 1):
    """Windows starting at 0, offset, offset + advance, ..., the last one aligned to the end."""
    span = (options.context_length - 1) * dilation + 1
    advance = (options.context_length - options.context_overlap) * dilation
    starts = sorted({0, *range(offset, num_frames - span, advance), num_frames - span})
    return [list(range(start, start + span, dilation)) for start in starts]


def schedule_standard_static(num_frames: int, options: ContextOptions, step: int) -> list[list[int]]:
    """The same overlapping windows at every step, the last one aligned to the clip's end."""
    return _static(num_frames, options)


def schedule_standard_uniform(num_frames: int, options: ContextOptions, step: int) -> list[list[int]]:
    """AnimateDiff-Evolved's and ComfyUI core's ``standard_uniform``: the looped grid shifted by
    ``round(frames * ordered_halving(step))``, each window that wraps past the last frame moved to end
    there (plus a window from the wrapped frame when the next window does not hold it), repeats dropped.

    Worked example: 32 frames, length 16, overlap 4, step 1 (halving 1/2, shift 16): the grid starts at
    16, 28 and 40, i.e. [16..31], [28..31, 0..11] and [8..23]; the second wraps at frame 0, so it moves
    to [16..31] (a repeat, dropped) and, as [8..23] lacks frame 0, [0..15] is added after it: windows
    [16..31], [0..15], [8..23].
    """
    shift = ordered_halving(step)
    windows: list[list[int]] = []
    for level in range(_uniform_levels(num_frames, options)):
        dilation = 1 << level
        if (options.context_length - 1) * dilation + 1 > num_frames:
            # a dilated window longer than the clip wraps more than once; the published algorithm then
            # yields frames past the end (5 frames, length 4, stride 2: frames 5 and 7): leave the level out
            break
        first = int(shift * dilation) + int(round(num_frames * shift))
        advance = options.context_length * dilation - options.context_overlap
        for start in range(first, num_frames + int(round(num_frames * shift)) - options.context_overlap, advance):
            windows.append([(start + i * dilation) % num_frames for i in range(options.context_length)])
    kept, index = [], 0
    while index < len(windows):
        window = windows[index]
        wrap = next((i for i in range(1, len(window)) if window[i] < window[i - 1]), None)
        if wrap is not None:
            wrapped_frame = window[wrap]
            relative = [(frame - window[0]) % num_frames for frame in window]
            window[:] = [frame + num_frames - 1 - relative[-1] for frame in relative]
            if wrapped_frame not in windows[(index + 1) % len(windows)]:
                windows.insert(index + 1, list(range(wrapped_frame, wrapped_frame + options.context_length)))
        if window not in windows[:index]:
            kept.append(window)
        index += 1
    return kept


def _uniform_levels(num_frames: int, options: ContextOptions) -> int:
    """Dilation levels of the uniform schedules as AnimateDiff-Evolved counts them."""
    return min(options.context_stride, math.ceil(math.log2(num_frames / options.context_length)) + 1)


def schedule_shifted_static(num_frames: int, options: ContextOptions, step: int) -> list[list[int]]:
    """Static windows shifted by a per-step fraction of the advance (so seams move between steps), the
    first at frame 0 and the last ending on the last frame, plus dilated levels for ``context_stride >
    1``; windows never wrap. This pack's ``standard_uniform`` before it took AnimateDiff-Evolved's."""
    windows = []
    for dilation in _dilations(num_frames, options):
        advance = (options.context_length - options.context_overlap) * dilation
        offset = int(ordered_halving(step) * advance)
        windows += [w for w in _static(num_frames, options, offset=offset, dilation=dilation) if w not in windows]
    return windows


def schedule_looped_uniform(num_frames: int, options: ContextOptions, step: int) -> list[list[int]]:
    """Windows that wrap from the last frame to the first (for looping clips), shifted per step;
    ``closed_loop`` adds windows until the seam is covered like any other overlap."""
    windows = []
    for dilation in _dilations(num_frames, options):
        advance = (options.context_length - options.context_overlap) * dilation
        offset = int(round(ordered_halving(step) * num_frames))
        end = offset + num_frames - (0 if options.closed_loop else options.context_overlap * dilation)
        for start in range(offset, max(end, offset + 1), advance):
            window = [(start + i * dilation) % num_frames for i in range(options.context_length)]
            if window not in windows:
                windows.append(window)
    return windows


def schedule_batched(num_frames: int, options: ContextOptions, step: int) -> list[list[int]]:
    """Disjoint chunks of ``context_length`` frames (no overlap; the last one may be shorter)."""
    return [list(range(start, min(start + options.context_length, num_frames)))
            for start in range(0, num_frames, options.context_length)]


SCHEDULES = {
    "standard_static": schedule_standard_static,
    "standard_uniform": schedule_standard_uniform,
    "shifted_static": schedule_shifted_static,
    "looped_uniform": schedule_looped_uniform,
    "batched": schedule_batched,
}


def fuse_flat(window: Sequence[int], num_frames: int, options: ContextOptions) -> list[float]:
    return [1.0] * len(window)


def fuse_pyramid(window: Sequence[int], num_frames: int, options: ContextOptions) -> list[float]:
    """1, 2, ..., peak, ..., 2, 1: frames near a window's edge count less (FreeNoise, sec. 3.3)."""
    n = len(window)
    return [float(min(i + 1, n - i)) for i in range(n)]


def fuse_overlap_linear(window: Sequence[int], num_frames: int, options: ContextOptions) -> list[float]:
    """1 inside, linear ramps (k / (overlap + 1)) over the overlap on sides that have a neighbour."""
    n, overlap = len(window), min(options.context_overlap, len(window) // 2)
    weights = [1.0] * n
    ramp = [(k + 1) / (overlap + 1) for k in range(overlap)]
    if window[0] != 0:
        weights[:overlap] = ramp
    if window[-1] != num_frames - 1:
        weights[n - overlap:] = ramp[::-1]
    return weights


def fuse_gaussian(window: Sequence[int], num_frames: int, options: ContextOptions) -> list[float]:
    """exp(-(i - centre)^2 / (2 sigma^2)) with sigma = length / 4: a smooth pyramid."""
    n = len(window)
    centre, sigma = (n - 1) / 2, max(n / 4, 0.5)
    return [math.exp(-((i - centre) ** 2) / (2 * sigma ** 2)) for i in range(n)]


def fuse_delayed_reverse_sawtooth(window: Sequence[int], num_frames: int, options: ContextOptions) -> list[float]:
    """0.01 over the first half (the last of it at the peak for even lengths), then peak, ..., 1
    (diffusers' FreeNoise weighting): a window trusts its later frames most."""
    n = len(window)
    mid = (n + 1) // 2
    head = [0.01] * (mid - 1) + ([float(mid)] if n % 2 == 0 else [])
    return head + [float(k) for k in range(mid, 0, -1)]


FUSE_METHODS = {
    "flat": fuse_flat,
    "pyramid": fuse_pyramid,
    "overlap-linear": fuse_overlap_linear,
    "gaussian": fuse_gaussian,
    "delayed_reverse_sawtooth": fuse_delayed_reverse_sawtooth,
}


def weighted_windows(num_frames: int, options: ContextOptions, step: int = 0) -> list[tuple[list[int], list[float]]]:
    """The windows of ``context_windows`` with their fuse weights: the plan a windowed layer runs."""
    return [(window, FUSE_METHODS[options.fuse_method](window, num_frames, options))
            for window in context_windows(num_frames, options, step)]


def window_groups(plan: Sequence[tuple[list[int], list[float]]], per_call: int) -> list[list]:
    """Split a step's ``(window, weights)`` plan into the groups that run in one UNet call each:
    consecutive windows of equal length (a batch has one sequence length), at most ``per_call``."""
    if per_call < 1:
        raise ValueError(f"per_call must be at least 1, got {per_call}")
    groups: list[list] = []
    for entry in plan:
        last = groups[-1] if groups else None
        if last and len(last) < per_call and len(last[0][0]) == len(entry[0]):
            last.append(entry)
        else:
            groups.append([entry])
    return groups


class WindowAccumulator:
    """Running weighted sum of window outputs along ``dim``: memory stays one clip-sized buffer,
    whatever the number of windows. ``result()`` is the per-frame weighted mean.

    One in-order window covering every frame is returned unchanged (bit-exact), so short clips
    are unaffected by context options. The weights per frame are also summed in Python, so the
    check that every frame is covered reads no value from the device (on a GPU that read would wait
    for all queued work, once per motion module with ``motion_attention`` windows).
    """

    def __init__(self, num_frames: int, options: ContextOptions | None, dim: int = 0):
        self.num_frames, self.options, self.dim = num_frames, options, dim
        self.total = self.counts = self.host_counts = self.whole = self._whole_weights = None

    def add(self, window: Sequence[int], output: torch.Tensor, weights: Sequence[float] | None = None) -> None:
        """Add one window's output; ``weights`` default to the options' fuse method."""
        if self.total is None and self.whole is None and list(window) == list(range(self.num_frames)):
            self.whole, self._whole_weights = output, weights
            return
        if self.total is None:
            shape = list(output.shape)
            shape[self.dim] = self.num_frames
            dtype = torch.float32 if output.dtype in (torch.float16, torch.bfloat16) else output.dtype
            self.total = torch.zeros(shape, dtype=dtype, device=output.device)
            self.counts = torch.zeros(self.num_frames, dtype=dtype, device=output.device)
            self.host_counts = [0.0] * self.num_frames
            self.dtype = output.dtype
            if self.whole is not None:
                whole, self.whole = self.whole, None
                self.add(range(self.num_frames), whole, self._whole_weights)
        view = [1] * output.ndim
        view[self.dim] = -1
        index = torch.as_tensor(list(window), device=output.device)
        if weights is None:
            weights = FUSE_METHODS[self.options.fuse_method](window, self.num_frames, self.options)
        for frame, weight in zip(window, weights):
            self.host_counts[frame] += float(weight)
        weights = torch.tensor(weights, dtype=self.total.dtype, device=output.device)
        self.total.index_add_(self.dim, index, output.to(self.total.dtype) * weights.view(view))
        self.counts.index_add_(0, index, weights)

    def result(self) -> torch.Tensor:
        if self.whole is not None:
            return self.whole
        if self.total is None:
            raise ValueError("no window outputs to fuse")
        missing = [frame for frame, count in enumerate(self.host_counts) if count <= 0]  # weights are >= 0
        if missing:
            raise ValueError(f"frames {missing[:8]} are covered by no window")
        view = [1] * self.total.ndim
        view[self.dim] = -1
        return (self.total / self.counts.view(view)).to(self.dtype)


def fuse_windows(results: Sequence[tuple[Sequence[int], torch.Tensor]], num_frames: int,
                 options: ContextOptions, dim: int = 0) -> torch.Tensor:
    """Weighted per-frame mean of window outputs along ``dim`` (see ``WindowAccumulator``)."""
    accumulator = WindowAccumulator(num_frames, options, dim)
    for window, output in results:
        accumulator.add(window, output)
    return accumulator.result()


def window_costs(num_frames: int, options: ContextOptions, step: int = 0) -> list[tuple[list[int], int, float]]:
    """Per window of one step: (window, frames no earlier window of the step covered, share of the step's
    UNet work). Every window costs the same (one UNet call on ``len(window)`` frames), so a window that
    adds few new frames (e.g. the static schedule's last one, aligned to the clip's end) is mostly
    repeated work; the share tells what dropping or moving it would save."""
    windows = context_windows(num_frames, options, step)
    total = sum(len(w) for w in windows)
    seen: set[int] = set()
    costs = []
    for window in windows:
        new = len(set(window) - seen)
        seen.update(window)
        costs.append((window, new, len(window) / total))
    return costs


def window_report(num_frames: int, options: ContextOptions, steps: int = 1) -> str:
    """Text summary of the windows per step for the preview node: count, frames per step, and every
    window that adds fewer than half a window of new frames, with its cost share."""
    lines = []
    for step in range(steps):
        costs = window_costs(num_frames, options, step)
        frames = sum(len(w) for w, _, _ in costs)
        lines.append(f"step {step}: {len(costs)} window(s), {frames} frames through the UNet for "
                     f"{num_frames} ({frames / num_frames:.2f}x)")
        for number, (window, new, share) in enumerate(costs):
            if new * 2 < len(window):
                lines.append(f"  window {number} (frames {window[0]}..{window[-1]}) adds {new} new frame(s) "
                             f"for {share:.0%} of the step's cost")
    return "\n".join(lines)


def schedule_image(num_frames: int, options: ContextOptions, steps: int, cell: int = 6) -> torch.Tensor:
    """Render the window schedule as an RGB image (H, W, 3) in [0, 1].

    One column of ``cell`` pixels per frame; per step, one row per window, coloured by window and
    shaded by its fuse weight (bright = heavy); a grey line separates steps.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    rows: list[torch.Tensor] = []
    for step in range(steps):
        windows = context_windows(num_frames, options, step)
        for k, window in enumerate(windows):
            weights = torch.tensor(FUSE_METHODS[options.fuse_method](window, num_frames, options))
            row = torch.zeros(num_frames, 3)
            hue = torch.tensor([(k * 0.37) % 1.0 * 6 + shift for shift in (0.0, 4.0, 2.0)]) % 6
            colour = (1 - ((hue - 3).abs() - 1).clamp(0, 1)) * 0.8 + 0.2  # an HSV-like rainbow, no black
            row[torch.as_tensor(window)] = colour * (0.25 + 0.75 * weights / weights.max()).unsqueeze(1)
            rows.append(row)
        rows.append(torch.full((num_frames, 3), 0.5))
    image = torch.stack(rows[:-1])  # (rows, frames, 3)
    return image.repeat_interleave(cell, dim=0).repeat_interleave(cell, dim=1)

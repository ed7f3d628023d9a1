"""Context windows and fuse weights (properties over every schedule and fuse method)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ads_helpers import raised_message

from animatediff_suite.motion_modules.context import (FUSE_METHODS, SCHEDULES, ContextOptions,
                                                      context_windows, fuse_windows, ordered_halving, window_costs,
                                                      window_report)


@st.composite
def cases(draw):
    length = draw(st.integers(1, 24))
    options = ContextOptions(
        context_length=length, context_overlap=draw(st.integers(0, length - 1)),
        context_stride=draw(st.integers(1, 4)), closed_loop=draw(st.booleans()),
        schedule=draw(st.sampled_from(sorted(SCHEDULES))), fuse_method=draw(st.sampled_from(sorted(FUSE_METHODS))))
    return options, draw(st.integers(1, 200)), draw(st.integers(0, 60))


@settings(max_examples=400, deadline=None)
@given(cases())
def test_every_frame_covered_indices_in_range_weights_positive(case):
    options, frames, step = case
    windows = context_windows(frames, options, step)
    assert set().union(*map(set, windows)) == set(range(frames))
    for window in windows:
        assert all(0 <= i < frames for i in window)
        assert len(set(window)) == len(window) <= options.context_length
        for method in FUSE_METHODS.values():
            weights = method(window, frames, options)
            assert len(weights) == len(window)
            assert all(math.isfinite(w) and w > 0 for w in weights)


@settings(max_examples=200, deadline=None)
@given(cases())
def test_short_clips_are_one_window(case):
    options, frames, step = case
    frames = min(frames, options.context_length)
    assert context_windows(frames, options, step) == [list(range(frames))]


@settings(max_examples=200, deadline=None)
@given(cases())
def test_stride_levels_are_powers_of_two_that_fit(case):
    options, frames, step = case
    windows = context_windows(frames, options, step)
    if frames <= options.context_length or options.schedule in ("standard_static", "batched"):
        assert all(all(b - a == 1 for a, b in zip(w, w[1:])) for w in windows)
        return
    seen = {(w[1] - w[0]) % frames for w in windows if len(w) > 1}
    allowed = {2 ** k for k in range(options.context_stride) if (options.context_length - 1) * 2 ** k + 1 <= frames}
    assert seen <= allowed and (1 in seen or options.context_length == 1)


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 24), st.integers(1, 23), st.integers(1, 200), st.integers(0, 60))
def test_closed_loop_windows_wrap_and_standard_ones_never_do(length, overlap, frames, step):
    """With overlap, a closed loop blends the last frames into the first like any other seam."""
    overlap = min(overlap, length - 1)
    if frames <= length or length - overlap >= frames:
        return
    looped = context_windows(frames, ContextOptions(length, overlap, closed_loop=True, schedule="looped_uniform"), step)
    assert any(w[i] == frames - 1 and w[i + 1] == 0 for w in looped for i in range(len(w) - 1))
    for schedule in ("standard_static", "standard_uniform", "batched"):
        for window in context_windows(frames, ContextOptions(length, overlap, schedule=schedule), step):
            assert window == sorted(window)


def test_standard_static_worked_example():
    windows = context_windows(40, ContextOptions(16, 4))
    assert windows == [list(range(0, 16)), list(range(12, 28)), list(range(24, 40))]
    assert context_windows(40, ContextOptions(16, 4, schedule="batched")) == [
        list(range(0, 16)), list(range(16, 32)), list(range(32, 40))]


def test_uniform_windows_move_between_steps():
    options = ContextOptions(16, 4, schedule="standard_uniform")
    assert context_windows(64, options, 0) != context_windows(64, options, 1)
    assert [ordered_halving(s) for s in range(4)] == [0.0, 0.5, 0.25, 0.75]


def test_standard_uniform_and_shifted_static_worked_by_hand():
    """32 frames, 16/4. standard_uniform, step 0: grid 0, 12, 24; [24..31, 0..7] wraps, moves to end
    ([16..31]) and frame 0 is in the next (cyclic: first) window. Step 1 (shift 16): grid 16, 28, 40 ->
    [16..31], [28..31, 0..11] (moves to [16..31], a repeat, dropped; [8..23] lacks frame 0, so [0..15]
    is inserted), [8..23]. shifted_static, step 1: offset int(0.5 * 12) = 6 -> starts 0, 6, 16."""
    r = lambda a, b: list(range(a, b + 1))  # noqa: E731
    uniform = ContextOptions(16, 4, schedule="standard_uniform")
    assert context_windows(32, uniform, 0) == [r(0, 15), r(12, 27), r(16, 31)]
    assert context_windows(32, uniform, 1) == [r(16, 31), r(0, 15), r(8, 23)]
    shifted = ContextOptions(16, 4, schedule="shifted_static")
    assert context_windows(32, shifted, 1) == [r(0, 15), r(6, 21), r(16, 31)]
    # a stride-2 level longer than the clip is left out: only contiguous windows remain
    assert all(b - a == 1 for w in context_windows(5, ContextOptions(4, 0, 2, schedule="standard_uniform"), 0)
               for a, b in zip(w, w[1:]))


def test_fuse_weights_match_their_formulas():
    opts = ContextOptions(8, 3)
    assert FUSE_METHODS["pyramid"](list(range(8)), 20, opts) == [1, 2, 3, 4, 4, 3, 2, 1]
    assert FUSE_METHODS["pyramid"](list(range(5)), 20, opts) == [1, 2, 3, 2, 1]
    assert FUSE_METHODS["overlap-linear"](list(range(5, 13)), 20, opts) == [0.25, 0.5, 0.75, 1, 1, 0.75, 0.5, 0.25]
    assert FUSE_METHODS["overlap-linear"](list(range(0, 8)), 20, opts)[:3] == [1, 1, 1]
    gaussian = FUSE_METHODS["gaussian"](list(range(8)), 20, opts)
    assert gaussian == pytest.approx([math.exp(-((i - 3.5) ** 2) / 8) for i in range(8)])


@pytest.mark.parametrize("method", sorted(FUSE_METHODS))
def test_one_window_is_bit_identical_and_fusion_is_a_weighted_mean(method):
    options = ContextOptions(16, 4, fuse_method=method)
    x = torch.randn(16, 4, 3, 3)
    assert fuse_windows([(list(range(16)), x)], 16, options) is x
    frames = torch.arange(40, dtype=torch.float64).view(40, 1, 1, 1).expand(40, 4, 2, 2)
    windows = context_windows(40, options)
    fused = fuse_windows([(w, frames[w]) for w in windows], 40, options)
    torch.testing.assert_close(fused, frames)  # every window agrees, so the mean is the value itself


def test_default_pyramid_fuses_distinct_windows_as_a_hand_computed_weighted_mean():
    """40 frames at the default 16/4: windows [0..15], [12..27], [24..39] output the constants 1, 10 and
    100. Pyramid weights of a 16-frame window are 1..8, 8..1, so frame 12 gets (4*1 + 1*10) / 5 = 2.8,
    frame 13 (3*1 + 2*10) / 5 = 4.6, ..., frame 27 (1*10 + 4*100) / 5 = 82 (worked out by hand)."""
    options = ContextOptions(16, 4)
    constants = {0: 1.0, 12: 10.0, 24: 100.0}
    windows = context_windows(40, options)
    assert [w[0] for w in windows] == [0, 12, 24]
    fused = fuse_windows([(w, torch.full((len(w), 1), constants[w[0]], dtype=torch.float64)) for w in windows],
                         40, options)
    expected = [1.0] * 12 + [2.8, 4.6, 6.4, 8.2] + [10.0] * 8 + [28.0, 46.0, 64.0, 82.0] + [100.0] * 12
    torch.testing.assert_close(fused[:, 0], torch.tensor(expected, dtype=torch.float64))
    assert FUSE_METHODS["pyramid"](list(range(16)), 40, options) == [1, 2, 3, 4, 5, 6, 7, 8, 8, 7, 6, 5, 4, 3, 2, 1]


def test_looped_uniform_windows_per_step_listed_by_hand():
    """20 frames, 8/2: the grid (advance 6) starts at round(20 * halving(step)) = 0, 10, 5, 15 for steps
    0-3 and wraps past frame 19; without closed_loop the last overlap's start is left out (3 windows),
    with it the seam gets its window (4)."""
    r = lambda a, b: list(range(a, b + 1))  # noqa: E731
    looped = ContextOptions(8, 2, schedule="looped_uniform")
    assert [context_windows(20, looped, step) for step in range(4)] == [
        [r(0, 7), r(6, 13), r(12, 19)],
        [r(10, 17), r(16, 19) + r(0, 3), r(2, 9)],
        [r(5, 12), r(11, 18), r(17, 19) + r(0, 4)],
        [r(15, 19) + r(0, 2), r(1, 8), r(7, 14)],
    ]
    closed = ContextOptions(8, 2, closed_loop=True, schedule="looped_uniform")
    assert context_windows(20, closed, 0) == [r(0, 7), r(6, 13), r(12, 19), r(18, 19) + r(0, 5)]


def test_standard_uniform_steps_2_and_3_worked_by_hand():
    """32 frames, 16/4 (continuing the worked example above). Step 2 (shift 8): grid 8, 20, 32 -> [8..23],
    [20..31, 0..3] (moved to end: [16..31]; frame 0 is in the next window), [0..15]. Step 3 (shift 24):
    grid 24, 36, 48 -> [24..31, 0..7] moves to [16..31] and, as [4..19] lacks frame 0, [0..15] follows;
    [4..19]; the grid's [16..31] repeats and is dropped."""
    r = lambda a, b: list(range(a, b + 1))  # noqa: E731
    uniform = ContextOptions(16, 4, schedule="standard_uniform")
    assert context_windows(32, uniform, 2) == [r(8, 23), r(16, 31), r(0, 15)]
    assert context_windows(32, uniform, 3) == [r(16, 31), r(0, 15), r(4, 19)]


def test_dilation_levels_stop_where_a_dilated_window_no_longer_fits():
    """A level of dilation d fits when its window spans (length - 1) d + 1 <= frames (worked by hand: length
    4 spans 7 frames at d = 2; length 2 spans 9 at d = 8). Uniform schedules count levels as
    AnimateDiff-Evolved does: min(stride, ceil(log2(frames / length)) + 1), e.g. 40 / 16 -> 3."""
    from animatediff_suite.motion_modules.context import _dilations, _uniform_levels

    assert _dilations(7, ContextOptions(4, 1, 2)) == [1, 2]
    assert _dilations(6, ContextOptions(4, 1, 2)) == [1]
    assert _dilations(8, ContextOptions(2, 0, 4)) == [1, 2, 4]
    assert _dilations(9, ContextOptions(2, 0, 4)) == [1, 2, 4, 8]
    assert _uniform_levels(40, ContextOptions(16, 4, 5)) == 3
    assert _uniform_levels(64, ContextOptions(16, 4, 5)) == 3  # log2(4) = 2 exactly
    assert _uniform_levels(65, ContextOptions(16, 4, 5)) == 4
    assert _uniform_levels(40, ContextOptions(16, 4, 2)) == 2


def test_uncovered_frames_are_an_error():
    with pytest.raises(ValueError, match=r"frames \[4, 5\] are covered by no window"):
        fuse_windows([([0, 1, 2, 3], torch.zeros(4, 1))], 6, ContextOptions(4, 1))


@pytest.mark.parametrize("kwargs,message", [
    ({"context_length": 16, "context_overlap": 16}, r"context_overlap must be in \[0, context_length\)"),
    ({"context_overlap": -1}, r"context_overlap must be in"),
    ({"context_length": 0, "context_overlap": 0}, "context_length must be at least 1"),
    ({"context_stride": 0}, "context_stride must be at least 1"),
    ({"schedule": "spiral"}, r"unknown context schedule 'spiral'; expected one of \['batched'"),
    ({"fuse_method": "max"}, r"unknown fuse method 'max'; expected one of \['delayed_reverse_sawtooth'"),
])
def test_invalid_options_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ContextOptions(**kwargs)


def test_schedule_image_draws_every_window_of_every_step():
    from animatediff_suite.motion_modules.context import schedule_image

    options = ContextOptions(16, 4, schedule="standard_uniform")
    image = schedule_image(40, options, steps=3, cell=2)
    rows = sum(len(context_windows(40, options, s)) for s in range(3)) + 2  # + separators
    assert image.shape == (rows * 2, 80, 3)
    assert float(image.min()) >= 0 and float(image.max()) <= 1
    first = context_windows(40, options, 0)[0]
    lit = (image[0].sum(-1) > 0).nonzero().flatten() // 2
    assert sorted(set(lit.tolist())) == first  # the first row lights exactly the first window's frames
    with pytest.raises(ValueError, match="steps must be at least 1"):
        schedule_image(40, options, steps=0)


def test_schedule_image_pixels_worked_by_hand():
    """One step of 40 frames at 16/4 with overlap-linear weights, default 6-pixel cells. Window k's colour
    is 1 - clamp(|h - 3| - 1, 0, 1), scaled into [0.2, 1], for h = (0.37 k mod 1) 6 + (0, 4, 2) mod 6:
    window 0 (0.2, 1, 1), window 1 (1, 0.2, 0.824), window 2 (0.648, 1, 0.2); brightness 0.25 + 0.75 w / max w
    with w the overlap ramps 0.2, 0.4, ... (frame 15 of window 0: w 0.2 -> 0.4)."""
    from animatediff_suite.motion_modules.context import schedule_image

    image = schedule_image(40, ContextOptions(16, 4, fuse_method="overlap-linear"), steps=1)
    assert image.shape == (3 * 6, 40 * 6, 3)

    def pixel(row, frame):
        return image[row * 6 + 3, frame * 6 + 3].tolist()

    assert pixel(0, 0) == pytest.approx([0.2, 1.0, 1.0])
    assert pixel(0, 15) == pytest.approx([0.08, 0.4, 0.4])
    assert pixel(0, 16) == [0.0, 0.0, 0.0]
    assert pixel(1, 12) == pytest.approx([0.4, 0.08, 0.3296])
    assert pixel(1, 20) == pytest.approx([1.0, 0.2, 0.824])
    assert pixel(2, 30) == pytest.approx([0.648, 1.0, 0.2])


def test_window_costs_name_the_end_aligned_window_that_adds_little():
    # 30 frames, 16/4, static: windows start at 0, 12 and 14 (aligned to the end); the last adds frames
    # 28 and 29 only, for a third of the step's 48 frames of UNet work
    costs = window_costs(30, ContextOptions(16, 4))
    assert [(w[0], new, share) for w, new, share in costs] == [(0, 16, 1 / 3), (12, 12, 1 / 3), (14, 2, 1 / 3)]
    report = window_report(30, ContextOptions(16, 4))
    assert report.splitlines() == ["step 0: 3 window(s), 48 frames through the UNet for 30 (1.60x)",
                                   "  window 2 (frames 14..29) adds 2 new frame(s) for 33% of the step's cost"]


def test_window_report_and_costs_of_later_steps_and_the_half_window_line_worked_by_hand():
    """32 frames, 16/4 standard_uniform (windows listed by hand above): step 0 [0..15], [12..27], [16..31] adds
    16, 12, 4 new frames; step 1 [16..31], [0..15], [8..23] adds 16, 16, 0. A window is reported when it adds
    fewer than half its frames: 22 frames at 16/4 static end on [6..21] (6 new: reported, 50%); 24 frames at
    16/8 end on [8..23] (8 new, exactly half: not reported)."""
    uniform = ContextOptions(16, 4, schedule="standard_uniform")
    assert [new for _, new, _ in window_costs(32, uniform, 1)] == [16, 16, 0]
    assert window_report(32, uniform, steps=2).splitlines() == [
        "step 0: 3 window(s), 48 frames through the UNet for 32 (1.50x)",
        "  window 2 (frames 16..31) adds 4 new frame(s) for 33% of the step's cost",
        "step 1: 3 window(s), 48 frames through the UNet for 32 (1.50x)",
        "  window 2 (frames 8..23) adds 0 new frame(s) for 33% of the step's cost"]
    assert window_report(22, ContextOptions(16, 4)).splitlines()[1] == (
        "  window 1 (frames 6..21) adds 6 new frame(s) for 50% of the step's cost")
    assert window_report(24, ContextOptions(16, 8)) == "step 0: 2 window(s), 32 frames through the UNet for 24 (1.33x)"


def test_more_fuse_weights_and_fusing_along_another_dim_by_hand():
    """gaussian over 12 frames: sigma = 12 / 4 = 3, so exp(-(i - 5.5)^2 / 18); overlap-linear: a window that ends
    on the last frame keeps full weight there (only its start ramps); fusing along dim 1 is fusing the
    transposed tensors along dim 0."""
    options = ContextOptions(8, 3)
    assert FUSE_METHODS["gaussian"](list(range(12)), 40, options) == pytest.approx(
        [math.exp(-((i - 5.5) ** 2) / 18) for i in range(12)])
    assert FUSE_METHODS["gaussian"](list(range(4)), 40, options) == pytest.approx(  # sigma 1
        [math.exp(-((i - 1.5) ** 2) / 2) for i in range(4)])
    assert FUSE_METHODS["overlap-linear"](list(range(12, 20)), 20, options) == [0.25, 0.5, 0.75, 1, 1, 1, 1, 1]
    windows = context_windows(40, options)
    parts = [(w, torch.randn(len(w), 3, dtype=torch.float64)) for w in windows]
    along_0 = fuse_windows(parts, 40, options)
    along_1 = fuse_windows([(w, x.T.contiguous()) for w, x in parts], 40, options, dim=1)
    torch.testing.assert_close(along_1, along_0.T, rtol=0, atol=1e-12)


def test_window_groups_take_one_window_per_call_and_refuse_zero():
    from animatediff_suite.motion_modules.context import window_groups

    plan = [([0, 1], [1.0, 1.0]), ([1, 2], [1.0, 1.0])]
    assert [len(group) for group in window_groups(plan, 1)] == [1, 1]
    with pytest.raises(ValueError) as error:
        window_groups(plan, 0)
    assert str(error.value) == "per_call must be at least 1, got 0"


def test_window_costs_are_of_step_zero_unless_told():
    options = ContextOptions(context_length=4, context_overlap=1, schedule="standard_uniform")
    assert window_costs(12, options) == window_costs(12, options, 0) != window_costs(12, options, 1)


def test_standard_uniform_with_a_dilated_window_that_just_fits_worked_by_hand():
    """7 frames, length 4, overlap 1, stride 2: the dilation-2 window spans (4 - 1) x 2 + 1 = 7 frames, exactly
    the clip, so its level is kept. Step 0 (shift 0): starts 0 and 3 (advance 3) of the contiguous level,
    start 0 (advance 7) of the dilated one. Step 1 (shift 1/2, round(3.5) = 4): the contiguous level starts at
    4 and 7 -> [4, 5, 6, 0] (wraps; moved to end on frame 6: [3..6]) and [0..3]; the dilated level starts at
    int(0.5 x 2) + 4 = 5 -> [5, 0, 2, 4] (wraps; moved to [0, 2, 4, 6]); its wrapped frame 0 is missing from
    the next window ([3..6]), so [0..3] is added after it and dropped as a repeat."""
    options = ContextOptions(context_length=4, context_overlap=1, context_stride=2, schedule="standard_uniform")
    assert context_windows(7, options, 0) == [[0, 1, 2, 3], [3, 4, 5, 6], [0, 2, 4, 6]]
    assert context_windows(7, options, 1) == [[3, 4, 5, 6], [0, 1, 2, 3], [0, 2, 4, 6]]


def test_shifted_static_dilated_level_worked_by_hand():
    """12 frames, length 4, overlap 2, stride 2, step 1 (halving 1/2). Contiguous level: advance 2, offset 1,
    span 4: starts 0, 1, 3, 5, 7 and the end-aligned 8. Dilation 2: advance (4 - 2) x 2 = 4, offset 2,
    span 7: starts 0, 2 and the end-aligned 5, windows stepping by 2."""
    options = ContextOptions(context_length=4, context_overlap=2, context_stride=2, schedule="shifted_static")
    contiguous = [list(range(s, s + 4)) for s in (0, 1, 3, 5, 7, 8)]
    dilated = [list(range(s, s + 7, 2)) for s in (0, 2, 5)]
    assert context_windows(12, options, 1) == contiguous + dilated


def test_standard_uniform_dilated_level_ends_before_the_overlap_and_the_wrap_looks_at_the_next_window():
    """6 frames, length 3, stride 2 (worked by hand).

    Overlap 1, step 0 (shift 0): the contiguous level (advance 3 - 1 = 2) starts at 0, 2, 4 below
    6 - 1 = 5: [0, 1, 2], [2, 3, 4], [4, 5, 0] (wraps; moved to end on frame 5: [3, 4, 5]); the dilated level
    (advance 3 x 2 - 1 = 5) starts at 0 only, as 5 is not below 5: [0, 2, 4].

    Overlap 0, step 2 (shift 1/4, round(6 / 4) = 2): contiguous starts 2 and 5 (advance 3, below 8): [2, 3, 4],
    [5, 0, 1] (moved to [3, 4, 5]; the next window, [2, 4, 0], holds the wrapped frame 0, so nothing is added);
    dilated start int(2 / 4) + 2 = 2: [2, 4, 0] (moved to [1, 3, 5]; the next window, the first, lacks frame 0,
    so [0, 1, 2] follows it)."""
    overlapping = ContextOptions(context_length=3, context_overlap=1, context_stride=2, schedule="standard_uniform")
    assert context_windows(6, overlapping, 0) == [[0, 1, 2], [2, 3, 4], [3, 4, 5], [0, 2, 4]]
    apart = ContextOptions(context_length=3, context_overlap=0, context_stride=2, schedule="standard_uniform")
    assert context_windows(6, apart, 2) == [[2, 3, 4], [3, 4, 5], [1, 3, 5], [0, 1, 2]]


def test_windows_and_their_weights_are_of_step_zero_unless_told():
    from animatediff_suite.motion_modules.context import weighted_windows

    options = ContextOptions(context_length=4, context_overlap=1, schedule="standard_uniform")
    assert context_windows(12, options) == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9], [8, 9, 10, 11]]
    pyramid = [1, 2, 2, 1]
    assert weighted_windows(12, options) == [(w, pyramid) for w in context_windows(12, options, 0)]


def test_window_options_and_frame_counts_refused_with_their_sentence():
    assert raised_message(lambda: ContextOptions(window_batch=-1), ValueError) == (
        "window_batch must be 0 (auto) or more, got -1")
    assert ContextOptions(window_batch=0).window_batch == 0  # 0 is auto
    assert raised_message(lambda: context_windows(0, ContextOptions()), ValueError) == (
        "num_frames must be at least 1, got 0")


def test_a_frame_only_zero_weights_cover_is_uncovered_and_one_positive_weight_covers_it():
    """Coverage is the sum of a frame's fuse weights (kept in Python, so the check reads nothing from a GPU):
    frame 1 has 1.0 then 0.0 (covered), frame 3 only 0.0 (not)."""
    from animatediff_suite.motion_modules.context import WindowAccumulator

    accumulator = WindowAccumulator(4, ContextOptions(2, 1))
    for window, weights in (([0, 1], [1.0, 1.0]), ([1, 2], [0.0, 1.0]), ([2, 3], [1.0, 0.0])):
        accumulator.add(window, torch.ones(2, 1), weights)
    assert raised_message(accumulator.result, ValueError) == "frames [3] are covered by no window"
    accumulator.add([3], torch.full((1, 1), 5.0), [0.5])
    assert accumulator.result().flatten().tolist() == [1.0, 1.0, 1.0, 5.0]


def test_fusing_nothing_and_the_first_eight_uncovered_frames_are_named():
    from animatediff_suite.motion_modules.context import WindowAccumulator

    assert raised_message(lambda: WindowAccumulator(4, ContextOptions(4, 1)).result(), ValueError) == (
        "no window outputs to fuse")
    assert raised_message(lambda: fuse_windows([([0, 1], torch.zeros(2, 1))], 12, ContextOptions(2, 1)),
                          ValueError) == "frames [2, 3, 4, 5, 6, 7, 8, 9] are covered by no window"


def test_a_whole_clip_window_then_another_is_fused_along_dim_zero_by_default():
    """Frames 0..3: a whole-clip window of 1s with weights 1, then [2, 3] of 4s with weights 3, 1 (by hand:
    frames 0, 1 stay 1; frame 2 (1 + 3 x 4) / 4 = 3.25; frame 3 (1 + 4) / 2 = 2.5)."""
    assert torch.equal(_whole_then_pair().result(), WHOLE_THEN_PAIR)


WHOLE_THEN_PAIR = torch.tensor([1.0, 1.0, 3.25, 2.5]).view(4, 1).expand(4, 3)


def _whole_then_pair(device=None):
    """An accumulator over frames 0..3 given a whole-clip window of 1s (weights 1), then [2, 3] of 4s (3, 1),
    the outputs made on ``device``."""
    from animatediff_suite.motion_modules.context import WindowAccumulator

    accumulator = WindowAccumulator(4, ContextOptions(2, 1))
    accumulator.add(range(4), torch.ones(4, 3, device=device), [1.0, 1.0, 1.0, 1.0])
    accumulator.add([2, 3], torch.full((2, 3), 4.0, device=device), [3.0, 1.0])
    return accumulator


def test_half_precision_windows_are_summed_in_float32_and_returned_in_their_dtype():
    """Two fp16 windows over 3 frames, frame 1 weighted 3 and 1: (3 x 2046 + 2) / 4 = 1535 exactly (by hand).
    Summed in fp16 it would be 1534: 3 x 2046 = 6138 is not an fp16 number (they step by 4 there) and rounds
    to 6136, and 6136 + 2 rounds back to 6136."""
    from animatediff_suite.motion_modules.context import WindowAccumulator

    accumulator = WindowAccumulator(3, ContextOptions(2, 1))
    accumulator.add([0, 1], torch.tensor([[4.0], [2046.0]], dtype=torch.float16), [1.0, 3.0])
    accumulator.add([1, 2], torch.tensor([[2.0], [6.0]], dtype=torch.float16), [1.0, 1.0])
    fused = accumulator.result()
    assert fused.dtype == torch.float16
    assert fused[:, 0].tolist() == [4.0, 1535.0, 6.0]


def test_fusion_stays_on_the_outputs_device_whatever_the_default_device():
    """Under another default device (meta here) the sums, counts, indices and weights stay on the outputs'
    device: the result is the hand-computed one of test_a_whole_clip_window_then_another_..."""
    from animatediff_suite.motion_modules.context import weighted_windows

    options = ContextOptions(context_length=4, context_overlap=1, schedule="standard_uniform")
    with torch.device("meta"):
        accumulator = _whole_then_pair("cpu")
        accumulator.add([0], torch.ones(1, 3, device="cpu"))  # the options' fuse weights
        fused = accumulator.result()
    assert fused.device.type == "cpu"
    assert torch.equal(fused, WHOLE_THEN_PAIR)
    assert weighted_windows(12, options, 1) == [(w, [1, 2, 2, 1]) for w in context_windows(12, options, 1)]
    assert context_windows(12, options, 1) != context_windows(12, options, 0)

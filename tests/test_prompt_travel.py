"""Prompt travel: parsing (errors name the line), per-frame blending, interpolation formulas."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from animatediff_suite.motion_modules.prompt_travel import frame_blend, parse_keyframes, slerp, travel


def test_parse_keyframes_sorted_with_comments_and_blanks():
    text = "# a comment\n24: a cat jumping\n\n 0 :  a cat sitting \n"
    assert parse_keyframes(text) == [(0, "a cat sitting"), (24, "a cat jumping")]


@pytest.mark.parametrize("text,message", [
    ("0: a cat\ncat jumping", r"line 2: 'cat jumping' is not 'FRAME: prompt'"),
    ("0: a\n-4: b", r"line 2: '-4: b' is not 'FRAME: prompt'"),
    ("3: a\n3: b", "line 2: frame 3 already has a prompt"),
    ("\n# only comments\n", "no keyframes"),
])
def test_malformed_lines_are_errors_naming_the_line(text, message):
    with pytest.raises(ValueError, match=message):
        parse_keyframes(text)


def test_frame_blend_holds_before_first_and_after_last():
    blends = frame_blend([4, 8], 12)
    assert blends[:5] == [(0, 0, 0.0)] * 5
    assert blends[6] == (0, 1, 0.5)
    assert blends[8:] == [(1, 1, 0.0)] * 4


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 100), min_size=1, max_size=6, unique=True), st.integers(1, 120))
def test_every_frame_blends_its_neighbouring_keyframes(frames, num_frames):
    frames = sorted(frames)
    for frame, (a, b, t) in enumerate(frame_blend(frames, num_frames)):
        assert 0 <= t < 1 and 0 <= a <= b < len(frames)
        value = frames[a] + (frames[b] - frames[a]) * t
        assert value == pytest.approx(min(max(frame, frames[0]), frames[-1]))


def test_travel_linear_and_slerp():
    a, b = torch.randn(1, 77, 32), torch.randn(1, 77, 32)
    out = travel([a, b], [0, 10], 12, "linear")
    assert out.shape == (12, 77, 32)
    assert torch.equal(out[0], a[0]) and torch.equal(out[10], b[0]) and torch.equal(out[11], b[0])
    torch.testing.assert_close(out[5], (a[0] + b[0]) / 2)
    s = travel([a, b], [0, 10], 12, "slerp")[5]
    omega = torch.acos((a / a.norm(dim=-1, keepdim=True) * b / b.norm(dim=-1, keepdim=True)).sum(-1, keepdim=True))
    expected = (torch.sin(0.5 * omega) * a + torch.sin(0.5 * omega) * b) / torch.sin(omega)
    torch.testing.assert_close(s, expected[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("frame, t", [(1, 0.1), (3, 0.3), (8, 0.8)])
def test_travel_at_asymmetric_t_follows_the_lerp_and_slerp_formulas(frame, t):
    """Keyframes at 0 and 10: frame k is t = k / 10 of the way. At t != 0.5 lerp and slerp are not
    symmetric, so swapped weights (1 - t for t) or a swapped a/b fail here. Formulas written out:
    lerp = (1 - t) a + t b; slerp = (sin((1 - t) w) a + sin(t w) b) / sin w, w the angle per token."""
    torch.manual_seed(frame)
    a, b = torch.randn(1, 77, 32, dtype=torch.float64), torch.randn(1, 77, 32, dtype=torch.float64)
    linear = travel([a, b], [0, 10], 12, "linear")[frame]
    torch.testing.assert_close(linear, ((1 - t) * a + t * b)[0])
    cos = (a * b).sum(-1, keepdim=True) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1, keepdim=True))
    omega = torch.acos(cos)
    expected = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    torch.testing.assert_close(travel([a, b], [0, 10], 12, "slerp")[frame], expected[0])


def test_slerp_of_parallel_vectors_is_lerp():
    a = torch.ones(1, 4, 8)
    torch.testing.assert_close(slerp(a, 3 * a, 0.5), 2 * a)
    assert math.isfinite(float(slerp(torch.zeros(1, 2, 8), a[:, :2], 0.3).sum()))


def test_mismatched_prompt_lengths_and_unknown_interpolation_are_errors():
    with pytest.raises(ValueError, match="encode to different shapes"):
        travel([torch.zeros(1, 77, 8), torch.zeros(1, 154, 8)], [0, 4], 6)
    with pytest.raises(ValueError, match="unknown interpolation 'cubic'"):
        travel([torch.zeros(1, 77, 8)], [0], 6, "cubic")


def test_parallel_and_opposite_vectors_whose_rounded_cosine_passes_one_stay_finite():
    """For a and s*a (and -s*a) the normalised dot product rounds past +-1 in float64 for some vectors
    (seen below); slerp clamps it, finds sin(omega) ~ 0 and returns the lerp formula a + t (b - a)."""
    gen = torch.Generator().manual_seed(0)
    past_one = 0
    for _ in range(64):
        a = torch.randn(1, 1, 8, generator=gen, dtype=torch.float64)
        scale = float(torch.rand(1, generator=gen)) * 5 + 0.1
        for b in (scale * a, -scale * a):
            cos = float(((a / a.norm()) * (b / b.norm())).sum())
            past_one += abs(cos) > 1
            torch.testing.assert_close(slerp(a, b, 0.3), a + 0.3 * (b - a), rtol=0, atol=1e-12)
    assert past_one >= 2


def test_comment_lines_may_be_indented_and_errors_are_whole_sentences():
    assert parse_keyframes("  # a note\n0: a cat\n\t# another\n8: a dog") == [(0, "a cat"), (8, "a dog")]
    with pytest.raises(ValueError) as error:
        parse_keyframes("0: a cat\nten: a dog")
    assert str(error.value) == "prompt travel line 2: 'ten: a dog' is not 'FRAME: prompt' (e.g. '0: a cat sitting')"
    with pytest.raises(ValueError) as error:
        parse_keyframes("# only a comment")
    assert str(error.value) == "prompt travel: no keyframes; write lines like '0: a cat sitting'"
    with pytest.raises(ValueError) as error:
        travel([torch.zeros(1, 77, 8), torch.zeros(1, 154, 8)], [0, 4], 6)
    assert str(error.value) == ("keyframe prompts encode to different shapes [(1, 77, 8), (1, 154, 8)]; keep every "
                                "prompt within the same number of 75-token chunks")


def test_frames_up_to_the_first_and_from_the_last_keyframe_are_those_keyframes_bit_for_bit():
    gen = torch.Generator().manual_seed(2)
    first, last = torch.randn(1, 4, 8, generator=gen), torch.randn(1, 4, 8, generator=gen)
    for interpolation in ("linear", "slerp"):
        frames = travel([first, last], [2, 8], 10, interpolation)
        assert all(torch.equal(frames[i], first[0]) for i in range(3))
        assert all(torch.equal(frames[i], last[0]) for i in (8, 9))


def test_an_inner_keyframe_frame_is_that_keyframe():
    gen = torch.Generator().manual_seed(3)
    keys = [torch.randn(1, 4, 8, generator=gen) for _ in range(3)]
    for interpolation in ("linear", "slerp"):
        frames = travel(keys, [0, 4, 8], 9, interpolation)
        torch.testing.assert_close(frames[4], keys[1][0], rtol=0, atol=1e-6)

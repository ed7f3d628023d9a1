"""FreeNoise (noise schedules, windowed motion attention) and FreeInit (filters, mixing, steps).

Each is checked against its formula and, where diffusers implements the same thing, against
diffusers 0.42 called directly.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from animatediff_suite.motion_modules import ContextOptions, FreeInitOptions, free_noise, weighted_windows
from animatediff_suite.motion_modules.context import FUSE_METHODS
from animatediff_suite.motion_modules.freeinit import (FILTERS, fewer_sigmas, frames_first_mix, frequency_mix,
                                                       low_pass_filter, pass_steps)
from animatediff_suite.motion_modules.temporal import VanillaTemporalModule
from comfy_env import import_or_skip


# ---------------------------------------------------------------------------------------- FreeNoise


def test_default_returns_the_noise_and_repeated_context_repeats_the_first_window():
    noise = torch.randn(37, 4, 3, 3)
    assert free_noise(noise, "default", 16, 12) is noise
    repeated = free_noise(noise, "repeated_context", 16, 12)
    for frame in range(37):
        assert torch.equal(repeated[frame], noise[frame % 16])


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 12), st.data(), st.integers(1, 60), st.integers(0, 2 ** 31))
def test_shuffle_context_copies_frames_from_one_window_back(length, data, frames, seed):
    stride = data.draw(st.integers(1, length))  # the window advance, length - overlap
    noise = torch.arange(frames, dtype=torch.float64).view(frames, 1, 1).expand(frames, 2, 2).clone()
    before = noise.clone()
    out = free_noise(noise, "shuffle_context", length, stride, torch.Generator().manual_seed(seed))
    assert torch.equal(noise, before)  # input untouched
    assert torch.equal(out[:length], noise[:length])
    source_frame = out[:, 0, 0].long()
    for start in range(length, frames, stride):
        block = source_frame[start:start + stride].tolist()
        # each block is distinct frames of the previous window's first `stride` positions (as shuffled so far)
        allowed = set(source_frame[start - length:start - length + stride].tolist())
        assert len(set(block)) == len(block) and set(block) <= allowed


def diffusers_free_noise(noise_type, length, stride, frames, seed, channels=4, size=3):
    free_noise_utils = import_or_skip("diffusers.pipelines.free_noise_utils")
    pipe = SimpleNamespace(_free_noise_context_length=length, _free_noise_context_stride=stride,
                           _free_noise_noise_type=noise_type, vae_scale_factor=8)
    latents = free_noise_utils.AnimateDiffFreeNoiseMixin._prepare_latents_free_noise(
        pipe, 1, channels, frames, size * 8, size * 8, torch.float32, torch.device("cpu"),
        torch.Generator().manual_seed(seed))
    return latents[0].transpose(0, 1)  # frames first


@pytest.mark.parametrize("frames,length,stride", [(16, 16, 4), (40, 16, 4), (37, 16, 12), (50, 8, 3),
                                                 (7, 2, 4)])  # stride > length: the last draw is shorter
def test_shuffle_context_and_random_match_diffusers(frames, length, stride):
    expected = diffusers_free_noise("shuffle_context", length, stride, frames, seed=5)
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(1, 4, frames, 3, 3, generator=gen)[0].transpose(0, 1)
    torch.testing.assert_close(free_noise(base, "shuffle_context", length, stride, gen), expected, rtol=0, atol=0)
    expected = diffusers_free_noise("random", length, stride, frames, seed=9)
    got = free_noise(torch.zeros(frames, 4, 3, 3), "random", length, stride, torch.Generator().manual_seed(9))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_bad_noise_settings_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown FreeNoise noise type 'pink'; expected one of \['default'"):
        free_noise(torch.zeros(4, 4, 2, 2), "pink", 16, 4)
    with pytest.raises(ValueError, match="unknown noise type 'pink'"):
        ContextOptions(noise_type="pink")
    with pytest.raises(ValueError, match="unknown window scope 'unet'"):
        ContextOptions(scope="unet")


def tiny_module(seed=0, dtype=torch.float64, max_len=32, norm_mode="across_frames"):
    module = VanillaTemporalModule(64, 8, max_len, norm_mode, zero_init=False).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / max(p.shape[-1], 1) ** 0.5)
    return module


@pytest.mark.parametrize("method", sorted(FUSE_METHODS))
def test_windowed_attention_with_frames_equal_to_length_is_plain_attention(method):
    module = tiny_module()
    x = torch.randn(2 * 16, 64, 3, 3, dtype=torch.float64)
    options = ContextOptions(16, 4, fuse_method=method, scope="motion_attention")
    with torch.no_grad():
        plain = module(x, 16)
        windowed = module(x, 16, windows=weighted_windows(16, options))
    assert torch.equal(plain, windowed)


def test_windowed_attention_sees_only_its_window():
    module = tiny_module(norm_mode="per_frame")  # across-frame GroupNorm statistics would mix all frames
    x = torch.randn(40, 64, 2, 2, dtype=torch.float64)
    options = ContextOptions(8, 4, scope="motion_attention")
    windows = weighted_windows(40, options)
    with torch.no_grad():
        out = module(x, 40, windows=windows)
        changed = x.clone()
        changed[39] += 1  # the last frame is in the last two windows only ([28..35] does not see it)
        out_changed = module(changed, 40, windows=windows)
    unaffected = [f for f in range(40) if not any(39 in w and f in w for w, _ in windows)]
    assert unaffected and torch.equal(out[unaffected], out_changed[unaffected])
    assert not torch.equal(out[36], out_changed[36])
    with pytest.raises(ValueError, match="at most 32 frames"):
        module(x, 40)  # unwindowed, 40 frames are past the PE


@pytest.mark.parametrize("scheme", ["flat", "pyramid", "delayed_reverse_sawtooth"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_windowed_attention_matches_diffusers_freenoise_blocks(scheme, dtype):
    import_or_skip("diffusers")
    from diffusers.pipelines.free_noise_utils import AnimateDiffFreeNoiseMixin
    from test_parity_diffusers import TOLERANCE, build_unet, from_diffusers, motion_state_dict

    from animatediff_suite.motion_modules import load_motion_model

    unet = build_unet("sd15_v2", dtype)
    ours = load_motion_model(from_diffusers(motion_state_dict(unet))).set_norm_mode("across_frames")
    length, stride, frames = 8, 4, 20  # (frames - length) % stride == 0: diffusers' last window is whole
    pipe = SimpleNamespace(_free_noise_context_length=length, _free_noise_context_stride=stride,
                           _free_noise_weighting_scheme=scheme, device=torch.device("cpu"), dtype=dtype)
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        AnimateDiffFreeNoiseMixin._enable_free_noise_in_block(pipe, block)
    windows = weighted_windows(frames, ContextOptions(length, length - stride, fuse_method=scheme))
    # diffusers counts weights in float32 whatever the dtype: 0.01 weights cost fp64 ~3e-7
    atol = 1e-6 if scheme == "delayed_reverse_sawtooth" and dtype == torch.float64 else TOLERANCE[dtype]
    gen = torch.Generator().manual_seed(3)
    for prefix, module in ours.named_temporal_modules():
        channels = module.temporal_transformer.proj_in.in_features
        x = torch.randn(2 * frames, channels, 3, 3, generator=gen, dtype=torch.float64).to(dtype)
        with torch.no_grad():
            expected = unet.get_submodule(prefix)(x, num_frames=frames)
            got = module(x, frames, windows=windows)
        torch.testing.assert_close(got, expected, atol=atol, rtol=0, msg=prefix)


def test_delayed_reverse_sawtooth_weights():
    opts = ContextOptions(8, 3)
    assert FUSE_METHODS["delayed_reverse_sawtooth"](list(range(4)), 20, opts) == [0.01, 2, 2, 1]
    assert FUSE_METHODS["delayed_reverse_sawtooth"](list(range(5)), 20, opts) == [0.01, 0.01, 3, 2, 1]


# ----------------------------------------------------------------------------------------- FreeInit


def formula_filter(method, frames, height, width, ds, dt, order=4):
    """The module docstring's formulas, evaluated point by point."""
    mask = torch.zeros(frames, height, width, dtype=torch.float64)
    for t in range(frames):
        for h in range(height):
            for w in range(width):
                d2 = ((ds / dt) * (2 * t / frames - 1)) ** 2 + (2 * h / height - 1) ** 2 + (2 * w / width - 1) ** 2
                if method == "butterworth":
                    mask[t, h, w] = 1 / (1 + (d2 / ds ** 2) ** order)
                elif method == "gaussian":
                    mask[t, h, w] = math.exp(-d2 / (2 * ds ** 2))
                elif method == "ideal":
                    mask[t, h, w] = 1.0 if d2 <= ds * 2 else 0.0
                else:
                    ht, hh, hw = round(frames // 2 * dt), round(height // 2 * ds), round(width // 2 * ds)
                    inside = (frames // 2 - ht <= t < frames // 2 + ht and height // 2 - hh <= h < height // 2 + hh
                              and width // 2 - hw <= w < width // 2 + hw)
                    mask[t, h, w] = float(inside)
    return mask.float()


@pytest.mark.parametrize("method", FILTERS)
@pytest.mark.parametrize("shape,ds,dt,order", [((16, 8, 8), 0.25, 0.25, 4), ((7, 6, 10), 0.4, 0.1, 2),
                                               ((24, 9, 5), 0.9, 0.6, 1), ((1, 4, 4), 0.25, 0.25, 4),
                                               ((7, 7, 7), 1.0, 1.0, 3)])  # odd sizes: the box's half is 3, not 4
def test_filters_equal_their_formulas(method, shape, ds, dt, order):
    got = low_pass_filter(*shape, method, ds, dt, order)
    torch.testing.assert_close(got, formula_filter(method, *shape, ds, dt, order), atol=1e-7, rtol=0)
    assert float(got.min()) >= 0 and float(got.max()) <= 1
    assert not low_pass_filter(*shape, method, 0.0, dt, order).any()


def test_default_order_and_the_options_order():
    """Butterworth's order is 4 unless given; FreeInit's mix uses the options' order."""
    torch.testing.assert_close(low_pass_filter(8, 6, 6, "butterworth", 0.3, 0.2),
                               formula_filter("butterworth", 8, 6, 6, 0.3, 0.2, 4), atol=1e-7, rtol=0)
    gen = torch.Generator().manual_seed(3)
    low, high = torch.randn(8, 2, 6, 6, generator=gen), torch.randn(8, 2, 6, 6, generator=gen)
    mask = formula_filter("butterworth", 8, 6, 6, 0.3, 0.2, 2)
    options = FreeInitOptions(method="butterworth", spatial_stop=0.3, temporal_stop=0.2, order=2)
    torch.testing.assert_close(frames_first_mix(low, high, options),
                               frequency_mix(low.transpose(0, 1), high.transpose(0, 1), mask).transpose(0, 1),
                               atol=1e-6, rtol=0)


def test_noise_and_mixing_stay_on_the_inputs_device_and_dtype():
    """``meta`` stands in for a GPU: every tensor made on the way follows the input's device, and random
    FreeNoise comes back in the noise's dtype (drawn in float32 on the CPU like ComfyUI's noise)."""
    sigmas = torch.linspace(10, 0, 11, device="meta")
    assert fewer_sigmas(sigmas, 4).device.type == "meta"
    latents = torch.zeros(4, 6, 8, 8, device="meta")
    assert frequency_mix(latents, latents, low_pass_filter(6, 8, 8, "gaussian", 0.25, 0.25)).device.type == "meta"
    noise = torch.zeros(8, 4, 2, 2, device="meta")
    for noise_type in ("random", "repeated_context", "shuffle_context"):
        assert free_noise(noise, noise_type, 4, 2, torch.Generator().manual_seed(0)).device.type == "meta"
    half = free_noise(torch.zeros(8, 4, 2, 2, dtype=torch.float16), "random", 4, 2, torch.Generator().manual_seed(0))
    drawn = torch.randn(1, 4, 8, 2, 2, generator=torch.Generator().manual_seed(0))[0].transpose(0, 1)
    assert half.dtype == torch.float16 and torch.equal(half, drawn.half())


def test_indices_are_made_on_the_inputs_device_not_the_default_one():
    """CPU inputs under another default device (meta): the index tensors follow the inputs. By hand: 4 of
    10 steps pick sigmas round(k x 10 / 4) = 0, 2, 5, 8, 10 (halves round to even); repeated context of
    length 4 over 8 frames repeats frames 0-3."""
    sigmas = torch.linspace(10, 0, 11)
    noise = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 2, 2, 2)
    with torch.device("meta"):
        short = fewer_sigmas(sigmas, 4)
        repeated = free_noise(noise, "repeated_context", 4, 2)
    assert torch.equal(short, torch.tensor([10.0, 8.0, 5.0, 2.0, 0.0]))
    assert torch.equal(repeated[:, 0, 0, 0], torch.tensor([0.0, 1.0, 2.0, 3.0, 0.0, 1.0, 2.0, 3.0]))


@pytest.mark.parametrize("method", ["butterworth", "gaussian", "ideal"])
def test_filters_and_mixing_match_diffusers(method):
    free_init_utils = import_or_skip("diffusers.pipelines.free_init_utils")
    mixin = free_init_utils.FreeInitMixin
    shape = (1, 4, 12, 6, 8)
    expected = mixin._get_free_init_freq_filter(None, shape, "cpu", method, 4, 0.3, 0.2)
    got = low_pass_filter(12, 6, 8, method, 0.3, 0.2, 4)
    torch.testing.assert_close(got, expected[0, 0], atol=1e-6, rtol=0)
    gen = torch.Generator().manual_seed(1)
    x, noise = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    torch.testing.assert_close(frequency_mix(x, noise, got), mixin._apply_freq_filter(None, x, noise, expected),
                               atol=1e-5, rtol=0)
    frames_first = frames_first_mix(x[0].transpose(0, 1), noise[0].transpose(0, 1),
                                    FreeInitOptions(method=method, spatial_stop=0.3, temporal_stop=0.2))
    torch.testing.assert_close(frames_first.transpose(0, 1), mixin._apply_freq_filter(None, x, noise, expected)[0],
                               atol=1e-5, rtol=0)


def test_mixing_extremes():
    gen = torch.Generator().manual_seed(2)
    low, high = torch.randn(8, 4, 6, 6, generator=gen), torch.randn(8, 4, 6, 6, generator=gen)
    all_pass = torch.ones(8, 6, 6)
    torch.testing.assert_close(frequency_mix(low.transpose(0, 1), high.transpose(0, 1), all_pass).transpose(0, 1),
                               low, atol=1e-5, rtol=0)
    none = frames_first_mix(low, high, FreeInitOptions(spatial_stop=0.0))
    torch.testing.assert_close(none, high, atol=1e-5, rtol=0)


def test_coarse_to_fine_steps_and_schedules():
    assert [pass_steps(20, FreeInitOptions(3, fast_sampling=True), k) for k in range(3)] == [6, 13, 20]
    assert [pass_steps(20, FreeInitOptions(3), k) for k in range(3)] == [20, 20, 20]
    assert pass_steps(2, FreeInitOptions(5, fast_sampling=True), 0) == 1
    sigmas = torch.linspace(14.6, 0.0, 21)
    short = fewer_sigmas(sigmas, 5)
    assert short.shape == (6,) and short[0] == sigmas[0] and short[-1] == sigmas[-1]
    assert bool((short[1:] < short[:-1]).all())
    assert fewer_sigmas(sigmas, 20) is sigmas


@pytest.mark.parametrize("kwargs,message", [
    ({"iterations": 0}, "iterations must be at least 1"),
    ({"method": "bessel"}, r"unknown FreeInit filter 'bessel'; expected one of \['butterworth'"),
    ({"spatial_stop": 1.5}, r"spatial_stop must be in \[0, 1\], got 1.5"),
    ({"temporal_stop": -0.1}, r"temporal_stop must be in \[0, 1\]"),
    ({"order": 0}, "order must be at least 1"),
])
def test_bad_freeinit_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FreeInitOptions(**kwargs)


def test_fresh_noise_seeds_worked_by_hand():
    """seed + 0x9E3779B1 (2654435761) per pass, modulo 2^63; no seed counts as 0."""
    from animatediff_suite.motion_modules.freeinit import fresh_noise_seed

    assert fresh_noise_seed(5, 1) == 2654435766
    assert fresh_noise_seed(None, 2) == 5308871522
    assert fresh_noise_seed(2 ** 63 - 1, 1) == 2654435760


def test_option_edges_and_whole_error_sentences():
    """The smallest valid values (1 pass, order 1, stops 0 and 1) are accepted; each refusal's words; FreeNoise
    takes any noise of 2 or more dimensions."""
    from animatediff_suite.motion_modules.errors import describe_keys
    from animatediff_suite.motion_modules.freeinit import low_pass_filter

    assert FreeInitOptions(iterations=1, order=1, spatial_stop=1.0, temporal_stop=0.0).iterations == 1
    for kwargs, message in [({"iterations": 0}, "FreeInit iterations must be at least 1, got 0"),
                            ({"spatial_stop": 1.5}, "FreeInit spatial_stop must be in [0, 1], got 1.5")]:
        with pytest.raises(ValueError) as error:
            FreeInitOptions(**kwargs)
        assert str(error.value) == message
    with pytest.raises(ValueError) as error:
        low_pass_filter(4, 6, 6, "disc", 0.25, 0.25)
    assert str(error.value) == "unknown FreeInit filter 'disc'; expected one of ['butterworth', 'gaussian', 'ideal', 'box']"
    assert torch.equal(low_pass_filter(4, 6, 6, "gaussian", 0.25, 0.0), torch.zeros(4, 6, 6))
    with pytest.raises(ValueError) as error:
        frames_first_mix(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 9), FreeInitOptions())
    assert str(error.value) == ("FreeInit mixes two (frames, channels, height, width) latents of one shape, "
                                "got (2, 4, 8, 8) and (2, 4, 8, 9)")
    with pytest.raises(ValueError) as error:
        free_noise(torch.zeros(8, 4), "repeated_context", 0, 4)
    assert str(error.value) == "context_length and context_stride must be at least 1, got 0 and 4"
    with pytest.raises(ValueError) as error:
        free_noise(torch.zeros(8, 4), "repeated_context", 4, 0)
    assert str(error.value) == "context_length and context_stride must be at least 1, got 4 and 0"
    with pytest.raises(ValueError) as error:
        free_noise(torch.zeros(8), "repeated_context", 4, 2)
    assert str(error.value) == "noise must be (frames, channels, ...), got shape (8,)"
    flat = torch.arange(24.0).reshape(8, 3)
    assert torch.equal(free_noise(flat, "repeated_context", 4, 2), flat[torch.arange(8) % 4])
    assert describe_keys(["c", "a", "b"], limit=3) == "'a', 'b', 'c'"
    assert describe_keys(["d", "c", "a", "b"], limit=3) == "'a', 'b', 'c' (+1 more)"


def test_random_noise_is_drawn_on_the_cpu_in_float32_whatever_the_defaults():
    """ComfyUI draws its noise in float32 on the CPU; FreeNoise's ``random`` does too, also under another
    default device (``meta``) or default dtype, so the same seed gives the same noise everywhere."""
    expected = torch.randn(1, 4, 8, 2, 2, generator=torch.Generator().manual_seed(3))[0].transpose(0, 1)
    with torch.device("meta"):
        on_meta_default = free_noise(torch.zeros(8, 4, 2, 2, device="cpu"), "random", 4, 2,
                                     torch.Generator().manual_seed(3))
    assert torch.equal(on_meta_default, expected)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        wide_default = free_noise(torch.zeros(8, 4, 2, 2, dtype=torch.float32), "random", 4, 2,
                                  torch.Generator().manual_seed(3))
    finally:
        torch.set_default_dtype(previous)
    assert torch.equal(wide_default, expected)

"""ComfyUI tier, in-process: FreeNoise initial noise and FreeInit passes through the stock sampler.
"""

from __future__ import annotations

import pytest
import torch

from comfy_helpers import SamplerSpy, apply, ksample, motion, sample_with_noise

pytestmark = pytest.mark.comfyui


@pytest.mark.parametrize("noise_type", ["random", "repeated_context", "shuffle_context"])
def test_noise_types_replace_the_samplers_noise_by_their_freenoise_version(env, noise_type):
    """Sampling with a noise type equals sampling with default noise that was transformed first
    (seeded by the sampler's seed); default keeps the noise as is."""
    from animatediff_suite.motion_modules import ContextOptions, free_noise

    frames, seed = 40, 5
    model, loaded = env["demo"].tiny_model(0), motion(env, "v2", seed=1)
    options = ContextOptions(16, 4, noise_type=noise_type)
    got = ksample(env, apply(env, model, loaded, context=options), steps=1, frames=frames, seed=seed)
    noise = env["sample"].prepare_noise(torch.zeros(frames, 4, 8, 8), seed)
    transformed = free_noise(noise, noise_type, 16, 12, torch.Generator().manual_seed(seed))
    assert not torch.equal(transformed, noise)
    expected = sample_with_noise(env, apply(env, model, loaded, context=ContextOptions(16, 4)), transformed,
                                 env["cond"], env["negative"])
    assert torch.equal(got, expected)
    default = ksample(env, apply(env, model, loaded, context=ContextOptions(16, 4)), steps=1, frames=frames, seed=seed)
    assert not torch.equal(got, default)


def test_freeinit_passes_reinitialise_noise_by_the_formula(env):
    """Pass 2 starts from noise n' = LP(n0 + x0 / a) + HP(z) (a = sqrt(1 + sigma_max^2), x0 the first
    pass's result, z the fresh noise), i.e. diffusers' FreeInit up to sqrt(1 - alpha_bar) = 0.998."""
    from animatediff_suite.motion_modules.freeinit import fresh_noise_seed, low_pass_filter
    from animatediff_suite.nodes.context_nodes import FreeInitNode

    frames, seed, steps = 16, 5, 3
    model = apply(env, env["demo"].tiny_model(0), motion(env, "v2", seed=1))
    one_pass = ksample(env, model, steps=steps, seed=seed)
    assert torch.equal(one_pass, ksample(env, FreeInitNode.execute(model, 1, "butterworth", 0.25, 0.25, 4, False)
                                         .result[0], steps=steps, seed=seed))
    free_init = FreeInitNode.execute(model, 3, "gaussian", 0.3, 0.2, 4, False).result[0]
    spy = SamplerSpy(free_init)
    steps_seen = []
    out = ksample(env, free_init, steps=steps, seed=seed,
                  callback=lambda step, x0, x, total: steps_seen.append((step, total)))
    assert len(spy.passes) == 3 and all(s.shape[-1] == steps + 1 for _, s in spy.passes)
    assert steps_seen == [(i, 9) for i in range(9)]  # progress counts steps across the passes
    n0 = env["sample"].prepare_noise(torch.zeros(frames, 4, 8, 8), seed)
    assert torch.equal(spy.passes[0][0], n0)
    sampling = model.get_model_object("model_sampling")
    a = float((1 + sampling.sigma_max ** 2) ** 0.5)
    x0 = model.model.process_latent_in(one_pass)
    z = torch.randn(n0.shape, generator=torch.Generator().manual_seed(fresh_noise_seed(seed, 1)))
    mask = low_pass_filter(frames, 8, 8, "gaussian", 0.3, 0.2)
    dims = (-3, -2, -1)  # (c f h w): frames, height, width

    def spectrum(v):
        return torch.fft.fftshift(torch.fft.fftn(v.transpose(0, 1), dim=dims), dim=dims)

    mixed = spectrum(n0 + x0 / a) * mask + spectrum(z) * (1 - mask)
    expected = torch.fft.ifftn(torch.fft.ifftshift(mixed, dim=dims), dim=dims).real.transpose(0, 1)
    torch.testing.assert_close(spy.passes[1][0], expected, atol=1e-4, rtol=0)
    assert not torch.equal(out, one_pass)


def test_freeinit_fast_sampling_and_freenoise_together(env):
    """Coarse-to-fine pass lengths; the fresh noise of later passes gets the same FreeNoise treatment."""
    from animatediff_suite.motion_modules import ContextOptions
    from animatediff_suite.nodes.context_nodes import FreeInitNode

    model = apply(env, env["demo"].tiny_model(0), motion(env, "v2", seed=1),
                  context=ContextOptions(16, 4, noise_type="repeated_context"))
    free_init = FreeInitNode.execute(model, 3, "box", 0.25, 0.25, 4, True).result[0]
    spy = SamplerSpy(free_init)
    ksample(env, free_init, steps=6, frames=40)
    assert [s.shape[-1] - 1 for _, s in spy.passes] == [2, 4, 6]
    for noise, _ in spy.passes[:1]:
        assert torch.equal(noise[16:32], noise[:16])  # pass 1: repeated noise as given
    assert spy.passes[0][1][0] == spy.passes[2][1][0] and spy.passes[0][1][-1] == spy.passes[2][1][-1]


def test_every_freeinit_pass_mixes_the_previous_result_with_fresh_freenoise(env):
    """Passes 2 and 3 (not only the first) start from LP(n0 + x0 / a) + HP(z_k): n0 the first pass's
    (FreeNoise) noise, x0 the previous pass's result, a = sqrt(1 + sigma_max^2), and z_k the pass's fresh
    noise with the same FreeNoise treatment: repeated_context repeats its first 16 frames over the 40.
    Written out here with torch.fft; the seeds of the fresh noise are the documented fresh_noise_seed."""
    from animatediff_suite.motion_modules import ContextOptions
    from animatediff_suite.motion_modules.freeinit import fresh_noise_seed, low_pass_filter
    from animatediff_suite.nodes.context_nodes import FreeInitNode

    frames, seed = 40, 5
    model = apply(env, env["demo"].tiny_model(0), motion(env, "v2", seed=1),
                  context=ContextOptions(16, 4, noise_type="repeated_context"))
    free_init = FreeInitNode.execute(model, 3, "box", 0.3, 0.2, 4, True).result[0]
    spy = SamplerSpy(free_init)
    ksample(env, free_init, steps=6, frames=frames, seed=seed)
    n0 = spy.passes[0][0]
    assert torch.equal(n0, torch.cat([n0[:16]] * 3)[:frames])
    mask = low_pass_filter(frames, 8, 8, "box", 0.3, 0.2)
    dims = (-3, -2, -1)  # (c f h w): frames, height, width

    def spectrum(v):
        return torch.fft.fftshift(torch.fft.fftn(v.transpose(0, 1).double(), dim=dims), dim=dims)

    for k in (1, 2):
        sigma_max = float(spy.passes[k][1][0])
        a = (1 + sigma_max ** 2) ** 0.5
        drawn = torch.randn(n0.shape, generator=torch.Generator().manual_seed(fresh_noise_seed(seed, k)))
        z = torch.cat([drawn[:16]] * 3)[:frames]
        mixed = spectrum(n0 + spy.outputs[k - 1] / a) * mask + spectrum(z) * (1 - mask)
        expected = torch.fft.ifftn(torch.fft.ifftshift(mixed, dim=dims), dim=dims).real.transpose(0, 1)
        torch.testing.assert_close(spy.passes[k][0].double(), expected, atol=1e-4, rtol=0)


def test_freeinit_leaves_disabled_noise_and_input_model_alone(env):
    from animatediff_suite.motion_modules import ContextOptions
    from animatediff_suite.nodes.context_nodes import FreeInitNode

    model = apply(env, env["demo"].tiny_model(0), motion(env, "v2"), context=ContextOptions(noise_type="random"))
    options_before = repr(model.model_options)
    FreeInitNode.execute(model, 2, "ideal", 0.25, 0.25, 4, False)
    assert repr(model.model_options) == options_before
    free_init = FreeInitNode.execute(model, 2, "ideal", 0.25, 0.25, 4, False).result[0]
    spy = SamplerSpy(free_init)
    zeros = torch.zeros(16, 4, 8, 8)
    sample_with_noise(env, free_init, zeros, env["cond"], env["negative"])
    assert len(spy.passes) == 1 and not spy.passes[0][0].any()  # "add noise: disable" stays disabled, one pass

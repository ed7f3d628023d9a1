"""ComfyUI tier, in-process: sliding context windows (whole_model and motion_attention scopes),
windowed conditioning and ControlNet hints, Prompt Travel, the schedule preview, progress.
"""

from __future__ import annotations

import pytest
import torch

from comfy_helpers import apply, assert_counts_up, eps_of, ksample, motion, reference_unet, sample_with_noise

pytestmark = pytest.mark.comfyui


def test_clips_within_one_window_are_bit_identical_to_no_context_options(env):
    from animatediff_suite.motion_modules import ContextOptions

    model = env["demo"].tiny_model(0)
    loaded = motion(env, "v2")
    for frames in (16, 9):
        plain = ksample(env, apply(env, model, loaded), frames=frames)
        windowed = ksample(env, apply(env, model, loaded, context=ContextOptions(16, 4)), frames=frames)
        assert torch.equal(plain, windowed)


def test_standard_uniform_equals_comfyui_cores_schedule_wherever_cores_windows_are_valid(comfyui):
    """ComfyUI core's create_windows_uniform_standard (the algorithm AnimateDiff-Evolved published) is
    the reference; where a dilated level is longer than the clip it returns frames past the end or a
    frame twice in a window, and ours leaves that level out."""
    import itertools
    import types

    import comfy.context_windows

    from animatediff_suite.motion_modules import ContextOptions, context_windows

    compared = invalid = 0
    for frames, length, overlap, stride, step in itertools.product(range(1, 70), (1, 4, 8, 16), (0, 1, 4, 7),
                                                                   (1, 2, 3), range(6)):
        if overlap >= length:
            continue
        handler = types.SimpleNamespace(context_length=length, context_overlap=overlap, context_stride=stride,
                                        closed_loop=False, _step=step)
        core = comfy.context_windows.create_windows_uniform_standard(frames, handler, {})
        ours = context_windows(frames, ContextOptions(length, overlap, stride, schedule="standard_uniform"), step)
        if any(len(set(w)) != len(w) or not all(0 <= f < frames for f in w) for w in core):
            invalid += 1
            assert all(len(set(w)) == len(w) and all(0 <= f < frames for f in w) for w in ours)
            continue
        compared += 1
        assert ours == core, (frames, length, overlap, stride, step)
    assert compared > 10000 and invalid > 100


@pytest.mark.parametrize("schedule,fuse", [("standard_static", "pyramid"), ("looped_uniform", "flat"),
                                           ("standard_uniform", "overlap-linear"), ("batched", "gaussian")])
def test_windowed_step_equals_fused_per_window_reference(env, schedule, fuse):
    """40 frames, per-frame prompts: one euler step with windows equals running each window alone
    (its latents, noise and prompts) and fusing the results with the core's weights."""
    from animatediff_suite.motion_modules import ContextOptions, context_windows, fuse_windows

    frames, cfg = 40, 7.0
    options = ContextOptions(16, 4, closed_loop=True, schedule=schedule, fuse_method=fuse)
    model = env["demo"].tiny_model(0)
    loaded = motion(env, "v2", seed=1)
    gen = torch.Generator().manual_seed(3)
    per_frame = torch.randn(frames, 77, 32, generator=gen)
    positive = [[per_frame, {}]]
    noise = torch.randn(frames, 4, 8, 8, generator=gen)
    windowed = sample_with_noise(env, apply(env, model, loaded, context=options), noise, positive, env["negative"],
                                 cfg)
    plain = apply(env, model, loaded)
    windows = context_windows(frames, options, step=0)
    assert len(windows) > 1
    parts = [(w, sample_with_noise(env, plain, noise[w], [[per_frame[w], {}]], env["negative"], cfg))
             for w in windows]
    expected = fuse_windows(parts, frames, options)
    eps = eps_of(model, noise)
    tolerance = 1e-4 * (abs(cfg) + abs(cfg - 1))
    torch.testing.assert_close(eps(windowed), eps(expected), atol=tolerance, rtol=0)


def test_context_options_validation(env):
    from animatediff_suite.motion_modules import ContextOptions, MotionModelError

    from animatediff_suite.nodes.context_nodes import ContextOptionsNode as node
    assert "must be less than context_length" in node.validate_inputs(context_length=8, context_overlap=8)
    options = node.execute(16, 4, 1, False, "standard_static", "pyramid").result[0]
    assert options == ContextOptions(16, 4)
    with pytest.raises(MotionModelError, match=r"context_length 32 is more than motion model .* can see at once "
                                               r"\(24 frames\); lower it or turn on stretch_pe"):
        apply(env, env["demo"].tiny_model(0), motion(env, "v1"), context=ContextOptions(32, 4))
    stretched = node.execute(32, 8, 1, False, "standard_static", "pyramid", stretch_pe=True).result[0]
    assert stretched == ContextOptions(32, 8, stretch_pe=True)
    model = apply(env, env["demo"].tiny_model(0), motion(env, "v1"), context=stretched)
    out = ksample(env, model, steps=1, frames=40)  # windows of 32 frames on a 24-frame model
    assert out.shape == (40, 4, 8, 8) and bool(torch.isfinite(out).all())


def test_controlnet_hints_are_windowed_with_their_frames(env):
    """Each window gets exactly its frames' hints: a windowed step equals the fused per-window
    steps that each see only their own slice of the 40-frame hint batch."""
    from animatediff_suite.motion_modules import ContextOptions, context_windows, fuse_windows

    frames, cfg = 40, 7.0
    options = ContextOptions(16, 4)
    model = env["demo"].tiny_model(0)
    loaded = motion(env, "v2", seed=1)
    control = env["demo"].tiny_controlnet(7)
    gen = torch.Generator().manual_seed(5)
    hints = torch.rand(frames, 64, 64, 3, generator=gen)
    noise = torch.randn(frames, 4, 8, 8, generator=gen)
    apply_cn = env["nodes"].ControlNetApplyAdvanced().apply_controlnet

    def with_hints(images):
        return apply_cn(env["cond"], env["negative"], control, images, 0.9, 0.0, 1.0)

    positive, negative = with_hints(hints)
    windowed = sample_with_noise(env, apply(env, model, loaded, context=options), noise, positive, negative, cfg)
    plain = apply(env, model, loaded)
    parts = [(w, sample_with_noise(env, plain, noise[w], *with_hints(hints[w]), cfg))
             for w in context_windows(frames, options)]
    expected = fuse_windows(parts, frames, options)
    first_16 = [(w, sample_with_noise(env, plain, noise[w], *with_hints(hints[:16]), cfg))
                for w in context_windows(frames, options)]
    wrong = fuse_windows(first_16, frames, options)  # what truncating the hints to the batch would give
    eps = eps_of(model, noise)
    torch.testing.assert_close(eps(windowed), eps(expected), atol=1e-4 * (2 * cfg - 1), rtol=0)
    assert (eps(windowed) - eps(wrong)).abs().max() > 1e-2


def test_per_frame_conditioning_masks_are_windowed_with_their_frames(env):
    """A 40-frame mask batch (ConditioningSetMask): each window's masked cond gets its frames' masks,
    so a windowed step equals the fused per-window steps with the sliced masks (ComfyUI alone would
    take the first frames' masks for every window)."""
    from animatediff_suite.motion_modules import ContextOptions, context_windows, fuse_windows

    frames, cfg = 40, 7.0
    options = ContextOptions(16, 4)
    model = env["demo"].tiny_model(0)
    loaded = motion(env, "v2", seed=1)
    gen = torch.Generator().manual_seed(6)
    masks = (torch.rand(frames, 64, 64, generator=gen) > 0.5).float()
    masks[::3] = 0.0  # some frames entirely outside the masked prompt
    noise = torch.randn(frames, 4, 8, 8, generator=gen)
    other = env["nodes"].CLIPTextEncode().encode(env["demo"].tiny_clip(0), "a dog")[0]

    def positive(mask):
        masked = env["nodes"].ConditioningSetMask().append(other, mask, "default", 1.0)[0]
        return env["cond"] + masked

    windowed = sample_with_noise(env, apply(env, model, loaded, context=options), noise, positive(masks),
                                 env["negative"], cfg)
    plain = apply(env, model, loaded)
    windows = context_windows(frames, options)
    expected = fuse_windows([(w, sample_with_noise(env, plain, noise[w], positive(masks[w]), env["negative"], cfg))
                             for w in windows], frames, options)
    truncated = fuse_windows([(w, sample_with_noise(env, plain, noise[w], positive(masks[:16]), env["negative"], cfg))
                              for w in windows], frames, options)
    eps = eps_of(model, noise)
    torch.testing.assert_close(eps(windowed), eps(expected), atol=1e-4 * (2 * cfg - 1), rtol=0)
    assert (eps(windowed) - eps(truncated)).abs().max() > 1e-3


def test_prompt_travel_node(env):
    from animatediff_suite.nodes.prompt_nodes import PromptTravel

    clip = env["demo"].tiny_clip(0)
    assert "line 2" in PromptTravel.validate_inputs(text="0: a cat\nbroken line")
    conditioning = PromptTravel.execute(clip, "0: a cat sitting\n8: a cat jumping", 12, prefix="photo",
                                        suffix="best quality").result[0]
    cond, extras = conditioning[0]
    assert cond.shape == (12, 77, 32) and extras["pooled_output"].shape == (12, 32)
    first = env["nodes"].CLIPTextEncode().encode(clip, "photo, a cat sitting, best quality")[0][0][0]
    last = env["nodes"].CLIPTextEncode().encode(clip, "photo, a cat jumping, best quality")[0][0][0]
    torch.testing.assert_close(cond[0], first[0])
    torch.testing.assert_close(cond[11], last[0])
    torch.testing.assert_close(cond[4], (first[0] + last[0]) / 2)
    model = apply(env, env["demo"].tiny_model(0), motion(env, "v3"))
    assert ksample(env, model, frames=12, positive=conditioning).shape == (12, 4, 8, 8)


def test_context_schedule_image_node(env):
    from animatediff_suite.motion_modules import ContextOptions

    from animatediff_suite.nodes.context_nodes import ContextScheduleImage

    image, report = ContextScheduleImage.execute(ContextOptions(16, 4, closed_loop=True, schedule="looped_uniform"),
                                                 64, 3).result
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3 and image.shape[2] == 64 * 12
    # looped, closed: 64 frames advance 12 -> windows at 0, 12, ..., 60 (6 windows of 16 = 96 frames)
    assert report.splitlines()[0] == "step 0: 6 window(s), 96 frames through the UNet for 64 (1.50x)"


def test_motion_attention_scope_within_one_window_is_bit_identical(env):
    from animatediff_suite.motion_modules import ContextOptions

    model, loaded = env["demo"].tiny_model(0), motion(env, "v2")
    for frames in (16, 9):
        plain = ksample(env, apply(env, model, loaded), frames=frames)
        options = ContextOptions(16, 4, scope="motion_attention", fuse_method="delayed_reverse_sawtooth")
        assert torch.equal(plain, ksample(env, apply(env, model, loaded, context=options), frames=frames))


def test_motion_attention_scope_runs_the_unet_on_all_frames_and_windows_only_motion_attention(env):
    """40 frames with a 32-frame motion model: one UNet call per step sees all 40 frames, and the
    result equals the core reference whose motion modules window their attention."""
    import comfy.patcher_extension

    from animatediff_suite.motion_modules import ContextOptions, weighted_windows

    frames, cfg = 40, 7.0
    options = ContextOptions(16, 4, scope="motion_attention", schedule="standard_uniform")
    model = env["demo"].tiny_model(0)
    loaded = motion(env, "v2", seed=1)
    patched = apply(env, model, loaded, context=options)
    batches = []

    def spy(executor, x, t, *args, **kwargs):
        batches.append(x.shape[0])
        return executor(x, t, *args, **kwargs)

    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test.spy", spy)
    out = ksample(env, patched, cfg=cfg, steps=1, frames=frames)
    assert batches == [2 * frames]
    ksample(env, model, steps=1)  # loads the plain model: the motion slots are ejected again
    sampling = model.get_model_object("model_sampling")
    sigma = sampling.sigma_max.reshape(1)
    noise = env["sample"].prepare_noise(torch.zeros(frames, 4, 8, 8), 5)
    x = sampling.noise_scaling(sigma, noise, torch.zeros_like(noise), max_denoise=True)
    t = sampling.timestep(sigma).float().expand(frames)
    windows = weighted_windows(frames, options, step=0)
    assert len(windows) > 1

    def x0(conditioning):
        context = conditioning[0][0].expand(frames, -1, -1)
        with torch.no_grad():
            eps = reference_unet(model.model.diffusion_model, loaded.patcher.model, sampling.calculate_input(sigma, x),
                                 t, context, frames, windows=windows)
        return sampling.calculate_denoised(sigma, eps, x)

    uncond = x0(env["negative"])
    expected = uncond + cfg * (x0(env["cond"]) - uncond)
    got = model.model.latent_format.process_in(out)
    torch.testing.assert_close((x - got) / sigma, (x - expected) / sigma, atol=1e-4 * (2 * cfg - 1), rtol=0)


def test_windows_show_on_the_progress_bar(env):
    """Windows advance the bar by fractions of a step, counting steps across FreeInit's passes."""
    import comfy.utils

    from animatediff_suite.motion_modules import ContextOptions, context_windows
    from animatediff_suite.nodes.context_nodes import FreeInitNode

    from animatediff_suite.nodes import context_sampling

    model = apply(env, env["demo"].tiny_model(0), motion(env, "v2"), context=ContextOptions(16, 4))
    windows = len(context_windows(40, ContextOptions(16, 4)))
    reports, releases = [], []
    release = context_sampling.release_freed_memory
    context_sampling.release_freed_memory = lambda device: releases.append(device.type) or release(device)
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None:
                                             reports.append((value, total, preview)))
    try:
        ksample(env, model, steps=2, frames=40, callback=lambda *a: None)
        assert_counts_up(reports, 2 * windows)  # every window's update
        assert releases == ["cpu"] * 2 * windows  # freed pages go back to the system after each window
        reports.clear()
        free_init = FreeInitNode.execute(model, 2, "butterworth", 0.25, 0.25, 4, True).result[0]  # 1 + 2 steps
        ksample(env, free_init, steps=2, frames=40, callback=lambda *a: None)
        assert_counts_up(reports, 3 * windows)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        context_sampling.release_freed_memory = release


def _r(a: int, b: int) -> list[int]:
    return list(range(a, b + 1))


# The windows of each step, listed by hand (worked out in tests/test_context.py's docstrings).
VISITED_BY_HAND = {
    "standard_static": (40, 16, 4, False, [[_r(0, 15), _r(12, 27), _r(24, 39)]] * 4),
    "batched": (40, 16, 4, False, [[_r(0, 15), _r(16, 31), _r(32, 39)]] * 4),
    "standard_uniform": (32, 16, 4, False, [[_r(0, 15), _r(12, 27), _r(16, 31)],
                                             [_r(16, 31), _r(0, 15), _r(8, 23)],
                                             [_r(8, 23), _r(16, 31), _r(0, 15)],
                                             [_r(16, 31), _r(0, 15), _r(4, 19)]]),
    "looped_uniform": (20, 8, 2, False, [[_r(0, 7), _r(6, 13), _r(12, 19)],
                                         [_r(10, 17), _r(16, 19) + _r(0, 3), _r(2, 9)],
                                         [_r(5, 12), _r(11, 18), _r(17, 19) + _r(0, 4)],
                                         [_r(15, 19) + _r(0, 2), _r(1, 8), _r(7, 14)]]),
    "looped_uniform closed_loop": (20, 8, 2, True, [[_r(0, 7), _r(6, 13), _r(12, 19), _r(18, 19) + _r(0, 5)]]),
}


@pytest.mark.parametrize("window_batch", [1, 2])
@pytest.mark.parametrize("name", sorted(VISITED_BY_HAND))
def test_the_sampler_visits_the_windows_listed_by_hand_at_every_step(env, name, window_batch):
    """A spy in place of the UNet (ComfyUI's unet function wrapper) reads which frames each call holds:
    the noise carries frame f as channel 0 = f + 1 over channel 1 = 1, and the spy returns eps = 0, so
    euler keeps every latent at sigma x noise and the ratio names the frame at every step. Each step's
    windows (cond and uncond alike) must be the hand-listed ones, also when calls hold 2 windows."""
    from animatediff_suite.motion_modules import ContextOptions

    frames, length, overlap, closed, by_hand = VISITED_BY_HAND[name]
    options = ContextOptions(length, overlap, closed_loop=closed, schedule=name.split()[0], window_batch=window_batch)
    model = apply(env, env["demo"].tiny_model(0), motion(env, "v2"), context=options).clone()
    calls = []

    def spy(apply_model, args):
        x, chunks = args["input"], len(args["cond_or_uncond"])
        ids = (x[:, 0] / x[:, 1]).mean((1, 2)).round().long() - 1
        step = float(args["timestep"].reshape(-1)[0])
        for chunk in ids.chunk(chunks):
            calls.append((step, [w.tolist() for w in chunk.split(length)]))
        return torch.zeros_like(x)

    model.set_model_unet_function_wrapper(spy)
    noise = torch.ones(frames, 4, 8, 8)
    noise[:, 0] = torch.arange(1, frames + 1, dtype=torch.float32).view(frames, 1, 1)
    sample_with_noise(env, model, noise, env["cond"], env["negative"], cfg=7.0, steps=len(by_hand))
    steps = sorted({step for step, _ in calls}, reverse=True)
    assert len(steps) == len(by_hand)
    for step, expected in zip(steps, by_hand):
        per_chunk = [windows for t, windows in calls if t == step]
        visited = sorted(w for windows in per_chunk for w in windows)
        assert visited == sorted(expected * 2), (name, steps.index(step))  # cond and uncond


def test_per_frame_model_conds_of_any_rank_are_cut_to_the_window(comfyui):
    """A model cond with one value per frame (also a 1-d one) is cut to the window's frames, in the window's
    order, bare or wrapped in a ComfyUI cond; a 0-d value and one not per frame pass unchanged."""
    import comfy.conds

    from animatediff_suite.nodes.context_sampling import _window_model_cond

    index = torch.tensor([5, 6, 7, 0])  # a looped window of 8 frames
    per_frame = torch.arange(8.0) * 10
    assert torch.equal(_window_model_cond(per_frame, index, 8), torch.tensor([50.0, 60.0, 70.0, 0.0]))
    wrapped = _window_model_cond(comfy.conds.CONDRegular(per_frame), index, 8)
    assert torch.equal(wrapped.cond, torch.tensor([50.0, 60.0, 70.0, 0.0]))
    rows = torch.arange(16.0).reshape(8, 2)
    assert torch.equal(_window_model_cond(rows, index, 8), torch.tensor([[10.0, 11.0], [12.0, 13.0], [14.0, 15.0],
                                                                          [0.0, 1.0]]))
    scalar, other = torch.tensor(3.0), torch.arange(5.0)
    assert _window_model_cond(scalar, index, 8) is scalar and _window_model_cond(other, index, 8) is other

"""Explicit frame identity: the clip layout of every UNet call, several clips per batch, batched
windows, the memory plan of the model load, and v1 under gradient checkpointing."""

from __future__ import annotations

import math

import pytest
import torch

from animatediff_suite.motion_modules.context import window_groups
from animatediff_suite.motion_modules.errors import MotionModelError
from animatediff_suite.motion_modules.layout import FrameLayout, clip_count
from comfy_helpers import eps_of

FRAMES = 16


# -- core: the record itself ------------------------------------------------------------------

def test_layout_of_batched_windows_over_two_clips():
    # two windows of 4 frames of two 10-frame clips, window-major: hand-written rows
    layout = FrameLayout.of_windows([[0, 1, 2, 3], [6, 7, 8, 9]], clips=2, clip_frames=10)
    assert (layout.frames, layout.sequences, layout.rows) == (4, 4, 16)
    assert layout.clip_ids == (0, 1, 0, 1)
    assert layout.batch_index() == [0, 1, 2, 3, 10, 11, 12, 13, 6, 7, 8, 9, 16, 17, 18, 19]
    assert FrameLayout.whole(3, 5).batch_index() == list(range(15))
    layout.check_batch(32, 2, "here")
    with pytest.raises(MotionModelError, match=r"here got a batch of 30 rows.*2 cond/uncond chunk\(s\) x 4 "):
        layout.check_batch(30, 2, "here")
    with pytest.raises(ValueError, match="same, non-zero length"):
        FrameLayout(((0, 1), (0,)), (0, 1), 4)


def test_clip_count():
    assert [clip_count(32, n) for n in (0, 16, 8, 32)] == [1, 2, 4, 1]
    with pytest.raises(MotionModelError, match="batch of 30 frames cannot be split into clips of 16"):
        clip_count(30, 16)


def test_layout_errors_are_whole_sentences_and_the_edges_hold():
    """Each refusal's exact words; one-frame sequences and the last frame of a clip are valid."""
    def message(*args):
        with pytest.raises(ValueError) as error:
            FrameLayout(*args)
        return str(error.value)

    assert message((), (), 4) == "a layout needs one clip id per sequence; got 0 sequences and 0 clip ids"
    assert message(((0, 1),), (0, 1), 4) == "a layout needs one clip id per sequence; got 1 sequences and 2 clip ids"
    assert message(((0, 1), (0,)), (0, 1), 4) == ("all sequences of one call must have the same, non-zero length; "
                                                 "got [1, 2]")
    assert message(((0, 4),), (0,), 4) == "frame positions must lie in [0, 4)"
    assert message(((-1, 0),), (0,), 4) == "frame positions must lie in [0, 4)"
    assert FrameLayout(((3,), (0,)), (0, 0), 4).rows == 2
    assert FrameLayout.of_windows([[0, 1], [5, 6]], 1, 8).row_frames(2) == [0, 1, 5, 6, 0, 1, 5, 6]
    with pytest.raises(MotionModelError) as error:
        FrameLayout.whole(2, 4).check_batch(10, 2, "the motion module")
    assert str(error.value) == ("the motion module got a batch of 10 rows, but this call's clip layout is 2 cond/uncond "
                                "chunk(s) x 2 sequence(s) x 4 frames = 16; another node changed the batch between "
                                "the sampler and the UNet")
    assert clip_count(4, 1) == 4 and type(clip_count(32, 16)) is int
    with pytest.raises(MotionModelError) as error:
        clip_count(30, 16)
    assert str(error.value) == ("a latent batch of 30 frames cannot be split into clips of 16 frames (Apply Motion "
                                "Model's frames_per_clip); use a multiple of 16 frames, or frames_per_clip 0 for one clip")


def test_window_groups_keep_equal_lengths_and_the_limit():
    plan = [([0, 1, 2], [1] * 3), ([2, 3, 4], [1] * 3), ([4, 5, 6], [1] * 3), ([6, 7], [1] * 2)]
    lengths = [[len(w) for w, _ in g] for g in window_groups(plan, 2)]
    assert lengths == [[3, 3], [3], [2]]
    assert [len(g) for g in window_groups(plan, 64)] == [3, 1]


# -- ComfyUI tier --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(comfyui):
    import comfy.sample
    import nodes

    from animatediff_suite.nodes import demo, injection

    clip = demo.tiny_clip(0)
    encode = nodes.CLIPTextEncode().encode
    return dict(sample=comfy.sample, demo=demo, injection=injection, clip=clip, encode=encode,
                positive=encode(clip, "a cat walking")[0], negative=encode(clip, "blurry")[0])


CFG = 7.0
# a 1e-4 error per UNet output can grow to (|cfg| + |cfg - 1|) 1e-4 in the guided output
TOLERANCE = 1e-4 * (abs(CFG) + abs(CFG - 1))


def sample(env, model, noise, positive=None):
    """One euler step from sigma_max, returned as the UNet output behind it (eps_of): comparisons then
    stay on the UNet's scale (the tiny model's latents are ~300, where 1e-4 would be a few ulps)."""
    out = env["sample"].sample(model, noise, 1, CFG, "euler", "normal", positive or env["positive"],
                               env["negative"], torch.zeros_like(noise), disable_pbar=True, seed=3)
    return eps_of(model, noise)(out)


def animated(env, version="v2", **kwargs):
    model = env["demo"].tiny_model(0)
    loaded = env["demo"].tiny_motion_patcher(1, version)
    return env["injection"].apply_motion(model, loaded, **kwargs)


def context(**kwargs):
    from animatediff_suite.motion_modules import ContextOptions

    return ContextOptions(**{"context_length": 8, "context_overlap": 3, **kwargs})


@pytest.mark.comfyui
@pytest.mark.parametrize("version,windows", [("v2", None), ("v1", None), ("v2", "whole_model"),
                                             ("v1", "whole_model"), ("v2", "motion_attention")])
def test_each_clip_of_a_batch_equals_that_clip_sampled_alone(env, version, windows):
    """32 latents with frames_per_clip 16 and per-frame prompts (each clip its own prompt): each half
    equals the same 16 frames (their noise and prompts) sampled on their own, also with windows and
    with v1's frame-spanning norms; with frames_per_clip 0 the halves see each other."""
    options = context(scope=windows) if windows else None
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(2 * FRAMES, 4, 8, 8, generator=gen)
    prompts = [env["encode"](env["clip"], text)[0][0][0] for text in ("a red fox running", "waves at night")]
    per_frame = torch.cat([p.expand(FRAMES, -1, -1) for p in prompts])
    both = sample(env, animated(env, version, context=options, frames_per_clip=FRAMES), noise, [[per_frame, {}]])
    alone = animated(env, version, context=options)
    for clip in range(2):
        rows = slice(clip * FRAMES, (clip + 1) * FRAMES)
        expected = sample(env, alone, noise[rows], [[per_frame[rows], {}]])
        torch.testing.assert_close(both[rows], expected, atol=TOLERANCE, rtol=0)
    if windows or version != "v1":  # (v1 sees at most 24 frames in one pass)
        one_clip = sample(env, animated(env, version, context=options), noise, [[per_frame, {}]])
        assert (one_clip - both).abs().max() > 1e-2  # frames_per_clip really separates the clips


@pytest.mark.comfyui
def test_frames_per_clip_that_does_not_divide_the_batch_is_refused_before_sampling(env):
    model = animated(env, frames_per_clip=16)
    with pytest.raises(MotionModelError, match="batch of 24 frames cannot be split into clips of 16"):
        sample(env, model, torch.randn(24, 4, 8, 8))


@pytest.mark.comfyui
@pytest.mark.parametrize("window_batch", [2, 3, 0])
def test_batched_windows_equal_one_window_at_a_time(env, window_batch):
    """40 frames x 2 clips, windows of 8: several windows per UNet call give the result of one per call."""
    gen = torch.Generator().manual_seed(8)
    noise = torch.randn(80, 4, 8, 8, generator=gen)
    calls = []

    def count(executor, *args, **kwargs):
        calls.append(args[1].shape[0])
        return executor(*args, **kwargs)

    def run(per_call):
        model = animated(env, context=context(window_batch=per_call), frames_per_clip=40)
        import comfy.patcher_extension
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test.count", count)
        calls.clear()
        return sample(env, model, noise), list(calls)

    single, single_calls = run(1)
    batched, batched_calls = run(window_batch)
    torch.testing.assert_close(batched, single, atol=TOLERANCE, rtol=0)
    windows = len(single_calls)  # cond and uncond go in one call on this CPU: one call per window
    assert set(single_calls) == {2 * 2 * 8}
    per_call = window_batch or windows  # auto: all windows fit the free memory of this machine
    assert len(batched_calls) == -(-windows // per_call)
    assert max(batched_calls) == per_call * 2 * 2 * 8


@pytest.mark.comfyui
def test_model_load_is_planned_for_one_window_whatever_the_clip_length(env, monkeypatch):
    """The memory ComfyUI reserves when it loads the model (PREPARE_SAMPLING) is that of one window's
    UNet call, as ComfyUI's own context handler plans it: 256 frames reserve what 16 frames do."""
    import comfy.model_management
    import comfy.sampler_helpers

    reserved = []
    real = comfy.model_management.load_models_gpu

    def spy(models, memory_required=0, *args, **kwargs):
        reserved.append(memory_required)
        return real(models, memory_required, *args, **kwargs)

    monkeypatch.setattr(comfy.model_management, "load_models_gpu", spy)

    def reserve(model, frames):
        reserved.clear()
        import comfy.model_patcher

        conds = {"positive": [], "negative": []}
        options = comfy.model_patcher.create_model_options_clone(model.model_options)
        comfy.sampler_helpers.prepare_model_patcher(model, conds, options)  # as the guider does: adds the wrappers
        comfy.sampler_helpers.prepare_sampling(model, (frames, 4, 8, 8), conds, options)
        return reserved[0]

    from animatediff_suite.motion_modules.memory import MODULE_ACTIVATIONS

    plain = env["demo"].tiny_model(0)

    def expected(frames, attention_frames):
        """ComfyUI's estimate for cond + uncond of ``frames`` frames, plus the largest motion module's
        activations on them (32 channels at 8x8 in the tiny model, fp32) and, as the CPU's "auto" kernel
        materialises them up to 32 frames, its attention scores and softmax (8 heads), rounded up to
        whole frames."""
        per_frame = plain.model.memory_required([1, 4, 8, 8])
        extra = MODULE_ACTIVATIONS * 2 * frames * 64 * 32 * 4
        if attention_frames <= 32:
            extra += 2 * (2 * frames // attention_frames) * 64 * 8 * attention_frames ** 2 * 4
        return plain.model.memory_required([2 * (frames + math.ceil(extra / per_frame / 2)), 4, 8, 8])

    windowed = animated(env, context=context(context_length=16, context_overlap=4))
    assert reserve(windowed, 256) == reserve(windowed, 16) == pytest.approx(expected(16, 16))
    assert reserve(animated(env), 64) == pytest.approx(expected(64, 64))
    batched = animated(env, context=context(context_length=16, context_overlap=4, window_batch=3), frames_per_clip=64)
    assert reserve(batched, 128) == pytest.approx(expected(2 * 3 * 16, 16))


@pytest.mark.comfyui
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_gradient_checkpointing_of_unet_blocks_gives_the_same_gradients(env, version):
    """Training recomputes checkpointed blocks during backward, after the forward call returned: the
    frame layout (and v1's frame-spanning norms) must hold there too. Gradients of the motion weights
    with every layer of the UNet blocks checkpointed (the recompute is counted) equal those without."""
    import comfy.model_management as mm

    from animatediff_suite.nodes.context_sampling import LAYOUT_KEY

    model = env["demo"].tiny_model(0)
    loaded = env["demo"].tiny_motion_patcher(1, version)
    patched = env["injection"].apply_motion(model, loaded)
    unet = model.model.diffusion_model
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(FRAMES, 4, 8, 8, generator=gen)
    t = torch.full((FRAMES,), 500.0)
    text = torch.randn(FRAMES, 77, 32, generator=gen)
    params = list(loaded.patcher.model.parameters())

    checkpointed_model = patched.clone()
    env["injection"].enable_gradient_checkpointing(checkpointed_model)
    calls = []
    first_module = next(iter(loaded.patcher.model.named_temporal_modules()))[1]
    hook = first_module.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))

    def gradients(model):
        options = {**model.model_options["transformer_options"], "cond_or_uncond": [0],
                   "sigmas": torch.tensor([5.0]), LAYOUT_KEY: FrameLayout.whole(1, FRAMES),
                   "wrappers": model.wrappers}  # as sampler_helpers.prepare_model_patcher passes them
        calls.clear()
        try:
            for p in params:
                p.requires_grad_(True)
                p.grad = None
            out = unet(x, t, context=text, transformer_options=options)
            (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
            return out.detach(), [p.grad.clone() for p in params], len(calls)
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None

    mm.load_models_gpu([patched, *patched.get_nested_additional_models()])
    try:
        plain_out, plain_grads, plain_calls = gradients(patched)
        ckpt_out, ckpt_grads, ckpt_calls = gradients(checkpointed_model)
    finally:
        hook.remove()
        mm.load_models_gpu([model])  # ejects the motion modules again
    assert (plain_calls, ckpt_calls) == (1, 2)  # the checkpointed run recomputed the module in backward
    assert not any("forward" in layer.__dict__ or "run" in layer.__dict__
                   for block in (*unet.input_blocks, unet.middle_block, *unet.output_blocks) for layer in block)
    torch.testing.assert_close(ckpt_out, plain_out, atol=1e-5, rtol=0)
    assert max(g.abs().max() for g in plain_grads) > 1e-3
    for got, expected in zip(ckpt_grads, plain_grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_row_frames_is_one_chunk_unless_told():
    layout = FrameLayout(((3, 4), (0, 1)), (0, 1), 8)
    assert layout.row_frames() == [3, 4, 0, 1]
    assert layout.row_frames(2) == [3, 4, 0, 1, 3, 4, 0, 1]

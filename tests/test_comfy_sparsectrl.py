"""ComfyUI tier, in-process: SparseCtrl through ComfyUI's ControlNet plumbing on the tiny models: one step
against the block-by-block reference fed with hand-placed keyframes (also on a model without motion
modules), rgb keyframes through the VAE, their dtype, context windows, start/end percent, chaining, untouched
inputs and clear errors."""

from __future__ import annotations

import pytest
import torch

from comfy_helpers import FRAMES, apply, eps_of, motion, reference_unet, sample_with_noise

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def sc(env):
    from animatediff_suite.nodes import sparsectrl

    env["sparsectrl"] = sparsectrl
    return {kind: sparsectrl.wrap_sparsectrl(env["demo"].tiny_sparsectrl(3, kind), f"tiny {kind}")
            for kind in ("rgb", "scribble")}


def keyframe_images(count: int, seed: int = 4) -> torch.Tensor:
    return torch.rand(count, 64, 64, 3, generator=torch.Generator().manual_seed(seed))


def on_first_and_last(images: torch.Tensor) -> dict:
    """Two keyframe images as hand-placed conditions: frame -> (c, h, w), on the clip's first and last frame."""
    return {0: images[0].movedim(-1, 0), FRAMES - 1: images[1].movedim(-1, 0)}


def one_step(env, model, positive, negative, cfg, frames=FRAMES, seed=5):
    noise = env["sample"].prepare_noise(torch.zeros(frames, 4, 8, 8), seed)
    return noise, sample_with_noise(env, model, noise, positive, negative, cfg)


def expected_eps(env, model, motion_model, sparsectrl, noise, keyed: dict, strength: float, cfg: float):
    """The noise prediction of one step at sigma_max, from the reference UNet plus SparseCtrl residuals of
    a condition written out here: ``keyed`` maps frame -> condition, every other frame zero, mask likewise."""
    one_step(env, model, env["cond"], env["negative"], 1.0)  # the plain model's run ejects the motion slots
    sampling = model.get_model_object("model_sampling")
    sigma = sampling.sigma_max.reshape(1)
    frames = noise.shape[0]
    x = sampling.noise_scaling(sigma, noise, torch.zeros_like(noise), max_denoise=True)
    t = sampling.timestep(sigma).float().expand(frames)
    shape = next(iter(keyed.values())).shape
    condition, mask = torch.zeros(frames, *shape), torch.zeros(frames, 1, *shape[1:])
    for frame, value in keyed.items():
        condition[frame], mask[frame] = value, 1.0

    def eps(conditioning):
        context = conditioning[0][0].expand(frames, -1, -1)
        with torch.no_grad():
            residuals, mid = sparsectrl(t, context, condition, mask, frames)
            control = ([r * strength for r in residuals], mid * strength)
            return reference_unet(model.model.diffusion_model, motion_model, sampling.calculate_input(sigma, x), t,
                                  context, frames, control=control)

    cond = eps(env["cond"])
    return cond if cfg == 1.0 else eps(env["negative"]) + cfg * (cond - eps(env["negative"]))


@pytest.mark.parametrize("cfg", [1.0, 7.0], ids=["cond_only", "cond_and_uncond"])
def test_scribble_step_equals_reference_with_hand_placed_keyframes(env, sc, cfg):
    model = env["demo"].tiny_model(0)
    loaded = motion(env, "v3", seed=1)
    images = keyframe_images(2)  # 64x64 = 8 x the 8x8 latent: no resizing
    positive, negative = env["sparsectrl"].apply_sparsectrl(env["cond"], env["negative"], sc["scribble"], images,
                                                            (0, -1), 0.8, 0.0, 1.0)
    animated = apply(env, model, loaded)
    noise, out = one_step(env, animated, positive, negative, cfg)
    _, without = one_step(env, animated, env["cond"], env["negative"], cfg)
    eps = eps_of(model, noise)
    want = expected_eps(env, model, loaded.patcher.model, sc["scribble"].patcher.model, noise,
                        on_first_and_last(images), 0.8, cfg)
    assert (eps(out) - eps(without)).abs().max() > 1e-2  # SparseCtrl changed the step
    # float32 rounding through the 13 residuals on top of the UNet's: measured 1.0e-4 (cfg 1) and 7.2e-4 (cfg 7)
    # at most on one CPU, 4.7e-4 (cfg 1) on an AMD EPYC (the kernels round differently), against a SparseCtrl
    # effect of 0.17 and 0.72 on noise predictions of magnitude ~1.2 and ~2.3
    torch.testing.assert_close(eps(out), want, atol=1e-3 * (abs(cfg) + abs(cfg - 1)), rtol=0)


def test_on_a_model_without_motion_modules_the_batch_is_one_clip(env, sc):
    """SparseCtrl on the plain image model (no Apply Motion Model, so no frame layout from the pack's
    sampling): the latent batch is one clip, keyframes on its first and last frame. The reference is the same
    UNet walk with temporal modules whose output projection is zero (each is the identity)."""
    model = env["demo"].tiny_model(0)
    images = keyframe_images(2, seed=5)
    positive, negative = env["sparsectrl"].apply_sparsectrl(env["cond"], env["negative"], sc["scribble"], images,
                                                            (0, -1), 0.8, 0.0, 1.0)
    noise, out = one_step(env, model, positive, negative, 7.0)
    identity = motion(env, "v3", zero_proj_out=True).patcher.model
    want = expected_eps(env, model, identity, sc["scribble"].patcher.model, noise,
                        on_first_and_last(images), 0.8, 7.0)
    # measured 1.7e-5 at most (no temporal attention to round through) on noise predictions of magnitude ~0.4
    torch.testing.assert_close(eps_of(model, noise)(out), want, atol=1e-4, rtol=0)


def test_keyframe_conditions_are_made_in_the_dtype_the_model_computes_in(env, sc):
    """On a GPU a float16 SparseCtrl computes in float16: its keyframe conditions (cached per latent size,
    device and dtype) come in that dtype, the float32 ones rounded, not float32 tensors under a float16 key."""
    positive, _ = env["sparsectrl"].apply_sparsectrl(env["cond"], env["negative"], sc["scribble"],
                                                     keyframe_images(2, seed=3), (0, -1), 1.0, 0.0, 1.0)
    control = positive[0][1]["control"]
    x = torch.zeros(FRAMES, 4, 8, 8)
    full = control._keyframes(x, torch.float32).clone()
    half = control._keyframes(x, torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half, full.half())
    assert full.shape == (2, 3, 64, 64) and torch.equal(full, keyframe_images(2, seed=3).movedim(-1, 1))


def test_the_nodes_load_from_models_controlnet_and_give_the_reference_step(env, folders):
    """Load SparseCtrl reads a released-layout file from models/controlnet and says what it loaded; Apply
    SparseCtrl checks its percent range, leaves the conditioning alone at strength 0, and otherwise gives the
    step of the block-by-block reference with the keyframes on the frames its indexes name."""
    import hashlib

    import folder_paths

    from ads_helpers import released_sparsectrl
    from animatediff_suite.nodes.sparsectrl_nodes import ApplySparseCtrl, LoadSparseCtrl

    (folders / "controlnet").mkdir()
    folder_paths.add_model_folder_path("controlnet", str(folders / "controlnet"), is_default=True)
    folder_paths.filename_list_cache.pop("controlnet", None)
    path = folders / "controlnet" / "tiny_scribble.ckpt"
    torch.save(released_sparsectrl(env["demo"].tiny_sparsectrl(3, "scribble", torch.nn)), path)
    assert LoadSparseCtrl.validate_inputs("tiny_scribble.ckpt") is True
    out = LoadSparseCtrl.execute("tiny_scribble.ckpt")
    loaded, info = out.result
    assert info == ("tiny_scribble.ckpt: SparseCtrl scribble, 4 down blocks [32, 64, 64, 64], text width 32, up to "
                    f"32 frames per pass, sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:10]}")
    assert out.ui == {"text": [info]}

    widgets = {"keyframe_indexes": "0, -1", "strength": 0.8, "start_percent": 0.8, "end_percent": 0.2}
    assert ApplySparseCtrl.validate_inputs(**widgets) == ("start_percent (0.8) must not be greater than end_percent "
                                                          "(0.2)")
    assert ApplySparseCtrl.validate_inputs(**{**widgets, "end_percent": 0.8}) is True
    images = keyframe_images(2, seed=6)
    unchanged = ApplySparseCtrl.execute(env["cond"], env["negative"], loaded, images, "0, -1", 0.0).result
    assert unchanged[0] is env["cond"] and unchanged[1] is env["negative"]
    positive, negative = ApplySparseCtrl.execute(env["cond"], env["negative"], loaded, images, "0, -1", 0.8, 0.0,
                                                 1.0).result
    model, motion_model = env["demo"].tiny_model(0), motion(env, "v3", seed=1)
    noise, out = one_step(env, apply(env, model, motion_model), positive, negative, 1.0)
    want = expected_eps(env, model, motion_model.patcher.model, loaded.patcher.model, noise,
                        on_first_and_last(images), 0.8, 1.0)
    torch.testing.assert_close(eps_of(model, noise)(out), want, atol=1e-3, rtol=0)  # as the cond-only test above


def test_rgb_keyframes_are_vae_latents_in_model_space(env, sc):
    """Through the Apply SparseCtrl node with its defaults: the images spread over the clip, strength 1."""
    from animatediff_suite.nodes.sparsectrl_nodes import ApplySparseCtrl

    model = env["demo"].tiny_model(0)
    loaded = motion(env, "v3", seed=1)
    vae = env["demo"].tiny_vae(0)
    images = keyframe_images(3, seed=8)
    positive, negative = ApplySparseCtrl.execute(env["cond"], env["negative"], sc["rgb"], images, vae=vae).result
    noise, out = one_step(env, apply(env, model, loaded), positive, negative, 1.0)
    latents = model.model.latent_format.process_in(vae.encode(images))  # 0.18215 x the VAE's mean
    keyed = {frame: latents[k] for k, frame in enumerate((0, 8, 15))}  # 3 images spread over 16 frames
    want = expected_eps(env, model, loaded.patcher.model, sc["rgb"].patcher.model, noise, keyed, 1.0, 1.0)
    torch.testing.assert_close(eps_of(model, noise)(out), want, atol=2e-4, rtol=0)


def test_keyframes_follow_their_frames_into_context_windows(env, sc):
    """40 frames in windows 0-15, 12-27, 24-39 with keyframes on frames 0, 20 and 39: the windowed step
    equals the fused steps of each window sampled as its own 16-frame clip with its one keyframe on the
    window's frame 0, 8 and 15."""
    from animatediff_suite.motion_modules import ContextOptions, context_windows, fuse_windows

    frames, cfg, options = 40, 7.0, ContextOptions(16, 4)
    model = env["demo"].tiny_model(0)
    loaded = motion(env, "v3", seed=1)
    images = keyframe_images(3, seed=9)
    noise = torch.randn(frames, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    windowed = sample_with_noise(env, apply(env, model, loaded, context=options), noise,
                                 *env["sparsectrl"].apply_sparsectrl(env["cond"], env["negative"], sc["scribble"],
                                                                     images, (0, 20, -1), 1.0, 0.0, 1.0), cfg)
    plain = apply(env, model, loaded)
    windows = context_windows(frames, options)
    assert [(w[0], w[-1]) for w in windows] == [(0, 15), (12, 27), (24, 39)]
    parts = []
    for k, (window, index) in enumerate(zip(windows, (0, 8, 15))):
        conditioning = env["sparsectrl"].apply_sparsectrl(env["cond"], env["negative"], sc["scribble"],
                                                          images[k:k + 1], (index,), 1.0, 0.0, 1.0)
        parts.append((window, sample_with_noise(env, plain, noise[window], *conditioning, cfg)))
    eps = eps_of(model, noise)
    torch.testing.assert_close(eps(windowed), eps(fuse_windows(parts, frames, options)), atol=1e-4 * (2 * cfg - 1),
                               rtol=0)


def test_start_percent_past_the_step_leaves_it_unchanged_and_inputs_stay_untouched(env, sc):
    model = apply(env, env["demo"].tiny_model(0), motion(env, "v3", seed=1))
    images = keyframe_images(2)
    before = [dict(entry[1]) for entry in env["cond"]]
    late = env["sparsectrl"].apply_sparsectrl(env["cond"], env["negative"], sc["scribble"], images, None, 1.0, 0.5, 1.0)
    assert [dict(entry[1]) for entry in env["cond"]] == before and "control" not in env["cond"][0][1]
    _, out = one_step(env, model, *late, 7.0)
    _, without = one_step(env, model, env["cond"], env["negative"], 7.0)
    assert torch.equal(out, without)
    control = late[0][0][1]["control"]
    assert control is late[1][0][1]["control"]  # one object for both: cond and uncond batch together
    assert control.encoded == {} and control.timestep_range is None  # cleaned up after sampling


def test_chains_after_a_native_controlnet(env, sc):
    """A ControlNet applied first stays in the chain: removing SparseCtrl's effect (strength 1 vs the chain
    without it) leaves exactly the ControlNet's step."""
    model = apply(env, env["demo"].tiny_model(0), motion(env, "v3", seed=1))
    hints = keyframe_images(1, seed=11)
    with_cn = env["nodes"].ControlNetApplyAdvanced().apply_controlnet(env["cond"], env["negative"],
                                                                      env["demo"].tiny_controlnet(7), hints, 0.9, 0.0, 1.0)
    chained = env["sparsectrl"].apply_sparsectrl(*with_cn, sc["scribble"], keyframe_images(2), None, 1.0, 0.0, 1.0)
    assert chained[0][0][1]["control"].previous_controlnet is with_cn[0][0][1]["control"]
    _, both = one_step(env, model, *chained, 7.0)
    _, cn_only = one_step(env, model, *with_cn, 7.0)
    _, sc_only = one_step(env, model, *env["sparsectrl"].apply_sparsectrl(
        env["cond"], env["negative"], sc["scribble"], keyframe_images(2), None, 1.0, 0.0, 1.0), 7.0)
    assert (both - cn_only).abs().max() > 1e-3 and (both - sc_only).abs().max() > 1e-3


def test_bad_inputs_are_named(env, sc):
    from animatediff_suite.motion_modules import MotionModelError

    apply_sc = env["sparsectrl"].apply_sparsectrl
    with pytest.raises(MotionModelError, match="'tiny rgb' is an RGB SparseCtrl: its keyframes go through the VAE"):
        apply_sc(env["cond"], env["negative"], sc["rgb"], keyframe_images(1), None, 1.0, 0.0, 1.0)
    with pytest.raises(MotionModelError, match=r"2 keyframe indexes \[0, 4\] for 3 images"):
        apply_sc(env["cond"], env["negative"], sc["scribble"], keyframe_images(3), (0, 4), 1.0, 0.0, 1.0)
    with pytest.raises(MotionModelError, match=r"expected whole frame numbers separated by commas"):
        env["sparsectrl"].parse_indexes("0, last")
    assert env["sparsectrl"].parse_indexes(" 0; 8 ,-1 ") == (0, 8, -1) and env["sparsectrl"].parse_indexes(" ") is None
    far = apply_sc(env["cond"], env["negative"], sc["scribble"], keyframe_images(2), (0, 20), 1.0, 0.0, 1.0)
    model = apply(env, env["demo"].tiny_model(0), motion(env, "v3", seed=1))
    with pytest.raises(MotionModelError, match=r"Apply SparseCtrl \('tiny scribble'\): keyframe index 20 is outside "
                                               r"a clip of 16 frames"):
        one_step(env, model, *far, 7.0)

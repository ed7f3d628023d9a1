"""ComfyUI tier, in-process: the Semantic Motion Predictor's attn2 patches in a real UNet (tiny models): a
sampling step against a reference patch written here from eq. 6, strength 0, context windows, the nodes
(also loading from the model folder), and clear errors for a predictor that does not fit."""

from __future__ import annotations

import math

import pytest
import torch

from comfy_helpers import FRAMES, apply, eps_of, motion, sample_with_noise

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def smp(env):
    from animatediff_suite.motion_modules.motion_predictor import MotionPredictor, PredictorSpec
    from animatediff_suite.nodes import motion_predictor_patch as patch

    model = env["demo"].tiny_model(0)
    layers = tuple(sorted(patch.cross_attention_layers(model).items()))
    spec = PredictorSpec(image_dim=24, layers=layers, hidden=16, depth=2, heads=4, tokens=2, token_dim=8)
    predictor = MotionPredictor(spec)
    env["demo"].seeded_fill_(predictor, 9, gain=0.5)  # proj_out too: P is more than the interpolation
    vision = env["demo"].tiny_clip_vision()
    gen = torch.Generator().manual_seed(10)
    start, end = torch.rand(1, 48, 48, 3, generator=gen), torch.rand(1, 48, 48, 3, generator=gen)
    return dict(patch=patch, loaded=patch.wrap_predictor(predictor.eval().requires_grad_(False), "tiny smp"),
                layers=layers, vision=vision, start=start, end=end, model=model)


def eq6_reference(q, k, v, k2, v2, heads, strength):
    """Eq. 6 written out per head: scores over [text keys, extra keys], the extra ones' weights times strength."""
    b, n, inner = q.shape
    d = inner // heads
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2)  # noqa: E731
    scores = split(q) @ torch.cat([split(k), split(k2)], dim=2).transpose(-1, -2) / math.sqrt(d)
    weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    weights[..., k.shape[1]:] *= strength
    weights = weights / weights.sum(dim=-1, keepdim=True)
    out = weights @ torch.cat([split(v), split(v2)], dim=2)
    return out.transpose(1, 2).reshape(b, n, inner)


def reference_model(model, smp, strength, frames):
    """``model`` with attn2 patches written here: P from the core's predict/frame_tokens once for the clip,
    each row's frame as row % frames (one clip, no windows), eq. 6 as above."""
    predictor = smp["loaded"].patcher.model
    with torch.no_grad():
        tokens = predictor.frame_tokens(predictor.predict(*embeddings(smp), frames)[0])
    patched = model.clone()
    for layer, _ in smp["layers"]:
        kv = predictor.kv["_".join(map(str, layer))]

        def replace(q, k, v, extra, kv=kv):
            rows = tokens[torch.arange(q.shape[0]) % frames]
            return eq6_reference(q, k, v, kv.to_k(rows), kv.to_v(rows), extra["n_heads"], strength)
        patched.set_model_attn2_replace(replace, *layer)
    return patched


def noise_of(frames, seed=5):
    return torch.randn(frames, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_layers_are_the_tiny_unets_sixteen_cross_attentions(smp):
    # the tiny UNet's transformer_depth_output [0, 0, 0, 1 x 9] is consumed from its end: output blocks 0-8
    assert smp["layers"] == tuple(sorted(
        [(("input", n, 0), 32 if n < 3 else 64) for n in (1, 2, 4, 5, 7, 8)] + [(("middle", 0, 0), 64)]
        + [(("output", n, 0), 64) for n in range(9)]))


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_step_equals_eq_6_reference(env, smp, strength):
    animated = apply(env, smp["model"], motion(env, "v3", seed=1))
    patched = smp["patch"].patch_model(animated, smp["loaded"], *embeddings(smp), strength)
    noise, cfg = noise_of(FRAMES), 7.0
    out = sample_with_noise(env, patched, noise, env["cond"], env["negative"], cfg)
    want = sample_with_noise(env, reference_model(animated, smp, strength, FRAMES), noise, env["cond"], env["negative"], cfg)
    plain = sample_with_noise(env, animated, noise, env["cond"], env["negative"], cfg)
    eps = eps_of(smp["model"], noise)
    assert (eps(out) - eps(plain)).abs().max() > 1e-3
    torch.testing.assert_close(eps(out), eps(want), atol=1e-4 * (2 * cfg - 1), rtol=0)


def test_load_node_reads_the_predictor_from_its_folder(smp, folders):
    import hashlib

    from animatediff_suite.motion_modules.motion_predictor import save_predictor
    from animatediff_suite.nodes.motion_predictor_nodes import LoadMotionPredictor

    saved = smp["loaded"].patcher.model
    path = folders / "animatediff_motion_predictor" / "tiny_smp.safetensors"
    path.parent.mkdir()
    save_predictor(saved, str(path))
    assert LoadMotionPredictor.validate_inputs("tiny_smp.safetensors") is True
    out = LoadMotionPredictor.execute("tiny_smp.safetensors")
    loaded, info = out.result
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert info == ("tiny_smp.safetensors: Semantic Motion Predictor: 2 layers x 16 (4 heads), image embeddings of 24, "
                    f"2 tokens per frame into 16 cross-attention layers, sha256 {digest}")
    assert out.ui == {"text": [info]}
    weights = loaded.patcher.model.state_dict()
    assert weights.keys() == saved.state_dict().keys()
    assert all(torch.equal(weights[key], value) for key, value in saved.state_dict().items())


def embeddings(smp):
    return (smp["vision"].encode_image(smp["start"]).image_embeds.float(),
            smp["vision"].encode_image(smp["end"]).image_embeds.float())


def test_strength_zero_is_the_plain_model_and_the_input_is_untouched(env, smp):
    model = smp["model"]
    before = dict(model.model_options.get("transformer_options", {}).get("patches_replace", {}))
    patched = smp["patch"].patch_model(model, smp["loaded"], *embeddings(smp), 0.0)
    assert model.model_options.get("transformer_options", {}).get("patches_replace", {}) == before
    noise = noise_of(FRAMES)
    eps = eps_of(model, noise)
    a, b = (eps(sample_with_noise(env, m, noise, env["cond"], env["negative"])) for m in (patched, model))
    # ComfyUI's attention kernel against the patch's SDPA, through 16 layers: measured 3.4e-5
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_windows_give_each_frame_its_own_tokens(env, smp):
    """40 frames in windows of 16: the predictor's P is the 40-frame clip's, each window's rows get their
    frames' tokens (the reference maps rows to frames from the window list written here)."""
    from animatediff_suite.motion_modules import ContextOptions, context_windows, fuse_windows

    frames, options = 40, ContextOptions(16, 4)
    loaded_motion = motion(env, "v3", seed=1)
    windowed = apply(env, smp["model"], loaded_motion, context=options)
    out = sample_with_noise(env, smp["patch"].patch_model(windowed, smp["loaded"], *embeddings(smp), 1.0),
                            noise_of(frames), env["cond"], env["negative"], 7.0)
    predictor = smp["loaded"].patcher.model
    with torch.no_grad():
        tokens = predictor.frame_tokens(predictor.predict(*embeddings(smp), frames)[0])
    plain = apply(env, smp["model"], loaded_motion)
    parts = []
    for window in context_windows(frames, options):
        reference = plain.clone()
        for layer, _ in smp["layers"]:
            kv = predictor.kv["_".join(map(str, layer))]

            def replace(q, k, v, extra, kv=kv, window=window):
                rows = tokens[torch.as_tensor(window)[torch.arange(q.shape[0]) % len(window)]]
                return eq6_reference(q, k, v, kv.to_k(rows), kv.to_v(rows), extra["n_heads"], 1.0)
            reference.set_model_attn2_replace(replace, *layer)
        parts.append((window, sample_with_noise(env, reference, noise_of(frames)[window], env["cond"],
                                                env["negative"], 7.0)))
    eps = eps_of(smp["model"], noise_of(frames))
    # measured 5.5e-4 (the fused windows' rounding at cfg 7); window-relative frames instead give 0.96
    torch.testing.assert_close(eps(out), eps(fuse_windows(parts, frames, options)), atol=1e-4 * 13, rtol=0)


def test_a_predictor_that_does_not_fit_is_refused(env, smp):
    from animatediff_suite.motion_modules import MotionModelError
    from animatediff_suite.motion_modules.motion_predictor import MotionPredictor, PredictorSpec

    patch, model = smp["patch"], smp["model"]
    start, end = embeddings(smp)
    with pytest.raises(MotionModelError, match="image embeddings of 12 features but this predictor was trained on 24"):
        patch.patch_model(model, smp["loaded"], start[:, :12], end[:, :12], 1.0)
    sd15 = patch.wrap_predictor(MotionPredictor(PredictorSpec(24, PredictorSpec.paper().layers, 16, 1, 4, 2, 8)), "sd15")
    with pytest.raises(MotionModelError, match=r"layers this model lacks or has at another width: \('input', 1, 0\) "
                                               r"\(width 32, predictor 320\)"):
        patch.patch_model(model, sd15, start, end, 1.0)
    other = model.clone()
    other.set_model_attn2_replace(lambda q, k, v, extra: q, "input", 1, 0)
    with pytest.raises(MotionModelError, match=r"another node already replaces the cross-attention of layers "
                                               r"\[\('input', 1, 0\)\]"):
        patch.patch_model(other, smp["loaded"], start, end, 1.0)


def test_training_state_gives_each_clip_of_a_batch_its_own_pair(env, smp):
    """Training batches clips with different start/end images: two clips of 8 frames in one batch
    (frames_per_clip) with a pair each equal each clip sampled alone with its pair through Apply's state."""
    patch = smp["patch"]
    frames = 8
    gen = torch.Generator().manual_seed(11)
    other_start, other_end = torch.rand(1, 48, 48, 3, generator=gen), torch.rand(1, 48, 48, 3, generator=gen)
    encode = smp["vision"].encode_image
    pairs = [embeddings(smp), (encode(other_start).image_embeds.float(), encode(other_end).image_embeds.float())]
    loaded_motion = motion(env, "v3", seed=1)
    state = patch.TrainingState(smp["loaded"])
    with torch.no_grad():
        state.set_pairs(torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]), frames)
    batched = patch.patch_with_state(apply(env, smp["model"], loaded_motion, frames_per_clip=frames), state, "test")
    noise = noise_of(2 * frames)
    out = sample_with_noise(env, batched, noise, env["cond"], env["negative"], 7.0)
    single = apply(env, smp["model"], loaded_motion)
    for clip, (start, end) in enumerate(pairs):
        rows = slice(clip * frames, (clip + 1) * frames)
        alone = sample_with_noise(env, patch.patch_model(single, smp["loaded"], start, end, 1.0), noise[rows],
                                  env["cond"], env["negative"], 7.0)
        eps = eps_of(smp["model"], noise[rows])
        torch.testing.assert_close(eps(out[rows]), eps(alone), atol=1e-4 * 13, rtol=0)
    swapped = sample_with_noise(env, patch.patch_model(single, smp["loaded"], *pairs[1], 1.0), noise[:frames],
                                env["cond"], env["negative"], 7.0)
    assert (eps_of(smp["model"], noise[:frames])(out[:frames]) - eps_of(smp["model"], noise[:frames])(swapped)).abs().max() > 1e-3

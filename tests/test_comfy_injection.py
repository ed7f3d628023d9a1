"""ComfyUI tier, in-process: motion modules in a real ComfyUI UNet (tiny models): loading, the
patched UNet against the core reference, v1 norms, SDXL, schedules, adapters, clear errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest
import torch

from ads_helpers import motion_lora_state_dict, raised_message, tiny_domain_adapter_state_dict
from ads_package import ROOT
from comfy_helpers import FRAMES, ValueReads, apply, ksample, motion, reads_per_step, reference_unet

pytestmark = pytest.mark.comfyui


def test_pack_loads_like_comfyui_loads_it(env):
    nodes = env["nodes"]
    assert asyncio.run(nodes.load_custom_node(ROOT)) is True
    expected = {"ADS_LoadMotionModel", "ADS_LoadMotionLora", "ADS_ApplyMotionModel", "ADS_TinyDemoModels",
                "ADS_ContextOptions", "ADS_ContextScheduleImage", "ADS_PromptTravel", "ADS_FreeInit",
                "ADS_TrainMotionLora", "ADS_TrainMotion", "ADS_CameraMotionClips", "ADS_ConsistentSelfAttention",
                "ADS_StoryPrompts", "ADS_StorySampler", "ADS_ComicPage", "ADS_StoryToVideo", "ADS_LoadSparseCtrl",
                "ADS_ApplySparseCtrl", "ADS_LoadMotionPredictor", "ADS_ApplyMotionPredictor"}
    assert os.path.dirname(nodes.__file__) != ROOT
    ours = [k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith("ADS_")]
    assert set(ours) == expected
    for node_id in ours:
        node = nodes.NODE_CLASS_MAPPINGS[node_id]
        assert node.CATEGORY.startswith("AnimateDiff Suite")
        for section, inputs in node.INPUT_TYPES().items():
            if section == "hidden":
                continue
            for name, spec in inputs.items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_zero_proj_out_is_bit_identical_frame_by_frame(env):
    model = env["demo"].tiny_model(0)
    plain = ksample(env, model)
    animated = ksample(env, apply(env, model, motion(env, zero_proj_out=True)))
    for frame in range(FRAMES):
        assert torch.equal(animated[frame], plain[frame]), frame


@pytest.mark.parametrize("version", ["v3", "v2", "v1"])
@pytest.mark.parametrize("cfg", [1.0, 7.0], ids=["cond_only", "cond_and_uncond"])
def test_patched_unet_equals_core_reference(env, version, cfg):
    """One euler step returns the x0 prediction; recompute it with the reference forward."""
    model = env["demo"].tiny_model(0)
    loaded = motion(env, version, seed=1)
    out = ksample(env, apply(env, model, loaded), cfg=cfg, steps=1)
    plain = ksample(env, model, cfg=cfg, steps=1)  # also unloads the patched model: the UNet is ejected again
    assert_one_step_equals_reference(env, model, loaded.patcher.model, out, plain, cfg, spanning=version == "v1")


def assert_one_step_equals_reference(env, model, motion_model, out, plain, cfg, spanning=False):
    """One euler step (seed 5) returned ``out``, the x0 prediction; recompute it with the block-by-block
    reference forward of ``motion_model`` and compare the noise predictions."""
    sampling = model.get_model_object("model_sampling")
    sigma = sampling.sigma_max.reshape(1)
    noise = env["sample"].prepare_noise(torch.zeros(FRAMES, 4, 8, 8), 5)
    x = sampling.noise_scaling(sigma, noise, torch.zeros_like(noise), max_denoise=True)
    t = sampling.timestep(sigma).float().expand(FRAMES)
    unet = model.model.diffusion_model

    def x0(conditioning):
        context = conditioning[0][0].expand(FRAMES, -1, -1)
        with torch.no_grad():
            eps = reference_unet(unet, motion_model, sampling.calculate_input(sigma, x), t, context,
                                 FRAMES, spanning=spanning)
        return sampling.calculate_denoised(sigma, eps, x)

    expected = x0(env["cond"])
    if cfg != 1.0:
        uncond = x0(env["negative"])
        expected = uncond + cfg * (expected - uncond)
    got = model.model.latent_format.process_in(out)
    assert (got - model.model.latent_format.process_in(plain)).abs().max() > 1e-2
    # compare the noise predictions, i.e. the UNet outputs: eps = (x - x0) / sigma. With guidance,
    # eps = u + cfg (c - u), so a 1e-4 error per UNet output can grow to (|cfg| + |cfg - 1|) 1e-4.
    tolerance = 1e-4 * (abs(cfg) + abs(cfg - 1))
    torch.testing.assert_close((x - got) / sigma, (x - expected) / sigma, atol=tolerance, rtol=0)


# Scales where the tiny random UNet is well conditioned: a 1e-6 change of the to_q weights moves its noise
# prediction by 4e-6 at scale 1, 1e-4 at 0.4 and 1.2e-2 at 0.1 (measured), so a 1e-4 comparison below
# about 0.5 would test float rounding, not the maths.
@pytest.mark.parametrize("strength, scale", [(0.7, 1.0), (-1.3, 1.0), (None, 1.6), (None, 0.6)])
def test_motion_lora_strength_and_motion_scale_through_ksampler_equal_merged_weights(env, strength, scale):
    """The real KSampler with a MotionLoRA at ``strength`` (None: no LoRA) and ``motion_scale`` equals the
    reference forward of a copy of the motion model whose weights are merged by hand: the original LoRA format's
    W += strength * up @ down on each target (``...processor.to_q_lora`` -> ``...to_q.weight``,
    ``to_out_lora`` -> ``to_out.0.weight``), and ``to_q`` multiplied by the scale, which multiplies
    q k^T, i.e. the softmax scale."""
    import copy

    from animatediff_suite.motion_modules import load_lora

    model = env["demo"].tiny_model(0)
    loaded = motion(env, "v2", seed=1)
    lora_weights = motion_lora_state_dict(loaded.spec, seed=4)
    loras = () if strength is None else (
        env["injection"].MotionLoraEntry("zoom", load_lora(lora_weights, kind="MotionLoRA"), strength),)
    merged = copy.deepcopy(loaded.patcher.model)  # before sampling: a loaded patcher holds patched weights
    # through the node, as a graph wires it (Load MotionLoRA's list into Apply Motion Model)
    patched = env["motion_nodes"].ApplyMotionModel.execute(
        model, loaded, motion_lora=list(loras) or None, motion_scale=scale, beta_schedule="use existing").result[0]
    out = ksample(env, patched, cfg=1.0, steps=1)
    plain = ksample(env, model, cfg=1.0, steps=1)
    weights = merged.state_dict()
    with torch.no_grad():
        for key, down in lora_weights.items() if loras else ():
            if key.endswith("_lora.down.weight"):
                base, proj = key[:-len("_lora.down.weight")].rsplit(".processor.", 1)
                target = f"{base}.{proj}.0.weight" if proj == "to_out" else f"{base}.{proj}.weight"
                weights[target] += strength * lora_weights[key.replace(".down.", ".up.")] @ down
        for key, weight in weights.items():
            if key.endswith(".to_q.weight"):
                weight *= scale
    assert_one_step_equals_reference(env, model, merged, out, plain, 1.0)


def test_v1_norms_really_span_frames(env):
    model = env["demo"].tiny_model(0)
    patched = apply(env, model, motion(env, "v1", seed=1))
    spanning = ksample(env, patched, steps=1)
    per_frame = patched.clone()
    norm_paths = [p for p in per_frame.object_patches if p.startswith("diffusion_model.")]
    assert len(norm_paths) == 22 + 1  # 8 + 2 + 12 ResBlock stand-ins in the tiny UNet, plus out.0
    for path in norm_paths:
        per_frame.object_patches.pop(path)
    assert (ksample(env, per_frame, steps=1) - spanning).abs().max() > 1e-3


def test_a_v1_resblock_stand_in_called_outside_the_patch_says_so(env):
    """The stand-ins only run through the pack's forward_timestep_embed patch (which gives them the frame count);
    a tool that rebuilds the model and calls one directly gets this sentence, not per-frame norms in silence."""
    from animatediff_suite.motion_modules import MotionModelError

    patched = apply(env, env["demo"].tiny_model(0), motion(env, "v1", seed=1))
    stand_in = patched.object_patches["diffusion_model.input_blocks.1.0"]
    message = raised_message(lambda: stand_in(torch.zeros(2, 32, 8, 8), torch.zeros(2, 128)), MotionModelError)
    assert message == ("a v1 frame-spanning ResBlock was called without AnimateDiff Suite's forward_timestep_embed "
                       "patch (the model was rebuilt by another tool?)")


@pytest.mark.parametrize("by_keyword", [False, True])
def test_v1_output_norm_spans_the_frames_of_the_calls_layout(env, by_keyword):
    """The DIFFUSION_MODEL wrapper around v1's output norm reads the call's layout from transformer_options,
    given positionally (ComfyUI v0.3.64's UNetModel.forward) or by keyword, for the call only."""
    import comfy.patcher_extension

    from animatediff_suite.motion_modules.layout import FrameLayout
    from animatediff_suite.nodes.context_sampling import LAYOUT_KEY

    patched = apply(env, env["demo"].tiny_model(0), motion(env, "v1", seed=1))
    out_norm = patched.object_patches["diffusion_model.out.0"]
    [wrapper] = [w for key, ws in patched.wrappers[comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL].items()
                 if key.endswith(".v1_norms") for w in ws]
    seen = []
    options = {LAYOUT_KEY: FrameLayout.whole(2, 6)}
    args = ("t", "context", None, None) + (() if by_keyword else (options,))
    kwargs = {"transformer_options": options} if by_keyword else {}
    assert wrapper(lambda *a, **k: seen.append((a, k, out_norm.frames)) or "out", "x", *args, **kwargs) == "out"
    assert seen == [(("x", *args), kwargs, 6)] and out_norm.frames is None


def test_sdxl_motion_on_sd15_model_is_a_clear_error(env):
    import comfy.model_patcher

    from animatediff_suite.motion_modules import MotionModel, MotionModelError, MotionSpec

    model = env["demo"].tiny_model(0)
    sdxl = MotionModel(MotionSpec.standard("sdxl_beta", (32, 64, 64)))
    loaded = env["injection"].LoadedMotionModel(
        "mm_sdxl_v10_beta.safetensors", comfy.model_patcher.ModelPatcher(sdxl, torch.device("cpu"), torch.device("cpu")))
    with pytest.raises(MotionModelError, match=r"'mm_sdxl_v10_beta.safetensors' is SDXL \(3 down blocks\) "
                                               r"but the model is SD15 \(4 UNet levels\)"):
        apply(env, model, loaded)
    wide = MotionModel(MotionSpec.standard("v3", (320, 640, 1280, 1280)), operations=torch.nn)
    loaded = env["injection"].LoadedMotionModel(
        "v3_sd15_mm.ckpt", comfy.model_patcher.ModelPatcher(wide, torch.device("cpu"), torch.device("cpu")))
    with pytest.raises(MotionModelError, match="expects 320 channels at down_blocks.0 but the model"):
        apply(env, model, loaded)


def test_latents_the_sampler_cannot_use_are_refused_with_the_whole_sentence(env):
    """Checked before sampling (the pack's OUTER_SAMPLE wrapper): a latent with NaN, and a latent of the
    wrong channel count, also one given as a 2-D (batch, channels) tensor by some other node."""
    from animatediff_suite.motion_modules import MotionModelError

    model = apply(env, env["demo"].tiny_model(0), motion(env, "v3"))

    def refused(samples):
        return raised_message(lambda: env["nodes"].common_ksampler(model, 0, 1, 7.0, "euler", "normal", env["cond"],
                                                                   env["negative"], {"samples": samples}),
                              MotionModelError)

    bad = torch.ones(FRAMES, 4, 8, 8)
    bad[3, 1, 2, 2] = float("nan")
    assert refused(bad) == ("the latent image given to the sampler contains NaN or Inf values; sampling it would "
                            "give black or noise frames. Fix or replace that input")
    for samples in (torch.ones(FRAMES, 3, 8, 8), torch.ones(FRAMES, 3)):
        assert refused(samples) == ("the latent has 3 channels but this SD15 model works on 4-channel latents "
                                    "(a latent made for another model family?)")


def test_a_clip_longer_than_the_pe_without_context_options_is_refused(env):
    """Stretching the PE is a Context Options choice (stretch_pe); without Context Options a 40-frame batch on a
    32-frame motion model is refused before the first step rather than sampled with stretched positions."""
    from animatediff_suite.motion_modules import MotionModelError

    model = apply(env, env["demo"].tiny_model(0), motion(env, "v3"))
    assert raised_message(lambda: ksample(env, model, frames=40, steps=1), MotionModelError) == (
        "40 frames in one pass, but this motion model's positional encoding covers at most 32 frames; sample at "
        "most 32 frames per pass (a latent batch of at most 32, or context windows that split longer clips), or "
        "stretch the PE (Context Options' stretch_pe)")


def test_motion_scale_and_percent_range(env):
    model = env["demo"].tiny_model(0)
    loaded = motion(env, "v3")
    base = ksample(env, apply(env, model, loaded))
    assert (ksample(env, apply(env, model, loaded, scale=2.0)) - base).abs().max() > 1e-3
    # a range that excludes every step is exactly the plain model
    off = apply(env, model, loaded, start_percent=1.0, end_percent=1.0)
    assert torch.equal(ksample(env, off, steps=2), ksample(env, model, steps=2))


@pytest.mark.parametrize("motion_first", [True, False])
def test_a_percent_range_between_the_extremes_runs_motion_on_exactly_its_steps(env, motion_first):
    """4 euler steps with motion on for the first half only (end_percent p) or the second half only
    (start_percent p), where p's sigma lies between the 2nd and 3rd step's sigmas: a step runs the motion
    modules when end sigma <= its sigma <= start sigma. Expected: the stock two-stage chain (KSamplerAdvanced's
    way: steps 0-1 with leftover noise, then steps 2-3 from there without new noise) with the motion model for
    one stage and the plain model for the other."""
    import comfy.samplers

    model = env["demo"].tiny_model(0)
    loaded = motion(env, "v3")
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", 4)
    grid = [p / 100 for p in range(1, 100)]
    between = [p for p in grid if sigmas[2] * 1.05 < sampling.percent_to_sigma(p) < sigmas[1] * 0.95]
    assert between, sigmas
    p = between[len(between) // 2]
    ranged = apply(env, model, loaded, **({"end_percent": p} if motion_first else {"start_percent": p}))
    with_motion = apply(env, model, loaded)
    first, second = (with_motion, model) if motion_first else (model, with_motion)

    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(FRAMES, 4, 8, 8, generator=gen)
    latent = torch.zeros_like(noise)

    def run(patcher, noise, latent, start, last):
        return env["sample"].sample(patcher, noise, 4, 7.0, "euler", "normal", env["cond"], env["negative"], latent,
                                    start_step=start, last_step=last, force_full_denoise=last == 4, disable_pbar=True)

    got = run(ranged, noise, latent, None, None)
    halfway = run(first, noise, latent, 0, 2)
    expected = run(second, torch.zeros_like(noise), halfway, 2, 4)
    # latents of magnitude ~100: float32 rounding, which depends on the CPU's kernels (up to 1.6e-4 measured on
    # an AMD EPYC, under 1e-4 elsewhere); a step run with the wrong model moves them by more than 1e-2 (below)
    torch.testing.assert_close(got, expected, atol=1e-5 * float(expected.abs().max()), rtol=0)
    assert (got - run(with_motion, noise, latent, None, None)).abs().max() > 1e-2  # both stages matter here
    assert (got - run(model, noise, latent, None, None)).abs().max() > 1e-2


def test_beta_schedules(env):
    import comfy.model_sampling

    model = env["demo"].tiny_model(0)
    loaded = motion(env, "v3")
    existing = model.get_model_object("model_sampling")
    assert apply(env, model, loaded).get_model_object("model_sampling") is existing
    auto = apply(env, model, loaded, schedule="auto").get_model_object("model_sampling")
    betas = torch.linspace(0.00085, 0.012, 1000, dtype=torch.float64)  # diffusers "linear"
    expected = ((1 - torch.cumprod(1 - betas, 0)) / torch.cumprod(1 - betas, 0)) ** 0.5
    torch.testing.assert_close(auto.sigmas.double(), expected, rtol=1e-5, atol=0)
    assert isinstance(auto, comfy.model_sampling.EPS)
    lcm = apply(env, model, loaded, schedule="lcm (AnimateLCM)").get_model_object("model_sampling")
    assert {"ModelSamplingDiscreteDistilled", "LCM"} <= {c.__name__ for c in type(lcm).__mro__}
    with pytest.raises(ValueError, match="unknown beta schedule 'cosmic'"):
        env["beta_schedules"].resolve_schedule("cosmic", loaded.spec)


def test_lcm_schedule_on_a_comfyui_without_lcm_sampling_is_a_clear_error(env, monkeypatch):
    """A ComfyUI whose comfy_extras has no LCM sampling classes (and comfy.model_sampling none either, as in
    v0.3.64): the lcm schedule is refused with the whole sentence, at Apply, before anything is patched."""
    import sys

    import comfy.model_sampling

    assert not hasattr(comfy.model_sampling, "LCM")
    monkeypatch.setitem(sys.modules, "comfy_extras.nodes_model_advanced", None)  # import raises ImportError
    model = env["demo"].tiny_model(0)
    message = raised_message(lambda: apply(env, model, motion(env, "v3"), schedule="lcm (AnimateLCM)"))
    assert message == ("the lcm schedule needs ComfyUI's LCM sampling classes, which this ComfyUI version does not "
                       "provide; pick another beta_schedule")
    assert model.object_patches == {} and model.model_options.get("model_function_wrapper") is None


def test_domain_adapter_is_applied_exactly(env, tmp_path):
    import comfy.model_management as mm

    from animatediff_suite.motion_modules import load_domain_adapter

    model = env["demo"].tiny_model(0)
    adapter_sd = tiny_domain_adapter_state_dict(seed=9)
    adapter = load_domain_adapter(adapter_sd)
    patched = apply(env, model, motion(env, "v3"), domain_adapter=(adapter, 0.7))
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    comfy_key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    before = model.model.state_dict()[comfy_key].clone()
    mm.load_models_gpu([patched])
    up, down = adapter.pairs[key]
    torch.testing.assert_close(patched.model.state_dict()[comfy_key], before + 0.7 * up @ down)
    mm.load_models_gpu([model])
    assert torch.equal(model.model.state_dict()[comfy_key], before)


def test_model_folders_are_registered_under_models_keeping_paths_given_before(folders, monkeypatch):
    """What the pack does at import, run again here: each of its folder names gets models/<name>, after any
    path extra_model_paths.yaml gave it (the fixture's), and the model file extensions; a name nothing gave
    yet gets models/<name> alone. A second run adds nothing."""
    import folder_paths

    from animatediff_suite.nodes import folders as pack_folders

    models = folders / "models"
    monkeypatch.setattr(folder_paths, "models_dir", str(models))
    del folder_paths.folder_names_and_paths["animatediff_motion_predictor"]
    given = {name: folder_paths.get_folder_paths(name) for name in ("animatediff_models", "animatediff_motion_lora")}
    assert all(paths[0] == str(folders / name) for name, paths in given.items())
    for _ in range(2):
        pack_folders.register_folders()
        for name, paths in given.items():
            assert folder_paths.get_folder_paths(name) == [*paths, str(models / name)]
        assert folder_paths.folder_names_and_paths["animatediff_motion_predictor"][0] == [
            str(models / "animatediff_motion_predictor")]
        for name in ("animatediff_models", "animatediff_motion_lora", "animatediff_motion_predictor"):
            extensions = folder_paths.folder_names_and_paths[name][1]
            assert {".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin"} <= extensions


def test_load_motion_model_node_reads_from_the_model_folder(env, tmp_path):
    import folder_paths

    from animatediff_suite.motion_modules import save_motion_model

    folder = tmp_path / "animatediff_models"
    folder.mkdir()
    save_motion_model(env["demo"].tiny_motion_model(3, "v2", operations=torch.nn), folder / "tiny_v2.safetensors")
    folder_paths.add_model_folder_path("animatediff_models", str(folder))
    out = env["motion_nodes"].LoadMotionModel.execute("tiny_v2.safetensors")
    loaded, info = out.result
    assert loaded.spec.version == "v2" and "SD1.5 v2" in info and "32 frames" in info
    import hashlib
    digest = hashlib.sha256((folder / "tiny_v2.safetensors").read_bytes()).hexdigest()
    assert info.endswith(f", sha256 {digest[:10]}")  # the hash a download page shows (Civitai's AutoV2)
    assert out.ui["text"] == [info]
    save_motion_model(env["demo"].tiny_motion_model(4, "v2", operations=torch.nn), folder / "tiny_v2.safetensors")
    os.utime(folder / "tiny_v2.safetensors", ns=(1, 10**18))  # replaced in place: a new mtime, a new hash
    changed = env["motion_nodes"].LoadMotionModel.execute("tiny_v2.safetensors").result[1]
    assert changed.endswith(hashlib.sha256((folder / "tiny_v2.safetensors").read_bytes()).hexdigest()[:10])
    assert changed != info
    model = env["demo"].tiny_model(0)
    patched = env["motion_nodes"].ApplyMotionModel.execute(model, loaded).result[0]
    assert patched is not model and ksample(env, patched).shape == (FRAMES, 4, 8, 8)
    assert env["motion_nodes"].ApplyMotionModel.validate_inputs(start_percent=0.6, end_percent=0.2) != True


@pytest.mark.parametrize("version", ["sdxl_beta", "hotshotxl"])
def test_sdxl_injection_equals_core_reference(env, version):
    """Tiny SDXL (3 levels): the injected UNet equals the block-by-block reference."""
    import comfy.model_management as mm

    model = env["demo"].tiny_model(0, family="SDXL")
    loaded = motion(env, version, seed=2)
    patched = apply(env, model, loaded, schedule="auto")
    unet = model.model.diffusion_model
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(FRAMES, 4, 8, 8, generator=gen)
    t = torch.full((FRAMES,), 700.0)
    context = torch.randn(FRAMES, 77, 32, generator=gen)
    y = torch.randn(FRAMES, unet.label_emb[0][0].in_features, generator=gen)
    from animatediff_suite.motion_modules.layout import FrameLayout
    from animatediff_suite.nodes.context_sampling import LAYOUT_KEY

    options = {**patched.model_options["transformer_options"], "cond_or_uncond": [0],
               "sigmas": torch.tensor([5.0]), LAYOUT_KEY: FrameLayout.whole(1, FRAMES)}
    mm.load_models_gpu([patched, *patched.get_nested_additional_models()])
    with torch.no_grad():
        got = unet(x, t, context=context, y=y, transformer_options=options)
    mm.load_models_gpu([model])  # ejects the motion modules again

    with torch.no_grad():
        expected = reference_unet(unet, loaded.patcher.model, x, t, context, FRAMES, y=y)
        plain = unet(x, t, context=context, y=y)
    assert (got - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert loaded.spec.norm_mode == ("across_frames" if version == "sdxl_beta" else "per_frame")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_motion_weights_run_in_an_fp32_unet(env, dtype, tmp_path):
    """Half/bfloat16 motion weights are cast per layer (ComfyUI's manual_cast ops): no dtype errors."""
    import comfy.model_patcher
    import comfy.ops

    from animatediff_suite.motion_modules import load_motion_model, save_motion_model

    fp32 = motion(env, "v2", seed=1)
    save_motion_model(fp32.patcher.model, tmp_path / "mm.safetensors")
    low = load_motion_model(tmp_path / "mm.safetensors", dtype=dtype, operations=comfy.ops.manual_cast)
    assert {p.dtype for p in low.parameters()} == {dtype}
    loaded = env["injection"].LoadedMotionModel(
        "low precision", comfy.model_patcher.ModelPatcher(low, torch.device("cpu"), torch.device("cpu")))
    model = env["demo"].tiny_model(0)
    reference = ksample(env, apply(env, model, fp32), steps=1)
    got = ksample(env, apply(env, model, loaded), steps=1)
    assert torch.isfinite(got).all()
    # bfloat16 keeps 8 mantissa bits (fp16: 11); the random tiny UNet amplifies rounding noise
    tolerance = {torch.float16: 0.05, torch.bfloat16: 0.15}[dtype]
    assert (got - reference).abs().max() < tolerance * reference.abs().max()


@contextlib.contextmanager
def every_group_norm_spanning(roots, frames):
    """AnimateDiff-Evolved's rule for v1 and SDXL beta, written directly: every GroupNorm of the UNet and
    of the motion model normalises over all frames of the clip (5D inputs already span them)."""
    import torch.nn.functional as F
    from einops import rearrange

    norms = [m for root in roots for m in root.modules() if isinstance(m, torch.nn.GroupNorm)]

    def spanning(norm):
        def forward(x):
            if x.ndim == 5:
                return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
            y = F.group_norm(rearrange(x, "(b f) c h w -> b c f h w", f=frames), norm.num_groups, norm.weight,
                             norm.bias, norm.eps)
            return rearrange(y, "b c f h w -> (b f) c h w")
        return forward

    for norm in norms:
        norm.forward = spanning(norm)
    try:
        yield len(norms)
    finally:
        for norm in norms:
            del norm.forward


@pytest.mark.parametrize("version", ["v1", "sdxl_beta"])
def test_evolved_norm_semantics_spans_every_group_norm(env, version):
    """norm_semantics AnimateDiff-Evolved: the injected UNet equals the block-by-block reference with every
    GroupNorm spanning the frames; it differs from the original semantics."""
    import comfy.model_management as mm

    from animatediff_suite.motion_modules.layout import FrameLayout
    from animatediff_suite.nodes.context_sampling import LAYOUT_KEY

    family = "SDXL" if version == "sdxl_beta" else "SD1.5"
    model = env["demo"].tiny_model(0, family=family)
    loaded = motion(env, version, seed=2)
    unet = model.model.diffusion_model
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(FRAMES, 4, 8, 8, generator=gen)
    t = torch.full((FRAMES,), 700.0)
    context = torch.randn(FRAMES, 77, 32, generator=gen)
    y = torch.randn(FRAMES, unet.label_emb[0][0].in_features, generator=gen) if family == "SDXL" else None

    def run(patched):  # the UNet call as sampling makes it: the patcher's wrappers in transformer_options
        options = {**patched.model_options["transformer_options"], "cond_or_uncond": [0], "wrappers": patched.wrappers,
                   "sigmas": torch.tensor([5.0]), LAYOUT_KEY: FrameLayout.whole(1, FRAMES)}
        mm.load_models_gpu([patched, *patched.get_nested_additional_models()])
        with torch.no_grad():
            out = unet(x, t, context=context, y=y, transformer_options=options)
        mm.load_models_gpu([model])  # ejects the motion modules and stand-ins again
        return out

    evolved = run(apply(env, model, loaded, norm_semantics="AnimateDiff-Evolved"))
    original = run(apply(env, model, loaded))
    with torch.no_grad(), every_group_norm_spanning([unet, loaded.patcher.model], FRAMES) as count:
        expected = reference_unet(unet, loaded.patcher.model, x, t, context, FRAMES, y=y)
    assert count > 20
    torch.testing.assert_close(evolved, expected, atol=1e-4, rtol=0)
    assert (evolved - original).abs().max() > 1e-3
    assert not any(type(m).__name__.startswith("FrameSpanning") for m in unet.modules())


def test_evolved_norm_semantics_leaves_other_versions_unchanged(env):
    model = env["demo"].tiny_model(0)
    loaded = motion(env, "v2")
    original = ksample(env, apply(env, model, loaded))
    assert torch.equal(ksample(env, apply(env, model, loaded, norm_semantics="AnimateDiff-Evolved")), original)
    with pytest.raises(env["injection"].MotionModelError, match="unknown norm_semantics 'both'"):
        apply(env, model, loaded, norm_semantics="both")


@pytest.mark.parametrize("case", ["v2", "v1", "percent range", "motion_attention windows", "whole_model windows"])
def test_animating_adds_no_value_read_inside_a_unet_call_and_at_most_one_per_step(env, case):
    """Each of a UNet call's ~21 motion modules read the sigma (Apply's percent range) before: 21 waits per
    step on a GPU. Now the range and the windows' step index are read once per step, before the UNet call,
    and the whole range (0%..100%) not at all. Counted on the CPU: reads per step = (reads of a 4-step
    sample - reads of a 2-step one) / 2, the animated model's less the plain model's (ComfyUI's own reads
    and the once-per-sample input checks cancel); reads inside the UNet's forward must be none."""
    import comfy.patcher_extension

    from animatediff_suite.motion_modules import ContextOptions

    frames = 40 if "windows" in case else FRAMES
    kwargs = {"percent range": {"start_percent": 0.1, "end_percent": 0.9},
              "motion_attention windows": {"context": ContextOptions(16, 4, scope="motion_attention")},
              "whole_model windows": {"context": ContextOptions(16, 4)}}.get(case, {})
    extra = {"v2": 0, "v1": 0, "percent range": 1, "motion_attention windows": 1, "whole_model windows": 1}[case]
    model = env["demo"].tiny_model(0)
    animated = apply(env, model, motion(env, "v1" if case == "v1" else "v2"), **kwargs)
    inside = ValueReads()

    def in_unet(executor, *args, **kwargs):
        with inside.mode:
            return executor(*args, **kwargs)

    animated.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test.reads", in_unet)

    per_step = {name: reads_per_step(lambda steps: ksample(env, patcher, steps=steps, frames=frames))
                for name, patcher in (("animated", animated), ("plain", model))}
    assert per_step["animated"] - per_step["plain"] == extra, per_step
    assert inside.count == 0

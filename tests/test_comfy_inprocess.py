"""ComfyUI tier, in-process: the nodes and the injection inside a real ComfyUI, with tiny models.

Skipped (with the reason) when no ComfyUI is found; see tests/comfy_env.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from ads_helpers import motion_lora_state_dict, tiny_domain_adapter_state_dict
from ads_package import ROOT

pytestmark = pytest.mark.comfyui
FRAMES = 16


@pytest.fixture(scope="module")
def env(comfyui):
    """Modules and tiny models shared by the tests of this file."""
    import comfy.model_management as mm
    import comfy.sample
    import nodes

    from animatediff_suite.nodes import demo, injection, motion_nodes

    clip = demo.tiny_clip(0)
    cond = nodes.CLIPTextEncode().encode(clip, "a cat walking")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    return dict(mm=mm, nodes=nodes, sample=comfy.sample, demo=demo, injection=injection,
                motion_nodes=motion_nodes, cond=cond, negative=negative)


def ksample(env, model, cfg=7.0, steps=2, seed=5, frames=FRAMES, sampler="euler", callback=None,
            positive=None):
    latent = {"samples": torch.zeros(frames, 4, 8, 8)}
    if callback is None:
        return env["nodes"].common_ksampler(model, seed, steps, cfg, sampler, "normal", positive or env["cond"],
                                            env["negative"], latent)[0]["samples"]
    noise = env["sample"].prepare_noise(latent["samples"], seed)
    return env["sample"].sample(model, noise, steps, cfg, sampler, "normal", positive or env["cond"],
                                env["negative"], latent["samples"], callback=callback, disable_pbar=True, seed=seed)


def motion(env, version="v3", seed=0, zero_proj_out=False):
    loaded = env["demo"].tiny_motion_patcher(seed, version)
    if zero_proj_out:
        for _, module in loaded.patcher.model.named_temporal_modules():
            torch.nn.init.zeros_(module.temporal_transformer.proj_out.weight)
            torch.nn.init.zeros_(module.temporal_transformer.proj_out.bias)
    return loaded


def apply(env, model, loaded, schedule="use existing", **kwargs):
    schedule = env["injection"].resolve_schedule(schedule, loaded.spec)
    return env["injection"].apply_motion(model, loaded, schedule=schedule, **kwargs)


def test_pack_loads_like_comfyui_loads_it(env):
    nodes = env["nodes"]
    assert asyncio.run(nodes.load_custom_node(ROOT)) is True
    for node_id in ("ADS_LoadMotionModel", "ADS_LoadMotionLora", "ADS_ApplyMotionModel", "ADS_TinyDemoModels",
                    "ADS_ContextOptions", "ADS_ContextScheduleImage", "ADS_PromptTravel", "ADS_FreeInit"):
        assert node_id in nodes.NODE_CLASS_MAPPINGS
    assert os.path.dirname(nodes.__file__) != ROOT
    ours = [k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith("ADS_")]
    assert len(ours) == 8
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


# -- the patched UNet against a reference forward built from the core --------------------------

def reference_unet(unet, motion_model, x, timesteps, context, frames, spanning=False, y=None, windows=None):
    """UNet forward walked block by block, calling the core's temporal modules where the original
    AnimateDiff puts them (REFERENCE §1): after each down/up layer, before Upsample, mid after attn."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import Upsample, forward_timestep_embed
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

    modules = {name: (lambda h, frames, m=m: m(h, frames, 1.0, windows))
               for name, m in motion_model.named_temporal_modules()}
    layers = 2
    emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels).to(x.dtype))
    if y is not None:
        emb = emb + unet.label_emb(y)

    def run(seq, h, output_shape=None):
        return forward_timestep_embed(list(seq), h, emb, context, {}, output_shape)

    with frame_spanning_resnet_norms(unet, frames) if spanning else contextlib.nullcontext():
        h, skips = x, []
        for index, block in enumerate(unet.input_blocks):
            h = run(block, h)
            level, j = divmod(index - 1, layers + 1)
            if index and j < layers:
                h = modules[f"down_blocks.{level}.motion_modules.{j}"](h, frames)
            skips.append(h)
        mid = list(unet.middle_block)
        h = run(mid[:-1], h)
        if "mid_block.motion_modules.0" in modules:
            h = modules["mid_block.motion_modules.0"](h, frames)
        h = run(mid[-1:], h)
        for index, block in enumerate(unet.output_blocks):
            h = torch.cat([h, skips.pop()], dim=1)
            shape = skips[-1].shape if skips else None
            level, j = divmod(index, layers + 1)
            module = modules[f"up_blocks.{level}.motion_modules.{j}"]
            seq = list(block)
            if isinstance(seq[-1], Upsample):
                h = run(seq[-1:], module(run(seq[:-1], h), frames), shape)
            else:
                h = module(run(seq, h), frames)
        return unet.out(h)


@contextlib.contextmanager
def frame_spanning_resnet_norms(unet, frames):
    """Temporarily give every ResBlock GroupNorm and out.0 statistics over (c/g, f, h, w): the
    original v1 semantics, written directly as a 5D group norm."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    norms = [m.in_layers[0] for m in unet.modules() if isinstance(m, ResBlock)]
    norms += [m.out_layers[0] for m in unet.modules() if isinstance(m, ResBlock)] + [unet.out[0]]

    def spanning(norm):
        def forward(x):
            y = F.group_norm(rearrange(x, "(b f) c h w -> b c f h w", f=frames), norm.num_groups,
                             norm.weight, norm.bias, norm.eps)
            return rearrange(y, "b c f h w -> (b f) c h w")
        return forward

    for norm in norms:
        norm.forward = spanning(norm)
    try:
        yield
    finally:
        for norm in norms:
            del norm.forward


@pytest.mark.parametrize("version", ["v3", "v2", "v1"])
@pytest.mark.parametrize("cfg", [1.0, 7.0], ids=["cond_only", "cond_and_uncond"])
def test_patched_unet_equals_core_reference(env, version, cfg):
    """One euler step returns the x0 prediction; recompute it with the reference forward."""
    model = env["demo"].tiny_model(0)
    loaded = motion(env, version, seed=1)
    patched = apply(env, model, loaded)
    out = ksample(env, patched, cfg=cfg, steps=1)
    plain = ksample(env, model, cfg=cfg, steps=1)  # also unloads `patched`: the UNet is ejected again
    sampling = model.get_model_object("model_sampling")
    sigma = sampling.sigma_max.reshape(1)
    noise = env["sample"].prepare_noise(torch.zeros(FRAMES, 4, 8, 8), 5)
    x = sampling.noise_scaling(sigma, noise, torch.zeros_like(noise), max_denoise=True)
    t = sampling.timestep(sigma).float().expand(FRAMES)
    unet = model.model.diffusion_model

    def x0(conditioning):
        context = conditioning[0][0].expand(FRAMES, -1, -1)
        with torch.no_grad():
            eps = reference_unet(unet, loaded.patcher.model, sampling.calculate_input(sigma, x), t, context,
                                 FRAMES, spanning=version == "v1")
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


# -- no leaks ------------------------------------------------------------------------------------

def test_unpatched_model_is_bit_identical_after_runs_errors_and_interrupts(env):
    model = env["demo"].tiny_model(0)
    never_patched = ksample(env, model)
    patched = apply(env, model, motion(env, "v2"), schedule="auto")
    ksample(env, patched)
    assert torch.equal(ksample(env, model), never_patched)

    def fail(step, *args):
        if step == 1:
            raise RuntimeError("boom in the middle of sampling")

    with pytest.raises(RuntimeError, match="boom"):
        ksample(env, patched, steps=3, callback=fail)
    assert torch.equal(ksample(env, model), never_patched)

    def interrupt(step, *args):
        env["mm"].interrupt_current_processing(True)

    with pytest.raises(env["mm"].InterruptProcessingException):
        ksample(env, patched, steps=3, callback=interrupt)
    env["mm"].interrupt_current_processing(False)
    assert torch.equal(ksample(env, model), never_patched)
    unet = model.model.diffusion_model
    injection = env["injection"]
    assert not any(isinstance(m, injection.MotionSlot) for m in unet.modules())
    assert not any(type(m).__name__.startswith("FrameSpanning") for m in unet.modules())


def test_one_motion_model_two_samplers_and_two_base_models_do_not_cross_contaminate(env):
    loaded = motion(env, "v2")
    lora_sd = motion_lora_state_dict(loaded.spec, seed=4)
    from animatediff_suite.motion_modules import load_lora
    entry = env["injection"].MotionLoraEntry("tiny", load_lora(lora_sd), 1.0)
    model_a = env["demo"].tiny_model(0)
    model_b = env["demo"].tiny_model(1)
    with_lora = apply(env, model_a, loaded, loras=(entry,))
    without = apply(env, model_a, loaded)
    on_b = apply(env, model_b, loaded)
    first = [ksample(env, m) for m in (with_lora, without, on_b)]
    second = [ksample(env, m) for m in (on_b, without, with_lora)][::-1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert (first[0] - first[1]).abs().max() > 1e-3
    assert loaded.patcher.patches == {}  # the MOTION_MODEL input itself never gets the LoRA


def test_strength_change_takes_effect_without_reloading_files(env, tmp_path):
    import folder_paths
    from safetensors.torch import save_file

    loaded = motion(env, "v2")
    lora_dir = tmp_path / "animatediff_motion_lora"
    lora_dir.mkdir()
    save_file(motion_lora_state_dict(loaded.spec, seed=4), str(lora_dir / "zoom.safetensors"))
    folder_paths.add_model_folder_path("animatediff_motion_lora", str(lora_dir))
    folder_paths.filename_list_cache.pop("animatediff_motion_lora", None)
    Loader = env["motion_nodes"].LoadMotionLora
    half = Loader.execute("zoom.safetensors", 0.5).result[0]
    full = Loader.execute("zoom.safetensors", 1.0).result[0]
    assert half[0].lora is full[0].lora  # parsed once: the second run read no file
    assert (half[0].strength, full[0].strength) == (0.5, 1.0)
    model = env["demo"].tiny_model(0)
    out_half = ksample(env, apply(env, model, loaded, loras=half))
    out_full = ksample(env, apply(env, model, loaded, loras=full))
    assert (out_half - out_full).abs().max() > 1e-3
    chained = Loader.execute("zoom.safetensors", -0.3, prev_motion_lora=half).result[0]
    assert [e.strength for e in chained] == [0.5, -0.3] and len(half) == 1  # chained by copy


def test_apply_does_not_mutate_its_inputs(env):
    model = env["demo"].tiny_model(0)
    loaded = motion(env, "v1")
    options_before = repr(model.model_options)
    apply(env, model, loaded, schedule="auto", scale=1.3, start_percent=0.1, end_percent=0.9)
    assert repr(model.model_options) == options_before
    assert model.object_patches == {} and model.get_additional_models() == [] and model.injections == {}
    assert loaded.patcher.patches == {} and loaded.patcher.object_patches == {}


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


def test_motion_scale_and_percent_range(env):
    model = env["demo"].tiny_model(0)
    loaded = motion(env, "v3")
    base = ksample(env, apply(env, model, loaded))
    assert (ksample(env, apply(env, model, loaded, scale=2.0)) - base).abs().max() > 1e-3
    # a range that excludes every step is exactly the plain model
    off = apply(env, model, loaded, start_percent=1.0, end_percent=1.0)
    assert torch.equal(ksample(env, off, steps=2), ksample(env, model, steps=2))


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
        env["injection"].resolve_schedule("cosmic", loaded.spec)


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
    assert out.ui["text"] == [info]
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


# -- sliding context windows -------------------------------------------------------------------

def sample_with_noise(env, model, noise, positive, negative, cfg=7.0, steps=1):
    latent = torch.zeros_like(noise)
    return env["sample"].sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                                disable_pbar=True)


def eps_of(model, noise):
    """The UNet output behind a one-step euler result from ``noise`` at sigma_max: (x - x0) / sigma.
    Comparing these keeps tolerances on the UNet's scale whatever sigma_max is."""
    sampling = model.get_model_object("model_sampling")
    sigma, scale = sampling.sigma_max, model.model.latent_format.scale_factor
    x = sampling.noise_scaling(sigma, noise, torch.zeros_like(noise), max_denoise=True)
    return lambda out: (x - out * scale) / sigma


def test_clips_within_one_window_are_bit_identical_to_no_context_options(env):
    from animatediff_suite.motion_modules import ContextOptions

    model = env["demo"].tiny_model(0)
    loaded = motion(env, "v2")
    for frames in (16, 9):
        plain = ksample(env, apply(env, model, loaded), frames=frames)
        windowed = ksample(env, apply(env, model, loaded, context=ContextOptions(16, 4)), frames=frames)
        assert torch.equal(plain, windowed)


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

    image = ContextScheduleImage.execute(ContextOptions(16, 4, closed_loop=True,
                                                                            schedule="looped_uniform"), 64, 3).result[0]
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3 and image.shape[2] == 64 * 12


# -- FreeNoise and FreeInit ------------------------------------------------------------------------

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


class SamplerSpy:
    """A SAMPLER_SAMPLE wrapper recording each pass's noise and sigmas."""

    def __init__(self, model):
        import comfy.patcher_extension

        self.passes = []
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, "test.spy", self)

    def __call__(self, executor, guider, sigmas, extra_args, callback, noise, *args, **kwargs):
        self.passes.append((noise.clone(), sigmas.clone()))
        return executor(guider, sigmas, extra_args, callback, noise, *args, **kwargs)


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
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: reports.append((value, total)))
    try:
        ksample(env, model, steps=2, frames=40, callback=lambda *a: None)
        assert reports == [(value, 2 * windows) for value in range(1, 2 * windows + 1)]
        assert releases == ["cpu"] * 2 * windows  # freed pages go back to the system after each window
        reports.clear()
        free_init = FreeInitNode.execute(model, 2, "butterworth", 0.25, 0.25, 4, True).result[0]  # 1 + 2 steps
        ksample(env, free_init, steps=2, frames=40, callback=lambda *a: None)
        assert reports == [(value, 3 * windows) for value in range(1, 3 * windows + 1)]
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        context_sampling.release_freed_memory = release

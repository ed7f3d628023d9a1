"""ComfyUI tier, in-process: what Apply Motion Model touches: the input model stays bit-identical
after runs, errors and interrupts; no cross-contamination; inputs are never mutated.
"""

from __future__ import annotations

import pytest
import torch

from ads_helpers import motion_lora_state_dict, raised_message
from comfy_helpers import apply, ksample, motion

pytestmark = pytest.mark.comfyui


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


def test_load_motion_lora_names_the_file_and_what_it_expected(env, folders):
    """A kohya image LoRA picked in Load MotionLoRA: the error names the file and what the node expected."""
    from safetensors.torch import save_file

    lora_dir = folders / "animatediff_motion_lora"
    lora_dir.mkdir()
    save_file({"lora_unet_down_blocks_0.alpha": torch.ones(1)}, str(lora_dir / "kohya.safetensors"))
    load = env["motion_nodes"].LoadMotionLora.execute
    assert raised_message(lambda: load("kohya.safetensors", 1.0)) == (
        "'kohya.safetensors': not an AnimateDiff-format MotionLoRA (kohya/image-LoRA naming): expected keys like "
        "'...processor.to_q_lora.down.weight', found 'lora_unet_down_blocks_0.alpha'")
    (lora_dir / "kohya.safetensors").unlink()  # deleted after the list was read
    assert raised_message(lambda: load("kohya.safetensors", 1.0)) == (
        "'kohya.safetensors' is not in models/animatediff_motion_lora any more (deleted or renamed after the "
        "prompt was queued?); refresh the node's list and pick a file that exists")


def test_apply_does_not_mutate_its_inputs(env):
    model = env["demo"].tiny_model(0)
    loaded = motion(env, "v1")
    options_before = repr(model.model_options)
    apply(env, model, loaded, schedule="auto", scale=1.3, start_percent=0.1, end_percent=0.9)
    assert repr(model.model_options) == options_before
    assert model.object_patches == {} and model.get_additional_models() == [] and model.injections == {}
    assert loaded.patcher.patches == {} and loaded.patcher.object_patches == {}

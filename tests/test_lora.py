"""MotionLoRA and domain-adapter maths: W + sum(strength * up @ down), validated before use."""

import logging

import pytest
import torch
from safetensors.torch import save_file

from ads_helpers import make_spec, motion_lora_state_dict, random_model, raised_message
from animatediff_suite.motion_modules import (MotionModelError, load_domain_adapter, load_lora,
                                              lora_deltas, merged_parameters, motion_lora_deltas)

TARGET = "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.to_out.0.weight"
PREFIX = "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.processor"


@pytest.fixture(scope="module")
def v2():
    return random_model(make_spec("v2"), dtype=torch.float64)


@pytest.mark.parametrize("rank", [1, 4, 64])
def test_rank_is_read_from_shapes(v2, rank):
    lora = load_lora(motion_lora_state_dict(v2.spec, rank=rank))
    assert lora.ranks == {rank}
    assert TARGET in lora.pairs  # to_out -> to_out.0, processor and _lora removed


@pytest.mark.parametrize("strength", [1.0, 0.35, -0.7, 2.5])
def test_delta_is_strength_times_up_down_without_rescaling(v2, strength):
    sd = motion_lora_state_dict(v2.spec, rank=4)
    deltas = motion_lora_deltas(v2, [(load_lora(sd), strength)])
    up = sd[f"{PREFIX}.to_out_lora.up.weight"].double()
    down = sd[f"{PREFIX}.to_out_lora.down.weight"].double()
    torch.testing.assert_close(deltas[TARGET], strength * up @ down, atol=1e-12, rtol=0)
    assert len(deltas) == 8 * len(v2.spec.modules)


def test_several_loras_add_up(v2):
    a, b = (load_lora(motion_lora_state_dict(v2.spec, rank=r, seed=s)) for r, s in ((4, 1), (8, 2)))
    both = motion_lora_deltas(v2, [(a, 0.6), (b, -1.2)])
    one = motion_lora_deltas(v2, [(a, 0.6)])
    two = motion_lora_deltas(v2, [(b, -1.2)])
    for key in both:
        torch.testing.assert_close(both[key], one[key] + two[key], atol=1e-12, rtol=0)


def test_zero_strength_and_merge_leave_model_untouched(v2):
    lora = load_lora(motion_lora_state_dict(v2.spec))
    before = {k: v.clone() for k, v in v2.state_dict().items()}
    merged = merged_parameters(v2, motion_lora_deltas(v2, [(lora, 0.0)]))
    assert all(torch.equal(merged[k], before[k]) for k in merged)
    merged = merged_parameters(v2, motion_lora_deltas(v2, [(lora, 1.0)]))
    assert not torch.equal(merged[TARGET], before[TARGET])
    assert all(torch.equal(v, before[k]) for k, v in v2.state_dict().items())


def test_strength_change_needs_no_reload(v2):
    lora = load_lora(motion_lora_state_dict(v2.spec))
    half = motion_lora_deltas(v2, [(lora, 0.5)])
    full = motion_lora_deltas(v2, [(lora, 1.0)])
    torch.testing.assert_close(full[TARGET], 2 * half[TARGET], atol=1e-12, rtol=0)


def test_v2_lora_on_model_without_mid_block_skips_only_mid_with_warning(caplog):
    v3 = random_model(make_spec("v3"))
    lora = load_lora(motion_lora_state_dict(make_spec("v2")))
    with caplog.at_level(logging.WARNING):
        deltas = motion_lora_deltas(v3, [(lora, 1.0)])
    assert not any(k.startswith("mid_block") for k in deltas)
    assert len(deltas) == 8 * len(v3.spec.modules)
    assert "skipped 8 LoRA targets" in caplog.text and "mid_block" in caplog.text


def test_lora_for_other_channels_is_an_error_before_anything(v2):
    sdxl_lora = load_lora(motion_lora_state_dict(make_spec("sdxl_beta", channels=(32, 96, 128))))
    with pytest.raises(MotionModelError, match=r"LoRA gives \(96, 96\) but the model weight is \(64, 64\)"):
        motion_lora_deltas(v2, [(load_lora(motion_lora_state_dict(v2.spec)), 1.0), (sdxl_lora, 1.0)])


def test_lora_with_targets_the_model_lacks_is_an_error(v2):
    sd = motion_lora_state_dict(v2.spec)
    sd = {k.replace("up_blocks.3.", "up_blocks.7."): v for k, v in sd.items()}
    with pytest.raises(MotionModelError, match="LoRA targets do not exist in the model: 'up_blocks.7"):
        motion_lora_deltas(v2, [(load_lora(sd), 1.0)])


def test_half_pairs_and_bad_pair_shapes_are_errors(v2):
    sd = motion_lora_state_dict(v2.spec)
    del sd[f"{PREFIX}.to_q_lora.up.weight"]
    with pytest.raises(MotionModelError, match="has only a 'down' matrix"):
        load_lora(sd)
    sd = motion_lora_state_dict(v2.spec)
    sd[f"{PREFIX}.to_q_lora.up.weight"] = torch.zeros(32, 3)
    with pytest.raises(MotionModelError, match=r"up \(32, 3\) and down \(4, 32\) do not form"):
        load_lora(sd)


def test_unexpected_keys_in_lora_are_errors(v2):
    sd = {**motion_lora_state_dict(v2.spec), "something.else": torch.zeros(2)}
    with pytest.raises(MotionModelError, match="unexpected keys in a LoRA: 'something.else'"):
        load_lora(sd)


def test_motion_model_file_is_not_a_lora(tmp_path, v2):
    save_file({k: v.contiguous() for k, v in v2.state_dict().items()}, str(tmp_path / "mm.safetensors"))
    with pytest.raises(MotionModelError, match="'mm.safetensors': not an AnimateDiff-format LoRA"):
        load_lora(tmp_path / "mm.safetensors")


def _adapter_sd(rank=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for block in ("down_blocks.0.attentions.0", "up_blocks.3.attentions.2"):
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v", "to_out"):
                base = f"{block}.transformer_blocks.0.{attn}.processor.{proj}_lora"
                sd[f"{base}.down.weight"] = torch.randn(rank, 32, generator=gen)
                sd[f"{base}.up.weight"] = torch.randn(32, rank, generator=gen)
    return sd


def test_domain_adapter_reads_and_applies_to_spatial_targets(tmp_path):
    save_file(_adapter_sd(), str(tmp_path / "v3_sd15_adapter.safetensors"))
    adapter = load_domain_adapter(tmp_path / "v3_sd15_adapter.safetensors")
    target = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0.weight"
    assert target in adapter.pairs and adapter.ranks == {4}
    shapes = {k: torch.Size((32, 32)) for k in adapter.pairs}
    deltas = lora_deltas([(adapter, 0.6)], shapes)
    up, down = adapter.pairs[target]
    torch.testing.assert_close(deltas[target], 0.6 * up @ down)


def test_motion_lora_is_not_a_domain_adapter(v2):
    with pytest.raises(MotionModelError, match="not a domain adapter"):
        load_domain_adapter(motion_lora_state_dict(v2.spec))


def test_domain_adapter_is_not_a_motion_lora(v2):
    with pytest.raises(MotionModelError, match="not a MotionLoRA"):
        motion_lora_deltas(v2, [(load_lora(_adapter_sd()), 1.0)])


def _listed(keys, limit):
    """The message's key listing, written out: the first `limit` sorted keys quoted, then (+n more)."""
    keys = sorted(keys)
    return ", ".join(f"'{k}'" for k in keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def test_lora_errors_whole_sentences(v2):
    sd = motion_lora_state_dict(v2.spec)
    del sd[f"{PREFIX}.to_q_lora.up.weight"]
    target = PREFIX.replace(".processor", "") + ".to_q.weight"
    assert raised_message(lambda: load_lora(sd)) == (f"<state dict>: {target} has only a 'down' matrix; LoRA pairs need "
                                               "both up and down")
    sd = motion_lora_state_dict(v2.spec)
    sd[f"{PREFIX}.to_q_lora.up.weight"] = torch.zeros(32, 4, 1)  # 3-D up, down still (4, 32)
    assert raised_message(lambda: load_lora(sd)) == (f"<state dict>: {target}: up (32, 4, 1) and down (4, 32) do not form "
                                               "(out, r) @ (r, in)")
    with pytest.raises(MotionModelError) as error:
        load_domain_adapter({"a.weight": torch.zeros(2)})
    assert str(error.value).startswith("<state dict>: not an AnimateDiff-format domain adapter: expected keys like")


def test_skipped_mid_block_targets_are_named_in_the_warning(caplog):
    v3 = random_model(make_spec("v3"))
    lora = load_lora(motion_lora_state_dict(make_spec("v2")))
    with caplog.at_level(logging.WARNING):
        motion_lora_deltas(v3, [(lora, 1.0)])
    mid = [k for k in lora.pairs if k.startswith("mid_block.")]
    assert [r.getMessage() for r in caplog.records] == [
        f"<state dict>: skipped 8 LoRA targets the model does not have ({_listed(mid, 2)})"]


def test_a_model_with_a_mid_block_skips_nothing(v2):
    """Only a model without a mid block may skip mid-block targets; a v2 model refuses one it lacks."""
    sd = {k.replace("mid_block.motion_modules.0.", "mid_block.motion_modules.5."): v
          for k, v in motion_lora_state_dict(v2.spec).items()}
    message = raised_message(lambda: motion_lora_deltas(v2, [(load_lora(sd), 1.0)]))
    assert message.startswith("<state dict>: 8 LoRA targets do not exist in the model: 'mid_block.motion_modules.5.")


def test_only_the_spatial_targets_are_named_when_a_lora_mixes_both(v2):
    mixed = load_lora({**motion_lora_state_dict(v2.spec), **_adapter_sd()})
    spatial = [k for k in mixed.pairs if ".motion_modules." not in k]
    assert len(spatial) == 16
    assert raised_message(lambda: motion_lora_deltas(v2, [(mixed, 1.0)])) == (
        f"<state dict>: not a MotionLoRA (targets outside motion modules, e.g. {_listed(spatial, 2)})")
    motion = [k for k in mixed.pairs if ".motion_modules." in k]
    assert raised_message(lambda: load_domain_adapter({**motion_lora_state_dict(v2.spec), **_adapter_sd()})) == (
        "<state dict>: not a domain adapter: targets outside the UNet's spatial attention layers, e.g. "
        f"{_listed(motion, 2)} (a MotionLoRA?)")
    resnet = {"down_blocks.0.resnets.0.processor.to_q_lora.down.weight": torch.zeros(4, 32),
              "down_blocks.0.resnets.0.processor.to_q_lora.up.weight": torch.zeros(32, 4)}
    assert raised_message(lambda: load_domain_adapter({**_adapter_sd(), **resnet})) == (
        "<state dict>: not a domain adapter: targets outside the UNet's spatial attention layers, e.g. "
        "'down_blocks.0.resnets.0.to_q.weight' (a MotionLoRA?)")
    # a motion module's target is refused even under a path that also names spatial attentions
    nested = {"down_blocks.0.attentions.0.motion_modules.0.processor.to_q_lora.down.weight": torch.zeros(4, 32),
              "down_blocks.0.attentions.0.motion_modules.0.processor.to_q_lora.up.weight": torch.zeros(32, 4)}
    assert raised_message(lambda: load_domain_adapter({**_adapter_sd(), **nested})) == (
        "<state dict>: not a domain adapter: targets outside the UNet's spatial attention layers, e.g. "
        "'down_blocks.0.attentions.0.motion_modules.0.to_q.weight' (a MotionLoRA?)")


def test_deltas_follow_the_model_dtype_and_device():
    """fp32 deltas for an fp32 model (fp64 only for fp64 models); merged weights keep the parameter's
    dtype and device (``meta`` stands in for a GPU)."""
    v2_32 = random_model(make_spec("v2"))
    deltas = motion_lora_deltas(v2_32, [(load_lora(motion_lora_state_dict(v2_32.spec)), 1.0)])
    assert {d.dtype for d in deltas.values()} == {torch.float32}
    layer = torch.nn.Linear(3, 2)
    merged = merged_parameters(layer, {"weight": torch.ones(2, 3, dtype=torch.float64)})
    assert merged["weight"].dtype == torch.float32 and torch.equal(merged["weight"], layer.weight + 1)
    with torch.device("meta"):
        on_meta = torch.nn.Linear(3, 2)
    assert merged_parameters(on_meta, {"weight": torch.ones(2, 3)})["weight"].device.type == "meta"
    assert raised_message(lambda: merged_parameters(layer, {"nope.weight": torch.ones(1), "weight": torch.ones(2, 3)})) == (
        "deltas for weights the model does not have: 'nope.weight'")


def test_lora_files_wrappers_prefixes_and_foreign_keys(tmp_path, v2):
    sd = motion_lora_state_dict(v2.spec)
    plain = load_lora(sd)
    assert load_lora({"state_dict": sd, "epoch": 3}).pairs.keys() == plain.pairs.keys()
    prefixed = load_lora({f"base_model.model.{k}": v for k, v in sd.items()})  # block names start the target
    assert prefixed.pairs.keys() == plain.pairs.keys()
    assert load_lora({**sd, 7: torch.zeros(1)}).pairs.keys() == plain.pairs.keys()  # non-string keys are skipped
    odd = load_lora({"foo.processor.to_q_lora.down.weight": torch.zeros(2, 8),
                     "foo.processor.to_q_lora.up.weight": torch.zeros(8, 2)})
    assert list(odd.pairs) == ["foo.to_q.weight"] and not odd.is_motion
    first = {"something.else": torch.zeros(2), "another.thing": torch.zeros(2), **sd}  # foreign keys first
    assert raised_message(lambda: load_lora(first)) == (
        "<state dict>: unexpected keys in a LoRA: 'another.thing', 'something.else'")
    assert raised_message(lambda: load_lora({"a": torch.zeros(1), "b": torch.zeros(1), "c": torch.zeros(1),
                                       "d": torch.zeros(1)})) == (
        "<state dict>: not an AnimateDiff-format LoRA: expected keys like '...processor.to_q_lora.down.weight', "
        "found 'a', 'b', 'c' (+1 more)")
    assert raised_message(lambda: load_lora({"lora_unet_down_blocks_0.alpha": torch.zeros(1)}, kind="MotionLoRA")) == (
        "<state dict>: not an AnimateDiff-format MotionLoRA (kohya/image-LoRA naming): expected keys like "
        "'...processor.to_q_lora.down.weight', found 'lora_unet_down_blocks_0.alpha'")
    bad = dict(sd)
    bad[f"{PREFIX}.to_q_lora.up.weight"] = torch.full_like(sd[f"{PREFIX}.to_q_lora.up.weight"], float("inf"))
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "bad.safetensors"))
    assert raised_message(lambda: load_lora(tmp_path / "bad.safetensors", kind="MotionLoRA")) == (
        f"'bad.safetensors': MotionLoRA weights contain NaN or Inf values ('{PREFIX}.to_q_lora.up.weight'); the file "
        "is damaged or was saved from a diverged training run")

"""SparseCtrl core: parity with diffusers' SparseControlNetModel (random weights, both kinds, both norm
modes), the released files' naming and wrappers, keyframe placement, and clear errors for wrong files."""

import pytest
import torch
from einops import rearrange

from ads_helpers import raised_message
from comfy_env import import_or_skip

diffusers = import_or_skip("diffusers")
from diffusers import SparseControlNetModel  # noqa: E402

from animatediff_suite.motion_modules import MotionModelError  # noqa: E402
from animatediff_suite.motion_modules.sparsectrl import (SparseCtrlSpec, keyframe_positions,  # noqa: E402
                                                         sparse_condition)
from animatediff_suite.motion_modules.sparsectrl_format import load_sparsectrl  # noqa: E402
from test_parity_diffusers import per_frame_reference as per_frame, randomize  # noqa: E402

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}
CHANNELS = (32, 64, 64, 64)
FRAMES, BATCH, SIZE = 6, 2, 8
KINDS = {
    # kind: diffusers config (condition channels, simplified embedding, embedding widths)
    "rgb": dict(conditioning_channels=4, use_simplified_condition_embedding=True),
    "scribble": dict(conditioning_channels=3, use_simplified_condition_embedding=False,
                     conditioning_embedding_out_channels=(8, 16, 16, 32)),
}


def build_diffusers(kind: str, dtype=torch.float64, **changes) -> SparseControlNetModel:
    model = SparseControlNetModel(block_out_channels=CHANNELS, cross_attention_dim=32, attention_head_dim=8,
                                  norm_num_groups=32, motion_max_seq_length=32, motion_num_attention_heads=8,
                                  **KINDS[kind], **changes)
    randomize(model, seed=11 if kind == "rgb" else 12)
    return model.to(dtype).eval()


def inputs(kind: str, dtype, keyed=(0, 4)):
    gen = torch.Generator().manual_seed(3)
    scale = 1 if kind == "rgb" else 8
    channels = KINDS[kind]["conditioning_channels"]
    condition = torch.randn(BATCH, channels, FRAMES, SIZE * scale, SIZE * scale, generator=gen, dtype=torch.float64)
    mask = torch.zeros(BATCH, 1, FRAMES, SIZE * scale, SIZE * scale, dtype=torch.float64)
    mask[:, :, list(keyed)] = 1
    condition = condition * mask
    context = torch.randn(BATCH, 5, 32, generator=gen, dtype=torch.float64)
    return condition.to(dtype), mask.to(dtype), context.to(dtype)


def reference(model, kind, dtype, timestep=torch.tensor(321)):
    condition, mask, context = inputs(kind, dtype)
    sample = torch.randn(BATCH, 4, FRAMES, SIZE, SIZE, dtype=dtype)  # ignored: SparseCtrl zeroes it
    with torch.no_grad():
        down, mid = model(sample, timestep, encoder_hidden_states=context.repeat_interleave(FRAMES, dim=0),
                          controlnet_cond=condition, conditioning_mask=mask, return_dict=False)
    return list(down), mid


def ours(model, kind, dtype, timestep=321):
    condition, mask, context = inputs(kind, dtype)
    rows = BATCH * FRAMES
    with torch.no_grad():
        return model(torch.full((rows,), float(timestep), dtype=dtype), context.repeat_interleave(FRAMES, dim=0),
                     rearrange(condition, "b c f h w -> (b f) c h w"), rearrange(mask, "b c f h w -> (b f) c h w"),
                     FRAMES)


def assert_close(got, want, dtype):
    down, mid = got
    want_down, want_mid = want
    assert len(down) == len(want_down) == 12
    for i, (a, b) in enumerate(zip(down + [mid], want_down + [want_mid])):
        scale = b.abs().max().item()
        assert scale > 1e-3, f"residual {i} is ~0: the test would not see a difference"
        assert (a - b).abs().max().item() <= TOLERANCE[dtype] * max(scale, 1.0), f"residual {i}"


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("norm_mode", ["per_frame", "across_frames"])
def test_matches_diffusers(kind, dtype, norm_mode):
    reference_model = build_diffusers(kind)
    model = load_sparsectrl(reference_model.state_dict(), dtype=dtype)
    assert model.spec.kind == kind and model.spec.norm_mode == "per_frame"
    model.set_norm_mode(norm_mode)
    assert model.spec.norm_mode == norm_mode
    reference_model = (per_frame(reference_model) if norm_mode == "per_frame" else reference_model).to(dtype)
    assert_close(ours(model, kind, dtype), reference(reference_model, kind, dtype), dtype)


def test_linear_projections_match_diffusers():
    """Spatial transformers that project in and out with Linear layers (SD2-style files) are read from the
    weights' shapes and compute what diffusers computes."""
    reference_model = build_diffusers("rgb", use_linear_projection=True)
    model = load_sparsectrl(reference_model.state_dict())
    assert model.spec.linear_projection
    assert_close(ours(model, "rgb", torch.float64), reference(per_frame(reference_model), "rgb", torch.float64),
                 torch.float64)


def test_spec_and_norm_mode_choices():
    rgb, scribble = SparseCtrlSpec.sd15("rgb"), SparseCtrlSpec.sd15("scribble", cross_attention_dim=1024)
    assert (rgb.condition_channels, rgb.simplified_embedding, rgb.cross_attention_dim) == (4, True, 768)
    assert (scribble.condition_channels, scribble.simplified_embedding, scribble.cross_attention_dim) == (3, False, 1024)
    assert rgb.channels == (320, 640, 1280, 1280) and rgb.cross_attention == (True, True, True, False)
    assert rgb.with_norm_mode("across_frames").norm_mode == "across_frames" and rgb.norm_mode == "per_frame"
    with pytest.raises(ValueError) as error:
        SparseCtrlSpec.sd15("depth")
    assert str(error.value) == "unknown SparseCtrl kind 'depth'; expected one of ['rgb', 'scribble']"
    model = load_sparsectrl(build_diffusers("rgb", torch.float32).state_dict())
    with pytest.raises(ValueError) as error:
        model.set_norm_mode("per_batch")
    assert str(error.value) == "unknown norm mode 'per_batch'; expected one of ['across_frames', 'per_frame']"


def test_spec_errors_are_whole_sentences():
    with pytest.raises(ValueError) as error:
        SparseCtrlSpec((32, 64), (True,), 4, True)
    assert str(error.value) == "one cross_attention flag per down block; got 2 blocks and 1 flags"
    with pytest.raises(ValueError) as error:
        SparseCtrlSpec((), (), 4, True)
    assert str(error.value) == "one cross_attention flag per down block; got 0 blocks and 0 flags"
    with pytest.raises(ValueError) as error:
        SparseCtrlSpec((32,), (True,), 4, True, norm_mode="per_batch")
    assert str(error.value) == "unknown norm mode 'per_batch'; expected one of ['across_frames', 'per_frame']"
    # each of the three divisors alone makes a width bad
    for heads, motion_heads, groups in ((3, 8, 32), (8, 3, 32), (8, 8, 24)):
        with pytest.raises(ValueError) as error:
            SparseCtrlSpec((32, 64), (True, False), 4, True, heads=heads, motion_heads=motion_heads, norm_groups=groups)
        assert str(error.value) == (f"block widths [32, 64] are not divisible by the heads ({heads}, {motion_heads}) "
                                    f"and norm groups ({groups})")
    assert SparseCtrlSpec((48,), (True,), 4, True, heads=3, motion_heads=6, norm_groups=16).channels == (48,)


def test_a_last_block_wider_than_the_one_before_sets_the_mid_block_width():
    """The released layouts repeat the last width (1280, 1280); the mid block and its residual conv take the
    last block's width, whatever the one before it."""
    from animatediff_suite.motion_modules.sparsectrl import SparseCtrlModel

    shapes = {k: tuple(v.shape) for k, v in SparseCtrlModel(SparseCtrlSpec(
        (32, 64, 96), (True, True, False), 4, True, cross_attention_dim=32)).state_dict().items()}
    assert shapes["mid_block.resnets.0.conv1.weight"] == (96, 96, 3, 3)
    assert shapes["mid_block.resnets.1.conv2.weight"] == (96, 96, 3, 3)
    assert shapes["mid_block.attentions.0.proj_in.weight"] == (96, 96, 1, 1)
    assert shapes["controlnet_mid_block.weight"] == (96, 96, 1, 1)
    assert shapes["down_blocks.2.resnets.0.conv1.weight"] == (96, 64, 3, 3)


def test_timestep_features_written_out_and_on_the_timesteps_device():
    """diffusers' Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0): cos(t w_i) then sin(t w_i),
    w_i = 10000^(-i / (dim / 2)), i = 0 .. dim/2 - 1, in float32 whatever the timesteps' dtype."""
    from animatediff_suite.motion_modules.sparsectrl import timestep_features

    t = torch.tensor([0, 1, 321, 999], dtype=torch.float64)
    got = timestep_features(t, 8)
    w = torch.tensor([10000.0 ** (-i / 4) for i in range(4)], dtype=torch.float64)
    want = torch.cat([torch.cos(t[:, None] * w), torch.sin(t[:, None] * w)], dim=1)
    assert got.dtype == torch.float32 and got.shape == (4, 8)
    torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=0)  # float32 angles of up to 999 rad
    assert timestep_features(torch.zeros(3, device="meta"), 8).device.type == "meta"


def test_the_norm_modes_differ_and_the_mask_matters():
    reference_model = build_diffusers("rgb")
    model = load_sparsectrl(reference_model.state_dict())
    per = ours(model, "rgb", torch.float64)[1]
    across = ours(model.set_norm_mode("across_frames"), "rgb", torch.float64)[1]
    assert (per - across).abs().max() > 1e-3
    condition, mask, context = inputs("rgb", torch.float64)
    flat = lambda t: rearrange(t, "b c f h w -> (b f) c h w")  # noqa: E731
    t = torch.full((BATCH * FRAMES,), 321.0, dtype=torch.float64)
    ctx = context.repeat_interleave(FRAMES, dim=0)
    with torch.no_grad():
        keyed = model(t, ctx, flat(condition), flat(mask), FRAMES)[1]
        unkeyed = model(t, ctx, flat(condition), torch.zeros_like(flat(mask)), FRAMES)[1]
    assert (keyed - unkeyed).abs().max() > 1e-3


def original_naming(diffusers_sd: dict) -> dict:
    """The released .ckpt naming, written out by hand from AnimateDiff's sparse_controlnet.py."""
    out = {}
    for key, value in diffusers_sd.items():
        if ".motion_modules." in key:
            head, rest = key.split(".motion_modules.")
            index, rest = rest.split(".", 1)
            rest = (rest.replace("transformer_blocks.0.attn1.", "transformer_blocks.0.attention_blocks.0.")
                    .replace("transformer_blocks.0.norm1.", "transformer_blocks.0.norms.0.")
                    .replace("transformer_blocks.0.norm3.", "transformer_blocks.0.ff_norm."))
            if rest == "transformer_blocks.0.pos_embed.pe":
                rest = "transformer_blocks.0.attention_blocks.0.pos_encoder.pe"
            key = f"{head}.motion_modules.{index}.temporal_transformer.{rest}"
        out[key] = value
    return out


def test_released_ckpt_layout_loads(tmp_path):
    reference_model = build_diffusers("scribble", torch.float32)
    sd = original_naming(reference_model.state_dict())
    assert any(k.endswith("attention_blocks.0.pos_encoder.pe") for k in sd)
    path = tmp_path / "v3_sd15_sparsectrl_scribble.ckpt"
    torch.save({"controlnet": sd, "animatediff_config": {"L": 16}}, path)
    model = load_sparsectrl(path)
    spec = model.spec
    assert (spec.kind, spec.channels, spec.cross_attention, spec.condition_channels, spec.embedding_channels,
            spec.cross_attention_dim, spec.pe_length) == ("scribble", CHANNELS, (True, True, True, False), 3,
                                                          (8, 16, 16, 32), 32, 32)
    assert_close(ours(model, "scribble", torch.float32),
                 reference(per_frame(reference_model), "scribble", torch.float32), torch.float32)


def test_released_sd15_layout_has_the_released_size():
    # v3_sd15_sparsectrl_rgb.ckpt holds 1,985 MB of float32 weights minus its PE tables
    with torch.device("meta"):
        from animatediff_suite.motion_modules.sparsectrl import SparseCtrlModel
        rgb = SparseCtrlModel(SparseCtrlSpec.sd15("rgb"))
    reference_model = SparseControlNetModel()  # diffusers' defaults are the SD1.5 rgb release's layout
    expected = sum(v.numel() for k, v in reference_model.state_dict().items() if not k.endswith(".pe"))
    assert sum(p.numel() for p in rgb.parameters()) == expected


@pytest.mark.parametrize("indexes, count, frames, expected", [
    (None, 1, 16, [0]),
    (None, 2, 16, [0, 15]),
    (None, 3, 16, [0, 8, 15]),      # 7.5 rounds up
    (None, 4, 16, [0, 5, 10, 15]),
    (None, 3, 8, [0, 4, 7]),        # 3.5 rounds up
    ([0, -1], 2, 16, [0, 15]),
    ([5, -3, 2], 3, 12, [5, 9, 2]),
])
def test_keyframe_positions(indexes, count, frames, expected):
    assert keyframe_positions(indexes, count, frames) == expected


@pytest.mark.parametrize("indexes, count, frames, message", [
    (None, 0, 16, "no keyframe images"),
    (None, 5, 4, "5 keyframe images for a clip of 4 frames; give at most one image per frame"),
    ([0], 2, 16, "1 keyframe indexes [0] for 2 images; give one index per image, or none to spread the images "
                 "evenly"),
    ([0, 16], 2, 16, "keyframe index 16 is outside a clip of 16 frames (use 0..15, or -1..-16 from the end)"),
    ([0, -17], 2, 16, "keyframe index -17 is outside a clip of 16 frames (use 0..15, or -1..-16 from the end)"),
    ([3, -13], 2, 16, "keyframe indexes [3, -13] put two images on the same frame of a 16-frame clip ([3, 3])"),
])
def test_keyframe_positions_errors(indexes, count, frames, message):
    with pytest.raises(MotionModelError) as error:
        keyframe_positions(indexes, count, frames, "Apply SparseCtrl")
    assert str(error.value) == f"Apply SparseCtrl: {message}"
    with pytest.raises(MotionModelError) as error:
        keyframe_positions(indexes, count, frames)
    assert str(error.value) == f"keyframes: {message}"


def test_keyframe_positions_at_both_ends_of_the_range():
    assert keyframe_positions([-16, 15], 2, 16) == [0, 15]
    assert keyframe_positions(None, 16, 16) == list(range(16))


def test_sparse_condition_places_keyframes_on_their_rows():
    keyframes = torch.arange(1, 3, dtype=torch.float32)[:, None, None, None].expand(2, 2, 1, 1) * torch.tensor(
        [1.0, 10.0])[None, :, None, None]  # keyframe k has channels (k+1, 10(k+1))
    condition, mask = sparse_condition(keyframes, [3, 0], rows=[0, 1, 2, 3, 0])
    assert condition[:, :, 0, 0].tolist() == [[2, 20], [0, 0], [0, 0], [1, 10], [2, 20]]
    assert mask.flatten().tolist() == [1, 0, 0, 1, 1] and mask.dtype == keyframes.dtype == condition.dtype
    on_meta = sparse_condition(torch.zeros(2, 3, 4, 4, device="meta"), [3, 0], rows=[0, 1, 2, 3, 0])
    assert [t.device.type for t in on_meta] == ["meta", "meta"] and on_meta[1].shape == (5, 1, 4, 4)


CONTROLNET = "<state dict>: not a SparseCtrl model: it is an ordinary ControlNet: load it with ComfyUI's Load ControlNet Model"


@pytest.mark.parametrize("sd, message", [
    ({"input_hint_block.0.weight": torch.zeros(16, 3, 3, 3), "zero_convs.0.0.weight": torch.zeros(1)}, CONTROLNET),
    ({"input_hint_block.0.weight": torch.zeros(1), "time_embed.0.weight": torch.zeros(1)}, CONTROLNET),
    ({"zero_convs.0.0.weight": torch.zeros(1), "time_embed.0.weight": torch.zeros(1)}, CONTROLNET),
    ({"control_model.time_embed.0.weight": torch.zeros(1)}, CONTROLNET),
    ({"down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight": torch.zeros(32, 32)},
     "<state dict>: not a SparseCtrl model: it is a motion model: load it with Load Motion Model"),
    ({"first_stage_model.encoder.conv_in.weight": torch.zeros(1)},
     "<state dict>: not a SparseCtrl model: it has no 'controlnet_cond_embedding' weights "
     "(found e.g. 'first_stage_model.encoder.conv_in.weight')"),
    ({"animatediff_config": {"L": 16}}, "<state dict>: no tensors found; not a SparseCtrl model"),
], ids=["controlnet", "hint-block-only", "zero-convs-only", "control-model-only", "motion-model", "other", "empty"])
def test_not_a_sparsectrl_file(sd, message):
    assert raised_message(lambda: load_sparsectrl(sd)) == message


def test_damaged_files_name_the_key():
    sd = build_diffusers("rgb", torch.float32).state_dict()
    missing = {k: v for k, v in sd.items() if k != "down_blocks.1.attentions.0.proj_out.weight"}
    with pytest.raises(MotionModelError, match=r"1 missing keys for a rgb SparseCtrl: 'down_blocks\.1\.attentions"):
        load_sparsectrl(missing)
    wrong = dict(sd, **{"controlnet_mid_block.weight": torch.zeros(64, 64, 3, 3)})
    with pytest.raises(MotionModelError, match=r"wrong shapes: controlnet_mid_block\.weight \(64, 64, 3, 3\) "
                                               r"\(expected \(64, 64, 1, 1\)\)"):
        load_sparsectrl(wrong)
    nan = dict(sd, **{"conv_in.bias": torch.full((32,), float("nan"))})
    with pytest.raises(MotionModelError, match="NaN or Inf"):
        load_sparsectrl(nan)


@pytest.fixture(scope="module")
def rgb_sd():
    return {k: v.contiguous() for k, v in build_diffusers("rgb", torch.float32).state_dict().items()}


def _file_error(tmp_path, sd) -> str:
    """The whole message of loading ``sd`` saved as 'sc.safetensors'."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "sc.safetensors"))
    return raised_message(lambda: load_sparsectrl(tmp_path / "sc.safetensors"))


def _with(sd, **changes):
    """``sd`` with keys replaced (None removes one); keys are given with '__' for '.'."""
    out = dict(sd)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            del out[key]
        else:
            out[key] = value
    return out


def test_file_errors_name_the_file_and_say_what_was_expected(tmp_path, rgb_sd):
    sd = rgb_sd
    blockless = {k: v for k, v in sd.items() if not k.startswith("down_blocks.")}
    assert _file_error(tmp_path, blockless) == "'sc.safetensors': 0 down blocks; expected 1 to 8 (SD1.5 has 4)"
    nine = _with(sd, down_blocks__8__x=torch.zeros(1))
    assert _file_error(tmp_path, nine) == "'sc.safetensors': 9 down blocks; expected 1 to 8 (SD1.5 has 4)"
    eight = _with(sd, down_blocks__7__x=torch.zeros(1))  # 8 blocks pass that check; block 4 is then missing
    assert _file_error(tmp_path, eight) == ("'sc.safetensors': 'down_blocks.4.resnets.0.conv1.weight' should be a "
                                            "4-d tensor, found None")
    conv1 = "down_blocks__0__resnets__0__conv1__weight"
    assert _file_error(tmp_path, _with(sd, **{conv1: torch.zeros(32, 32)})) == (
        "'sc.safetensors': 'down_blocks.0.resnets.0.conv1.weight' should be a 4-d tensor, found (32, 32)")
    for shape in [(8193, 1, 1, 1), (0, 32, 3, 3), (32, 0, 3, 3)]:
        assert _file_error(tmp_path, _with(sd, **{conv1: torch.zeros(shape)})) == (
            f"'sc.safetensors': 'down_blocks.0.resnets.0.conv1.weight' has shape {shape} (limit 8192 channels)")
    # within the limit (only the first two sizes count): refused later, by the layout or the other shapes
    for shape, later in [((8192, 1, 1, 1), "wrong shapes: "), ((32, 32, 8193, 1), "wrong shapes: "),
                         ((1, 32, 3, 3), "unsupported SparseCtrl layout: ")]:
        assert _file_error(tmp_path, _with(sd, **{conv1: torch.zeros(shape)})).startswith("'sc.safetensors': " + later)
    attentionless = {k: v for k, v in sd.items() if ".attentions." not in k}
    assert _file_error(tmp_path, attentionless) == ("'sc.safetensors': no spatial transformers in any down block; "
                                                    "not an SD1.5-style SparseCtrl")
    one_channel = _with(sd, controlnet_cond_embedding__weight=torch.zeros(32, 1, 3, 3))
    assert _file_error(tmp_path, one_channel) == (
        "'sc.safetensors': the condition embedding takes 1 channel(s); expected the condition's channels plus one "
        "for the keyframe mask")
    pe = "down_blocks.0.motion_modules.0.transformer_blocks.0.pos_embed.pe"
    assert _file_error(tmp_path, _with(sd, **{pe.replace(".", "__"): torch.zeros(1, 24, 32)})) == (
        "'sc.safetensors': positional encodings disagree on the frame limit: [24, 32]")
    long_pe = {k: (torch.zeros(1, 4097, v.shape[2]) if k.endswith(".pe") else v) for k, v in sd.items()}
    assert _file_error(tmp_path, long_pe) == "'sc.safetensors': positional encoding of 4097 frames (limit 4096)"
    assert _file_error(tmp_path, _with(sd, down_blocks__0__extra__weight=torch.zeros(1))) == (
        "'sc.safetensors': unexpected keys for a rgb SparseCtrl: 'down_blocks.0.extra.weight'")
    biases = [k for k in sd if k.endswith(".bias") and sd[k].ndim == 1][:7]
    message = _file_error(tmp_path, {k: (torch.zeros(v.shape[0] + 1) if k in biases else v) for k, v in sd.items()})
    assert message.startswith("'sc.safetensors': wrong shapes: ") and message.endswith(" (+2 more)")
    assert message.count(" (expected ") == 5
    ints = _with(sd, conv_in__weight=sd["conv_in.weight"].to(torch.int32))
    assert _file_error(tmp_path, ints) == "'sc.safetensors': weights are torch.int32; expected a floating-point dtype"
    odd = {k: (torch.zeros(36, *v.shape[1:]) if k == conv1.replace("__", ".") else v) for k, v in sd.items()}
    assert _file_error(tmp_path, odd).startswith("'sc.safetensors': unsupported SparseCtrl layout: ")


def test_more_file_errors_name_the_file_key_and_shape(tmp_path, rgb_sd):
    """Whole sentences for the tensors read while the layout is worked out, the non-SparseCtrl and the
    non-finite file, and the PE-length boundary (0 frames is refused, 1 is a limit)."""
    to_k = "down_blocks__0__attentions__0__transformer_blocks__0__attn2__to_k__weight"
    assert _file_error(tmp_path, _with(rgb_sd, **{to_k: torch.zeros(32, 32, 1)})) == (
        "'sc.safetensors': 'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight' should be a 2-d "
        "tensor, found (32, 32, 1)")
    assert _file_error(tmp_path, _with(rgb_sd, controlnet_cond_embedding__weight=torch.zeros(32, 5))) == (
        "'sc.safetensors': 'controlnet_cond_embedding.weight' should be a 4-d tensor, found (32, 5)")
    scribble = {k: v.contiguous() for k, v in build_diffusers("scribble", torch.float32).state_dict().items()}
    assert _file_error(tmp_path, _with(scribble, controlnet_cond_embedding__conv_in__weight=torch.zeros(8, 4))) == (
        "'sc.safetensors': 'controlnet_cond_embedding.conv_in.weight' should be a 4-d tensor, found (8, 4)")
    assert _file_error(tmp_path, _with(scribble, controlnet_cond_embedding__blocks__1__weight=torch.zeros(16))) == (
        "'sc.safetensors': 'controlnet_cond_embedding.blocks.1.weight' should be a 4-d tensor, found (16,)")
    vae = {"encoder.conv_in.weight": torch.zeros(1), "encoder.conv_in.bias": torch.zeros(1),
           "decoder.conv_in.weight": torch.zeros(1), "decoder.conv_out.weight": torch.zeros(1)}
    assert _file_error(tmp_path, vae) == (
        "'sc.safetensors': not a SparseCtrl model: it has no 'controlnet_cond_embedding' weights (found e.g. "
        "'decoder.conv_in.weight', 'decoder.conv_out.weight', 'encoder.conv_in.bias' (+1 more))")
    nan = _with(rgb_sd, conv_in__bias=torch.full((32,), float("nan")))
    assert _file_error(tmp_path, nan) == (
        "'sc.safetensors': weights contain NaN or Inf values ('conv_in.bias'); the file is damaged or was saved "
        "from a diverged training run")
    empty_pe = {k: (torch.zeros(1, 0, v.shape[2]) if k.endswith(".pe") else v) for k, v in rgb_sd.items()}
    assert _file_error(tmp_path, empty_pe) == "'sc.safetensors': positional encoding of 0 frames (limit 4096)"
    one = {k: (torch.zeros(1, 1, v.shape[2]) if k.endswith(".pe") else v) for k, v in rgb_sd.items()}
    assert load_sparsectrl(one).spec.pe_length == 1


def test_a_one_block_sparsectrl_loads():
    """The smallest layout the block-count check admits (1 to 8 down blocks): one cross-attention block."""
    one_block = SparseControlNetModel(
        block_out_channels=(32,), down_block_types=("CrossAttnDownBlockMotion",), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=32, motion_max_seq_length=32, motion_num_attention_heads=8,
        **KINDS["rgb"])
    spec = load_sparsectrl(one_block.state_dict()).spec
    assert (spec.channels, spec.cross_attention, spec.kind) == ((32,), (True,), "rgb")


def test_two_channel_condition_and_pe_lengths_are_read_from_the_file(rgb_sd):
    """The condition's channels are the embedding's inputs less the mask's one (1 is the least); the frame
    limit comes from the 3-d PE tables (default 32 without any), up to 4096."""
    sd = _with(rgb_sd, controlnet_cond_embedding__weight=torch.zeros(32, 2, 3, 3))
    assert load_sparsectrl(sd).spec.condition_channels == 1
    short = {k: (torch.zeros(1, 24, v.shape[2]) if k.endswith(".pe") else v) for k, v in rgb_sd.items()}
    assert load_sparsectrl(short).spec.pe_length == 24
    longest = {k: (torch.zeros(1, 4096, v.shape[2]) if k.endswith(".pe") else v) for k, v in rgb_sd.items()}
    assert load_sparsectrl(longest).spec.pe_length == 4096
    flat = {k: (v[0] if k.endswith(".pe") else v) for k, v in short.items()}  # 2-d tables say nothing
    assert load_sparsectrl(flat).spec.pe_length == 32
    assert load_sparsectrl({k: v for k, v in rgb_sd.items() if not k.endswith(".pe")}).spec.pe_length == 32


@pytest.mark.parametrize("wrapper", [None, "controlnet", "state_dict", "module"])
@pytest.mark.parametrize("prefix", ["", "module.", "controlnet.", "model.", "module.controlnet."])
def test_wrappers_and_prefixes_are_taken_off(rgb_sd, wrapper, prefix):
    sd = {prefix + k: v for k, v in rgb_sd.items()}
    data = {wrapper: sd, "animatediff_config": {"L": 16}} if wrapper else sd
    model = load_sparsectrl(data)
    assert torch.equal(model.state_dict()["conv_in.weight"], rgb_sd["conv_in.weight"])


def test_load_dtype_device_operations_and_log(rgb_sd, caplog):
    import logging

    wide = load_sparsectrl(rgb_sd, dtype=torch.float64)
    assert {t.dtype for t in wide.state_dict().values()} == {torch.float64}
    assert {t.dtype for t in wide.buffers()} == {torch.float64}  # the PE tables, rebuilt after loading
    assert not wide.training and not any(p.requires_grad for p in wide.parameters())
    on_meta = load_sparsectrl(rgb_sd, device="meta")
    assert {t.device.type for t in [*on_meta.state_dict().values(), *on_meta.buffers()]} == {"meta"}

    # every layer comes from the given namespace (ComfyUI's casting layers), down to the motion modules
    layers = ("Linear", "Conv2d", "GroupNorm", "LayerNorm")
    ops = _counted_ops(*layers)
    model = load_sparsectrl(rgb_sd, operations=ops)
    for name in layers:
        built = [n for n, m in model.named_modules() if isinstance(m, getattr(torch.nn, name))]
        assert built and not [n for n in built if not isinstance(model.get_submodule(n), getattr(ops, name))], name
    assert any(".motion_modules." in n for n, m in model.named_modules() if isinstance(m, ops.LayerNorm))
    with caplog.at_level(logging.INFO, logger="animatediff_suite.motion_modules.sparsectrl_format"):
        load_sparsectrl(rgb_sd)
    assert [r.getMessage() for r in caplog.records] == [
        "loaded <state dict>: SparseCtrl rgb, 4 down blocks [32, 64, 64, 64], text width 32, up to 32 frames per pass"]


def test_wrong_shape_listing_stops_at_five(tmp_path, rgb_sd):
    biases = [k for k in rgb_sd if k.endswith(".bias") and rgb_sd[k].ndim == 1]
    for count, tail in ((5, ""), (6, " (+1 more)")):
        message = _file_error(tmp_path, {k: (torch.zeros(v.shape[0] + 1) if k in biases[:count] else v)
                                         for k, v in rgb_sd.items()})
        shown = [f"{k} ({rgb_sd[k].shape[0] + 1},) (expected ({rgb_sd[k].shape[0]},))" for k in biases[:5]]
        assert message == "'sc.safetensors': wrong shapes: " + "; ".join(shown) + tail


def test_passes_longer_than_the_pe_need_windows_or_stretching(rgb_sd):
    """40 frames against a 32-frame PE: refused unless the motion modules attend in windows of at most 32
    frames or stretch the PE; the windows and the flag reach every motion module."""
    from animatediff_suite.motion_modules import ContextOptions
    from animatediff_suite.motion_modules.context import weighted_windows

    model = load_sparsectrl(rgb_sd)
    frames = 40
    t = torch.full((frames,), 321.0)
    context = torch.randn(frames, 5, 32, generator=torch.Generator().manual_seed(0))
    condition, mask = torch.zeros(frames, 4, SIZE, SIZE), torch.zeros(frames, 1, SIZE, SIZE)
    with torch.no_grad():
        with pytest.raises(MotionModelError, match="40 frames in one pass, but this motion model's positional "
                                                   "encoding covers at most 32 frames"):
            model(t, context, condition, mask, frames)
        windows = weighted_windows(frames, ContextOptions(context_length=16, context_overlap=4))
        assert model(t, context, condition, mask, frames, windows)[1].shape == (frames, 64, 1, 1)
        assert model(t, context, condition, mask, frames, stretch_pe=True)[1].shape == (frames, 64, 1, 1)


def _counted_ops(*layers):
    """torch.nn's layers as an ``operations`` namespace, ``layers`` replaced by subclasses of their own."""
    import types

    ops = types.SimpleNamespace(**{n: getattr(torch.nn, n) for n in dir(torch.nn) if n[:1].isupper()})
    for name in layers:
        setattr(ops, name, type(f"Counted{name}", (getattr(torch.nn, name),), {}))
    return ops


def test_a_scribble_hint_encoder_is_built_from_the_given_ops():
    """The scribble kind's hint encoder (ConditionEmbedding) takes its convolutions from the namespace too."""
    ops = _counted_ops("Conv2d")
    encoder = load_sparsectrl(build_diffusers("scribble", torch.float32).state_dict(),
                              operations=ops).controlnet_cond_embedding
    convs = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 8 and all(isinstance(m, ops.Conv2d) for m in convs)  # in, 3 x (conv, stride-2 conv), out

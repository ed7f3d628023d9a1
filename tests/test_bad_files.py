"""Bad inputs: each gives a MotionModelError that names the file and the problem."""

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from ads_helpers import make_spec, original_state_dict, random_model
from animatediff_suite.motion_modules import MotionModelError, load_lora, load_motion_model


@pytest.fixture(scope="module")
def good_sd():
    return original_state_dict(random_model(make_spec("v2")))


def save_st(path, sd):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def test_truncated_safetensors(tmp_path, good_sd):
    path = save_st(tmp_path / "cut.safetensors", good_sd)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MotionModelError, match=r"'cut.safetensors': truncated file"):
        load_motion_model(path)


def test_truncated_header(tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x05\x00")
    with pytest.raises(MotionModelError, match="'tiny.safetensors': truncated file"):
        load_motion_model(path)


@pytest.mark.parametrize("name", ["empty.safetensors", "empty.ckpt", "empty.pt"])
def test_zero_byte_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(MotionModelError, match=f"'{name}': the file is empty"):
        load_motion_model(tmp_path / name)


@pytest.mark.parametrize("ext", [".ckpt", ".pt"])
def test_truncated_pickle(tmp_path, good_sd, ext):
    path = tmp_path / f"cut{ext}"
    torch.save(good_sd, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(MotionModelError, match=f"'cut{ext}': truncated or corrupt checkpoint"):
        load_motion_model(path)


class _Marker:
    """Unpickling this object would create a file: the loader must never let that happen."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("style", ["torch_zip", "legacy_pickle"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, good_sd, style):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.ckpt"
    payload = {**good_sd, "evil": _Marker(str(marker))}
    if style == "torch_zip":
        torch.save(payload, str(path))
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(MotionModelError, match="'evil.ckpt': refused to load"):
        load_motion_model(path)
    assert not marker.exists()
    with pytest.raises(MotionModelError, match="refused to load"):
        load_lora(path)
    assert not marker.exists()


def test_sd_checkpoint_is_not_a_motion_module(tmp_path):
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
          "model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3),
          "first_stage_model.decoder.conv_in.weight": torch.zeros(8, 4, 3, 3),
          "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(8, 8)}
    path = save_st(tmp_path / "dreamshaper.safetensors", sd)
    with pytest.raises(MotionModelError, match="'dreamshaper.safetensors': not a motion module.*SD checkpoint"):
        load_motion_model(path)


def test_image_lora_is_not_a_motion_module_nor_a_motion_lora(tmp_path):
    sd = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
          "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
          "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}
    path = save_st(tmp_path / "style_lora.safetensors", sd)
    with pytest.raises(MotionModelError, match="'style_lora.safetensors': not a motion module"):
        load_motion_model(path)
    with pytest.raises(MotionModelError, match="'style_lora.safetensors': not an AnimateDiff-format LoRA "
                                               r"\(kohya/image-LoRA naming\)"):
        load_lora(path)


def test_random_tensors_are_not_a_motion_module(tmp_path):
    path = save_st(tmp_path / "noise.safetensors", {f"t{i}": torch.randn(4, 4) for i in range(5)})
    with pytest.raises(MotionModelError, match="'noise.safetensors': not a motion module"):
        load_motion_model(path)


def test_missing_keys_are_listed(tmp_path, good_sd):
    sd = dict(good_sd)
    gone = "up_blocks.1.motion_modules.2.temporal_transformer.transformer_blocks.0.ff.net.2.weight"
    del sd[gone]
    path = save_st(tmp_path / "holes.safetensors", sd)
    with pytest.raises(MotionModelError, match=rf"'holes.safetensors': 1 missing keys .*{gone}"):
        load_motion_model(path)


def test_unexpected_keys_are_listed(good_sd):
    extra = "down_blocks.0.motion_modules.0.temporal_transformer.mystery.weight"
    with pytest.raises(MotionModelError, match=rf"<state dict>: unexpected keys: '{extra}'"):
        load_motion_model({**good_sd, extra: torch.zeros(3)})


def test_wrong_shapes_are_named(good_sd):
    key = "down_blocks.1.motion_modules.0.temporal_transformer.transformer_blocks.0.ff.net.0.proj.weight"
    with pytest.raises(MotionModelError, match=rf"wrong shapes: {key} \(64, 64\) \(expected \(512, 64\)\)"):
        load_motion_model({**good_sd, key: torch.zeros(64, 64)})


def test_wrong_pe_channels_are_named(good_sd):
    key = "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.pos_encoder.pe"
    with pytest.raises(MotionModelError, match="wrong shapes: .*pos_encoder.pe"):
        load_motion_model({**good_sd, key: torch.zeros(1, 32, 48)})


def test_three_down_blocks_with_a_fifth_or_two_blocks_is_unsupported(good_sd):
    sd = {k: v for k, v in good_sd.items() if not k.startswith(("down_blocks.2", "down_blocks.3"))}
    with pytest.raises(MotionModelError, match="2 down blocks; expected 4 .*unsupported format"):
        load_motion_model(sd)


def test_absurd_channel_count_is_refused_before_allocating():
    huge = {"down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight":
            torch.empty(1_000_000, 1_000_000, device="meta")}
    for i in (1, 2, 3):
        huge[f"down_blocks.{i}.motion_modules.0.temporal_transformer.proj_in.weight"] = torch.empty(
            32, 32, device="meta")
    with pytest.raises(MotionModelError, match="1000000 channels"):
        load_motion_model(huge)


def _raw_safetensors(path, header: dict, data: bytes = b""):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_absurd_header_length_is_refused(tmp_path):
    path = tmp_path / "absurd.safetensors"
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(MotionModelError, match="header claims 1000000000000 bytes"):
        load_motion_model(path)


def test_absurd_tensor_shape_is_refused_before_allocating(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 40_000_000_000]}}
    path = _raw_safetensors(tmp_path / "shape.safetensors", header, b"\0" * 16)
    with pytest.raises(MotionModelError, match="truncated file: tensor 'a' ends at byte 40000000000"):
        load_motion_model(path)


def test_inconsistent_tensor_size_is_refused(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 8]}}
    path = _raw_safetensors(tmp_path / "lie.safetensors", header, b"\0" * 8)
    with pytest.raises(MotionModelError, match="shape \\[4, 4\\] does not match its byte size"):
        load_motion_model(path)


def test_too_many_keys_is_refused(tmp_path):
    header = {f"k{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(100_001)}
    path = _raw_safetensors(tmp_path / "keys.safetensors", header)
    with pytest.raises(MotionModelError, match="100001 tensors \\(limit 100000\\)"):
        load_motion_model(path)


def test_garbage_file_is_not_a_weight_file(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_bytes(struct.pack("<Q", 5) + b"hello")
    with pytest.raises(MotionModelError, match="'notes.safetensors': not a weight file"):
        load_motion_model(path)


def test_missing_file(tmp_path):
    with pytest.raises(MotionModelError, match="'nope.safetensors': file not found"):
        load_motion_model(tmp_path / "nope.safetensors")


def test_non_mapping_pickle(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], str(path))
    with pytest.raises(MotionModelError, match="'list.pt': expected a dict of tensors, found list"):
        load_motion_model(path)


def test_v3_without_pe_tables_but_with_mid_block_is_an_error(good_sd):
    sd = {k: v for k, v in good_sd.items() if not k.endswith(".pe")}
    with pytest.raises(MotionModelError, match="v2 motion module without positional encodings"):
        load_motion_model(sd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_check_finite_names_every_kind_of_non_finite_weight(dtype):
    from animatediff_suite.motion_modules.errors import check_finite

    good = {"a": torch.randn(64, 64).to(dtype), "empty": torch.zeros(0, dtype=dtype), "int": torch.arange(3)}
    check_finite(good, "'file.safetensors'")
    for value in (float("nan"), float("inf"), -float("inf")):
        weights = dict(good, b=torch.ones(5, 7, dtype=dtype))
        weights["b"][2, 3] = value
        with pytest.raises(MotionModelError, match=r"'file.safetensors': weights contain NaN or Inf values \('b'\)"):
            check_finite(weights, "'file.safetensors'")


@pytest.mark.parametrize("ext", [".ckpt", ".pt"])
def test_safetensors_under_a_pickle_name_is_read_as_safetensors(tmp_path, ext):
    """Renamed files happen: the first bytes decide. A header that fills the whole file (no tensors) is
    still safetensors; 9 bytes or fewer, or a header longer than the file, go to the pickle reader."""
    from animatediff_suite.motion_modules.checkpoint_io import read_weights

    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)}
    save_file(tensors, str(tmp_path / f"renamed{ext}"), metadata={"note": "renamed"})
    data, metadata = read_weights(tmp_path / f"renamed{ext}")
    assert sorted(data) == ["a", "b"] and all(torch.equal(data[k], tensors[k]) for k in tensors)
    assert metadata == {"note": "renamed"}
    save_file({}, str(tmp_path / f"empty{ext}"), metadata={"only": "metadata"})
    assert read_weights(tmp_path / f"empty{ext}") == ({}, {"only": "metadata"})
    header = b'{"__metadata__":{}}'
    (tmp_path / f"long{ext}").write_bytes(struct.pack("<Q", len(header) + 1) + header)
    with pytest.raises(MotionModelError, match=rf"'long{ext}': refused to load: the pickle"):
        read_weights(tmp_path / f"long{ext}")  # not safetensors by its length: the pickle reader refuses it


@pytest.mark.parametrize("ext", [".ckpt", ".pt"])
@pytest.mark.parametrize("content, reader", [
    (b"abcdefgh", "pickle"),  # 8 bytes: too short for a header and its "{"
    (struct.pack("<Q", 0) + b"{}", "pickle"),  # a header of 0 bytes is no header
    (struct.pack("<Q", 1) + b"{" + bytes(4), "safetensors"),  # 1 byte is the shortest header
    (struct.pack("<Q", 6) + b"{" + bytes(4), "pickle"),  # 6 bytes claimed, 5 follow
    (struct.pack("<Q", 5) + b"{" + bytes(4), "safetensors"),  # exactly the 5 bytes that follow
    (struct.pack("<Q", 5) + b"[" + bytes(4), "pickle"),  # a header is a JSON object
], ids=["8-bytes", "length-0", "length-1", "longer-than-file", "fills-file", "no-brace"])
def test_the_first_bytes_choose_the_reader_of_a_pickle_named_file(tmp_path, ext, content, reader):
    """A `.ckpt`/`.pt` file goes to the safetensors reader exactly when byte 8 is "{" and the 8-byte length
    before it is at least 1 and at most the bytes that follow; otherwise to the pickle reader. Neither
    reads these bytes, and each error says which reader gave up."""
    from animatediff_suite.motion_modules.checkpoint_io import read_weights

    (tmp_path / f"odd{ext}").write_bytes(content)
    said = {"pickle": r"refused to load: the pickle|truncated or corrupt checkpoint",
            "safetensors": r"not a weight file \(unreadable safetensors header"}[reader]
    with pytest.raises(MotionModelError, match=rf"^'odd{ext}': ({said})"):
        read_weights(tmp_path / f"odd{ext}")


def test_describe_keys_lists_five_sorted_keys_unless_told():
    from animatediff_suite.motion_modules.errors import describe_keys

    keys = ["g", "b", "a", "f", "c", "e", "d"]
    assert describe_keys(keys) == "'a', 'b', 'c', 'd', 'e' (+2 more)"
    assert describe_keys(keys, 2) == "'a', 'b' (+5 more)"
    assert describe_keys(keys[:5]) == "'a', 'b', 'c', 'f', 'g'"

"""Bad inputs: each gives a MotionModelError that names the file and the problem."""

import json
import pickle
import struct
import zipfile

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


@pytest.mark.parametrize("forced", [False, True], ids=["", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"])
@pytest.mark.parametrize("style", ["torch_zip", "legacy_pickle"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, good_sd, style, forced, monkeypatch):
    """Also with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` (set by users for old checkpoints), which turns
    torch.load's default into full unpickling: the loaders pass ``weights_only=True`` themselves."""
    if forced:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
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


def _as_if_saved_on_cuda(path, zipped: bool) -> None:
    """Rewrite a CPU torch.save file so its storages say ``cuda:0``, as files saved from a GPU do (protocol-2
    pickles write the location as ``X`` + 4-byte length + text)."""
    cpu, cuda = b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"
    if not zipped:
        data = path.read_bytes()
        assert cpu in data
        path.write_bytes(data.replace(cpu, cuda))
        return
    with zipfile.ZipFile(path) as source:
        entries = [(info.filename, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for filename, data in entries:
            if filename.endswith("/data.pkl"):
                assert cpu in data
                data = data.replace(cpu, cuda)
            target.writestr(filename, data)


@pytest.mark.parametrize("zipped", [True, False], ids=["torch_zip", "legacy"])
def test_a_checkpoint_saved_from_a_gpu_is_read_onto_the_cpu(tmp_path, good_sd, zipped):
    """Most released .ckpt files were saved from CUDA tensors; they load on a machine without CUDA, and onto
    the CPU on any machine (the loader moves them to the model's device afterwards)."""
    from animatediff_suite.motion_modules.checkpoint_io import read_weights

    path = tmp_path / "gpu.ckpt"
    torch.save(good_sd, str(path), _use_new_zipfile_serialization=zipped)
    _as_if_saved_on_cuda(path, zipped)
    if not torch.cuda.is_available():  # the edit took: a plain load fails on this machine
        with pytest.raises(RuntimeError, match="on a CUDA device"):
            torch.load(str(path), weights_only=True)
    data, metadata = read_weights(path)
    assert metadata == {} and sorted(data) == sorted(good_sd)
    assert {v.device.type for v in data.values()} == {"cpu"}
    assert all(torch.equal(data[k], good_sd[k]) for k in good_sd)
    assert load_motion_model(path).spec.version == "v2"


PICKLE_REFUSED = ("'odd.ckpt': refused to load: the pickle contains objects other than tensors (only weights_only "
                  "loading is allowed; convert it to .safetensors). Detail: ")


@pytest.mark.parametrize("error, expected", [
    (pickle.UnpicklingError("Weights only load failed.\nsecond line"), PICKLE_REFUSED + "Weights only load failed."),
    (pickle.UnpicklingError(" \n "), PICKLE_REFUSED + "UnpicklingError"),
    (EOFError("Ran out of input"), "'odd.ckpt': truncated or corrupt checkpoint (EOFError)"),
    (zipfile.BadZipFile("bad magic"), "'odd.ckpt': truncated or corrupt checkpoint (BadZipFile)"),
    (KeyError("storages"), "'odd.ckpt': truncated or corrupt checkpoint, or not a weight file (KeyError: 'storages')"),
    (struct.error("unpack requires 4 bytes"),
     "'odd.ckpt': truncated or corrupt checkpoint, or not a weight file (error: unpack requires 4 bytes)"),
    (RuntimeError("PytorchStreamReader failed\nat frame 3"), "'odd.ckpt': truncated or corrupt checkpoint "
                                                             "(PytorchStreamReader failed)"),
], ids=["unpickling", "unpickling-blank", "eof", "bad-zip", "key", "struct", "runtime"])
def test_each_failure_of_the_pickle_reader_is_one_whole_sentence(tmp_path, monkeypatch, error, expected):
    """What torch.load raises, turned into the sentence the user reads (first line of torch's message only)."""
    from animatediff_suite.motion_modules.checkpoint_io import read_weights

    def fails(*args, **kwargs):
        raise error

    (tmp_path / "odd.ckpt").write_bytes(b"\x80\x02not really a pickle")
    monkeypatch.setattr(torch, "load", fails)
    with pytest.raises(MotionModelError) as raised:
        read_weights(tmp_path / "odd.ckpt")
    assert str(raised.value) == expected


def test_a_refused_pickle_quotes_the_first_line_of_torchs_reason(tmp_path, good_sd):
    path = tmp_path / "evil.ckpt"
    torch.save({**good_sd, "evil": _Marker(str(tmp_path / "PWNED"))}, str(path))
    with pytest.raises(pickle.UnpicklingError) as torch_says:
        torch.load(str(path), weights_only=True)
    first = str(torch_says.value).strip().splitlines()[0]
    with pytest.raises(MotionModelError) as raised:
        load_motion_model(path)
    assert str(raised.value) == PICKLE_REFUSED.replace("odd.ckpt", "evil.ckpt") + first


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize("header, data, expected", [
    ({"w": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8), "malformed header entry for 'w'"),
    ({"w": ["F32", [2], [0, 8]]}, bytes(8), "malformed header entry for 'w'"),
    ({"w": _entry(dtype="F12")}, bytes(8), "tensor 'w' has an invalid dtype/shape (F12, [2])"),
    ({"w": _entry(shape=(-1, -2), offsets=(0, 8))}, bytes(8), "tensor 'w' has an invalid dtype/shape (F32, [-1, -2])"),
    ({"w": _entry(shape=(2.5,))}, bytes(8), "tensor 'w' has an invalid dtype/shape (F32, [2.5])"),
    ({"w": _entry(shape=("2",))}, bytes(8), "tensor 'w' has an invalid dtype/shape (F32, ['2'])"),
    ({"w": _entry(shape=(1,) * 9, offsets=(0, 4))}, bytes(4),
     "tensor 'w' has an invalid dtype/shape (F32, [1, 1, 1, 1, 1, 1, 1, 1, 1])"),
    ({"w": _entry(offsets=(8, 0))}, bytes(8), "tensor 'w' has invalid data offsets [8, 0]"),
    ({"w": _entry(offsets=(-8, 0))}, bytes(8), "tensor 'w' has invalid data offsets [-8, 0]"),
    ({"w": _entry(offsets=(0.0, 8))}, bytes(8), "tensor 'w' has invalid data offsets [0.0, 8]"),
    ({"w": _entry(offsets=(0, 12))}, bytes(8),
     "truncated file: tensor 'w' ends at byte 12 of the data section, which holds only 8 bytes"),
    ({"w": _entry(shape=(3,))}, bytes(8), "tensor 'w' shape [3] does not match its byte size"),
], ids=["no-dtype", "not-a-dict", "dtype", "negative-dims", "float-dim", "text-dim", "nine-dims", "backwards",
        "negative-start", "float-offset", "past-the-end", "size"])
def test_each_bad_safetensors_entry_is_one_whole_sentence(tmp_path, header, data, expected):
    from animatediff_suite.motion_modules.checkpoint_io import read_weights

    path = _raw_safetensors(tmp_path / "h.safetensors", header, data)
    with pytest.raises(MotionModelError) as raised:
        read_weights(path)
    assert str(raised.value) == f"'h.safetensors': {expected}"


def test_the_largest_entry_the_checks_admit_loads(tmp_path):
    """Eight dimensions (the limit), every listed dtype's byte size, and an empty tensor all pass the checks."""
    from animatediff_suite.motion_modules.checkpoint_io import read_weights

    header = {"eight": _entry(shape=(1, 1, 1, 1, 1, 1, 1, 2), offsets=(0, 8)),
              "half": _entry("F16", (2,), (8, 12)), "byte": _entry("U8", (3,), (12, 15)),
              "empty": _entry("F64", (0, 5), (15, 15)), "__metadata__": {"s": "x"}}
    data, metadata = read_weights(_raw_safetensors(tmp_path / "ok.safetensors", header, bytes(15)))
    assert {k: (tuple(v.shape), v.dtype) for k, v in data.items()} == {
        "eight": ((1, 1, 1, 1, 1, 1, 1, 2), torch.float32), "half": ((2,), torch.float16),
        "byte": ((3,), torch.uint8), "empty": ((0, 5), torch.float64)}
    assert metadata == {"s": "x"}


@pytest.mark.parametrize("content, expected", [
    (b"\x05\x00", "truncated file (2 bytes; a safetensors header needs 8)"),
    (bytes(7), "truncated file (7 bytes; a safetensors header needs 8)"),
    (bytes(8), "not a weight file (unreadable safetensors header: Expecting value: line 1 column 1 (char 0))"),
    (struct.pack("<Q", 2**63 + 5) + b"{}", "safetensors header claims 9223372036854775813 bytes (limit 67108864); "
                                           "the file is corrupt or not a safetensors file"),
    (struct.pack("<Q", 64 * 1024 * 1024) + b"{}", "truncated file: header claims 67108864 bytes but only 2 follow"),
    (struct.pack("<Q", 5) + b"{}", "truncated file: header claims 5 bytes but only 2 follow"),
    (struct.pack("<Q", 10**12) + b"{}", "safetensors header claims 1000000000000 bytes (limit 67108864); the file is "
                                        "corrupt or not a safetensors file"),
    (struct.pack("<Q", 100) + b"{}", "truncated file: header claims 100 bytes but only 2 follow"),
    (struct.pack("<Q", 5) + b"hello", "not a weight file (unreadable safetensors header: Expecting value: line 1 "
                                      "column 1 (char 0))"),
    (struct.pack("<Q", 7) + b'{"\xff":1}', "not a weight file (unreadable safetensors header: 'utf-8' codec can't "
                                           "decode byte 0xff in position 2: invalid start byte)"),
    (struct.pack("<Q", 5) + b"[1,2]", "not a weight file (safetensors header is not a JSON object)"),
], ids=["short", "7-bytes", "8-bytes", "top-bit-length", "limit-length", "3-bytes-short", "absurd-length", "header-past-end", "not-json", "not-utf8", "not-an-object"])
def test_each_bad_safetensors_header_is_one_whole_sentence(tmp_path, content, expected):
    from animatediff_suite.motion_modules.checkpoint_io import read_weights

    (tmp_path / "h.safetensors").write_bytes(content)
    with pytest.raises(MotionModelError) as raised:
        read_weights(tmp_path / "h.safetensors")
    assert str(raised.value) == f"'h.safetensors': {expected}"


def test_missing_and_empty_files_and_too_many_entries_are_whole_sentences(tmp_path):
    from animatediff_suite.motion_modules.checkpoint_io import read_source, read_weights

    with pytest.raises(MotionModelError) as raised:
        read_weights(tmp_path / "nope.safetensors")
    assert str(raised.value) == f"'nope.safetensors': file not found ({tmp_path / 'nope.safetensors'})"
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(MotionModelError) as raised:
        read_weights(tmp_path / "empty.ckpt")
    assert str(raised.value) == "'empty.ckpt': the file is empty (0 bytes)"
    with pytest.raises(MotionModelError) as raised:
        read_source({f"k{i}": torch.zeros(1) for i in range(100_001)})
    assert str(raised.value) == "<state dict>: 100001 entries (limit 100000); refusing to load"
    at_limit = {f"k{i}": None for i in range(100_000)}
    assert read_source(at_limit) == ("<state dict>", at_limit, {})
    save_file({"a": torch.ones(2)}, str(tmp_path / "fine.safetensors"), metadata={"m": "1"})
    source, data, metadata = read_source(tmp_path / "fine.safetensors")
    assert (source, sorted(data), metadata) == ("'fine.safetensors'", ["a"], {"m": "1"})


def test_a_header_safetensors_itself_refuses_is_named_with_its_reason(tmp_path):
    """Entries with a gap between them pass the per-entry checks; safetensors refuses the file and its
    reason is quoted."""
    from safetensors.torch import load_file

    from animatediff_suite.motion_modules.checkpoint_io import read_weights

    path = _raw_safetensors(tmp_path / "gap.safetensors", {"a": _entry(shape=(1,), offsets=(0, 4)),
                                                           "b": _entry(shape=(1,), offsets=(8, 12))}, bytes(12))
    with pytest.raises(Exception) as library_says:
        load_file(str(path))
    with pytest.raises(MotionModelError) as raised:
        read_weights(path)
    assert str(raised.value) == f"'gap.safetensors': could not read safetensors file: {library_says.value}"


_P = "down_blocks.0.motion_modules.0.temporal_transformer."
_PE0 = _P + "transformer_blocks.0.attention_blocks.0.pos_encoder.pe"


def _changed(sd, drop=(), **put):
    """``sd`` without the keys starting with any of ``drop``, with ``put`` (``__`` for ``.``) set."""
    out = {k: v for k, v in sd.items() if not k.startswith(tuple(drop))} if drop else dict(sd)
    out.update({k.replace("__", "."): v for k, v in put.items()})
    return out


def _pe_everywhere(sd, shape_of):
    return {k: (torch.zeros(shape_of(v)) if k.endswith(".pos_encoder.pe") else v) for k, v in sd.items()}


_FILE_ERRORS = {
    # id: (state dict from the good v2 one, the whole message)
    "no-tensors": (lambda sd: {"animatediff_config": {"L": 16}}, "no tensors found; not a motion module"),
    "sd-checkpoint": (lambda sd: {k: torch.zeros(1) for k in ("a.b", "cond_stage_model.y", "first_stage_model.x",
                                                              "model.diffusion_model.out.0.weight")},
                      "not a motion module: none of its 4 tensors are temporal layers (e.g. 'a.b', "
                      "'cond_stage_model.y', 'first_stage_model.x' (+1 more)); is this an SD checkpoint or an "
                      "image LoRA?"),
    "stray": (lambda sd: _changed(sd, **{"down_blocks.0.motion_modules.0.weird": torch.zeros(1)}),
              "unexpected keys outside any motion module: 'down_blocks.0.motion_modules.0.weird'"),
    "65-modules": (lambda sd: _changed(sd, **{f"up_blocks.3.motion_modules.{i}.temporal_transformer.norm.weight":
                                              torch.zeros(1) for i in range(3, 47)}),
                   "65 motion modules (limit 64)"),
    "oblong-proj-in": (lambda sd: _changed(sd, **{_P + "proj_in.weight": torch.zeros(32, 16)}),
                       f"{_P}proj_in.weight should be a square (C, C) matrix, found (32, 16)"),
    "flat-proj-in": (lambda sd: _changed(sd, **{_P + "proj_in.weight": torch.zeros(32)}),
                     f"{_P}proj_in.weight should be a square (C, C) matrix, found (32,)"),
    "no-proj-in": (lambda sd: _changed(sd, drop=[_P + "proj_in.weight"]),
                   f"{_P}proj_in.weight should be a square (C, C) matrix, found None"),
    "48-channels": (lambda sd: _changed(sd, **{_P + "proj_in.weight": torch.zeros(48, 48)}),
                    "down_blocks.0.motion_modules.0 has 48 channels; expected a multiple of 32 up to 8192"),
    "0-channels": (lambda sd: _changed(sd, **{_P + "proj_in.weight": torch.zeros(0, 0)}),
                   "down_blocks.0.motion_modules.0 has 0 channels; expected a multiple of 32 up to 8192"),
    "8224-channels": (lambda sd: _changed(sd, **{_P + "proj_in.weight": torch.empty(8224, 8224, device="meta")}),
                      "down_blocks.0.motion_modules.0 has 8224 channels; expected a multiple of 32 up to 8192"),
    "8192-channels": (lambda sd: _changed(sd, **{_P + "proj_in.weight": torch.empty(8192, 8192, device="meta")}),
                      # the most channels allowed: the file then fails on its other 25 weights and 2 PE tables
                      "wrong shapes: " + "; ".join(f"{_P}{key} {have} (expected {want})" for key, have, want in (
                          ("norm.weight", (32,), (8192,)), ("norm.bias", (32,), (8192,)),
                          ("proj_in.bias", (32,), (8192,)),
                          ("transformer_blocks.0.attention_blocks.0.to_q.weight", (32, 32), (8192, 8192)),
                          ("transformer_blocks.0.attention_blocks.0.to_k.weight", (32, 32), (8192, 8192))))
                      + " (+22 more)"),
    "2-down-blocks": (lambda sd: _changed(sd, drop=["down_blocks.2", "down_blocks.3"]),
                      "motion modules in 2 down blocks; expected 4 (SD1.5) or 3 (SDXL): unsupported format"),
    "flat-pe": (lambda sd: _changed(sd, **{_PE0: torch.zeros(32, 32)}),
                f"{_PE0} should have shape (1, L, C), found (32, 32)"),
    "batched-pe": (lambda sd: _changed(sd, **{_PE0: torch.zeros(2, 32, 32)}),
                   f"{_PE0} should have shape (1, L, C), found (2, 32, 32)"),
    "pe-disagree": (lambda sd: _changed(sd, **{_PE0: torch.zeros(1, 24, 32)}),
                    "positional encodings disagree on the frame limit: [24, 32]"),
    "pe-4097": (lambda sd: _pe_everywhere(sd, lambda v: (1, 4097, v.shape[2])),
                "positional encoding of 4097 frames (limit 4096)"),
    "pe-0": (lambda sd: _pe_everywhere(sd, lambda v: (1, 0, v.shape[2])), "positional encoding of 0 frames (limit 4096)"),
    "v2-without-pe": (lambda sd: {k: v for k, v in sd.items() if not k.endswith(".pe")},
                      "v2 motion module without positional encodings (no '*.pos_encoder.pe' keys)"),
    "two-transformer-depths": (lambda sd: _changed(sd, **{_P + "transformer_blocks.1.norms.0.weight": torch.zeros(32)}),
                               "modules have differing or missing transformer blocks ([1, 2])"),
    "no-transformer-blocks": (lambda sd: _changed(sd, drop=[_P + "transformer_blocks."]),
                              "modules have differing or missing transformer blocks ([0, 1])"),
    "missing": (lambda sd: _changed(sd, drop=[_P + "norm.bias", _P + "proj_out.bias"]),
                f"2 missing keys for a SD1.5 v2 motion module: '{_P}norm.bias', '{_P}proj_out.bias'"),
    "unexpected": (lambda sd: _changed(sd, **{_P + "extra.weight": torch.zeros(1)}),
                   f"unexpected keys: '{_P}extra.weight'"),
    "pe-without-attention": (lambda sd: _changed(sd, **{
        _P + "transformer_blocks.0.attention_blocks.2.pos_encoder.pe": torch.zeros(1, 32, 32)}),
        f"unexpected keys: '{_P}transformer_blocks.0.attention_blocks.2.pos_encoder.pe'"),
    "wrong-shape": (lambda sd: _changed(sd, **{_P + "proj_out.weight": torch.zeros(32, 16)}),
                    f"wrong shapes: {_P}proj_out.weight (32, 16) (expected (32, 32))"),
    "wrong-pe-width": (lambda sd: _changed(sd, **{_PE0: torch.zeros(1, 32, 16)}),
                       f"wrong shapes: {_PE0} (1, 32, 16) (expected 32 x 32 channels)"),
    "six-wrong-shapes": (lambda sd: _changed(sd, **{_P + f"{name}.bias": torch.zeros(16) for name in (
        "norm", "proj_in", "proj_out", "transformer_blocks.0.norms.0", "transformer_blocks.0.norms.1",
        "transformer_blocks.0.ff_norm")}),
        "wrong shapes: " + "; ".join(f"{_P}{name}.bias (16,) (expected (32,))" for name in (
            "norm", "proj_in", "transformer_blocks.0.norms.0", "transformer_blocks.0.norms.1",
            "transformer_blocks.0.ff_norm")) + " (+1 more)"),  # in the model's order; proj_out's is the sixth
    "five-wrong-shapes": (lambda sd: _changed(sd, **{_P + f"{name}.bias": torch.zeros(16) for name in (
        "norm", "proj_in", "proj_out", "transformer_blocks.0.norms.0", "transformer_blocks.0.norms.1")}),
        "wrong shapes: " + "; ".join(f"{_P}{name}.bias (16,) (expected (32,))" for name in (
            "norm", "proj_in", "transformer_blocks.0.norms.0", "transformer_blocks.0.norms.1", "proj_out"))),
    "integer-weights": (lambda sd: {k: v.long() for k, v in sd.items()},
                        "weights are torch.int64; expected a floating-point dtype"),
    "nan": (lambda sd: _changed(sd, **{_P + "norm.bias": torch.full((32,), float("nan"))}),
            f"weights contain NaN or Inf values ('{_P}norm.bias'); the file is damaged or was saved from a "
            "diverged training run"),
}


@pytest.mark.parametrize("case", sorted(_FILE_ERRORS))
def test_each_motion_model_file_error_is_one_whole_sentence(good_sd, case):
    make, expected = _FILE_ERRORS[case]
    with pytest.raises(MotionModelError) as raised:
        load_motion_model(make(good_sd))
    assert str(raised.value) == f"<state dict>: {expected}"


def test_check_finite_lists_three_bad_entries_in_a_whole_sentence():
    from animatediff_suite.motion_modules.errors import check_finite

    weights = {k: torch.ones(3) for k in "abcdefg"}
    for k, value in zip("gecd", (float("nan"), float("inf"), -float("inf"), float("nan"))):
        weights[k][1] = value
    with pytest.raises(MotionModelError) as raised:
        check_finite(weights, "'x.ckpt'", what="MotionLoRA weights")
    assert str(raised.value) == ("'x.ckpt': MotionLoRA weights contain NaN or Inf values ('c', 'd', 'e' (+1 more)); "
                                 "the file is damaged or was saved from a diverged training run")
    weights = {"only": torch.tensor([1.0, float("inf")], dtype=torch.float64), "ok": torch.zeros(2, 2)}
    with pytest.raises(MotionModelError) as raised:
        check_finite(weights, "<state dict>")
    assert str(raised.value) == ("<state dict>: weights contain NaN or Inf values ('only'); the file is damaged or "
                                 "was saved from a diverged training run")
    check_finite({"grad": torch.ones(2, requires_grad=True), "not a tensor": [float("nan")]}, "<state dict>")


@pytest.mark.parametrize("length", [1, 4096])
def test_the_shortest_and_longest_pe_tables_load(good_sd, length):
    """PE tables of 1 and 4096 positions are the ends the frame-limit check admits (0 and 4097 are refused
    above)."""
    sd = _pe_everywhere(good_sd, lambda v: (1, length, v.shape[2]))
    spec = load_motion_model(sd).spec
    assert (spec.version, spec.pe_length) == ("v2", length)


@pytest.mark.parametrize("length, first_bytes", [(128, b"\x80\x00"), (0x4B50, b"PK")], ids=["0x80", "PK"])
def test_a_safetensors_header_whose_length_looks_like_a_pickle_is_still_safetensors(tmp_path, length, first_bytes):
    """A header of 128 bytes starts the file with 0x80 (a pickle's first byte), one of 19,280 bytes with "PK" (a
    zip's): the file is still read as safetensors, under any name."""
    from animatediff_suite.motion_modules.checkpoint_io import read_weights

    raw = json.dumps({"w": _entry(shape=(2,), offsets=(0, 8)), "__metadata__": {"m": "x"}}).encode()
    raw += b" " * (length - len(raw))  # safetensors pads headers with spaces too
    data = struct.pack("<f", 1.5) + struct.pack("<f", -2.0)
    for name in ("odd.safetensors", "odd.ckpt"):
        (tmp_path / name).write_bytes(struct.pack("<Q", length) + raw + data)
        assert (tmp_path / name).read_bytes()[:2] == first_bytes
        tensors, metadata = read_weights(tmp_path / name)
        assert tensors["w"].tolist() == [1.5, -2.0] and metadata == {"m": "x"}


def test_a_header_of_exactly_the_key_limit_is_read(tmp_path):
    from animatediff_suite.motion_modules.checkpoint_io import MAX_KEYS, check_safetensors_header

    header = {f"k{i}": _entry(shape=(0,), offsets=(0, 0)) for i in range(MAX_KEYS)}
    path = _raw_safetensors(tmp_path / "keys.safetensors", header)
    entries, metadata = check_safetensors_header(str(path), "keys.safetensors", path.stat().st_size)
    assert (len(entries), metadata, MAX_KEYS) == (100_000, {}, 100_000)

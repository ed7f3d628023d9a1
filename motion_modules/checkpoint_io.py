"""Safe reading of weight files: safetensors first, pickles only with ``weights_only=True``.

Every problem becomes a ``MotionModelError`` naming the file. Safetensors headers are checked
(size, key count, shapes against the file size) before a single tensor is allocated.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
import zipfile
from typing import Any, Mapping

import torch

from .errors import MotionModelError

MAX_HEADER_BYTES = 64 * 1024 * 1024
MAX_KEYS = 100_000
MAX_NDIM = 8
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}


def read_weights(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """Read a weight file into ``(state dict, safetensors metadata)`` without running code.

    The format is decided from the file's first bytes, not its name: safetensors is tried
    first; zip or legacy pickles go through ``torch.load(weights_only=True)``.
    """
    path = os.fspath(path)
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise MotionModelError(f"'{name}': file not found ({path})")
    size = os.path.getsize(path)
    if size == 0:
        raise MotionModelError(f"'{name}': the file is empty (0 bytes)")
    # a plausible safetensors header first: its 8-byte length can begin with a pickle's 0x80 or a zip's "PK"
    # (a header of 128 or 19,280 bytes), while a pickle's or a zip's first bytes read as a length past the end
    if _looks_like_safetensors(path, size):
        return _read_safetensors(path, name, size)
    with open(path, "rb") as handle:
        head = handle.read(2)
    if head == b"PK" or head[:1] == b"\x80" or path.lower().endswith(PICKLE_EXTENSIONS):
        return _read_pickle(path, name), {}
    return _read_safetensors(path, name, size)


def read_source(path_or_state_dict) -> tuple[str, Mapping[str, Any], dict[str, str]]:
    """``(name for messages, state dict, safetensors metadata)`` of a weight file path or an in-memory
    state dict (``"<state dict>"``, no metadata; refused above ``MAX_KEYS`` entries)."""
    if isinstance(path_or_state_dict, Mapping):
        source = "<state dict>"
        if len(path_or_state_dict) > MAX_KEYS:
            raise MotionModelError(f"{source}: {len(path_or_state_dict)} entries (limit {MAX_KEYS}); refusing to load")
        return source, path_or_state_dict, {}
    data, metadata = read_weights(path_or_state_dict)
    return f"'{os.path.basename(os.fspath(path_or_state_dict))}'", data, metadata


def _looks_like_safetensors(path: str, size: int) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 0 < length <= size - 8 and head[8:9] == b"{"


def check_safetensors_header(path: str, name: str, size: int) -> tuple[dict, dict[str, str]]:
    """Validate a safetensors header against the file size; return (tensor entries, metadata)."""
    if size < 8:
        raise MotionModelError(f"'{name}': truncated file ({size} bytes; a safetensors header needs 8)")
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > MAX_HEADER_BYTES:
            raise MotionModelError(
                f"'{name}': safetensors header claims {length} bytes (limit {MAX_HEADER_BYTES}); "
                "the file is corrupt or not a safetensors file")
        if length > size - 8:
            raise MotionModelError(
                f"'{name}': truncated file: header claims {length} bytes but only {size - 8} follow")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MotionModelError(f"'{name}': not a weight file (unreadable safetensors header: {exc})") from None
    if not isinstance(header, dict):
        raise MotionModelError(f"'{name}': not a weight file (safetensors header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if len(header) > MAX_KEYS:
        raise MotionModelError(f"'{name}': {len(header)} tensors (limit {MAX_KEYS}); refusing to load")
    data_size = size - 8 - length
    for key, entry in header.items():
        _check_entry(name, key, entry, data_size)
    return header, {str(k): str(v) for k, v in metadata.items()}


def _check_entry(name: str, key: str, entry: Any, data_size: int) -> None:
    try:
        dtype, shape, (start, end) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise MotionModelError(f"'{name}': malformed header entry for {key!r}") from None
    if dtype not in SAFETENSORS_DTYPE_BYTES or len(shape) > MAX_NDIM or any(
            not isinstance(d, int) or d < 0 for d in shape):
        raise MotionModelError(f"'{name}': tensor {key!r} has an invalid dtype/shape ({dtype}, {shape})")
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
        raise MotionModelError(f"'{name}': tensor {key!r} has invalid data offsets {entry['data_offsets']}")
    if end > data_size:
        raise MotionModelError(
            f"'{name}': truncated file: tensor {key!r} ends at byte {end} of the data section, "
            f"which holds only {data_size} bytes")
    if math.prod(shape) * SAFETENSORS_DTYPE_BYTES[dtype] != end - start:
        raise MotionModelError(f"'{name}': tensor {key!r} shape {shape} does not match its byte size")


def _read_safetensors(path: str, name: str, size: int) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors.torch import load_file

    _, metadata = check_safetensors_header(path, name, size)
    try:
        return load_file(path, device="cpu"), metadata
    except Exception as exc:  # safetensors raises its own error types
        raise MotionModelError(f"'{name}': could not read safetensors file: {exc}") from None


def _read_pickle(path: str, name: str) -> dict[str, Any]:
    try:
        # a file object, not the path: newer torch hands any path ending in .safetensors to safetensors
        with open(path, "rb") as handle:
            data = torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MotionModelError(
            f"'{name}': refused to load: the pickle contains objects other than tensors "
            f"(only weights_only loading is allowed; convert it to .safetensors). Detail: {first}"
        ) from None
    except (EOFError, zipfile.BadZipFile) as exc:
        raise MotionModelError(f"'{name}': truncated or corrupt checkpoint ({type(exc).__name__})") from None
    except (IndexError, KeyError, ValueError, TypeError, OverflowError, struct.error) as exc:
        # bytes that are no pickle at all trip the unpickler's own bookkeeping ("pop from empty list")
        raise MotionModelError(f"'{name}': truncated or corrupt checkpoint, or not a weight file "
                               f"({type(exc).__name__}: {exc})") from None
    except RuntimeError as exc:
        raise MotionModelError(f"'{name}': truncated or corrupt checkpoint ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, Mapping):
        raise MotionModelError(f"'{name}': expected a dict of tensors, found {type(data).__name__}")
    return dict(data)

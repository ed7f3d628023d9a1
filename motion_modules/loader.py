"""Public load/save API for motion models."""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import torch

from .checkpoint_io import read_source
from .errors import MotionModelError, check_finite
from .formats import check_keys_and_shapes, infer_spec, to_file_keys, to_original_keys, unwrap_state_dict
from .model import VERSIONS, MotionModel, MotionSpec

log = logging.getLogger(__name__)
SPEC_METADATA_KEY = "animatediff_suite.spec"


def load_motion_model(path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                      dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                      operations=None) -> MotionModel:
    """Load any supported motion-module checkpoint (file or state dict) as a MotionModel.

    Args:
        path_or_state_dict: a ``.safetensors``/``.ckpt``/``.pt``/``.pth`` path, or a state dict.
        dtype: weight dtype; defaults to the checkpoint's own (that of its first proj_in weight).
        device: where to put the weights.
        operations: layer namespace for ``MotionModel`` (default ``torch.nn``).

    Raises:
        MotionModelError: the file is not a usable motion module (the message says why).
    """
    source, data, metadata = read_source(path_or_state_dict)
    sd, naming = to_original_keys(unwrap_state_dict(data, source))
    spec = _spec_from_metadata(infer_spec(sd, naming, source), metadata, source)
    with torch.device("meta"):  # built once: its shapes are the ones checked (a second build cost 0.1 s)
        model = MotionModel(spec, zero_init=False, operations=operations or torch.nn)
    params = check_keys_and_shapes(sd, {k: v.shape for k, v in model.state_dict().items()}, spec, source)
    check_finite(params, source)
    if dtype is None:
        dtype = params[f"{spec.modules[0].prefix}.temporal_transformer.proj_in.weight"].dtype
    if not dtype.is_floating_point:
        raise MotionModelError(f"{source}: weights are {dtype}; expected a floating-point dtype")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in params.items()},
                          strict=True, assign=True)
    model.reset_positional_encodings()
    log.info("loaded motion model %s: %s", source, spec.describe())
    return model.eval().requires_grad_(False)


def _spec_from_metadata(spec: MotionSpec, metadata: Mapping[str, str], source: str) -> MotionSpec:
    """Keep a version label written by ``save_motion_model`` when the weights agree with it."""
    text = metadata.get(SPEC_METADATA_KEY)
    if not text:
        return spec
    try:
        saved = MotionSpec.from_json(text)
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("%s: ignoring unreadable %s metadata (%s)", source, SPEC_METADATA_KEY, exc)
        return spec
    same_structure = (saved.family, saved.modules, saved.transformer_layers, saved.heads) == (
        spec.family, spec.modules, spec.transformer_layers, spec.heads)
    same_pe = saved.pe_length == spec.pe_length or not spec.has_pe_keys
    if not (same_structure and same_pe and VERSIONS[saved.version][0] == spec.family):
        log.warning("%s: metadata spec does not match the weights; using the weights", source)
        return spec
    return saved


def save_motion_model(model: MotionModel, path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write ``model`` to a ``.safetensors`` file with its original key names and its spec.

    PE tables are written (recomputed) for formats whose files carry them, so other tools
    that expect ``pos_encoder.pe`` keys can read the file.
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    if not path.lower().endswith(".safetensors"):
        raise MotionModelError(f"'{os.path.basename(path)}': motion models are saved as .safetensors only")
    extra = dict(metadata or {})
    bad = [k for k, v in extra.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise MotionModelError(f"safetensors metadata must map str to str; bad entries: {bad[:5]}")
    extra[SPEC_METADATA_KEY] = model.spec.to_json()
    extra.setdefault("format", "pt")
    tensors = to_file_keys({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                           model.spec)
    save_file(tensors, path, metadata=extra)

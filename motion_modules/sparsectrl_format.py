"""Reading SparseCtrl files: the released ``v3_sd15_sparsectrl_*.ckpt`` and diffusers' ``SparseControlNetModel``.

Both share the spatial names (``down_blocks.N.resnets/attentions/downsamplers``, ``mid_block``,
``controlnet_*``); their motion modules differ as a motion model's do (REFERENCE §2): the original
``motion_modules.N.temporal_transformer.transformer_blocks.0.attention_blocks.0`` / ``norms.0`` /
``ff_norm`` are diffusers' ``motion_modules.N.transformer_blocks.0.attn1`` / ``norm1`` / ``norm3``.
PE tables (``pos_encoder.pe``, ``pos_embed.pe``) are recomputed, never loaded. The layout is read
from the weights; only the attention head counts (8, as in both releases) are not stored.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Mapping

import torch

from .checkpoint_io import read_source
from .errors import MotionModelError, check_finite, describe_keys
from .formats import MAX_CHANNELS, MAX_PE_LENGTH, _DIFFUSERS_RENAMES
from .sparsectrl import SparseCtrlModel, SparseCtrlSpec
from .temporal import reset_positional_encodings

log = logging.getLogger(__name__)
MAX_BLOCKS = 8
_PE_KEY = re.compile(r"\.(pos_encoder|pos_embed)\.pe$")
_PREFIXES = ("module.", "controlnet.", "model.")


def load_sparsectrl(path_or_state_dict: str | os.PathLike | Mapping[str, Any], dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu", operations=None) -> SparseCtrlModel:
    """Load a SparseCtrl file (or state dict) in either naming as a ``SparseCtrlModel``.

    Args:
        path_or_state_dict: a ``.safetensors``/``.ckpt``/``.pt``/``.pth`` path, or a state dict.
        dtype: weight dtype; defaults to the file's own (that of ``conv_in.weight``).
        device: where to put the weights.
        operations: layer namespace for ``SparseCtrlModel`` (default ``torch.nn``).

    Raises:
        MotionModelError: the file is not a usable SparseCtrl model (the message says why).
    """
    source, data, _ = read_source(path_or_state_dict)
    sd, pe_length = to_original_keys(unwrap(data, source), source)
    spec = infer_spec(sd, pe_length, source)
    check_keys_and_shapes(sd, spec, source)
    check_finite(sd, source)
    if dtype is None:
        dtype = sd["conv_in.weight"].dtype
    if not dtype.is_floating_point:
        raise MotionModelError(f"{source}: weights are {dtype}; expected a floating-point dtype")
    with torch.device("meta"):
        model = SparseCtrlModel(spec, operations=operations or torch.nn)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
    reset_positional_encodings(model, device, dtype)
    log.info("loaded %s: %s", source, spec.describe())
    return model.eval().requires_grad_(False)


def unwrap(data: Mapping[str, Any], source: str) -> dict[str, torch.Tensor]:
    """The tensors of a file: inside a ``controlnet``/``state_dict``/``module`` wrapper, without
    ``module.``-style prefixes and non-tensor entries (``animatediff_config``)."""
    for wrapper in ("controlnet", "state_dict", "module"):
        inner = data.get(wrapper)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            data = inner
            break
    tensors = {}
    for key, value in data.items():
        if isinstance(key, str) and isinstance(value, torch.Tensor):
            for prefix in _PREFIXES:
                if key.startswith(prefix) and not key.startswith("controlnet_"):
                    key = key[len(prefix):]
            tensors[key] = value
    if not tensors:
        raise MotionModelError(f"{source}: no tensors found; not a SparseCtrl model")
    if "controlnet_cond_embedding.weight" in tensors or "controlnet_cond_embedding.conv_in.weight" in tensors:
        return tensors
    if any(k.startswith(("input_hint_block.", "zero_convs.", "control_model.")) for k in tensors):
        hint = "it is an ordinary ControlNet: load it with ComfyUI's Load ControlNet Model"
    elif all(".motion_modules." in k for k in tensors):
        hint = "it is a motion model: load it with Load Motion Model"
    else:
        hint = f"it has no 'controlnet_cond_embedding' weights (found e.g. {describe_keys(tensors, 3)})"
    raise MotionModelError(f"{source}: not a SparseCtrl model: {hint}")


def to_original_keys(sd: dict[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], int | None]:
    """diffusers motion-module names -> original ones; drop the PE tables. Returns (dict, PE length or None)."""
    diffusers = not any(".temporal_transformer." in k for k in sd)
    out, lengths = {}, set()
    for key, value in sd.items():
        if _PE_KEY.search(key):
            if value.ndim == 3:
                lengths.add(int(value.shape[1]))
            continue
        if diffusers and ".motion_modules." in key:
            key = re.sub(r"\.motion_modules\.(\d+)\.", r".motion_modules.\1.temporal_transformer.", key)
            for old, new in _DIFFUSERS_RENAMES:
                key = key.replace(old, new)
        out[key] = value
    if len(lengths) > 1:
        raise MotionModelError(f"{source}: positional encodings disagree on the frame limit: {sorted(lengths)}")
    return out, (lengths.pop() if lengths else None)


def _count(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _shape(sd: Mapping[str, torch.Tensor], key: str, ndim: int, source: str) -> torch.Size:
    value = sd.get(key)
    if value is None or value.ndim != ndim:
        found = None if value is None else tuple(value.shape)
        raise MotionModelError(f"{source}: '{key}' should be a {ndim}-d tensor, found {found}")
    if any(not 0 < s <= MAX_CHANNELS for s in value.shape[:2]):
        raise MotionModelError(f"{source}: '{key}' has shape {tuple(value.shape)} (limit {MAX_CHANNELS} channels)")
    return value.shape


def infer_spec(sd: dict[str, torch.Tensor], pe_length: int | None, source: str) -> SparseCtrlSpec:
    """The ``SparseCtrlSpec`` of original-named weights, from their shapes."""
    blocks = _count(sd, r"down_blocks\.(\d+)\.")
    if not 0 < blocks <= MAX_BLOCKS:
        raise MotionModelError(f"{source}: {blocks} down blocks; expected 1 to {MAX_BLOCKS} (SD1.5 has 4)")
    channels = tuple(int(_shape(sd, f"down_blocks.{i}.resnets.0.conv1.weight", 4, source)[0]) for i in range(blocks))
    cross = tuple(f"down_blocks.{i}.attentions.0.proj_in.weight" in sd for i in range(blocks))
    layers = _count(sd, r"down_blocks\.0\.resnets\.(\d+)\.")
    first_attention = next((i for i, c in enumerate(cross) if c), None)
    if first_attention is None:
        raise MotionModelError(f"{source}: no spatial transformers in any down block; not an SD1.5-style SparseCtrl")
    prefix = f"down_blocks.{first_attention}.attentions.0"
    depth = _count(sd, re.escape(prefix) + r"\.transformer_blocks\.(\d+)\.")
    context = int(_shape(sd, f"{prefix}.transformer_blocks.0.attn2.to_k.weight", 2, source)[1])
    linear_projection = sd[f"{prefix}.proj_in.weight"].ndim == 2
    if "controlnet_cond_embedding.weight" in sd:
        simplified, widths = True, SparseCtrlSpec.embedding_channels
        condition = int(_shape(sd, "controlnet_cond_embedding.weight", 4, source)[1]) - 1
    else:
        simplified = False
        conv_in = _shape(sd, "controlnet_cond_embedding.conv_in.weight", 4, source)
        condition = int(conv_in[1]) - 1
        steps = _count(sd, r"controlnet_cond_embedding\.blocks\.(\d+)\.") // 2  # (conv, stride-2 conv) pairs
        widths = (int(conv_in[0]),) + tuple(
            int(_shape(sd, f"controlnet_cond_embedding.blocks.{2 * j - 1}.weight", 4, source)[0])
            for j in range(1, steps + 1))
    if condition < 1:
        raise MotionModelError(f"{source}: the condition embedding takes {condition + 1} channel(s); expected "
                               "the condition's channels plus one for the keyframe mask")
    if pe_length is not None and not 0 < pe_length <= MAX_PE_LENGTH:
        raise MotionModelError(f"{source}: positional encoding of {pe_length} frames (limit {MAX_PE_LENGTH})")
    try:
        return SparseCtrlSpec(channels, cross, condition, simplified, widths, layers, depth, context,
                              pe_length=pe_length or 32, linear_projection=linear_projection)
    except ValueError as exc:
        raise MotionModelError(f"{source}: unsupported SparseCtrl layout: {exc}") from None


def check_keys_and_shapes(sd: dict[str, torch.Tensor], spec: SparseCtrlSpec, source: str) -> None:
    """Raise unless ``sd`` has exactly the parameters of ``spec``, with their shapes."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in SparseCtrlModel(spec).state_dict().items()}
    missing, unexpected = set(expected) - set(sd), set(sd) - set(expected)
    if missing:
        raise MotionModelError(f"{source}: {len(missing)} missing keys for a {spec.kind} SparseCtrl: "
                               f"{describe_keys(missing)}")
    if unexpected:
        raise MotionModelError(f"{source}: unexpected keys for a {spec.kind} SparseCtrl: {describe_keys(unexpected)}")
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {tuple(s)})" for k, s in expected.items() if sd[k].shape != s]
    if wrong:
        raise MotionModelError(f"{source}: wrong shapes: {'; '.join(wrong[:5])}"
                               + (f" (+{len(wrong) - 5} more)" if len(wrong) > 5 else ""))

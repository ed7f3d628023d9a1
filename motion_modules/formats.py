"""Checkpoint formats: unwrap, rename to original AnimateDiff keys, infer the MotionSpec.

Detection uses keys and shapes only (never file names), following REFERENCE §2:
HotShotXL names modules ``temporal_attentions.N`` with ``pos_encoder.positional_encoding``;
diffusers' MotionAdapter uses ``attn1/attn2/norm1..3`` and ``pos_embed.pe``; AnimateLCM has
no PE tables; a mid block means v2; PE length 24 means v1; 3 down blocks means SDXL.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch

from .errors import MotionModelError, describe_keys
from .model import ANIMATELCM_PE_LENGTH, VERSIONS, ModuleSpec, MotionModel, MotionSpec
from .temporal import sinusoidal_pe

MAX_CHANNELS = 8192
MAX_PE_LENGTH = 4096
MAX_MODULES = 64
FAMILY_BY_DOWN_BLOCKS = {4: "SD1.5", 3: "SDXL"}

_MODULE_RE = re.compile(
    r"^(?P<block>down_blocks\.\d+|up_blocks\.\d+|mid_block)\.motion_modules\.(?P<index>\d+)"
    r"\.temporal_transformer\.(?P<rest>.+)$"
)
_BLOCK_START_RE = re.compile(r"(?:^|\.)((?:down_blocks|up_blocks)\.\d+\.|mid_block\.)")
_PE_SUFFIX = ".pos_encoder.pe"

# diffusers MotionAdapter -> original names (REFERENCE §2), applied after inserting
# ".temporal_transformer" behind "motion_modules.N".
_DIFFUSERS_RENAMES = (
    (".norm1.", ".norms.0."), (".norm2.", ".norms.1."), (".norm3.", ".ff_norm."),
    (".attn1.", ".attention_blocks.0."), (".attn2.", ".attention_blocks.1."),
)


def _is_motion_key(key: str) -> bool:
    return ".motion_modules." in key or ".temporal_attentions." in key


def unwrap_state_dict(data: Mapping[str, Any], source: str) -> dict[str, torch.Tensor]:
    """Strip wrappers: ``state_dict``/``module`` dicts, non-tensor entries, key prefixes such as
    ``module.`` or ``unet.``, and every non-motion key of whole-UNet training dumps."""
    for wrapper in ("state_dict", "module", "model"):
        inner = data.get(wrapper) if isinstance(data, Mapping) else None
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            data = inner
            break
    tensors = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise MotionModelError(f"{source}: no tensors found; not a motion module")
    motion = {}
    for key, value in tensors.items():
        if not _is_motion_key(key):
            continue
        start = _BLOCK_START_RE.search(key)
        if start is None:
            continue
        motion[key[start.start(1):]] = value
    if not motion:
        raise MotionModelError(f"{source}: not a motion module: none of its {len(tensors)} tensors are "
                               f"temporal layers (e.g. {describe_keys(tensors, 3)}); "
                               "is this an SD checkpoint or an image LoRA?")
    return motion


def to_original_keys(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Rename HotShotXL or diffusers keys to original AnimateDiff keys; return (dict, naming)."""
    if any(".temporal_attentions." in k for k in sd):
        out = {}
        for key, value in sd.items():
            key = re.sub(r"\.temporal_attentions\.(\d+)\.", r".motion_modules.\1.temporal_transformer.", key)
            out[key.replace(".pos_encoder.positional_encoding", _PE_SUFFIX)] = value
        return out, "hotshotxl"
    if any(".temporal_transformer." in k for k in sd):
        return dict(sd), "animatediff"
    out = {}
    for key, value in sd.items():
        key = re.sub(r"\.motion_modules\.(\d+)\.", r".motion_modules.\1.temporal_transformer.", key)
        for old, new in _DIFFUSERS_RENAMES:
            key = key.replace(old, new)
        if key.endswith(".pos_embed.pe"):  # one table per block; the original has one per attention
            base = key[: -len(".pos_embed.pe")]
            for j in (0, 1):
                out[f"{base}.attention_blocks.{j}{_PE_SUFFIX}"] = value
            continue
        out[key] = value
    return out, "diffusers"


def _group_modules(sd: dict[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    stray = []
    for key, value in sd.items():
        match = _MODULE_RE.match(key)
        if match is None:
            stray.append(key)
            continue
        prefix = f"{match['block']}.motion_modules.{match['index']}"
        modules.setdefault(prefix, {})[match["rest"]] = value
    if stray:
        raise MotionModelError(f"{source}: unexpected keys outside any motion module: {describe_keys(stray)}")
    if len(modules) > MAX_MODULES:
        raise MotionModelError(f"{source}: {len(modules)} motion modules (limit {MAX_MODULES})")
    return modules


def _sort_key(prefix: str) -> tuple[int, int, int]:
    block, index = prefix.split(".motion_modules.")
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}[block.split(".")[0]]
    block_index = int(block.split(".")[1]) if "." in block else 0
    return order, block_index, int(index)


def _channels(prefix: str, tensors: dict[str, torch.Tensor], source: str) -> int:
    weight = tensors.get("proj_in.weight")
    if weight is None or weight.ndim != 2 or weight.shape[0] != weight.shape[1]:
        found = None if weight is None else tuple(weight.shape)
        raise MotionModelError(f"{source}: {prefix}.temporal_transformer.proj_in.weight should be a square "
                               f"(C, C) matrix, found {found}")
    channels = int(weight.shape[0])
    if not 0 < channels <= MAX_CHANNELS or channels % 32:
        raise MotionModelError(f"{source}: {prefix} has {channels} channels; expected a multiple of 32 "
                               f"up to {MAX_CHANNELS}")
    return channels


def _pe_length(modules: dict[str, dict[str, torch.Tensor]], source: str) -> int | None:
    lengths = set()
    for prefix, tensors in modules.items():
        for rest, value in tensors.items():
            if rest.endswith(_PE_SUFFIX):
                if value.ndim != 3 or value.shape[0] != 1:
                    raise MotionModelError(f"{source}: {prefix}.temporal_transformer.{rest} should have shape "
                                           f"(1, L, C), found {tuple(value.shape)}")
                lengths.add(int(value.shape[1]))
    if len(lengths) > 1:
        raise MotionModelError(f"{source}: positional encodings disagree on the frame limit: {sorted(lengths)}")
    if not lengths:
        return None
    length = next(iter(lengths))
    if not 0 < length <= MAX_PE_LENGTH:
        raise MotionModelError(f"{source}: positional encoding of {length} frames (limit {MAX_PE_LENGTH})")
    return length


def _transformer_layers(tensors: dict[str, torch.Tensor]) -> int:
    indices = {int(m.group(1)) for k in tensors if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def infer_spec(sd: dict[str, torch.Tensor], naming: str, source: str) -> MotionSpec:
    """Infer the MotionSpec from original-named motion keys and their shapes."""
    modules = _group_modules(sd, source)
    ordered = sorted(modules, key=_sort_key)
    channels = {p: _channels(p, modules[p], source) for p in ordered}  # bounded before anything else
    down_blocks = {p.split(".motion_modules.")[0] for p in ordered if p.startswith("down_blocks.")}
    family = FAMILY_BY_DOWN_BLOCKS.get(len(down_blocks))
    if family is None:
        raise MotionModelError(f"{source}: motion modules in {len(down_blocks)} down blocks; expected 4 "
                               "(SD1.5) or 3 (SDXL): unsupported format")
    pe_length = _pe_length(modules, source)
    has_mid = any(p.startswith("mid_block.") for p in ordered)
    if naming == "hotshotxl":
        version = "hotshotxl"
    elif family == "SDXL":
        version = "sdxl_beta"
    elif has_mid:
        version = "v2"
    elif pe_length is None:
        version = "animatelcm"
    else:
        version = "v1" if pe_length == 24 else "v3"
    if pe_length is None:
        if version != "animatelcm":
            raise MotionModelError(f"{source}: {version} motion module without positional encodings "
                                   f"(no '*{_PE_SUFFIX}' keys)")
        pe_length = ANIMATELCM_PE_LENGTH
    layers = {_transformer_layers(t) for t in modules.values()}
    if len(layers) != 1 or 0 in layers:
        raise MotionModelError(f"{source}: modules have differing or missing transformer blocks ({sorted(layers)})")
    return MotionSpec(
        family=family, version=version, pe_length=pe_length, norm_mode=VERSIONS[version][1],
        modules=tuple(ModuleSpec(p, channels[p]) for p in ordered),
        transformer_layers=layers.pop(), has_pe_keys=version != "animatelcm",
    )


def expected_shapes(spec: MotionSpec) -> dict[str, torch.Size]:
    """Original key -> shape for a spec (parameters only; PE tables are recomputed)."""
    with torch.device("meta"):
        model = MotionModel(spec, zero_init=False)
    return {k: v.shape for k, v in model.state_dict().items()}


def check_keys_and_shapes(sd: dict[str, torch.Tensor], expected: Mapping[str, torch.Size], spec: MotionSpec,
                          source: str) -> dict[str, torch.Tensor]:
    """Return the parameters of ``sd`` (PE tables dropped) after checking their keys and shapes against
    ``expected`` (key -> shape of the model about to be filled: ``expected_shapes(spec)``, or a loader's own)."""
    params = {k: v for k, v in sd.items() if not k.endswith(_PE_SUFFIX)}
    missing = set(expected) - set(params)
    unexpected = set(params) - set(expected)
    pe_owner = {k: k[: -len(_PE_SUFFIX)] + ".to_q.weight" for k in sd if k.endswith(_PE_SUFFIX)}
    unexpected |= {k for k, owner in pe_owner.items() if owner not in expected}
    if missing:
        raise MotionModelError(f"{source}: {len(missing)} missing keys for a {spec.family} {spec.version} "
                               f"motion module: {describe_keys(missing)}")
    if unexpected:
        raise MotionModelError(f"{source}: unexpected keys: {describe_keys(unexpected)}")
    wrong = [f"{k} {tuple(params[k].shape)} (expected {tuple(shape)})"
             for k, shape in expected.items() if params[k].shape != shape]
    wrong += [f"{k} {tuple(sd[k].shape)} (expected {spec.pe_length if spec.has_pe_keys else 'L'} x "
              f"{expected[owner][0]} channels)"
              for k, owner in pe_owner.items() if sd[k].shape[-1] != expected[owner][0]]
    if wrong:
        raise MotionModelError(f"{source}: wrong shapes: {'; '.join(wrong[:5])}"
                               + (f" (+{len(wrong) - 5} more)" if len(wrong) > 5 else ""))
    return params


def to_file_keys(sd: dict[str, torch.Tensor], spec: MotionSpec) -> dict[str, torch.Tensor]:
    """Original keys -> the naming of ``spec``'s source format (adds recomputed PE tables)."""
    out = dict(sd)
    if spec.has_pe_keys:
        for key, value in sd.items():
            if key.endswith(".attention_blocks.0.to_q.weight") or key.endswith(".attention_blocks.1.to_q.weight"):
                pe = sinusoidal_pe(spec.pe_length, value.shape[0]).to(value.dtype)
                out[key[: -len(".to_q.weight")] + _PE_SUFFIX] = pe
    if spec.key_style == "hotshotxl":
        out = {re.sub(r"\.motion_modules\.(\d+)\.temporal_transformer\.", r".temporal_attentions.\1.", k)
               .replace(_PE_SUFFIX, ".pos_encoder.positional_encoding"): v for k, v in out.items()}
    return out


def parameter_count(spec: MotionSpec) -> int:
    return sum(math.prod(s) for s in expected_shapes(spec).values())

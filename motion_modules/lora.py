"""MotionLoRA and domain-adapter maths (original AnimateDiff LoRA format, REFERENCE §2).

A LoRA here is a set of ``(up, down)`` pairs keyed by the weight they modify. Applying it
means ``W + strength * (up @ down)`` with no rank or alpha rescaling; several add up.
The core only computes deltas: the caller adds them (ComfyUI "diff" patches, or
``merged_parameters`` + ``torch.func.functional_call``), so loaded weights are never changed.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from .checkpoint_io import read_weights
from .errors import MotionModelError, check_finite, describe_keys
from .model import MotionModel

log = logging.getLogger(__name__)

_LORA_RE = re.compile(
    r"^(?P<target>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<side>down|up)\.weight$")
_BLOCK_START_RE = re.compile(r"(?:^|\.)((?:down_blocks|up_blocks)\.\d+\.|mid_block\.)")


@dataclass(frozen=True)
class LoRA:
    """Parsed LoRA: target weight key -> (up (out, r), down (r, in)); ``name`` for messages."""

    name: str
    pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def ranks(self) -> set[int]:
        return {down.shape[0] for _, down in self.pairs.values()}

    @property
    def is_motion(self) -> bool:
        return all(".motion_modules." in k for k in self.pairs)


def load_lora(path_or_state_dict: str | os.PathLike | Mapping[str, Any], kind: str = "LoRA") -> LoRA:
    """Read an original-format LoRA (MotionLoRA or domain adapter) and pair its matrices."""
    if isinstance(path_or_state_dict, Mapping):
        name, data = "<state dict>", path_or_state_dict
    else:
        name = f"'{os.path.basename(os.fspath(path_or_state_dict))}'"
        data, _ = read_weights(path_or_state_dict)
    inner = data.get("state_dict")
    if isinstance(inner, Mapping):
        data = inner
    tensors = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    halves: dict[str, dict[str, torch.Tensor]] = {}
    foreign = []
    for key, value in tensors.items():
        match = _LORA_RE.match(key)
        if match is None:
            foreign.append(key)
            continue
        target = match["target"]
        start = _BLOCK_START_RE.search(target)
        target = target[start.start(1):] if start else target
        proj = "to_out.0" if match["proj"] == "to_out" else match["proj"]
        halves.setdefault(f"{target}.{proj}.weight", {})[match["side"]] = value
    if not halves:
        hint = " (kohya/image-LoRA naming)" if any(k.startswith("lora_unet_") for k in tensors) else ""
        raise MotionModelError(f"{name}: not an AnimateDiff-format {kind}{hint}: expected keys like "
                               f"'...processor.to_q_lora.down.weight', found {describe_keys(tensors, 3)}")
    if foreign:
        raise MotionModelError(f"{name}: unexpected keys in a {kind}: {describe_keys(foreign)}")
    check_finite(tensors, name, what=f"{kind} weights")
    return LoRA(name, {t: _pair(name, t, h) for t, h in halves.items()})


def _pair(name: str, target: str, halves: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if set(halves) != {"up", "down"}:
        raise MotionModelError(f"{name}: {target} has only a '{next(iter(halves))}' matrix; "
                               "LoRA pairs need both up and down")
    up, down = halves["up"], halves["down"]
    if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
        raise MotionModelError(f"{name}: {target}: up {tuple(up.shape)} and down {tuple(down.shape)} "
                               "do not form (out, r) @ (r, in)")
    return up, down


def lora_deltas(loras: Sequence[tuple[LoRA, float]], target_shapes: Mapping[str, torch.Size],
                skippable_prefixes: Sequence[str] = (), dtype: torch.dtype = torch.float32,
                ) -> dict[str, torch.Tensor]:
    """Sum ``strength * up @ down`` per target, after checking every LoRA fits the targets.

    Args:
        loras: (LoRA, strength) pairs; any strength, negative included.
        target_shapes: weight key -> shape of the model being patched.
        skippable_prefixes: targets under these prefixes that the model lacks are skipped
            with a warning instead of being an error (a v2 MotionLoRA's mid block on v3).
        dtype: compute dtype of the deltas.
    """
    plan = []
    for lora, strength in loras:
        skipped = []
        for target, (up, down) in lora.pairs.items():
            if target not in target_shapes:
                if any(target.startswith(p) for p in skippable_prefixes):
                    skipped.append(target)
                    continue
                missing = [t for t in lora.pairs if t not in target_shapes]
                raise MotionModelError(f"{lora.name}: {len(missing)} LoRA targets do not exist in the model: "
                                       f"{describe_keys(missing)}")
            shape = torch.Size((up.shape[0], down.shape[1]))
            if shape != target_shapes[target]:
                raise MotionModelError(f"{lora.name}: {target}: LoRA gives {tuple(shape)} but the model "
                                       f"weight is {tuple(target_shapes[target])}")
            plan.append((target, up, down, strength))
        if skipped:
            log.warning("%s: skipped %d LoRA targets the model does not have (%s)",
                        lora.name, len(skipped), describe_keys(skipped, 2))
    deltas: dict[str, torch.Tensor] = {}
    for target, up, down, strength in plan:
        delta = strength * (up.to(dtype) @ down.to(dtype))
        deltas[target] = deltas[target] + delta if target in deltas else delta
    return deltas


def motion_lora_deltas(model: MotionModel, loras: Sequence[tuple[LoRA, float]]) -> dict[str, torch.Tensor]:
    """Deltas for a MotionModel's weights (original keys); computed in fp32, or fp64 for fp64 models."""
    for lora, _ in loras:
        if not lora.is_motion:
            raise MotionModelError(f"{lora.name}: not a MotionLoRA (targets outside motion modules, e.g. "
                                   f"{describe_keys([k for k in lora.pairs if '.motion_modules.' not in k], 2)})")
    state = model.state_dict()
    dtype = torch.float64 if next(iter(state.values())).dtype == torch.float64 else torch.float32
    skippable = () if model.spec.has_mid_block else ("mid_block.",)
    shapes = {k: v.shape for k, v in state.items()}
    return lora_deltas(loras, shapes, skippable, dtype)


def merged_parameters(model: torch.nn.Module, deltas: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """New tensors ``W + delta`` for ``torch.func.functional_call``; the model is untouched."""
    params = dict(model.named_parameters())
    unknown = set(deltas) - set(params)
    if unknown:
        raise MotionModelError(f"deltas for weights the model does not have: {describe_keys(unknown)}")
    return {k: (params[k] + d.to(params[k].device, params[k].dtype)) for k, d in deltas.items()}


def load_domain_adapter(path_or_state_dict: str | os.PathLike | Mapping[str, Any]) -> LoRA:
    """Read a domain adapter (v3_sd15_adapter): a LoRA on the UNet's spatial attention layers.

    Its targets use diffusers UNet names, e.g.
    ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight``.
    """
    lora = load_lora(path_or_state_dict, kind="domain adapter")
    foreign = [k for k in lora.pairs if ".motion_modules." in k or ".attentions." not in k]
    if foreign:
        raise MotionModelError(f"{lora.name}: not a domain adapter: targets outside the UNet's spatial "
                               f"attention layers, e.g. {describe_keys(foreign, 2)} (a MotionLoRA?)")
    return lora

"""MotionSpec (what a checkpoint is) and MotionModel (all its temporal modules)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .temporal import (ATTENTION_BACKENDS, NORM_MODES, TemporalSelfAttention, VanillaTemporalModule,
                       reset_positional_encodings)

FAMILIES = ("SD1.5", "SDXL")
# version -> (family, norm mode, naming of the original file)
VERSIONS = {
    "v1": ("SD1.5", "per_frame", "animatediff"),
    "v2": ("SD1.5", "per_frame", "animatediff"),
    "v3": ("SD1.5", "per_frame", "animatediff"),
    "animatelcm": ("SD1.5", "per_frame", "animatediff"),
    "sdxl_beta": ("SDXL", "across_frames", "animatediff"),
    "hotshotxl": ("SDXL", "per_frame", "hotshotxl"),
}
# AnimateLCM files carry no PE table; ADE and AnimateLCM's own config use 64 positions.
ANIMATELCM_PE_LENGTH = 64


@dataclass(frozen=True)
class ModuleSpec:
    """One temporal module: its original key prefix and channel count."""

    prefix: str
    channels: int

    @property
    def block(self) -> str:
        """The block holding the module, e.g. ``down_blocks.1`` or ``mid_block``."""
        return self.prefix.split(".motion_modules.")[0]

    @property
    def index(self) -> int:
        """The module's position within its block."""
        return int(self.prefix.split(".motion_modules.")[1])

    @property
    def kind(self) -> str:
        """``down_blocks``, ``mid_block`` or ``up_blocks``."""
        return self.block.split(".")[0]

    @property
    def block_index(self) -> int:
        """The block's number among its kind (0 for the mid block)."""
        kind, _, number = self.block.partition(".")
        return int(number) if number else 0


@dataclass(frozen=True)
class MotionSpec:
    """Everything needed to rebuild a motion model; inferred from a checkpoint's weights.

    Args:
        family: "SD1.5" (4 down blocks) or "SDXL" (3 down blocks).
        version: one of ``VERSIONS`` ("v1", "v2", "v3", "animatelcm", "sdxl_beta", "hotshotxl").
        pe_length: rows of the positional encoding = the most frames one pass can see.
        norm_mode: "per_frame" (GroupNorm statistics per frame) or "across_frames".
        modules: every temporal module, in checkpoint order.
        heads: attention heads (8 in every published checkpoint).
        transformer_layers: transformer blocks per module (1 in every published checkpoint).
        has_pe_keys: whether the file stores PE tables (AnimateLCM's do not).
    """

    family: str
    version: str
    pe_length: int
    norm_mode: str
    modules: tuple[ModuleSpec, ...]
    heads: int = 8
    transformer_layers: int = 1
    has_pe_keys: bool = True

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; expected one of {sorted(FAMILIES)}")
        if self.version not in VERSIONS:
            raise ValueError(f"unknown version {self.version!r}; expected one of {sorted(VERSIONS)}")
        if self.norm_mode not in NORM_MODES:
            raise ValueError(f"unknown norm mode {self.norm_mode!r}; expected one of {sorted(NORM_MODES)}")

    @property
    def frame_limit(self) -> int:
        return self.pe_length

    @property
    def has_mid_block(self) -> bool:
        return any(m.prefix.startswith("mid_block.") for m in self.modules)

    @property
    def key_style(self) -> str:
        return VERSIONS[self.version][2]

    @property
    def channels(self) -> dict[str, int]:
        """Channels per block, e.g. ``{"down_blocks.0": 320, ..., "mid_block": 1280}``."""
        return {m.block: m.channels for m in self.modules}

    @classmethod
    def standard(cls, version: str, channels: tuple[int, ...], layers_per_block: int = 2,
                 pe_length: int | None = None, mid_block: bool | None = None) -> "MotionSpec":
        """The original layout for ``version``: ``layers_per_block`` modules in each down block, one
        more in each up block, a mid block for v2. ``channels`` are the down blocks' widths.

        Example: ``MotionSpec.standard("v3", (320, 640, 1280, 1280))`` is v3_sd15_mm's layout.
        """
        family, norm_mode, _ = VERSIONS[version]
        mid_block = (version == "v2") if mid_block is None else mid_block
        pe_length = pe_length or {"v1": 24, "animatelcm": ANIMATELCM_PE_LENGTH}.get(version, 32)
        modules = [ModuleSpec(f"down_blocks.{i}.motion_modules.{j}", c)
                   for i, c in enumerate(channels) for j in range(layers_per_block)]
        if mid_block:
            modules.append(ModuleSpec("mid_block.motion_modules.0", channels[-1]))
        modules += [ModuleSpec(f"up_blocks.{i}.motion_modules.{j}", c)
                    for i, c in enumerate(reversed(channels)) for j in range(layers_per_block + 1)]
        return cls(family, version, pe_length, norm_mode, tuple(modules), has_pe_keys=version != "animatelcm")

    def with_norm_mode(self, norm_mode: str) -> "MotionSpec":
        return dataclasses.replace(self, norm_mode=norm_mode)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MotionSpec":
        data = json.loads(text)
        data["modules"] = tuple(ModuleSpec(**m) for m in data["modules"])
        return cls(**data)

    def describe(self) -> str:
        mid = "mid block" if self.has_mid_block else "no mid block"
        return (f"{self.family} {self.version}, {len(self.modules)} modules ({mid}), "
                f"up to {self.frame_limit} frames, norm {self.norm_mode}")


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.motion_modules = nn.ModuleList()


class MotionModel(nn.Module):
    """All temporal modules of one checkpoint, laid out so ``state_dict()`` has original keys.

    Args:
        spec: the layout to build.
        zero_init: zero ``proj_out`` so a new model is an exact identity.
        operations: namespace providing ``Linear``, ``GroupNorm`` and ``LayerNorm`` (default
            ``torch.nn``); a host application can pass its own casting layers.
    """

    def __init__(self, spec: MotionSpec, zero_init: bool = True, operations=nn):
        super().__init__()
        self.spec = spec
        self.down_blocks = nn.ModuleDict()
        self.up_blocks = nn.ModuleDict()
        self.mid_block = None
        for module in spec.modules:
            block = self._block(module.block)
            if module.index != len(block.motion_modules):
                raise ValueError(f"modules of {module.block} are not numbered 0..n in order")
            block.motion_modules.append(VanillaTemporalModule(
                module.channels, spec.heads, spec.pe_length, spec.norm_mode,
                spec.transformer_layers, zero_init=zero_init, ops=operations,
            ))

    def _block(self, block_name: str) -> _Block:
        if block_name == "mid_block":
            if self.mid_block is None:
                self.mid_block = _Block()
            return self.mid_block
        kind, index = block_name.split(".")
        blocks = self.down_blocks if kind == "down_blocks" else self.up_blocks
        if index not in blocks:
            blocks[index] = _Block()
        return blocks[index]

    def named_temporal_modules(self) -> Iterator[tuple[str, VanillaTemporalModule]]:
        """Yield ``(original key prefix, module)``, e.g. ``("down_blocks.0.motion_modules.1", m)``."""
        modules = dict(self.named_modules())
        for spec in self.spec.modules:
            yield spec.prefix, modules[spec.prefix]

    def reset_positional_encodings(self) -> None:
        """Recompute every PE table (after building on the meta device, or a dtype change)."""
        reset_positional_encodings(self, self._param_device(), self._param_dtype())

    def _param_device(self) -> torch.device:
        return next(self.parameters()).device

    def _param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def set_norm_mode(self, norm_mode: str) -> "MotionModel":
        """Switch GroupNorm statistics between per-frame and across-frame (for every module)."""
        if norm_mode not in NORM_MODES:
            raise ValueError(f"unknown norm mode {norm_mode!r}; expected one of {sorted(NORM_MODES)}")
        self.spec = self.spec.with_norm_mode(norm_mode)
        for _, module in self.named_temporal_modules():
            module.temporal_transformer.norm_mode = norm_mode
        return self

    def set_attention_backend(self, name: str) -> "MotionModel":
        """Choose the attention kernel of every module: "auto" (default: "naive" for at most
        ``temporal.AUTO_NAIVE_FRAMES`` frames on the CPU, else "sdpa"), "sdpa" or "naive" (reference)."""
        if name not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}; expected one of {sorted(ATTENTION_BACKENDS)}")
        for module in self.modules():
            if isinstance(module, TemporalSelfAttention):
                module.backend = name
        return self

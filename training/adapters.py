"""Trainable LoRAs as ComfyUI weight wrappers, and their export to files other tools load.

A ``LoRAWeight`` is attached with ``ModelPatcher.add_weight_wrapper``: ComfyUI's casting layers call
it with the (cast) frozen weight and use ``W + up @ down`` in the forward, so gradients reach
``up`` and ``down`` while the base weight is never replaced or copied into the model (ComfyUI's own
``TrainLoraNode`` trains the same way). ``up`` starts at zero, so training starts from the base.

Targets:
- temporal (MotionLoRA): q/k/v/out of every temporal attention of the motion model;
- spatial (domain adapter / MotionDirector's spatial LoRA): q/k/v/out of the UNet's self- and
  cross-attention (``attn1``/``attn2``), the layers of the v3 domain adapter.
"""

from __future__ import annotations

import re

import torch

TEMPORAL_TARGET = re.compile(r"^(.*\.attention_blocks\.\d+)\.(to_q|to_k|to_v|to_out\.0)\.weight$")
SPATIAL_TARGET = re.compile(r"^diffusion_model\.(.*\.transformer_blocks\.\d+\.attn[12])\.(to_q|to_k|to_v|to_out\.0)\.weight$")


class LoRAWeight(torch.nn.Module):
    """``weight -> weight + up @ down`` with a trainable rank-r pair (MotionLoRA convention: no alpha)."""

    def __init__(self, shape: torch.Size, rank: int, generator: torch.Generator):
        super().__init__()
        out_features, in_features = shape[0], int(torch.Size(shape[1:]).numel())
        rank = min(rank, out_features, in_features)
        self.down = torch.nn.Parameter(torch.randn(rank, in_features, generator=generator) / rank)
        self.up = torch.nn.Parameter(torch.zeros(out_features, rank))
        self.frozen = False  # MotionDirector's temporal path uses the spatial LoRA without training it
        self.enabled = True  # MotionDirector's spatial path runs without the temporal LoRA

    def delta(self) -> torch.Tensor:
        return self.up @ self.down

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        delta = self.delta()
        if self.frozen:
            delta = delta.detach()
        return weight + delta.to(weight.dtype).view(weight.shape)

    def move_to(self, device=None) -> int:  # ModelPatcher moves weight functions with the model
        if device is not None:
            self.to(device=device)
        return sum(p.numel() * p.element_size() for p in self.parameters())


def make_loras(state_shapes: dict[str, torch.Size], pattern: re.Pattern, rank: int,
               generator: torch.Generator) -> dict[str, LoRAWeight]:
    """One LoRAWeight per weight key matching ``pattern`` (in key order, so seeds give the same init)."""
    return {key: LoRAWeight(shape, rank, generator) for key, shape in sorted(state_shapes.items())
            if pattern.match(key)}


def attach(patcher, loras: dict[str, LoRAWeight]) -> None:
    """Register ``loras`` as weight wrappers of ``patcher`` (a clone we own)."""
    for key, lora in loras.items():
        patcher.add_weight_wrapper(key, lora)


def motion_lora_state_dict(loras: dict[str, LoRAWeight]) -> dict[str, torch.Tensor]:
    """Temporal LoRAs in the original MotionLoRA key format (REFERENCE §2), as our loader and
    other AnimateDiff tools read it: ``<attention>.processor.to_q_lora.{up,down}.weight``."""
    state = {}
    for key, lora in loras.items():
        match = TEMPORAL_TARGET.match(key)
        proj = match[2].replace(".0", "")
        base = f"{match[1]}.processor.{proj}_lora"
        state[f"{base}.up.weight"] = lora.up.detach().float().cpu().contiguous()
        state[f"{base}.down.weight"] = lora.down.detach().float().cpu().contiguous()
    return state


def sd_lora_state_dict(loras: dict[str, LoRAWeight], diffusers_names: dict[str, str]) -> dict[str, torch.Tensor]:
    """Spatial LoRAs in the kohya SD LoRA format that ComfyUI's LoraLoader (and A1111, Forge) apply:
    ``lora_unet_<diffusers key with _>.lora_{up,down}.weight`` and ``.alpha`` = rank (scale 1).

    Args:
        diffusers_names: ComfyUI weight key (``diffusion_model.…``) -> diffusers UNet key.
    """
    state = {}
    for key, lora in loras.items():
        name = "lora_unet_" + diffusers_names[key][:-len(".weight")].replace(".", "_")
        state[f"{name}.lora_up.weight"] = lora.up.detach().float().cpu().contiguous()
        state[f"{name}.lora_down.weight"] = lora.down.detach().float().cpu().contiguous()
        state[f"{name}.alpha"] = torch.tensor(float(lora.down.shape[0]))
    return state

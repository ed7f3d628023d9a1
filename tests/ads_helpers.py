"""Tiny motion models in every checkpoint format, built from fixed seeds."""

from __future__ import annotations

import re

import pytest
import torch

from animatediff_suite.motion_modules import MotionModel, MotionModelError, MotionSpec, sinusoidal_pe
from animatediff_suite.motion_modules.model import VERSIONS

TINY_SD15 = (32, 64, 64, 64)
TINY_SDXL = (32, 64, 64)
FULL_SD15 = (320, 640, 1280, 1280)
FULL_SDXL = (320, 640, 1280)


def make_spec(version: str, channels=None, pe_length=None, down_layers=2, mid=None) -> MotionSpec:
    """Original layout of ``version`` at tiny width (or ``channels``)."""
    family = VERSIONS[version][0]
    channels = channels or (TINY_SD15 if family == "SD1.5" else TINY_SDXL)
    return MotionSpec.standard(version, channels, down_layers, pe_length, mid)


def random_model(spec: MotionSpec, seed: int = 0, dtype=torch.float32) -> MotionModel:
    """A MotionModel with every parameter random (norm affines and proj_out included)."""
    model = MotionModel(spec, zero_init=False).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float64).to(dtype)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.1 * noise)
            elif param.ndim == 2:
                param.copy_(noise / param.shape[1] ** 0.5)
            else:
                param.copy_(0.1 * noise)
    model.reset_positional_encodings()
    return model.eval()


def original_state_dict(model: MotionModel, with_pe: bool = True, pe_dtype=None) -> dict[str, torch.Tensor]:
    """Original AnimateDiff keys, PE tables included like the published files."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if with_pe:
        for key in list(sd):
            if re.search(r"\.attention_blocks\.\d+\.to_q\.weight$", key):
                pe = sinusoidal_pe(model.spec.pe_length, sd[key].shape[0])
                sd[key.replace(".to_q.weight", ".pos_encoder.pe")] = pe.to(pe_dtype or sd[key].dtype)
    return sd


def to_hotshot(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {re.sub(r"\.motion_modules\.(\d+)\.temporal_transformer\.", r".temporal_attentions.\1.", k)
            .replace(".pos_encoder.pe", ".pos_encoder.positional_encoding"): v for k, v in sd.items()}


def to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original -> diffusers MotionAdapter naming (one pos_embed table per transformer block)."""
    out = {}
    for key, value in sd.items():
        key = (key.replace(".temporal_transformer", "").replace(".norms.0", ".norm1")
               .replace(".norms.1", ".norm2").replace(".ff_norm", ".norm3")
               .replace(".attention_blocks.0", ".attn1").replace(".attention_blocks.1", ".attn2"))
        if key.endswith(".attn1.pos_encoder.pe"):
            out[key.replace(".attn1.pos_encoder.pe", ".pos_embed.pe")] = value
        elif not key.endswith(".pos_encoder.pe"):
            out[key] = value
    return out


def from_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers MotionAdapter naming -> original (written independently of the loader)."""
    out = {}
    for key, value in sd.items():
        if key.endswith("pos_embed.pe"):
            base = re.sub(r"motion_modules\.(\d+)\.", r"motion_modules.\1.temporal_transformer.", key)
            for j in (0, 1):
                out[base.replace(".pos_embed.pe", f".attention_blocks.{j}.pos_encoder.pe")] = value
            continue
        key = re.sub(r"motion_modules\.(\d+)\.", r"motion_modules.\1.temporal_transformer.", key)
        key = (key.replace(".norm1.", ".norms.0.").replace(".norm2.", ".norms.1.")
               .replace(".norm3.", ".ff_norm.").replace(".attn1.", ".attention_blocks.0.")
               .replace(".attn2.", ".attention_blocks.1."))
        out[key] = value
    return out


def pe_formula(positions, dim: int) -> torch.Tensor:
    """(len(positions), dim) in float64: pe[p, 2i] = sin(p / 10000^(2i/d)), pe[p, 2i+1] = cos(p / 10000^(2i/d))."""
    angle = torch.as_tensor(positions, dtype=torch.float64)[:, None] / 10000 ** (
        torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return torch.stack([angle.sin(), angle.cos()], dim=-1).reshape(len(positions), dim)


def frames_input(channels: int, frames: int, batch: int = 2, size: int = 4, seed: int = 1,
                 dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch * frames, channels, size, size, generator=gen, dtype=torch.float64).to(dtype)


def motion_lora_state_dict(spec: MotionSpec, rank: int = 4, seed: int = 3, mid=True) -> dict[str, torch.Tensor]:
    """Original-format MotionLoRA over every attention projection of ``spec``."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for module in spec.modules:
        if module.prefix.startswith("mid_block") and not mid:
            continue
        for j in (0, 1):
            base = f"{module.prefix}.temporal_transformer.transformer_blocks.0.attention_blocks.{j}.processor"
            for proj in ("to_q", "to_k", "to_v", "to_out"):
                c = module.channels
                sd[f"{base}.{proj}_lora.down.weight"] = torch.randn(rank, c, generator=gen) / c ** 0.5
                sd[f"{base}.{proj}_lora.up.weight"] = torch.randn(c, rank, generator=gen) / rank ** 0.5
    return sd


def _random_pair(gen, out_features: int, in_features: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    down = torch.randn(rank, in_features, generator=gen) / in_features ** 0.5
    up = torch.randn(out_features, rank, generator=gen) / rank ** 0.5
    return up, down


def tiny_domain_adapter_state_dict(rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random domain adapter (original naming) for the tiny UNet's spatial attention layers."""
    import re

    import comfy.supported_models
    import comfy.utils

    from animatediff_suite.nodes.demo import TINY_UNET

    model_config = comfy.supported_models.SD15(dict(TINY_UNET))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in model_config.get_model({}).diffusion_model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    pattern = re.compile(r"^(.*attentions\.\d+\.transformer_blocks\.\d+\.attn[12])\.(to_q|to_k|to_v|to_out\.0)\.weight$")
    for diffusers_key, comfy_key in sorted(comfy.utils.unet_to_diffusers(model_config.unet_config).items()):
        match = pattern.match(diffusers_key)
        if match and comfy_key in shapes:
            out_features, in_features = shapes[comfy_key]
            proj = match[2].replace(".0", "")
            up, down = _random_pair(gen, out_features, in_features, rank)
            base = f"{match[1]}.processor.{proj}_lora"
            sd[f"{base}.up.weight"], sd[f"{base}.down.weight"] = up, down
    return sd


def released_sparsectrl(model) -> dict:
    """A SparseCtrl model as the released v3_sd15_sparsectrl_*.ckpt files hold it: under a ``controlnet``
    key, with an ``animatediff_config`` entry and a PE table beside each temporal attention."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for key, value in list(sd.items()):
        if key.endswith(".attention_blocks.0.to_q.weight"):
            sd[key.replace(".to_q.weight", ".pos_encoder.pe")] = sinusoidal_pe(32, value.shape[0])
    return {"controlnet": sd, "animatediff_config": {"L": 16}}


def raised_message(call, error=MotionModelError) -> str:
    """The whole message of the ``error`` that ``call()`` raises (tests compare it with a sentence)."""
    with pytest.raises(error) as raised:
        call()
    return str(raised.value)

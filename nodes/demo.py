"""A tiny SD1.5-shaped model, CLIP, VAE, CLIP vision, matching motion model and ControlNet, built from a seed.

For trying the pack (and testing it) with no downloads: the graph runs exactly like a real
one, through the stock nodes, but the weights are random, so the frames are coloured noise.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
from comfy.ldm.models.autoencoder import AutoencoderKL
from .comfy_compat import io, new_model_patcher

from ..motion_modules import MotionModel, MotionSpec
from ..motion_modules.sparsectrl import SparseCtrlModel, SparseCtrlSpec
from .injection import LoadedMotionModel, wrap_motion_model
from .sockets import CATEGORY, MOTION_MODEL
from .validation import check_widgets

TINY_CHANNELS = (32, 64, 64, 64)
TINY_UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [0, 0, 0] + [1] * 9,
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 32,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
TINY_SDXL_CHANNELS = (32, 64, 64)
# The tiny CLIP's pooled output has 32 features; SDXL's ADM vector appends 6 x 256 size embeddings.
TINY_SDXL_UNET = {
    **TINY_UNET, "adm_in_channels": 32 + 6 * 256, "num_classes": "sequential",
    "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 2],
    "transformer_depth": [0, 0, 1, 1, 1, 1], "transformer_depth_output": [1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_linear_in_transformer": True,
}
FAMILY_VERSIONS = {"SD1.5": ("v3", "v2", "v1"), "SDXL": ("sdxl_beta", "hotshotxl")}
TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
             "num_hidden_layers": 2, "projection_dim": 32}
TINY_CLIP_VISION = {"hidden_act": "gelu", "hidden_size": 32, "image_size": 32, "intermediate_size": 64,
                    "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 4,
                    "num_channels": 3, "num_hidden_layers": 2, "patch_size": 8, "projection_dim": 24}
TINY_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


def seeded_fill_(module: torch.nn.Module, seed: int, gain: float = 1.0) -> torch.nn.Module:
    """Overwrite every parameter with seeded values: norms ~1, matrices ~N(0, 1/fan_in), biases small."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if param.ndim == 1 and "norm" in name and name.endswith("weight"):
                value = 1 + 0.05 * noise
            elif param.ndim >= 2:
                value = gain * noise / param[0].numel() ** 0.5
            else:
                value = 0.02 * noise
            param.copy_(value.to(param.dtype))
    return module


def tiny_model(seed: int = 0, family: str = "SD1.5", disable_dynamic: bool = False) -> comfy.model_patcher.ModelPatcher:
    """A tiny UNet of the given family ("SD1.5": 4 levels, "SDXL": 3 levels with an ADM input)."""
    if family == "SDXL":
        config = comfy.supported_models.SDXL(dict(TINY_SDXL_UNET))
        config.unet_config["num_head_channels"] = 8
    else:
        config = comfy.supported_models.SD15(dict(TINY_UNET))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    seeded_fill_(model.diffusion_model, seed)
    with torch.no_grad():
        model.diffusion_model.out[2].weight.mul_(30)  # noise predictions of roughly unit scale
    model.requires_grad_(False)
    return new_model_patcher(model, rebuild=(tiny_model, (seed, family)),
                             disable_dynamic=disable_dynamic)


def tiny_clip(seed: int = 0) -> comfy.sd.CLIP:
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, model_options={"clip_l_model_config": dict(TINY_CLIP)})
    seeded_fill_(clip.cond_stage_model, seed + 1).requires_grad_(False)
    return clip


def tiny_clip_vision(seed: int = 0, **overrides):
    """A ComfyUI ClipVisionModel of a tiny config (24-feature image embeddings unless ``projection_dim`` is
    overridden), random weights."""
    import comfy.clip_vision

    handle, path = tempfile.mkstemp(suffix=".json")  # ClipVisionModel reads its config from a file
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as config:
            json.dump({**TINY_CLIP_VISION, **overrides}, config)
        vision = comfy.clip_vision.ClipVisionModel(path)
    finally:
        os.remove(path)
    seeded_fill_(vision.model, seed + 6).requires_grad_(False)
    return vision


def tiny_vae(seed: int = 0) -> comfy.sd.VAE:
    params = {"ddconfig": dict(TINY_VAE), "embed_dim": 4}
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoencoderKL(**params).state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 2)
    state = {k: (1 + 0.05 * torch.randn(s, generator=gen)) if "norm" in k and k.endswith("weight")
             else torch.randn(s, generator=gen) / (torch.Size(s[1:]).numel() ** 0.5 if len(s) > 1 else 50)
             for k, s in shapes.items()}
    vae = comfy.sd.VAE(sd=state, config={"params": params})
    vae.first_stage_model.requires_grad_(False)
    return vae


def tiny_controlnet(seed: int = 0, family: str = "SD1.5"):
    """A ControlNet (RGB hints) matching the tiny UNet of ``family``, random weights."""
    import comfy.cldm.cldm
    import comfy.controlnet

    unet = TINY_SDXL_UNET if family == "SDXL" else TINY_UNET
    config = {k: v for k, v in unet.items()
              if k not in ("out_channels", "transformer_depth_output", "use_temporal_resblock", "use_temporal_attention")}
    heads = {"num_heads": -1, "num_head_channels": 8} if family == "SDXL" else {"num_heads": 8, "num_head_channels": -1}
    network = comfy.cldm.cldm.ControlNet(hint_channels=3, **heads, **config)
    seeded_fill_(network, seed + 4).requires_grad_(False)
    return comfy.controlnet.ControlNet(network, load_device=comfy.model_management.get_torch_device(),
                                       manual_cast_dtype=None)


def tiny_motion_model(seed: int = 0, version: str = "v3", operations=comfy.ops.manual_cast) -> MotionModel:
    channels = TINY_SDXL_CHANNELS if version in FAMILY_VERSIONS["SDXL"] else TINY_CHANNELS
    model = MotionModel(MotionSpec.standard(version, channels), zero_init=False, operations=operations)
    seeded_fill_(model, seed + 3, gain=0.5)
    return model.eval().requires_grad_(False)


def tiny_motion_patcher(seed: int = 0, version: str = "v3") -> LoadedMotionModel:
    return wrap_motion_model(tiny_motion_model(seed, version), f"tiny demo {version} (seed {seed})")


def tiny_sparsectrl(seed: int = 0, kind: str = "rgb", operations=comfy.ops.manual_cast) -> SparseCtrlModel:
    """A SparseCtrl encoder matching the tiny SD1.5 UNet (scribble: a 8-16-16-32 hint encoder), random weights."""
    spec = dataclasses.replace(SparseCtrlSpec.sd15(kind, TINY_CHANNELS, cross_attention_dim=TINY_UNET["context_dim"]),
                               embedding_channels=(8, 16, 16, 32))
    model = SparseCtrlModel(spec, operations=operations)
    seeded_fill_(model, seed + 5, gain=0.5)
    return model.eval().requires_grad_(False)


class TinyDemoModels(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADS_TinyDemoModels",
            display_name="Tiny Demo Models (AnimateDiff, no download)",
            category=f"{CATEGORY}/demo",
            description="Builds a tiny random SD1.5-shaped model, CLIP, VAE and a matching motion model "
                        "in memory, to try a workflow end to end without downloads. Frames are noise-like.",
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of the random weights (kept as set: no randomize after queueing)."),
                io.Combo.Input("family", options=list(FAMILY_VERSIONS), default="SD1.5",
                               tooltip="Shape of the tiny model: SD1.5 (4 UNet levels) or SDXL (3 levels)."),
                io.Combo.Input("motion_version", options=[v for vs in FAMILY_VERSIONS.values() for v in vs],
                               default="v3", tooltip="Layout of the demo motion model; must suit the family "
                                                     "(v1/v2/v3 for SD1.5, sdxl_beta/hotshotxl for SDXL)."),
            ],
            outputs=[io.Model.Output(tooltip="A tiny random SD1.5- or SDXL-shaped model."),
                     io.Clip.Output(tooltip="Its tiny text encoder."), io.Vae.Output(tooltip="Its tiny VAE."),
                     MOTION_MODEL.Output(display_name="MOTION_MODEL", tooltip="A matching motion model, for "
                                                                               "Apply Motion Model."),
                     io.ControlNet.Output(tooltip="A tiny ControlNet for RGB hint images, matching MODEL.")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        widgets = check_widgets(cls, values)
        if widgets is not True:
            return widgets
        family, motion_version = values.get("family", "SD1.5"), values.get("motion_version", "v3")
        if motion_version not in FAMILY_VERSIONS.get(family, ()):
            return f"motion_version {motion_version!r} does not fit family {family!r}; " \
                   f"expected one of {list(FAMILY_VERSIONS.get(family, ()))}"
        return True

    @classmethod
    def execute(cls, seed: int, family: str = "SD1.5", motion_version: str = "v3") -> io.NodeOutput:
        return io.NodeOutput(tiny_model(seed, family), tiny_clip(seed), tiny_vae(seed),
                             tiny_motion_patcher(seed, motion_version), tiny_controlnet(seed, family))


NODES = [TinyDemoModels]

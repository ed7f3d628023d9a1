"""Write what a run trained as files other tools load, into ComfyUI's model folders.

- temporal LoRA (motion_lora, motion_director): a MotionLoRA in the original key format, in
  ``models/animatediff_motion_lora`` (Load MotionLoRA, ADE and the original code read it);
- motion model (motion_module): original keys, no ``module.`` prefix, in ``models/animatediff_models``;
- spatial LoRA (domain_adapter, motion_director): a kohya SD LoRA in ``models/loras`` (LoraLoader);
- Semantic Motion Predictor (semantic_motion_predictor): its spec in the metadata, in
  ``models/animatediff_motion_predictor`` (Load Semantic Motion Predictor).
Every file carries the run's config and step count in its safetensors metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

from safetensors.torch import save_file

import comfy.utils
import folder_paths

from ..motion_modules import save_motion_model
from ..motion_modules.motion_predictor import save_predictor
from ..nodes.folders import MOTION_LORAS, MOTION_MODELS, MOTION_PREDICTORS
from .adapters import motion_lora_state_dict, sd_lora_state_dict
from .checkpoints import atomic_write, check_writable

log = logging.getLogger(__name__)
CONFIG_METADATA_KEY = "animatediff_suite.training"


def metadata(config, steps: int, kind: str) -> dict[str, str]:
    return {CONFIG_METADATA_KEY: config.to_json(), "animatediff_suite.training_steps": str(steps),
            "animatediff_suite.kind": kind, "format": "pt"}


def destination(folder_name: str, file_name: str) -> str:
    """``file_name`` in the first folder ComfyUI lists under ``folder_name`` (created if needed)."""
    folder = folder_paths.get_folder_paths(folder_name)[0]
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, file_name)


def output_folders(config) -> list[str]:
    """The model folders this run's files go to."""
    kinds = {"motion_lora": [MOTION_LORAS], "motion_module": [MOTION_MODELS], "domain_adapter": ["loras"],
             "motion_director": [MOTION_LORAS, "loras"], "semantic_motion_predictor": [MOTION_PREDICTORS]}[config.mode]
    return [folder_paths.get_folder_paths(kind)[0] for kind in kinds]


def check_destinations(config) -> None:
    """Before the first step: the folders the trained files go to are writable."""
    for folder in output_folders(config):
        check_writable(folder, 2 ** 20)


def save_outputs(config, result, model) -> dict[str, str]:
    """Write the trained weights of ``result`` (a TrainResult); returns {kind: path}."""
    trainables, steps, written = result.trainables, result.steps, {}
    if trainables.temporal:
        path = destination(MOTION_LORAS, f"{config.name}.safetensors")
        state = motion_lora_state_dict(trainables.temporal)
        atomic_write(path, lambda temp: save_file(state, temp, metadata=metadata(config, steps, "motion_lora")))
        written["motion_lora"] = path
    if trainables.motion_model is not None:
        path = destination(MOTION_MODELS, f"{config.name}.safetensors")
        atomic_write(path, lambda temp: save_motion_model(trainables.motion_model, temp,  # temp ends .safetensors
                                                          metadata=metadata(config, steps, "motion_module")))
        written["motion_module"] = path
    if trainables.predictor is not None:
        path = destination(MOTION_PREDICTORS, f"{config.name}.safetensors")
        atomic_write(path, lambda temp: save_predictor(trainables.predictor, temp,  # temp ends .safetensors
                                                       metadata=metadata(config, steps, "motion_predictor")))
        written["motion_predictor"] = path
    if trainables.spatial:
        suffix = "_spatial" if config.mode == "motion_director" else ""
        path = destination("loras", f"{config.name}{suffix}.safetensors")
        names = diffusers_names(model)
        state = sd_lora_state_dict(trainables.spatial, names)
        atomic_write(path, lambda temp: save_file(state, temp, metadata=metadata(config, steps, "sd_lora")))
        written["sd_lora"] = path
    for kind, path in written.items():
        log.info("wrote %s: %s", kind, path)
    return written


def diffusers_names(model) -> dict[str, str]:
    """ComfyUI UNet weight key (``diffusion_model.…``) -> diffusers key, for kohya LoRA names."""
    to_comfy = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    return {f"diffusion_model.{comfy_key}": diffusers for diffusers, comfy_key in to_comfy.items()}


def model_identity(model) -> str:
    """A cheap fingerprint of a MODEL's UNet weights (names, shapes, a sample of values)."""
    digest = hashlib.sha256()
    for index, (key, value) in enumerate(sorted(model.model.diffusion_model.state_dict().items())):
        digest.update(f"{key}{tuple(value.shape)}{value.dtype}".encode())
        if index % 16 == 0:
            digest.update(value.detach().reshape(-1)[:256].float().cpu().numpy().tobytes())
    return f"{type(model.model.model_config).__name__} sha256 {digest.hexdigest()[:16]}"


def describe(written: dict[str, str]) -> str:
    return json.dumps({k: os.path.basename(v) for k, v in written.items()})


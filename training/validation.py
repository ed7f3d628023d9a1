"""Validation animations during training, sampled with the weights being trained.

Every ``[validation] every`` steps (and after the last step) the main process samples one clip
from pure noise through ComfyUI's stock sampler path: a ``KSAMPLER`` from ``comfy.samplers`` (with the
``SAMPLER_SAMPLE`` wrappers, as ``CFGGuider.inner_sample`` applies them) driving the training guider
with classifier-free guidance, sigmas from ``comfy.samplers.calculate_sigmas`` on the patched
``model_sampling``. It decodes the latents with the run's VAE and writes an animated WebP to
``<run folder>/validation/step-XXXXXXXX.webp``. The training random state is not touched (the
noise has its own generator), so a run with validation trains the same weights as one without.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

import comfy.model_patcher
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils

from .checkpoints import atomic_write

if TYPE_CHECKING:
    from .trainer import Trainer

VALIDATION_FOLDER = "validation"
FRAMES_PER_SECOND = 8


def check_sampler_names(sampler: str, scheduler: str, where: str) -> None:
    """Raise a ConfigError naming the key when this ComfyUI has no such sampler or scheduler."""
    from .config import ConfigError

    if sampler not in comfy.samplers.KSampler.SAMPLERS:
        raise ConfigError(f"{where} sampler: {sampler!r} is not a ComfyUI sampler; expected one of "
                          f"{list(comfy.samplers.KSampler.SAMPLERS)}")
    if scheduler not in comfy.samplers.KSampler.SCHEDULERS:
        raise ConfigError(f"{where} scheduler: {scheduler!r} is not a ComfyUI scheduler; expected one of "
                          f"{list(comfy.samplers.KSampler.SCHEDULERS)}")


def validation_prompt(trainer: "Trainer") -> str:
    prompt = trainer.config.validation.prompt
    return prompt if prompt else trainer.clips.caption(0)


def sample_animation(trainer: "Trainer", guider: comfy.samplers.CFGGuider, model_options: dict,
                     device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One clip sampled with the current weights: an IMAGE tensor (frames, height, width, 3) in 0..1."""
    config = trainer.config
    settings, data = config.validation, config.data
    model = trainer.model
    shape = (data.frames, model.model.latent_format.latent_channels, data.height // 8, data.width // 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(settings.seed)).to(device)
    latent = torch.zeros(shape, device=device)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), settings.scheduler,
                                             settings.steps).to(device)
    conds = {}
    for key, text in (("positive", validation_prompt(trainer)), ("negative", settings.negative)):
        cond, pooled = trainer._conditioning(text)
        conds[key] = comfy.sampler_helpers.convert_cond([[cond.to(device), {} if pooled is None else
                                                          {"pooled_output": pooled.to(device)}]])
    options = comfy.model_patcher.create_model_options_clone(model_options)
    options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
    extra_args = {"model_options": options, "seed": settings.seed}
    sampler = comfy.samplers.sampler_object(settings.sampler)
    saved_conds, saved_cfg = guider.conds, guider.cfg
    bar = comfy.utils.ProgressBar(settings.steps)
    try:
        guider.conds = comfy.samplers.process_conds(guider.inner_model, noise, conds, device, latent, None,
                                                    settings.seed)
        guider.cfg = settings.cfg
        executor = comfy.patcher_extension.WrapperExecutor.new_class_executor(
            sampler.sample, sampler, comfy.patcher_extension.get_all_wrappers(
                comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, options, is_model_options=True))
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        with torch.no_grad(), autocast:
            samples = executor.execute(guider, sigmas, extra_args, lambda step, *_: bar.update(1), noise, latent,
                                       None, True)
        with torch.no_grad():
            images = trainer.models.vae.decode(guider.inner_model.process_latent_out(samples.float()))
    finally:
        guider.conds, guider.cfg = saved_conds, saved_cfg
    return images.reshape(-1, *images.shape[-3:]).float().clamp(0, 1).cpu()


def save_webp(images: torch.Tensor, path: str, fps: int = FRAMES_PER_SECOND) -> str:
    """Write (frames, height, width, 3) images in 0..1 as a lossless animated WebP (the frames exactly, to 8
    bits), atomically."""
    frames = [Image.fromarray(np.round(image.numpy() * 255).astype(np.uint8)) for image in images]

    def write(temp: str) -> None:
        frames[0].save(temp, format="WEBP", save_all=True, append_images=frames[1:], duration=round(1000 / fps),
                       loop=0, lossless=True, quality=80, method=4)

    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, write)
    return path


def validation_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, VALIDATION_FOLDER, f"step-{step:08d}.webp")

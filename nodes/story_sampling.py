"""Story Sampler's passes: each character's reference panels first (their tokens go into a bank), then
the other panels in small batches against the bank, so memory does not grow with the story."""

from __future__ import annotations

from typing import NamedTuple

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from ..motion_modules import MotionModelError
from ..motion_modules.consistent_attention import ReferenceBank
from ..motion_modules.story import Story
from .consistent_patch import OPTIONS_KEY, RUN_KEY, StoryRun

SAMPLERS, SCHEDULERS = comfy.samplers.KSampler.SAMPLERS, comfy.samplers.KSampler.SCHEDULERS  # KSampler's own lists


class StoryPass(NamedTuple):
    mode: str  # "write" or "read" (StoryRun.mode)
    panels: tuple[int, ...]
    characters: tuple[tuple[str, ...], ...]  # per panel


def story_passes(story: Story, panels_per_batch: int) -> list[StoryPass]:
    """Write passes (one per character, its reference panels together), then read passes of at most
    ``panels_per_batch`` other panels each, in reading order."""
    banked = {name for name, _ in story.references}
    passes = [StoryPass("write", panels, ((name,),) * len(panels)) for name, panels in story.references]
    others = [i for i in range(len(story.panels)) if i not in story.reference_panels()]
    for start in range(0, len(others), panels_per_batch):
        chunk = tuple(others[start:start + panels_per_batch])
        passes.append(StoryPass("read", chunk, tuple(
            tuple(c for c in story.panels[i].characters if c in banked) for i in chunk)))
    return passes


def rows_of(conditioning, rows: list[int], panels: int):
    """The conditioning of ``rows``: tensors with one entry per panel are sliced, others kept."""
    index = torch.as_tensor(rows)

    def pick(value):
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == panels:
            return value[index.to(value.device)]
        return value

    return [[pick(cond), {key: pick(value) for key, value in extras.items()}] for cond, extras in conditioning]


def sample_story(model, story: Story, positive, negative, latent: dict, seed: int, steps: int, cfg: float,
                 sampler_name: str, scheduler: str, denoise: float, panels_per_batch: int,
                 bank: ReferenceBank) -> torch.Tensor:
    """Sample every panel of ``story``; returns the latents in reading order and fills ``bank``."""
    if model.model_options.get("transformer_options", {}).get(OPTIONS_KEY) is None:
        raise MotionModelError("Story Sampler needs a model patched by Consistent Self-Attention: connect "
                               "MODEL -> Consistent Self-Attention -> Story Sampler")
    panels = len(story.panels)
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    if samples.shape[0] not in (1, panels):
        raise MotionModelError(f"Story Sampler: the latent has a batch of {samples.shape[0]} but the story has "
                               f"{panels} panels; give a latent of batch 1 (every panel starts from it) or {panels}")
    if samples.shape[0] == 1:
        samples = samples.repeat(panels, *([1] * (samples.ndim - 1)))
    noise = comfy.sample.prepare_noise(samples, seed)  # one draw for all panels: batches do not change it
    out = samples.clone()
    passes = story_passes(story, panels_per_batch)
    bar = comfy.utils.ProgressBar(steps * len(passes))
    previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
    for number, (mode, rows, characters) in enumerate(passes):
        comfy.model_management.throw_exception_if_processing_interrupted()
        run_model = model.clone()
        run_model.model_options["transformer_options"][RUN_KEY] = StoryRun(mode, rows, characters, bank)
        index = list(rows)

        def progress(step, x0, _x, total, offset=number * steps):
            preview = previewer.decode_latent_to_preview_image("JPEG", x0) if previewer else None
            bar.update_absolute(offset + min(step + 1, total), steps * len(passes), preview)

        out[index] = comfy.sample.sample(
            run_model, noise[index], steps, cfg, sampler_name, scheduler, rows_of(positive, index, panels),
            rows_of(negative, index, panels), samples[index], denoise=denoise, callback=progress,
            disable_pbar=True, seed=seed).to(out)
    bank.frozen = True
    return out

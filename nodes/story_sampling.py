"""Story Sampler's passes: each character's reference panels first (their tokens go into a bank), then
the other panels in small batches against the bank, so memory does not grow with the story. And Story To
Video's transitions: a clip between each pair of neighbouring panels, the panels held as its first and last
latent frames, joined into one video."""

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
from .motion_predictor_patch import image_embedding, patch_model
from .sparsectrl import apply_sparsectrl

SAMPLERS, SCHEDULERS = comfy.samplers.KSampler.SAMPLERS, comfy.samplers.KSampler.SCHEDULERS  # KSampler's own lists
TRANSITIONS = ("sparsectrl", "semantic_motion_predictor", "keyframes_only")


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


def transition_conditioning(conditioning, pair: int, frames: int, panels: int):
    """Transition ``pair``'s conditioning: tensors with one entry per panel (Story Prompts' prompts) go from
    panel ``pair``'s to panel ``pair + 1``'s over the frames, linearly (one row per frame); others are kept."""
    weights = torch.linspace(0, 1, frames)

    def travel(value):
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == panels:
            w = weights.to(value).view(-1, *([1] * (value.ndim - 1)))
            return value[pair:pair + 1] * (1 - w) + value[pair + 1:pair + 2] * w
        return value

    return [[travel(cond), {key: travel(value) for key, value in extras.items()}] for cond, extras in conditioning]


def story_video(model, vae, positive, negative, panels: torch.Tensor, transition: str, frames: int, seed: int,
                steps: int, cfg: float, sampler_name: str, scheduler: str, strength: float, sparsectrl=None,
                predictor=None, clip_vision=None) -> tuple[torch.Tensor, list[int]]:
    """A clip of ``frames`` frames between each pair of neighbouring ``panels``, joined into one IMAGE batch.

    Clip j starts on panel j and ends on panel j + 1: both are VAE-encoded and held as the clip's first and last
    latent frames while the others are sampled (a noise mask of 0 on them), so the video's keyframes are the
    panels through the VAE. ``transition`` adds SparseCtrl on those two frames, or the Semantic Motion
    Predictor from the two panels, or nothing more (``keyframes_only``). The shared panel between two clips
    appears once. Clip j's noise comes from ``seed + j``.

    Returns:
        The video (frames, height, width, 3) and the frame index of every panel in it.
    """
    where = "Story To Video"
    if transition not in TRANSITIONS:
        raise MotionModelError(f"{where}: unknown transition {transition!r}; expected one of {list(TRANSITIONS)}")
    if panels.ndim != 4 or panels.shape[0] < 2:
        raise MotionModelError(f"{where}: panels should be an IMAGE batch of at least 2 panels in story order; got "
                               f"shape {tuple(panels.shape)}")
    count, height, width = panels.shape[:3]
    if height % 8 or width % 8:
        raise MotionModelError(f"{where}: the panels are {width}x{height}; the video is made at the panels' size, "
                               "which must be a multiple of 8 on both sides (Story Sampler's panels are); scale them")
    if transition == "sparsectrl" and sparsectrl is None:
        raise MotionModelError(f"{where}: transition 'sparsectrl' needs a SparseCtrl: connect Load SparseCtrl to "
                               "the sparsectrl input")
    if transition == "semantic_motion_predictor" and (predictor is None or clip_vision is None):
        raise MotionModelError(f"{where}: transition 'semantic_motion_predictor' needs motion_predictor (Load "
                               "Semantic Motion Predictor) and clip_vision (the encoder it was trained with)")
    pixels = panels[..., :3]
    encoded = vae.encode(pixels)
    if encoded.ndim != 4 or encoded.shape[0] != count:
        raise MotionModelError(f"{where}: the VAE gave latents of shape {tuple(encoded.shape)} for {count} panels; "
                               "expected one image latent per panel (an image VAE such as SD1.5's or SDXL's)")
    mask = torch.ones(frames, 1, *encoded.shape[2:])
    mask[[0, -1]] = 0.0
    pairs = count - 1
    bar = comfy.utils.ProgressBar(steps * pairs)
    previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
    clips = []
    for pair in range(pairs):
        comfy.model_management.throw_exception_if_processing_interrupted()
        latent = torch.zeros(frames, *encoded.shape[1:], dtype=encoded.dtype)
        latent[0], latent[-1] = encoded[pair], encoded[pair + 1]
        run_model = model
        cond = transition_conditioning(positive, pair, frames, count)
        uncond = transition_conditioning(negative, pair, frames, count)
        keyframes = pixels[pair:pair + 2]
        if transition == "sparsectrl":
            cond, uncond = apply_sparsectrl(cond, uncond, sparsectrl, keyframes, (0, frames - 1), strength, 0.0, 1.0,
                                            vae)
        elif transition == "semantic_motion_predictor":
            start = image_embedding(clip_vision, keyframes[:1], f"{where}: panel {pair}")
            end = image_embedding(clip_vision, keyframes[1:], f"{where}: panel {pair + 1}")
            run_model = patch_model(model, predictor, start, end, strength)
        latent = comfy.sample.fix_empty_latent_channels(run_model, latent)

        def progress(step, x0, _x, total, offset=pair * steps):
            preview = previewer.decode_latent_to_preview_image("JPEG", x0) if previewer else None
            bar.update_absolute(offset + min(step + 1, total), steps * pairs, preview)

        samples = comfy.sample.sample(
            run_model, comfy.sample.prepare_noise(latent, seed + pair), steps, cfg, sampler_name, scheduler, cond,
            uncond, latent, denoise=1.0, noise_mask=mask, callback=progress, disable_pbar=True, seed=seed + pair)
        images = vae.decode(samples)
        images = images.reshape(-1, *images.shape[-3:])
        clips.append(images if pair == 0 else images[1:])
    return torch.cat(clips), [pair * (frames - 1) for pair in range(count)]

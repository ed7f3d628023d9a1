"""StoryDiffusion nodes: Consistent Self-Attention, Story Prompts, Story Sampler, Comic Page, Story To Video."""

from __future__ import annotations

import torch
from .comfy_compat import io

from ..motion_modules import MotionModelError
from ..motion_modules.comic_page import READING_ORDERS, comic_page
from ..motion_modules.consistent_attention import (FORMS, SCHEDULES, ConsistencyOptions, ReferenceBank, parse_blocks,
                                                   parse_rates)
from ..motion_modules.story import pad_tokens, parse_story
from .consistent_patch import patch_model
from .sockets import CATEGORY, MOTION_PREDICTOR, SPARSECTRL, STORY, STORY_BANK
from .story_sampling import SAMPLERS, SCHEDULERS, TRANSITIONS, sample_story, story_video
from .validation import check_widgets

STORY_CATEGORY = f"{CATEGORY}/story"
EXAMPLE_CHARACTERS = "[Bob] a young man with short red hair, green jacket, white shirt"
EXAMPLE_PANELS = ("[Bob] wakes up in a small bedroom, morning light #Monday morning.\n"
                  "[Bob] drinks coffee in a kitchen\n"
                  "[NC] a rainy city street, umbrellas\n"
                  "[Bob] runs to catch a red bus\n"
                  "[Bob] sits in the bus, looking out of the window\n"
                  "[Bob] arrives at an office building #Just in time.")


def _checked(cls, values: dict, parse) -> bool | str:
    widgets = check_widgets(cls, values)
    if widgets is not True:
        return widgets
    try:
        parse(values)
    except ValueError as exc:
        return str(exc)
    return True


def _sampling_inputs(seed_tooltip: str, steps: int, steps_tooltip: str, cfg: float, cfg_tooltip: str) -> list:
    """KSampler's seed, steps, cfg, sampler_name and scheduler inputs, with these defaults and tooltips."""
    return [
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip=seed_tooltip),
        io.Int.Input("steps", default=steps, min=1, max=10000, tooltip=steps_tooltip),
        io.Float.Input("cfg", default=cfg, min=0.0, max=100.0, step=0.1, round=0.01, tooltip=cfg_tooltip),
        io.Combo.Input("sampler_name", options=SAMPLERS, tooltip="Sampler."),
        io.Combo.Input("scheduler", options=SCHEDULERS, tooltip="Scheduler."),
    ]


class ConsistentSelfAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADS_ConsistentSelfAttention",
            display_name="Consistent Self-Attention (StoryDiffusion)",
            category=STORY_CATEGORY,
            description="Keep a character consistent across the images of a batch (panels, or the frames of a "
                        "clip with Apply Motion Model): each image's self-attention also attends to a random "
                        "sample of the reference images' tokens. No training; SD1.5 and SDXL. Returns a patched "
                        "copy of MODEL.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.5 or SDXL model (motion model applied or not)."),
                io.Int.Input("id_length", default=2, min=0, max=64,
                             tooltip="How many images at the start of the batch (of each clip) are the "
                                     "references the others attend to. Ignored when a bank is connected."),
                io.Float.Input("sampling_rate", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of a reference's tokens an image samples per step (the paper's "
                                       "0.5). 0 = plain self-attention."),
                io.Combo.Input("schedule", options=sorted(SCHEDULES), default="paper",
                               tooltip="paper: all reference tokens for the first 10% of steps, then consistent "
                                       "attention with probability 0.7 (0.9 after 40% of steps) per layer and step; "
                                       "deterministic: the same start, then always; sampled_only: always, no "
                                       "full-attention start."),
                io.String.Input("blocks", default="output",
                                tooltip="Which self-attention layers: 'output' (the paper: the up blocks), 'all', "
                                        "or a list like 'output 3-5, input 7, middle'."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seeds the token samples and the schedule's per-layer choices."),
                io.String.Input("rate_overrides", default="", optional=True,
                                tooltip="Per-resolution rates 'DOWNSCALE: RATE', e.g. '32: 0.5, 16: 0.5' (the "
                                        "paper's sa32 / sa64 at 1024x1024). Other resolutions use sampling_rate."),
                io.Combo.Input("attention_form", options=sorted(FORMS), default="indices", optional=True,
                               tooltip="indices: per-image token lists (memory-efficient); mask: the original "
                                       "N x N mask over all tokens (same result, far more memory)."),
                STORY_BANK.Input("bank", optional=True,
                                 tooltip="References stored by Story Sampler: every image of every call (each "
                                         "context window too) attends to them instead of to its batch."),
                io.String.Input("character", default="", optional=True,
                                tooltip="With a bank: the character(s) to read, comma-separated names without "
                                        "brackets (empty = every character in the bank)."),
            ],
            outputs=[io.Model.Output(tooltip="A patched copy of MODEL; the input is unchanged.")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        def parse(v):
            if v.get("blocks") is not None:
                parse_blocks(v["blocks"])
            if v.get("rate_overrides") is not None:
                parse_rates(v["rate_overrides"])
        return _checked(cls, values, parse)

    @classmethod
    def execute(cls, model, id_length: int, sampling_rate: float, schedule: str, blocks: str, seed: int,
                rate_overrides: str = "", attention_form: str = "indices", bank: ReferenceBank | None = None,
                character: str = "") -> io.NodeOutput:
        options = ConsistencyOptions(rate=sampling_rate, rate_by_scale=parse_rates(rate_overrides),
                                     references=id_length, schedule=schedule, seed=seed, form=attention_form)
        names = tuple(name.strip().strip("[]") for name in character.split(",") if name.strip())
        if bank is not None and (missing := [n for n in names if n not in bank.entries]):
            raise MotionModelError(f"Consistent Self-Attention: character(s) {missing} are not in the bank "
                                   f"(it holds {sorted(bank.entries)})")
        return io.NodeOutput(patch_model(model, options, blocks, bank, names))


class StoryPrompts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADS_StoryPrompts",
            display_name="Story Prompts (StoryDiffusion)",
            category=STORY_CATEGORY,
            description="Characters and one line per panel -> one conditioning per panel, the story plan for "
                        "Story Sampler, and the captions for Comic Page.",
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder of your checkpoint."),
                io.String.Input("characters", multiline=True, default=EXAMPLE_CHARACTERS,
                                tooltip="One '[Name] description' per line; the description replaces the tag "
                                        "in every panel."),
                io.String.Input("panels", multiline=True, default=EXAMPLE_PANELS,
                                tooltip="One panel per line with its [Name] tags; [NC] for a panel without a "
                                        "character; text after '#' is only the caption."),
                io.String.Input("style", default="comic book style, {prompt}, graphic illustration, clean lines",
                                tooltip="Shared style text: {prompt} is replaced by the panel's prompt; without "
                                        "{prompt} the style is appended."),
                io.Int.Input("id_length", default=2, min=1, max=8,
                             tooltip="Reference panels per character (its first panels that show it alone), "
                                     "sampled first by Story Sampler."),
            ],
            outputs=[io.Conditioning.Output(tooltip="One conditioning entry per panel, in reading order."),
                     STORY.Output(display_name="STORY", tooltip="The story plan, for Story Sampler."),
                     io.String.Output(display_name="captions", tooltip="One caption per line, for Comic Page."),
                     io.Int.Output(display_name="panels", tooltip="Number of panels (the latent batch size).")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        def parse(v):
            if None not in (v.get("characters"), v.get("panels"), v.get("style"), v.get("id_length")):
                parse_story(v["characters"], v["panels"], v["style"], v["id_length"])
        return _checked(cls, values, parse)

    @classmethod
    def execute(cls, clip, characters: str, panels: str, style: str, id_length: int) -> io.NodeOutput:
        story = parse_story(characters, panels, style, id_length)
        encoded = [clip.encode_from_tokens(clip.tokenize(panel.prompt), return_pooled=True) for panel in story.panels]
        conds = pad_tokens([cond for cond, _ in encoded])
        conditioning = [[torch.cat(conds), {"pooled_output": torch.cat([pooled for _, pooled in encoded])}]]
        captions = "\n".join(panel.caption for panel in story.panels)
        return io.NodeOutput(conditioning, story, captions, len(story.panels))


class StorySampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADS_StorySampler",
            display_name="Story Sampler (StoryDiffusion)",
            category=STORY_CATEGORY,
            description="Sample a story: each character's reference panels together (their attention tokens are "
                        "stored in a bank), then the other panels in small batches against the bank, so memory "
                        "stays flat however many panels. Outputs the panels' latents and the bank (for clips).",
            inputs=[
                io.Model.Input("model", tooltip="A model through Consistent Self-Attention."),
                STORY.Input("story", tooltip="From Story Prompts."),
                io.Conditioning.Input("positive", tooltip="Story Prompts' per-panel conditioning."),
                io.Conditioning.Input("negative", tooltip="Negative prompt (one for all panels)."),
                io.Latent.Input("latent_image", tooltip="Batch 1 (every panel starts from it) or one per panel."),
                *_sampling_inputs("Noise seed: the same for a panel whatever panels_per_batch is.",
                                  25, "Sampling steps of every pass.",
                                  5.0, "Classifier-free guidance (the paper: 5.0 for images)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="Denoise strength."),
                io.Int.Input("panels_per_batch", default=1, min=1, max=64,
                             tooltip="Non-reference panels sampled together against the bank (more is faster "
                                     "where memory allows; with deterministic samplers such as euler or ddim "
                                     "the results do not change; ancestral samplers draw step noise per batch)."),
                io.Boolean.Input("offload_bank", default=True,
                                 tooltip="Keep the bank in CPU memory (moved to the device per layer when read)."),
                io.Int.Input("bank_limit_mb", default=4096, min=0, max=1 << 20,
                             tooltip="Refuse (with an error, before it grows further) a bank larger than this; "
                                     "0 = no cap."),
            ],
            outputs=[io.Latent.Output(tooltip="One latent per panel, in reading order."),
                     STORY_BANK.Output(display_name="bank", tooltip="The reference bank, for Consistent "
                                                                     "Self-Attention on later images or clips.")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return check_widgets(cls, values)

    @classmethod
    def execute(cls, model, story, positive, negative, latent_image, seed: int, steps: int, cfg: float,
                sampler_name: str, scheduler: str, denoise: float, panels_per_batch: int, offload_bank: bool,
                bank_limit_mb: int) -> io.NodeOutput:
        bank = ReferenceBank(limit_bytes=bank_limit_mb * 2 ** 20, offload=offload_bank)
        samples = sample_story(model, story, positive, negative, latent_image, seed, steps, cfg, sampler_name,
                               scheduler, denoise, panels_per_batch, bank)
        return io.NodeOutput({"samples": samples}, bank)


class ComicPage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADS_ComicPage",
            display_name="Comic Page (StoryDiffusion)",
            category=STORY_CATEGORY,
            description="Lay panels out on one page with their captions, ready for Save Image.",
            inputs=[
                io.Image.Input("images", tooltip="The panels, in reading order."),
                io.String.Input("captions", multiline=True, default="",
                                tooltip="One caption per line (Story Prompts' captions); empty lines leave a "
                                        "panel without one."),
                io.Int.Input("columns", default=3, min=1, max=16, tooltip="Panels per row."),
                io.Int.Input("margin", default=16, min=0, max=512, tooltip="Space around panels, in pixels."),
                io.Int.Input("caption_size", default=20, min=6, max=256, tooltip="Caption font size in pixels."),
                io.Combo.Input("reading_order", options=list(READING_ORDERS), default="left_to_right",
                               tooltip="right_to_left places the first panel top right (manga)."),
                io.Int.Input("border", default=2, min=0, max=64, tooltip="Black frame around each panel, in pixels."),
            ],
            outputs=[io.Image.Output(tooltip="The page, one image.")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return check_widgets(cls, values)

    @classmethod
    def execute(cls, images, captions: str, columns: int, margin: int, caption_size: int, reading_order: str,
                border: int) -> io.NodeOutput:
        page = comic_page(images, captions.split("\n") if captions else [], columns, margin, caption_size,
                          reading_order, min(border, margin))
        return io.NodeOutput(page)


class StoryToVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADS_StoryToVideo",
            display_name="Story To Video (StoryDiffusion)",
            category=STORY_CATEGORY,
            description="Turn a story's panels into one video: a transition clip between each pair of neighbouring "
                        "panels, sampled with the animated model while the two panels are held as its first and "
                        "last frames, guided by SparseCtrl or the Semantic Motion Predictor. The panels are the "
                        "video's keyframes (through the VAE); each shared panel appears once.",
            inputs=[
                io.Model.Input("model", tooltip="The animated model (Apply Motion Model; the v3 motion model goes "
                                                "with SparseCtrl). Through Consistent Self-Attention reading the "
                                                "story's bank, the character stays the same in the transitions."),
                io.Vae.Input("vae", tooltip="Encodes the panels into the clips' first and last latent frames and "
                                            "decodes the clips."),
                io.Conditioning.Input("positive", tooltip="One prompt for all transitions, or Story Prompts' "
                                                          "conditioning (one prompt per panel): each transition then "
                                                          "goes from its first panel's prompt to its last's."),
                io.Conditioning.Input("negative", tooltip="Negative prompt."),
                io.Image.Input("panels", tooltip="The story's panels in order (at least 2), e.g. Story Sampler's "
                                                 "latents through VAE Decode; the video has their size."),
                io.Combo.Input("transition", options=list(TRANSITIONS), default="sparsectrl",
                               tooltip="sparsectrl: SparseCtrl on the two panels (connect sparsectrl); "
                                       "semantic_motion_predictor: StoryDiffusion's predictor from the two panels "
                                       "(connect motion_predictor and clip_vision); keyframes_only: only the held "
                                       "panels and the motion model."),
                io.Int.Input("frames_per_transition", default=16, min=3, max=256,
                             tooltip="Frames of each clip, both panels included; the video has (panels - 1) x "
                                     "(frames - 1) + 1 frames. Above the motion model's 16 (32 for v3 SDXL), "
                                     "use context windows on Apply Motion Model."),
                *_sampling_inputs("Noise seed of the first transition; transition j uses seed + j.",
                                  20, "Sampling steps of each transition.", 7.5, "Classifier-free guidance."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="SparseCtrl's strength, or the predictor's (1 as trained); unused by "
                                       "keyframes_only."),
                SPARSECTRL.Input("sparsectrl", optional=True, tooltip="From Load SparseCtrl (RGB or scribble), for "
                                                                      "transition sparsectrl."),
                MOTION_PREDICTOR.Input("motion_predictor", optional=True,
                                       tooltip="From Load Semantic Motion Predictor, for transition "
                                               "semantic_motion_predictor."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="The image encoder the predictor was trained with, for transition "
                                            "semantic_motion_predictor."),
            ],
            outputs=[io.Image.Output(display_name="video", tooltip="All frames, for Save Animated WEBP or a video "
                                                                   "node."),
                     io.String.Output(display_name="keyframes", tooltip="The frame index of each panel in the "
                                                                        "video, e.g. '0, 15, 30'.")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return check_widgets(cls, values)

    @classmethod
    def execute(cls, model, vae, positive, negative, panels, transition: str, frames_per_transition: int, seed: int,
                steps: int, cfg: float, sampler_name: str, scheduler: str, strength: float, sparsectrl=None,
                motion_predictor=None, clip_vision=None) -> io.NodeOutput:
        video, keyframes = story_video(model, vae, positive, negative, panels, transition, frames_per_transition,
                                       seed, steps, cfg, sampler_name, scheduler, strength, sparsectrl,
                                       motion_predictor, clip_vision)
        text = ", ".join(str(k) for k in keyframes)
        return io.NodeOutput(video, text, ui={"text": [f"{video.shape[0]} frames; panels at {text}"]})


NODES = [ConsistentSelfAttention, StoryPrompts, StorySampler, ComicPage, StoryToVideo]

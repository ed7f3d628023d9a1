"""Training nodes: Train MotionLoRA (from a clip in the graph), Train Motion (from a dataset folder),
Camera Motion Clips (clips from stills). Forms over ``training/``; the loop is the command line's."""

from __future__ import annotations

import os

import torch

import folder_paths
from .comfy_compat import io

from ..motion_modules import MotionModelError, load_lora
from ..training.config import MODES, config_from_dict
from ..training.data import FileClips, MemoryClips
from ..training.report import loss_curve_image
from ..training.synthetic import CAMERA_MOTIONS, EASINGS, SPEED_UNITS, camera_clip
from .injection import MotionLoraEntry
from .sockets import CATEGORY, MOTION_LORA, MOTION_MODEL
from .validation import check_widgets

TRAINING_CATEGORY = f"{CATEGORY}/training"


def _common_inputs(default_steps: int, default_lr: float) -> list:
    return [
        io.String.Input("name", default="my_motion", tooltip="File name stem of the trained file(s) and of the "
                        "run folder output/animatediff_training/<name> (letters, digits, - _ .)."),
        io.Int.Input("steps", default=default_steps, min=1, max=1_000_000, tooltip="Optimizer steps."),
        io.Float.Input("learning_rate", default=default_lr, min=1e-7, max=1.0, step=1e-5,
                       tooltip="AdamW learning rate (MotionDirector recipe: 5e-4 for LoRAs; 1e-4 for a motion module)."),
        io.Int.Input("rank", default=32, min=1, max=512, tooltip="LoRA rank (LoRA modes)."),
        io.Int.Input("frames", default=16, min=1, max=64, tooltip="Frames per training clip."),
        io.Int.Input("stride", default=1, min=1, max=32,
                     tooltip="Take every stride-th frame (spread over the clip when it is shorter)."),
        io.Int.Input("width", default=256, min=64, max=2048, step=8, tooltip="Training width (resize + centre crop)."),
        io.Int.Input("height", default=256, min=64, max=2048, step=8, tooltip="Training height."),
        io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                     tooltip="Seeds initialisation, noise, timesteps, frame picks and flips: the same inputs "
                             "and seed give the same weights (kept as set: no randomize after queueing)."),
        io.Boolean.Input("gradient_checkpointing", default=True,
                         tooltip="Recompute activations in backward: much less memory (a third of a plain "
                         "loop's peak at full SD1.5 width), usually somewhat slower."),
        io.Boolean.Input("resume", default=True, tooltip="Continue the saved run of this name (after an "
                         "interrupt or with more steps); off: start over."),
    ]


def _train_config(mode: str, values: dict, batch_size: int = 1, folder: str = "") -> dict:
    return {"mode": mode, "name": values["name"], "seed": values["seed"],
            "data": {"folder": folder, "frames": values["frames"], "stride": values["stride"],
                     "width": values["width"], "height": values["height"]},
            "train": {"steps": values["steps"], "learning_rate": values["learning_rate"], "rank": values["rank"],
                      "batch_size": batch_size, "gradient_checkpointing": values["gradient_checkpointing"]}}


def _progress_text(node_id):
    """Send 'step k/n loss x' to the node's text (where this ComfyUI has send_progress_text)."""
    try:
        from server import PromptServer
        server = PromptServer.instance
    except (ImportError, AttributeError):
        return None
    send = getattr(server, "send_progress_text", None)
    if send is None or node_id is None:
        return None
    return lambda step, total, loss: send(f"step {step}/{total}  loss {loss:.4f}", node_id)


def _summary(result, written: dict[str, str]) -> str:
    last = result.losses[-20:]
    mean = sum(last) / len(last) if last else float("nan")
    files = ", ".join(f"{kind}: {os.path.basename(path)}" for kind, path in written.items())
    return f"{result.steps} steps, loss (last {len(last)}) {mean:.4f}; wrote {files}"


def split_clips(images: torch.Tensor, frames_per_clip: int, caption: str) -> list[tuple[torch.Tensor, str]]:
    if frames_per_clip == 0:
        return [(images, caption)]
    if images.shape[0] % frames_per_clip:
        raise MotionModelError(f"images: {images.shape[0]} frames is not a multiple of frames_per_clip "
                               f"({frames_per_clip})")
    return [(clip, caption) for clip in images.split(frames_per_clip)]


class TrainMotionLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADS_TrainMotionLora",
            display_name="Train MotionLoRA (AnimateDiff)",
            category=TRAINING_CATEGORY,
            description="Teach a motion model a new motion from one or a few clips (a LoRA on its temporal "
                        "attention). Saves to models/animatediff_motion_lora/<name>.safetensors and returns it "
                        "ready for Apply Motion Model.",
            inputs=[
                io.Model.Input("model", tooltip="The SD model to train on (any checkpoint; LoRAs applied or not)."),
                MOTION_MODEL.Input("motion_model", tooltip="The motion model the LoRA is for."),
                io.Clip.Input("clip", tooltip="Text encoder of the checkpoint (encodes the caption)."),
                io.Vae.Input("vae", tooltip="VAE of the checkpoint (encodes the frames)."),
                io.Image.Input("images", tooltip="The training clip(s) as frames (e.g. from Load Video or "
                               "Camera Motion Clips)."),
                io.String.Input("caption", multiline=True, default="", tooltip="What the clip shows."),
                io.Int.Input("frames_per_clip", default=0, min=0, max=100_000,
                             tooltip="0: the images are one clip; N: consecutive clips of N frames each."),
                *_common_inputs(300, 5e-4),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Strength of the trained LoRA in the MOTION_LORA output."),
                MOTION_LORA.Input("prev_motion_lora", optional=True, tooltip="Earlier MotionLoRAs to chain "
                                  "the result after (not applied while training)."),
            ],
            outputs=[MOTION_LORA.Output(display_name="MOTION_LORA", tooltip="The trained LoRA, loaded."),
                     io.Image.Output(display_name="loss", tooltip="The loss curve."),
                     io.String.Output(display_name="info", tooltip="Steps, final loss and the files written.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return check_widgets(cls, values)

    @classmethod
    def execute(cls, model, motion_model, clip, vae, images, caption, frames_per_clip, strength,
                prev_motion_lora=None, **values) -> io.NodeOutput:
        from ..training.session import graph_models, run_in_graph  # imports nodes.*: not at package import

        config = config_from_dict(_train_config("motion_lora", values), source="Train MotionLoRA", in_graph=True)
        clips = MemoryClips(split_clips(images, frames_per_clip, caption), config.data)
        result, written = run_in_graph(config, graph_models(model, clip, vae, motion_model), clips,
                                       values["resume"], _progress_text(getattr(cls.hidden, "unique_id", None)))
        name = os.path.basename(written["motion_lora"])
        chain = tuple(prev_motion_lora or ()) + (MotionLoraEntry(name, load_lora(written["motion_lora"]), strength),)
        return io.NodeOutput(chain, loss_curve_image(result.losses), _summary(result, written))


class TrainMotion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADS_TrainMotion",
            display_name="Train Motion Module / Domain Adapter (AnimateDiff)",
            category=TRAINING_CATEGORY,
            description="Train from a folder of videos (or frame folders) with same-named .txt captions in "
                        "ComfyUI's input folder: a motion module, a MotionLoRA, a domain adapter (an SD LoRA "
                        "for LoraLoader) or MotionDirector's spatial + temporal LoRAs. Files go to the model "
                        "folders of their kind.",
            inputs=[
                io.Combo.Input("mode", options=list(MODES), default="motion_module",
                               tooltip="motion_module: finetune MOTION_MODEL, or train a new v2 module without "
                                       "one; motion_lora; domain_adapter (spatial LoRA on single frames); "
                                       "motion_director (spatial + temporal LoRA, appearance-debiased loss); "
                                       "semantic_motion_predictor (StoryDiffusion's transition predictor, at the "
                                       "paper's size, on the frozen animated model: needs motion_model and "
                                       "clip_vision)."),
                io.Model.Input("model", tooltip="The SD model to train on."),
                io.Clip.Input("clip", tooltip="Text encoder of the checkpoint."),
                io.Vae.Input("vae", tooltip="VAE of the checkpoint."),
                io.Combo.Input("folder", options=sorted(folder_paths.get_input_subfolders()),
                               tooltip="A folder in ComfyUI's input directory holding the clips and captions."),
                *_common_inputs(1000, 1e-4),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Clips per step."),
                MOTION_MODEL.Input("motion_model", optional=True,
                                   tooltip="Needed for motion_lora, motion_director and semantic_motion_predictor; "
                                           "for motion_module the one to finetune (none: a new zero-initialised "
                                           "v2 module)."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="semantic_motion_predictor only: the image encoder E of the clips' first "
                                            "and last frames (paper: OpenCLIP ViT-H-14); use the same one on Apply "
                                            "Semantic Motion Predictor."),
            ],
            outputs=[io.Image.Output(display_name="loss", tooltip="The loss curve."),
                     io.String.Output(display_name="info", tooltip="Steps, final loss and the files written.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        folder = values.get("folder")
        if folder is not None and folder not in folder_paths.get_input_subfolders():
            return f"folder {folder!r} is not a folder in ComfyUI's input directory"
        return check_widgets(cls, {k: v for k, v in values.items() if k != "folder"})

    @classmethod
    def execute(cls, mode, model, clip, vae, folder, batch_size, motion_model=None, clip_vision=None,
                **values) -> io.NodeOutput:
        from ..training.session import graph_models, run_in_graph  # imports nodes.*: not at package import

        if mode in ("motion_lora", "motion_director") and motion_model is None:
            raise MotionModelError(f"Train Motion: mode {mode} trains a LoRA of a motion model: connect motion_model")
        if mode == "semantic_motion_predictor" and (motion_model is None or clip_vision is None):
            raise MotionModelError("Train Motion: mode semantic_motion_predictor trains on the animated model with "
                                   "a CLIP vision encoder: connect motion_model and clip_vision")
        path = os.path.join(folder_paths.get_input_directory(), folder)
        config = config_from_dict(_train_config(mode, values, batch_size, path), source="Train Motion", in_graph=True)
        models = graph_models(model, clip, vae, motion_model, clip_vision if mode == "semantic_motion_predictor" else None)
        result, written = run_in_graph(config, models, FileClips(config.data), values["resume"],
                                       _progress_text(getattr(cls.hidden, "unique_id", None)))
        return io.NodeOutput(loss_curve_image(result.losses), _summary(result, written))


class CameraMotionClips(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADS_CameraMotionClips",
            display_name="Camera Motion Clips (AnimateDiff)",
            category=TRAINING_CATEGORY,
            description="Turn still images into clips of a camera move (zoom, pan, roll): training data for a "
                        "camera MotionLoRA, as the AnimateDiff paper made its own.",
            inputs=[
                io.Image.Input("images", tooltip="Still images; each becomes one clip."),
                io.Combo.Input("motion", options=list(CAMERA_MOTIONS), default="zoom_in",
                               tooltip="The camera move; pans and rolls name the camera's direction."),
                io.Int.Input("frames", default=16, min=2, max=128, tooltip="Frames per clip."),
                io.Float.Input("speed", default=0.02, min=0.0, max=0.5, step=0.001, tooltip=f"Per frame; {SPEED_UNITS}."),
                io.Combo.Input("easing", options=list(EASINGS), default="linear",
                               tooltip="How the move speeds up or slows down over the clip."),
                io.Int.Input("width", default=256, min=64, max=2048, step=8, tooltip="Clip width."),
                io.Int.Input("height", default=256, min=64, max=2048, step=8, tooltip="Clip height."),
                io.Float.Input("speed_jitter", default=0.0, min=0.0, max=0.9, step=0.01,
                               tooltip="Each clip's speed varies by up to this fraction (drawn from the seed)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seeds the speed jitter."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="All clips, one after the other."),
                     io.Int.Output(display_name="frames_per_clip", tooltip="Connect to Train MotionLoRA's "
                                   "frames_per_clip.")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return check_widgets(cls, values)

    @classmethod
    def execute(cls, images, motion, frames, speed, easing, width, height, speed_jitter, seed) -> io.NodeOutput:
        generator = torch.Generator().manual_seed(seed)
        jitter = 1 + speed_jitter * (2 * torch.rand(images.shape[0], generator=generator) - 1)
        clips = [camera_clip(image, motion, frames, speed * float(j), easing, width, height)
                 for image, j in zip(images, jitter)]
        return io.NodeOutput(torch.cat(clips), frames)


NODES = [TrainMotionLora, TrainMotion, CameraMotionClips]

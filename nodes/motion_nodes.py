"""Load Motion Model, Load MotionLoRA, Apply Motion Model: forms over the core and injection."""

from __future__ import annotations

import functools
import os

import folder_paths
from comfy_api.latest import io

from ..motion_modules import FUSE_METHODS, SCHEDULES, ContextOptions, load_domain_adapter, load_lora
from ..motion_modules.context import schedule_image
from .folders import MOTION_LORAS, MOTION_MODELS, full_path
from .injection import (SCHEDULE_OPTIONS, MotionLoraEntry, apply_motion, load_motion_patcher,
                        resolve_schedule)

CATEGORY = "AnimateDiff Suite"
MotionModel = io.Custom("MOTION_MODEL")
MotionLora = io.Custom("MOTION_LORA")
ContextOptionsType = io.Custom("CONTEXT_OPTIONS")
NO_ADAPTER = "none"


def check_listed(folder: str, name: str, what: str) -> bool | str:
    """Queue-time check that a dropdown value names a file ComfyUI lists in ``folder``."""
    if name in folder_paths.get_filename_list(folder):
        return True
    return f"{what} {name!r} is not in models/{folder} (or its extra_model_paths.yaml entries)"


def read_lora(folder: str, name: str, kind: str):
    """Parse a LoRA file once per (path, size, mtime): a strength change re-runs a node, not a file read."""
    path = full_path(folder, name)
    stat = os.stat(path)
    return _read_lora(path, kind, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read_lora(path: str, kind: str, size: int, mtime_ns: int):
    return load_domain_adapter(path) if kind == "domain adapter" else load_lora(path, kind=kind)


class LoadMotionModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADS_LoadMotionModel",
            display_name="Load Motion Model (AnimateDiff)",
            category=CATEGORY,
            description="Load an AnimateDiff motion module (v1/v2/v3, SDXL beta, HotShot-XL, AnimateLCM, "
                        "Lightning, diffusers format) from models/animatediff_models.",
            inputs=[io.Combo.Input("model_name", options=folder_paths.get_filename_list(MOTION_MODELS),
                                   tooltip="Motion module file in models/animatediff_models (or a path "
                                           "from extra_model_paths.yaml). The format is detected from its weights.")],
            outputs=[MotionModel.Output(display_name="MOTION_MODEL"),
                     io.String.Output(display_name="info", tooltip="What was loaded: family, version, frame limit.")],
        )

    @classmethod
    def validate_inputs(cls, model_name: str) -> bool | str:
        return check_listed(MOTION_MODELS, model_name, "motion model")

    @classmethod
    def execute(cls, model_name: str) -> io.NodeOutput:
        motion = load_motion_patcher(full_path(MOTION_MODELS, model_name), model_name)
        info = f"{model_name}: {motion.spec.describe()}"
        return io.NodeOutput(motion, info, ui={"text": [info]})


class LoadMotionLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADS_LoadMotionLora",
            display_name="Load MotionLoRA (AnimateDiff)",
            category=CATEGORY,
            description="Load a MotionLoRA (camera motions such as ZoomIn, PanLeft) and chain it after others.",
            inputs=[
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list(MOTION_LORAS),
                               tooltip="MotionLoRA file in models/animatediff_motion_lora."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Multiplier of the LoRA's weights (W += strength * up @ down); "
                                       "negative values reverse the motion."),
                MotionLora.Input("prev_motion_lora", optional=True,
                                 tooltip="Optional earlier MotionLoRAs; all are applied, added together."),
            ],
            outputs=[MotionLora.Output(display_name="MOTION_LORA")],
        )

    @classmethod
    def validate_inputs(cls, lora_name: str, **_) -> bool | str:
        return check_listed(MOTION_LORAS, lora_name, "MotionLoRA")

    @classmethod
    def execute(cls, lora_name: str, strength: float, prev_motion_lora=None) -> io.NodeOutput:
        lora = read_lora(MOTION_LORAS, lora_name, "MotionLoRA")
        chain = tuple(prev_motion_lora or ()) + (MotionLoraEntry(lora_name, lora, float(strength)),)
        return io.NodeOutput(chain)


class ApplyMotionModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADS_ApplyMotionModel",
            display_name="Apply Motion Model (AnimateDiff)",
            category=CATEGORY,
            description="Insert a motion model into a copy of MODEL. Sample with the stock KSampler; the "
                        "latent batch size is the number of frames.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.5 or SDXL model (any checkpoint, LoRAs applied or not)."),
                MotionModel.Input("motion_model", tooltip="From Load Motion Model; its family must match MODEL."),
                MotionLora.Input("motion_lora", optional=True, tooltip="Optional MotionLoRA chain."),
                io.Combo.Input("domain_adapter", options=[NO_ADAPTER, *folder_paths.get_filename_list("loras")],
                               default=NO_ADAPTER, optional=True,
                               tooltip="AnimateDiff v3 domain adapter (v3_sd15_adapter) from models/loras."),
                io.Float.Input("domain_adapter_strength", default=1.0, min=-2.0, max=2.0, step=0.01, optional=True,
                               tooltip="Strength of the domain adapter (1.0 as trained; lower it to keep more "
                                       "of the checkpoint's look)."),
                io.Float.Input("motion_scale", default=1.0, min=0.0, max=10.0, step=0.01, optional=True,
                               tooltip="Multiplies the temporal attention's softmax scale: >1 more motion, <1 less."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, optional=True,
                               tooltip="Fraction of sampling after which the motion modules start to run."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001, optional=True,
                               tooltip="Fraction of sampling after which the motion modules stop running."),
                io.Combo.Input("beta_schedule", options=SCHEDULE_OPTIONS, default="auto", optional=True,
                               tooltip="Noise schedule. auto picks the one the motion model was trained with "
                                       "(AnimateDiff SD1.5: sqrt_linear 0.00085-0.012); 'use existing' keeps MODEL's."),
                ContextOptionsType.Input("context_options", optional=True,
                                         tooltip="Sliding context windows (from Context Options) for more frames "
                                                 "than the motion model sees at once."),
            ],
            outputs=[io.Model.Output(tooltip="A copy of MODEL that animates; the input MODEL is unchanged.")],
        )

    @classmethod
    def validate_inputs(cls, start_percent=0.0, end_percent=1.0, domain_adapter=NO_ADAPTER, **_) -> bool | str:
        if start_percent > end_percent:
            return f"start_percent ({start_percent}) must not be greater than end_percent ({end_percent})"
        if domain_adapter and domain_adapter != NO_ADAPTER:
            return check_listed("loras", domain_adapter, "domain adapter")
        return True

    @classmethod
    def execute(cls, model, motion_model, motion_lora=None, domain_adapter=NO_ADAPTER,
                domain_adapter_strength=1.0, motion_scale=1.0, start_percent=0.0, end_percent=1.0,
                beta_schedule="auto", context_options=None) -> io.NodeOutput:
        adapter = None
        if domain_adapter and domain_adapter != NO_ADAPTER:
            adapter = (read_lora("loras", domain_adapter, "domain adapter"), float(domain_adapter_strength))
        patched = apply_motion(model, motion_model, loras=motion_lora or (), scale=motion_scale,
                               start_percent=start_percent, end_percent=end_percent,
                               schedule=resolve_schedule(beta_schedule, motion_model.spec),
                               domain_adapter=adapter, context=context_options)
        return io.NodeOutput(patched)


class ContextOptionsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADS_ContextOptions",
            display_name="Context Options (AnimateDiff)",
            category=CATEGORY,
            description="Sample clips longer than the motion model's frame limit as overlapping windows "
                        "whose outputs are blended per frame. Plug into Apply Motion Model.",
            inputs=[
                io.Int.Input("context_length", default=16, min=1, max=128,
                             tooltip="Frames per window; at most the motion model's frame limit (16 is what "
                                     "AnimateDiff was trained on)."),
                io.Int.Input("context_overlap", default=4, min=0, max=127,
                             tooltip="Frames shared by neighbouring windows; must be less than context_length."),
                io.Int.Input("context_stride", default=1, min=1, max=8,
                             tooltip="Uniform schedules: levels of dilated windows (frames 2, 4, ... apart) that "
                                     "see longer spans; 1 = contiguous windows only."),
                io.Boolean.Input("closed_loop", default=False,
                                 tooltip="looped_uniform only: also blend the last frames into the first, "
                                         "for seamless loops."),
                io.Combo.Input("schedule", options=sorted(SCHEDULES), default="standard_static",
                               tooltip="standard_static: fixed windows; standard_uniform: windows shift every "
                                       "step; looped_uniform: windows wrap end to start; batched: no overlap."),
                io.Combo.Input("fuse_method", options=sorted(FUSE_METHODS), default="pyramid",
                               tooltip="How overlapping windows are blended per frame: pyramid weights frames "
                                       "near a window's middle more; flat averages; overlap-linear ramps only "
                                       "across overlaps; gaussian is a smooth pyramid."),
            ],
            outputs=[ContextOptionsType.Output(display_name="CONTEXT_OPTIONS")],
        )

    @classmethod
    def validate_inputs(cls, context_length=16, context_overlap=4, **_) -> bool | str:
        if context_overlap >= context_length:
            return f"context_overlap ({context_overlap}) must be less than context_length ({context_length})"
        return True

    @classmethod
    def execute(cls, context_length: int, context_overlap: int, context_stride: int, closed_loop: bool,
                schedule: str, fuse_method: str) -> io.NodeOutput:
        return io.NodeOutput(ContextOptions(context_length, context_overlap, context_stride, closed_loop,
                                            schedule, fuse_method))


class ContextScheduleImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADS_ContextScheduleImage",
            display_name="Preview Context Windows (AnimateDiff)",
            category=CATEGORY,
            description="Draws which frames each context window covers at each step (frames across, one row "
                        "per window, brightness = fuse weight, grey lines between steps).",
            inputs=[
                ContextOptionsType.Input("context_options", tooltip="From Context Options."),
                io.Int.Input("frames", default=64, min=1, max=4096, tooltip="Number of frames of the clip."),
                io.Int.Input("steps", default=4, min=1, max=200, tooltip="Sampling steps to draw."),
            ],
            outputs=[io.Image.Output(tooltip="The schedule as an image (preview or save it).")],
        )

    @classmethod
    def execute(cls, context_options, frames: int, steps: int) -> io.NodeOutput:
        cell = max(1, min(12, 1024 // frames))
        return io.NodeOutput(schedule_image(frames, context_options, steps, cell).unsqueeze(0))


NODES = [LoadMotionModel, LoadMotionLora, ApplyMotionModel, ContextOptionsNode, ContextScheduleImage]

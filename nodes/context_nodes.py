"""Context Options and its preview: forms over ``motion_modules.context`` (sampling: context_sampling.py)."""

from __future__ import annotations

from comfy_api.latest import io

from ..motion_modules import FUSE_METHODS, SCHEDULES, ContextOptions
from ..motion_modules.context import schedule_image
from .motion_nodes import CATEGORY, ContextOptionsType


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


NODES = [ContextOptionsNode, ContextScheduleImage]

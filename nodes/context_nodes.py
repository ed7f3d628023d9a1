"""Context Options, its preview, and FreeInit: forms over ``motion_modules`` (sampling: context_sampling.py)."""

from __future__ import annotations

from .comfy_compat import io

from ..motion_modules import FILTERS, FUSE_METHODS, NOISE_TYPES, SCHEDULES, SCOPES, ContextOptions, FreeInitOptions
from ..motion_modules.context import schedule_image, window_report
from .context_sampling import add_free_init
from .sockets import CATEGORY, CONTEXT_OPTIONS
from .validation import check_widgets


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
                                       "step (as in AnimateDiff-Evolved and ComfyUI core); shifted_static: this "
                                       "pack's earlier standard_uniform; looped_uniform: windows wrap end to "
                                       "start; batched: no overlap."),
                io.Combo.Input("fuse_method", options=sorted(FUSE_METHODS), default="pyramid",
                               tooltip="How overlapping windows are blended per frame: pyramid weights frames "
                                       "near a window's middle more; flat averages; overlap-linear ramps only "
                                       "across overlaps; gaussian is a smooth pyramid; delayed_reverse_sawtooth "
                                       "(FreeNoise) trusts each window's later frames."),
                io.Combo.Input("noise_type", options=list(NOISE_TYPES), default="default", optional=True,
                               tooltip="FreeNoise initial noise. default: the sampler's noise; random: noise "
                                       "drawn as diffusers draws it for the seed; repeated_context: the first "
                                       "window's noise repeated; shuffle_context: each window's noise is the "
                                       "previous one's, shuffled (FreeNoise; keeps long clips coherent)."),
                io.Combo.Input("scope", options=list(SCOPES), default="whole_model", optional=True,
                               tooltip="whole_model: the UNet runs once per window (memory stays flat however "
                                       "long the clip). motion_attention (FreeNoise): the UNet runs on all "
                                       "frames at once and only the motion attention is windowed (smoother, "
                                       "but memory grows with the frame count)."),
                io.Boolean.Input("stretch_pe", default=False, optional=True,
                                 tooltip="Allow context_length beyond the motion model's frame limit (e.g. "
                                         "32 on a 24-frame v1 model): longer windows squeeze the trained "
                                         "positional encoding over their frames. Off: such a length is an "
                                         "error."),
                io.Int.Input("window_batch", default=1, min=0, max=64, optional=True,
                             tooltip="whole_model scope: run up to this many windows in one UNet call (faster "
                                     "on a GPU, more memory; same result within float rounding). 1: one window "
                                     "per call. 0 (auto): as many as the free memory allows."),
            ],
            outputs=[CONTEXT_OPTIONS.Output(display_name="CONTEXT_OPTIONS",
                                             tooltip="For Apply Motion Model's context_options.")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        widgets = check_widgets(cls, values)
        if widgets is not True:
            return widgets
        context_length, context_overlap = values.get("context_length"), values.get("context_overlap")
        if context_length is not None and context_overlap is not None and context_overlap >= context_length:
            return f"context_overlap ({context_overlap}) must be less than context_length ({context_length})"
        return True

    @classmethod
    def execute(cls, context_length: int, context_overlap: int, context_stride: int, closed_loop: bool,
                schedule: str, fuse_method: str, noise_type: str = "default",
                scope: str = "whole_model", stretch_pe: bool = False, window_batch: int = 1) -> io.NodeOutput:
        return io.NodeOutput(ContextOptions(context_length, context_overlap, context_stride, closed_loop,
                                            schedule, fuse_method, noise_type, scope, stretch_pe, window_batch))


class ContextScheduleImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADS_ContextScheduleImage",
            display_name="Preview Context Windows (AnimateDiff)",
            category=CATEGORY,
            description="Draws which frames each context window covers at each step (frames across, one row "
                        "per window, brightness = fuse weight, grey lines between steps), and reports windows "
                        "that add few new frames with their share of the step's cost.",
            inputs=[
                CONTEXT_OPTIONS.Input("context_options", tooltip="From Context Options."),
                io.Int.Input("frames", default=64, min=1, max=4096, tooltip="Number of frames of the clip."),
                io.Int.Input("steps", default=4, min=1, max=200, tooltip="Sampling steps to draw."),
            ],
            outputs=[io.Image.Output(tooltip="The schedule as an image (preview or save it)."),
                     io.String.Output(display_name="report",
                                      tooltip="Windows per step, frames through the UNet per step, and every "
                                              "window that adds fewer than half a window of new frames, with "
                                              "its share of the step's cost (also shown on the node).")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return check_widgets(cls, values)

    @classmethod
    def execute(cls, context_options, frames: int, steps: int) -> io.NodeOutput:
        cell = max(1, min(12, 1024 // frames))
        report = window_report(frames, context_options, steps)
        return io.NodeOutput(schedule_image(frames, context_options, steps, cell).unsqueeze(0), report,
                             ui={"text": [report]})


class FreeInitNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADS_FreeInit",
            display_name="FreeInit (AnimateDiff)",
            category=CATEGORY,
            description="Sample several times: after each pass the result is noised back with the first "
                        "pass's noise and only its low spatio-temporal frequencies are kept, the rest is fresh "
                        "noise. Improves temporal consistency at the cost of iterations x the sampling time. "
                        "Works with any sampler node.",
            inputs=[
                io.Model.Input("model", tooltip="The (animated) model to sample with."),
                io.Int.Input("iterations", default=3, min=1, max=10,
                             tooltip="Sampling passes; 1 turns FreeInit off. The paper uses 3-5."),
                io.Combo.Input("filter", options=list(FILTERS), default="butterworth",
                               tooltip="Low-pass filter: butterworth (smooth, default), gaussian (smoothest), "
                                       "ideal (sharp sphere), box (sharp box)."),
                io.Float.Input("spatial_stop", default=0.25, min=0.0, max=1.0, step=0.01,
                               tooltip="Normalised spatial stop frequency: how much layout carries over "
                                       "between passes (0 = none, only fresh noise)."),
                io.Float.Input("temporal_stop", default=0.25, min=0.0, max=1.0, step=0.01,
                               tooltip="Normalised temporal stop frequency: how much motion carries over "
                                       "between passes."),
                io.Int.Input("butterworth_order", default=4, min=1, max=16,
                             tooltip="butterworth only: higher is closer to ideal."),
                io.Boolean.Input("fast_sampling", default=False,
                                 tooltip="Coarse to fine: early passes use fewer steps (pass k of n uses "
                                         "steps * k / n), only the last uses them all."),
            ],
            outputs=[io.Model.Output(tooltip="The model; sampling with it runs the FreeInit passes.")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return check_widgets(cls, values)

    @classmethod
    def execute(cls, model, iterations: int, filter: str, spatial_stop: float, temporal_stop: float,
                butterworth_order: int, fast_sampling: bool) -> io.NodeOutput:
        options = FreeInitOptions(iterations, filter, spatial_stop, temporal_stop, butterworth_order, fast_sampling)
        patched = model.clone()
        add_free_init(patched, options)
        return io.NodeOutput(patched)


NODES = [ContextOptionsNode, ContextScheduleImage, FreeInitNode]

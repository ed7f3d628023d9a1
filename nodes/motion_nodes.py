"""Load Motion Model, Load MotionLoRA, Apply Motion Model: forms over the core and injection."""

from __future__ import annotations

import functools
import os

import folder_paths
from .comfy_compat import io

from ..motion_modules import load_domain_adapter, load_lora
from .folders import MOTION_LORAS, MOTION_MODELS, file_fingerprint, full_path, sha256_prefix
from .beta_schedules import SCHEDULE_OPTIONS, resolve_schedule, schedule_name
from .injection import NORM_SEMANTICS, MotionLoraEntry, apply_motion, load_motion_patcher
from .sockets import CATEGORY, CONTEXT_OPTIONS, MOTION_LORA, MOTION_MODEL
from .validation import check_widgets

NO_ADAPTER = "none"


def check_listed(folder: str, name: str, what: str) -> bool | str:
    """Queue-time check that a dropdown value names a file ComfyUI lists in ``folder``."""
    if name not in folder_paths.get_filename_list(folder):
        return f"{what} {name!r} is not in models/{folder} (or its extra_model_paths.yaml entries)"
    path = folder_paths.get_full_path(folder, name)
    if path is None or not os.path.isfile(path):
        return f"{what} {name!r} is listed in models/{folder} but is not a readable file (a broken symlink?)"
    return True


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
            outputs=[MOTION_MODEL.Output(display_name="MOTION_MODEL", tooltip="For Apply Motion Model."),
                     io.String.Output(display_name="info", tooltip="What was loaded: family, version, modules, "
                                                                    "mid block, frame limit, norm, and the first 10 "
                                                                    "hex digits of the file's SHA-256.")],
        )

    @classmethod
    def validate_inputs(cls, model_name: str) -> bool | str:
        return check_listed(MOTION_MODELS, model_name, "motion model")

    @classmethod
    def fingerprint_inputs(cls, model_name: str):
        return file_fingerprint(MOTION_MODELS, model_name)

    @classmethod
    def execute(cls, model_name: str) -> io.NodeOutput:
        path = full_path(MOTION_MODELS, model_name)
        motion = load_motion_patcher(path, model_name)
        info = f"{model_name}: {motion.spec.describe()}, sha256 {sha256_prefix(path)}"
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
                MOTION_LORA.Input("prev_motion_lora", optional=True,
                                 tooltip="Optional earlier MotionLoRAs; all are applied, added together."),
            ],
            outputs=[MOTION_LORA.Output(display_name="MOTION_LORA",
                                         tooltip="This LoRA after the chain, for Apply Motion Model.")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        listed = check_listed(MOTION_LORAS, values.get("lora_name"), "MotionLoRA")
        return check_widgets(cls, values) if listed is True else listed

    @classmethod
    def fingerprint_inputs(cls, lora_name: str, **_):
        return file_fingerprint(MOTION_LORAS, lora_name)

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
                MOTION_MODEL.Input("motion_model", tooltip="From Load Motion Model; its family must match MODEL."),
                MOTION_LORA.Input("motion_lora", optional=True, tooltip="Optional MotionLoRA chain."),
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
                CONTEXT_OPTIONS.Input("context_options", optional=True,
                                         tooltip="Sliding context windows (from Context Options) for more frames "
                                                 "than the motion model sees at once."),
                io.Int.Input("frames_per_clip", default=0, min=0, max=4096, optional=True,
                             tooltip="0: the latent batch is one clip. N: the batch holds clips of N frames "
                                     "each (e.g. 32 = two 16-frame clips: two variations of a prompt, or one "
                                     "clip per prompt with batched conditioning), sampled in one pass but "
                                     "independently; the batch size must be a multiple of N."),
                io.Combo.Input("norm_semantics", options=list(NORM_SEMANTICS), default="original", optional=True,
                               tooltip="Which GroupNorms see all frames of a clip, for v1 and SDXL beta models "
                                       "(others are the same under both). original: as the AnimateDiff code. "
                                       "AnimateDiff-Evolved: every GroupNorm of the UNet and the motion modules, "
                                       "as that pack does, to reproduce videos made with it."),
            ],
            outputs=[io.Model.Output(tooltip="A copy of MODEL that animates; the input MODEL is unchanged.")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        domain_adapter = values.get("domain_adapter") or NO_ADAPTER
        if domain_adapter != NO_ADAPTER:
            listed = check_listed("loras", domain_adapter, "domain adapter")
            if listed is not True:
                return listed
        widgets = check_widgets(cls, values)
        if widgets is not True:
            return widgets
        start, end = values.get("start_percent"), values.get("end_percent")
        if start is not None and end is not None and start > end:
            return f"start_percent ({start}) must not be greater than end_percent ({end})"
        return True

    @classmethod
    def fingerprint_inputs(cls, domain_adapter=NO_ADAPTER, **_):
        return file_fingerprint("loras", domain_adapter) if domain_adapter and domain_adapter != NO_ADAPTER else None

    @classmethod
    def execute(cls, model, motion_model, motion_lora=None, domain_adapter=NO_ADAPTER,
                domain_adapter_strength=1.0, motion_scale=1.0, start_percent=0.0, end_percent=1.0,
                beta_schedule="auto", context_options=None, frames_per_clip=0,
                norm_semantics="original") -> io.NodeOutput:
        adapter = None
        if domain_adapter and domain_adapter != NO_ADAPTER:
            adapter = (read_lora("loras", domain_adapter, "domain adapter"), float(domain_adapter_strength))
        patched = apply_motion(model, motion_model, loras=motion_lora or (), scale=motion_scale,
                               start_percent=start_percent, end_percent=end_percent,
                               schedule=resolve_schedule(beta_schedule, motion_model.spec),
                               domain_adapter=adapter, context=context_options,
                               frames_per_clip=int(frames_per_clip or 0), norm_semantics=norm_semantics)
        chosen = schedule_name(beta_schedule, motion_model.spec)
        info = f"beta_schedule {beta_schedule}" + (f": {chosen} ({motion_model.spec.version})"
                                                   if beta_schedule == "auto" else "")
        return io.NodeOutput(patched, ui={"text": [info]})


NODES = [LoadMotionModel, LoadMotionLora, ApplyMotionModel]

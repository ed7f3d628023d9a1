"""Pure-PyTorch AnimateDiff core: temporal transformer, checkpoint formats, LoRA maths.

Never imports ComfyUI. Public API::

    model = load_motion_model("mm_sd_v15_v2.safetensors")
    model.spec                       # family, version, frame limit, channels, norm mode
    for prefix, module in model.named_temporal_modules():
        y = module(x, num_frames)    # x: ((b f), c, h, w)
    save_motion_model(model, "out.safetensors")
"""

from .context import (FUSE_METHODS, SCHEDULES, SCOPES, ContextOptions, context_windows, fuse_windows,
                      weighted_windows)
from .errors import MotionModelError
from .freeinit import FILTERS, FreeInitOptions
from .freenoise import NOISE_TYPES, free_noise
from .formats import expected_shapes, parameter_count
from .loader import load_motion_model, save_motion_model
from .lora import (LoRA, load_domain_adapter, load_lora, lora_deltas, merged_parameters,
                   motion_lora_deltas)
from .model import ModuleSpec, MotionModel, MotionSpec
from .temporal import NORM_MODES, VanillaTemporalModule, sinusoidal_pe

__all__ = [
    "ContextOptions", "FUSE_METHODS", "SCHEDULES", "SCOPES", "context_windows", "fuse_windows",
    "weighted_windows", "FILTERS", "FreeInitOptions", "NOISE_TYPES", "free_noise",
    "LoRA", "ModuleSpec", "MotionModel", "MotionModelError", "MotionSpec", "NORM_MODES",
    "VanillaTemporalModule", "expected_shapes", "load_domain_adapter", "load_lora",
    "load_motion_model", "lora_deltas", "merged_parameters", "motion_lora_deltas",
    "parameter_count", "save_motion_model", "sinusoidal_pe",
]

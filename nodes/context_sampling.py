"""Sliding context windows during ComfyUI sampling (the sampling-side counterpart of injection.py).

A keyed CALC_COND_BATCH wrapper splits the frames of each model call into the windows of
``motion_modules.context`` and fuses the outputs. Everything with a frame axis is windowed:
the latents, the timesteps, per-frame conditioning tensors (``size(0) == frames``), masks, and the
hints of native ControlNet / T2I-Adapter chains (a per-window copy whose ``cond_hint_original`` is
sliced). Clips of at most ``context_length`` frames take the unwindowed path unchanged.
"""

from __future__ import annotations

import torch

import comfy.model_management
import comfy.patcher_extension

from ..motion_modules import ContextOptions, MotionModelError, context_windows
from ..motion_modules.context import WindowAccumulator

CONTEXT_KEY = "animatediff_suite.context"


def add_context_windows(model, options: ContextOptions, frame_limit: int, motion_name: str) -> None:
    """Make sampling with ``model`` (a clone we own) use ``options`` for clips longer than a window."""
    if options.context_length > frame_limit:
        raise MotionModelError(f"context_length {options.context_length} is more than motion model "
                               f"'{motion_name}' can see at once ({frame_limit} frames)")
    model.model_options["transformer_options"][CONTEXT_KEY] = options
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, CONTEXT_KEY,
                               windowed_calc_cond_batch)


def _step(model_options: dict, timestep: torch.Tensor) -> int:
    sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
    if sigmas is None:
        return 0
    return int(torch.argmin((sigmas.to(timestep.device) - timestep.reshape(-1)[0]).abs()))


def windowed_calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
    options: ContextOptions | None = model_options.get("transformer_options", {}).get(CONTEXT_KEY)
    frames = x_in.shape[0]
    if options is None or frames <= options.context_length:
        return executor(model, conds, x_in, timestep, model_options)
    windows = context_windows(frames, options, _step(model_options, timestep))
    fused = [WindowAccumulator(frames, options) for _ in conds]
    for window in windows:
        comfy.model_management.throw_exception_if_processing_interrupted()
        index = torch.as_tensor(window, device=x_in.device)
        sub_conds = [None if c is None else [_window_cond(item, index, frames, model) for item in c] for c in conds]
        sub_timestep = timestep[index] if timestep.ndim and timestep.shape[0] == frames else timestep
        outputs = executor(model, sub_conds, x_in[index], sub_timestep, model_options)
        for accumulator, output in zip(fused, outputs):
            accumulator.add(window, output)
    return [accumulator.result() for accumulator in fused]


def _window_cond(cond: dict, index: torch.Tensor, frames: int, model) -> dict:
    """A shallow copy of one processed cond with everything per-frame cut to the window."""
    out = {}
    for key, value in cond.items():
        if key == "control":
            out[key] = _window_control(value, index, frames, model)
        elif isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == frames:
            out[key] = value[index.to(value.device)]
        elif isinstance(value, dict):
            out[key] = {k: _window_model_cond(v, index, frames) for k, v in value.items()}
        else:
            out[key] = value
    return out


def _window_model_cond(value, index: torch.Tensor, frames: int):
    cond = getattr(value, "cond", None)
    if isinstance(cond, torch.Tensor) and cond.ndim > 0 and cond.shape[0] == frames and hasattr(value, "_copy_with"):
        return value._copy_with(cond[index.to(cond.device)])
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == frames:
        return value[index.to(value.device)]
    return value


def _window_control(control, index: torch.Tensor, frames: int, model):
    """Per-window copy of a ControlNet/T2I chain whose per-frame hints are the window's frames."""
    if control is None:
        return None
    windowed = _copy_chain(control, index, frames)
    # copies lose what pre_run computed (timestep range, sampling); pre_run recurses down the chain
    windowed.pre_run(model, lambda percent: model.model_sampling.percent_to_sigma(percent))
    return windowed


def _copy_chain(control, index: torch.Tensor, frames: int):
    if control is None:
        return None
    windowed = control.copy()
    hint = getattr(control, "cond_hint_original", None)
    if isinstance(hint, torch.Tensor) and hint.shape[0] == frames:
        windowed.cond_hint_original = hint[index.to(hint.device)]
    windowed.previous_controlnet = _copy_chain(control.previous_controlnet, index, frames)
    return windowed

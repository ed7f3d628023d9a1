"""Sampling-side AnimateDiff features (the counterpart of injection.py): context windows,
FreeNoise initial noise, FreeInit, and the animated sampling preview (animated_preview.py).

A keyed CALC_COND_BATCH wrapper splits the frames of each model call into the windows of
``motion_modules.context`` and fuses the outputs. Everything with a frame axis is windowed:
the latents, the timesteps, per-frame conditioning tensors (``size(0) == frames``), masks, and the
hints of native ControlNet / T2I-Adapter chains (a per-window copy whose ``cond_hint_original`` is
sliced). Clips of at most ``context_length`` frames take the unwindowed path unchanged. With the
``motion_attention`` scope the UNet sees all frames and the motion slots window their attention.

A keyed OUTER_SAMPLE wrapper (one for both features) replaces the sampler's initial noise by its
FreeNoise version and, with FreeInit, runs the whole sampling several times, re-initialising
the noise between passes (``motion_modules.freeinit``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import math

import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.utils

from ..motion_modules import ContextOptions, FreeInitOptions, MotionModelError, free_noise, weighted_windows
from ..motion_modules.context import WindowAccumulator, window_groups
from ..motion_modules.layout import FrameLayout, clip_count
from ..motion_modules.freeinit import fewer_sigmas, frames_first_mix, fresh_noise_seed, pass_steps
from .animated_preview import animate
from .sampling_checks import call_plan, check_inputs, check_memory, check_output, motion_bytes
from .comfy_compat import check_no_core_context_windows, check_no_multigpu

log = logging.getLogger(__name__)
KEY = "animatediff_suite"  # transformer_options entry of Apply Motion Model's MotionSettings
CONTEXT_KEY = "animatediff_suite.context"
LAYOUT_KEY = "animatediff_suite.layout"  # transformer_options entry: the FrameLayout of one UNet call
# transformer_options entries of one UNet call, read once per call by the CALC_COND_BATCH wrapper rather than
# in every motion module: whether the motion modules run (Apply's percent range), and the step index of
# motion_attention windows. Each read of a sigma's value is a device->host copy, which on a GPU waits for
# all queued work: ~21 per UNet call (one per motion module) stalled the GPU's queue before.
ACTIVE_KEY = "animatediff_suite.motion_active"
STEP_KEY = "animatediff_suite.step"
FREE_INIT_KEY = "animatediff_suite.free_init"
SAMPLE_KEY = "animatediff_suite.sample"
# transformer_options entry while FreeInit runs its passes: (steps before this pass, steps of all passes)
PASSES_KEY = "animatediff_suite.free_init_pass"


def add_context_windows(model, options: ContextOptions, frame_limit: int, motion_name: str) -> None:
    """Make sampling with ``model`` (a clone we own) use ``options`` for clips longer than a window."""
    if options.context_length > frame_limit and not options.stretch_pe:
        raise MotionModelError(f"context_length {options.context_length} is more than motion model "
                               f"'{motion_name}' can see at once ({frame_limit} frames); lower it or "
                               f"turn on stretch_pe in Context Options")
    model.model_options["transformer_options"][CONTEXT_KEY] = options


def add_sampling_wrappers(model) -> None:
    """Install, once, the wrappers every sampling with an animated ``model`` (a clone we own) runs through:
    the clip layout of each UNet call and context windows (CALC_COND_BATCH), the memory plan of the
    model load (PREPARE_SAMPLING), and checks, FreeNoise and FreeInit (OUTER_SAMPLE)."""
    for kind, wrapper in ((comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, layout_calc_cond_batch),
                          (comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, prepare_sampling_wrapper)):
        if not model.get_wrappers(kind, LAYOUT_KEY):
            model.add_wrapper_with_key(kind, LAYOUT_KEY, wrapper)
    add_sample_wrapper(model)


def add_free_init(model, options: FreeInitOptions) -> None:
    """Make sampling with ``model`` (a clone we own) run FreeInit's passes."""
    model.model_options["transformer_options"][FREE_INIT_KEY] = options
    add_sample_wrapper(model)


def add_sample_wrapper(model) -> None:
    """Install ``sample_wrapper`` once on ``model`` (a clone we own): the sampling checks of an animated
    model (sampling_checks.py), FreeNoise's noise and FreeInit's passes."""
    if not model.get_wrappers(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, SAMPLE_KEY):
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, SAMPLE_KEY, sample_wrapper)


# every frame-aware layer of a UNet call asks for the same plan: compute it once per (frames, options, step)
_cached_windows = functools.lru_cache(maxsize=64)(weighted_windows)


def motion_attention_windows(transformer_options: dict, frames: int):
    """``(windows, stretch_pe)`` for temporal attention over ``frames`` frames in this call: Context Options'
    ``motion_attention`` windows when the sequence is longer than a window (else None), and its stretch_pe."""
    context: ContextOptions | None = transformer_options.get(CONTEXT_KEY)
    if context is None:
        return None, False
    windows = None
    if context.scope == "motion_attention" and frames > context.context_length:
        step = transformer_options.get(STEP_KEY)
        if step is None:
            step = step_index(transformer_options, transformer_options.get("sigmas"))
        windows = _cached_windows(frames, context, step)
    return windows, context.stretch_pe


def step_index(transformer_options: dict, sigma: torch.Tensor | None) -> int:
    """Index of the current step in ``sample_sigmas`` (0 when unknown): drives per-step schedules."""
    sigmas = transformer_options.get("sample_sigmas")
    if sigmas is None or sigma is None:
        return 0
    return int(torch.argmin((sigmas.to(sigma.device) - sigma.reshape(-1)[0]).abs()))


class _WindowProgress:
    """Reports windows as fractions of a step on the sampling node's progress bar, in step with
    the sampler's own ``step / steps`` updates (value = step * windows + window; steps counted
    across FreeInit's passes)."""

    def __init__(self, transformer_options: dict, step: int, windows: int):
        sigmas = transformer_options.get("sample_sigmas")
        steps = max(1, (sigmas.shape[-1] - 1) if sigmas is not None else 1)
        before, total_steps = transformer_options.get(PASSES_KEY) or (0, steps)
        self.base, self.total = (before + min(step, steps - 1)) * windows, total_steps * windows
        self.bar = comfy.utils.ProgressBar(self.total)

    def done(self, windows: int) -> None:
        """``windows`` of this step are done."""
        self.bar.update_absolute(self.base + windows, self.total)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim`` or None (other C libraries, Windows, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory(device: torch.device) -> None:
    """On CPU, hand the pages of freed blocks back to the system between windows.

    glibc keeps freed activations in its heaps, and the next window's tensors do not always fit
    the holes, so without this the process grows by ~15-20% over a long clip (measured:
    tests/benchmarks/bench_context_windows.py). GPU memory has its own caching allocator.
    """
    trim = _malloc_trim() if device.type == "cpu" else None
    if trim is not None:
        trim(0)


def with_layout(model_options: dict, layout: FrameLayout, motion_active: bool = True, step: int | None = None) -> dict:
    """A copy of ``model_options`` whose transformer_options carry ``layout``, whether the motion modules
    run and, when known, the step index (the input is not modified)."""
    transformer_options = {**model_options.get("transformer_options", {}), LAYOUT_KEY: layout,
                           ACTIVE_KEY: motion_active}
    if step is not None:
        transformer_options[STEP_KEY] = step
    return {**model_options, "transformer_options": transformer_options}


def frame_layout(transformer_options: dict, where: str) -> FrameLayout:
    """The layout of the running UNet call; an error naming ``where`` when the call has none."""
    layout = transformer_options.get(LAYOUT_KEY)
    if layout is None:
        raise MotionModelError(f"{where} ran in a UNet call without AnimateDiff Suite's clip layout: the "
                               "model was called outside ComfyUI's sampling (calc_cond_batch), or another "
                               "tool replaced the sampling wrappers after Apply Motion Model")
    return layout


def clips_of(transformer_options: dict, frames: int) -> int:
    """Clips in a latent batch of ``frames`` under Apply Motion Model's frames_per_clip."""
    settings = transformer_options.get(KEY)
    return clip_count(frames, getattr(settings, "frames_per_clip", 0))


def layout_calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
    """CALC_COND_BATCH: give every UNet call its clip layout; with ``whole_model`` context windows, run the
    windows (several per call with ``window_batch``) and fuse their outputs per frame."""
    transformer_options = model_options.get("transformer_options", {})
    options: ContextOptions | None = transformer_options.get(CONTEXT_KEY)
    batch = x_in.shape[0]
    clips = clips_of(transformer_options, batch)
    clip_frames = batch // clips
    settings = transformer_options.get(KEY)
    active = True if settings is None else settings.active(timestep)
    if options is None or clip_frames <= options.context_length or options.scope != "whole_model":
        step = step_index(transformer_options, timestep) if options is not None and active \
            and clip_frames > options.context_length else None  # motion_attention windows
        return executor(model, conds, x_in, timestep,
                        with_layout(model_options, FrameLayout.whole(clips, clip_frames), active, step))
    step = step_index(transformer_options, timestep)
    plan = weighted_windows(clip_frames, options, step)
    per_call = options.window_batch or auto_window_batch(model, x_in, len(conds), clips, plan)
    progress = _WindowProgress(transformer_options, step, len(plan))
    fused = [WindowAccumulator(batch, None) for _ in conds]
    done = 0
    for group in window_groups(plan, per_call):
        comfy.model_management.throw_exception_if_processing_interrupted()
        layout = FrameLayout.of_windows([window for window, _ in group], clips, clip_frames)
        rows = layout.batch_index()
        index = torch.as_tensor(rows, device=x_in.device)
        sub_conds = [None if c is None else [_window_cond(item, index, batch, model) for item in c] for c in conds]
        sub_timestep = timestep[index] if timestep.ndim and timestep.shape[0] == batch else timestep
        outputs = executor(model, sub_conds, x_in[index], sub_timestep, with_layout(model_options, layout, active))
        weights = [weights for _, weights in group for _ in range(clips)]
        for accumulator, output in zip(fused, outputs):
            for number in range(layout.sequences):
                part = slice(number * layout.frames, (number + 1) * layout.frames)
                accumulator.add(rows[part], output[part], weights[number])
        del outputs
        release_freed_memory(x_in.device)
        done += len(group)
        progress.done(done)
    return [accumulator.result() for accumulator in fused]


def auto_window_batch(model, x_in: torch.Tensor, chunks: int, clips: int, plan) -> int:
    """``window_batch`` 0: the most windows per UNet call whose estimate fits the free memory with
    ComfyUI's own margin (``memory_required * 1.5 < free``, as calc_cond_batch batches conds)."""
    memory_required = getattr(model, "memory_required", None)
    if memory_required is None:
        return 1
    free = comfy.model_management.get_free_memory(x_in.device)
    rows = len(plan[0][0]) * clips * chunks
    best = 1
    for count in range(2, len(plan) + 1):
        if memory_required([count * rows, *x_in.shape[1:]]) * 1.5 >= free:
            break
        best = count
    return best


def prepare_sampling_wrapper(executor, model, noise_shape, *args, **kwargs):
    """PREPARE_SAMPLING: ComfyUI sizes the model load for ``noise_shape``; give it the shape of one UNet
    call (``planned_noise_shape``), so a long clip never pushes the UNet into partial loading."""
    model_options = kwargs.get("model_options") or (args[1] if len(args) > 1 else {})
    transformer_options = (model_options or {}).get("transformer_options", {})
    return executor(model, planned_noise_shape(model.model, transformer_options, noise_shape), *args, **kwargs)


def planned_noise_shape(base_model, transformer_options: dict, noise_shape) -> list[int]:
    """The noise shape ComfyUI should plan the model load for:

    - the frames of one UNet call: ``clips x context_length x window_batch`` with ``whole_model``
      windows (``window_batch`` 0 plans for one window, as ComfyUI's own context handler does), else
      the whole batch;
    - plus the motion modules' own peak (``sampling_checks.motion_bytes``), which ComfyUI's estimate
      (linear in frames) cannot see, as the frames that estimate would give the same bytes for.
    """
    shape = list(noise_shape)
    settings = transformer_options.get(KEY)
    if settings is None:
        return shape
    options: ContextOptions | None = transformer_options.get(CONTEXT_KEY)
    clips = clips_of(transformer_options, shape[0])
    unet_frames, attention_frames, _ = call_plan(shape[0], options, clips)
    shape[0] = unet_frames
    memory_required = getattr(base_model, "memory_required", None)
    if memory_required is not None:
        per_frame = memory_required([2, *shape[1:]]) / 2  # ComfyUI plans cond + uncond: 2 x frames
        extra = motion_bytes(base_model, shape, 2 * unet_frames, attention_frames, settings.heads, settings.channels)
        shape[0] += math.ceil(extra / max(per_frame, 1) / 2)
    return shape


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


def sample_wrapper(executor, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                   disable_pbar=False, seed=None, *args, **kwargs):
    """OUTER_SAMPLE: checks, FreeNoise's initial noise, then one sampling pass or FreeInit's passes."""
    transformer_options = getattr(executor.class_obj, "model_options", {}).get("transformer_options", {})
    context: ContextOptions | None = transformer_options.get(CONTEXT_KEY)
    free_init: FreeInitOptions | None = transformer_options.get(FREE_INIT_KEY)
    motion = transformer_options.get(KEY)
    player = None
    if motion is not None:
        guider = executor.class_obj
        clips = clips_of(transformer_options, noise.shape[0])
        check_no_multigpu(getattr(guider, "model_patcher", None), "sampling an animated MODEL")
        check_no_core_context_windows(getattr(guider, "model_options", {}), "sampling an animated MODEL")
        check_inputs(guider, noise, latent_image)
        check_memory(executor.class_obj, noise, context, motion.heads, motion.channels, clips)
        callback, player = animate(callback, guider.model_patcher, context, clips)
    try:
        output = _sample(executor, transformer_options, context, free_init, noise, latent_image, sampler,
                         sigmas, denoise_mask, callback, disable_pbar, seed, *args, **kwargs)
    finally:
        if player is not None:
            player.close()
    if motion is not None:
        check_output(output)
    return output


def _sample(executor, transformer_options, context, free_init, noise, latent_image, sampler, sigmas,
            denoise_mask, callback, disable_pbar, seed, *args, **kwargs):
    clips = clips_of(transformer_options, noise.shape[0])

    def noise_of(tensor: torch.Tensor, noise_seed: int) -> torch.Tensor:
        if context is None or context.noise_type == "default" or not bool(tensor.any()):
            return tensor  # all-zero noise means "add noise: disable": keep it so
        # per clip, each from the seed: a clip gets the noise it would get sampled alone
        return torch.cat([free_noise(clip, context.noise_type, context.context_length, context.advance,
                                     torch.Generator().manual_seed(noise_seed))
                          for clip in tensor.chunk(clips)])

    noise = noise_of(noise, seed or 0)
    if free_init is not None and free_init.iterations > 1 and not bool(noise.any()):
        log.warning("FreeInit needs the sampler to add noise (it re-noises with it); add noise is "
                    "disabled here, so this sampling runs one pass")
        free_init = None
    if free_init is None or free_init.iterations == 1:
        return executor(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed,
                        *args, **kwargs)
    guider = executor.class_obj
    steps = sigmas.shape[-1] - 1
    plan = [fewer_sigmas(sigmas, pass_steps(steps, free_init, k)) for k in range(free_init.iterations)]
    totals = [p.shape[-1] - 1 for p in plan]
    output, pass_noise = None, noise
    for k, pass_sigmas in enumerate(plan):
        comfy.model_management.throw_exception_if_processing_interrupted()
        if k:
            fresh_seed = fresh_noise_seed(seed, k)
            fresh = torch.randn(noise.shape, generator=torch.Generator().manual_seed(fresh_seed), dtype=torch.float32)
            fresh = noise_of(fresh.to(noise.dtype), fresh_seed)
            pass_noise = reinitialised_noise(guider.model_patcher, output, noise, fresh, latent_image,
                                             pass_sigmas[0], free_init, clips)
        before = sum(totals[:k])
        # the guider's options are ComfyUI's copy for this one sampling: the pass is a per-call fact there
        pass_options = guider.model_options.setdefault("transformer_options", {})
        pass_options[PASSES_KEY] = (before, sum(totals))
        try:
            output = executor(pass_noise, latent_image, sampler, pass_sigmas, denoise_mask,
                              _overall_callback(callback, before, sum(totals)), disable_pbar, seed,
                              *args, **kwargs)
        finally:
            pass_options.pop(PASSES_KEY, None)
    return output


def _overall_callback(callback, offset: int, total: int):
    """The sampler's per-step callback, counting steps across all FreeInit passes."""
    if callback is None:
        return None
    return lambda step, x0, x, _steps: callback(offset + step, x0, x, total)


def reinitialised_noise(patcher, output: torch.Tensor, initial: torch.Tensor, fresh: torch.Tensor,
                        latent_image: torch.Tensor, sigma: torch.Tensor, options: FreeInitOptions,
                        clips: int = 1) -> torch.Tensor:
    """The noise that makes the sampler start the next FreeInit pass from

        low_pass(start(x0, initial noise)) + high_pass(start(latent, fresh noise))

    where ``start(latent, n)`` is where the sampler starts at ``sigma`` from ``latent`` and noise
    ``n`` (the model's own ``noise_scaling``: x0 + sigma n for SD), i.e. the last result noised
    back with the first pass's noise, its high frequencies replaced by fresh noise (filtered per clip
    when the batch holds ``clips`` clips). For a pure
    txt2vid start this is diffusers' FreeInit (up to sqrt(1 - alpha_bar_999) = 0.998 on the noise).
    """
    base_model = patcher.model
    sampling = patcher.get_model_object("model_sampling")
    sigma = sigma.float().cpu()
    sigma_max = float(sampling.sigma_max)
    max_denoise = math.isclose(sigma_max, float(sigma), rel_tol=1e-5) or float(sigma) > sigma_max  # as KSAMPLER
    x0 = base_model.process_latent_in(output.float().cpu())
    latent = latent_image.float().cpu()
    if torch.count_nonzero(latent) > 0:  # as the guider does: an empty latent is not shifted
        latent = base_model.process_latent_in(latent)

    def start(image: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return sampling.noise_scaling(sigma, n.float().cpu().clone(), image.clone(), max_denoise)

    low, high = start(x0, initial), start(latent, fresh)
    target = torch.cat([frames_first_mix(a, b, options) for a, b in zip(low.chunk(clips), high.chunk(clips))])
    offset = start(latent, torch.zeros_like(latent))
    gain = start(torch.zeros_like(latent), torch.ones_like(latent))  # noise_scaling is affine in n
    return ((target - offset) / gain).to(initial.dtype)

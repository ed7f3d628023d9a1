"""Insert motion modules into a ComfyUI UNet through keyed, removable extension points.

The only module of the pack that touches ComfyUI model internals. Everything is attached to a
*clone* of the user's MODEL under the key ``animatediff_suite``:

- the motion weights are their own ModelPatcher, registered with ``set_additional_models`` so
  ComfyUI counts, loads and offloads them with the UNet (MotionLoRAs are its weight patches);
- a ``PatcherInjection`` places one ``MotionSlot`` per temporal module inside the UNet's
  ``TimestepEmbedSequential`` blocks when ComfyUI loads the model, and removes them on unload;
- a ``forward_timestep_embed_patch`` runs each slot with the call's ``transformer_options``,
  from which the frame count is derived (``frames = batch // len(cond_or_uncond)``);
- v1 only: object patches make the ResNet GroupNorms and ``out.0`` span all frames, with a
  DIFFUSION_MODEL wrapper publishing the frame count for the duration of the call;
- the domain adapter is a set of ``diff`` weight patches; the beta schedule an object patch.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import logging
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from einops import rearrange

import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.ops
import comfy.patcher_extension
import comfy.utils
from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock, UNetModel, Upsample

from ..motion_modules import (LoRA, MotionModel, MotionModelError, load_motion_model, lora_deltas,
                              motion_lora_deltas)
from ..motion_modules.context import weighted_windows
from .context_sampling import CONTEXT_KEY, KEY, add_context_windows, add_sample_wrapper, step_index

log = logging.getLogger(__name__)
_FRAMES = contextvars.ContextVar("animatediff_suite_frames", default=None)
# every motion slot of a UNet call asks for the same plan: compute it once per (frames, options, step)
_attention_windows = functools.lru_cache(maxsize=64)(weighted_windows)


@dataclass(frozen=True)
class LoadedMotionModel:
    """What a MOTION_MODEL socket carries: the file name and a ModelPatcher of the MotionModel."""

    name: str
    patcher: comfy.model_patcher.ModelPatcher

    @property
    def spec(self):
        return self.patcher.model.spec


@dataclass(frozen=True)
class MotionLoraEntry:
    """One link of a MOTION_LORA chain."""

    name: str
    lora: LoRA
    strength: float


@dataclass(frozen=True)
class MotionSettings:
    """Per-Apply settings read by the slots at run time (plain numbers: safe to deep-copy)."""

    scale: float = 1.0
    sigma_start: float = float("inf")
    sigma_end: float = 0.0
    heads: int = 8  # of the temporal attention (memory estimate)

    def active(self, sigmas) -> bool:
        if sigmas is None:
            return True
        sigma = float(sigmas.reshape(-1)[0])
        return self.sigma_end <= sigma <= self.sigma_start


def wrap_motion_model(model: MotionModel, name: str) -> LoadedMotionModel:
    """A MotionModel in its own ModelPatcher, loaded and offloaded where the UNet is."""
    patcher = comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device())
    return LoadedMotionModel(name, patcher)


def load_motion_patcher(path: str, name: str) -> LoadedMotionModel:
    """Load a motion model file in the UNet dtype with ComfyUI's casting layers."""
    model = load_motion_model(path, dtype=comfy.model_management.unet_dtype(),
                              operations=comfy.ops.manual_cast)
    return wrap_motion_model(model, name)


class MotionSlot(torch.nn.Module):
    """A temporal module placed in a UNet block. It holds the module without registering it as a
    child, so the UNet's state dict, weight patches and device moves never see motion weights."""

    def __init__(self, prefix: str, module: torch.nn.Module):
        super().__init__()
        self.prefix = prefix
        self._module = (module,)

    def run(self, x: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        settings: MotionSettings | None = transformer_options.get(KEY)
        if settings is None:
            raise MotionModelError(f"motion module {self.prefix} ran without its settings; "
                                   "was the model patched by another tool after Apply Motion Model?")
        comfy.model_management.throw_exception_if_processing_interrupted()
        if not settings.active(transformer_options.get("sigmas")):
            return x
        chunks = len(transformer_options.get("cond_or_uncond") or [0])
        if x.shape[0] % chunks:
            raise MotionModelError(f"batch of {x.shape[0]} cannot be split into {chunks} cond/uncond chunks")
        frames = x.shape[0] // chunks
        context = transformer_options.get(CONTEXT_KEY)
        windows = None
        if context is not None and context.scope == "motion_attention" and frames > context.context_length:
            step = step_index(transformer_options, transformer_options.get("sigmas"))
            windows = _attention_windows(frames, context, step)
        stretch_pe = context is not None and context.stretch_pe
        return self._module[0](x, frames, settings.scale, windows, stretch_pe)

    def forward(self, x):
        raise MotionModelError(f"motion module {self.prefix} was called without AnimateDiff Suite's "
                               "forward_timestep_embed patch (the model was rebuilt by another tool?)")


def _run_slot(layer, x, emb, context, transformer_options, *args, **kwargs):
    return layer.run(x, transformer_options)


def unet_of(model) -> UNetModel:
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(unet, UNetModel):
        raise MotionModelError(f"AnimateDiff needs an SD1.5 or SDXL UNet model; got "
                               f"{type(unet).__name__ if unet is not None else type(model).__name__}")
    return unet


def _model_family(model) -> str:
    config = getattr(model.model, "model_config", None)
    return type(config).__name__ if config is not None else type(model.model).__name__


def _layout(spec) -> tuple[int, int]:
    """(down levels, modules per down block) of a motion model."""
    levels = sum(1 for block in spec.channels if block.startswith("down_blocks."))
    return levels, sum(1 for m in spec.modules if m.block == "down_blocks.0")


def check_compatible(model, motion: LoadedMotionModel) -> None:
    """Raise a MotionModelError when the motion model does not fit the UNet's structure."""
    unet = unet_of(model)
    spec = motion.spec
    levels, layers = _layout(spec)
    mults = list(unet.channel_mult)
    family = _model_family(model)
    if len(mults) != levels:
        raise MotionModelError(f"motion model '{motion.name}' is {spec.family} ({levels} down blocks) but the "
                               f"model is {family} ({len(mults)} UNet levels)")
    res_blocks = list(unet.num_res_blocks)
    if any(n != layers for n in res_blocks):
        raise MotionModelError(f"motion model '{motion.name}' has {layers} modules per down block but the "
                               f"model ({family}) has {res_blocks} ResNet blocks per level")
    for module in spec.modules:
        block = module.block
        kind, _, index = block.partition(".")
        level = levels - 1 if kind == "mid_block" else int(index)
        if kind == "up_blocks":
            level = levels - 1 - int(index)
        expected = unet.model_channels * mults[level]
        if module.channels != expected:
            raise MotionModelError(f"motion model '{motion.name}' ({spec.family}) expects {module.channels} "
                                   f"channels at {block} but the model ({family}) has {expected}")


def _targets(unet: UNetModel, spec) -> list[tuple[torch.nn.Sequential, str, str]]:
    """(container, placement, prefix) for every module, per REFERENCE §1 / §6."""
    _, layers = _layout(spec)
    targets = []
    for module in spec.modules:
        if module.block == "mid_block":
            targets.append((unet.middle_block, "before_last", module.prefix))
            continue
        kind, i = module.block.split(".")
        position = int(i) * (layers + 1) + module.index
        if kind == "down_blocks":
            targets.append((unet.input_blocks[1 + position], "append", module.prefix))
        else:
            targets.append((unet.output_blocks[position], "before_upsample", module.prefix))
    return targets


def _strip_slots(container: torch.nn.Sequential) -> None:
    for index in reversed(range(len(container))):
        if isinstance(container[index], MotionSlot):
            del container[index]


def _insert(container: torch.nn.Sequential, placement: str, slot: MotionSlot) -> None:
    if placement == "before_last" or (placement == "before_upsample" and isinstance(container[-1], Upsample)):
        container.insert(len(container) - 1, slot)
    else:
        container.append(slot)


def make_injection(motion_model: MotionModel) -> comfy.patcher_extension.PatcherInjection:
    """Inject/eject callbacks that place this motion model's modules into the patched UNet."""
    modules = dict(motion_model.named_temporal_modules())

    def inject(patcher):
        unet = unet_of(patcher)
        targets = _targets(unet, motion_model.spec)
        for container, _, _ in targets:
            _strip_slots(container)  # never stack on slots left by an earlier, unejected run
        for container, placement, prefix in targets:
            _insert(container, placement, MotionSlot(prefix, modules[prefix]))

    def eject(patcher):
        unet = unet_of(patcher)
        for block in (*unet.input_blocks, unet.middle_block, *unet.output_blocks):
            _strip_slots(block)

    return comfy.patcher_extension.PatcherInjection(inject=inject, eject=eject)


def _frame_spanning_norm(norm: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``norm`` sharing its parameters whose statistics span all frames of a clip
    (the original v1 UNet normalises ResNet features of the 5D video tensor)."""
    base = type(norm)
    if getattr(base, "_ads_frame_spanning", False):  # already patched by a loaded clone: use its base
        base = base.__bases__[0]
    cls = type(f"FrameSpanning{base.__name__}", (base,), {"forward": _frame_spanning_forward,
                                                         "_base_forward": base.forward,
                                                         "_ads_frame_spanning": True})
    spanning = copy.copy(norm)
    spanning.__class__ = cls
    return spanning


def _frame_spanning_forward(self, x):
    frames = _FRAMES.get()
    if not frames or frames == 1 or x.shape[0] % frames:
        return self._base_forward(x)
    y = self._base_forward(rearrange(x, "(b f) c h w -> b c (f h) w", f=frames))
    return rearrange(y, "b c (f h) w -> (b f) c h w", f=frames)


def _publish_frames(executor, x, *args, **kwargs):
    transformer_options = args[4] if len(args) > 4 else kwargs.get("transformer_options", {})
    chunks = len(transformer_options.get("cond_or_uncond") or [0])
    token = _FRAMES.set(x.shape[0] // chunks)
    try:
        return executor(x, *args, **kwargs)
    finally:
        _FRAMES.reset(token)


def _resnet_norm_paths(unet: UNetModel) -> list[str]:
    """Object-patch paths of every ResBlock GroupNorm and of ``out.0`` in the uninjected UNet."""
    paths = []
    for name, container in (("input_blocks", unet.input_blocks), ("output_blocks", unet.output_blocks)):
        for index, block in enumerate(container):
            if isinstance(block[0], ResBlock):
                paths += [f"diffusion_model.{name}.{index}.0.in_layers.0", f"diffusion_model.{name}.{index}.0.out_layers.0"]
    plain = [m for m in unet.middle_block if not isinstance(m, MotionSlot)]
    for index, module in enumerate(plain):
        if isinstance(module, ResBlock):
            paths += [f"diffusion_model.middle_block.{index}.in_layers.0", f"diffusion_model.middle_block.{index}.out_layers.0"]
    return paths + ["diffusion_model.out.0"]


def _add_frame_spanning_norms(model) -> None:
    unet = unet_of(model)
    for path in _resnet_norm_paths(unet):
        model.add_object_patch(path, _frame_spanning_norm(comfy.utils.get_attr(model.model, path)))
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, KEY, _publish_frames)


def _without_our_patch(model_options: dict) -> None:
    patches = model_options["transformer_options"].setdefault("patches", {})
    patches["forward_timestep_embed_patch"] = [
        p for p in patches.get("forward_timestep_embed_patch", []) if p[0] is not MotionSlot]


def apply_motion(model, motion: LoadedMotionModel, loras=(), scale: float = 1.0,
                 start_percent: float = 0.0, end_percent: float = 1.0, schedule=None,
                 domain_adapter: tuple[LoRA, float] | None = None, context=None):
    """Return a clone of ``model`` that animates with ``motion``; ``model`` itself is untouched.

    Args:
        loras: MotionLoraEntry chain (applied as weight patches of a clone of the motion model).
        scale: motion scale (softmax-scale multiplier of the temporal attention).
        start_percent, end_percent: sampling range where motion modules run.
        schedule: a callable ``(model) -> model_sampling`` or None to keep the model's own.
        domain_adapter: (LoRA, strength) applied to the UNet's spatial attention.
        context: ContextOptions for clips longer than one window (see context_sampling.py).
    """
    check_compatible(model, motion)
    deltas = motion_lora_deltas(motion.patcher.model, [(e.lora, e.strength) for e in loras]) if loras else {}
    adapter_patches = _domain_adapter_patches(model, domain_adapter) if domain_adapter else {}

    motion_patcher = motion.patcher.clone()
    if deltas:
        motion_patcher.add_patches({k: ("diff", (d,)) for k, d in deltas.items()}, 1.0)
    patched = model.clone()
    if schedule is not None:
        patched.add_object_patch("model_sampling", schedule(patched))
    if adapter_patches:
        applied = patched.add_patches(adapter_patches, 1.0)
        if len(applied) != len(adapter_patches):
            raise MotionModelError(f"domain adapter '{domain_adapter[0].name}': only {len(applied)} of "
                                   f"{len(adapter_patches)} weights exist in this model")
    sampling = patched.get_model_object("model_sampling")
    settings = MotionSettings(scale=float(scale), sigma_start=float(sampling.percent_to_sigma(start_percent)),
                              sigma_end=float(sampling.percent_to_sigma(end_percent)), heads=motion.spec.heads)
    patched.set_additional_models(KEY, [motion_patcher])
    patched.set_injections(KEY, [make_injection(motion_patcher.model)])
    _without_our_patch(patched.model_options)
    patched.set_model_forward_timestep_embed_patch((MotionSlot, _run_slot))
    patched.model_options["transformer_options"][KEY] = settings
    if motion.spec.version == "v1":
        _add_frame_spanning_norms(patched)
    if context is not None:
        add_context_windows(patched, context, motion.spec.frame_limit, motion.name)
    else:  # a model animated before keeps no stale windows (the wrappers then pass through)
        patched.model_options["transformer_options"].pop(CONTEXT_KEY, None)
    add_sample_wrapper(patched)  # input, memory and output checks of every sampling
    return patched


def _domain_adapter_patches(model, domain_adapter: tuple[LoRA, float]) -> dict:
    """diffusers-named adapter deltas -> ComfyUI ``diff`` patches on ``diffusion_model.*`` keys."""
    lora, strength = domain_adapter
    unet = unet_of(model)
    to_comfy = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    shapes = {k: v.shape for k, v in unet.state_dict().items()}
    diffusers_shapes = {d: shapes[c] for d, c in to_comfy.items() if c in shapes}
    deltas = lora_deltas([(lora, strength)], diffusers_shapes)
    return {f"diffusion_model.{to_comfy[k]}": ("diff", (d,)) for k, d in deltas.items()}


# -- beta schedules ---------------------------------------------------------------------------

@dataclass(frozen=True)
class BetaSchedule:
    """A named noise schedule: ComfyUI beta-schedule name and range, optionally LCM sampling."""

    beta_schedule: str
    linear_start: float
    linear_end: float
    lcm: bool = False

    def __call__(self, model):
        current = model.get_model_object("model_sampling")
        if self.lcm:
            base, kind = _lcm_sampling()
        else:
            base, kind = comfy.model_sampling.ModelSamplingDiscrete, _prediction_type(current)
        sampling_class = type(f"AnimateDiffSuite{kind.__name__}Sampling", (base, kind), {})
        settings = {"beta_schedule": self.beta_schedule, "linear_start": self.linear_start,
                    "linear_end": self.linear_end}
        return sampling_class(SimpleNamespace(sampling_settings=settings))


def _prediction_type(sampling) -> type:
    for kind in (comfy.model_sampling.V_PREDICTION, comfy.model_sampling.EPS):
        if isinstance(sampling, kind):
            return kind
    raise MotionModelError(f"beta schedules apply to EPS or v-prediction models; this model samples with "
                           f"{type(sampling).__name__}")


def _lcm_sampling() -> tuple[type, type]:
    """ComfyUI's LCM sampling classes (feature-detected: they live in comfy_extras in v0.3.x)."""
    places = [comfy.model_sampling]
    try:
        import comfy_extras.nodes_model_advanced as advanced
        places.append(advanced)
    except ImportError:
        pass
    base = next((p.ModelSamplingDiscreteDistilled for p in places if hasattr(p, "ModelSamplingDiscreteDistilled")), None)
    kind = next((p.LCM for p in places if hasattr(p, "LCM")), None)
    if base is None or kind is None:
        raise MotionModelError("the lcm schedule needs ComfyUI's LCM sampling classes, which this "
                               "ComfyUI version does not provide; pick another beta_schedule")
    return base, kind


# Named schedules; keys are the combo options (REFERENCE §3).
SCHEDULES = {
    "sqrt_linear (AnimateDiff)": BetaSchedule("sqrt_linear", 0.00085, 0.012),
    "linear (SD default)": BetaSchedule("linear", 0.00085, 0.012),
    "linear (AnimateDiff SDXL beta)": BetaSchedule("linear", 0.00085, 0.020),
    "lcm (AnimateLCM)": BetaSchedule("sqrt_linear", 0.00085, 0.012, lcm=True),
}
AUTO_SCHEDULE = {
    "v1": "sqrt_linear (AnimateDiff)", "v2": "sqrt_linear (AnimateDiff)", "v3": "sqrt_linear (AnimateDiff)",
    "sdxl_beta": "linear (AnimateDiff SDXL beta)", "hotshotxl": "linear (SD default)",
    "animatelcm": "lcm (AnimateLCM)",
}
SCHEDULE_OPTIONS = ["auto", "use existing", *SCHEDULES]


def resolve_schedule(name: str, spec) -> BetaSchedule | None:
    if name == "use existing":
        return None
    if name == "auto":
        name = AUTO_SCHEDULE[spec.version]
    if name not in SCHEDULES:
        raise ValueError(f"unknown beta schedule {name!r}; expected one of {sorted(SCHEDULE_OPTIONS)}")
    return SCHEDULES[name]

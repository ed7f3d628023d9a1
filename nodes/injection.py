"""Insert motion modules into a ComfyUI UNet through keyed, removable extension points.

Everything is attached to a *clone* of the user's MODEL under the key ``animatediff_suite``:

- the motion weights are their own ModelPatcher, registered with ``set_additional_models`` so
  ComfyUI counts, loads and offloads them with the UNet (MotionLoRAs are its weight patches);
- a ``PatcherInjection`` places one ``MotionSlot`` per temporal module inside the UNet's
  ``TimestepEmbedSequential`` blocks when ComfyUI loads the model, and removes them on unload;
- a ``forward_timestep_embed_patch`` runs each slot with the call's ``transformer_options``, whose
  ``FrameLayout`` (set per call by context_sampling.py) says which rows are which frames of which clip;
- v1 only: object patches that make the ResNet GroupNorms and ``out.0`` span all frames (v1_norms.py);
- the domain adapter is a set of ``diff`` weight patches; the beta schedule an object patch
  (beta_schedules.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import comfy.utils
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel, Upsample

from ..motion_modules import (LoRA, MotionModel, MotionModelError, load_motion_model, lora_deltas,
                              motion_lora_deltas)
from .comfy_compat import check_no_core_context_windows, check_no_multigpu, new_model_patcher
from .context_sampling import (ACTIVE_KEY, CONTEXT_KEY, KEY, add_context_windows, add_sampling_wrappers,
                               frame_layout, motion_attention_windows)
from .v1_norms import add_frame_spanning_norms, remove_frame_spanning_norms

log = logging.getLogger(__name__)
# Which GroupNorms span the frames of a clip. original: as the AnimateDiff code (v1: the ResNets' and
# out.0; SDXL beta: the motion modules'). AnimateDiff-Evolved: as that pack does for the versions it
# calls v1 (v1 and SDXL beta): every GroupNorm of the UNet (ResNets, spatial transformers, out.0) and
# of the motion modules; other versions are the same under both.
NORM_SEMANTICS = ("original", "AnimateDiff-Evolved")
EVOLVED_SPANNING_VERSIONS = ("v1", "sdxl_beta")


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
    channels: int = 320  # of the modules at the latent resolution (memory estimate)
    frames_per_clip: int = 0  # 0: the latent batch is one clip; N: clips of N frames, sampled independently
    motion_norm: str | None = None  # the motion modules' GroupNorm mode for this Apply, None: the model's own

    def active(self, sigmas) -> bool:
        """Whether the motion modules run at ``sigmas`` (their first value). The whole schedule (start 0%,
        end 100%) needs no read of the value, which on a GPU would wait for the queued work."""
        if sigmas is None or (self.sigma_start == math.inf and self.sigma_end <= 0.0):
            return True
        sigma = float(sigmas.reshape(-1)[0])
        return self.sigma_end <= sigma <= self.sigma_start


def wrap_motion_model(model: MotionModel, name: str, rebuild=None,
                      disable_dynamic: bool = False) -> LoadedMotionModel:
    """A MotionModel in its own ModelPatcher (of the kind core loaders make: comfy_compat), loaded and
    offloaded where the UNet is; ``rebuild`` as in ``comfy_compat.new_model_patcher``."""
    patcher = new_model_patcher(model, rebuild, disable_dynamic)
    return LoadedMotionModel(name, patcher)


def load_motion_patcher(path: str, name: str) -> LoadedMotionModel:
    """Load a motion model file in the UNet dtype with ComfyUI's casting layers."""
    return LoadedMotionModel(name, reload_motion_patcher(path, name))


def reload_motion_patcher(path: str, name: str, disable_dynamic: bool = False):
    """A fresh ModelPatcher of the motion model in ``path``; also the factory ComfyUI rebuilds it with
    (``rebuild`` in ``comfy_compat.new_model_patcher``)."""
    model = load_motion_model(path, dtype=comfy.model_management.unet_dtype(),
                              operations=comfy.ops.manual_cast)
    return wrap_motion_model(model, name, (reload_motion_patcher, (path, name)), disable_dynamic).patcher


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
        active = transformer_options.get(ACTIVE_KEY)  # read once per UNet call by the layout wrapper
        if not (settings.active(transformer_options.get("sigmas")) if active is None else active):
            return x
        layout = frame_layout(transformer_options, f"motion module {self.prefix}")
        layout.check_batch(x.shape[0], len(transformer_options.get("cond_or_uncond") or [0]),
                           f"motion module {self.prefix}")
        windows, stretch_pe = motion_attention_windows(transformer_options, layout.frames)
        return self._module[0](x, layout.frames, settings.scale, windows, stretch_pe, settings.motion_norm)

    def forward(self, x):
        raise MotionModelError(f"motion module {self.prefix} was called without AnimateDiff Suite's "
                               "forward_timestep_embed patch (the model was rebuilt by another tool?)")


def _run_slot(layer, x, emb, context, transformer_options, *args, **kwargs):
    return layer.run(x, transformer_options)


GRADIENT_CHECKPOINTING = f"{KEY}.gradient_checkpointing"


def enable_gradient_checkpointing(model) -> None:
    """Recompute every layer of the UNet blocks during backward instead of keeping its activations.

    ``model`` is a clone we own. A DIFFUSION_MODEL wrapper wraps each layer of the input, middle and
    output blocks (ResBlocks, transformers, resamplers, motion slots, v1 ResBlock stand-ins) in a
    non-reentrant ``torch.utils.checkpoint`` for the duration of a forward with gradients on. A
    recompute calls the layer with the arguments of its forward, ``transformer_options`` (and so the
    ``FrameLayout``) included, so the frames per clip are the same in both passes.
    """
    model.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, GRADIENT_CHECKPOINTING)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, GRADIENT_CHECKPOINTING,
                               _checkpointed_forward)


def _checkpointed_forward(executor, *args, **kwargs):
    if not torch.is_grad_enabled():
        return executor(*args, **kwargs)
    with checkpointed_layers(executor.class_obj):  # the wrapper runs around UNetModel._forward
        return executor(*args, **kwargs)


@contextlib.contextmanager
def checkpointed_layers(unet: UNetModel):
    """Within the block: each layer of ``unet``'s blocks runs under ``torch.utils.checkpoint``.

    The per-instance attribute (``forward``, or ``run`` for the layers our patches call) is removed
    again on exit, also after an exception; a recompute in backward calls the original method.
    """
    patched = []
    try:
        for block in (*unet.input_blocks, unet.middle_block, *unet.output_blocks):
            for layer in block:
                name = "run" if hasattr(type(layer), "run") else "forward"
                if name in layer.__dict__:
                    continue
                setattr(layer, name, _checkpointed(getattr(layer, name)))
                patched.append((layer, name))
        yield
    finally:
        for layer, name in patched:
            layer.__dict__.pop(name, None)


def _checkpointed(method):
    """``method`` under a non-reentrant checkpoint. ComfyUI's UNet writes per-block entries (``block``,
    ``transformer_index``) into its one ``transformer_options`` dict as the forward goes on, so by the time
    a layer is recomputed in backward the dict names the last block: attention patches keyed by block
    (the predictor's attn2) would be looked up for the wrong layer. Each pass therefore gets its own copy of
    the dict arguments as they were at this call."""
    def call(*args, **kwargs):
        args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
        kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}

        def run(*inner, **named):
            return method(*(dict(a) if isinstance(a, dict) else a for a in inner),
                          **{k: dict(v) if isinstance(v, dict) else v for k, v in named.items()})
        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)
    return call


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
        level = {"down_blocks": module.block_index, "mid_block": levels - 1,
                 "up_blocks": levels - 1 - module.block_index}[module.kind]
        expected = unet.model_channels * mults[level]
        if module.channels != expected:
            raise MotionModelError(f"motion model '{motion.name}' ({spec.family}) expects {module.channels} "
                                   f"channels at {module.block} but the model ({family}) has {expected}")


def _targets(unet: UNetModel, spec) -> list[tuple[torch.nn.Sequential, str, str]]:
    """(container, placement, prefix) for every module, per REFERENCE §1 / §6."""
    _, layers = _layout(spec)
    targets = []
    for module in spec.modules:
        if module.kind == "mid_block":
            targets.append((unet.middle_block, "before_last", module.prefix))
            continue
        position = module.block_index * (layers + 1) + module.index
        if module.kind == "down_blocks":
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
    """Inject/eject callbacks that place the motion model's modules into the patched UNet: the one
    registered on the patcher being injected (a per-device clone has its own), else ``motion_model``."""

    def inject(patcher):
        unet = unet_of(patcher)
        registered = patcher.get_additional_models_with_key(KEY)
        model = registered[0].model if registered else motion_model
        modules = dict(model.named_temporal_modules())
        targets = _targets(unet, model.spec)
        for container, _, _ in targets:
            _strip_slots(container)  # never stack on slots left by an earlier, unejected run
        for container, placement, prefix in targets:
            _insert(container, placement, MotionSlot(prefix, modules[prefix]))

    def eject(patcher):
        unet = unet_of(patcher)
        for block in (*unet.input_blocks, unet.middle_block, *unet.output_blocks):
            _strip_slots(block)

    return comfy.patcher_extension.PatcherInjection(inject=inject, eject=eject)


def _without_our_patch(model_options: dict) -> None:
    patches = model_options["transformer_options"].setdefault("patches", {})
    patches["forward_timestep_embed_patch"] = [
        p for p in patches.get("forward_timestep_embed_patch", []) if p[0] is not MotionSlot]


def apply_motion(model, motion: LoadedMotionModel, loras=(), scale: float = 1.0,
                 start_percent: float = 0.0, end_percent: float = 1.0, schedule=None,
                 domain_adapter: tuple[LoRA, float] | None = None, context=None, frames_per_clip: int = 0,
                 norm_semantics: str = "original"):
    """Return a clone of ``model`` that animates with ``motion``; ``model`` itself is untouched.

    Args:
        loras: MotionLoraEntry chain (applied as weight patches of a clone of the motion model).
        scale: motion scale (softmax-scale multiplier of the temporal attention).
        start_percent, end_percent: sampling range where motion modules run.
        schedule: a callable ``(model) -> model_sampling`` or None to keep the model's own.
        domain_adapter: (LoRA, strength) applied to the UNet's spatial attention.
        context: ContextOptions for clips longer than one window (see context_sampling.py).
        frames_per_clip: 0: the latent batch is one clip; N: the batch holds clips of N frames each,
            sampled in one pass but independently (motion never crosses from one clip to the next).
        norm_semantics: a key of ``NORM_SEMANTICS``: which GroupNorms span the frames of a clip.
    """
    if norm_semantics not in NORM_SEMANTICS:
        raise MotionModelError(f"unknown norm_semantics {norm_semantics!r}; expected one of {list(NORM_SEMANTICS)}")
    if frames_per_clip < 0:
        raise MotionModelError(f"frames_per_clip must be 0 (one clip) or more, got {frames_per_clip}")
    check_no_multigpu(model, "Apply Motion Model")
    check_no_core_context_windows(model.model_options, "Apply Motion Model")
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
    evolved_norms = norm_semantics == "AnimateDiff-Evolved" and motion.spec.version in EVOLVED_SPANNING_VERSIONS
    # 0% and 100% are the ends of any schedule (percent_to_sigma's 999999999.9 and 0.0)
    sigma_start = math.inf if start_percent <= 0.0 else float(sampling.percent_to_sigma(start_percent))
    sigma_end = 0.0 if end_percent >= 1.0 else float(sampling.percent_to_sigma(end_percent))
    settings = MotionSettings(scale=float(scale), sigma_start=sigma_start, sigma_end=sigma_end, heads=motion.spec.heads,
                              channels=motion.spec.modules[0].channels, frames_per_clip=int(frames_per_clip),
                              motion_norm="across_frames" if evolved_norms else None)
    patched.set_additional_models(KEY, [motion_patcher])
    patched.set_injections(KEY, [make_injection(motion_patcher.model)])
    _without_our_patch(patched.model_options)
    patched.set_model_forward_timestep_embed_patch((MotionSlot, _run_slot))
    patched.model_options["transformer_options"][KEY] = settings
    if motion.spec.version == "v1" or evolved_norms:
        add_frame_spanning_norms(patched, KEY, transformers=evolved_norms)
    else:
        remove_frame_spanning_norms(patched, KEY)
    if context is not None:
        add_context_windows(patched, context, motion.spec.frame_limit, motion.name)
    else:  # a model animated before keeps no stale windows (the wrappers then pass through)
        patched.model_options["transformer_options"].pop(CONTEXT_KEY, None)
    add_sampling_wrappers(patched)  # clip layout, windows, memory plan, checks
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

"""v1 motion models: ResNet GroupNorms whose statistics span all frames of a clip.

The original v1 UNet is a 3D network: its ResBlocks normalise the 5D video tensor, so each
GroupNorm's statistics cover a group's channels over every frame (REFERENCE §1). ComfyUI's UNet
normalises each frame alone. Object patches (on a clone, removed on unload) replace

- every ResBlock by a ``FrameSpanningResBlock`` stand-in: the same submodules and weights (so the
  state dict keys, weight patches and LoRAs are unchanged), with copies of its two GroupNorms that
  span frames. It is not a ``TimestepBlock``, so ComfyUI's ``forward_timestep_embed`` hands it to our
  ``forward_timestep_embed_patch`` together with the call's ``transformer_options``, whose
  ``FrameLayout`` gives the frames per clip;
- ``out.0`` (called by the UNet outside any block) by a spanning copy that a DIFFUSION_MODEL wrapper
  tells the layout of the running call.

The frame count reaches the norms inside each block's own call, so gradient checkpointing of the
UNet blocks recomputes them with the same statistics.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from einops import rearrange

import comfy.patcher_extension
import comfy.utils
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock, UNetModel

from ..motion_modules import MotionModelError
from .context_sampling import frame_layout


class _SpanningNorm:
    """Mixin of a GroupNorm copy: with ``frames`` set, statistics over all frames of each clip."""

    frames: int | None = None

    def forward(self, x):
        frames = self.frames
        if not frames or frames == 1:
            return self._plain_forward(x)
        if x.shape[0] % frames:
            raise MotionModelError(f"a frame-spanning GroupNorm got {x.shape[0]} rows, not whole clips of {frames} frames")
        y = self._plain_forward(rearrange(x, "(b f) c h w -> b c (f h) w", f=frames))
        return rearrange(y, "b c (f h) w -> (b f) c h w", f=frames)


def spanning_norm(norm: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``norm`` sharing its parameters, whose statistics span the frames of a clip."""
    base = getattr(norm, "_base_class", type(norm))  # a spanning copy applied by a loaded clone: its base
    cls = type(f"FrameSpanning{base.__name__}", (_SpanningNorm, base),
               {"_plain_forward": base.forward, "_base_class": base})
    spanning = copy.copy(norm)
    spanning.__class__ = cls
    return spanning


@contextlib.contextmanager
def spanning_frames(norms, frames: int):
    """Tell ``norms`` the frames per clip for the duration of one call."""
    for norm in norms:
        norm.frames = frames
    try:
        yield
    finally:
        for norm in norms:
            norm.frames = None


def _with_spanning_first(layers: torch.nn.Sequential) -> torch.nn.Sequential:
    """A copy of ``layers`` (same modules) whose first one, a GroupNorm, spans frames."""
    copied = copy.copy(layers)
    copied._modules = dict(layers._modules)
    first = next(iter(copied._modules))
    copied._modules[first] = spanning_norm(layers._modules[first])
    return copied


class FrameSpanningResBlock(torch.nn.Module):
    """Stand-in for one ResBlock (see the module docstring); built by ``frame_spanning_resblock``."""

    _block_class: type
    _norms: tuple

    _original: tuple

    def run(self, x: torch.Tensor, emb: torch.Tensor, frames: int) -> torch.Tensor:
        with spanning_frames(self._norms, frames):
            return self._block_class.forward(self, x, emb)

    def _forward(self, x, emb):  # what the ResBlock's forward (and its checkpoint) calls
        return self._block_class._forward(self, x, emb)

    def forward(self, *args, **kwargs):
        raise MotionModelError("a v1 frame-spanning ResBlock was called without AnimateDiff Suite's "
                               "forward_timestep_embed patch (the model was rebuilt by another tool?)")


def frame_spanning_resblock(block: ResBlock) -> FrameSpanningResBlock:
    if isinstance(block, FrameSpanningResBlock):  # applied by a loaded clone: start from its ResBlock
        block = block._original[0]
    standin = FrameSpanningResBlock.__new__(FrameSpanningResBlock)
    standin.__dict__.update(block.__dict__)  # flags, hooks; _parameters/_buffers shared with the block
    standin._modules = dict(block._modules)
    standin._modules["in_layers"] = _with_spanning_first(block.in_layers)
    standin._modules["out_layers"] = _with_spanning_first(block.out_layers)
    standin._block_class = type(block)
    standin._original = (block,)  # not a child: the state dict sees the same keys as the ResBlock's
    standin._norms = (standin._modules["in_layers"][0], standin._modules["out_layers"][0])
    return standin


class FrameSpanningTransformer(torch.nn.Module):
    """Stand-in for one SpatialTransformer whose input GroupNorm spans frames (norm_semantics
    AnimateDiff-Evolved); built by ``frame_spanning_transformer``, run by ``_run_transformer``."""

    _block_class: type
    _norms: tuple
    _original: tuple

    def run(self, x, context, transformer_options, frames: int):
        with spanning_frames(self._norms, frames):
            return self._block_class.forward(self, x, context, transformer_options=transformer_options)

    def forward(self, *args, **kwargs):
        raise MotionModelError("a frame-spanning SpatialTransformer was called without AnimateDiff Suite's "
                               "forward_timestep_embed patch (the model was rebuilt by another tool?)")


def frame_spanning_transformer(block: SpatialTransformer) -> FrameSpanningTransformer:
    if isinstance(block, FrameSpanningTransformer):
        block = block._original[0]
    standin = FrameSpanningTransformer.__new__(FrameSpanningTransformer)
    standin.__dict__.update(block.__dict__)
    standin._modules = dict(block._modules)
    standin._modules["norm"] = spanning_norm(block.norm)
    standin._block_class = type(block)
    standin._original = (block,)
    standin._norms = (standin._modules["norm"],)
    return standin


def _run_transformer(layer, x, emb, context, transformer_options, *args, **kwargs):
    layout = frame_layout(transformer_options, "a frame-spanning SpatialTransformer")
    return layer.run(x, context, transformer_options, layout.frames)


def _transformer_paths(unet: UNetModel) -> list[str]:
    """Object-patch paths of every SpatialTransformer of the UNet (motion slots are only ever added after them)."""
    return [f"diffusion_model.{name}.{index}.{position}"
            for name, blocks in (("input_blocks", unet.input_blocks), ("output_blocks", unet.output_blocks))
            for index, block in enumerate(blocks) for position, layer in enumerate(block)
            if isinstance(layer, (SpatialTransformer, FrameSpanningTransformer))] + \
        [f"diffusion_model.middle_block.{position}" for position, layer in enumerate(unet.middle_block)
         if isinstance(layer, (SpatialTransformer, FrameSpanningTransformer))]


def _run_resblock(layer, x, emb, context, transformer_options, *args, **kwargs):
    layout = frame_layout(transformer_options, "a v1 frame-spanning ResBlock")
    return layer.run(x, emb, layout.frames)


def _resblock_paths(unet: UNetModel) -> list[str]:
    """Object-patch paths of every ResBlock of the uninjected UNet."""
    paths = []
    for name in ("input_blocks", "output_blocks"):
        for index, block in enumerate(getattr(unet, name)):
            if isinstance(block[0], (ResBlock, FrameSpanningResBlock)):
                paths.append(f"diffusion_model.{name}.{index}.0")
    from .injection import MotionSlot  # the middle block may hold a slot left by a loaded clone
    plain = [m for m in unet.middle_block if not isinstance(m, MotionSlot)]
    paths += [f"diffusion_model.middle_block.{i}" for i, m in enumerate(plain)
              if isinstance(m, (ResBlock, FrameSpanningResBlock))]
    return paths


OUT_NORM = "diffusion_model.out.0"


def add_frame_spanning_norms(model, key: str, transformers: bool = False) -> None:
    """Patch ``model`` (a clone we own) so its ResBlock norms and ``out.0`` span frames while animated;
    with ``transformers``, the SpatialTransformers' input norms too (norm_semantics AnimateDiff-Evolved)."""
    remove_frame_spanning_norms(model, key)
    unet = model.model.diffusion_model
    for path in _resblock_paths(unet):
        model.add_object_patch(path, frame_spanning_resblock(comfy.utils.get_attr(model.model, path)))
    if transformers:
        for path in _transformer_paths(unet):
            model.add_object_patch(path, frame_spanning_transformer(comfy.utils.get_attr(model.model, path)))
        model.set_model_forward_timestep_embed_patch((FrameSpanningTransformer, _run_transformer))
    out_norm = spanning_norm(unet.out[0])
    model.add_object_patch(OUT_NORM, out_norm)
    model.set_model_forward_timestep_embed_patch((FrameSpanningResBlock, _run_resblock))

    def span_out_norm(executor, x, *args, **kwargs):
        transformer_options = args[4] if len(args) > 4 else kwargs.get("transformer_options", {})
        with spanning_frames((out_norm,), frame_layout(transformer_options, "the v1 output norm").frames):
            return executor(x, *args, **kwargs)

    model.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, f"{key}.v1_norms")
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, f"{key}.v1_norms", span_out_norm)


def remove_frame_spanning_norms(model, key: str) -> None:
    """Undo ``add_frame_spanning_norms`` on ``model`` (a clone we own; e.g. a v1-animated model re-animated
    with a v2 motion model)."""
    for path, patch in list(model.object_patches.items()):
        if isinstance(patch, (FrameSpanningResBlock, FrameSpanningTransformer, _SpanningNorm)):
            del model.object_patches[path]
    _drop_resblock_patch(model)
    model.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, f"{key}.v1_norms")


def _drop_resblock_patch(model) -> None:
    patches = model.model_options["transformer_options"].setdefault("patches", {})
    patches["forward_timestep_embed_patch"] = [
        p for p in patches.get("forward_timestep_embed_patch", [])
        if p[0] not in (FrameSpanningResBlock, FrameSpanningTransformer)]

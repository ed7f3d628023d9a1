"""SparseCtrl in ComfyUI's ControlNet plumbing: a ``comfy.controlnet.ControlBase`` whose residuals come from
the core's ``SparseCtrlModel``.

Apply SparseCtrl puts one ``SparseCtrlControl`` on the positive and negative conditioning, as ComfyUI's own
Apply ControlNet does, so it chains with other ControlNets, follows start/end percent and is loaded and
offloaded with the UNet (``get_models``). Each UNet call it builds the keyframe condition of exactly the
frames in the call from the call's ``FrameLayout`` (context_sampling.py): with context windows, a window
that holds no keyframe gets an all-zero condition and mask, as in the original pipeline for unkeyed frames.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

import comfy.controlnet
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.utils

from ..motion_modules import MotionModelError
from ..motion_modules.layout import FrameLayout
from ..motion_modules.sparsectrl import SparseCtrlModel, keyframe_positions, sparse_condition
from ..motion_modules.sparsectrl_format import load_sparsectrl
from .comfy_compat import new_model_patcher
from .context_sampling import LAYOUT_KEY, motion_attention_windows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedSparseCtrl:
    """What a SPARSECTRL socket carries: the file name and a ModelPatcher of the SparseCtrlModel."""

    name: str
    patcher: comfy.model_patcher.ModelPatcher

    @property
    def spec(self):
        return self.patcher.model.spec


def load_sparsectrl_patcher(path: str, name: str, disable_dynamic: bool = False) -> LoadedSparseCtrl:
    """Load a SparseCtrl file in the UNet dtype with ComfyUI's casting layers, in its own ModelPatcher."""
    model = load_sparsectrl(path, dtype=comfy.model_management.unet_dtype(), operations=comfy.ops.manual_cast)
    return wrap_sparsectrl(model, name, (_rebuild, (path, name)), disable_dynamic)


def _rebuild(path: str, name: str, disable_dynamic: bool = False):
    return load_sparsectrl_patcher(path, name, disable_dynamic).patcher


def wrap_sparsectrl(model: SparseCtrlModel, name: str, rebuild=None, disable_dynamic: bool = False) -> LoadedSparseCtrl:
    patcher = new_model_patcher(model, rebuild, disable_dynamic)
    return LoadedSparseCtrl(name, patcher)


class SparseCtrlControl(comfy.controlnet.ControlBase):
    """SparseCtrl residuals for the UNet calls of one sampling, from ``images`` on their keyframes.

    Args:
        sparsectrl: the loaded model.
        images: IMAGE (k, h, w, 3) in [0, 1], one per keyframe (never modified).
        indexes: the frame of each image (negative from the end), or None to spread them evenly.
        vae: the VAE that encodes rgb keyframes (unused for scribble).
    """

    def __init__(self, sparsectrl: LoadedSparseCtrl, images: torch.Tensor, indexes: tuple[int, ...] | None,
                 vae=None, encoded: dict | None = None):
        super().__init__()
        self.sparsectrl = sparsectrl
        self.images = images
        self.indexes = indexes
        self.vae = vae
        # keyframe conditions per (latent size, device, dtype), shared by the per-window copies of a sampling
        self.encoded = {} if encoded is None else encoded
        self.model_sampling_current = None
        self.model_latent_format = None

    def copy(self) -> "SparseCtrlControl":
        c = SparseCtrlControl(self.sparsectrl, self.images, self.indexes, self.vae, self.encoded)
        self.copy_to(c)
        return c

    def get_models(self):
        return super().get_models() + [self.sparsectrl.patcher]

    def pre_run(self, model, percent_to_timestep_function):
        super().pre_run(model, percent_to_timestep_function)
        self.model_sampling_current = model.model_sampling
        self.model_latent_format = model.latent_format

    def cleanup(self):
        self.model_sampling_current = None
        self.encoded.clear()
        super().cleanup()

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        previous = None
        if self.previous_controlnet is not None:
            previous = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
        if self.timestep_range is not None and (t[0] > self.timestep_range[0] or t[0] < self.timestep_range[1]):
            return previous
        where = f"Apply SparseCtrl ('{self.sparsectrl.name}')"
        layout = transformer_options.get(LAYOUT_KEY) or FrameLayout.whole(1, x_noisy.shape[0] // batched_number)
        layout.check_batch(x_noisy.shape[0], batched_number, where)
        comfy.model_management.throw_exception_if_processing_interrupted()
        model: SparseCtrlModel = self.sparsectrl.patcher.model
        dtype = comfy.model_management.unet_manual_cast(model.conv_in.weight.dtype, x_noisy.device) \
            or model.conv_in.weight.dtype
        keyframes = self._keyframes(x_noisy, dtype)
        positions = keyframe_positions(self.indexes, keyframes.shape[0], layout.clip_frames, where)
        condition, mask = sparse_condition(keyframes, positions, layout.row_frames(batched_number))
        context = cond.get("crossattn_controlnet", cond["c_crossattn"])
        if context.shape[0] == 1:
            context = context.expand(x_noisy.shape[0], -1, -1)
        windows, stretch_pe = motion_attention_windows(transformer_options, layout.frames)
        residuals, mid = model(self.model_sampling_current.timestep(t).to(dtype),
                               comfy.model_management.cast_to_device(context, x_noisy.device, dtype),
                               condition, mask, layout.frames, windows, stretch_pe)
        return self.control_merge({"input": [], "middle": [mid], "output": residuals}, previous, output_dtype=None)

    def _keyframes(self, x_noisy: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The keyframes as conditions for latents of ``x_noisy``'s size: images resized (bilinear, centre
        crop) to 8x the latent, then VAE-encoded and scaled into the model's latent space (rgb) or kept
        as pixels in [0, 1] (scribble)."""
        height, width = x_noisy.shape[-2:]
        key = (height, width, x_noisy.device, dtype)
        if key not in self.encoded:
            pixels = comfy.utils.common_upscale(self.images.movedim(-1, 1)[:, :3], width * 8, height * 8,
                                                "bilinear", "center")
            if self.sparsectrl.spec.kind == "rgb":
                pixels = self._encode(pixels.movedim(1, -1))
            self.encoded.clear()
            self.encoded[key] = pixels.to(device=x_noisy.device, dtype=dtype)
        return self.encoded[key]

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            raise MotionModelError(f"SparseCtrl '{self.sparsectrl.name}' is an RGB SparseCtrl: its keyframes go "
                                   "through the VAE; connect the vae input of Apply SparseCtrl")
        # ComfyUI's own ControlNets encode hints mid-sampling the same way: the VAE may push the UNet out of
        # memory, so load back whatever was in use
        loaded_models = getattr(comfy.model_management, "loaded_models", None)
        in_use = loaded_models(only_currently_used=True) if loaded_models else []
        latent = self.vae.encode(pixels)
        if in_use:
            comfy.model_management.load_models_gpu(in_use)
        return self.model_latent_format.process_in(latent)


def parse_indexes(text: str, where: str = "keyframe_indexes") -> tuple[int, ...] | None:
    """``"0, 8, -1"`` -> (0, 8, -1); empty -> None (spread the images evenly)."""
    parts = [part.strip() for part in (text or "").replace(";", ",").split(",")]
    parts = [part for part in parts if part]
    if not parts:
        return None
    try:
        return tuple(int(part) for part in parts)
    except ValueError:
        raise MotionModelError(f"{where} {text!r}: expected whole frame numbers separated by commas, e.g. "
                               "'0, -1' (first and last frame), or nothing to spread the images evenly") from None


def apply_sparsectrl(positive, negative, sparsectrl: LoadedSparseCtrl, images: torch.Tensor, indexes, strength: float,
                     start_percent: float, end_percent: float, vae=None):
    """New positive and negative conditioning lists with a SparseCtrlControl chained after any control they
    carry (one control object per previous control, shared by both lists, as ComfyUI's Apply ControlNet)."""
    where = f"Apply SparseCtrl ('{sparsectrl.name}')"
    if images.ndim != 4 or images.shape[-1] not in (3, 4):
        raise MotionModelError(f"{where}: images should be an IMAGE batch (k, height, width, 3); got shape "
                               f"{tuple(images.shape)}")
    if indexes is not None and len(indexes) != images.shape[0]:
        raise MotionModelError(f"{where}: {len(indexes)} keyframe indexes {list(indexes)} for {images.shape[0]} "
                               "images; give one index per image, or none to spread the images evenly")
    if sparsectrl.spec.kind == "rgb" and vae is None:
        raise MotionModelError(f"{where}: '{sparsectrl.name}' is an RGB SparseCtrl: its keyframes go through the "
                               "VAE; connect the vae input")
    controls = {}
    out = []
    for conditioning in (positive, negative):
        entries = []
        for tokens, options in conditioning:
            options = options.copy()
            previous = options.get("control")
            if previous not in controls:
                control = SparseCtrlControl(sparsectrl, images, indexes, vae)
                control.strength = float(strength)
                control.timestep_percent_range = (float(start_percent), float(end_percent))
                control.set_previous_controlnet(previous)
                controls[previous] = control
            options["control"] = controls[previous]
            options["control_apply_to_uncond"] = False
            entries.append([tokens, options])
        out.append(entries)
    return out[0], out[1]

"""The Semantic Motion Predictor on a ComfyUI model: attn2 replacement patches keyed per cross-attention layer.

``patch_model`` registers one ``PredictorPatch`` per cross-attention layer the predictor feeds in a *clone*'s
``transformer_options["patches_replace"]["attn2"][(block, number, index)]``: ComfyUI passes the projected
``q`` and the text's ``k, v``, the patch adds the call's frames' predictor tokens through the layer's own
W_k', W_v' and attends over both (``motion_modules.motion_predictor.attention_with_tokens``, paper eq. 6).
The predictor weights are their own ModelPatcher (``set_additional_models``), loaded with the UNet.

Which frame each row is comes from the call's ``FrameLayout`` (context_sampling.py), so with context windows
every window's frames get their own P_i. The frame embeddings of a clip of L frames are predicted once per
sampling and device (``PredictorState``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

import comfy.model_management
import comfy.model_patcher

from ..motion_modules import MotionModelError
from ..motion_modules.layout import FrameLayout
from ..motion_modules.motion_predictor import MotionPredictor, attention_with_tokens, load_predictor
from .comfy_compat import new_model_patcher
from .consistent_patch import transformer_blocks
from .context_sampling import LAYOUT_KEY

log = logging.getLogger(__name__)
KEY = "animatediff_suite.motion_predictor"


@dataclass(frozen=True)
class LoadedPredictor:
    """What a MOTION_PREDICTOR socket carries: the file name and a ModelPatcher of the MotionPredictor."""

    name: str
    patcher: comfy.model_patcher.ModelPatcher

    @property
    def spec(self):
        return self.patcher.model.spec


def wrap_predictor(model: MotionPredictor, name: str, rebuild=None, disable_dynamic: bool = False) -> LoadedPredictor:
    patcher = new_model_patcher(model, rebuild, disable_dynamic)
    return LoadedPredictor(name, patcher)


@dataclass(frozen=True)
class PredictorState:
    """One Apply's predictor, start/end embeddings and strength, shared by every layer's patch (ComfyUI
    deep-copies model options: the copy is this object, so the per-length cache is shared too)."""

    predictor: LoadedPredictor
    start: torch.Tensor  # (1, image_dim)
    end: torch.Tensor
    strength: float
    cache: dict = field(default_factory=dict)

    def __deepcopy__(self, memo):
        return self

    def tokens(self, frames: int) -> torch.Tensor:
        """(frames, tokens, token_dim): the cross-attention tokens of every frame of a clip of ``frames``, on the
        predictor's device in its dtype (where the layers' extra projections read them)."""
        weight = self.predictor.patcher.model.proj_in.weight
        key = (frames, weight.device, weight.dtype)
        if key not in self.cache:
            model: MotionPredictor = self.predictor.patcher.model
            with torch.no_grad():
                embeddings = model.predict(self.start.to(weight), self.end.to(weight), frames)[0]
                self.cache.clear()
                self.cache[key] = model.frame_tokens(embeddings)
        return self.cache[key]


@dataclass(frozen=True)
class PredictorPatch:
    """The attn2 replacement of one cross-attention layer."""

    state: PredictorState
    layer: tuple[str, int, int]

    def __call__(self, q, k, v, extra_options):
        chunks = len(extra_options.get("cond_or_uncond") or [0])
        where = f"Apply Semantic Motion Predictor ('{self.state.predictor.name}'), layer {self.layer}"
        layout: FrameLayout = extra_options.get(LAYOUT_KEY) or FrameLayout.whole(1, q.shape[0] // chunks)
        layout.check_batch(q.shape[0], chunks, where)
        tokens = self.state.tokens(layout.clip_frames)
        rows = torch.as_tensor(layout.row_frames(chunks), device=tokens.device)
        k_extra, v_extra = self.state.predictor.patcher.model.extra_kv(self.layer, tokens[rows])
        return attention_with_tokens(q, k, v, k_extra.to(q), v_extra.to(q), extra_options["n_heads"], self.state.strength)


def cross_attention_layers(model) -> dict[tuple[str, int, int], int]:
    """Every cross-attention layer of the UNet as ComfyUI keys them, with its attention width."""
    return {layer: block.attn2.to_q.out_features for layer, block in transformer_blocks(model).items()}


def patch_model(model, predictor: LoadedPredictor, start: torch.Tensor, end: torch.Tensor, strength: float):
    """A clone of ``model`` whose cross-attention layers also attend to the predictor's frame tokens.

    Args:
        start, end: (1, image_dim) image embeddings of the first and last frame (the predictor's encoder E).
    """
    where = f"Apply Semantic Motion Predictor ('{predictor.name}')"
    spec = predictor.spec
    if start.shape[-1] != spec.image_dim:
        raise MotionModelError(f"{where}: the CLIP vision model gives image embeddings of {start.shape[-1]} features "
                               f"but this predictor was trained on {spec.image_dim}; use the CLIP vision model it was "
                               "trained with")
    available = cross_attention_layers(model)
    wrong = [f"{layer} (width {available.get(layer)}, predictor {width})" for layer, width in spec.layers
             if available.get(layer) != width]
    if wrong:
        raise MotionModelError(f"{where}: the predictor feeds cross-attention layers this model lacks or has at "
                               f"another width: {', '.join(wrong[:4])}; it was trained for another model family")
    patched = model.clone()
    existing = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    taken = [layer for layer, _ in spec.layers
             if layer in existing and not isinstance(existing[layer], PredictorPatch)]
    if taken:
        raise MotionModelError(f"{where}: another node already replaces the cross-attention of layers {taken[:4]} "
                               "(an IP-Adapter?); apply the predictor first, or not together with that node")
    state = PredictorState(predictor, start.detach().float().cpu(), end.detach().float().cpu(), float(strength))
    for layer, _ in spec.layers:
        patched.set_model_attn2_replace(PredictorPatch(state, layer), *layer)
    patched.set_additional_models(KEY, [predictor.patcher])
    return patched


def load_predictor_patcher(path: str, name: str, disable_dynamic: bool = False) -> LoadedPredictor:
    """Load a predictor file in the UNet dtype, in its own ModelPatcher."""
    model = load_predictor(path, dtype=comfy.model_management.unet_dtype())
    return wrap_predictor(model, name, (_rebuild, (path, name)), disable_dynamic)


def _rebuild(path: str, name: str, disable_dynamic: bool = False):
    return load_predictor_patcher(path, name, disable_dynamic).patcher


def image_embedding(clip_vision, image: torch.Tensor, where: str) -> torch.Tensor:
    """The (1, image_dim) projected image embedding of one IMAGE (the first of a batch) by ``clip_vision``."""
    if image.ndim != 4 or image.shape[0] < 1:
        raise MotionModelError(f"{where}: expected an IMAGE batch (k, height, width, 3), got shape {tuple(image.shape)}")
    if image.shape[0] > 1:
        log.warning("%s: %d images given; using the first", where, image.shape[0])
    return clip_vision.encode_image(image[:1]).image_embeds.float()

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
        """(1, frames, tokens, token_dim): the cross-attention tokens of every frame of a clip of ``frames`` (the
        same for every clip of the batch), on the predictor's device in its dtype (where the layers' extra
        projections read them)."""
        weight = self.predictor.patcher.model.proj_in.weight
        key = (frames, weight.device, weight.dtype)
        if key not in self.cache:
            model: MotionPredictor = self.predictor.patcher.model
            with torch.no_grad():
                embeddings = model.predict(self.start.to(weight), self.end.to(weight), frames)
                self.cache.clear()
                self.cache[key] = model.frame_tokens(embeddings)
        return self.cache[key]


class TrainingState:
    """The predictor state of a training run (mode ``semantic_motion_predictor``): for each micro-batch, every
    clip's own start/end embeddings, predicted once with gradients and read by every layer's patch (the
    gradients of all layers meet in one predictor forward; a checkpoint recompute reads the same tokens)."""

    def __init__(self, predictor: LoadedPredictor):
        self.predictor = predictor
        self.strength = 1.0
        self.prediction: torch.Tensor | None = None  # (clips, frames, image_dim): P of the current micro-batch
        self._tokens: torch.Tensor | None = None

    def __deepcopy__(self, memo):
        return self

    def set_pairs(self, start: torch.Tensor, end: torch.Tensor, frames: int) -> torch.Tensor:
        """Predict P for (clips, image_dim) start and end embeddings; returns P (clips, frames, image_dim)."""
        model: MotionPredictor = self.predictor.patcher.model
        weight = model.proj_in.weight
        self.prediction = model.predict(start.to(weight), end.to(weight), frames)
        self._tokens = model.frame_tokens(self.prediction)
        return self.prediction

    def clear(self) -> None:
        self.prediction = self._tokens = None

    def tokens(self, frames: int) -> torch.Tensor:
        """(clips, frames, tokens, token_dim) of the current micro-batch."""
        if self._tokens is None or self._tokens.shape[1] != frames:
            have = "none" if self._tokens is None else f"{self._tokens.shape[1]} frames"
            raise MotionModelError(f"the trained Semantic Motion Predictor was called for clips of {frames} frames "
                                   f"but predicted {have} for this micro-batch")
        return self._tokens


@dataclass(frozen=True)
class PredictorPatch:
    """The attn2 replacement of one cross-attention layer."""

    state: PredictorState | TrainingState
    layer: tuple[str, int, int]

    def __call__(self, q, k, v, extra_options):
        chunks = len(extra_options.get("cond_or_uncond") or [0])
        where = f"Apply Semantic Motion Predictor ('{self.state.predictor.name}'), layer {self.layer}"
        layout: FrameLayout = extra_options.get(LAYOUT_KEY) or FrameLayout.whole(1, q.shape[0] // chunks)
        layout.check_batch(q.shape[0], chunks, where)
        tokens = self.state.tokens(layout.clip_frames)
        if tokens.shape[0] == 1:  # one start/end pair for every clip of the batch
            rows, tokens = layout.row_frames(chunks), tokens[0]
        else:  # a pair per clip: row -> (clip, frame) of the latent batch
            clips = max(layout.clip_ids) + 1
            if clips > tokens.shape[0]:
                raise MotionModelError(f"{where}: the batch has {clips} clips but the predictor has start/end "
                                       f"embeddings for {tokens.shape[0]}")
            rows, tokens = layout.batch_index() * chunks, tokens.flatten(0, 1)
        rows = torch.as_tensor(rows, device=tokens.device)
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
    check_image_dim(predictor, start.shape[-1], where)
    state = PredictorState(predictor, start.detach().float().cpu(), end.detach().float().cpu(), float(strength))
    return patch_with_state(model, state, where)


def check_image_dim(predictor: LoadedPredictor, image_dim: int, where: str) -> None:
    if image_dim != predictor.spec.image_dim:
        raise MotionModelError(f"{where}: the CLIP vision model gives image embeddings of {image_dim} features "
                               f"but this predictor was trained on {predictor.spec.image_dim}; use the CLIP vision "
                               "model it was trained with")


def patch_with_state(model, state: PredictorState | TrainingState, where: str):
    """A clone of ``model`` with ``state``'s predictor patched into every layer it feeds (checks the layers)."""
    predictor = state.predictor
    available = cross_attention_layers(model)
    wrong = [f"{layer} (width {available.get(layer)}, predictor {width})" for layer, width in predictor.spec.layers
             if available.get(layer) != width]
    if wrong:
        raise MotionModelError(f"{where}: the predictor feeds cross-attention layers this model lacks or has at "
                               f"another width: {', '.join(wrong[:4])}; it was trained for another model family")
    patched = model.clone()
    existing = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    taken = [layer for layer, _ in predictor.spec.layers
             if layer in existing and not isinstance(existing[layer], PredictorPatch)]
    if taken:
        raise MotionModelError(f"{where}: another node already replaces the cross-attention of layers {taken[:4]} "
                               "(an IP-Adapter?); apply the predictor first, or not together with that node")
    for layer, _ in predictor.spec.layers:
        patched.set_model_attn2_replace(PredictorPatch(state, layer), *layer)
    patched.set_additional_models(KEY, [predictor.patcher])
    return patched


def load_predictor_patcher(path: str, name: str, disable_dynamic: bool = False) -> LoadedPredictor:
    """Load a predictor file in the UNet dtype, in its own ModelPatcher."""
    model = load_predictor(path, dtype=comfy.model_management.unet_dtype())
    return wrap_predictor(model, name, (_rebuild, (path, name)), disable_dynamic)


def _rebuild(path: str, name: str, disable_dynamic: bool = False):
    return load_predictor_patcher(path, name, disable_dynamic).patcher


def embedding_width(clip_vision) -> int:
    """Features of ``clip_vision``'s image embeddings (read from one encoded black image: any encoder ComfyUI loads)."""
    with torch.no_grad():
        return int(clip_vision.encode_image(torch.zeros(1, 64, 64, 3)).image_embeds.shape[-1])


def image_embedding(clip_vision, image: torch.Tensor, where: str) -> torch.Tensor:
    """The (1, image_dim) projected image embedding of one IMAGE (the first of a batch) by ``clip_vision``."""
    if image.ndim != 4 or image.shape[0] < 1:
        raise MotionModelError(f"{where}: expected an IMAGE batch (k, height, width, 3), got shape {tuple(image.shape)}")
    if image.shape[0] > 1:
        log.warning("%s: %d images given; using the first", where, image.shape[0])
    return clip_vision.encode_image(image[:1]).image_embeds.float()

"""The training loop shared by the command line and the nodes, on ComfyUI's own sampling path.

The base model is a ComfyUI MODEL (any checkpoint ComfyUI loads); motion modules go in through
``nodes/injection.apply_motion``; LoRAs are ComfyUI weight wrappers; every forward is a call of a
``CFGGuider`` (cfg 1) from inside a ``Sampler`` whose ``sample`` is the training loop, as ComfyUI's
own ``TrainLoraNode`` does, so wrappers, patches, the frame layout and the memory plan are the
inference ones. Noise levels come from the patched model's ``model_sampling`` (``auto``: the
AnimateDiff schedule), one timestep per clip shared by its frames (REFERENCE §4).

Loss: MSE between the model's raw output and its target (epsilon or v, whatever the model
predicts), computed from ComfyUI's denoised output as ``(denoised - x0) / c_out`` where
``c_out = -calculate_denoised(sigma, 1, 0)`` is the output's gain in the model's own parameterisation.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import functools
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils

from ..motion_modules import MotionModel, MotionModelError, MotionSpec
from ..motion_modules.motion_predictor import MotionPredictor, PredictorSpec
from ..nodes.beta_schedules import resolve_schedule
from ..nodes.comfy_compat import forget_loaded
from ..nodes.context_sampling import KEY
from ..nodes.injection import LoadedMotionModel, apply_motion, enable_gradient_checkpointing, wrap_motion_model
from ..nodes.motion_predictor_patch import (LoadedPredictor, TrainingState, check_image_dim, cross_attention_layers,
                                            embedding_width, patch_with_state, wrap_predictor)
from .adapters import SPATIAL_TARGET, TEMPORAL_TARGET, LoRAWeight, attach, make_loras
from .cache import DiskCache, key_of, weights_hash
from .checkpoints import ResumeError, atomic_write, check_resumable, check_writable, load_state, state_paths
from .config import Config
from .data import ClipSource, bucket_counts
from .distributed import World
from .losses import debiased_mse, lr_factor
from .loop import LoopSampler, Stopped, TrainingError

log = logging.getLogger(__name__)


@dataclass
class BaseModels:
    """What is trained on: a ComfyUI MODEL, CLIP and VAE, and a motion model (or None)."""

    model: object
    clip: object
    vae: object
    motion: LoadedMotionModel | None
    base_id: str  # names the base weights for the resume check
    clip_vision: object = None  # semantic_motion_predictor: the image encoder E (a ComfyUI ClipVisionModel)
    predictor: LoadedPredictor | None = None  # semantic_motion_predictor: one to continue training


@dataclass
class Trainables:
    """The parameters a mode trains: LoRAs (temporal, spatial), a whole motion model or a motion predictor."""

    temporal: dict[str, LoRAWeight] = field(default_factory=dict)
    spatial: dict[str, LoRAWeight] = field(default_factory=dict)
    motion_model: MotionModel | None = None  # trained in full (mode motion_module)
    predictor: MotionPredictor | None = None  # trained in full (mode semantic_motion_predictor)

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        named = {}
        for group, loras in (("temporal", self.temporal), ("spatial", self.spatial)):
            for key, lora in loras.items():
                named[f"{group}/{key}/up"], named[f"{group}/{key}/down"] = lora.up, lora.down
        if self.motion_model is not None:
            named.update({f"motion/{k}": p for k, p in self.motion_model.named_parameters()})
        if self.predictor is not None:
            named.update({f"predictor/{k}": p for k, p in self.predictor.named_parameters()})
        return named


@dataclass
class TrainResult:
    steps: int
    losses: list[float]
    trainables: Trainables
    run_dir: str
    interrupted: bool = False


@dataclass
class _Progress:
    """Mutable loop position, snapshotted at each step start for interrupt-safe saving."""

    step: int = 0
    order: list[int] = field(default_factory=list)  # replaced (never changed in place) at each epoch
    position: int = 0
    losses: list[float] = field(default_factory=list)  # only appended to
    nonfinite_in_a_row: int = 0

    def snapshot(self) -> "_Progress":
        """The position now, in O(1): the order list is shared, the losses are cut to their length."""
        return _Snapshot(self.step, self.order, self.position, self.losses, self.nonfinite_in_a_row, len(self.losses))


@dataclass
class _Snapshot(_Progress):
    kept_losses: int = 0

    @property
    def saved_losses(self) -> list[float]:
        return self.losses[:self.kept_losses]


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if comfy.model_management.should_use_bf16(device) else torch.float16
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def cache_folder(config: Config, run_dir: str) -> str:
    """``[data] cache_folder``, or ``cache`` beside the run folders (shared by runs: keys name the content)."""
    return config.data.cache_folder or os.path.join(os.path.dirname(run_dir), "cache")


def bitsandbytes_module():
    """The bitsandbytes package when installed (8-bit optimizers), else None."""
    try:
        import bitsandbytes
    except Exception:  # noqa: BLE001  (a broken install raises more than ImportError; treat it as absent)
        return None
    return bitsandbytes


def resolve_optimizer(name: str, device: torch.device) -> str:
    """``adamw`` or ``adamw8bit`` for ``[train] optimizer``; auto: 8-bit on a CUDA device when bitsandbytes
    is installed (its memory saving matters there; on the CPU the moments are cheap and plain AdamW exact)."""
    if name == "auto":
        return "adamw8bit" if device.type == "cuda" and bitsandbytes_module() is not None else "adamw"
    if name == "adamw8bit" and bitsandbytes_module() is None:
        raise TrainingError("[train] optimizer = \"adamw8bit\" needs the bitsandbytes package in ComfyUI's Python "
                            "(pip install bitsandbytes); or set optimizer = \"adamw\"")
    return name


def build_trainables(config: Config, models: BaseModels) -> Trainables:
    """Fresh trainable parameters for ``config.mode``, seeded by ``config.seed``."""
    generator = torch.Generator().manual_seed(config.seed)
    rank = config.train.rank
    trainables = Trainables()
    if config.mode == "motion_module":
        if models.motion is not None:
            trainables.motion_model = copy.deepcopy(models.motion.patcher.model)  # never the caller's weights
        else:
            trainables.motion_model = new_motion_model(config, models.model)
        trainables.motion_model.float().requires_grad_(True).train()
    if config.mode in ("motion_lora", "motion_director"):
        shapes = {k: v.shape for k, v in models.motion.patcher.model.state_dict().items()}
        trainables.temporal = make_loras(shapes, TEMPORAL_TARGET, rank, generator)
    if config.mode in ("domain_adapter", "motion_director"):
        shapes = {k: v.shape for k, v in models.model.model.state_dict().items()}
        trainables.spatial = make_loras(shapes, SPATIAL_TARGET, rank, generator)
        if not trainables.spatial:
            raise TrainingError("the base model has no spatial attention layers to train a LoRA on")
    if config.mode == "semantic_motion_predictor":
        trainables.predictor = new_predictor(config, models)
    return trainables


def new_predictor(config: Config, models: BaseModels) -> MotionPredictor:
    """The predictor to train: a copy of ``[base] motion_predictor``, or a new one of ``[predictor]``'s size
    for this UNet's cross-attention layers and the CLIP vision model's embeddings (seeded by ``config.seed``;
    its output layer is zero, so it starts as the interpolation of eq. 4)."""
    if models.clip_vision is None:
        raise TrainingError("mode semantic_motion_predictor needs a CLIP vision model (the image encoder E)")
    image_dim = embedding_width(models.clip_vision)
    if models.predictor is not None:
        check_image_dim(models.predictor, image_dim, f"[base] motion_predictor {models.predictor.name!r}")
        predictor = copy.deepcopy(models.predictor.patcher.model)  # never the caller's weights
    else:
        layers = tuple(sorted(cross_attention_layers(models.model).items()))
        if not layers:
            raise TrainingError("the base model has no cross-attention layers for the predictor to feed")
        size = config.predictor
        spec = PredictorSpec(image_dim, layers, size.hidden, size.depth, size.heads, size.tokens, size.token_dim)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            predictor = MotionPredictor(spec)
    return predictor.float().requires_grad_(True).train()


def new_motion_model(config: Config, model) -> MotionModel:
    """A new motion model in ``new_motion_version``'s layout, sized for the UNet: PyTorch's default
    initialisation (seeded by ``config.seed``) with ``proj_out`` zeroed, so it starts as an identity, as
    the original trainer starts one. Its layers are ComfyUI's manual-cast ops (weights follow the
    activations' dtype, as in inference), whose own initialisation is skipped: the values come from a
    model built with ``torch.nn`` layers."""
    import comfy.ops

    from ..nodes.injection import unet_of

    unet = unet_of(model)
    channels = tuple(unet.model_channels * m for m in unet.channel_mult)
    version = config.base.new_motion_version
    if version == "auto":
        version = "sdxl_beta" if len(channels) == 3 else "v2"
    spec = MotionSpec.standard(version, channels, layers_per_block=unet.num_res_blocks[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        initialised = MotionModel(spec, zero_init=True)
    motion = MotionModel(spec, zero_init=True, operations=comfy.ops.manual_cast)
    motion.load_state_dict(initialised.state_dict())
    return motion


def patched_models(config: Config, models: BaseModels, trainables: Trainables,
                   predictor_state: TrainingState | None = None):
    """A clone of the base MODEL carrying the trainables (animated unless the mode is domain_adapter)."""
    base = models.model.clone()
    attach(base, trainables.spatial)
    if not config.animated:
        return _maybe_checkpointed(base, config)
    if trainables.motion_model is not None:
        name = models.motion.name if models.motion is not None else f"new {config.base.new_motion_version}"
        motion = wrap_motion_model(trainables.motion_model, name, disable_dynamic=True)  # trained in place
    else:
        motion = LoadedMotionModel(models.motion.name, models.motion.patcher.clone())
    attach(motion.patcher, trainables.temporal)
    schedule = resolve_schedule(config.base.beta_schedule, motion.spec)
    clips = apply_motion(base, motion, schedule=schedule, frames_per_clip=config.data.frames)
    if predictor_state is not None:
        clips = patch_with_state(clips, predictor_state, "semantic_motion_predictor training")
    return _maybe_checkpointed(clips, config)


def _maybe_checkpointed(model, config: Config):
    if config.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    # ComfyUI's per-call attention hook (where it has one; a no-op before it existed)
    model.model_options["transformer_options"]["optimized_attention_override"] = training_attention
    return model


# attention functions that keep per-chunk intermediates (or the full matrix) for backward
_MEMORY_HUNGRY_FOR_BACKWARD = ("attention_sub_quad", "attention_split", "attention_basic")


def training_attention(func, *args, **kwargs):
    """The UNet's attention while training: ComfyUI's CPU default (sub-quadratic chunking) and the
    split/basic fallbacks are memory-lean in inference but, under autograd, keep every chunk's scores
    for backward; PyTorch's fused SDPA (a flash kernel on CPU too) recomputes them instead. Other
    choices (xformers, flash, sage, pytorch) are kept."""
    if getattr(func, "__name__", "") in _MEMORY_HUNGRY_FOR_BACKWARD and torch.is_grad_enabled():
        import comfy.ldm.modules.attention as attention

        return attention.attention_pytorch(*args, **kwargs)
    return func(*args, **kwargs)


def made_in_inference_mode(tensor: torch.Tensor) -> bool:
    """Whether autograd cannot save ``tensor``: an inference-mode tensor, or one made in inference mode
    and then moved by ``Module.to`` outside it (as ComfyUI loads a model onto the GPU). ``Module.to`` sets
    ``param.data`` to the moved tensor, which gives the parameter the moved tensor's flags
    (``is_inference()`` turns False) but not a version counter, and autograd needs that to save it."""
    if tensor.is_inference():
        return True
    try:
        tensor._version
    except RuntimeError:  # "Inference tensors do not track version counter"
        return True
    return False


def make_autograd_ready(module: torch.nn.Module) -> int:
    """Replace the tensors made in inference mode (ComfyUI's executor loads models under
    ``torch.inference_mode``) by equal ordinary ones, which autograd may save for backward; returns how
    many were replaced. Values, dtypes and devices are unchanged, one tensor at a time."""
    replaced = 0
    with torch.inference_mode(False), torch.no_grad():
        for owner in module.modules():
            for name, param in list(owner._parameters.items()):
                if param is not None and made_in_inference_mode(param):
                    owner._parameters[name] = torch.nn.Parameter(param.clone(), requires_grad=param.requires_grad)
                    replaced += 1
            for name, buffer in list(owner._buffers.items()):
                if buffer is not None and made_in_inference_mode(buffer):
                    owner._buffers[name] = buffer.clone()
                    replaced += 1
    return replaced


class Trainer:
    """One training run: ``Trainer(config, models, clips, run_dir).run()``."""

    def __init__(self, config: Config, models: BaseModels, clips: ClipSource, run_dir: str,
                 on_step: Callable[[int, int, float], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, world: World = World()):
        self.config, self.models, self.clips, self.run_dir, self.world = config, models, clips, run_dir, world
        self.on_step, self.should_stop = on_step, should_stop or (lambda: False)
        with torch.inference_mode(False):  # ComfyUI's executor runs nodes in inference mode
            self.trainables = build_trainables(config, models)
        self.predictor_state = None
        if self.trainables.predictor is not None:
            name = models.predictor.name if models.predictor is not None else f"new ({config.name})"
            self.predictor_state = TrainingState(wrap_predictor(self.trainables.predictor, name, disable_dynamic=True))
        self.parameters = self.trainables.named_parameters()
        self.generator = torch.Generator().manual_seed(config.seed + 1)
        self.progress = _Progress()
        self.text_cache: dict[str, list] = {}
        self.tensorboard = None  # a SummaryWriter while running, when enabled and installed
        self.cache = DiskCache(cache_folder(config, run_dir)) if config.data.cache else None
        self._clip_id = None
        self._weight_ids: dict[int, str] = {}

    # -- setup ---------------------------------------------------------------------------------
    def _optimizer(self, device: torch.device):
        train = self.config.train
        groups = []
        temporal = [p for k, p in self.parameters.items() if not k.startswith("spatial/")]
        spatial = [p for k, p in self.parameters.items() if k.startswith("spatial/")]
        if temporal:
            groups.append({"params": temporal, "lr": train.learning_rate})
        if spatial:
            groups.append({"params": spatial, "lr": train.spatial_learning_rate or train.learning_rate})
        self.optimizer_name = resolve_optimizer(train.optimizer, device)
        if self.optimizer_name == "adamw8bit":
            optimizer = bitsandbytes_module().optim.AdamW8bit(groups, weight_decay=train.weight_decay)
        else:
            optimizer = torch.optim.AdamW(groups, weight_decay=train.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(train.lr_schedule, step, train.warmup_steps, train.steps))
        return optimizer, schedule

    def state(self, optimizer, schedule, scaler, snapshot: tuple[_Snapshot, torch.Tensor]) -> dict:
        progress, generator_state = snapshot
        return {
            "format": 1, "config": self.config.to_json(), "base_id": self.models.base_id, "processes": self.world.size,
            "optimizer_name": self.optimizer_name,
            "data_id": self.clips.identity, "step": progress.step, "order": list(progress.order),
            "position": progress.position, "losses": progress.saved_losses, "generator": generator_state,
            "parameters": {k: p.detach().cpu().clone() for k, p in self.parameters.items()},
            "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "scaler": scaler.state_dict(),
        }

    def resume(self, optimizer, schedule, scaler) -> None:
        paths = state_paths(self.run_dir)
        if not paths:
            raise MotionModelError(f"--resume: no saved state (state-*.pt) in {self.run_dir!r}")
        state = load_state(paths[-1])
        check_resumable(state, self.config.to_json(), self.models.base_id, self.clips.identity, self.world.size)
        saved_optimizer = state.get("optimizer_name", "adamw")
        if saved_optimizer != self.optimizer_name:
            raise ResumeError(f"cannot resume: the saved run used the optimizer {saved_optimizer!r}, this one "
                              f"resolves [train] optimizer = {self.config.train.optimizer!r} to "
                              f"{self.optimizer_name!r} (set it to {saved_optimizer!r})")
        with torch.no_grad():
            for key, param in self.parameters.items():
                param.copy_(state["parameters"][key])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        self.progress = _Progress(state["step"], list(state["order"]), state["position"], list(state["losses"]))
        if self.world.is_main:
            self._truncate_log(self.progress.step)
        log.info("resumed %s at step %d", os.path.basename(paths[-1]), self.progress.step)

    def _truncate_log(self, step: int) -> None:
        """Drop log rows of steps after the resumed state (a kill can land between a log row and its state)."""
        path = os.path.join(self.run_dir, "log.csv")
        if not os.path.exists(path):
            return
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
        kept = rows[:1] + [row for row in rows[1:] if row and int(row[0]) <= step]
        if len(kept) != len(rows):
            def write(temp):
                with open(temp, "w", newline="", encoding="utf-8") as handle:
                    csv.writer(handle).writerows(kept)
            atomic_write(path, write)

    # -- data ----------------------------------------------------------------------------------
    def _next_indices(self, count: int) -> list[int]:
        indices = []
        for _ in range(count):
            if self.progress.position >= len(self.progress.order):
                self.progress.order = self._epoch_order(count)
                self.progress.position = 0
            indices.append(self.progress.order[self.progress.position])
            self.progress.position += 1
        return indices

    def _epoch_order(self, chunk: int) -> list[int]:
        """A shuffled pass over the clips. With aspect buckets, consecutive runs of ``chunk`` (one global
        micro-batch) share a bucket: clips join their bucket's run in shuffled order, a full run is
        emitted, and the last incomplete run of each bucket waits for the next epoch's shuffle."""
        order = torch.randperm(self.clips.count, generator=self.generator).tolist()
        if not self.config.data.buckets or chunk == 1:
            return order
        pending: dict[tuple[int, int], list[int]] = {}
        grouped = []
        for index in order:
            run = pending.setdefault(self.clips.size(index), [])
            run.append(index)
            if len(run) == chunk:
                grouped += run
                run.clear()
        return grouped

    def check_buckets(self) -> None:
        """With buckets, a global micro-batch comes from one bucket: some bucket must hold enough clips."""
        chunk = self.config.train.batch_size * self.world.size
        if not self.config.data.buckets or chunk == 1:
            return
        counts = bucket_counts(self.clips)
        if max(counts.values()) < chunk:
            sizes = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(counts.items()))
            raise TrainingError(f"[data] buckets: a step's {chunk} clips (batch_size x processes) come from one "
                                f"aspect bucket, and no bucket has {chunk} clips ({sizes}); lower [train] "
                                "batch_size (use gradient_accumulation instead) or turn buckets off")

    def _conditioning(self, caption: str) -> list:
        if caption not in self.text_cache:
            key = cached = None
            if self.cache is not None:
                clip = self.models.clip
                if self._clip_id is None:
                    self._clip_id = weights_hash(clip.cond_stage_model, clip.patcher.patches)
                key = key_of("text", caption, self._clip_id, getattr(clip, "layer_idx", None),
                             getattr(clip, "tokenizer_options", None))
                cached = self.cache.get("text", key)
            if cached is None:
                tokens = self.models.clip.tokenize(caption)
                cond, pooled = self.models.clip.encode_from_tokens(tokens, return_pooled=True)
                cached = {"cond": cond.float()} | ({} if pooled is None else {"pooled": pooled.float()})
                if key is not None:
                    self.cache.put("text", key, cached)
            self.text_cache[caption] = [cached["cond"], cached.get("pooled")]
        return self.text_cache[caption]

    def _cached(self, folder: str, name: str, key_parts, compute) -> torch.Tensor:
        """``compute()``, kept in the disk cache (with ``[data] cache``) under the key of ``key_parts()``."""
        if self.cache is None:
            return compute()
        key = key_of(*key_parts())
        cached = self.cache.get(folder, key)
        if cached is not None:
            return cached[name]
        value = compute()
        self.cache.put(folder, key, {name: value})
        return value

    def _weights_id(self, module: torch.nn.Module) -> str:
        """``weights_hash`` of a frozen model, computed once per run."""
        if id(module) not in self._weight_ids:
            self._weight_ids[id(module)] = weights_hash(module)
        return self._weight_ids[id(module)]

    def _latent(self, index: int, draw, pixels) -> torch.Tensor:
        """The VAE latent of clip ``index`` as drawn (before the model's ``process_latent_in``); ``pixels()``
        gives its frames."""
        vae = self.models.vae.first_stage_model

        def encode():
            with torch.no_grad():
                return self.models.vae.encode(pixels()).float()
        return self._cached("latents", "latent", lambda: ("latent", self.clips.content_hash(index), draw.indices,
                                                          draw.flip, draw.size, self._weights_id(vae)), encode)

    def _embeddings(self, index: int, draw, pixels) -> torch.Tensor:
        """E(frame) of clip ``index`` as drawn, by the CLIP vision model: (frames, image_dim) when ``[predictor]
        embedding_loss`` needs every frame, else (2, image_dim) of the first and last frame; ``pixels()`` gives
        its frames."""
        every = self.config.predictor.embedding_loss > 0
        vision = self.models.clip_vision

        def encode():
            frames = pixels()
            with torch.no_grad():
                return vision.encode_image(frames if every else frames[[0, -1]]).image_embeds.float().cpu()
        return self._cached("embeddings", "embeddings", lambda: (
            "embeddings", self.clips.content_hash(index), draw.indices, draw.flip, draw.size, every,
            self._weights_id(vision.model)), encode)

    def _pixels(self, index: int, draw):
        """A loader of clip ``index``'s frames as drawn that decodes them at most once (latent and embeddings)."""
        return functools.cache(lambda: self.clips.load(index, draw))

    def _batch(self, device) -> _Batch:
        """One micro-batch of this process. Every random draw of a clip (which clip, its frames and
        flip, caption dropout, timestep, noise, anchor and single frame, MotionDirector's spatial LoRA
        dropout) is made clip by clip for the whole global batch, so ``batch_size`` 2 draws exactly what
        two micro-batches of 1 draw, every process draws the same numbers, and the generator state at a
        step start fixes the rest."""
        data, frames, per_process = self.config.data, self.config.data.frames, self.config.train.batch_size
        sigmas = self.model.get_model_object("model_sampling").sigmas.float().cpu()
        ratio = getattr(self.models.vae, "downscale_ratio", 8)
        ratio = ratio if isinstance(ratio, int) else 8
        mine = []
        indices = self._next_indices(per_process * self.world.size)
        size = None  # one size per global micro-batch (see _epoch_order)
        for number, index in enumerate(indices):
            draw = self.clips.draw(index, self.generator)
            if size is None:
                size = draw.size
                shape = (frames, self.model.model.latent_format.latent_channels, size[1] // ratio, size[0] // ratio)
            elif draw.size != size:
                raise TrainingError(f"clips of sizes {size} and {draw.size} were drawn into one micro-batch")
            dropped = float(torch.rand((), generator=self.generator)) < data.caption_dropout
            sigma = sigmas[int(torch.randint(0, sigmas.shape[0], (), generator=self.generator))]
            noise = torch.randn(shape, generator=self.generator)
            anchor, single = torch.randint(0, frames, (2,), generator=self.generator).tolist()
            alone = (self.config.mode == "motion_director"
                     and float(torch.rand((), generator=self.generator)) < self.config.train.spatial_lora_dropout)
            if number // per_process == self.world.rank:
                mine.append((index, draw, "" if dropped else self.clips.caption(index), sigma, noise, anchor, single,
                             alone))
        loaders = [self._pixels(index, draw) for index, draw, *_ in mine]
        latents = []
        for (index, draw, *_), pixels in zip(mine, loaders):
            with torch.no_grad():
                latent = self.model.model.process_latent_in(self._latent(index, draw, pixels))
            if tuple(latent.shape) != shape:
                raise TrainingError(f"the VAE gave latents of shape {tuple(latent.shape)}, expected {shape}")
            latents.append(latent)
        texts = [self._conditioning(caption) for _, _, caption, *_ in mine]
        pooled = [pool.expand(frames, -1) for _, pool in texts if pool is not None]
        embeddings = None
        if self.predictor_state is not None:
            embeddings = torch.stack([self._embeddings(index, draw, pixels)
                                      for (index, draw, *_), pixels in zip(mine, loaders)])
        return _Batch(
            x0=torch.cat(latents).to(device),
            conditioning=[[_equal_tokens([cond.expand(frames, -1, -1) for cond, _ in texts]),
                           {"pooled_output": torch.cat(pooled)} if pooled else {}]],
            sigma=torch.stack([m[3] for m in mine]).repeat_interleave(frames).to(device),
            noise=torch.cat([m[4] for m in mine]).to(device),
            anchors=torch.tensor([m[5] for m in mine]), single=torch.tensor([m[6] for m in mine]),
            alone=torch.tensor([m[7] for m in mine]),
            embeddings=embeddings)

    # -- the loop ------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> TrainResult:
        """Train (from the last saved state with ``resume``); returns when done or asked to stop."""
        self.check_buckets()
        if self.world.is_main:
            check_writable(self.run_dir, 3 * sum(p.numel() * 4 for p in self.parameters.values()) + 2 ** 20)
        if self.cache is not None:
            check_writable(self.cache.folder, 2 ** 20)
        self.log_path = os.path.join(self.run_dir, "log.csv")
        try:
            with torch.inference_mode(False):  # ComfyUI's executor runs nodes under inference mode
                interrupted = self._run(resume)
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
                self.tensorboard = None
            if self.cache is not None:
                log.info("latent and text cache %s: %d hits, %d misses", self.cache.folder, self.cache.hits,
                         self.cache.misses)
        return TrainResult(self.progress.step, list(self.progress.losses), self.trainables, self.run_dir,
                           interrupted)

    def _run(self, resume: bool) -> bool:
        config = self.config
        self.model = patched_models(config, self.models, self.trainables, self.predictor_state)
        device = torch.device(self.model.load_device)
        optimizer, schedule = self._optimizer(device)
        dtype = resolve_precision(config.train.precision, device)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        if resume:
            self.resume(optimizer, schedule, scaler)
        self.tensorboard = self._open_tensorboard()
        comfy.model_management.load_models_gpu([self.model], memory_required=1e20, force_full_load=True)
        replaced = sum(make_autograd_ready(m) for m in self._modules())
        log.debug("made %d inference tensors usable by autograd", replaced)
        unfrozen = self._freeze_base()
        try:
            return self._train(optimizer, schedule, scaler, dtype)
        finally:
            for param in unfrozen:
                param.requires_grad_(True)
            # the trained modules are returned and saved; their patchers go with this run
            forget_loaded(m for m in (self.trainables.motion_model, self.trainables.predictor) if m is not None)

    def _freeze_base(self) -> list[torch.nn.Parameter]:
        """Make every weight but the trained ones not require grad; returns those that did, to restore.
        A checkpoint loaded by ComfyUI keeps PyTorch's default requires_grad=True on its SD1.5/SDXL UNet
        (it never needs grads in inference); left on, every backward would compute and keep a gradient
        for every frozen UNet weight."""
        trained = {id(p) for p in self.parameters.values()}
        unfrozen = [p for module in self._modules() for p in module.parameters()
                    if p.requires_grad and id(p) not in trained]
        for param in unfrozen:
            param.requires_grad_(False)
        return unfrozen

    def _train(self, optimizer, schedule, scaler, dtype) -> bool:
        config = self.config
        loop = LoopSampler(self, optimizer, schedule, scaler, dtype)
        guider = comfy.samplers.CFGGuider(self.model)
        guider.set_cfg(1.0)
        cond, pooled = self._conditioning("")
        guider.inner_set_conds({"positive": [[cond, {} if pooled is None else {"pooled_output": pooled}]]})
        shape = (config.train.batch_size * config.data.frames, self.model.model.latent_format.latent_channels,
                 config.data.height // 8, config.data.width // 8)
        try:  # the sampling path sizes memory and checks inputs for this batch shape
            guider.sample(torch.zeros(shape), torch.zeros(shape), loop, torch.tensor([1.0, 0.0]),
                          disable_pbar=True, seed=config.seed)
        except Stopped:
            return True
        return False

    def _open_tensorboard(self):
        """A SummaryWriter on ``<run folder>/tensorboard`` when ``[output] tensorboard`` is on and the
        tensorboard package is installed; after a resume it purges events of the steps being redone."""
        if not (self.config.output.tensorboard and self.world.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.debug("tensorboard is not installed; logging to log.csv only")
            return None
        return SummaryWriter(os.path.join(self.run_dir, "tensorboard"), purge_step=self.progress.step + 1)

    def _modules(self):
        yield self.model.model
        motion = self.trainables.motion_model
        if motion is None and self.models.motion is not None:
            motion = self.models.motion.patcher.model
        if motion is not None:
            yield motion
        if self.trainables.predictor is not None:
            yield self.trainables.predictor

    def backward(self, guider, model_options, seed, device, dtype, scaler, divisor: int) -> list[torch.Tensor]:
        """Losses and backward of one micro-batch; returns each path's loss (its terms add up to the
        micro-batch's loss), still on the device: the loop reads them once per step with the gradient
        norm, since a read waits for the work queued on a GPU. A non-finite loss gives non-finite
        gradients, which the step then skips. Each path's backward runs while its LoRAs are frozen or
        left out as the path needs, so a gradient-checkpoint recompute sees the same weights as the
        forward did."""
        config = self.config
        batch = self._batch(device)
        x0, conditioning, sigma, noise = batch.x0, batch.conditioning, batch.sigma, batch.noise

        def path(options, rows, frozen, loss_of, disabled=()) -> list[torch.Tensor]:
            for lora in frozen:
                lora.frozen = True
            for lora in disabled:
                lora.enabled = False
            try:
                cond = [[conditioning[0][0][rows], {k: v[rows] for k, v in conditioning[0][1].items()}]]
                err = self._error(guider, options, seed, x0[rows], sigma[rows], noise[rows], cond, dtype)
                loss = loss_of(err)
                scaler.scale(loss / divisor).backward()
                return [loss.detach()]
            finally:
                for lora in frozen:
                    lora.frozen = False
                for lora in disabled:
                    lora.enabled = True

        every = torch.arange(x0.shape[0])
        if self.predictor_state is not None:
            return self._predictor_backward(batch, lambda loss_of: path(model_options, every, (), loss_of))
        if config.mode != "motion_director":
            return path(model_options, every, (), lambda err: err.pow(2).mean())
        return self._director_backward(batch, path, model_options)

    def _director_backward(self, batch: "_Batch", path, model_options: dict) -> list[torch.Tensor]:
        """MotionDirector, as its train.py: the temporal path trains the temporal LoRA on whole clips with
        the MSE plus the appearance-debiased MSE, the spatial LoRA applied but not trained, or left out
        for the clips drawn ``alone`` (``spatial_lora_dropout``, so the MotionLoRA also works without it);
        the spatial path trains the spatial LoRA on one frame of each other clip, without the temporal
        LoRA. Each group's loss is weighted by its share of the clips, so the total is the mean over
        clips whatever the grouping (a batch of 2 = two micro-batches of 1)."""
        frames, beta = self.config.data.frames, self.config.train.debias_beta
        clips = batch.anchors.shape[0]
        spatial, temporal = self.trainables.spatial.values(), self.trainables.temporal.values()
        paired, alone = torch.nonzero(~batch.alone).flatten(), torch.nonzero(batch.alone).flatten()

        def rows(group):
            return (group[:, None] * frames + torch.arange(frames)).flatten()

        def share(group) -> float:
            return group.shape[0] / clips

        def temporal_loss(group):
            return lambda err: share(group) * (err.pow(2).mean() + debiased_mse(err, frames, batch.anchors[group], beta))

        losses = []
        for group, frozen, disabled in ((paired, spatial, ()), (alone, (), spatial)):
            if group.shape[0]:
                losses += path(model_options, rows(group), frozen, temporal_loss(group), disabled)
        if not paired.shape[0]:
            return losses
        single = paired * frames + batch.single[paired]
        return losses + path(_single_frame_options(model_options), single, (),
                             lambda err: share(paired) * err.pow(2).mean(), temporal)

    def _predictor_backward(self, batch: "_Batch", path) -> list[torch.Tensor]:
        """semantic_motion_predictor: each clip's first and last frame embeddings give its P (with gradients),
        which the patched cross-attention reads; the loss is the diffusion MSE (the paper's) plus, with
        ``[predictor] embedding_loss``, that weight times MSE(P_i, E(frame i))."""
        state, weight = self.predictor_state, self.config.predictor.embedding_loss
        embeddings = batch.embeddings.to(batch.x0.device)
        try:
            prediction = state.set_pairs(embeddings[:, 0], embeddings[:, -1], self.config.data.frames)
            if weight == 0:
                return path(lambda err: err.pow(2).mean())
            return path(lambda err: err.pow(2).mean() + weight * (prediction.float() - embeddings).pow(2).mean())
        finally:
            state.clear()

    @contextlib.contextmanager
    def validation_predictor(self):
        """While sampling a validation animation: the predictor gets the first clip's first and last frames
        (drawn by the validation seed, not the training generator)."""
        if self.predictor_state is None:
            yield
            return
        draw = self.clips.draw(0, torch.Generator().manual_seed(self.config.validation.seed))
        embeddings = self._embeddings(0, draw, self._pixels(0, draw))
        try:
            with torch.no_grad():
                self.predictor_state.set_pairs(embeddings[None, 0], embeddings[None, -1], self.config.data.frames)
            yield
        finally:
            self.predictor_state.clear()

    def _error(self, guider, model_options, seed, x0, sigma, noise, conditioning, dtype) -> torch.Tensor:
        """target - prediction of the model's raw output (epsilon or v), per element."""
        sampling = self.model.get_model_object("model_sampling")
        xt = sampling.noise_scaling(sigma, noise, x0)
        conds = {"positive": comfy.sampler_helpers.convert_cond(conditioning)}
        guider.conds = comfy.samplers.process_conds(guider.inner_model, xt, conds, xt.device, None, None, seed)
        autocast = torch.autocast(xt.device.type, dtype=dtype, enabled=dtype != torch.float32)
        with autocast:
            denoised = guider(xt, sigma, model_options=model_options, seed=seed)
        c_out = -sampling.calculate_denoised(sigma, torch.ones_like(x0[:, :1]), torch.zeros_like(x0[:, :1]))
        return (denoised.float() - x0) / c_out.float()

    def write_log(self, step: int, loss: float, grad_norm: float, lr: float, seconds: float) -> None:
        """One row of log.csv (grad_norm: of the accumulated gradients, before clipping)."""
        new = not os.path.exists(self.log_path) or step == 1
        with open(self.log_path, "w" if new else "a", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["step", "loss", "grad_norm", "learning_rate", "seconds"])
            writer.writerow([step, f"{loss:.8g}", f"{grad_norm:.8g}", f"{lr:.6g}", f"{seconds:.3f}"])
        if self.tensorboard is not None:
            for key, value in (("loss", loss), ("grad_norm", grad_norm), ("learning_rate", lr)):
                self.tensorboard.add_scalar(f"train/{key}", value, step)
            self.tensorboard.flush()


@dataclass
class _Batch:
    x0: torch.Tensor  # (clips frames) c h w, in the model's latent space
    conditioning: list  # one entry, a row per frame
    sigma: torch.Tensor  # per row, shared by a clip's frames
    noise: torch.Tensor
    anchors: torch.Tensor  # per clip: MotionDirector's anchor frame
    single: torch.Tensor  # per clip: the spatial path's frame
    alone: torch.Tensor  # per clip: MotionDirector trains its temporal LoRA without the spatial LoRA
    embeddings: torch.Tensor | None = None  # semantic_motion_predictor: per clip, E of its frames (or first, last)


def _single_frame_options(model_options: dict) -> dict:
    options = comfy.model_patcher.create_model_options_clone(model_options)
    transformer_options = options.setdefault("transformer_options", {})
    transformer_options[KEY] = dataclasses.replace(transformer_options[KEY], frames_per_clip=1)
    return options


def _equal_tokens(conds: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-clip text embeddings whose token counts differ (long captions: 77 x k) by
    repeating each to the least common multiple, as ComfyUI batches cross-attention conds."""
    length = math.lcm(*(c.shape[1] for c in conds))
    return torch.cat([c.repeat(1, length // c.shape[1], 1) for c in conds])

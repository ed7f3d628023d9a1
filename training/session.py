"""One training run from start to files: models, data, plan, the loop, outputs (command line and nodes)."""

from __future__ import annotations

import logging
import os
import signal

import torch

import comfy.clip_vision
import comfy.sd
import folder_paths

from ..motion_modules import MotionModelError
from ..nodes.folders import MOTION_MODELS, MOTION_PREDICTORS, full_path
from ..nodes.injection import load_motion_patcher
from ..nodes.motion_predictor_patch import load_predictor_patcher
from .checkpoints import state_paths
from .config import Config
from .data import ClipSource, FileClips, bucket_counts
from .export import check_destinations, model_identity, save_outputs
from .trainer import BaseModels, Trainables, Trainer, TrainResult, resolve_optimizer

log = logging.getLogger(__name__)
TRAINING_FOLDER = "animatediff_training"


def run_dir(config: Config) -> str:
    """``output/animatediff_training/<name>``: the run's resumable states and log."""
    return os.path.join(folder_paths.get_output_directory(), TRAINING_FOLDER, config.name)


def load_base(config: Config) -> BaseModels:
    """The MODEL, CLIP, VAE (and motion model, CLIP vision, predictor) named by ``[base]``, loaded the way
    ComfyUI loads them."""
    base = config.base
    predicting = config.mode == "semantic_motion_predictor"
    if base.demo_seed >= 0:
        from ..nodes import demo

        needs_motion = config.mode in ("motion_lora", "motion_director", "semantic_motion_predictor")
        version = "v2" if base.new_motion_version == "auto" else base.new_motion_version
        motion = demo.tiny_motion_patcher(base.demo_seed, version) if needs_motion else None
        return BaseModels(demo.tiny_model(base.demo_seed), demo.tiny_clip(base.demo_seed),
                          demo.tiny_vae(base.demo_seed), motion, f"tiny demo models (seed {base.demo_seed})",
                          clip_vision=demo.tiny_clip_vision(base.demo_seed) if predicting else None,
                          predictor=_predictor(base))
    path = folder_paths.get_full_path("checkpoints", base.checkpoint)
    if path is None:
        raise MotionModelError(f"[base] checkpoint {base.checkpoint!r} is not in models/checkpoints (or the "
                               "folders extra_model_paths.yaml adds)")
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        path, output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings"))
    if clip is None or vae is None:
        raise MotionModelError(f"[base] checkpoint {base.checkpoint!r} has no text encoder or VAE; training "
                               "needs a full checkpoint")
    motion = vision = None
    if base.motion_model:
        motion = load_motion_patcher(full_path(MOTION_MODELS, base.motion_model), base.motion_model)
    if base.clip_vision:
        vision = comfy.clip_vision.load(full_path("clip_vision", base.clip_vision))
        if vision is None:
            raise MotionModelError(f"[base] clip_vision {base.clip_vision!r}: ComfyUI does not recognise it as a "
                                   "CLIP vision model")
    return BaseModels(model, clip, vae, motion, f"{base.checkpoint} ({os.path.getsize(path)} bytes)",
                      clip_vision=vision, predictor=_predictor(base))


def _predictor(base):
    """``[base] motion_predictor``, loaded (a predictor to continue training), or None."""
    if not base.motion_predictor:
        return None
    return load_predictor_patcher(full_path(MOTION_PREDICTORS, base.motion_predictor), base.motion_predictor)


def plan(config: Config, models: BaseModels, clips: ClipSource, trainables: Trainables) -> str:
    """What a run will do, with its memory estimate (the dry run prints it)."""
    trained = sum(p.numel() for p in trainables.named_parameters().values())
    frozen = sum(p.numel() * p.element_size() for p in models.model.model.diffusion_model.parameters())
    if models.motion is not None:
        frozen += sum(p.numel() * p.element_size() for p in models.motion.patcher.model.parameters())
    if models.clip_vision is not None:
        frozen += sum(p.numel() * p.element_size() for p in models.clip_vision.model.parameters())
    rows = config.train.batch_size * config.data.frames
    shape = (rows, models.model.model.latent_format.latent_channels, config.data.height // 8, config.data.width // 8)
    per_call = models.model.model.memory_required(list(shape))
    skipped = getattr(getattr(clips, "report", None), "skipped", [])
    # fp32 weight and gradient (8 bytes) + AdamW's two moments: fp32 (8 bytes) or 8-bit (2 bytes; bitsandbytes
    # keeps tensors under 4096 values, a small share, in fp32, and a scale per block)
    optimizer = resolve_optimizer(config.train.optimizer, torch.device(models.model.load_device))
    moments, per_param = ("8-bit AdamW", 10) if optimizer == "adamw8bit" else ("AdamW", 16)
    lines = [
        f"mode {config.mode}: {trained:,} trained parameters; base {models.base_id}"
        + (f"; motion model {models.motion.name}" if models.motion is not None else "")
        + (f"; {trainables.predictor.spec.describe()}" if trainables.predictor is not None else ""),
        f"data: {clips.identity}" + (f"; {len(skipped)} skipped:" if skipped else ""),
        *[f"  skipped {path}: {reason}" for path, reason in skipped],
        f"steps {config.train.steps} x {config.train.gradient_accumulation} micro-batches of "
        f"{config.train.batch_size} clips x {config.data.frames} frames at {config.data.width}x{config.data.height}",
        f"memory estimate: frozen weights {_size(frozen)} + trained weights, gradients and {moments} "
        f"moments {_size(trained * per_param)} + activations: ComfyUI's per-call estimate "
        f"{_size(per_call)} for {rows} latents"
        + (" (gradient checkpointing keeps about one layer's activations more)"
           if config.train.gradient_checkpointing else " (without gradient checkpointing every layer's "
           "activations are kept: several times more)"),
        f"run folder {run_dir(config)}",
    ]
    if config.data.buckets:
        counts = bucket_counts(clips)
        lines.insert(2, "aspect buckets: " + ", ".join(f"{w}x{h}: {n} clips" for (w, h), n in sorted(counts.items())))
    if config.validation.every:
        lines.append(f"validation animation every {config.validation.every} steps: {run_dir(config)}/validation")
    return "\n".join(lines)


def _size(count: float) -> str:
    """Bytes as GiB, or MiB under 1 GiB (tiny runs)."""
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def run_command_line(config: Config, resume: bool, dry_run: bool) -> int:
    """The command line's run; under torchrun every process runs this and process 0 writes."""
    from .cli import EXIT_STOPPED, StopRequest
    from .distributed import world_from_environment

    world = world_from_environment()
    models = load_base(config)
    clips = FileClips(config.data)
    folder = run_dir(config)
    trainer = Trainer(config, models, clips, folder, world=world)  # builds the trainables once
    if world.is_main:
        print(plan(config, models, clips, trainer.trainables))
    if dry_run:
        return 0
    if not resume and state_paths(folder):
        raise MotionModelError(f"run {config.name!r} already has saved states in {folder}; pass --resume to "
                               "continue it, or choose another name")
    if world.is_main:
        check_destinations(config)
    stop = StopRequest()
    previous = stop.install()
    bar = _ProgressBar(config) if world.is_main else None
    trainer.on_step, trainer.should_stop = bar, stop
    try:
        result = trainer.run(resume=resume)
    except KeyboardInterrupt:
        print("interrupted; the state of the last finished step is saved: run again with --resume")
        return EXIT_STOPPED
    finally:
        if bar is not None:
            bar.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if result.interrupted:
        if world.is_main:
            print(f"stopped at step {result.steps} of {config.train.steps}; state saved in {folder}: run again "
                  "with --resume")
        return EXIT_STOPPED if stop.signal is None else 128 + stop.signal
    if world.is_main:
        for kind, path in finish(config, result, models).items():
            print(f"{kind}: {path}")
    world.barrier()
    return 0


def run_in_graph(config: Config, models: BaseModels, clips: ClipSource, resume: bool,
                 on_step=None) -> tuple[TrainResult, dict[str, str]]:
    """A run inside a ComfyUI graph: continue the saved run of this name (``resume``) or start over.
    An interrupt saves the state and propagates (ComfyUI shows the prompt as interrupted)."""
    folder = run_dir(config)
    check_destinations(config)
    saved = state_paths(folder)
    if saved and not resume:
        for path in saved:
            os.remove(path)
        log.info("starting run %r over: removed %d saved states", config.name, len(saved))
    result = Trainer(config, models, clips, folder, on_step=on_step).run(resume=bool(saved) and resume)
    return result, finish(config, result, models)


def finish(config: Config, result: TrainResult, models: BaseModels) -> dict[str, str]:
    return save_outputs(config, result, models.model)


class _ProgressBar:
    """tqdm with the loss (it/s is tqdm's own)."""

    def __init__(self, config: Config):
        from tqdm import tqdm

        self.bar = tqdm(total=config.train.steps, desc=f"training {config.name}", unit="step")

    def __call__(self, step: int, total: int, loss: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self):
        self.bar.close()


def graph_models(model, clip, vae, motion, clip_vision=None) -> BaseModels:
    """BaseModels from node inputs (the MODEL's identity is a fingerprint of its weights)."""
    return BaseModels(model, clip, vae, motion, model_identity(model), clip_vision=clip_vision)


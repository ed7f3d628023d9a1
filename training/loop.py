"""The training loop as a ComfyUI Sampler: ``CFGGuider.sample`` prepares models, conds, wrappers and
memory exactly as for sampling, then calls ``LoopSampler.sample``, which runs the optimizer steps."""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import torch

import comfy.model_management
import comfy.samplers
import comfy.utils

from ..motion_modules import MotionModelError
from .checkpoints import save_state
from .validation import sample_animation, save_webp, validation_path

if TYPE_CHECKING:
    from .trainer import Trainer

log = logging.getLogger(__name__)


class TrainingError(MotionModelError):
    """Training cannot go on (non-finite losses, a model that does not fit the mode)."""


class Stopped(Exception):
    """Raised inside the loop when the run is asked to stop (SIGTERM, Ctrl-C handled by the caller)."""


class LoopSampler(comfy.samplers.Sampler):
    """A Sampler whose ``sample`` is the training loop: the guider has prepared the models, conds,
    wrappers and memory exactly as for sampling; each step calls the guider as the sampler would."""

    def __init__(self, trainer: "Trainer", optimizer, schedule, scaler, dtype):
        self.trainer, self.optimizer, self.schedule, self.scaler, self.dtype = trainer, optimizer, schedule, scaler, dtype
        self.params = [p for group in optimizer.param_groups for p in group["params"]]

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        trainer, config, world = self.trainer, self.trainer.config, self.trainer.world
        model_options, seed = extra_args["model_options"], extra_args.get("seed")
        progress = trainer.progress
        accumulation = config.train.gradient_accumulation
        pbar = comfy.utils.ProgressBar(config.train.steps)
        pbar.update_absolute(progress.step, config.train.steps)
        last_saved = progress.step
        start = time.perf_counter()
        while progress.step < config.train.steps:
            snapshot = (progress.snapshot(), trainer.generator.get_state())
            try:
                if world.any(trainer.should_stop()):
                    raise Stopped()
                comfy.model_management.throw_exception_if_processing_interrupted()
                losses = [trainer.backward(model_wrap, model_options, seed, noise.device, self.dtype, self.scaler,
                                           accumulation) for _ in range(accumulation)]
                total, norm = self._step(losses)
                finite = not math.isnan(norm)
            except (Stopped, KeyboardInterrupt, comfy.model_management.InterruptProcessingException):
                self._save(snapshot)
                raise
            self.optimizer.zero_grad(set_to_none=True)
            if not finite:
                progress.nonfinite_in_a_row += 1
                log.warning("step %d: non-finite loss or gradients, step skipped (%d in a row)",
                            progress.step + 1, progress.nonfinite_in_a_row)
                if progress.nonfinite_in_a_row >= config.train.max_nonfinite_steps:
                    raise TrainingError(
                        f"{progress.nonfinite_in_a_row} steps in a row had a non-finite loss (last good state: "
                        f"step {last_saved}); lower [train] learning_rate ({config.train.learning_rate}) or use "
                        "fp32/bf16. Nothing non-finite was saved")
                continue
            progress.nonfinite_in_a_row = 0
            progress.step += 1
            progress.losses.append(total)
            lr = self.optimizer.param_groups[0]["lr"]
            self.schedule.step()
            if world.is_main and (progress.step % config.output.log_every == 0 or progress.step == config.train.steps):
                trainer.write_log(progress.step, total, norm, lr, time.perf_counter() - start)
            pbar.update_absolute(progress.step, config.train.steps)
            if trainer.on_step is not None and world.is_main:
                trainer.on_step(progress.step, config.train.steps, total)
            if progress.step % config.output.save_every == 0 or progress.step == config.train.steps:
                self._save((progress.snapshot(), trainer.generator.get_state()))
                last_saved = progress.step
            every = config.validation.every
            if world.is_main and every and (progress.step % every == 0 or progress.step == config.train.steps):
                try:
                    self._validate(model_wrap, model_options, noise.device)
                except (KeyboardInterrupt, comfy.model_management.InterruptProcessingException):
                    if last_saved != progress.step:
                        self._save((progress.snapshot(), trainer.generator.get_state()))
                    raise
        return torch.zeros_like(latent_image)

    def _validate(self, guider, model_options, device) -> None:
        trainer, step = self.trainer, self.trainer.progress.step
        with trainer.validation_predictor():
            images = sample_animation(trainer, guider, model_options, device, self.dtype)
        path = save_webp(images, validation_path(trainer.run_dir, step))
        log.info("step %d: validation animation %s", step, path)
        if trainer.tensorboard is not None:
            trainer.tensorboard.add_images("validation", images, step, dataformats="NHWC")
            trainer.tensorboard.flush()

    def _step(self, losses: list[list[torch.Tensor]]) -> tuple[float, float]:
        """Average over the processes, clip, check and apply the accumulated gradients of one step.
        ``losses``: per micro-batch, its paths' losses. Returns the step's loss (the mean over micro-batches
        and processes) and the gradients' norm before clipping; NaN norm: the loss or the gradients were not
        finite and nothing was applied. The losses and the norm are read from the device once, together:
        on a GPU each read waits for all queued work, so nothing is read between forward and backward."""
        world = self.trainer.world
        world.average_gradients(self.params)  # also when not finite: the processes' collectives stay in step
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.trainer.config.train.max_grad_norm or float("inf"))
        flat = [loss for micro_batch in losses for loss in micro_batch]
        device = flat[0].device
        values = torch.stack([v.to(device, torch.float64) for v in (norm, *flat)]).tolist()  # float32: exact
        norm, values = values[0], iter(values[1:])
        total = 0.0
        for micro_batch in losses:
            loss = 0.0
            for _ in micro_batch:
                loss += next(values)
            total += loss / len(losses)
        total = world.mean(total)
        if not (math.isfinite(total) and math.isfinite(norm)):
            self.scaler.update()
            return total, math.nan
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return total, norm

    def _save(self, snapshot) -> None:
        trainer = self.trainer
        progress = snapshot[0]
        if not all(bool(torch.isfinite(p).all()) for p in trainer.parameters.values()):
            raise TrainingError(f"the trained weights became non-finite before step {progress.step + 1}; not "
                                "saving them. Lower [train] learning_rate or use fp32/bf16")
        if not trainer.world.is_main:
            return
        state = trainer.state(self.optimizer, self.schedule, self.scaler, snapshot)
        path = save_state(trainer.run_dir, progress.step, state, trainer.config.output.keep_last)
        log.info("saved %s (step %d)", path, progress.step)

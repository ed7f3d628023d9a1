"""Loss and learning-rate maths of the trainer (plain PyTorch)."""

from __future__ import annotations

import math

import torch
from einops import rearrange


def debiased_mse(err: torch.Tensor, frames: int, anchors: torch.Tensor, beta: float) -> torch.Tensor:
    """MotionDirector's appearance-debiased temporal loss (Zhao et al. 2023, eq. 5).

    ``phi(e)_i = sqrt(beta^2 + 1) * e_i - beta * e_anchor``, applied to the prediction and to the
    target; as phi is linear, ``mse(phi(pred), phi(target)) = mean(phi(pred - target)^2)``, which is
    what this computes from ``err = target - pred`` ((clips frames) c h w) and one anchor frame
    index per clip. With beta = 0 it is the plain MSE.
    """
    per_clip = rearrange(err, "(b f) c h w -> b f c h w", f=frames)
    anchor = per_clip[torch.arange(per_clip.shape[0]), anchors.to(per_clip.device)].unsqueeze(1)
    return (math.sqrt(beta * beta + 1) * per_clip - beta * anchor).pow(2).mean()


def lr_factor(schedule: str, step: int, warmup: int, total: int) -> float:
    """Multiplier of the learning rate at optimizer step ``step`` (0-based): linear warmup over
    ``warmup`` steps, then constant, linear decay to 0, or cosine decay to 0 at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_schedule {schedule!r}; expected one of ['constant', 'cosine', 'linear']")

"""The loss curve as an IMAGE (what the training nodes return beside the trained weights)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw


def smoothed(losses: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` steps (the raw loss jumps with the random noise level)."""
    out, total = [], 0.0
    for i, value in enumerate(losses):
        total += value
        if i >= window:
            total -= losses[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_curve_image(losses: list[float], width: int = 512, height: int = 256) -> torch.Tensor:
    """(1, height, width, 3) in 0..1: raw loss per step (grey) and its moving average (blue)."""
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 48, width - 8, 8, height - 20
    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    finite = [v for v in losses if np.isfinite(v)]
    if finite:
        low, high = min(finite), max(finite)
        span = (high - low) or 1.0

        def point(i, v):
            x = left + (right - left) * (i / max(1, len(losses) - 1))
            return x, bottom - (bottom - top) * (v - low) / span

        for series, color in ((losses, (170, 170, 170)), (smoothed(losses, max(1, len(losses) // 20)), (30, 90, 220))):
            points = [point(i, v) for i, v in enumerate(series) if np.isfinite(v)]
            if len(points) > 1:
                draw.line(points, fill=color, width=2)
        draw.text((4, top), f"{high:.3g}", fill=(0, 0, 0))
        draw.text((4, bottom - 10), f"{low:.3g}", fill=(0, 0, 0))
    draw.text((left, bottom + 4), f"loss over {len(losses)} steps", fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).unsqueeze(0)

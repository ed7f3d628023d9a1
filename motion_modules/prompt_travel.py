"""Prompt travel: keyframed prompts -> one conditioning per frame, interpolated between keyframes.

Text format, one keyframe per line (blank lines and lines starting with ``#`` are ignored)::

    0: a cat sitting
    24: a cat jumping

Frames before the first keyframe use it, frames after the last use the last one; frames in
between blend the two neighbouring keyframes' embeddings with ``t = (f - f0) / (f1 - f0)``.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch

_LINE_RE = re.compile(r"^\s*(\d+)\s*:\s*(.*?)\s*$")


def parse_keyframes(text: str) -> list[tuple[int, str]]:
    """``[(frame, prompt), ...]`` sorted by frame; malformed lines are errors naming the line."""
    keyframes: dict[int, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE_RE.match(line)
        if match is None:
            raise ValueError(f"prompt travel line {number}: {line.strip()!r} is not 'FRAME: prompt' "
                             "(e.g. '0: a cat sitting')")
        frame = int(match[1])
        if frame in keyframes:
            raise ValueError(f"prompt travel line {number}: frame {frame} already has a prompt")
        keyframes[frame] = match[2]
    if not keyframes:
        raise ValueError("prompt travel: no keyframes; write lines like '0: a cat sitting'")
    return sorted(keyframes.items())


def frame_blend(keyframe_frames: Sequence[int], num_frames: int) -> list[tuple[int, int, float]]:
    """For each frame: (keyframe index a, keyframe index b, t), the frame's value being lerp(a, b, t)."""
    last = len(keyframe_frames) - 1
    blends = []
    for frame in range(num_frames):
        if frame <= keyframe_frames[0]:
            blends.append((0, 0, 0.0))
        elif frame >= keyframe_frames[last]:
            blends.append((last, last, 0.0))
        else:
            b = next(i for i, f in enumerate(keyframe_frames) if f >= frame)
            a = b - 1
            t = (frame - keyframe_frames[a]) / (keyframe_frames[b] - keyframe_frames[a])
            blends.append((b, b, 0.0) if t == 1.0 else (a, b, t))
    return blends


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    return a + (b - a) * t


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation along the last axis (per token), falling back to lerp when parallel."""
    a64, b64 = a.double(), b.double()
    na, nb = a64.norm(dim=-1, keepdim=True), b64.norm(dim=-1, keepdim=True)
    cos = ((a64 / na.clamp_min(eps)) * (b64 / nb.clamp_min(eps))).sum(-1, keepdim=True).clamp(-1, 1)
    omega = torch.acos(cos)
    sin = torch.sin(omega)
    parallel = sin.abs() < eps
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    out = torch.where(parallel, lerp(a64, b64, t),
                      (torch.sin((1 - t) * omega) * a64 + torch.sin(t * omega) * b64) / safe)
    return out.to(a.dtype)


INTERPOLATIONS = {"linear": lerp, "slerp": slerp}


def travel(embeddings: Sequence[torch.Tensor], keyframe_frames: Sequence[int], num_frames: int,
           interpolation: str = "linear") -> torch.Tensor:
    """Stack per-frame embeddings (each input (1, ...) -> output (num_frames, ...))."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; expected one of {sorted(INTERPOLATIONS)}")
    shapes = {tuple(e.shape) for e in embeddings}
    if len(shapes) != 1:
        raise ValueError(f"keyframe prompts encode to different shapes {sorted(shapes)}; keep every prompt "
                         "within the same number of 75-token chunks")
    blend = INTERPOLATIONS[interpolation]
    frames = [embeddings[a] if a == b or t == 0.0 else blend(embeddings[a], embeddings[b], t)
              for a, b, t in frame_blend(keyframe_frames, num_frames)]
    return torch.cat(frames, dim=0)

"""Clips made, not filmed: camera moves over stills (the MotionLoRA recipe) and moving shapes (tests).

Camera motion (AnimateDiff sec. 4.3 trains MotionLoRAs on zoom, pan and roll clips; that data was
never released): each frame is the still seen through a virtual camera that zooms, pans or rolls by
``speed`` per frame, with an easing curve over the clip. All of it is deterministic.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from ..motion_modules import MotionModelError

# motion -> (zoom per frame sign, pan x sign, pan y sign, roll sign); speed scales each
CAMERA_MOTIONS = {
    "zoom_in": (1, 0, 0, 0), "zoom_out": (-1, 0, 0, 0),
    "pan_left": (0, -1, 0, 0), "pan_right": (0, 1, 0, 0),
    "pan_up": (0, 0, -1, 0), "pan_down": (0, 0, 1, 0),
    "roll_clockwise": (0, 0, 0, 1), "roll_anticlockwise": (0, 0, 0, -1),
}
EASINGS = {
    "linear": lambda t: t,
    "ease_in": lambda t: t * t,
    "ease_out": lambda t: 1 - (1 - t) * (1 - t),
    "ease_in_out": lambda t: t * t * (3 - 2 * t),
}
SPEED_UNITS = ("zoom: fraction of scale per frame; pan: fraction of the frame width per frame; "
               "roll: degrees per frame")


def camera_positions(frames: int, easing: str) -> list[float]:
    """Where the camera is at each frame, in frames of travel: 0 .. frames-1, eased."""
    if easing not in EASINGS:
        raise MotionModelError(f"unknown easing {easing!r}; expected one of {sorted(EASINGS)}")
    if frames == 1:
        return [0.0]
    return [(frames - 1) * EASINGS[easing](i / (frames - 1)) for i in range(frames)]


def camera_clip(image: torch.Tensor, motion: str, frames: int, speed: float, easing: str = "linear",
                width: int = 256, height: int = 256) -> torch.Tensor:
    """A clip (frames, height, width, 3) of ``image`` (h, w, 3 in 0..1) seen by a moving camera.

    The camera's view is the largest ``width:height`` window that stays inside the image for the
    whole move (so no frame shows a border); ``speed`` is in the units of SPEED_UNITS. Pan: the view
    moves ``speed * width`` output pixels per frame; zoom: the view's scale changes by a factor
    ``(1 + speed)`` per frame; roll: the view turns ``speed`` degrees per frame about its centre.
    """
    if motion not in CAMERA_MOTIONS:
        raise MotionModelError(f"unknown camera motion {motion!r}; expected one of {sorted(CAMERA_MOTIONS)}")
    if image.ndim != 3 or image.shape[-1] != 3:
        raise MotionModelError(f"camera motion needs one RGB image (height, width, 3), got {tuple(image.shape)}")
    if speed < 0:
        raise MotionModelError(f"speed {speed} must be >= 0 (the motion name gives the direction)")
    zoom, pan_x, pan_y, roll = CAMERA_MOTIONS[motion]
    positions = camera_positions(frames, easing)
    travel = positions[-1]
    src_h, src_w = image.shape[0], image.shape[1]
    # view size (source pixels) at scale 1: the output aspect, small enough for the whole move
    pan_extent_x = abs(pan_x) * speed * travel  # in view widths
    pan_extent_y = abs(pan_y) * speed * travel * width / height  # in view heights
    turn = math.radians(abs(roll) * speed * travel)
    rot_fit = abs(math.cos(turn)) + abs(math.sin(turn)) * max(width / height, height / width) if roll else 1.0
    widest = max((1 + speed) ** (-p * zoom) for p in positions)  # zooming out ends on the widest view
    view_w = min(src_w / (1 + pan_extent_x), src_h * width / height / (1 + pan_extent_y)) / rot_fit / widest
    view_h = view_w * height / width
    thetas = []
    for p in positions:
        scale = (1 + speed) ** (-p * zoom)  # zooming in shows a smaller part of the image
        angle = -math.radians(roll * speed * p)  # the grid turns against the picture on screen
        # view centre in source pixels: start at one side so the whole pan stays inside
        cx = src_w / 2 + pan_x * speed * view_w * (p - travel / 2)
        cy = src_h / 2 + pan_y * speed * view_w * (p - travel / 2)
        half_w, half_h = view_w * scale / src_w, view_h * scale / src_h
        cos, sin = math.cos(angle), math.sin(angle)
        # output (u, v) in -1..1 -> source normalised coords; rotation in pixel space (aspect-corrected)
        thetas.append([[half_w * cos, -half_h * sin * src_h / src_w * 1.0, 2 * cx / src_w - 1],
                       [half_w * sin * src_w / src_h, half_h * cos, 2 * cy / src_h - 1]])
    theta = torch.tensor(thetas, dtype=torch.float32)
    grid = F.affine_grid(theta, [frames, 3, height, width], align_corners=False)
    source = image.permute(2, 0, 1).unsqueeze(0).expand(frames, -1, -1, -1).float()  # h w c -> f c h w
    clip = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return clip.permute(0, 2, 3, 1).clamp(0, 1).contiguous()


def moving_shapes_clip(frames: int, size: int, velocity: tuple[float, float], color: tuple[float, float, float],
                       start: tuple[float, float], radius: float, background: float = 0.1) -> np.ndarray:
    """A disc moving at ``velocity`` (pixels per frame, x and y) over a plain background, uint8 (f h w 3)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for i in range(frames):
        cx, cy = start[0] + velocity[0] * i, start[1] + velocity[1] * i
        inside = ((xs - cx) ** 2 + (ys - cy) ** 2) <= radius ** 2
        frame = np.full((size, size, 3), background, dtype=np.float32)
        frame[inside] = color
        out[i] = np.round(frame * 255).astype(np.uint8)
    return out


def write_video(path: str, frames: np.ndarray, fps: int = 8) -> None:
    """Write uint8 (f h w 3) frames as an MP4 (H.264, or MPEG-4 part 2 where H.264 is missing)."""
    import av

    with av.open(path, mode="w") as container:
        try:
            stream = container.add_stream("libx264", rate=fps)
            stream.options = {"crf": "10", "preset": "veryfast"}
        except (av.error.FFmpegError, ValueError):
            stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


COLORS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.85, 0.1)}
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}


def write_moving_shapes(folder: str, count: int, frames: int = 24, size: int = 64, speed: float = 2.0,
                        seed: int = 0) -> list[tuple[str, str, tuple[float, float]]]:
    """``count`` MP4 clips of a coloured disc moving in a straight line, each with a ``.txt`` caption.

    Returns (video path, caption, velocity in pixels per frame) per clip.
    """
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    made = []
    for number in range(count):
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
        dx, dy = DIRECTIONS[direction]
        velocity = (dx * speed, dy * speed)
        travel = speed * (frames - 1)
        start = (size / 2 - dx * travel / 2 + rng.uniform(-2, 2), size / 2 - dy * travel / 2 + rng.uniform(-2, 2))
        clip = moving_shapes_clip(frames, size, velocity, COLORS[color], start, radius=size / 8)
        path = os.path.join(folder, f"clip_{number:03d}.mp4")
        write_video(path, clip)
        caption = f"a {color} ball moving {direction}"
        with open(os.path.join(folder, f"clip_{number:03d}.txt"), "w", encoding="utf-8") as handle:
            handle.write(caption)
        made.append((path, caption, velocity))
    return made

"""Training clips: a folder of videos (or frame folders) with captions, a CSV, or frames in memory.

Frames are sampled as the original AnimateDiff trainer does (REFERENCE §4): N frames spread with
``linspace`` over a span of ``(N - 1) * stride + 1`` source frames starting at a random frame (the
whole video when it is shorter than the span), resized to cover the target size, centre-cropped,
flipped at random, and returned as ComfyUI IMAGE tensors (frames, height, width, 3) in 0..1.
Unusable files are skipped with a warning that names them (or raise with ``strict``).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..motion_modules import MotionModelError
from .config import DataConfig

log = logging.getLogger(__name__)
VIDEO_EXTENSIONS = (".mp4", ".webm", ".gif", ".mov", ".mkv", ".avi")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DataError(MotionModelError):
    """The training data cannot be used (the message names the file or folder)."""


@dataclass(frozen=True)
class Sample:
    path: str  # a video file or a folder of frames
    caption: str
    frame_count: int
    width: int = 0  # of the source frames
    height: int = 0


@dataclass
class ScanReport:
    """What a scan kept and what it skipped, with the reason per file."""

    samples: list[Sample] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{len(self.samples)} clips usable, {len(self.skipped)} skipped"
        reasons: dict[str, int] = {}
        for _, reason in self.skipped:
            kind = reason.split(":")[0]
            reasons[kind] = reasons.get(kind, 0) + 1
        return text + "".join(f"; {n} {kind}" for kind, n in sorted(reasons.items()))


def scan(config: DataConfig) -> ScanReport:
    """List the usable clips of ``config.folder`` or ``config.csv``; each file is decoded once to count frames."""
    report = ScanReport()
    for path, caption_or_error in _candidates(config):
        problem = caption_or_error if caption_or_error.startswith("!") else None
        if problem is None:
            try:
                count, width, height = probe(path)
            except DataError as error:
                problem = f"!unreadable: {error}"
            else:
                if count < config.frames:
                    problem = f"!too short: {count} frames, need at least {config.frames}"
        if problem is not None:
            reason = problem[1:]
            if config.strict:
                raise DataError(f"{path}: {reason} (strict = true)")
            log.warning("skipping %s: %s", path, reason)
            report.skipped.append((path, reason))
        else:
            report.samples.append(Sample(path, caption_or_error, count, width, height))
    if not report.samples:
        where = config.folder or config.csv
        raise DataError(f"no usable training clips in {where!r} ({report.summary()}); expected videos "
                        f"({', '.join(VIDEO_EXTENSIONS)}) or folders of frames, each with a .txt caption")
    log.info("training data: %s", report.summary())
    return report


def _candidates(config: DataConfig):
    """(path, caption) pairs, or (path, '!reason') for a file already known to be unusable."""
    if config.csv:
        yield from _csv_candidates(config.csv)
        return
    folder = config.folder
    if not os.path.isdir(folder):
        raise DataError(f"[data] folder {folder!r} is not a directory")
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        stem, ext = os.path.splitext(name)
        if os.path.isdir(path) or ext.lower() in VIDEO_EXTENSIONS:
            yield path, _caption(os.path.join(folder, (name if os.path.isdir(path) else stem) + ".txt"))


def _csv_candidates(path: str):
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"[data] csv {path!r}: cannot read it ({error})") from error
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "caption"]:
        rows = rows[1:]
    root = os.path.dirname(os.path.abspath(path))
    for number, row in enumerate(rows, start=2):
        if len(row) < 2:
            raise DataError(f"[data] csv {path!r} line {number}: expected path,caption; got {row!r}")
        clip = os.path.join(root, row[0].strip())
        caption = row[1].strip()
        yield clip, caption if caption else "!empty caption: the CSV row has no caption"


def _caption(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            text = handle.read().decode("utf-8").strip()
    except FileNotFoundError:
        return f"!missing caption: no {os.path.basename(path)}"
    except UnicodeDecodeError:
        return f"!caption not UTF-8: {os.path.basename(path)}"
    except OSError as error:
        return f"!unreadable caption: {error.strerror}"
    return text if text else f"!empty caption: {os.path.basename(path)}"


def probe(path: str) -> tuple[int, int, int]:
    """(frame count, width, height) of a video or a frame folder; a video is decoded once, frame by frame."""
    if os.path.isdir(path):
        files = _frame_files(path)
        if not files:
            return 0, 0, 0
        try:
            with Image.open(files[0]) as image:
                width, height = image.size
        except OSError as error:
            raise DataError(f"{os.path.basename(files[0])}: cannot read it ({error})") from error
        return len(files), width, height
    count = width = height = 0

    def visit(index: int, frame) -> bool:
        nonlocal count, width, height
        count, width, height = index + 1, frame.width, frame.height
        return False

    _each_frame(path, visit)
    if not count:
        raise DataError(f"{os.path.basename(path)}: no frames")
    return count, width, height


def _each_frame(path: str, visit) -> None:
    """Decode a video's frames in order, calling ``visit(index, frame)`` (a PyAV VideoFrame) on each until
    it returns True; a file PyAV cannot read is a DataError naming it."""
    import av  # ComfyUI's requirements include PyAV

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise DataError(f"{os.path.basename(path)}: no video stream")
            for index, frame in enumerate(container.decode(video=0)):
                if visit(index, frame):
                    break
    except (av.error.FFmpegError, OSError, ValueError) as error:
        raise DataError(f"{os.path.basename(path)}: cannot decode ({error})") from error


BUCKET_MULTIPLE = 64  # bucket sides: multiples of 64 pixels (8 latent pixels: every UNet level divides evenly)


@functools.lru_cache(maxsize=16)
def bucket_sizes(width: int, height: int) -> tuple[tuple[int, int], ...]:
    """(width, height) sizes of about ``width * height`` pixels, sides multiples of 64, aspect 1:2 to 2:1."""
    area, step = width * height, BUCKET_MULTIPLE
    sizes = set()
    for side in range(step, 2048 + 1, step):
        other = max(step, round(area / side / step) * step)
        if 0.5 <= side / other <= 2 and other <= 2048:
            sizes.update({(side, other), (other, side)})
    return tuple(sorted(sizes))


def bucket_size(source_width: int, source_height: int, config: DataConfig) -> tuple[int, int]:
    """The training size of a clip: ``(width, height)``, or with ``buckets`` the bucket nearest its aspect
    ratio (ties: the area nearest ``width * height``)."""
    if not config.buckets or not source_width or not source_height:
        return config.width, config.height
    aspect, area = math.log(source_width / source_height), config.width * config.height
    return min(bucket_sizes(config.width, config.height),
               key=lambda s: (round(abs(math.log(s[0] / s[1]) - aspect), 9), abs(s[0] * s[1] - area), s))


def _frame_files(folder: str) -> list[str]:
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.lower().endswith(IMAGE_EXTENSIONS)]


def decode_video(path: str, wanted: set[int] | None = None) -> list[np.ndarray]:
    """RGB frames (uint8, h w 3) of a video, all or those whose index is in ``wanted``."""
    frames = []
    last = None if wanted is None else max(wanted)

    def visit(index: int, frame) -> bool:
        if wanted is None or index in wanted:
            frames.append(frame.to_ndarray(format="rgb24"))
        return last is not None and index >= last

    _each_frame(path, visit)
    if wanted is None and not frames:
        raise DataError(f"{os.path.basename(path)}: no frames")
    return frames


def frame_indices(count: int, frames: int, stride: int, generator: torch.Generator) -> list[int]:
    """The original trainer's sampling: ``frames`` indices spread over a random span of the video."""
    span = min(count, (frames - 1) * stride + 1)
    start = int(torch.randint(0, count - span + 1, (1,), generator=generator))
    return np.linspace(start, start + span - 1, frames).astype(int).tolist()


@dataclass(frozen=True)
class ClipDraw:
    """The random choices for one clip (which source frames, whether it is mirrored) and its size."""

    indices: list[int]
    flip: bool
    size: tuple[int, int]  # (width, height) it is trained at: [data] width x height, or its bucket


def draw_clip(frame_count: int, config: DataConfig, generator: torch.Generator,
              size: tuple[int, int] | None = None) -> ClipDraw:
    indices = frame_indices(frame_count, config.frames, config.stride, generator)
    flip = config.flip and bool(torch.rand((), generator=generator) < 0.5)
    return ClipDraw(indices, flip, size or (config.width, config.height))


def load_clip(sample: Sample, config: DataConfig, draw: ClipDraw) -> torch.Tensor:
    """One training clip of ``sample`` as an IMAGE tensor (frames, height, width, 3) in 0..1."""
    indices = draw.indices
    if os.path.isdir(sample.path):
        files = _frame_files(sample.path)
        raw = [np.asarray(Image.open(files[i]).convert("RGB")) for i in indices]
    else:
        decoded = dict(zip(sorted(set(indices)), decode_video(sample.path, set(indices))))
        if len(decoded) < len(set(indices)):
            raise DataError(f"{os.path.basename(sample.path)}: fewer frames than counted at scan time")
        raw = [decoded[i] for i in indices]
    pixels = torch.from_numpy(np.stack(raw)).float().div_(255)
    return fit_frames(pixels, *draw.size, draw.flip)


def fit_frames(pixels: torch.Tensor, width: int, height: int, flip: bool = False) -> torch.Tensor:
    """Resize (f h w c) frames to cover width x height, centre-crop, optionally mirror."""
    x = pixels.permute(0, 3, 1, 2)  # f h w c -> f c h w
    scale = max(width / x.shape[3], height / x.shape[2])
    size = (max(height, round(x.shape[2] * scale)), max(width, round(x.shape[3] * scale)))
    if size != tuple(x.shape[2:]):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    x = x[:, :, top:top + height, left:left + width]
    if flip:
        x = x.flip(3)
    return x.permute(0, 2, 3, 1).clamp(0, 1).contiguous()


def bucket_counts(clips: "ClipSource") -> dict[tuple[int, int], int]:
    """How many clips train at each size (one entry without buckets)."""
    counts: dict[tuple[int, int], int] = {}
    for index in range(clips.count):
        size = clips.size(index)
        counts[size] = counts.get(size, 0) + 1
    return counts


class ClipSource:
    """Where training clips come from: ``count`` clips; ``draw`` makes a clip's random choices,
    ``load`` reads it with them (apart, so data-parallel processes draw for clips they do not load)."""

    count: int
    identity: str  # changes when the data changes (resume refuses then)

    def caption(self, index: int) -> str:
        raise NotImplementedError

    def draw(self, index: int, generator: torch.Generator) -> ClipDraw:
        raise NotImplementedError

    def size(self, index: int) -> tuple[int, int]:
        """(width, height) clip ``index`` is trained at (its aspect bucket with ``[data] buckets``)."""
        raise NotImplementedError

    def load(self, index: int, draw: ClipDraw) -> torch.Tensor:
        raise NotImplementedError

    def content_hash(self, index: int) -> str:
        """sha256 of the clip's content (the cache key's part that changes when the clip does)."""
        raise NotImplementedError


class FileClips(ClipSource):
    """Clips from ``[data] folder`` or ``[data] csv``, scanned once."""

    def __init__(self, config: DataConfig):
        self.config = config
        self.report = scan(config)
        self.samples = self.report.samples
        self.count = len(self.samples)
        digest = hashlib.sha256()
        for sample in self.samples:
            stat = os.stat(sample.path)
            digest.update(f"{os.path.basename(sample.path)}|{sample.caption}|{sample.frame_count}|"
                          f"{stat.st_size}\n".encode())
        self.identity = f"{self.count} clips, sha256 {digest.hexdigest()[:16]}"
        self._hashes: dict[int, str] = {}

    def caption(self, index: int) -> str:
        return self.samples[index].caption

    def draw(self, index: int, generator: torch.Generator) -> ClipDraw:
        return draw_clip(self.samples[index].frame_count, self.config, generator, self.size(index))

    def size(self, index: int) -> tuple[int, int]:
        sample = self.samples[index]
        return bucket_size(sample.width, sample.height, self.config)

    def load(self, index: int, draw: ClipDraw) -> torch.Tensor:
        return load_clip(self.samples[index], self.config, draw)

    def content_hash(self, index: int) -> str:
        if index not in self._hashes:
            path = self.samples[index].path
            digest = hashlib.sha256()
            for file in _frame_files(path) if os.path.isdir(path) else [path]:
                digest.update(os.path.basename(file).encode() + b"\0")
                with open(file, "rb") as handle:
                    for chunk in iter(lambda: handle.read(2 ** 20), b""):
                        digest.update(chunk)
            self._hashes[index] = digest.hexdigest()
        return self._hashes[index]


class MemoryClips(ClipSource):
    """Clips given as IMAGE batches (frames, height, width, 3) with a caption each (the training nodes)."""

    def __init__(self, clips: list[tuple[torch.Tensor, str]], config: DataConfig):
        self.config = config
        self.clips = []
        for number, (pixels, caption) in enumerate(clips, 1):
            if pixels.ndim != 4 or pixels.shape[-1] != 3:
                raise DataError(f"clip {number}: expected an IMAGE batch (frames, height, width, 3), "
                                f"got shape {tuple(pixels.shape)}")
            if pixels.shape[0] < config.frames:
                raise DataError(f"clip {number} has {pixels.shape[0]} frames; training takes {config.frames} "
                                "per clip (lower frames, or give a longer clip)")
            if not bool(torch.isfinite(pixels).all()):
                raise DataError(f"clip {number} contains NaN or Inf pixel values")
            self.clips.append((pixels.detach().float().cpu().clamp(0, 1), caption.strip()))
        if not self.clips:
            raise DataError("no training clips given")
        self._hashes: dict[int, str] = {}
        self.count = len(self.clips)
        digest = hashlib.sha256()
        for pixels, caption in self.clips:
            digest.update(caption.encode())
            digest.update(pixels.numpy().tobytes())
        self.identity = f"{self.count} clips, sha256 {digest.hexdigest()[:16]}"

    def caption(self, index: int) -> str:
        return self.clips[index][1]

    def draw(self, index: int, generator: torch.Generator) -> ClipDraw:
        return draw_clip(self.clips[index][0].shape[0], self.config, generator, self.size(index))

    def size(self, index: int) -> tuple[int, int]:
        pixels = self.clips[index][0]
        return bucket_size(pixels.shape[2], pixels.shape[1], self.config)

    def load(self, index: int, draw: ClipDraw) -> torch.Tensor:
        return fit_frames(self.clips[index][0][draw.indices], *draw.size, draw.flip)

    def content_hash(self, index: int) -> str:
        if index not in self._hashes:
            pixels = self.clips[index][0]
            digest = hashlib.sha256(f"{tuple(pixels.shape)}".encode() + pixels.numpy().tobytes())
            self._hashes[index] = digest.hexdigest()
        return self._hashes[index]

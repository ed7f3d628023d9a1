"""The clip layout of one UNet call: which rows of the batch are which frames of which clip.

Every frame-aware layer (motion modules, v1's frame-spanning norms, windowed motion attention, and
later patches) reads this one record instead of guessing from the batch size. A UNet call's batch
is laid out as

    chunks x sequences x frames

- ``chunks``: ComfyUI's cond/uncond chunks (``transformer_options["cond_or_uncond"]``), stacked;
- ``sequences``: runs of consecutive frames the motion modules attend over together: a whole clip,
  or one context window of a clip; several when a latent batch holds several clips or when windows
  are batched into one call;
- ``frames``: the frames of each sequence (all sequences of a call have the same length).

Worked example: a latent batch of 32 with 16 frames per clip, context windows of 8 frames advancing
by 6, two windows per call, cfg on: the first call's batch is 2 chunks x 4 sequences x 8 frames, and
``positions`` is ``((0..7), (0..7), (6..13), (6..13))`` with ``clip_ids`` ``(0, 1, 0, 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .errors import MotionModelError


@dataclass(frozen=True)
class FrameLayout:
    """Args:
        positions: per sequence, the indices of its frames within its clip.
        clip_ids: per sequence, which clip of the latent batch it belongs to.
        clip_frames: frames of every clip in the latent batch.
    """

    positions: tuple[tuple[int, ...], ...]
    clip_ids: tuple[int, ...]
    clip_frames: int

    def __post_init__(self):
        if not self.positions or len(self.positions) != len(self.clip_ids):
            raise ValueError(f"a layout needs one clip id per sequence; got {len(self.positions)} sequences "
                             f"and {len(self.clip_ids)} clip ids")
        lengths = {len(p) for p in self.positions}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(f"all sequences of one call must have the same, non-zero length; got {sorted(lengths)}")
        if any(not 0 <= i < self.clip_frames for p in self.positions for i in p):
            raise ValueError(f"frame positions must lie in [0, {self.clip_frames})")

    @classmethod
    def whole(cls, clips: int, clip_frames: int) -> "FrameLayout":
        """``clips`` whole clips of ``clip_frames`` frames, one after the other."""
        return cls((tuple(range(clip_frames)),) * clips, tuple(range(clips)), clip_frames)

    @classmethod
    def of_windows(cls, windows: Sequence[Sequence[int]], clips: int, clip_frames: int) -> "FrameLayout":
        """Every window of ``windows`` cut from each of ``clips`` clips: window-major, clip-minor."""
        return cls(tuple(tuple(w) for w in windows for _ in range(clips)),
                   tuple(c for _ in windows for c in range(clips)), clip_frames)

    @property
    def frames(self) -> int:
        """Frames per sequence: the length the motion modules attend over."""
        return len(self.positions[0])

    @property
    def sequences(self) -> int:
        return len(self.positions)

    @property
    def rows(self) -> int:
        """Batch rows of one cond/uncond chunk."""
        return self.sequences * self.frames

    def row_frames(self, chunks: int = 1) -> list[int]:
        """The clip frame of every row of a call of ``chunks`` cond/uncond chunks (positions, chunk after chunk)."""
        return [frame for positions in self.positions for frame in positions] * chunks

    def batch_index(self) -> list[int]:
        """Rows of the latent batch (clips of ``clip_frames`` one after the other) this call takes, in order."""
        return [clip * self.clip_frames + i for clip, positions in zip(self.clip_ids, self.positions)
                for i in positions]

    def check_batch(self, batch: int, chunks: int, where: str) -> None:
        """Raise when a tensor of ``batch`` rows is not ``chunks`` chunks of this layout."""
        if batch != chunks * self.rows:
            raise MotionModelError(
                f"{where} got a batch of {batch} rows, but this call's clip layout is {chunks} cond/uncond "
                f"chunk(s) x {self.sequences} sequence(s) x {self.frames} frames = {chunks * self.rows}; "
                "another node changed the batch between the sampler and the UNet")


def clip_count(batch: int, frames_per_clip: int) -> int:
    """Clips in a latent batch: ``frames_per_clip`` 0 means the whole batch is one clip."""
    if frames_per_clip <= 0 or frames_per_clip == batch:
        return 1
    if batch % frames_per_clip:
        raise MotionModelError(f"a latent batch of {batch} frames cannot be split into clips of "
                               f"{frames_per_clip} frames (Apply Motion Model's frames_per_clip); use a "
                               f"multiple of {frames_per_clip} frames, or frames_per_clip 0 for one clip")
    return batch // frames_per_clip

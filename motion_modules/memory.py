"""Memory estimates for planning a sampling run (no ComfyUI import)."""

from __future__ import annotations


def temporal_attention_bytes(positions: int, frames: int, heads: int = 8, chunks: int = 1,
                             dtype_bytes: int = 4) -> int:
    """Peak bytes of one motion module's attention scores at the finest level.

    The temporal attention runs once per spatial position over the frames of a pass; if the kernel
    materialises the scores, they are ``(chunks * positions * heads, frames, frames)``, and the
    softmax output is a second tensor of that size:

        2 * chunks * positions * heads * frames**2 * dtype_bytes

    ``positions`` is latent height x width (down_blocks.0 runs at latent resolution, the largest);
    this term is the one that grows with frames squared in a long single pass.
    """
    return 2 * chunks * positions * heads * frames * frames * dtype_bytes

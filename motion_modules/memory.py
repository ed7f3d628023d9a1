"""Memory estimates for planning a sampling run (no ComfyUI import).

The motion modules add to a UNet call's peak what ComfyUI's own estimate (``memory_required``)
does not know about. One module runs at a time and frees its activations before the next, so the
addition is the peak of the largest one: the first down block's, at the latent resolution.
"""

from __future__ import annotations

# Tensors of (tokens x channels) alive at a module's peak, inside the GEGLU feed-forward: its input,
# the 2 x 4C projection, gelu(gate) and the product (4C each), the residual. Measured on CPU with the
# fused (sdpa) attention: 19-20 (tests/test_memory_estimate.py checks the estimate against a peak).
MODULE_ACTIVATIONS = 20


def temporal_attention_bytes(positions: int, frames: int, heads: int = 8, chunks: int = 1,
                             dtype_bytes: int = 4) -> int:
    """Bytes of one motion module's attention scores where the kernel materialises them (the
    ``naive`` backend, or an SDPA math fallback): ``(chunks * positions * heads, frames, frames)``
    scores and a softmax output of that size,

        2 * chunks * positions * heads * frames**2 * dtype_bytes

    ``chunks`` counts the sequences attended over separately (clips, windows, cond/uncond), each of
    ``frames`` frames; this is the term that grows with frames squared in a long single pass.
    """
    return 2 * chunks * positions * heads * frames * frames * dtype_bytes


def temporal_module_bytes(positions: int, rows: int, channels: int, attention_frames: int, heads: int = 8,
                          dtype_bytes: int = 4, materialised_scores: bool = False) -> int:
    """Peak bytes one motion module adds while it runs on ``rows`` frames (all chunks, clips, windows
    of one UNet call) at ``positions`` = latent height x width with ``channels`` channels:

        MODULE_ACTIVATIONS * rows * positions * channels * dtype_bytes
        + (materialised_scores ? temporal_attention_bytes(positions, attention_frames, heads,
                                                          rows / attention_frames) : 0)

    The fused attention kernels (SDPA: flash / memory-efficient, on CPU and GPU) never hold the
    frames x frames scores, so by default only the activations count.
    """
    activations = MODULE_ACTIVATIONS * rows * positions * channels * dtype_bytes
    if not materialised_scores:
        return activations
    sequences = -(-rows // attention_frames)
    return activations + temporal_attention_bytes(positions, attention_frames, heads, sequences, dtype_bytes)

"""The motion modules' memory estimate against a measured peak on CPU (a fresh process per case)."""

import os
import subprocess
import sys

import pytest

from animatediff_suite.motion_modules.memory import temporal_module_bytes

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.parametrize("positions,frames,channels,backend", [
    (512, 32, 320, "sdpa"),     # feed-forward bound: a 16-32 frame window at SD1.5's first level
    (512, 128, 64, "sdpa"),     # a long single pass; the fused kernel holds no scores
    (512, 128, 64, "naive"),    # the materialising kernel: frames^2 scores dominate
])
def test_module_estimate_is_within_a_factor_of_the_measured_peak(positions, frames, channels, backend):
    out = subprocess.run([sys.executable, os.path.join(TESTS, "tools", "module_peak.py"), str(positions),
                          str(frames), str(channels), backend, TESTS], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    measured = int(out.stdout.strip())
    # the formula written out: 20 activations of (rows x positions x channels) fp32, plus for the naive
    # kernel scores and softmax of (positions x heads, frames, frames)
    formula = 20 * frames * positions * channels * 4 + (2 * positions * 8 * frames ** 2 * 4 if backend == "naive" else 0)
    estimate = temporal_module_bytes(positions, frames, channels, frames, materialised_scores=backend == "naive")
    assert estimate == formula
    assert 0.5 < measured / estimate < 2, (measured / 2 ** 20, estimate / 2 ** 20)


def test_attention_score_bytes_written_out():
    """2 (scores and softmax) x chunks x positions x heads x frames^2 x bytes; 8 heads, 1 chunk, fp32 unless
    given."""
    from animatediff_suite.motion_modules.memory import temporal_attention_bytes

    assert temporal_attention_bytes(64, 16) == 2 * 64 * 8 * 16 * 16 * 4 == 1048576
    assert temporal_attention_bytes(64, 16, heads=5, chunks=3, dtype_bytes=2) == 2 * 3 * 64 * 5 * 256 * 2
    # 40 rows in windows of 16: 3 sequences (the last one partial), activations 20 x rows x positions x channels
    assert temporal_module_bytes(64, 40, 32, 16, materialised_scores=True) == (
        20 * 40 * 64 * 32 * 4 + 2 * 3 * 64 * 8 * 256 * 4)
    # fp16 halves both terms; by default (fused kernels) the scores are not held
    assert temporal_module_bytes(64, 40, 32, 16, dtype_bytes=2, materialised_scores=True) == (
        20 * 40 * 64 * 32 * 2 + 2 * 3 * 64 * 8 * 256 * 2)
    assert temporal_module_bytes(64, 40, 32, 16) == 20 * 40 * 64 * 32 * 4

"""A long day of real use (bounded): 44 prompts through one real server over HTTP, alternating two
motion models, MotionLoRA strengths, context windows on/off, prompt travel, FreeInit, SD1.5 and SDXL
tiny models, with failing, refused and interrupted prompts in between (tests/soak.py).

Every good prompt's latents equal, bit for bit, the same prompt run alone in a fresh server (so no
patch, hook or cache of one prompt leaks into another, plain models included), and the server's RSS
after the last prompt stays within a loose bound of its RSS after the first ten.
"""

from __future__ import annotations

import pytest
import torch

from soak import GOOD, fresh_outputs, soak
from server_helpers import start_server

pytestmark = pytest.mark.comfyui
PROMPTS = 44
MIB = 2 ** 20


def test_long_day_of_use(comfyui, tmp_path):
    fresh = fresh_outputs(comfyui, tmp_path, GOOD)
    server = start_server(comfyui, tmp_path / "soak")
    try:
        result = soak(server, PROMPTS)
    finally:
        server.stop()
    assert sorted(result.outputs) == sorted(GOOD)
    for name, runs in result.outputs.items():
        for number, output in enumerate(runs):
            assert torch.equal(output, fresh[name]), f"{name}, run {number + 1} of {len(runs)}"
    after_ten, last = result.rss[9][1], result.rss[-1][1]
    growth = last - after_ten
    print(f"\nsoak: {PROMPTS} prompts in {result.seconds:.0f} s; RSS after 10 prompts {after_ten / MIB:.0f} MiB, "
          f"after {PROMPTS} {last / MIB:.0f} MiB, growth {growth / MIB:+.0f} MiB ({growth / after_ten:+.1%})")
    # loose: a leak of the tiny models' size per prompt (~10 MiB) over 34 prompts would exceed it
    assert growth < 0.25 * after_ten + 64 * MIB

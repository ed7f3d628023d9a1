"""The editor's context-schedule maths (web/js/context_schedule.js) against the Python core: this test
exports the core's windows and fuse weights for thousands of settings and runs node's built-in test
runner on tests/web/context_schedule.test.mjs with them, so the drawing and the sampler cannot drift."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess

import comfy_env
from ads_package import ROOT


def vectors() -> list[dict]:
    from animatediff_suite.motion_modules import FUSE_METHODS, SCHEDULES, ContextOptions, context_windows

    cases, fuses = [], itertools.cycle(sorted(FUSE_METHODS))
    shapes = [(4, 1), (8, 0), (8, 3), (16, 4), (16, 15), (12, 6)]
    for schedule, frames, (length, overlap), stride, closed, step in itertools.product(
            sorted(SCHEDULES), (1, 5, 16, 17, 24, 30, 33, 40, 64, 97), shapes, (1, 3), (False, True),
            (0, 1, 2, 3, 7, 12)):
        if closed and schedule != "looped_uniform":
            continue
        options = ContextOptions(length, overlap, stride, closed, schedule, next(fuses))
        windows = context_windows(frames, options, step)
        weights = [FUSE_METHODS[options.fuse_method](w, frames, options) for w in windows]
        cases.append({"frames": frames, "step": step, "windows": windows, "weights": weights, "options": {
            "context_length": length, "context_overlap": overlap, "context_stride": stride,
            "closed_loop": closed, "schedule": schedule, "fuse_method": options.fuse_method}})
    return cases


def test_editor_schedules_equal_the_core(tmp_path):
    node = shutil.which("node")
    if node is None:
        comfy_env.skip_or_fail("no node on PATH (the editor's schedule maths are tested with node)")
    cases = vectors()
    assert len(cases) == 4320  # 5 schedules x 10 frame counts x 6 shapes x 2 strides x 6 steps, looped also closed
    path = tmp_path / "vectors.json"
    path.write_text(json.dumps(cases), encoding="utf-8")
    done = subprocess.run([node, os.path.join(ROOT, "tests", "web", "context_schedule.test.mjs"), str(path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "# pass 3" in done.stdout and "# fail 0" in done.stdout, done.stdout[-2000:]

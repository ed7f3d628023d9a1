"""Browser tier: every UI example loads in the real ComfyUI frontend (headless Chromium driven by
playwright-core) with the pack's nodes and web extension, and the frontend's own graphToPrompt()
gives exactly the API example. Screenshots are kept in tests/_artifacts/frontend/.
"""

from __future__ import annotations

import os
import shutil

import pytest

import ade_workflows as ade
import comfy_env
from ads_package import ROOT, load_module

pytestmark = pytest.mark.comfyui
ARTIFACTS = os.path.join(ROOT, "tests", "_artifacts", "frontend")
frontend_check = load_module("ads_frontend_check", "tests/tools/frontend_check.py")
EXAMPLES = sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, "example_workflows", "api")) if f.endswith(".json"))


@pytest.fixture(scope="module")
def shown(comfyui, tmp_path_factory):
    missing = frontend_check.missing_browser_tools()
    if missing:
        comfy_env.skip_or_fail(f"browser tier skipped: {missing}")
    commands = [("ade_import", ade.LEGACY_UI, "AnimateDiffSuite.ConvertADEWorkflow", ade.LEGACY_EXPECTED_API)]
    results = frontend_check.check_examples(comfyui, str(tmp_path_factory.mktemp("frontend")), commands,
                                            {"long_loop_sd15": preview_check()})
    os.makedirs(ARTIFACTS, exist_ok=True)
    for result in results:
        shutil.copy(result.screenshot, os.path.join(ARTIFACTS, f"{result.name}.png"))
    return {result.name: result for result in results}


PREVIEW_SET = {"context_length": 12, "context_overlap": 3}  # on long_loop_sd15 (looped_uniform, closed loop)
PREVIEW_FRAMES = 48  # its Empty Latent Image's batch_size, changed from 64


def preview_check() -> dict:
    """The expected preview after the change: the Python core's windows for steps 0-3 and step 0's weights."""
    from animatediff_suite.motion_modules import FUSE_METHODS, ContextOptions, context_windows

    options = ContextOptions(PREVIEW_SET["context_length"], PREVIEW_SET["context_overlap"], 1, True,
                             "looped_uniform", "pyramid")
    steps = [context_windows(PREVIEW_FRAMES, options, step) for step in range(4)]
    weights = [FUSE_METHODS["pyramid"](w, PREVIEW_FRAMES, options) for w in steps[0]]
    return {"set": PREVIEW_SET, "expected": {"frames": PREVIEW_FRAMES, "steps": steps, "weights": weights,
                                             "problems": []}}


def test_context_schedule_preview_redraws_the_core_schedule_and_flags_invalid_overlap(shown):
    """Context Options draws its windows per step and fuse weights: changing the length and the latent's
    frame count redraws it, equal to a rendering of the core's windows; overlap = length is flagged."""
    preview = shown["long_loop_sd15"].preview
    assert preview["shown"]["clip"]["frames"] == PREVIEW_FRAMES  # read from the graph's Empty Latent Image
    assert preview["shown"]["windows"] == preview_check()["expected"]["steps"]
    assert preview["changed"] and preview["nonBlank"] and preview["equal"]
    assert preview["invalid"] == ["context_overlap must be less than context_length (12 >= 12)"]
    assert preview["redPixels"] > 50


def test_every_example_was_loaded(shown):
    assert sorted(set(shown) - {"ade_import"}) == EXAMPLES


def test_convert_ade_workflow_command_maps_the_open_workflow(shown):
    """An ADE workflow (without ADE installed) loads with a hint; the pack's command (Extensions >
    AnimateDiff Suite) converts it in place, and the frontend's own API graph is the hand-written one."""
    result = shown["ade_import"]
    before, after = result.text
    assert "uses AnimateDiff-Evolved nodes" in before
    assert "3 AnimateDiff-Evolved node(s) converted" in after
    assert result.missing == []
    assert result.prompt == result.expected


@pytest.mark.parametrize("name", EXAMPLES)
def test_frontend_graph_to_prompt_equals_the_api_example(shown, name):
    result = shown[name]
    assert result.missing == [], f"{name}: the frontend could not build nodes {result.missing}"
    assert result.prompt == result.expected


@pytest.mark.parametrize("name", [*EXAMPLES, "ade_import"])
def test_no_console_error_from_the_pack(shown, name):
    ours = [entry for entry in shown[name].console
            if entry["type"] in ("error", "pageerror")
            and any(word in entry["text"] for word in ("animatediff_suite", "ADS_", "AnimateDiff"))]
    assert ours == [], ours

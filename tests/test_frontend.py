"""Browser tier: every UI example loads in the real ComfyUI frontend (headless Chromium driven by
playwright-core) with the pack's nodes and web extension, and the frontend's own graphToPrompt()
gives exactly the API example. Screenshots are kept in tests/_artifacts/frontend/.
"""

from __future__ import annotations

import os
import shutil

import pytest

import ade_workflows as ade
from server_helpers import write_motion_model
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
    motion_file = tmp_path_factory.mktemp("motion") / ANIMATED_MOTION
    write_motion_model(motion_file, "v2", seed=1)
    results = frontend_check.check_examples(comfyui, str(tmp_path_factory.mktemp("frontend")), commands,
                                            {"long_loop_sd15": preview_check()},
                                            [("animated_preview", ANIMATED_GRAPH, ANIMATED_FPS)],
                                            {"animatediff_models": [str(motion_file)]})
    os.makedirs(ARTIFACTS, exist_ok=True)
    for result in results:
        shutil.copy(result.screenshot, os.path.join(ARTIFACTS, f"{result.name}.png"))
    after_run = next(r for r in results if r.name == "animated_preview").screenshot.replace(".png", "_done.png")
    shutil.copy(after_run, os.path.join(ARTIFACTS, "animated_preview_done.png"))
    save_readme_pictures()
    return {result.name: result for result in results}


README_PICTURES = {  # README picture: (screenshot, crop box); copied to example_workflows/screenshots/
    "animated_preview.jpg": ("animated_preview", (80, 70, 1240, 400)),  # while the KSampler samples
    "motion_badges.jpg": ("animated_preview_done", (80, 70, 700, 400)),  # after the run
    "context_preview.jpg": ("long_loop_sd15", (95, 440, 545, 800)),  # Context Options of the example
}


def save_readme_pictures() -> None:
    """The README's screenshots of the editor features, cropped from this run's screenshots into
    tests/_artifacts/frontend/readme/ (copy them to example_workflows/screenshots/ when the editor changes)."""
    from PIL import Image

    folder = os.path.join(ARTIFACTS, "readme")
    os.makedirs(folder, exist_ok=True)
    for picture, (name, box) in README_PICTURES.items():
        image = Image.open(os.path.join(ARTIFACTS, f"{name}.png")).convert("RGB")
        image.crop(box).save(os.path.join(folder, picture), quality=85)


ANIMATED_STEPS, ANIMATED_FPS, ANIMATED_MOTION = 20, 24, "tiny_mm_v2.ckpt"
ANIMATED_GRAPH = {  # the tiny demo models, 16 frames: runs on the CPU in a few seconds
    "1": {"class_type": "ADS_TinyDemoModels", "inputs": {"seed": 0, "family": "SD1.5", "motion_version": "v3"}},
    "2": {"class_type": "ADS_ApplyMotionModel", "inputs": {"model": ["1", 0], "motion_model": ["9", 0]}},
    "9": {"class_type": "ADS_LoadMotionModel", "inputs": {"model_name": "tiny_mm_v2.ckpt"}},
    "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a fox running"}},
    "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 16}},
    "6": {"class_type": "KSampler", "inputs": {
        "model": ["2", 0], "seed": 3, "steps": ANIMATED_STEPS, "cfg": 7.0, "sampler_name": "euler",
        "scheduler": "normal", "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}},
    "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
    "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
}

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
    assert sorted(set(shown) - {"ade_import", "animated_preview"}) == EXAMPLES


def test_queued_16_frame_prompt_shows_an_animated_preview(shown):
    """Queued from the page, the sampler's preview plays distinct frames: many more previews than the
    one still per step, all for the sampler node, taken while it samples (tests/_artifacts)."""
    result = shown["animated_preview"]
    run = result.run
    assert run["done"] == "execution_success", run
    assert run["nodes"] == [run["sampler"]]
    assert run["previews"] > ANIMATED_STEPS and run["hashes"] > ANIMATED_STEPS, run
    assert run["screenshotWhileSampling"]
    assert result.missing == []


def test_motion_model_badges_show_what_was_loaded_and_chosen(shown, tmp_path):
    """After the run, Load Motion Model shows the family, version, frame limit, mid block and the file's
    SHA-256 prefix; Apply Motion Model the schedule auto chose."""
    import hashlib

    write_motion_model(tmp_path / ANIMATED_MOTION, "v2", seed=1)  # the same bytes as the server's copy
    digest = hashlib.sha256((tmp_path / ANIMATED_MOTION).read_bytes()).hexdigest()[:10]
    badges = shown["animated_preview"].run["badges"]
    # v2 (REFERENCE §1): 8 down + 12 up modules and a mid block, 32 positions, GroupNorm per frame
    assert badges["loaded"] == (f"{ANIMATED_MOTION}: SD1.5 v2, 21 modules (mid block), up to 32 frames, "
                                f"norm per_frame, sha256 {digest}")
    assert badges["chosen"] == "beta_schedule auto: sqrt_linear (AnimateDiff) (v2)"


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


@pytest.mark.parametrize("name", [*EXAMPLES, "ade_import", "animated_preview"])
def test_no_console_error_from_the_pack(shown, name):
    ours = [entry for entry in shown[name].console
            if entry["type"] in ("error", "pageerror")
            and any(word in entry["text"] for word in ("animatediff_suite", "ADS_", "AnimateDiff"))]
    assert ours == [], ours

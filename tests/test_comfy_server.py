"""ComfyUI tier, end to end: a real ComfyUI server (main.py --cpu) with the pack, driven over HTTP.

Every API example is posted with tiny models made visible to the server: the motion models,
MotionLoRA and domain adapter are tiny files under the example's file names in temporary model
folders; the SD checkpoint loader is swapped for ADS_TinyDemoModels (ComfyUI cannot detect a tiny
checkpoint file as SD1.5/SDXL, so a tiny checkpoint *file* is not possible).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

import ade_workflows as ade
from ads_helpers import make_spec, motion_lora_state_dict, original_state_dict, random_model, released_sparsectrl
from ads_package import ROOT, load_module
from comfy_helpers import run_in_process
from server_helpers import refused, runner

pytestmark = pytest.mark.comfyui
workflows = load_module("ads_workflows", "tests/tools/workflows.py")


@pytest.fixture(scope="module")
def server(comfyui, tmp_path_factory):
    from ads_helpers import tiny_domain_adapter_state_dict
    from animatediff_suite.nodes.demo import TINY_CHANNELS, TINY_SDXL_CHANNELS, tiny_sparsectrl

    root = tmp_path_factory.mktemp("comfy_e2e")
    folders = {name: root / name for name in ("animatediff_models", "animatediff_motion_lora", "loras", "controlnet")}
    for folder in folders.values():
        folder.mkdir()
    v2 = random_model(make_spec("v2", channels=TINY_CHANNELS), seed=1)
    torch.save(original_state_dict(v2), folders["animatediff_models"] / "mm_sd_v15_v2.ckpt")
    torch.save(original_state_dict(random_model(make_spec("v3", channels=TINY_CHANNELS), seed=2)),
               folders["animatediff_models"] / "v3_sd15_mm.ckpt")
    torch.save(original_state_dict(random_model(make_spec("sdxl_beta", channels=TINY_SDXL_CHANNELS), seed=3)),
               folders["animatediff_models"] / "mm_sdxl_v10_beta.ckpt")
    torch.save(motion_lora_state_dict(v2.spec), folders["animatediff_motion_lora"] / "v2_lora_ZoomIn.ckpt")
    torch.save(tiny_domain_adapter_state_dict(), folders["loras"] / "v3_sd15_adapter.ckpt")
    torch.save(released_sparsectrl(tiny_sparsectrl(0, "rgb", torch.nn)), folders["controlnet"] / "v3_sd15_sparsectrl_rgb.ckpt")
    (root / "input").mkdir()
    Image.new("RGB", (96, 80), (200, 120, 40)).save(root / "input" / "example.png")
    Image.new("RGB", (96, 80), (30, 60, 200)).save(root / "input" / "example_end.png")
    frames = [Image.new("RGB", (96, 80), (10 * i, 120, 40)) for i in range(16)]  # an animated clip
    frames[0].save(root / "input" / "example_clip.webp", save_all=True, append_images=frames[1:], duration=125)
    output = root / "output"
    instance = runner.ComfyServer.start(
        comfyui, str(root), ["--cpu", "--input-directory", str(root / "input"), "--output-directory", str(output),
                             "--preview-method", "latent2rgb"],
        model_folders={k: str(v) for k, v in folders.items()})
    instance.output, instance.root, instance.folders = output, root, folders
    yield instance
    instance.stop()


def tiny(graph: dict) -> dict:
    """The example on tiny models, at 64x64 and 2 steps (2 training steps of 8 frames)."""
    graph = runner.use_tiny_models(graph, swap_motion_loaders=False)
    for node in graph.values():
        if node["class_type"] in ("EmptyLatentImage", "ImageScale", "ADS_CameraMotionClips", "ADS_TrainMotionLora"):
            node["inputs"].update(width=64, height=64)
        if node["class_type"] in ("KSampler", "ADS_StorySampler", "ADS_StoryToVideo"):
            node["inputs"]["steps"] = 2
        if node["class_type"] == "ADS_TrainMotionLora":
            node["inputs"].update(steps=2, frames=8, rank=4)
    return graph


def frame_counts(server, entry) -> dict[str, int]:
    import av

    counts = {}
    for item in runner.output_files(entry):
        path = os.path.join(server.output, item.get("subfolder", ""), item["filename"])
        if path.endswith(".webp"):
            counts["webp"] = Image.open(path).n_frames
        elif path.endswith(".mp4"):
            with av.open(path) as container:
                counts["mp4"] = sum(1 for _ in container.decode(video=0))
    return counts


def expected_frames(graph: dict) -> int:
    for node in graph.values():
        if node["class_type"] == "EmptyLatentImage":
            return node["inputs"]["batch_size"]
        if node["class_type"] == "RepeatLatentBatch":
            return node["inputs"]["amount"]
    raise AssertionError("no latent batch in the graph")


STORY_EXAMPLES = ("comic_story_sd15", "comic_story_sdxl", "consistent_character_clips_sd15", "story_to_video_sd15")


@contextlib.contextmanager
def server_folders(server):
    """This process's ComfyUI folders pointed at the server's input and model folders, restored after."""
    import folder_paths

    saved = copy.deepcopy(folder_paths.folder_names_and_paths), folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(server.root / "input"))
    for name, path in server.folders.items():
        folder_paths.add_model_folder_path(name, str(path), is_default=True)
        folder_paths.filename_list_cache.pop(name, None)
    try:
        yield
    finally:
        folder_paths.folder_names_and_paths.clear()
        folder_paths.folder_names_and_paths.update(saved[0])
        folder_paths.set_input_directory(saved[1])
        folder_paths.filename_list_cache.clear()


def as_saved(images: torch.Tensor) -> np.ndarray:
    """IMAGE -> the 8-bit pixels SaveImage writes (clip(255 x), truncated)."""
    return np.clip(255.0 * images.float().cpu().numpy(), 0, 255).astype(np.uint8)


def save_frames(graph: dict, links: list, prefix: str) -> None:
    """Add a lossless SaveImage ("9<n>") for each IMAGE link."""
    for number, link in enumerate(links):
        graph[f"9{number}"] = {"class_type": "SaveImage", "inputs": {"images": list(link),
                                                                      "filename_prefix": f"test/{prefix}_{number}"}}


def assert_frames_equal_in_process(server, graph: dict, entry: dict, links: list) -> None:
    """The frames the server saved for each link (save_frames) equal this process's run of the same graph,
    node classes called directly (comfy_helpers.run_in_process), at most one 8-bit level apart (float
    rounding between two processes); and they are frames of a video, not one image repeated."""
    with server_folders(server):
        for number, (node_id, output) in enumerate(links):
            got = np.stack(saved_images(server, entry, f"9{number}")).astype(int)
            expected = as_saved(run_in_process(graph, node_id, output)).astype(int)
            assert got.shape == expected.shape, (node_id, got.shape, expected.shape)
            assert np.abs(got - expected).max() <= 1, node_id
            assert np.abs(got[1:] - got[:1]).max() > 1, node_id


@pytest.mark.parametrize("name", sorted(set(workflows.EXAMPLES) - set(STORY_EXAMPLES)))
def test_every_api_example_writes_the_frames_an_in_process_run_of_it_computes(server, name):
    """Each example through the real server: its files hold every frame, and the decoded frames equal an
    in-process run of the same graph (assert_frames_equal_in_process)."""
    graph = runner.load_example(name)
    frames = expected_frames(graph)
    assert frames == {"long_loop_sd15": 64, "two_clips_sd15": 32}.get(name, 16)
    graph = tiny(graph)
    videos = sorted({tuple(node["inputs"]["images"]) for node in graph.values()
                     if node["class_type"] == "SaveAnimatedWEBP"})
    save_frames(graph, videos, name)
    entry = server.run(graph)
    per_file = 16 if name == "two_clips_sd15" else frames  # one file per 16-frame clip
    assert frame_counts(server, entry) == {"webp": per_file, "mp4": per_file}
    files = [item["filename"] for item in runner.output_files(entry) if item["filename"].endswith(".webp")]
    assert len(files) == len(videos) == (2 if name == "two_clips_sd15" else 1)
    assert_frames_equal_in_process(server, graph, entry, videos)


def saved_images(server, entry, node_id: str) -> list:
    items = entry["outputs"][node_id]["images"]
    return [np.asarray(Image.open(os.path.join(server.output, i["subfolder"], i["filename"])).convert("RGB"))
            for i in items]


@pytest.mark.parametrize("name", ["comic_story_sd15", "comic_story_sdxl"])
def test_comic_story_examples_give_six_panels_and_a_page_that_holds_them(server, name):
    """6 panels (2 references) through the real server, and the page: 3 columns of 64 px panels with
    16 px margins, panel i at (16 + (i % 3) * 80, 16 + (i // 3) * (64 + caption band + 16))."""
    entry = server.run(tiny(runner.load_example(name)))
    panels = saved_images(server, entry, "8")
    assert len(panels) == 6 and all(p.shape == (64, 64, 3) for p in panels)
    assert min(np.abs(panels[i].astype(int) - panels[j].astype(int)).max() for i in range(6) for j in range(i)) > 0
    (page,) = saved_images(server, entry, "10")
    assert page.shape[1] == 3 * 64 + 4 * 16
    row_height = (page.shape[0] - 3 * 16) // 2
    assert row_height > 64  # the caption band under each row
    for i, panel in enumerate(panels):
        x, y = 16 + (i % 3) * 80, 16 + (i // 3) * (row_height + 16)
        assert np.abs(page[y:y + 64, x:x + 64].astype(int) - panel.astype(int)).max() <= 1, i


def test_consistent_character_clips_example_gives_both_clips(server):
    graph = tiny(runner.load_example("consistent_character_clips_sd15"))
    entry = server.run(graph)
    assert len(saved_images(server, entry, "8")) == 2  # the references
    clips = [np.stack(saved_images(server, entry, node)) for node in ("17", "22")]
    assert [c.shape for c in clips] == [(16, 64, 64, 3)] * 2
    assert np.abs(clips[0].astype(int) - clips[1].astype(int)).max() > 0
    assert frame_counts(server, entry) == {"webp": 16}
    webps = [i["filename"] for i in runner.output_files(entry) if i["filename"].endswith(".webp")]
    assert len(webps) == 2


def test_story_to_video_example_is_one_video_whose_keyframes_are_the_panels(server):
    """3 panels -> one 31-frame video; frames 0, 15 and 30 equal the panels through the VAE, computed here by the
    stock VAEEncode and VAEDecode nodes in the same prompt (all saved as 8-bit PNGs: at most one level apart)."""
    graph = tiny(runner.load_example("story_to_video_sd15"))
    graph["90"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["7", 0], "vae": ["1", 2]}}
    graph["91"] = {"class_type": "VAEDecode", "inputs": {"samples": ["90", 0], "vae": ["1", 2]}}
    graph["92"] = {"class_type": "SaveImage", "inputs": {"images": ["91", 0], "filename_prefix": "test/round_trip"}}
    graph["93"] = {"class_type": "SaveImage", "inputs": {"images": ["16", 0], "filename_prefix": "test/video"}}
    entry = server.run(graph)
    assert entry["outputs"]["16"]["text"] == ["31 frames; panels at 0, 15, 30"]
    assert frame_counts(server, entry) == {"webp": 31, "mp4": 31}
    panels, round_trip = saved_images(server, entry, "8"), saved_images(server, entry, "92")
    video = np.stack(saved_images(server, entry, "93")).astype(int)
    assert len(panels) == 3 and video.shape == (31, 64, 64, 3)
    for index, frame in zip((0, 15, 30), round_trip):
        assert np.abs(video[index] - frame.astype(int)).max() <= 1, index
    assert min(np.abs(video[i] - video[0]).max() for i in range(1, 15)) > 1  # in between: sampled frames


@pytest.mark.parametrize("variant", ["windows", "freenoise_freeinit"])
def test_48_frames_with_windows_prompt_travel_and_controlnet(server, variant):
    """The long-video path over HTTP: context windows, per-frame prompts and per-frame ControlNet hints;
    "windows" is a graph written before FreeNoise existed (its optional inputs absent), the other
    adds FreeNoise (shuffled noise, windowed motion attention) and two FreeInit passes."""
    graph = {
        "1": {"class_type": "ADS_TinyDemoModels", "inputs": {"seed": 0, "family": "SD1.5", "motion_version": "v2"}},
        "2": {"class_type": "ADS_ContextOptions", "inputs": {
            "context_length": 16, "context_overlap": 4, "context_stride": 1, "closed_loop": False,
            "schedule": "standard_uniform", "fuse_method": "pyramid"}},
        "3": {"class_type": "ADS_ApplyMotionModel", "inputs": {"model": ["1", 0], "motion_model": ["1", 3],
                                                               "context_options": ["2", 0]}},
        "4": {"class_type": "ADS_PromptTravel", "inputs": {
            "clip": ["1", 1], "frames": 48, "interpolation": "linear",
            "text": "0: a red fox sitting\n24: a red fox jumping\n47: a red fox asleep"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 48}},
        "12": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "13": {"class_type": "ImageScale", "inputs": {"image": ["12", 0], "upscale_method": "bilinear",
                                                      "width": 64, "height": 64, "crop": "center"}},
        "14": {"class_type": "RepeatImageBatch", "inputs": {"image": ["13", 0], "amount": 48}},
        "15": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["4", 0], "negative": ["5", 0], "control_net": ["1", 4], "image": ["14", 0],
            "strength": 0.8, "start_percent": 0.0, "end_percent": 1.0}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["3", 0], "seed": 3, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["15", 0], "negative": ["15", 1], "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
    }
    if variant == "freenoise_freeinit":
        graph["2"]["inputs"].update(noise_type="shuffle_context", scope="motion_attention",
                                    fuse_method="delayed_reverse_sawtooth")
        graph["16"] = {"class_type": "ADS_FreeInit", "inputs": {
            "model": ["3", 0], "iterations": 2, "filter": "gaussian", "spatial_stop": 0.25, "temporal_stop": 0.25,
            "butterworth_order": 4, "fast_sampling": False}}
        graph["7"]["inputs"]["model"] = ["16", 0]
    graph.update(workflows._save("long48"))
    save_frames(graph, [("8", 0)], f"long48_{variant}")
    entry = server.run(graph)
    assert frame_counts(server, entry) == {"webp": 48, "mp4": 48}
    assert_frames_equal_in_process(server, graph, entry, [("8", 0)])


def test_runner_long_clip_with_freenoise_and_freeinit(server):
    """The headless runner's options build a windowed FreeNoise + FreeInit graph that runs."""
    args = runner.parse_args(["--frames", "40", "--freenoise", "--freeinit", "2", "--steps", "2"])
    graph = runner.customise(runner.load_example("txt2vid_sd15"), args)
    assert graph["context"]["inputs"]["noise_type"] == "shuffle_context"
    assert graph["7"]["inputs"]["model"] == ["freeinit", 0]
    decoded = next(tuple(n["inputs"]["images"]) for n in graph.values() if n["class_type"] == "SaveAnimatedWEBP")
    save_frames(graph, [decoded], "runner40")
    entry = server.run(graph)
    assert frame_counts(server, entry) == {"webp": 40, "mp4": 40}
    assert_frames_equal_in_process(server, graph, entry, [decoded])
    plain = runner.customise(runner.load_example("txt2vid_sd15"), runner.parse_args([]))
    assert "context" not in plain and "freeinit" not in plain


def test_malformed_prompt_travel_line_is_a_node_error(server):
    graph = tiny(runner.load_example("long_loop_sd15"))
    graph["4"]["inputs"]["text"] = "0: a forest\nforest in winter"
    assert "line 2" in json.dumps(refused(server, graph)["4"])


def test_unknown_motion_model_is_a_node_error_and_the_next_prompt_runs(server):
    graph = tiny(runner.load_example("txt2vid_sd15"))
    graph["2"]["inputs"]["model_name"] = "no_such_motion_model.ckpt"
    node_errors = refused(server, graph)
    assert "2" in node_errors and "no_such_motion_model.ckpt" in json.dumps(node_errors["2"])
    assert frame_counts(server, server.run(tiny(runner.load_example("txt2vid_sd15"))))["webp"] == 16


def test_negative_frame_count_is_a_node_error(server):
    graph = tiny(runner.load_example("txt2vid_sd15"))
    graph["6"]["inputs"]["batch_size"] = -3
    node_errors = refused(server, graph)
    assert "6" in node_errors
    assert "batch_size" in json.dumps(node_errors["6"])


def test_mismatched_family_is_an_execution_error_naming_the_node(server):
    graph = tiny(runner.load_example("txt2vid_sd15"))
    graph["2"]["inputs"]["model_name"] = "mm_sdxl_v10_beta.ckpt"
    with pytest.raises(runner.ComfyServerError) as raised:
        server.run(graph)
    (kind, details), = raised.value.messages
    assert kind == "execution_error" and details["node_id"] == "3"
    assert "is SDXL (3 down blocks) but the model is SD15" in details["exception_message"]
    assert frame_counts(server, server.run(tiny(runner.load_example("txt2vid_sd15"))))["mp4"] == 16


def test_start_after_end_percent_is_a_validation_error(server):
    graph = tiny(runner.load_example("txt2vid_sd15"))
    graph["3"]["inputs"].update(start_percent=0.8, end_percent=0.2)
    with pytest.raises(runner.ComfyServerError) as raised:
        server.queue(graph)
    assert "start_percent (0.8) must not be greater than end_percent (0.2)" in json.dumps(raised.value.detail)


def test_ui_examples_are_the_api_examples(server):
    object_info = server.get("/object_info")
    for name, (graph, _, _) in workflows.EXAMPLES.items():
        with open(os.path.join(ROOT, "example_workflows", f"{name}.json"), encoding="utf-8") as handle:
            ui = json.load(handle)
        assert workflows.ui_to_api(ui, object_info) == workflows.normalised(graph), name
        assert runner.load_example(name) == graph, f"example_workflows/api/{name}.json is stale"
        note = next(n for n in ui["nodes"] if n["type"] == "Note")["widgets_values"][0]
        assert "Model files this workflow expects" in note


def _with_sampler(graph: dict, kind: str) -> dict:
    ks = graph.pop("7")["inputs"]
    if kind == "KSamplerAdvanced":
        graph["7"] = {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ks["model"], "add_noise": "enable", "noise_seed": 1, "steps": 2, "cfg": 7.0,
            "sampler_name": "euler", "scheduler": "normal", "positive": ks["positive"], "negative": ks["negative"],
            "latent_image": ks["latent_image"], "start_at_step": 0, "end_at_step": 10000,
            "return_with_leftover_noise": "disable"}}
        return graph
    graph.update({
        "20": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}},
        "21": {"class_type": "CFGGuider", "inputs": {"model": ks["model"], "positive": ks["positive"],
                                                     "negative": ks["negative"], "cfg": 7.0}},
        "22": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "23": {"class_type": "BasicScheduler", "inputs": {"model": ks["model"], "scheduler": "normal",
                                                          "steps": 2, "denoise": 1.0}},
        "7": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["20", 0], "guider": ["21", 0], "sampler": ["22", 0], "sigmas": ["23", 0],
            "latent_image": ks["latent_image"]}},
        "24": {"class_type": "SamplerCustom", "inputs": {
            "model": ks["model"], "add_noise": True, "noise_seed": 1, "cfg": 7.0, "positive": ks["positive"],
            "negative": ks["negative"], "sampler": ["22", 0], "sigmas": ["23", 0],
            "latent_image": ks["latent_image"]}},
        "25": {"class_type": "VAEDecode", "inputs": {"samples": ["24", 0], "vae": ["1", 2]}},
        "26": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["25", 0], "filename_prefix": "custom",
                                                            "fps": 8.0, "lossless": False, "quality": 80,
                                                            "method": "default"}},
    })
    return graph


@pytest.mark.parametrize("kind", ["KSamplerAdvanced", "SamplerCustom(Advanced)"])
def test_stock_advanced_and_custom_samplers(server, kind):
    """Each stock sampler node on the motion model gives the frames that KSampler with the same seed, steps,
    cfg, sampler and scheduler gives in an in-process run (ComfyUI's samplers agree on these settings)."""
    base = tiny(runner.load_example("txt2vid_sd15"))
    graph = _with_sampler(copy.deepcopy(base), kind)
    decoded = [("8", 0)] if kind == "KSamplerAdvanced" else [("8", 0), ("25", 0)]
    save_frames(graph, decoded, kind)
    entry = server.run(graph)
    webps = [f for f in runner.output_files(entry) if f["filename"].endswith(".webp")]
    for item in webps:
        assert Image.open(os.path.join(server.output, item.get("subfolder", ""), item["filename"])).n_frames == 16
    assert len(webps) == len(decoded)
    base["7"]["inputs"].update(seed=1, steps=2, cfg=7.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    with server_folders(server):
        expected = as_saved(run_in_process(base, "8")).astype(int)
    for number in range(len(decoded)):
        got = np.stack(saved_images(server, entry, f"9{number}")).astype(int)
        assert got.shape == expected.shape == (16, 64, 64, 3)
        assert np.abs(got - expected).max() <= 1, number


def test_animated_preview_plays_frames_between_steps_and_the_setting_turns_it_off(server):
    """With previews on (--preview-method latent2rgb) the sampler node gets the stock still of each step
    and, in between, the frames of the clip at the client's frame rate; the setting turns that off."""
    import io as bytes_io

    from server_helpers import graph, post_json, run_watching_previews

    steps = 30
    nodes = graph(motion="mm_sd_v15_v2.ckpt", frames=16, steps=steps, seed=11)
    assert post_json(server, "/animatediff_suite/preview_settings",
                     {"client_id": server.client_id, "enabled": True, "fps": 30}) == (200, {"enabled": True, "fps": 30})
    prompt_id, previews = run_watching_previews(server, nodes)
    assert {(m["node_id"], m["display_node_id"], m["prompt_id"]) for m, _ in previews} == {("7", "7", prompt_id)}
    assert len(previews) > steps + 2, len(previews)  # more than one still per step
    sizes = {Image.open(bytes_io.BytesIO(data)).size for _, data in previews}
    assert sizes == {(512, 512)}  # latent2rgb previews of the 8x8 latent, scaled to --preview-size
    assert len({data for _, data in previews}) > steps  # frames of the clip, not one still repeated
    assert post_json(server, "/animatediff_suite/preview_settings",
                     {"client_id": server.client_id, "enabled": False}) == (200, {"enabled": False, "fps": 8})
    try:
        _, still = run_watching_previews(server, graph(motion="mm_sd_v15_v2.ckpt", frames=16, steps=steps, seed=12))
    finally:
        post_json(server, "/animatediff_suite/preview_settings", {"client_id": server.client_id, "enabled": True})
    assert len(still) == steps  # the stock preview only: one still per step
    status, answer = post_json(server, "/animatediff_suite/preview_settings", {"client_id": server.client_id, "fps": 99})
    assert status == 400 and "fps must be an integer from 1 to 30, got 99" in answer["error"]


def test_web_extension_is_served(server):
    extensions = server.get("/extensions")
    for script in ("/animatediff_suite.js", "/ade_import.js", "/animated_preview.js"):
        assert any(path.endswith(script) for path in extensions), extensions
    # the node help page where the editor asks for it: /extensions/<pack folder>/docs/<node id>.md
    prefix = next(path for path in extensions if path.endswith("/animatediff_suite.js"))[:-len("animatediff_suite.js")]
    with urllib.request.urlopen(f"{server.url}{prefix}docs/ADS_LoadMotionModel.md", timeout=30) as response:
        assert response.read().decode().startswith("# Load Motion Model (AnimateDiff)\n")


def test_ade_importer_writes_our_nodes_as_their_schemas_say(server):
    """The importer's table of this pack's nodes (sockets, widgets in the editor's order with the type
    of their socket, outputs) is what the running server reports for them: a widget of options is a
    COMBO socket, as the editor types it (a text widget's STRING socket does not take a combo's link)."""
    tables = runner.ade_importer().OUR_NODES
    object_info = server.get("/object_info")
    for node_type, (sockets, widgets, outputs) in tables.items():
        info = object_info[node_type]
        inputs = workflows._inputs(info)
        assert sockets == [(n, workflows._kind(s)) for n, s, _ in inputs
                           if workflows._kind(s) not in workflows.WIDGET_TYPES], node_type
        schema_widgets = [(n, workflows._kind(s)) for n, s, _ in inputs if workflows._kind(s) in workflows.WIDGET_TYPES]
        assert [(n, kind) for n, _, kind in widgets] == schema_widgets, node_type
        for name, value, kind in widgets:  # a placeholder of the widget's type
            expected = {"INT": int, "FLOAT": float, "BOOLEAN": bool}.get(kind, str)
            assert type(value) is expected, (node_type, name, value, kind)
        assert outputs == list(zip(info["output_name"], info["output"])), node_type


@pytest.mark.parametrize("name", ["GEN2_API", "GEN1_API", "VIEWS_API"])
def test_imported_ade_workflows_run(server, name):
    converted, _, _ = runner.ade_importer().convert(getattr(ade, name))
    entry = server.run(tiny(converted))
    frames = expected_frames(converted)
    assert frame_counts(server, entry) == {"webp": frames}
    if name == "GEN2_API":  # ADE's autoselect became auto; the node says what auto chose for a v2 model
        assert entry["outputs"]["17"]["text"] == ["beta_schedule auto: sqrt_linear (AnimateDiff) (v2)"]


def _post(server, path: str, body: bytes):
    request = urllib.request.Request(server.url + path, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_import_route_converts_the_editor_format_and_the_result_runs(server):
    status, answer = _post(server, "/animatediff_suite/import_ade", json.dumps({"workflow": ade.LEGACY_UI}).encode())
    assert status == 200 and answer["mapped"] == 3
    graph = workflows.ui_to_api(answer["workflow"], server.get("/object_info"))
    assert graph == ade.LEGACY_EXPECTED_API
    entry = server.run(tiny(graph))
    assert frame_counts(server, entry) == {"webp": 20}
    broken = {"workflow": {"nodes": [{"type": "KSampler"}], "links": []}}  # a node without an id
    for body in (b"{not json", json.dumps({"workflow": {"nodes": 3}}).encode(), json.dumps([1]).encode(),
                 json.dumps(broken).encode()):
        status, answer = _post(server, "/animatediff_suite/import_ade", body)
        assert status == 400 and answer["error"], answer


def test_more_frames_than_the_frame_limit_is_a_clear_execution_error(server):
    graph = tiny(runner.load_example("txt2vid_sd15"))
    graph["6"]["inputs"]["batch_size"] = 40  # mm_sd_v15_v2 covers 32 frames per pass
    with pytest.raises(runner.ComfyServerError) as raised:
        server.run(graph)
    (kind, details), = raised.value.messages
    assert kind == "execution_error" and details["node_id"] == "7"
    assert "40 frames in one pass" in details["exception_message"]
    assert "at most 32 frames" in details["exception_message"]

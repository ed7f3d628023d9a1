"""Bad input, everywhere a user can give it, through a real ComfyUI server over HTTP.

Each row: what the user sends, where it is caught (``queue``: refused by /prompt with node_errors;
``run``: the prompt fails with an execution_error), the node that reports it, and the words the
message must contain (it names the input and what was expected). After every row the server runs a
reference prompt (plain or animated) whose latents must equal, bit for bit, the same prompt run
when the server was fresh: nothing a bad prompt did survives into the next one.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from server_helpers import (executed, failure, graph, latents, refused, run_interrupted, start_server,
                            write_latent, write_motion_lora, write_motion_model)

pytestmark = pytest.mark.comfyui

# four reference prompts, run in turn so that consecutive ones always differ (ComfyUI re-runs the sampler)
REFERENCES = [("plain", 1), ("animated", 2), ("plain", 3), ("animated", 4)]


def reference_graph(kind: str, seed: int) -> dict:
    return graph(None if kind == "plain" else "v2.ckpt", seed=seed, prefix=f"ref_{kind}_{seed}")


@pytest.fixture(scope="module")
def server(comfyui, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    instance = start_server(comfyui, root)
    models = instance.folders["animatediff_models"]
    outside = root / "outside"
    outside.mkdir()
    write_motion_model(outside / "elsewhere.ckpt", "v2", seed=1)
    os.symlink(outside / "elsewhere.ckpt", models / "linked.ckpt")
    os.symlink(outside / "gone.ckpt", models / "dangling.ckpt")
    nan_model = {k: v.clone() for k, v in torch.load(models / "v2.ckpt").items()}
    next(v for k, v in nan_model.items() if k.endswith("proj_in.weight"))[0, 0] = float("nan")
    torch.save(nan_model, models / "nan_motion.ckpt")
    lora = torch.load(instance.folders["animatediff_motion_lora"] / "zoom.ckpt")
    next(iter(lora.values()))[0, 0] = float("inf")
    torch.save(lora, instance.folders["animatediff_motion_lora"] / "inf_lora.ckpt")
    huge = {k: v * 1e20 for k, v in torch.load(instance.folders["animatediff_motion_lora"] / "zoom.ckpt").items()}
    torch.save(huge, instance.folders["animatediff_motion_lora"] / "huge_lora.ckpt")  # finite, overflows fp32
    write_latent(root / "input" / "nan.latent", torch.full((16, 4, 8, 8), float("nan")))
    write_latent(root / "input" / "sd3.latent", torch.randn(16, 16, 8, 8))
    from PIL import Image
    Image.new("RGB", (64, 64), (200, 120, 40)).save(root / "input" / "hint.png")
    instance.fresh = {}
    for kind, seed in REFERENCES:  # the fresh server's answers, before any bad input
        instance.fresh[(kind, seed)] = latents(instance, instance.run(reference_graph(kind, seed)))
    instance.turn = 0
    yield instance
    instance.stop()


def still_fresh(server) -> None:
    """The next reference prompt gives exactly what the fresh server gave."""
    kind, seed = REFERENCES[server.turn % len(REFERENCES)]
    server.turn += 1
    entry = server.run(reference_graph(kind, seed))
    assert executed(entry, "7"), "the reference sampler was served from the cache; the check would be empty"
    assert torch.equal(latents(server, entry), server.fresh[(kind, seed)]), f"{kind} reference changed"


# -- the table -----------------------------------------------------------------------------------

def _set(node: str, **inputs):
    def change(nodes, server):
        nodes[node]["inputs"].update(inputs)
        return nodes
    return change


def _with(extra: dict, **links):
    """Add nodes and rewire inputs: links = {"7.latent_image": ["20", 0]}."""
    def change(nodes, server):
        nodes.update(json.loads(json.dumps(extra)))
        for target, link in links.items():
            node, name = target.split(".")
            nodes[node]["inputs"][name] = link
        return nodes
    return change


def _sdxl_model_sd15_motion(nodes, server):
    return graph("v2.ckpt", family="SDXL")


def _context(**inputs):
    def change(nodes, server):
        return graph("v2.ckpt", frames=nodes["6"]["inputs"]["batch_size"], size=nodes["6"]["inputs"]["width"],
                     context=inputs)
    return change


NAN = float("nan")
INF = float("inf")
LOAD_NAN_LATENT = {"20": {"class_type": "LoadLatent", "inputs": {"latent": "nan.latent"}}}
LOAD_SD3_LATENT = {"20": {"class_type": "LoadLatent", "inputs": {"latent": "sd3.latent"}}}
NAN_CONDITIONING = {"21": {"class_type": "ConditioningAverage", "inputs": {
    "conditioning_to": ["4", 0], "conditioning_from": ["5", 0], "conditioning_to_strength": NAN}}}
NAN_HINT = {
    "22": {"class_type": "LoadImage", "inputs": {"image": "hint.png"}},
    "23": {"class_type": "ImageBlend", "inputs": {"image1": ["22", 0], "image2": ["22", 0], "blend_factor": NAN,
                                                  "blend_mode": "normal"}},
    "24": {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["4", 0], "negative": ["5", 0], "control_net": ["1", 4], "image": ["23", 0],
        "strength": 0.8, "start_percent": 0.0, "end_percent": 1.0}},
}

# (id, change of the base graph, stage, reporting node, words the message must contain)
CASES = [
    # model names that escape the folder
    ("name_dotdot", _set("2", model_name="../v2.ckpt"), "queue", "2",
     ["'../v2.ckpt' is not in models/animatediff_models"]),
    ("name_absolute", _set("2", model_name="/etc/passwd"), "queue", "2",
     ["'/etc/passwd' is not in models/animatediff_models"]),
    ("name_nul", _set("2", model_name="v2.ckpt\x00.png"), "queue", "2",
     ["is not in models/animatediff_models"]),
    ("name_dangling_symlink", _set("2", model_name="dangling.ckpt"), "queue", "2",
     ["motion model 'dangling.ckpt' is listed in models/animatediff_models but is not a readable file"]),
    ("lora_dotdot", _with({"12": {"class_type": "ADS_LoadMotionLora",
                                  "inputs": {"lora_name": "../animatediff_models/v2.ckpt", "strength": 1.0}}},
                          **{"3.motion_lora": ["12", 0]}), "queue", "12",
     ["MotionLoRA '../animatediff_models/v2.ckpt' is not in models/animatediff_motion_lora"]),
    ("adapter_absolute", _set("3", domain_adapter="/etc/hosts"), "queue", "3",
     ["domain adapter '/etc/hosts' is not in models/loras"]),
    # sizes
    ("sdxl_motion_on_sd15", _set("2", model_name="sdxl.ckpt"), "run", "3",
     ["motion model 'sdxl.ckpt' is SDXL (3 down blocks) but the model is SD15"]),
    ("sd15_motion_on_sdxl", _sdxl_model_sd15_motion, "run", "3",
     ["motion model 'v2.ckpt' is SD1.5 (4 down blocks) but the model is SDXL"]),
    ("latent_of_other_family", _with(LOAD_SD3_LATENT, **{"7.latent_image": ["20", 0]}), "run", "7",
     ["the latent has 16 channels", "4-channel latents"]),
    ("resolution_beyond_memory", _set("6", width=16384, height=16384, batch_size=1), "run", "7",
     ["1 frames at 16384x16384 need about", "GiB this device", "add Context Options"]),
    ("frames_beyond_memory", _context(scope="motion_attention"), "run", "7",
     ["4096 frames at 512x512 need about", "GiB this device", "4096 frames through the UNet",
      "set Context Options' scope to whole_model"]),
    ("frames_beyond_frame_limit", _set("6", batch_size=40), "run", "7",
     ["40 frames in one pass", "at most 32 frames"]),
    # absurd widget values over the API
    ("batch_negative", _set("6", batch_size=-3), "queue", "6", ["batch_size"]),
    ("motion_scale_nan", _set("3", motion_scale=NAN), "queue", "3", ["motion_scale = nan is not a finite number"]),
    ("motion_scale_huge", _set("3", motion_scale=1e9), "queue", "3",
     ["motion_scale = 1000000000.0 is above the maximum 10.0"]),
    ("motion_scale_string", _set("3", motion_scale="fast"), "queue", "3", ["motion_scale", "fast"]),
    ("percent_order", _set("3", start_percent=0.8, end_percent=0.2), "queue", "3",
     ["start_percent (0.8) must not be greater than end_percent (0.2)"]),
    ("beta_schedule_unknown", _set("3", beta_schedule="cosine"), "queue", "3",
     ["beta_schedule = 'cosine' is not one of"]),
    ("lora_strength_inf", _with({"12": {"class_type": "ADS_LoadMotionLora",
                                        "inputs": {"lora_name": "zoom.ckpt", "strength": INF}}},
                                **{"3.motion_lora": ["12", 0]}), "queue", "12",
     ["strength = inf is not a finite number"]),
    ("context_length_negative", _context(context_length=-5), "queue", "13",
     ["context_length = -5 is below the minimum 1"]),
    ("context_length_huge", _context(context_length=10 ** 9), "queue", "13",
     ["context_length = 1000000000 is above the maximum 128"]),
    ("context_overlap_too_big", _context(context_overlap=16), "queue", "13",
     ["context_overlap (16) must be less than context_length (16)"]),
    ("fuse_method_unknown", _context(fuse_method="average"), "queue", "13",
     ["fuse_method = 'average' is not one of"]),
    ("free_init_zero", _with({"14": {"class_type": "ADS_FreeInit", "inputs": {
        "model": ["3", 0], "iterations": 0, "filter": "butterworth", "spatial_stop": 0.25, "temporal_stop": 0.25,
        "butterworth_order": 4, "fast_sampling": False}}}, **{"7.model": ["14", 0]}), "queue", "14",
     ["iterations = 0 is below the minimum 1"]),
    ("free_init_filter_unknown", _with({"14": {"class_type": "ADS_FreeInit", "inputs": {
        "model": ["3", 0], "iterations": 2, "filter": "lanczos", "spatial_stop": 0.25, "temporal_stop": 0.25,
        "butterworth_order": 4, "fast_sampling": False}}}, **{"7.model": ["14", 0]}), "queue", "14",
     ["filter = 'lanczos' is not one of"]),
    ("travel_frames_string", _with({"4": {"class_type": "ADS_PromptTravel", "inputs": {
        "clip": ["1", 1], "text": "0: a fox\n8: a wolf", "frames": "many", "interpolation": "linear"}}}),
     "queue", "4", ["frames", "many"]),
    ("travel_frames_mismatch", _with({"4": {"class_type": "ADS_PromptTravel", "inputs": {
        "clip": ["1", 1], "text": "0: a fox\n8: a wolf", "frames": 12, "interpolation": "linear"}}}),
     "run", "7", ["positive conditioning has 12 entries", "the latent has 16 frames"]),
    # NaN / Inf
    ("nan_latent", _with(LOAD_NAN_LATENT, **{"7.latent_image": ["20", 0]}), "run", "7",
     ["the latent image given to the sampler contains NaN or Inf"]),
    ("nan_conditioning", _with(NAN_CONDITIONING, **{"7.positive": ["21", 0]}), "run", "7",
     ["the positive conditioning (entry 1, cross_attn) contains NaN or Inf"]),
    ("nan_controlnet_hint", _with(NAN_HINT, **{"7.positive": ["24", 0], "7.negative": ["24", 1]}), "run", "7",
     ["the hint image of a ControlNet in the positive conditioning contains NaN or Inf"]),
    ("nan_motion_weights", _set("2", model_name="nan_motion.ckpt"), "run", "2",
     ["'nan_motion.ckpt': weights contain NaN or Inf values", "proj_in.weight"]),
    ("inf_lora_weights", _with({"12": {"class_type": "ADS_LoadMotionLora",
                                       "inputs": {"lora_name": "inf_lora.ckpt", "strength": 1.0}}},
                               **{"3.motion_lora": ["12", 0]}), "run", "12",
     ["'inf_lora.ckpt': MotionLoRA weights contain NaN or Inf values"]),
    ("overflow_during_sampling", _with({"12": {"class_type": "ADS_LoadMotionLora",
                                               "inputs": {"lora_name": "huge_lora.ckpt", "strength": 1.0}}},
                                       **{"3.motion_lora": ["12", 0]}), "run", "7",
     ["sampling produced NaN or Inf latents although every input was finite"]),
]


def _base(case_id: str) -> dict:
    if case_id == "frames_beyond_memory":
        return graph("v2.ckpt", frames=4096, size=512)
    return graph("v2.ckpt", prefix=case_id)


@pytest.mark.parametrize("case_id, change, stage, node, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_message_and_the_next_prompt_runs(server, case_id, change, stage, node, words):
    nodes = change(_base(case_id), server)
    if stage == "queue":
        node_errors = refused(server, nodes)
        assert list(node_errors) == [node], node_errors
        text = json.dumps(node_errors[node])
    else:
        kind, data = failure(server.wait(server.queue(nodes)))
        assert kind == "execution_error" and data["node_id"] == node, data
        text = data["exception_message"]
    for word in words:
        assert word in text, f"{word!r} not in {text}"
    still_fresh(server)


# -- files that change under the server ------------------------------------------------------------

def _block(server, seconds_of_work: int = 12):
    """Queue a slow prompt so that what is queued next waits behind it."""
    return server.queue(graph("v3.ckpt", frames=48, steps=seconds_of_work, context={}, prefix="slow"))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


@pytest.mark.parametrize("change, words", [
    (lambda path: path.unlink(), " is not in models/animatediff_models any more"),
    (_truncate, ": truncated or corrupt checkpoint"),
], ids=["deleted", "replaced_by_garbage"])
def test_file_changed_between_queue_and_run(server, change, words):
    name = f"victim_{server.turn}.ckpt"
    victim = server.folders["animatediff_models"] / name
    write_motion_model(victim, "v2", seed=7)
    slow = _block(server)
    waiting = server.queue(graph(name, prefix="victim"))  # validated now: the file is fine
    change(victim)
    server.wait(slow)
    kind, data = failure(server.wait(waiting))
    assert kind == "execution_error" and data["node_id"] == "2"
    assert f"'{name}'{words}" in data["exception_message"], data["exception_message"]
    still_fresh(server)


def test_file_changed_between_two_runs_is_read_again(server):
    """Same name, new weights: the loader runs again (no stale cache) and the result is the new file's."""
    models, loras = server.folders["animatediff_models"], server.folders["animatediff_motion_lora"]
    write_motion_model(models / "changing.ckpt", "v2", seed=11)
    write_motion_lora(loras / "changing_lora.ckpt", seed=5)
    write_motion_model(models / "new_weights.ckpt", "v2", seed=12)
    write_motion_lora(loras / "new_lora.ckpt", seed=6)

    def animated(motion, lora, prefix):
        nodes = graph(motion, lora_strength=0.7, prefix=prefix)
        nodes["12"]["inputs"]["lora_name"] = lora
        return latents(server, server.run(nodes))

    before = animated("changing.ckpt", "changing_lora.ckpt", "changing_before")
    shutil.copy(models / "new_weights.ckpt", models / "changing.ckpt")
    shutil.copy(loras / "new_lora.ckpt", loras / "changing_lora.ckpt")
    after = animated("changing.ckpt", "changing_lora.ckpt", "changing_after")
    expected = animated("new_weights.ckpt", "new_lora.ckpt", "changing_expected")
    assert torch.equal(after, expected)
    assert not torch.equal(after, before)
    still_fresh(server)


def test_symlink_to_a_file_outside_the_folder_loads_like_comfyui_does(server):
    """A symlink the user placed in a model folder is followed (ComfyUI's folder_paths lists it; people
    keep models on other drives); names sent over the API cannot escape (rows name_* above)."""
    linked = latents(server, server.run(graph("linked.ckpt", prefix="linked")))
    direct = latents(server, server.run(graph("v2.ckpt", seed=1, prefix="direct")))  # same weights (seed 1)
    assert torch.equal(linked, direct)
    still_fresh(server)


# -- sizes that work -------------------------------------------------------------------------------

def test_one_frame_and_fewer_frames_than_the_window(server):
    one = latents(server, server.run(graph("v2.ckpt", frames=1, prefix="one")))
    assert one.shape == (1, 4, 8, 8) and bool(torch.isfinite(one).all())
    short = latents(server, server.run(graph("v2.ckpt", frames=8, context={}, prefix="short_windowed")))
    plain = latents(server, server.run(graph("v2.ckpt", frames=8, prefix="short_plain")))
    assert torch.equal(short, plain)  # 8 frames < context_length 16: the unwindowed path, unchanged
    still_fresh(server)


def test_size_not_divisible_by_8_is_floored_like_comfyui(server):
    odd = graph("v2.ckpt", prefix="odd")
    odd["6"]["inputs"].update(width=100, height=68)
    even = graph("v2.ckpt", prefix="even")
    even["6"]["inputs"].update(width=96, height=64)
    odd_latents, even_latents = (latents(server, server.run(g)) for g in (odd, even))
    assert odd_latents.shape == (16, 4, 8, 12)
    assert torch.equal(odd_latents, even_latents)
    still_fresh(server)


# -- interrupts in every sampling stage ------------------------------------------------------------

STAGES = {
    # (graph, progress value at which /interrupt is posted)
    "inside_a_window": (lambda: graph("v2.ckpt", frames=64, steps=6, context={}, prefix="int_windows"), 7),
    "during_free_init_second_pass": (lambda: graph("v2.ckpt", frames=16, steps=6, free_init=3, prefix="int_fi"), 7),
    "inside_windowed_attention": (lambda: graph("v2.ckpt", frames=48, steps=6, prefix="int_fn",
                                                context={"scope": "motion_attention",
                                                         "noise_type": "shuffle_context"}), 2),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_interrupt_leaves_nothing_behind(server, stage):
    make, at_value = STAGES[stage]
    kind, data = failure(run_interrupted(server, make(), at_value))
    assert kind == "execution_interrupted" and data["node_id"] == "7", data
    still_fresh(server)


def test_estimate_is_comfyuis_activation_estimate_plus_attention_scores():
    """The memory estimate's formula, written out: 2 * positions * heads * frames^2 * 4 bytes for the
    temporal attention scores (scores + softmax, fp32)."""
    from animatediff_suite.motion_modules.memory import temporal_attention_bytes

    assert temporal_attention_bytes(positions=64 * 64, frames=16) == 2 * 4096 * 8 * 256 * 4
    assert temporal_attention_bytes(positions=10, frames=3, heads=2, chunks=2, dtype_bytes=2) == 2 * 2 * 10 * 2 * 9 * 2
    assert math.isclose(temporal_attention_bytes(64 * 64, 1024) / temporal_attention_bytes(64 * 64, 16), 64 ** 2)

"""Training over the HTTP API of a real ComfyUI server: upload a clip, train a MotionLoRA from it and
animate with it in the same prompt; the latents equal the same sampling done in-process with the
file the server wrote (so the prompt used exactly the LoRA it trained)."""

import json
import urllib.request
import uuid

import pytest
import torch

from server_helpers import graph, latents, start_server, write_motion_model

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def server(comfyui, tmp_path_factory):
    instance = start_server(comfyui, tmp_path_factory.mktemp("train_server"))
    yield instance
    instance.stop()


def upload(server, path, name: str) -> dict:
    """POST /upload/image (ComfyUI's upload route for any input file) as the frontend does."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            f"Content-Type: video/mp4\r\n\r\n").encode() + path.read_bytes() + \
        f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\ntrue\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(server.url + "/upload/image", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_train_a_motionlora_from_an_uploaded_clip_and_animate_with_it_in_one_prompt(server, tmp_path):
    import comfy.model_management as mm
    import nodes
    from safetensors.torch import load_file

    from animatediff_suite.motion_modules import load_lora
    from animatediff_suite.nodes import demo
    from animatediff_suite.nodes.injection import MotionLoraEntry, apply_motion, load_motion_patcher
    from animatediff_suite.nodes.beta_schedules import resolve_schedule
    from animatediff_suite.training.synthetic import write_moving_shapes

    (clip_path, caption, _), = write_moving_shapes(str(tmp_path), 1, frames=12, size=64, seed=2)
    assert upload(server, tmp_path / "clip_000.mp4", "ball.mp4")["name"] == "ball.mp4"

    prompt = graph(motion="v2.ckpt", frames=8, steps=2)
    prompt["20"] = {"class_type": "LoadVideo", "inputs": {"file": "ball.mp4"}}
    prompt["21"] = {"class_type": "GetVideoComponents", "inputs": {"video": ["20", 0]}}
    prompt["22"] = {"class_type": "ADS_TrainMotionLora", "inputs": {
        "model": ["1", 0], "motion_model": ["2", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["21", 0],
        "caption": caption, "frames_per_clip": 0, "name": "from_upload", "steps": 3, "learning_rate": 0.01,
        "rank": 4, "frames": 8, "stride": 1, "width": 64, "height": 64, "seed": 0,
        "gradient_checkpointing": True, "resume": False, "strength": 1.0}}
    prompt["3"]["inputs"]["motion_lora"] = ["22", 0]
    entry = server.run(prompt)
    served = latents(server, entry)
    lora_path = server.folders["animatediff_motion_lora"] / "from_upload.safetensors"
    assert load_file(str(lora_path)).keys()  # the trained file is where Load MotionLoRA lists it

    # the same sampling in-process, with the file the server wrote
    motion_path = tmp_path / "v2.ckpt"
    write_motion_model(motion_path, "v2", seed=1)  # what start_server wrote as v2.ckpt
    motion = load_motion_patcher(str(motion_path), "v2.ckpt")
    model, clip = demo.tiny_model(0), demo.tiny_clip(0)
    entry_lora = MotionLoraEntry("from_upload.safetensors", load_lora(str(lora_path)), 1.0)
    animated = apply_motion(model, motion, loras=[entry_lora], schedule=resolve_schedule("auto", motion.spec))
    positive = nodes.CLIPTextEncode().encode(clip, "a fox running")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    local = nodes.common_ksampler(animated, 1, 2, 7.0, "euler", "normal", positive, negative,
                                  {"samples": torch.zeros(8, 4, 8, 8)})[0]["samples"]
    mm.load_models_gpu([model])
    torch.testing.assert_close(served, local, rtol=1e-4, atol=1e-4)
    without = nodes.common_ksampler(apply_motion(model, motion, schedule=resolve_schedule("auto", motion.spec)),
                                    1, 2, 7.0, "euler", "normal", positive, negative,
                                    {"samples": torch.zeros(8, 4, 8, 8)})[0]["samples"]
    assert float((served - without).abs().max()) > 1e-3  # the trained LoRA changed the sampling

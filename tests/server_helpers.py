"""Helpers for tests that drive a real ComfyUI server over HTTP: tiny model files, graphs whose
latents come back bit-exact (SaveLatent), interrupts at a chosen progress value, the server's RSS."""

from __future__ import annotations

import asyncio
import json
import os
import struct

import torch
from safetensors.torch import load_file, save_file

from ads_helpers import make_spec, motion_lora_state_dict, original_state_dict, random_model
from ads_package import load_module

runner = load_module("ads_runner", "__main__.py")
FOLDERS = ("animatediff_models", "animatediff_motion_lora", "loras")


def write_motion_model(path, version: str = "v2", seed: int = 1) -> None:
    from animatediff_suite.nodes.demo import TINY_CHANNELS, TINY_SDXL_CHANNELS

    channels = TINY_SDXL_CHANNELS if version in ("sdxl_beta", "hotshotxl") else TINY_CHANNELS
    torch.save(original_state_dict(random_model(make_spec(version, channels=channels), seed=seed)), str(path))


def write_motion_lora(path, seed: int = 4) -> None:
    from animatediff_suite.nodes.demo import TINY_CHANNELS

    torch.save(motion_lora_state_dict(make_spec("v2", channels=TINY_CHANNELS), seed=seed), str(path))


def start_server(comfyui: str, root, extra_args=()):
    """A private ComfyUI with the pack, model folders under ``root`` and tiny motion files in them:
    v2.ckpt, v3.ckpt, sdxl.ckpt (motion models) and zoom.ckpt (MotionLoRA)."""
    root.mkdir(parents=True, exist_ok=True)
    folders = {name: root / name for name in FOLDERS}
    for folder in folders.values():
        folder.mkdir(exist_ok=True)
    write_motion_model(folders["animatediff_models"] / "v2.ckpt", "v2", seed=1)
    write_motion_model(folders["animatediff_models"] / "v3.ckpt", "v3", seed=2)
    write_motion_model(folders["animatediff_models"] / "sdxl.ckpt", "sdxl_beta", seed=3)
    write_motion_lora(folders["animatediff_motion_lora"] / "zoom.ckpt")
    (root / "input").mkdir(exist_ok=True)
    server = runner.ComfyServer.start(
        comfyui, str(root), ["--cpu", "--input-directory", str(root / "input"),
                             "--output-directory", str(root / "output"), *extra_args],
        model_folders={k: str(v) for k, v in folders.items()})
    server.root = root
    server.folders = folders
    return server


def graph(motion: str | None = "v2.ckpt", frames: int = 16, seed: int = 1, steps: int = 2, size: int = 64,
          family: str = "SD1.5", lora_strength: float | None = None, context: dict | None = None,
          travel: str | None = None, free_init: int = 1, prefix: str = "lat") -> dict:
    """A tiny txt2vid graph ending in SaveLatent (node "9"): sampler "7", Apply "3", loader "2"."""
    nodes = {
        "1": {"class_type": "ADS_TinyDemoModels", "inputs": {
            "seed": 0, "family": family, "motion_version": "v3" if family == "SD1.5" else "sdxl_beta"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a fox running"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": frames}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0],
            "denoise": 1.0}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": prefix}},
    }
    if motion is None:
        return nodes
    nodes["2"] = {"class_type": "ADS_LoadMotionModel", "inputs": {"model_name": motion}}
    nodes["3"] = {"class_type": "ADS_ApplyMotionModel", "inputs": {
        "model": ["1", 0], "motion_model": ["2", 0], "beta_schedule": "auto", "motion_scale": 1.0}}
    nodes["7"]["inputs"]["model"] = ["3", 0]
    if lora_strength is not None:
        nodes["12"] = {"class_type": "ADS_LoadMotionLora", "inputs": {"lora_name": "zoom.ckpt",
                                                                     "strength": lora_strength}}
        nodes["3"]["inputs"]["motion_lora"] = ["12", 0]
    if context is not None:
        nodes["13"] = {"class_type": "ADS_ContextOptions", "inputs": {
            "context_length": 16, "context_overlap": 4, "context_stride": 1, "closed_loop": False,
            "schedule": "standard_static", "fuse_method": "pyramid", **context}}
        nodes["3"]["inputs"]["context_options"] = ["13", 0]
    if travel is not None:
        nodes["4"] = {"class_type": "ADS_PromptTravel", "inputs": {
            "clip": ["1", 1], "text": travel, "frames": frames, "interpolation": "linear"}}
    if free_init > 1:
        nodes["14"] = {"class_type": "ADS_FreeInit", "inputs": {
            "model": ["3", 0], "iterations": free_init, "filter": "butterworth", "spatial_stop": 0.25,
            "temporal_stop": 0.25, "butterworth_order": 4, "fast_sampling": False}}
        nodes["7"]["inputs"]["model"] = ["14", 0]
    return nodes


def latents(server, entry) -> torch.Tensor:
    """The tensor SaveLatent wrote for a finished prompt."""
    files = [f for f in runner.output_files(entry) if f["filename"].endswith(".latent")]
    assert len(files) == 1, files
    path = os.path.join(server.root, "output", files[0].get("subfolder", ""), files[0]["filename"])
    return load_file(path)["latent_tensor"]


def write_latent(path, tensor: torch.Tensor) -> None:
    """A .latent file LoadLatent reads as is (format version 0: no rescaling)."""
    save_file({"latent_tensor": tensor.contiguous(), "latent_format_version_0": torch.tensor([])}, str(path))


def executed(entry, node_id: str) -> bool:
    """True when ``node_id`` ran in this prompt (was not taken from ComfyUI's cache)."""
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_cached" and node_id in data.get("nodes", []):
            return False
    return True


def failure(entry) -> tuple[str, dict]:
    """(message type, data) of a prompt that ended in an error or an interrupt."""
    assert entry["status"]["status_str"] == "error", entry["status"]
    kind, data = next(m for m in entry["status"]["messages"]
                      if m[0] in ("execution_error", "execution_interrupted"))
    return kind, data


def refused(server, nodes: dict) -> dict:
    """node_errors of a prompt the server refuses at queue time (fails if it is accepted)."""
    try:
        prompt_id = server.queue(nodes)
    except runner.ComfyServerError as error:
        return error.detail.get("node_errors") or {"prompt": error.detail.get("error")}
    raise AssertionError(f"prompt {prompt_id} was accepted; expected a queue-time refusal")


def run_interrupted(server, nodes: dict, at_value: int, node: str = "7", timeout: float = 300) -> dict:
    """Queue ``nodes``, POST /interrupt once ``node`` reports progress ``>= at_value`` (websocket), and
    return the finished history entry."""
    import aiohttp

    async def go():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{server.url}/ws?clientId={server.client_id}") as ws:
                prompt_id = server.queue(nodes)
                async with asyncio.timeout(timeout):
                    async for message in ws:
                        if message.type != aiohttp.WSMsgType.TEXT:
                            continue
                        data = json.loads(message.data)
                        body = data.get("data", {})
                        if body.get("prompt_id") not in (None, prompt_id):
                            continue
                        if data["type"] == "progress" and body.get("node") == node and body["value"] >= at_value:
                            async with session.post(f"{server.url}/interrupt") as response:
                                assert response.status == 200
                            break
                        if data["type"] in ("execution_error", "execution_success"):
                            raise AssertionError(f"the prompt ended before progress reached {at_value}: {data}")
                return prompt_id

    return server.wait(asyncio.run(go()))


def run_watching_previews(server, nodes: dict, timeout: float = 300) -> tuple[str, list]:
    """Queue ``nodes`` with a websocket client that announces preview metadata support, as the
    frontend does; returns (prompt id, [(metadata, image bytes)] of every preview sent for it)."""
    import aiohttp

    async def go():
        previews = []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{server.url}/ws?clientId={server.client_id}") as ws:
                await ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
                await asyncio.sleep(0.2)
                prompt_id = server.queue(nodes)
                async with asyncio.timeout(timeout):
                    async for message in ws:
                        if message.type == aiohttp.WSMsgType.BINARY:
                            kind, = struct.unpack(">I", message.data[:4])
                            if kind == 4:  # PREVIEW_IMAGE_WITH_METADATA
                                length, = struct.unpack(">I", message.data[4:8])
                                previews.append((json.loads(message.data[8:8 + length]), message.data[8 + length:]))
                            continue
                        data = json.loads(message.data)
                        if data["type"] in ("execution_error", "execution_success", "execution_interrupted") \
                                and data["data"].get("prompt_id") == prompt_id:
                            break
        return prompt_id, [p for p in previews if p[0].get("prompt_id") == prompt_id]

    prompt_id, previews = asyncio.run(go())
    server.wait(prompt_id)
    return prompt_id, previews


def post_json(server, path: str, body) -> tuple[int, dict]:
    """POST ``body`` as JSON; (status, answer)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def rss_bytes(server) -> int:
    import psutil

    return psutil.Process(server.process.pid).memory_info().rss

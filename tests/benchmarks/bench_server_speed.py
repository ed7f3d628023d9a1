"""Sampling speed as a user gets it: a real ComfyUI server, models loaded from fp16 files.

The benchmark writes its own files (random weights, standard single-file layouts): a full-size SD1.5
checkpoint (UNet, CLIP-L, VAE) and a full-size v2 motion model, both fp16 safetensors, and reads them
once (page cache) so no variant is favoured by the disk. One server runs the variants round-robin,
``--rounds`` times: ``plain`` (no motion), ``pack`` (Load + Apply Motion Model), and ``peer`` with
``--peer /path/to/ComfyUI-AnimateDiff-Evolved`` (its Gen1 loader, autoselect schedule, in the same
server). Each prompt: CheckpointLoaderSimple, 16 frames at ``--size``, euler, cfg 7.5, ``--steps``
steps, VAE Decode, Preview Image.

Timing comes from the server's websocket messages: s/step is the median interval between
consecutive progress reports (steps 2..n of every run, so the first step's one-time costs stay out); node times are the intervals between ``executing``
messages, so the first round shows each motion loader's cold load and the sampler's first model load.
The table compares each step with the arithmetic floor, plain x (1 + motion FLOPs / UNet FLOPs),
counted with attention as matmuls. Needs COMFYUI_PATH; takes long on CPU.

    COMFYUI_PATH=/path/to/ComfyUI python tests/benchmarks/bench_server_speed.py [--size 256] \\
        [--variants plain pack peer] [--peer /path/to/ComfyUI-AnimateDiff-Evolved] [--rounds 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

CHECKPOINT = "bench_sd15_fp16.safetensors"
MOTION = "bench_mm_v2_fp16.safetensors"
VAE_CONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
              "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def _random_like(shapes: dict, seed: int) -> dict:
    """fp16 tensors: norm weights ~1, matrices ~N(0, 1/fan_in), other vectors small."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        shape = tuple(shape)
        if len(shape) >= 2:
            value = torch.randn(shape, generator=gen) / torch.Size(shape[1:]).numel() ** 0.5
        elif "norm" in key and key.endswith("weight"):
            value = 1 + 0.05 * torch.randn(shape, generator=gen)
        else:
            value = 0.02 * torch.randn(shape, generator=gen)
        out[key] = value.half()
    return out


def write_files(folder: str) -> None:
    """The SD1.5 checkpoint and the v2 motion model, unless they are there already."""
    import torch
    from safetensors.torch import save_file

    import comfy.sd1_clip
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL

    import bench_comfy_overhead as overhead
    from animatediff_suite.nodes import demo

    checkpoints, motion = os.path.join(folder, "checkpoints"), os.path.join(folder, "animatediff_models")
    os.makedirs(checkpoints, exist_ok=True)
    os.makedirs(motion, exist_ok=True)
    if not os.path.exists(os.path.join(checkpoints, CHECKPOINT)):
        with torch.device("meta"):
            config = comfy.supported_models.SD15({**demo.TINY_UNET, **overhead.FULL_UNET_OVERRIDES})
            unet = config.get_model({}).diffusion_model.state_dict()
            clip = comfy.sd1_clip.SDClipModel(device="meta").state_dict()
            vae = AutoencoderKL(ddconfig=VAE_CONFIG, embed_dim=4).state_dict()
        shapes = {f"model.diffusion_model.{k}": v.shape for k, v in unet.items()}
        shapes |= {f"cond_stage_model.{k}": v.shape for k, v in clip.items() if k.startswith("transformer.text_model.")}
        shapes |= {f"first_stage_model.{k}": v.shape for k, v in vae.items()}
        state = _random_like(shapes, 0)
        with torch.no_grad():  # noise predictions of roughly unit scale, as in the demo model
            state["model.diffusion_model.out.2.weight"] = (state["model.diffusion_model.out.2.weight"].float() * 30).half()
        save_file(state, os.path.join(checkpoints, CHECKPOINT))
    write_motion_model(motion)


def write_motion_model(folder: str) -> str:
    """The full-size v2 motion model (fp16 safetensors, original keys) as ``folder/MOTION``, unless it is there."""
    import ads_helpers
    from safetensors.torch import save_file

    path = os.path.join(folder, MOTION)
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        model = ads_helpers.random_model(ads_helpers.make_spec("v2", channels=ads_helpers.FULL_SD15), seed=1)
        save_file({k: v.half().contiguous() for k, v in ads_helpers.original_state_dict(model).items()}, path)
    return path


def graph(variant: str, size: int, steps: int, seed: int) -> dict:
    nodes = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a fox running in the snow"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 16}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": seed, "steps": steps, "cfg": 7.5, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0],
            "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    if variant == "pack":
        nodes["2"] = {"class_type": "ADS_LoadMotionModel", "inputs": {"model_name": MOTION}}
        nodes["3"] = {"class_type": "ADS_ApplyMotionModel", "inputs": {
            "model": ["1", 0], "motion_model": ["2", 0], "beta_schedule": "auto"}}
        nodes["7"]["inputs"]["model"] = ["3", 0]
    elif variant == "peer":
        nodes["3"] = {"class_type": "ADE_AnimateDiffLoaderGen1", "inputs": {
            "model": ["1", 0], "model_name": MOTION, "beta_schedule": "autoselect"}}
        nodes["7"]["inputs"]["model"] = ["3", 0]
    return nodes


def timed_run(server, nodes: dict, timeout: float = 7200) -> dict:
    """Queue ``nodes`` and time it from the websocket: progress stamps of the sampler and node spans."""
    import asyncio

    import aiohttp

    async def go():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{server.url}/ws?clientId={server.client_id}") as ws:
                prompt_id = server.queue(nodes)
                progress, spans, current, started = [], {}, None, time.perf_counter()
                async with asyncio.timeout(timeout):
                    async for message in ws:
                        if message.type != aiohttp.WSMsgType.TEXT:
                            continue
                        data = json.loads(message.data)
                        body, now = data.get("data", {}), time.perf_counter()
                        if body.get("prompt_id") not in (None, prompt_id):
                            continue
                        if data["type"] == "progress" and body.get("node") == "7":
                            progress.append(now)
                        elif data["type"] == "executing":
                            if current is not None:
                                spans[current[0]] = now - current[1]
                            if body.get("node") is None:
                                return {"progress": progress, "spans": spans, "total": now - started}
                            current = (body["node"], now)
                        elif data["type"] in ("execution_error", "execution_interrupted"):
                            raise RuntimeError(f"prompt failed: {json.dumps(body)[:2000]}")

    return asyncio.run(go())


def median(values):
    values = sorted(values)
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def flop_ratio(size: int) -> float:
    """Motion FLOPs / UNet FLOPs per frame (full SD1.5 width, full v2), counted with torch's flop counter
    on one forward each with attention written as matmuls (ComfyUI's ``attention_basic``, the core's
    ``naive`` backend), so that the attention FLOPs are counted too (fused kernels are not)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import comfy.ldm.modules.attention as attention
    import comfy.supported_models

    import bench_comfy_overhead as overhead
    from animatediff_suite.motion_modules import MotionModel, MotionSpec
    from animatediff_suite.nodes import demo

    side, frames = size // 8, 16
    config = comfy.supported_models.SD15({**demo.TINY_UNET, **overhead.FULL_UNET_OVERRIDES})
    config.set_inference_dtype(torch.float32, None)
    unet = config.get_model({}).diffusion_model
    fused, attention.optimized_attention = attention.optimized_attention, attention.attention_basic
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(torch.randn(1, 4, side, side), torch.full((1,), 500.0), context=torch.randn(1, 77, 768))
    finally:
        attention.optimized_attention = fused
    unet_per_frame = counter.get_total_flops()
    del unet
    motion = MotionModel(MotionSpec.standard("v2", (320, 640, 1280, 1280)), zero_init=False).set_attention_backend("naive")
    level = {"down_blocks": lambda i: i, "mid_block": lambda i: 3, "up_blocks": lambda i: 3 - i}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        for spec, (_, module) in zip(motion.spec.modules, motion.named_temporal_modules()):
            reduced = side // 2 ** level[spec.kind](spec.block_index)
            module(torch.randn(frames, spec.channels, reduced, reduced), frames)
    return counter.get_total_flops() / frames / unet_per_frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--variants", nargs="+", default=["plain", "pack"])
    parser.add_argument("--peer", help="a ComfyUI-AnimateDiff-Evolved checkout, for the 'peer' variant")
    parser.add_argument("--workdir", help="where the model files and server folders go (default: a temp dir)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    comfyui = os.environ.get("COMFYUI_PATH")
    if not comfyui:
        sys.exit("set COMFYUI_PATH=/path/to/ComfyUI")
    if "peer" in args.variants and not args.peer:
        sys.exit("the peer variant needs --peer /path/to/ComfyUI-AnimateDiff-Evolved")
    import comfy_env

    comfy_env.import_comfyui(comfyui)
    import ads_package

    ads_package.register()
    runner = ads_package.load_module("ads_runner", "__main__.py")
    workdir = args.workdir or tempfile.mkdtemp(prefix="ads_bench_server_")
    models = os.path.join(workdir, "models")
    started = time.perf_counter()
    write_files(models)
    print(f"files written in {time.perf_counter() - started:.0f} s under {models}", flush=True)
    for folder in ("checkpoints", "animatediff_models"):  # in the page cache for every variant alike
        for name in os.listdir(os.path.join(models, folder)):
            with open(os.path.join(models, folder, name), "rb") as handle:
                while handle.read(1 << 24):
                    pass
    ratio = flop_ratio(args.size)
    run_dir = tempfile.mkdtemp(prefix="server_", dir=workdir)
    if "peer" in args.variants:
        os.makedirs(os.path.join(run_dir, "custom_nodes"), exist_ok=True)
        os.symlink(os.path.abspath(args.peer), os.path.join(run_dir, "custom_nodes", "ComfyUI-AnimateDiff-Evolved"))
    folders = {name: os.path.join(models, name) for name in ("checkpoints", "animatediff_models")}
    server = runner.ComfyServer.start(comfyui, run_dir, ["--cpu", "--output-directory", os.path.join(run_dir, "out"),
                                                         "--temp-directory", os.path.join(run_dir, "temp")],
                                      model_folders=folders)
    runs = {variant: [] for variant in args.variants}
    try:
        for number in range(args.rounds):
            for variant in args.variants:
                runs[variant].append(timed_run(server, graph(variant, args.size, args.steps, seed=number + 1)))
                print(f"round {number + 1} {variant}: {runs[variant][-1]['total']:.1f} s", flush=True)
    finally:
        server.stop()
    print(f"SD1.5 fp16 checkpoint + v2 fp16 motion model from files, 16 frames at {args.size}x{args.size}, euler, "
          f"cfg 7.5, {args.steps} steps, {args.rounds} rounds round-robin in one server, CPU ({os.cpu_count()} cores); "
          f"motion/UNet FLOPs {ratio:.3f}")
    print("| variant | s/step (median) | vs plain | vs floor | motion loader s (cold / warm) | "
          "sampler outside steps s (first / later) | VAE decode s |")
    print("|---|---|---|---|---|---|---|")
    per_step = {variant: median([b - a for run in rs for a, b in zip(run["progress"], run["progress"][1:])])
                for variant, rs in runs.items()}
    plain = per_step.get("plain")
    for variant, rs in runs.items():
        step = per_step[variant]
        vs_plain = step / plain if plain else float("nan")
        vs_floor = step / (plain * (1 + ratio)) if plain and variant != "plain" else float("nan")
        loader_node = {"pack": "2", "peer": "3"}.get(variant)
        loader = [run["spans"].get(loader_node, 0.0) for run in rs] if loader_node else [0.0]
        outside = [run["spans"]["7"] - args.steps * step for run in rs]
        decode = median([run["spans"].get("8", 0.0) for run in rs])
        print(f"| {variant} | {step:.2f} | {vs_plain:.2f} | {vs_floor:.2f} | {loader[0]:.1f} / "
              f"{median(loader[1:] or [0.0]):.1f} | {outside[0]:.1f} / {median(outside[1:] or [0.0]):.1f} | "
              f"{decode:.1f} |", flush=True)


if __name__ == "__main__":
    main()

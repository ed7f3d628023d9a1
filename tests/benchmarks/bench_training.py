"""Training speed and memory: this pack's trainer vs a reference loop of the original recipe.

    COMFYUI_PATH=/path/to/ComfyUI python -P tests/benchmarks/bench_training.py [--width tiny|sd15] \\
        [--frames 16 24 32] [--batch 1] [--steps 3] [--runs reference "pack plain" "pack ckpt"] \\
        [--device cpu|cuda] [--precision fp32|bf16] [--profile]

Each row is one fresh process (so the peak memory is its own): mode ``motion_module`` (every motion
parameter trains, the original recipe) on random weights at 256x256, after one warm-up step:

- ``pack ckpt`` / ``pack plain``: ``training.Trainer`` with and without gradient checkpointing,
  through ComfyUI's UNet, guider and weight handling;
- ``reference``: diffusers ``UNetMotionModel`` (the same UNet and v2 motion-module sizes), only the
  motion parameters trainable, AdamW, epsilon MSE, no checkpointing, the clip VAE-encoded every step
  (a diffusers VAE the size of the pack's demo VAE, which the pack's rows use): the original train.py's
  loop. (The noising here is a plain x + noise: the same arithmetic cost as the scheduler's.)

``--mode semantic_motion_predictor`` makes the pack's rows train StoryDiffusion's Semantic Motion
Predictor at the paper's size (8 layers x 1024, 16 heads, 4 tokens of 1024 per frame into every
cross-attention layer, image embeddings of 1024 as ViT-H-14's) on the frozen animated model; its image
encoder is a tiny CLIP vision model with 1024-feature embeddings (the real ViT-H-14 adds its own cost, once
per clip drawn and none with ``[data] cache``). The reference row stays the motion-module recipe.

Columns: seconds per step (median), and the peak resident memory above the process's RSS after the
models were built (Linux VmHWM, reset then), i.e. activations, gradients and optimizer state. Ratios
are to the reference row of the same frame count, measured in the same run.

``--device cuda`` runs every row on the GPU (ComfyUI without ``--cpu``): the steps are timed after a
``torch.cuda.synchronize()``, and the memory column is the peak of ``torch.cuda.max_memory_allocated``
above what was allocated after the warm-up step. ``--precision bf16`` computes both loops under bf16
autocast (the pack's ``[train] precision``; weights and AdamW's moments stay fp32 in both). Both loops
use torch's AdamW (the pack's ``optimizer = "adamw"``, not 8-bit), so the optimizers match.

``--profile`` prints, under each row, torch.profiler's operator table over its measured steps (by GPU
time on the GPU, by CPU time on the CPU): where a row's time goes, e.g. why one loop is slower.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
WIDTHS = {"tiny": (32, 64, 64, 64), "sd15": (320, 640, 1280, 1280)}
CONTEXT = {"tiny": 32, "sd15": 768}
KINDS = ("reference", "pack plain", "pack ckpt")


def high_water_mark() -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        return int(next(line for line in handle if line.startswith("VmHWM:")).split()[1]) * 1024


def resident() -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        return int(next(line for line in handle if line.startswith("VmRSS:")).split()[1]) * 1024


def on_cuda() -> bool:
    """Whether this row runs on the GPU (CUDA started by its models)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_initialized()


def reset_peak() -> int:
    import torch

    gc.collect()
    if on_cuda():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")
    return resident()


def peak() -> int:
    import torch

    if on_cuda():
        return torch.cuda.max_memory_allocated()
    return high_water_mark()


def synchronize() -> None:
    import torch

    if on_cuda():
        torch.cuda.synchronize()


class Profile:
    """``--profile``: torch.profiler over the measured steps (started after the warm-up step); ``table()``
    is its operator summary, sorted by GPU time on the GPU and by CPU time on the CPU."""

    def __init__(self, enabled: bool):
        self.enabled, self.profiler = enabled, None

    def start(self) -> None:
        import torch

        if self.enabled and self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if on_cuda():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.start()

    def table(self) -> str | None:
        if self.profiler is None:
            return None
        synchronize()
        self.profiler.stop()
        key = "self_cuda_time_total" if on_cuda() else "self_cpu_time_total"
        return self.profiler.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60)


def run_reference(width: str, frames: int, batch: int, steps: int, device: str = "cpu",
                  precision: str = "fp32", profile: Profile | None = None) -> dict:
    import contextlib

    import torch
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel, UNetMotionModel

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=32).eval().requires_grad_(False)  # the size of the pack's demo VAE
    channels = WIDTHS[width]
    unet2d = UNet2DConditionModel(
        sample_size=32, block_out_channels=channels, layers_per_block=2, cross_attention_dim=CONTEXT[width],
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    adapter = MotionAdapter(block_out_channels=channels, motion_layers_per_block=2,
                            motion_mid_block_layers_per_block=1, motion_num_attention_heads=8,
                            motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=True)
    unet = UNetMotionModel.from_unet2d(unet2d, adapter).to(device)
    vae = vae.to(device)
    unet.freeze_unet2d_params()
    trained = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4, weight_decay=1e-2)
    pixels = torch.rand(batch * frames, 3, 256, 256, device=device) * 2 - 1
    text = torch.randn(batch * frames, 77, CONTEXT[width], device=device)  # diffusers 0.42: per frame
    autocast = (torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    times = []
    base = None
    for step in range(steps + 1):
        if step == 1:
            base = reset_peak()
            if profile is not None:
                profile.start()
        synchronize()
        start = time.perf_counter()
        with torch.no_grad(), autocast:  # the original train.py encodes the clip every step
            latents = vae.encode(pixels).latent_dist.sample() * 0.18215
        x = latents.float().view(batch, frames, 4, 32, 32).transpose(1, 2)  # (b f) c h w -> b c f h w
        noise = torch.randn_like(x)
        t = torch.randint(0, 1000, (batch,), device=device)
        with autocast:
            pred = unet(x + noise, t, encoder_hidden_states=text).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        if step:
            times.append(time.perf_counter() - start)
    return {"seconds_per_step": statistics.median(times), "peak_bytes": peak() - base,
            "profile": None if profile is None else profile.table()}


def run_pack(width: str, frames: int, batch: int, steps: int, checkpointing: bool,
             mode: str = "motion_module", device: str = "cpu", precision: str = "fp32",
             profile: Profile | None = None) -> dict:
    import tempfile

    import torch

    sys.path.insert(0, TESTS)
    import comfy_env
    import ads_package

    comfy_env.import_comfyui(comfy_env.comfyui_path(), cpu=device == "cpu")
    ads_package.register()
    import comfy.model_management
    import comfy.model_patcher
    import comfy.ops
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.supported_models_base
    import folder_paths

    from animatediff_suite.motion_modules import MotionModel, MotionSpec
    from animatediff_suite.nodes import demo
    from animatediff_suite.nodes.injection import wrap_motion_model
    from animatediff_suite.training.config import config_from_dict
    from animatediff_suite.training.data import MemoryClips
    from animatediff_suite.training.trainer import BaseModels, Trainer

    channels = WIDTHS[width]
    unet_config = {**demo.TINY_UNET, "model_channels": channels[0],
                   "channel_mult": [c // channels[0] for c in channels], "context_dim": CONTEXT[width],
                   "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "num_head_channels": -1, "num_heads": 8}
    config = comfy.supported_models.SD15(unet_config)
    config.set_inference_dtype(torch.float32, None)
    base_model = config.get_model({})
    demo.seeded_fill_(base_model.diffusion_model, 0)
    base_model.requires_grad_(False)
    model = comfy.model_patcher.ModelPatcher(base_model, load_device=comfy.model_management.get_torch_device(),
                                             offload_device=comfy.model_management.unet_offload_device())
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip_config = {**demo.TINY_CLIP, "hidden_size": CONTEXT[width], "projection_dim": CONTEXT[width]}
    clip = comfy.sd.CLIP(target, model_options={"clip_l_model_config": clip_config})
    demo.seeded_fill_(clip.cond_stage_model, 1).requires_grad_(False)
    motion_model = MotionModel(MotionSpec.standard("v2", channels), zero_init=False,
                               operations=comfy.ops.manual_cast)
    demo.seeded_fill_(motion_model, 3, gain=0.5)
    motion = wrap_motion_model(motion_model.eval().requires_grad_(False), "bench v2")
    vision = demo.tiny_clip_vision(0, projection_dim=1024) if mode == "semantic_motion_predictor" else None
    models = BaseModels(model, clip, demo.tiny_vae(0), motion, "bench", clip_vision=vision)
    workdir = tempfile.mkdtemp()
    folder_paths.set_output_directory(workdir)
    run = config_from_dict({
        "mode": mode, "name": "bench", "seed": 0,
        "data": {"frames": frames, "stride": 1, "width": 256, "height": 256, "caption_dropout": 0.0},
        "train": {"steps": steps + 1, "batch_size": batch, "learning_rate": 1e-4,
                  "gradient_checkpointing": checkpointing, "precision": precision, "optimizer": "adamw"},
        "output": {"save_every": 10_000}}, in_graph=True)
    clips = MemoryClips([(torch.rand(frames, 256, 256, 3), "a clip")], run.data)
    stamps, base, table = [], [], []

    def on_step(step, total, loss):
        synchronize()
        stamps.append(time.perf_counter())
        if step == 1:
            base.append(reset_peak())
            if profile is not None:
                profile.start()
        elif step == total and profile is not None:  # before the run's final save
            table.append(profile.table())

    Trainer(run, models, clips, os.path.join(workdir, "run"), on_step=on_step).run()
    times = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"seconds_per_step": statistics.median(times), "peak_bytes": peak() - base[0],
            "profile": table[0] if table else None}


def child(argv) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    kind, width, frames, batch, steps, mode = argv[0], argv[1], int(argv[2]), int(argv[3]), int(argv[4]), argv[5]
    device, precision, profile = argv[6], argv[7], Profile(argv[8] == "profile")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if kind == "reference":
        result = run_reference(width, frames, batch, steps, device, precision, profile)
    else:
        result = run_pack(width, frames, batch, steps, checkpointing=kind == "pack ckpt", mode=mode,
                          device=device, precision=precision, profile=profile)
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", choices=sorted(WIDTHS), default="tiny")
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 24, 32])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up step")
    parser.add_argument("--runs", nargs="+", choices=KINDS, default=list(KINDS),
                        help="which rows (the reference always runs: the ratios are to it)")
    parser.add_argument("--mode", choices=["motion_module", "semantic_motion_predictor"], default="motion_module",
                        help="what the pack's rows train")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="compute dtype of both loops (bf16: autocast; weights stay fp32)")
    parser.add_argument("--profile", action="store_true",
                        help="after each row, torch.profiler's operator table of its measured steps")
    args = parser.parse_args()
    where = "GPU" if args.device == "cuda" else f"{os.environ.get('BENCH_THREADS', '2')} threads"
    print(f"pack rows: mode {args.mode}; width {args.width}, 256x256, batch {args.batch}, {args.steps} measured steps, "
          f"{args.device}, {args.precision}, {where}")
    print(f"{'frames':>6} {'run':<11} {'s/step':>8} {'x ref':>6} {'peak MiB':>9} {'x ref':>6}", flush=True)
    failed = False
    for frames in args.frames:
        reference = None
        for kind in [k for k in KINDS if k == "reference" or k in args.runs]:
            done = subprocess.run([sys.executable, "-P", os.path.abspath(__file__), "--child", kind, args.width,
                                   str(frames), str(args.batch), str(args.steps), args.mode, args.device,
                                   args.precision, "profile" if args.profile else "-"],
                                  capture_output=True, text=True)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{frames:>6} {kind:<11} failed:\n{done.stderr[-3000:]}", flush=True)
                failed = True
                continue
            result = json.loads(line[7:])
            if kind == "reference":  # it runs first in each group
                reference = result

            def ratio(key):
                return f"{result[key] / reference[key]:>6.2f}" if reference else f"{'-':>6}"

            print(f"{frames:>6} {kind:<11} {result['seconds_per_step']:>8.2f} {ratio('seconds_per_step')} "
                  f"{result['peak_bytes'] / 2**20:>9.0f} {ratio('peak_bytes')}", flush=True)
            if result.get("profile"):
                print(result["profile"], flush=True)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()

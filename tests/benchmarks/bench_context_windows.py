"""Per-step time and peak memory of windowed sampling as the clip grows (context 16, overlap 4).

For each UNet size (the tiny test config, and full SD1.5 width at 256x256 with a full-size v2
motion model) and each frame count, one subprocess samples with Context Options (standard_static,
pyramid) and reports the time per step and the peak RSS while sampling above the RSS with models
loaded and latents allocated. Memory should stay flat and time should grow with the number of
windows. Needs COMFYUI_PATH.

    COMFYUI_PATH=/path/to/ComfyUI python tests/benchmarks/bench_context_windows.py \\
        [--sizes tiny full] [--frames 16 32 64 128 256] [--steps 2] [--memory trim keep no-cache] [--warmup]

``--memory``: ``trim`` (default) is the pack as shipped, which hands freed pages back to the
system between windows on CPU; ``keep`` skips that, showing what glibc's heaps alone do;
``no-cache`` also skips it but runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so glibc returns large
blocks at once (the peak then shows what sampling needs, not what the allocator keeps).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def run_one(size: str, frames: int, steps: int, trim: bool = True, warmup: bool = False) -> dict:
    import torch

    import bench_comfy_overhead as overhead
    import comfy_env

    comfy_env.import_comfyui(os.environ["COMFYUI_PATH"])
    import ads_package

    ads_package.register()
    import comfy.model_management
    import comfy.sample

    from animatediff_suite.motion_modules import ContextOptions, context_windows
    from animatediff_suite.nodes import context_sampling, injection

    if not trim:  # measure what the allocator alone does
        context_sampling.release_freed_memory = lambda device: None

    options = ContextOptions(16, 4)
    model, side, context_dim = overhead.build_unet(size)
    motion = overhead.build_motion(size)
    model = injection.apply_motion(model, motion, context=options)
    gen = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 77, context_dim, generator=gen), {}]]
    negative = [[torch.randn(1, 77, context_dim, generator=gen), {}]]
    latent = torch.zeros(frames, 4, side, side)
    noise = comfy.sample.prepare_noise(latent, 0)
    comfy.model_management.load_models_gpu([model, *model.get_nested_additional_models()])
    if warmup:  # one 16-frame step first, so one-time costs (kernel caches, thread pools) are not counted
        with torch.no_grad():
            comfy.sample.sample(model, noise[:16], 1, 7.0, "euler", "normal", cond, negative, latent[:16],
                                disable_pbar=True)
    base_rss = overhead.reset_peak_rss()
    stamps = [time.perf_counter()]
    with torch.no_grad():
        comfy.sample.sample(model, noise, steps, 7.0, "euler", "normal", cond, negative, latent,
                            callback=lambda *a: stamps.append(time.perf_counter()), disable_pbar=True)
    return {"size": size, "frames": frames, "windows": len(context_windows(frames, options)),
            "per_step": (stamps[-1] - stamps[0]) / steps, "peak_over_loaded_mib": overhead.peak_rss_mib() - base_rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "full"])
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--memory", choices=["trim", "keep", "no-cache"], default="trim")
    parser.add_argument("--warmup", action="store_true", help="sample 16 frames once before measuring")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        size, frames = args.one.split(":")
        print(json.dumps(run_one(size, int(frames), args.steps, trim=args.memory == "trim", warmup=args.warmup)))
        return
    if not os.environ.get("COMFYUI_PATH"):
        sys.exit("set COMFYUI_PATH=/path/to/ComfyUI")
    env = dict(os.environ)
    if args.memory == "no-cache":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    print(f"context 16, overlap 4, standard_static + pyramid, cfg 7, euler, {args.steps} steps, CPU fp32, "
          f"memory: {args.memory}{', after a warm-up' if args.warmup else ''}")
    print("| UNet | frames | windows | s/step | s/step per window | peak RSS over loaded MiB | vs 16 frames |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        first = None
        for frames in args.frames:
            out = subprocess.run([sys.executable, __file__, "--one", f"{size}:{frames}", "--steps", str(args.steps),
                                  "--memory", args.memory] + (["--warmup"] if args.warmup else []),
                                 check=True, capture_output=True, text=True, env=env).stdout
            row = json.loads(out.strip().splitlines()[-1])
            first = first or row
            print(f"| {size} | {frames} | {row['windows']} | {row['per_step']:.3f} | "
                  f"{row['per_step'] / row['windows']:.3f} | {row['peak_over_loaded_mib']:.0f} | "
                  f"{row['peak_over_loaded_mib'] / max(first['peak_over_loaded_mib'], 1e-9):.2f} |", flush=True)


if __name__ == "__main__":
    main()

"""Several clips per batch and batched windows: time per frame and peak memory, relative to 16 frames.

Rows, each in its own subprocess (so its peak RSS is its own), all with cfg 7 and euler:

- ``plain 16``: the UNet without motion modules; ``motion 16``: with them (one clip);
- ``2x16 batch``: 32 latents, ``frames_per_clip`` 16, one sampling; ``2x16 runs``: two 16-frame samplings;
- ``F wb N``: F frames with Context Options (16, overlap 4) and ``window_batch`` N.

The last columns compare the pack's own memory estimate for the run (sampling_checks: ComfyUI's
``memory_required`` of one UNet call plus the motion modules' peak) with the measured peak RSS
above the loaded models. Sizes: ``tiny`` (test config, 8x8 latents) and ``full`` (SD1.5 width at
256x256 with a full-size v2, random weights; slow on CPU). Needs COMFYUI_PATH.

    COMFYUI_PATH=/path/to/ComfyUI python tests/benchmarks/bench_frame_layout.py \\
        [--size tiny] [--rows "plain 16" "motion 16" "2x16 batch" "2x16 runs" "64 wb 1" "64 wb 2" ...] [--steps 2]
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

ROWS = ["plain 16", "motion 16", "2x16 batch", "2x16 runs", "64 wb 1", "64 wb 2", "64 wb 4",
        "256 wb 1", "256 wb 2", "256 wb 4"]


def run_one(size: str, row: str, steps: int) -> dict:
    import torch

    import bench_comfy_overhead as overhead
    import comfy_env

    comfy_env.import_comfyui(os.environ["COMFYUI_PATH"])
    import ads_package

    ads_package.register()
    import comfy.model_management
    import comfy.sample

    from animatediff_suite.motion_modules import ContextOptions
    from animatediff_suite.nodes import injection, sampling_checks

    model, side, context_dim = overhead.build_unet(size)
    words = row.split()
    frames, runs, options, per_clip = 16, 1, None, 0
    if words[0] == "2x16":
        frames, per_clip = (32, 16) if words[1] == "batch" else (16, 0)
        runs = 2 if words[1] == "runs" else 1
    elif words[0] not in ("plain", "motion"):
        frames, options = int(words[0]), ContextOptions(16, 4, window_batch=int(words[2]))
    motion = None
    if words[0] != "plain":
        motion = overhead.build_motion(size)
        model = injection.apply_motion(model, motion, context=options, frames_per_clip=per_clip)
    gen = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 77, context_dim, generator=gen), {}]]
    negative = [[torch.randn(1, 77, context_dim, generator=gen), {}]]
    latent = torch.zeros(frames, 4, side, side)
    noise = comfy.sample.prepare_noise(latent, 0)
    comfy.model_management.load_models_gpu([model, *model.get_nested_additional_models()])
    base_rss = overhead.reset_peak_rss()
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(runs):
            comfy.sample.sample(model, noise, steps, 7.0, "euler", "normal", cond, negative, latent, disable_pbar=True)
    elapsed = time.perf_counter() - start
    estimate = 0
    if motion is not None:
        clips = 2 if per_clip else 1
        unet_frames, attention_frames, _ = sampling_checks.call_plan(frames, options, clips)
        # cond and uncond run in one call on CPU: twice the one-chunk estimate
        estimate = sampling_checks.estimated_peak_bytes(model.model, tuple(noise.shape), 2 * unet_frames,
                                                        attention_frames, motion.spec.heads,
                                                        motion.spec.modules[0].channels)
    return {"row": row, "frames": frames * runs, "per_frame_step": elapsed / steps / (frames * runs),
            "peak_mib": overhead.peak_rss_mib() - base_rss, "estimate_mib": estimate / 2 ** 20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "full"])
    parser.add_argument("--rows", nargs="+", default=ROWS)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.size, args.one, args.steps)))
        return
    if not os.environ.get("COMFYUI_PATH"):
        sys.exit("set COMFYUI_PATH=/path/to/ComfyUI")
    print(f"{args.size} UNet, cfg 7, euler, {args.steps} steps, CPU fp32, {os.cpu_count()} cores")
    print("| run | frames | s/step per frame | vs motion 16 | peak RSS over loaded MiB | vs motion 16 | estimate MiB |")
    print("|---|---|---|---|---|---|---|")
    reference = None
    for row in args.rows:
        out = subprocess.run([sys.executable, __file__, "--one", row, "--size", args.size, "--steps", str(args.steps)],
                             check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        if row == "motion 16":
            reference = result
        base = reference or result
        print(f"| {row} | {result['frames']} | {result['per_frame_step']:.4f} | "
              f"{result['per_frame_step'] / base['per_frame_step']:.2f} | {result['peak_mib']:.0f} | "
              f"{result['peak_mib'] / max(base['peak_mib'], 1e-9):.2f} | {result['estimate_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()

"""Per-step time and peak RSS of ComfyUI sampling, plain model vs the same with motion modules.

16 frames, cfg 7 (cond + uncond batched), euler. Two UNet sizes: the tiny test config (8x8 latents)
and full SD1.5 width (model_channels 320, channel_mult 1-2-4-4, context 768) at 256x256 (32x32
latents), both with random weights; the motion model is a full-size v2 for the full UNet. Each
configuration runs in its own subprocess so its peak RSS is its own. Figures are ratios measured in
one run. Needs COMFYUI_PATH.

    COMFYUI_PATH=/path/to/ComfyUI python tests/benchmarks/bench_comfy_overhead.py [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# full SD1.5 width and depth of attention; same block layout as the tiny demo UNet
FULL_UNET_OVERRIDES = {"model_channels": 320, "channel_mult": [1, 2, 4, 4], "context_dim": 768}


def build_unet(size: str):
    """(ModelPatcher, latent side, context dim): the tiny demo UNet, or full SD1.5 width, random."""
    import torch

    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    from animatediff_suite.nodes import demo

    if size == "tiny":
        return demo.tiny_model(0), 8, 32
    config = comfy.supported_models.SD15({**demo.TINY_UNET, **FULL_UNET_OVERRIDES})
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    demo.seeded_fill_(base.diffusion_model, 0)
    patcher = comfy.model_patcher.ModelPatcher(base, comfy.model_management.get_torch_device(),
                                               comfy.model_management.unet_offload_device())
    return patcher, 32, 768


def build_motion(size: str):
    """A v2 motion model matching ``build_unet(size)`` (random weights)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.ops

    from animatediff_suite.motion_modules import MotionModel, MotionSpec
    from animatediff_suite.nodes import demo, injection

    if size == "tiny":
        return demo.tiny_motion_patcher(0, "v2")
    model = MotionModel(MotionSpec.standard("v2", (320, 640, 1280, 1280)), zero_init=False,
                        operations=comfy.ops.manual_cast)
    demo.seeded_fill_(model, 1, gain=0.5)
    return injection.LoadedMotionModel("full v2", comfy.model_patcher.ModelPatcher(
        model, comfy.model_management.get_torch_device(), comfy.model_management.unet_offload_device()))


def run_one(size: str, variant: str, steps: int) -> dict:
    import torch

    import comfy_env

    comfy_env.import_comfyui(os.environ["COMFYUI_PATH"])
    import ads_package

    ads_package.register()
    import comfy.model_management
    import comfy.sample
    from torch.utils.flop_counter import FlopCounterMode

    from animatediff_suite.nodes import injection

    model, latent_side, context_dim = build_unet(size)
    if variant == "motion":  # built only here, so the plain run holds no motion weights
        model = injection.apply_motion(model, build_motion(size), schedule=None)
    frames = 16
    gen = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 77, context_dim, generator=gen), {}]]
    negative = [[torch.randn(1, 77, context_dim, generator=gen), {}]]
    latent = torch.zeros(frames, 4, latent_side, latent_side)
    noise = comfy.sample.prepare_noise(latent, 0)
    comfy.model_management.load_models_gpu([model, *model.get_nested_additional_models()])
    base_rss = reset_peak_rss()
    stamps = []
    with torch.no_grad():
        comfy.sample.sample(model, noise, steps, 7.0, "euler", "normal", cond, negative, latent,
                            callback=lambda *a: stamps.append(time.perf_counter()), disable_pbar=True)
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    sampling_peak = peak_rss_mib()
    unet = model.model.diffusion_model
    comfy.model_management.load_models_gpu([model, *model.get_nested_additional_models()])
    from animatediff_suite.motion_modules.layout import FrameLayout
    from animatediff_suite.nodes.context_sampling import LAYOUT_KEY

    options = {**model.model_options["transformer_options"], "cond_or_uncond": [0, 1],
               LAYOUT_KEY: FrameLayout.whole(1, frames)}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(torch.randn(2 * frames, 4, latent_side, latent_side), torch.full((2 * frames,), 500.0),
             context=torch.randn(2 * frames, 77, context_dim), transformer_options=options)
    return {"size": size, "variant": variant, "per_step": per_step, "flops": counter.get_total_flops(),
            "peak_rss_mib": sampling_peak, "rss_before_mib": base_rss}


def peak_rss_mib() -> float:
    """VmHWM: the process's peak resident set since start or since the last reset."""
    with open("/proc/self/status", encoding="ascii") as handle:
        line = next(l for l in handle if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def reset_peak_rss() -> float:
    """Reset VmHWM to the current RSS (Linux clear_refs 5), so the next peak is the sampling's own."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")
    return peak_rss_mib()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "full"])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        size, variant = args.one.split(":")
        print(json.dumps(run_one(size, variant, args.steps)))
        return
    if not os.environ.get("COMFYUI_PATH"):
        sys.exit("set COMFYUI_PATH=/path/to/ComfyUI")
    rows = []
    for size in args.sizes:
        for variant in ("plain", "motion"):
            out = subprocess.run([sys.executable, __file__, "--one", f"{size}:{variant}", "--steps", str(args.steps)],
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"16 frames, cfg 7 (batch 32), euler, {args.steps} steps, CPU, fp32; FLOPs of one UNet call "
          "(torch flop counter; CPU SDPA kernels are not counted); RSS: models loaded, then peak while sampling")
    print("| UNet | variant | s/step | step ratio | GFLOP/call | FLOP ratio | RSS loaded MiB | peak RSS sampling MiB | peak ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for plain, motion in zip(rows[::2], rows[1::2]):
        for row in (plain, motion):
            print(f"| {row['size']} | {row['variant']} | {row['per_step']:.3f} | {row['per_step'] / plain['per_step']:.2f} | "
                  f"{row['flops'] / 1e9:.1f} | {row['flops'] / plain['flops']:.2f} | {row['rss_before_mib']:.0f} | "
                  f"{row['peak_rss_mib']:.0f} | {row['peak_rss_mib'] / plain['peak_rss_mib']:.2f} |")


if __name__ == "__main__":
    main()

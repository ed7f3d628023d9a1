"""Cost of SparseCtrl: time per sampling step with and without it, side by side in one run.

In-process ComfyUI on the CPU: an SD1.5-shaped UNet at a fraction of the real width (``--base 96``: blocks
96/192/384/384, text width 768; 320 is SD1.5), the v3 motion model and a SparseCtrl of the same widths,
random weights, 16 frames, cfg 7, euler. Runs alternate (plain, rgb, scribble, ...) so drift hits all alike.
Also printed: the parameters of each part, whose ratios are those of the full-size files.

    COMFYUI_PATH=/path/to/ComfyUI python tests/benchmarks/bench_sparsectrl.py [--base 96 --side 256 --steps 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=int, default=96, help="width of the first block (SD1.5: 320)")
    parser.add_argument("--side", type=int, default=256, help="image side (latents are 1/8)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import ads_package
    import comfy_env

    ads_package.register()
    comfy_env.import_comfyui(comfy_env.comfyui_path())
    import torch

    import comfy.model_management
    import comfy.ops
    import comfy.sample
    import comfy.supported_models

    from animatediff_suite.motion_modules import MotionModel, MotionSpec
    from animatediff_suite.motion_modules.sparsectrl import SparseCtrlModel, SparseCtrlSpec
    from animatediff_suite.nodes import beta_schedules, demo, injection, sparsectrl
    from animatediff_suite.nodes.comfy_compat import new_model_patcher

    channels = tuple(args.base * m for m in (1, 2, 4, 4))
    config = comfy.supported_models.SD15({**demo.TINY_UNET, "model_channels": args.base, "channel_mult": [1, 2, 4, 4],
                                          "context_dim": 768, "transformer_depth_output": [1] * 9 + [0, 0, 0]})
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    demo.seeded_fill_(base.diffusion_model, 0)
    model = new_model_patcher(base.requires_grad_(False))
    motion_model = MotionModel(MotionSpec.standard("v3", channels), zero_init=False, operations=comfy.ops.manual_cast)
    demo.seeded_fill_(motion_model, 1, gain=0.5)
    loaded = injection.wrap_motion_model(motion_model.eval().requires_grad_(False), "bench v3")
    animated = injection.apply_motion(model, loaded, schedule=beta_schedules.resolve_schedule("auto", loaded.spec))
    controls = {}
    for kind in ("rgb", "scribble"):
        encoder = SparseCtrlModel(SparseCtrlSpec.sd15(kind, channels), operations=comfy.ops.manual_cast)
        demo.seeded_fill_(encoder, 2, gain=0.5)
        controls[kind] = sparsectrl.wrap_sparsectrl(encoder.eval().requires_grad_(False), f"bench {kind}")
    gen = torch.Generator().manual_seed(3)
    positive = [[torch.randn(1, 77, 768, generator=gen), {}]]
    negative = [[torch.randn(1, 77, 768, generator=gen), {}]]
    images = torch.rand(2, args.side, args.side, 3, generator=gen)
    vae = demo.tiny_vae(0)

    def run(kind: str | None) -> float:
        pos, neg = positive, negative
        if kind is not None:
            pos, neg = sparsectrl.apply_sparsectrl(positive, negative, controls[kind], images, (0, -1), 1.0, 0.0, 1.0,
                                                   vae if kind == "rgb" else None)
        latent = torch.zeros(16, 4, args.side // 8, args.side // 8)
        noise = comfy.sample.prepare_noise(latent, 1)
        started = time.perf_counter()
        comfy.sample.sample(animated, noise, args.steps, 7.0, "euler", "normal", pos, neg, latent,
                            disable_pbar=True, seed=1)
        return (time.perf_counter() - started) / args.steps

    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    print(f"widths {channels}, 16 frames at {args.side}x{args.side}, cfg 7, {args.steps} steps x {args.repeats}")
    print(f"parameters: UNet {count(base.diffusion_model) / 1e6:.1f} M, motion {count(motion_model) / 1e6:.1f} M, "
          f"SparseCtrl rgb {count(controls['rgb'].patcher.model) / 1e6:.1f} M, "
          f"scribble {count(controls['scribble'].patcher.model) / 1e6:.1f} M")
    modes = [("plain", None), ("SparseCtrl rgb", "rgb"), ("SparseCtrl scribble", "scribble")]
    run(None)  # warm-up
    times = {name: [] for name, _ in modes}
    for _ in range(args.repeats):
        for name, kind in modes:
            times[name].append(run(kind))
    plain = statistics.median(times["plain"])
    print(f"{'mode':<20} {'s/step':>8} {'vs plain':>9}")
    for name, _ in modes:
        value = statistics.median(times[name])
        print(f"{name:<20} {value:>8.2f} {value / plain:>8.2f}x")


if __name__ == "__main__":
    main()

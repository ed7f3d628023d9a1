"""Forward time, peak memory and achieved GFLOP/s of a full-size SD1.5 v2 motion model.

Feeds every one of the 21 temporal modules the feature map it sees in the UNet for 16 frames
(batch 1, no CFG) at 256x256 and 512x512, with the SDPA and the naive attention kernels, and with
the Linear layers on oneDNN (1x1 convolutions, the default on CPU) or on torch's F.linear.
Each configuration runs in a fresh subprocess so peak RSS is its own.

    python tests/benchmarks/bench_motion_module.py [--sizes 256 512] [--repeats 3]

FLOPs are counted with torch.utils.flop_counter on the naive path: the counter does not see
PyTorch's CPU SDPA kernel, and both kernels do the same arithmetic.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def feature_shapes(spec, size: int, frames: int) -> list[tuple[str, tuple[int, int, int, int]]]:
    """(prefix, input shape) for each module: latents are size/8, halved per down block."""
    latent = size // 8
    depth = len([m for m in spec.channels if m.startswith("down_blocks.")])
    shapes = []
    for module in spec.modules:
        name = module.prefix.split(".motion_modules.")[0]
        if name == "mid_block":
            level = depth - 1
        else:
            kind, i = name.split(".")
            level = int(i) if kind == "down_blocks" else depth - 1 - int(i)
        side = latent // 2 ** level
        shapes.append((module.prefix, (frames, module.channels, side, side)))
    return shapes


def run_one(size: int, backend: str, linear: str, repeats: int, frames: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import ads_package

    ads_package.register()
    from ads_helpers import FULL_SD15, make_spec, random_model
    from animatediff_suite.motion_modules import temporal

    temporal.ONEDNN_LINEAR = linear == "onednn"

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = random_model(make_spec("v2", channels=FULL_SD15)).to(device)
    model.set_attention_backend(backend)
    inputs = [(m, torch.randn(shape, device=device)) for (_, shape), (_, m) in
              zip(feature_shapes(model.spec, size, frames), model.named_temporal_modules())]
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def forward():
        with torch.no_grad():
            for module, x in inputs:
                module(x, frames)
        if device == "cuda":
            torch.cuda.synchronize()

    flops = None
    if backend == "naive":
        with FlopCounterMode(display=False) as counter:
            forward()
        flops = counter.get_total_flops()
    forward()  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024)
    return {"size": size, "backend": backend, "linear": linear, "seconds": statistics.median(times), "flops": flops,
            "peak_mib": peak, "device": device, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        size, backend, linear = args.one.split(":")
        print(json.dumps(run_one(int(size), backend, linear, args.repeats, args.frames)))
        return
    rows = []
    for size in args.sizes:
        for backend, linear in (("naive", "onednn"), ("sdpa", "onednn"), ("sdpa", "torch")):
            out = subprocess.run([sys.executable, __file__, "--one", f"{size}:{backend}:{linear}",
                                  "--repeats", str(args.repeats), "--frames", str(args.frames)],
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
        rows[-1]["flops"] = rows[-2]["flops"] = rows[-3]["flops"]  # same arithmetic; the counter cannot see CPU SDPA
    print(f"SD1.5 v2 motion model (21 modules, 453.2M params), {args.frames} frames, batch 1, "
          f"fp32, {rows[0]['device']} ({rows[0]['threads']} threads), median of {args.repeats}")
    print("| size | attention | linear | forward s | GFLOP | GFLOP/s | peak MiB over weights |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        gflop = row["flops"] / 1e9
        print(f"| {row['size']}x{row['size']} | {row['backend']} | {row['linear']} | {row['seconds']:.3f} | {gflop:.1f} | "
              f"{gflop / row['seconds']:.1f} | {row['peak_mib']:.0f} |")
    for size in args.sizes:
        naive, sdpa, torch_linear = (r for r in rows if r["size"] == size)
        print(f"{size}x{size}: SDPA is {naive['seconds'] / sdpa['seconds']:.2f}x the speed of naive attention; "
              f"oneDNN linears are {torch_linear['seconds'] / sdpa['seconds']:.2f}x the speed of F.linear")


if __name__ == "__main__":
    main()

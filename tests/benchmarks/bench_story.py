"""Stories: peak memory and time per panel as the number of panels grows, bank vs one batch.

Rows, each in its own subprocess (so its peak RSS is its own), one character with 2 references,
cfg 5, euler, Consistent Self-Attention on the up blocks at rate 0.5 (``deterministic`` schedule):

- ``bank N``: Story Sampler, the 2 references together, then the other N - 2 panels one at a time
  against the bank (offloaded to CPU memory);
- ``batch N``: all N panels in one KSampler batch with the in-batch patch (memory grows with N).

Columns: seconds per panel, peak RSS above the loaded model, the bank's size, and the size the
public StoryDiffusion code's bank would have at the same settings, from its code: it stores, per
step (every step) and patched layer, each reference's sampled hidden states for both cfg halves,
``steps x sum_layers(refs x 2 x rate x tokens x channels) x bytes``, on the GPU. Ours stores keys and
values (twice the channels) of the sampled tokens, only at steps where the layer attends
consistently (all tokens at the full-attention steps).

    COMFYUI_PATH=/path/to/ComfyUI python -P tests/benchmarks/bench_story.py [--size tiny|full] \\
        [--rows "bank 4" "bank 8" "batch 4" ...] [--steps 4]
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

ROWS = ["bank 4", "bank 8", "bank 16", "batch 4", "batch 8", "batch 16"]
RATE, REFERENCES = 0.5, 2


def run_one(size: str, row: str, steps: int) -> dict:
    import torch

    import bench_comfy_overhead as overhead
    import comfy_env

    comfy_env.import_comfyui(os.environ["COMFYUI_PATH"])
    import ads_package

    ads_package.register()
    import comfy.model_management
    import comfy.sample

    from animatediff_suite.motion_modules.story import parse_story
    from animatediff_suite.nodes import story_nodes
    from animatediff_suite.nodes.consistent_patch import attention_layers

    model, side, context_dim = overhead.build_unet(size)
    kind, panels = row.split()[0], int(row.split()[1])
    patched = story_nodes.ConsistentSelfAttention.execute(
        model, id_length=REFERENCES, sampling_rate=RATE, schedule="deterministic", blocks="output",
        seed=0).result[0]
    story = parse_story("[Bob] a man", "\n".join(f"[Bob] scene {i}" for i in range(panels)), "", REFERENCES)
    gen = torch.Generator().manual_seed(0)
    positive = [[torch.randn(panels, 77, context_dim, generator=gen), {}]]
    negative = [[torch.randn(1, 77, context_dim, generator=gen), {}]]
    comfy.model_management.load_models_gpu([patched])
    base_rss = overhead.reset_peak_rss()
    start = time.perf_counter()
    bank_bytes = 0
    with torch.no_grad():
        if kind == "bank":
            latent, bank = story_nodes.StorySampler.execute(
                patched, story, positive, negative, {"samples": torch.zeros(1, 4, side, side)}, seed=0, steps=steps,
                cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0, panels_per_batch=1,
                offload_bank=True, bank_limit_mb=0).result
            bank_bytes = bank.nbytes
        else:
            latent = torch.zeros(panels, 4, side, side)
            comfy.sample.sample(patched, comfy.sample.prepare_noise(latent, 0), steps, 5.0, "euler", "normal",
                                positive, negative, latent, disable_pbar=True)
    elapsed = time.perf_counter() - start
    unet = model.get_model_object("diffusion_model")
    public = 0
    for name, number, index in attention_layers(model):
        if name != "output":
            continue
        block = unet.output_blocks[number]
        transformer = next(m for m in block.modules() if hasattr(m, "transformer_blocks"))
        channels = transformer.transformer_blocks[index].attn1.to_q.in_features
        tokens = _tokens(side, number, len(unet.output_blocks))
        public += steps * REFERENCES * 2 * RATE * tokens * channels * 4  # fp32 here, as our run
    return {"row": row, "panels": panels, "per_panel": elapsed / panels, "peak_mib": overhead.peak_rss_mib() - base_rss,
            "bank_mib": bank_bytes / 2 ** 20, "public_mib": public / 2 ** 20}


def _tokens(latent_side: int, output_block: int, blocks: int) -> int:
    """Tokens at an SD1.5 output block: 3 blocks per level, from the deepest level up."""
    levels = blocks // 3
    downscale = 2 ** (levels - 1 - output_block // 3)
    return (latent_side // downscale) ** 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "full"])
    parser.add_argument("--rows", nargs="+", default=ROWS)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.size, args.one, args.steps)))
        return
    if not os.environ.get("COMFYUI_PATH"):
        sys.exit("set COMFYUI_PATH=/path/to/ComfyUI")
    print(f"{args.size} SD1.5 UNet, {REFERENCES} references, rate {RATE}, cfg 5, euler, {args.steps} steps, "
          f"CPU fp32, {os.cpu_count()} cores")
    print("| run | panels | s per panel | peak RSS over loaded MiB | bank MiB | public code's bank MiB |")
    print("|---|---|---|---|---|---|")
    for row in args.rows:
        out = subprocess.run([sys.executable, "-P", __file__, "--one", row, "--size", args.size,
                              "--steps", str(args.steps)], check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        print(f"| {row} | {result['panels']} | {result['per_panel']:.2f} | {result['peak_mib']:.0f} | "
              f"{result['bank_mib']:.1f} | {result['public_mib']:.1f} |", flush=True)


if __name__ == "__main__":
    main()

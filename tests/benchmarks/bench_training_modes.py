"""How far each training mode lowers the held-out loss in a given number of steps (longer than CI runs).

    COMFYUI_PATH=/path/to/ComfyUI python -P tests/benchmarks/bench_training_modes.py motion_lora \\
        [--steps 200] [--lr 1e-2] [--rank 16] [--schedule constant|linear|cosine] [--warmup 0] \\
        [--spatial-lr 0] [--spatial-lora-dropout D]

The setting of tests/test_training_modes.py: the tiny SD1.5 demo models (and the tiny v2 motion model),
6 synthetic moving-disc clips (64x64, 8 frames, batch 2), the held-out loss of 3 other clips measured
the tests' way (tests/training_helpers.py: epsilon MSE at four noise levels through a CFGGuider) with
the written files applied by the stock loaders. Prints the loss before and after, their ratio and the
training time, and what the held-out loss measures: the held-out latents' mean square m and the loss of
the best predictor that is a scale of its input, eps = a(sigma) x_t, which reaches m / (m + sigma^2) at
each noise level (eps is independent of x0, unit variance). When m is small next to the sigmas, that
near-identity map already takes the loss close to 0: the loss then measures how well a mode can make
the random UNet pass its input through, more than what it learnt of the clips.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["motion_module", "motion_lora", "domain_adapter", "motion_director"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--schedule", choices=["constant", "linear", "cosine"], default="constant",
                        help="[train] lr_schedule (the tests' recipes: RECIPES in tests/test_training_modes.py)")
    parser.add_argument("--warmup", type=int, default=0, help="[train] warmup_steps")
    parser.add_argument("--spatial-lr", type=float, default=0.0,
                        help="[train] spatial_learning_rate (motion_director's spatial LoRA; 0: --lr)")
    parser.add_argument("--spatial-lora-dropout", type=float, default=None,
                        help="[train] spatial_lora_dropout (motion_director: share of clips without the spatial "
                             "LoRA; default: the config's)")
    args = parser.parse_args()

    import ads_package
    import comfy_env

    ads_package.register()
    comfy_env.import_comfyui(comfy_env.comfyui_path())
    import torch

    from training_helpers import (HELDOUT_STEPS, base_models, config, heldout_loss, point_folders, shape_clip,
                                  with_written_files)

    from animatediff_suite.training.data import MemoryClips
    from animatediff_suite.training.session import run_in_graph

    point_folders(tempfile.mkdtemp())

    models = base_models(args.mode)
    held_out = [shape_clip(s) for s in range(100, 103)]

    before = heldout_loss(with_written_files(models, {}), models.clip, models.vae, held_out)
    with torch.no_grad():
        latents = torch.cat([models.model.model.process_latent_in(models.vae.encode(pixels[:8]).float())
                             for pixels, _ in held_out])
    square = float(latents.pow(2).mean())
    sigmas = models.model.get_model_object("model_sampling").sigmas
    floor = sum(square / (square + float(sigmas[i]) ** 2) for i in HELDOUT_STEPS) / len(HELDOUT_STEPS)
    print(f"held-out latents: mean square {square:.4f}; eps = a(sigma) x_t alone: loss {floor:.4f} "
          f"(ratio {floor / before:.3f})", flush=True)
    run = config(args.mode, steps=args.steps, learning_rate=args.lr, rank=args.rank, batch_size=2,
                 gradient_checkpointing=False, lr_schedule=args.schedule, warmup_steps=args.warmup,
                 spatial_learning_rate=args.spatial_lr, sections={"data": {"cache": True}},
                 **({} if args.spatial_lora_dropout is None else {"spatial_lora_dropout": args.spatial_lora_dropout}))
    started = time.perf_counter()
    with torch.inference_mode():
        _, written = run_in_graph(run, models, MemoryClips([shape_clip(s) for s in range(6)], run.data), False)
    seconds = time.perf_counter() - started
    after = heldout_loss(with_written_files(models, written), models.clip, models.vae, held_out)
    spatial = f", spatial lr {args.spatial_lr:g}" if args.spatial_lr else ""
    if args.mode == "motion_director":
        spatial += f", spatial LoRA dropout {run.train.spatial_lora_dropout:g}"
    print(f"{args.mode}: {args.steps} steps, lr {args.lr:g}{spatial} ({args.schedule}, warm-up {args.warmup}), "
          f"rank {args.rank}: held-out loss {before:.4f} -> {after:.4f} (ratio {after / before:.3f}); "
          f"training {seconds:.0f} s")


if __name__ == "__main__":
    main()

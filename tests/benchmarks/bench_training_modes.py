"""How far each training mode lowers the held-out loss in a given number of steps (longer than CI runs).

    COMFYUI_PATH=/path/to/ComfyUI python -P tests/benchmarks/bench_training_modes.py motion_lora \\
        [--steps 200] [--lr 1e-2] [--rank 16]

The setting of tests/test_training_modes.py: the tiny SD1.5 demo models (and the tiny v2 motion model),
6 synthetic moving-disc clips (64x64, 8 frames, batch 2), the held-out loss of 3 other clips measured
the tests' way (tests/training_helpers.py: epsilon MSE at four noise levels through a CFGGuider) with
the written files applied by the stock loaders. Prints the loss before and after, their ratio and the
training time.
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
    args = parser.parse_args()

    import ads_package
    import comfy_env

    ads_package.register()
    comfy_env.import_comfyui(comfy_env.comfyui_path())
    import torch

    from training_helpers import base_models, config, heldout_loss, point_folders, shape_clip, with_written_files

    from animatediff_suite.training.data import MemoryClips
    from animatediff_suite.training.session import run_in_graph

    point_folders(tempfile.mkdtemp())

    models = base_models(args.mode)
    held_out = [shape_clip(s) for s in range(100, 103)]

    before = heldout_loss(with_written_files(models, {}), models.clip, models.vae, held_out)
    run = config(args.mode, steps=args.steps, learning_rate=args.lr, rank=args.rank, batch_size=2,
                 gradient_checkpointing=False, sections={"data": {"cache": True}})
    started = time.perf_counter()
    with torch.inference_mode():
        _, written = run_in_graph(run, models, MemoryClips([shape_clip(s) for s in range(6)], run.data), False)
    seconds = time.perf_counter() - started
    after = heldout_loss(with_written_files(models, written), models.clip, models.vae, held_out)
    print(f"{args.mode}: {args.steps} steps, lr {args.lr:g}, rank {args.rank}: held-out loss {before:.4f} -> "
          f"{after:.4f} (ratio {after / before:.3f}); training {seconds:.0f} s")


if __name__ == "__main__":
    main()

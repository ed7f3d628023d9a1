"""GPU check of the trainer: the paths CI's CPU-only machines cannot run (CUDA autocast in bf16 and fp16,
the fp16 grad scaler, 8-bit AdamW from bitsandbytes, ``auto`` resolving to them, gradient checkpointing and
an interrupted run resumed, all on CUDA). Run it whenever a GPU machine is available:

    COMFYUI_PATH=/path/to/ComfyUI python -P tests/gpu/check_training_gpu.py [--steps 40] [--size 128] [--json out.json]

ComfyUI is imported in this process without ``--cpu``. Each case trains the tests' tiny SD1.5 + v2 motion
model on the synthetic moving-ball clips (``motion_lora``, rank 16, batch 2, 8 frames of ``--size``, 128x128 by
default) and checks,
with expectations written here rather than taken from the trainer:

- the UNet's output layer computed in the case's dtype (a forward hook) and the trained file, weights and
  AdamW's moments stayed fp32 (8-bit AdamW: some moments uint8);
- only fp16 ran a grad scaler (its state saved, scale > 0), and every logged loss is finite;
- the held-out loss (the tests' own measure, through a CFGGuider) fell to at most ``--ratio`` of its start,
  and each case lands within 0.1 of the like-for-like case's ratio (fp32 at rank 16; bf16 with torch's
  AdamW for 8-bit AdamW at rank 64);
- the base UNet, text encoder, VAE and input motion model are bit-identical afterwards;
- an interrupt after half the steps plus a resume ends with the uninterrupted weights (exactly, with
  cuDNN and cuBLAS in deterministic mode; the largest difference is printed either way).

``--cpu`` runs the same cases on the CPU (CPU autocast takes both half dtypes) to check this script itself.

Why 128x128 and not the tests' 64x64: the tiny UNet's deepest level is then 2x2 latent pixels, so each of its
GroupNorm groups (2 channels) normalises 8 values per frame; at 64x64 it is 1x1 and a group holds 2 values,
whose normalisation's backward amplifies rounding without bound. There, bf16's step-1 LoRA gradient has
20-50x the fp32 gradient's norm and is noise (relative error ~25x, measured on the CPU); at 128x128 it
equals the fp32 gradient to 1%. Real SD1.5 sizes have 40 channels per group and 4x4 pixels or more.
Exit 0: every check passed; 1: one failed (printed); 2: cannot run (no CUDA device).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, before CUDA starts

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TESTS)

# (name, [train] precision, [train] optimizer, rank, gradient checkpointing). Rank 64 for 8-bit AdamW:
# bitsandbytes keeps tensors under 4096 entries in 32 bits, and the 64-wide layers' rank-16 LoRAs are smaller;
# "bf16 rank 64" is its like-for-like comparison with torch's AdamW.
CASES = [
    ("fp32", "fp32", "adamw", 16, False),
    ("bf16", "bf16", "adamw", 16, False),
    ("fp16", "fp16", "adamw", 16, False),
    ("bf16 + checkpointing", "bf16", "adamw", 16, True),
    ("bf16 rank 64", "bf16", "adamw", 64, False),
    ("bf16 rank 64 + 8-bit AdamW", "bf16", "adamw8bit", 64, False),
    ("auto", "auto", "auto", 16, False),
]
EIGHT_BIT_FROM = 4096  # bitsandbytes' smallest tensor with 8-bit moments (entries)


def setup(cpu: bool, root: str):
    import torch

    import ads_package
    import comfy_env

    path = comfy_env.comfyui_path()
    if path is None:
        raise SystemExit(comfy_env.SKIP_REASON)
    comfy_env.import_comfyui(path, cpu=cpu)
    ads_package.register()
    from training_helpers import point_folders

    point_folders(root)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def train_case(name, precision, optimizer, rank, checkpointing, steps, device, size=128):
    import comfy.model_management as mm
    import torch
    from safetensors.torch import load_file

    from animatediff_suite.nodes.motion_nodes import ApplyMotionModel
    from animatediff_suite.training.data import MemoryClips
    from animatediff_suite.training.session import run_in_graph
    from training_helpers import (base_models, changed_keys, config, heldout_loss, shape_clip, snapshot, tensors,
                                  with_written_files)

    run_name = name.replace(" ", "").replace("+", "_").replace("-", "")
    models = base_models("motion_lora")
    held_out = [shape_clip(s, size=size) for s in range(100, 103)]
    frozen = {"base UNet": (snapshot(models.model.model), models.model.model),
              "text encoder": (snapshot(models.clip.cond_stage_model), models.clip.cond_stage_model),
              "VAE": (snapshot(models.vae.first_stage_model), models.vae.first_stage_model),
              "motion model": (snapshot(models.motion.patcher.model), models.motion.patcher.model)}
    before = heldout_loss(ApplyMotionModel.execute(models.model, models.motion).result[0],
                          models.clip, models.vae, held_out)
    seen = set()
    hook = models.model.model.diffusion_model.out[2].register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    run = config("motion_lora", run_name, steps=steps, learning_rate=1e-2, rank=rank, batch_size=2,
                 precision=precision, optimizer=optimizer, gradient_checkpointing=checkpointing,
                 sections={"output": {"save_every": steps}, "data": {"width": size, "height": size}})
    stamps = []

    def on_step(step, total, loss):
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        with torch.inference_mode():  # as ComfyUI's executor runs a node
            result, written = run_in_graph(run, models, MemoryClips([shape_clip(s, size=size) for s in range(6)],
                                                                    run.data),
                                           False, on_step)
    finally:
        hook.remove()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    mm.load_models_gpu([models.model])
    unchanged = {what: changed_keys(saved, module) for what, (saved, module) in frozen.items()}
    after = heldout_loss(with_written_files(models, written), models.clip, models.vae, held_out)
    folder = os.path.join(os.path.dirname(os.path.dirname(written["motion_lora"])), "output",
                          "animatediff_training", run_name)
    state = torch.load(os.path.join(folder, f"state-{steps:08d}.pt"), weights_only=True)
    moments = [t for t in tensors(state["optimizer"]["state"]) if t.ndim]
    lora = load_file(written["motion_lora"])
    times = sorted(b - a for a, b in zip(stamps[1:], stamps[2:]))  # after a warm-up step
    return {
        "case": name, "dtype_seen": sorted(str(d).replace("torch.", "") for d in seen),
        "optimizer": state["optimizer_name"], "scaler": {k: state["scaler"][k] for k in ("scale", "_growth_tracker")}
        if state["scaler"] else {}, "moment_dtypes": sorted({str(t.dtype).replace("torch.", "") for t in moments}),
        "file_dtypes": sorted({str(v.dtype).replace("torch.", "") for v in lora.values()}),
        "finite_losses": all(x == x and abs(x) != float("inf") for x in result.losses),
        "loss_first": result.losses[0], "loss_last": sum(result.losses[-5:]) / len(result.losses[-5:]),
        "heldout_before": before, "heldout_after": after, "ratio": after / before,
        "unchanged": {k: not v for k, v in unchanged.items()}, "changed_keys": {k: v[:3] for k, v in unchanged.items() if v},
        "s_per_step": times[len(times) // 2] if times else float("nan"), "peak_mib": peak,
    }


def resume_case(steps: int, device, size: int = 128) -> dict:
    import comfy.model_management as mm
    import torch
    from safetensors.torch import load_file

    from animatediff_suite.training.data import MemoryClips
    from animatediff_suite.training.session import run_in_graph
    from training_helpers import base_models, config, shape_clip

    clips = [shape_clip(s, size=size) for s in range(3)]
    data = {"data": {"width": size, "height": size}}

    def train(run, resume=False, on_step=None):
        with torch.inference_mode():
            return run_in_graph(run, base_models("motion_lora"), MemoryClips(clips, run.data), resume, on_step)

    _, plain = train(config("motion_lora", "plain", steps=steps, batch_size=2, precision="bf16", sections=data))
    expected = load_file(plain["motion_lora"])

    def interrupt_half_way(step, total, loss):
        if step == steps // 2:
            mm.interrupt_current_processing(True)  # what ComfyUI's /interrupt does

    run = config("motion_lora", "cut", steps=steps, batch_size=2, precision="bf16", sections=data)
    interrupted = False
    try:
        train(run, on_step=interrupt_half_way)
    except mm.InterruptProcessingException:
        interrupted = True
    result, written = train(run, resume=True)
    got = load_file(written["motion_lora"])
    diff = max(float((got[k] - expected[k]).abs().max()) for k in expected) if got.keys() == expected.keys() \
        else float("inf")
    return {"case": f"interrupt at {steps // 2} of {steps}, resume (bf16)", "interrupted": interrupted,
            "steps": result.steps, "max_abs_diff": diff, "exact": diff == 0.0,
            "scale": max(float(v.abs().max()) for v in expected.values())}


def verdicts(rows: list[dict], cases: list, resume: dict, ratio: float, device_type: str) -> list[str]:
    import torch

    failures = []
    expected_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    by_name = {r["case"]: r for r in rows}
    for row, (name, precision, optimizer, rank, _) in zip(rows, cases):
        # like for like: torch's AdamW in fp32 at the same rank, or bf16 for the 8-bit case
        compare = by_name.get("fp32" if rank == 16 else "bf16 rank 64")

        def need(ok, what):
            if not ok:
                failures.append(f"{name}: {what} ({json.dumps(row, default=str)[:400]})")

        if precision == "auto":
            bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported()
            precision = "fp32" if device_type == "cpu" else "bf16" if bf16 else "fp16"
        if optimizer == "auto":
            optimizer = "adamw8bit" if device_type == "cuda" and _has_bitsandbytes() else "adamw"
        need(row["dtype_seen"] == [expected_dtype[precision]], f"UNet output dtype {row['dtype_seen']}")
        need(row["optimizer"] == optimizer, f"optimizer {row['optimizer']} (expected {optimizer})")
        need(row["file_dtypes"] == ["float32"], "trained file not fp32")
        eight_bit = optimizer == "adamw8bit" and rank * 64 >= EIGHT_BIT_FROM  # the 64-wide layers' LoRAs
        need(("uint8" in row["moment_dtypes"]) == eight_bit, f"moments {row['moment_dtypes']}")
        need(set(row["moment_dtypes"]) - {"uint8"} == {"float32"}, f"moments {row['moment_dtypes']}")
        need(bool(row["scaler"]) == (precision == "fp16"), f"grad scaler state {row['scaler']}")
        need(not row["scaler"] or row["scaler"]["scale"] > 0, "grad scaler scale")
        need(row["finite_losses"], "a non-finite loss")
        need(all(row["unchanged"].values()), f"frozen weights changed: {row['changed_keys']}")
        need(row["ratio"] <= ratio, f"held-out loss ratio {row['ratio']:.3f} > {ratio}")
        if compare is None:
            need(False, "its like-for-like case did not run")
        else:
            need(abs(row["ratio"] - compare["ratio"]) <= 0.1,
                 f"ratio {row['ratio']:.3f} vs {compare['case']}'s {compare['ratio']:.3f}")
    if not resume["interrupted"] or not resume["max_abs_diff"] <= 1e-6 * max(1.0, resume["scale"]):
        failures.append(f"resume: {resume}")
    return failures


def _has_bitsandbytes() -> bool:
    from animatediff_suite.training.trainer import bitsandbytes_module

    return bitsandbytes_module() is not None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="steps per case (the first is a warm-up for timing)")
    parser.add_argument("--ratio", type=float, default=0.85, help="largest held-out loss ratio a case may end at")
    parser.add_argument("--resume-steps", type=int, default=6)
    parser.add_argument("--size", type=int, default=128, help="clip width and height (see the module's docstring)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--cpu", action="store_true", help="run the cases on the CPU (to check this script)")
    args = parser.parse_args()
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: nothing checked (use --cpu to check this script on the CPU)")
        return 2
    root = tempfile.mkdtemp(prefix="ads-gpu-train-")
    setup(args.cpu, root)
    import comfy.model_management as mm

    device = mm.get_torch_device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}); torch {torch.__version__}; bitsandbytes: {_has_bitsandbytes()}", flush=True)
    rows, cases, raised = [], [], []
    for case in CASES:
        try:
            rows.append(train_case(*case, args.steps, device, args.size))
            cases.append(case)
        except Exception:
            traceback.print_exc()
            raised.append(f"{case[0]}: raised {traceback.format_exc().strip().splitlines()[-1]}")
            continue
        row = rows[-1]
        print(f"{row['case']:<22} dtype {','.join(row['dtype_seen']):<9} {row['optimizer']:<9} "
              f"scaler {row['scaler'] or '-'} loss {row['loss_first']:.3f}->{row['loss_last']:.3f} "
              f"held-out {row['heldout_before']:.3f}->{row['heldout_after']:.3f} ({row['ratio']:.3f}) "
              f"{row['s_per_step'] * 1000:.0f} ms/step peak {row['peak_mib']:.0f} MiB", flush=True)
    try:
        resume = resume_case(args.resume_steps, device, args.size)
    except Exception:
        traceback.print_exc()
        resume = {"case": "resume", "interrupted": False, "max_abs_diff": float("nan"), "exact": False,
                  "scale": float("nan"), "raised": traceback.format_exc().strip().splitlines()[-1]}
    print(f"{resume['case']}: interrupted {resume['interrupted']}, max |diff| {resume['max_abs_diff']:.3g} "
          f"(weights up to {resume['scale']:.3g}), exact {resume['exact']}", flush=True)
    failures = raised + verdicts(rows, cases, resume, args.ratio, device.type)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"device": name, "torch": torch.__version__, "cases": rows, "resume": resume,
                       "failures": failures}, handle, indent=1, default=str)
    for failure in failures:
        print("FAIL", failure)
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

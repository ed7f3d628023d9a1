"""GPU check for newer ComfyUI: the pack's graphs with dynamic VRAM on (the default on NVIDIA GPUs in
releases that have ``--disable-dynamic-vram``) and off, latents compared. Run it whenever a GPU
machine with such a ComfyUI is available (CI has no GPU; README "Supported ComfyUI"):

    COMFYUI_PATH=/path/to/ComfyUI python tests/gpu/check_dynamic_vram.py [--tolerance 1e-3]

Each run starts a real server (no --cpu) with tiny motion files, samples tiny-model graphs that
cover the motion slots, v1's frame-spanning norms, a MotionLoRA, context windows, FreeInit and SDXL,
and saves the latents; the two runs must agree within the tolerance (GPU kernels are not bitwise
deterministic). Exit 0: agree (or nothing to compare, said why); 1: they differ; 2: cannot run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

import ads_package  # noqa: E402

ads_package.register()

from server_helpers import FOLDERS, graph, latents, runner, write_motion_lora, write_motion_model  # noqa: E402

VARIANTS = {
    "v2": {},
    "v1 (frame-spanning norms)": {"motion": "v1.ckpt"},
    "MotionLoRA": {"lora_strength": 0.8},
    "context windows": {"frames": 24, "context": {}},
    "FreeInit": {"free_init": 2},
    "SDXL beta": {"motion": "sdxl.ckpt", "family": "SDXL"},
}


def run_all(comfyui: str, root: Path, extra_args: list[str]) -> tuple[dict, str]:
    folders = {name: root / name for name in FOLDERS}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    for name, version, seed in (("v1.ckpt", "v1", 4), ("v2.ckpt", "v2", 1), ("sdxl.ckpt", "sdxl_beta", 3)):
        write_motion_model(folders["animatediff_models"] / name, version, seed=seed)
    write_motion_lora(folders["animatediff_motion_lora"] / "zoom.ckpt")
    server = runner.ComfyServer.start(comfyui, str(root), ["--output-directory", str(root / "output"), *extra_args],
                                      model_folders={k: str(v) for k, v in folders.items()})
    server.root = root
    try:
        results = {name: latents(server, server.run(graph(prefix=f"v{i}", **kw))).float()
                   for i, (name, kw) in enumerate(VARIANTS.items())}
        return results, server.log_tail()
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tolerance", type=float, default=1e-3, help="max |difference| / max(1, max |latent|)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("check_dynamic_vram: needs an NVIDIA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    comfyui = runner.find_comfyui()
    cli_args = Path(comfyui, "comfy", "cli_args.py").read_text(encoding="utf-8")
    if "disable-dynamic-vram" not in cli_args:
        print(f"{comfyui}: this ComfyUI has no dynamic VRAM (no --disable-dynamic-vram): nothing to compare")
        return 0
    with tempfile.TemporaryDirectory(prefix="ads_dynamic_vram_") as work:
        dynamic, log = run_all(comfyui, Path(work, "dynamic"), [])
        plain, _ = run_all(comfyui, Path(work, "plain"), ["--disable-dynamic-vram"])
    used = any(words in log for words in ("DynamicVRAM support detected and enabled", "prepared for dynamic VRAM"))
    print(f"dynamic VRAM {'was' if used else 'was NOT'} used by the first server (its log "
          f"{'mentions' if used else 'does not mention'} it)")
    failed = not used
    print(f"{'graph':28s} {'max |diff|':>12s} {'scale':>10s}  result")
    for name in VARIANTS:
        diff = (dynamic[name] - plain[name]).abs().max().item()
        scale = max(1.0, plain[name].abs().max().item())
        ok = diff <= args.tolerance * scale and dynamic[name].shape == plain[name].shape
        failed |= not ok
        print(f"{name:28s} {diff:12.3e} {scale:10.3f}  {'ok' if ok else 'DIFFERS'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

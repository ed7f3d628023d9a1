"""Load time of a full-size v2 motion model from an fp16 safetensors file, this pack against the peer.

Writes the file once (random weights, the original key layout; the same file as bench_server_speed.py)
and reads it once so the page cache holds it for every variant. Then, in one process with ComfyUI
imported, runs the variants in a shuffled order per round (seeded), one round to warm up and ``--rounds``
measured, and prints the median of each and its ratio to the peer's:

- ``node, first load``: the Load Motion Model node as the first load of the file in a server session
  (its SHA-256, shown in the node's info, not yet remembered);
- ``node, again``: the same node with the hash remembered (what every later load costs);
- ``loading only``: the pack's loader without the node (file -> MotionModel in ComfyUI's ModelPatcher);
- ``SHA-256 only``: the AutoV2 hash of the file alone;
- ``peer``: with ``--peer /path/to/ComfyUI-AnimateDiff-Evolved``, its ``load_motion_module_gen2`` (file ->
  its motion model in its ModelPatcher), which computes no hash.

    COMFYUI_PATH=/path/to/ComfyUI python tests/benchmarks/bench_load.py [--peer DIR] [--rounds 7] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import random
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def read_once(path: str) -> None:
    """Into the page cache, for every variant alike."""
    with open(path, "rb") as handle:
        while handle.read(1 << 24):
            pass


def import_peer(checkout: str):
    """The peer's Gen2 loader, its package imported as ComfyUI imports a custom node."""
    spec = importlib.util.spec_from_file_location("ade_peer", os.path.join(checkout, "__init__.py"),
                                                  submodule_search_locations=[checkout])
    module = importlib.util.module_from_spec(spec)
    sys.modules["ade_peer"] = module
    spec.loader.exec_module(module)
    from ade_peer.animatediff.model_injection import load_motion_module_gen2

    return load_motion_module_gen2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", help="a ComfyUI-AnimateDiff-Evolved checkout (its Gen2 loader)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--workdir", help="where the model file goes (default: a temp dir)")
    args = parser.parse_args()
    comfyui = os.environ.get("COMFYUI_PATH")
    if not comfyui:
        sys.exit("set COMFYUI_PATH=/path/to/ComfyUI")
    import comfy_env

    comfy_env.import_comfyui(comfyui)
    import ads_package

    ads_package.register()
    import folder_paths
    from bench_server_speed import MOTION, write_motion_model

    from animatediff_suite.nodes import folders, injection, motion_nodes

    folder = os.path.join(args.workdir or tempfile.mkdtemp(prefix="ads_bench_load_"), "animatediff_models")
    path = write_motion_model(folder)
    read_once(path)
    folders.register_folders()
    folder_paths.add_model_folder_path(folders.MOTION_MODELS, folder)
    peer = import_peer(args.peer) if args.peer else None
    if peer is not None:
        folder_paths.add_model_folder_path(folders.MOTION_MODELS, folder)  # the peer registers the name itself

    def first_load():
        folders._sha256.cache_clear()
        return motion_nodes.LoadMotionModel.execute(MOTION)

    variants = {"node, first load": first_load,
                "node, again": lambda: motion_nodes.LoadMotionModel.execute(MOTION),
                "loading only": lambda: injection.load_motion_patcher(path, MOTION),
                "SHA-256 only": lambda: folders._sha256.__wrapped__(path, 0, 0)}
    if peer is not None:
        variants["peer"] = lambda: peer(MOTION)
    times = {name: [] for name in variants}
    order, shuffle = list(variants), random.Random(0).shuffle
    for number in range(args.rounds + 1):  # round 0 warms up (imports, allocator) and is not counted
        shuffle(order)  # memory-bound work: what ran just before (freed or cached memory) matters
        for name in order:
            run = variants[name]
            gc.collect()
            start = time.perf_counter()
            result = run()
            if number:
                times[name].append(time.perf_counter() - start)
            del result
    size = os.path.getsize(path) / 2**30
    print(f"full v2 motion model, fp16 safetensors ({size:.2f} GiB), {args.rounds} rounds, shuffled order, "
          f"CPU ({os.cpu_count()} cores)")
    peer_median = statistics.median(times["peer"]) if peer is not None else None
    print("| variant | median s | min s | vs peer |")
    print("|---|---|---|---|")
    for name, values in times.items():
        ratio = f"{statistics.median(values) / peer_median:.2f}" if peer_median else "-"
        print(f"| {name} | {statistics.median(values):.3f} | {min(values):.3f} | {ratio} |")


if __name__ == "__main__":
    main()

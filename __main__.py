"""Run an AnimateDiff text-to-video job through a real ComfyUI, headless, over its HTTP API; or train.

    python path/to/ComfyUI-AnimateDiff-Suite                 # tiny built-in demo model, no downloads
    python path/to/ComfyUI-AnimateDiff-Suite --checkpoint dreamshaper_8.safetensors \\
        --motion-model mm_sd_v15_v2.ckpt --motion-lora v2_lora_ZoomIn.ckpt:0.8 --prompt "a fox in snow"

Without ``--server`` it starts a private ComfyUI (``main.py`` of ``--comfyui``, ``$COMFYUI_PATH`` or the
ComfyUI this pack is installed in) on a free loopback port, queues the graph of
``example_workflows/api/txt2vid_sd15.json``, waits on ``/history`` and prints the files written to
ComfyUI's output folder (an animated WebP and an MP4). The same helpers drive the end-to-end tests.

    python path/to/ComfyUI-AnimateDiff-Suite train --config run.toml [--resume] [--dry-run]

trains in this process with ComfyUI imported as a library (training/cli.py; no server).

    python path/to/ComfyUI-AnimateDiff-Suite import-ade ade_workflow.json converted.json

maps a ComfyUI-AnimateDiff-Evolved workflow (editor or API format) to this pack's nodes and prints
what it could not map (nodes/ade_import.py; no ComfyUI needed).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(ROOT, "example_workflows", "api")


class ComfyServerError(RuntimeError):
    """The server could not start, refused a prompt, or a prompt failed."""


def find_comfyui(path: str | None = None) -> str:
    for candidate in (path, os.environ.get("COMFYUI_PATH"), os.path.join(ROOT, "..", "..")):
        if candidate and os.path.isfile(os.path.join(candidate, "main.py")):
            return os.path.abspath(candidate)
    raise ComfyServerError("ComfyUI not found: pass --comfyui /path/to/ComfyUI, set COMFYUI_PATH, or "
                           "install this pack in ComfyUI/custom_nodes/")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyServer:
    """A ComfyUI HTTP API client; ``start`` launches a private server on loopback."""

    def __init__(self, url: str, process: subprocess.Popen | None = None, log_path: str | None = None):
        self.url = url.rstrip("/")
        self.process = process
        self.log_path = log_path
        self.client_id = uuid.uuid4().hex

    @classmethod
    def start(cls, comfyui: str, workdir: str, extra_args=(), model_folders: dict | None = None,
              timeout: float = 180.0) -> "ComfyServer":
        """Start ``main.py`` with this pack loaded and ``model_folders`` ({folder name: path}) visible."""
        port = free_port()
        in_custom_nodes = os.path.realpath(os.path.dirname(ROOT)) == os.path.realpath(os.path.join(comfyui, "custom_nodes"))
        config = dict(model_folders or {})
        if not in_custom_nodes:
            nodes_dir = os.path.join(workdir, "custom_nodes")
            os.makedirs(nodes_dir, exist_ok=True)
            link = os.path.join(nodes_dir, "ComfyUI-AnimateDiff-Suite")
            if not os.path.lexists(link):
                os.symlink(ROOT, link)
            config["custom_nodes"] = nodes_dir
        yaml_path = os.path.join(workdir, "extra_model_paths.yaml")
        with open(yaml_path, "w", encoding="utf-8") as handle:
            handle.write("animatediff_suite:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in config.items()))
        log_path = os.path.join(workdir, "comfyui.log")
        command = [sys.executable, os.path.join(comfyui, "main.py"), "--listen", "127.0.0.1", "--port", str(port),
                   "--disable-auto-launch", "--extra-model-paths-config", yaml_path, *extra_args]
        log = open(log_path, "w", encoding="utf-8")
        process = subprocess.Popen(command, cwd=comfyui, stdout=log, stderr=subprocess.STDOUT)
        server = cls(f"http://127.0.0.1:{port}", process, log_path)
        server.wait_ready(timeout)
        return server

    def log_tail(self, chars: int = 4000) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()[-chars:]

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ComfyServerError(f"ComfyUI exited with code {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                self.get("/system_stats")
                return
            time.sleep(0.5)
        raise ComfyServerError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def queue(self, graph: dict) -> str:
        """POST /prompt; returns the prompt id or raises with the server's node_errors."""
        body = json.dumps({"prompt": graph, "client_id": self.client_id}).encode()
        request = urllib.request.Request(self.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())["prompt_id"]
        except urllib.error.HTTPError as exc:
            detail = json.loads(exc.read() or b"{}")
            error = ComfyServerError(f"prompt refused ({exc.code}): {json.dumps(detail)[:2000]}")
            error.detail = detail
            raise error from None

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """Poll /history until the prompt finished; returns its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            if self.process is not None and self.process.poll() is not None:
                raise ComfyServerError(f"ComfyUI exited while running the prompt:\n{self.log_tail()}")
            time.sleep(0.5)
        raise ComfyServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def run(self, graph: dict, timeout: float = 600.0) -> dict:
        entry = self.wait(self.queue(graph), timeout)
        if entry["status"].get("status_str") == "error":
            messages = [m for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
            error = ComfyServerError(f"prompt failed: {json.dumps(messages)[:2000]}")
            error.messages = messages
            raise error
        return entry


def output_files(entry: dict) -> list[dict]:
    """Every file entry (filename, subfolder, type) a finished prompt reported."""
    files = []
    for node_output in entry.get("outputs", {}).values():
        for items in node_output.values():
            if isinstance(items, list):
                files += [i for i in items if isinstance(i, dict) and "filename" in i]
    return files


def load_example(name: str) -> dict:
    with open(os.path.join(EXAMPLES, f"{name}.json"), encoding="utf-8") as handle:
        return json.load(handle)


def use_tiny_models(graph: dict, seed: int = 0, swap_motion_loaders: bool = True) -> dict:
    """Replace every CheckpointLoaderSimple with ADS_TinyDemoModels (same first three outputs) and,
    if asked, every ADS_LoadMotionModel with the demo's matching motion model."""
    graph = copy.deepcopy(graph)
    demo_id = None
    for node_id, node in graph.items():
        if node["class_type"] == "CheckpointLoaderSimple":
            family = "SDXL" if "xl" in node["inputs"]["ckpt_name"].lower() else "SD1.5"
            node.update(class_type="ADS_TinyDemoModels", _meta={"title": "Tiny Demo Models"},
                        inputs={"seed": seed, "family": family,
                                "motion_version": "sdxl_beta" if family == "SDXL" else "v3"})
            demo_id = node_id
    if swap_motion_loaders and demo_id is not None:
        for loader_id in [i for i, n in graph.items() if n["class_type"] == "ADS_LoadMotionModel"]:
            del graph[loader_id]
            for other in graph.values():
                for key, value in other["inputs"].items():
                    if value == [loader_id, 0]:
                        other["inputs"][key] = [demo_id, 3]
    return graph


def customise(graph: dict, args) -> dict:
    """Apply the command-line settings to the txt2vid example graph."""
    graph = copy.deepcopy(graph)
    by_type = {}
    for node_id, node in graph.items():
        by_type.setdefault(node["class_type"], []).append(node_id)
    positive, negative = by_type["CLIPTextEncode"]
    graph[positive]["inputs"]["text"] = args.prompt
    graph[negative]["inputs"]["text"] = args.negative
    graph[by_type["EmptyLatentImage"][0]]["inputs"].update(width=args.width, height=args.height, batch_size=args.frames)
    graph[by_type["KSampler"][0]]["inputs"].update(seed=args.seed, steps=args.steps, cfg=args.cfg)
    for node_type in ("SaveAnimatedWEBP", "CreateVideo"):
        graph[by_type[node_type][0]]["inputs"]["fps"] = args.fps
    if args.checkpoint:
        graph[by_type["CheckpointLoaderSimple"][0]]["inputs"]["ckpt_name"] = args.checkpoint
        graph[by_type["ADS_LoadMotionModel"][0]]["inputs"]["model_name"] = args.motion_model
        previous = None
        for index, spec in enumerate(args.motion_lora or []):
            name, colon, strength = spec.rpartition(":")
            name, strength = (name, float(strength)) if colon else (spec, 1.0)
            node_id = f"lora{index}"
            graph[node_id] = {"class_type": "ADS_LoadMotionLora", "inputs": {"lora_name": name, "strength": strength}}
            if previous:
                graph[node_id]["inputs"]["prev_motion_lora"] = [previous, 0]
            previous = node_id
        if previous:
            graph[by_type["ADS_ApplyMotionModel"][0]]["inputs"]["motion_lora"] = [previous, 0]
    else:
        graph = use_tiny_models(graph, seed=args.seed)
    return _add_long_clip_nodes(graph, args, by_type["ADS_ApplyMotionModel"][0], by_type["KSampler"][0])


def _add_long_clip_nodes(graph: dict, args, apply_id: str, sampler_id: str) -> dict:
    """Context Options past ``--context-length`` frames (or with ``--freenoise``), and FreeInit."""
    if args.frames > args.context_length or args.freenoise:
        graph["context"] = {"class_type": "ADS_ContextOptions", "inputs": {
            "context_length": args.context_length, "context_overlap": args.context_length // 4, "context_stride": 1,
            "closed_loop": False, "schedule": "standard_static", "fuse_method": "pyramid",
            "noise_type": "shuffle_context" if args.freenoise else "default", "scope": "whole_model",
            "stretch_pe": False, "window_batch": 1}}
        graph[apply_id]["inputs"]["context_options"] = ["context", 0]
    if args.freeinit > 1:
        graph["freeinit"] = {"class_type": "ADS_FreeInit", "inputs": {
            "model": [apply_id, 0], "iterations": args.freeinit, "filter": "butterworth", "spatial_stop": 0.25,
            "temporal_stop": 0.25, "butterworth_order": 4, "fast_sampling": False}}
        graph[sampler_id]["inputs"]["model"] = ["freeinit", 0]
    return graph


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python ComfyUI-AnimateDiff-Suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH or the one this pack is in)")
    parser.add_argument("--server", help="queue on this running ComfyUI (e.g. http://127.0.0.1:8188) instead")
    parser.add_argument("--cpu", action="store_true", help="start ComfyUI with --cpu")
    parser.add_argument("--checkpoint", help="SD1.5 checkpoint in models/checkpoints (default: tiny demo model)")
    parser.add_argument("--motion-model", default="mm_sd_v15_v2.ckpt", help="file in models/animatediff_models")
    parser.add_argument("--motion-lora", action="append", metavar="NAME[:STRENGTH]",
                        help="MotionLoRA in models/animatediff_motion_lora; repeat to chain")
    parser.add_argument("--prompt", default="a corgi running on a beach, golden hour, high quality")
    parser.add_argument("--negative", default="worst quality, low quality, blurry, watermark")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--context-length", type=int, default=16,
                        help="more frames than this are sampled in overlapping windows of this many")
    parser.add_argument("--freenoise", action="store_true", help="FreeNoise shuffled noise (adds context windows)")
    parser.add_argument("--freeinit", type=int, default=1, metavar="N", help="FreeInit with N sampling passes")
    args = parser.parse_args(argv)
    demo = not args.checkpoint
    args.width = args.width or (64 if demo else 512)
    args.height = args.height or (64 if demo else 512)
    args.steps = args.steps or (4 if demo else 25)
    return args


def train(argv) -> int:
    """Import this folder as the package ``animatediff_suite`` (whatever it is called) and run its trainer."""
    import importlib.util

    # the script's folder is sys.path[0]: our nodes/ package must not shadow ComfyUI's nodes module
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != ROOT]
    if "animatediff_suite" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "animatediff_suite", os.path.join(ROOT, "__init__.py"), submodule_search_locations=[ROOT])
        module = importlib.util.module_from_spec(spec)
        sys.modules["animatediff_suite"] = module
        spec.loader.exec_module(module)
    from animatediff_suite.training.cli import main as train_main

    return train_main(argv)


def ade_importer():
    """nodes/ade_import.py, loaded without ComfyUI (it needs none): ``nodes/`` as a package whose
    ``__init__`` (which registers the ComfyUI nodes) is not run. Where this pack's nodes are already
    imported as ``animatediff_suite.nodes`` (the tests with ComfyUI), that copy is the one returned, so
    one process never holds two importers (and a mutation run sees the module under its own name)."""
    import importlib
    import types

    loaded = sys.modules.get("animatediff_suite.nodes.ade_import")
    if loaded is not None:
        return loaded
    if "animatediff_suite_ade" not in sys.modules:
        package = types.ModuleType("animatediff_suite_ade")
        package.__path__ = [os.path.join(ROOT, "nodes")]
        sys.modules["animatediff_suite_ade"] = package
    return importlib.import_module("animatediff_suite_ade.ade_import")


def import_ade(argv: list[str]) -> int:
    """``import-ade IN.json OUT.json``: convert an AnimateDiff-Evolved workflow, print the report."""
    return ade_importer().main(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        return train(argv[1:])
    if argv[:1] == ["import-ade"]:
        return import_ade(argv[1:])
    args = parse_args(argv)
    graph = customise(load_example("txt2vid_sd15"), args)
    with tempfile.TemporaryDirectory(prefix="animatediff_suite_") as workdir:
        if args.server:
            server = ComfyServer(args.server)
        else:
            server = ComfyServer.start(find_comfyui(args.comfyui), workdir, ["--cpu"] if args.cpu else [])
        try:
            started = time.monotonic()
            entry = server.run(graph)
            elapsed = time.monotonic() - started
        except ComfyServerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            if not args.server:
                server.stop()
    for item in output_files(entry):
        print(os.path.join("output", item.get("subfolder", ""), item["filename"]))
    print(f"{args.frames} frames in {elapsed:.1f} s ({'tiny demo model' if not args.checkpoint else args.checkpoint})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

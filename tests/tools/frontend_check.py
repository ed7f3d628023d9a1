"""Check the UI examples in the real ComfyUI frontend: load each into headless Chromium, compare the
frontend's own graphToPrompt() with the API example, and (with --thumbnails) save the screenshots as
the templates' thumbnails (example_workflows/NAME.jpg, also used by the README).

Needs Debian's chromium and playwright-core from npm (NODE_PATH pointing at its node_modules):

    apt-get install chromium && (cd /tmp/pw && npm install playwright-core)
    NODE_PATH=/tmp/pw/node_modules COMFYUI_PATH=/path/to/ComfyUI python tests/tools/frontend_check.py --thumbnails
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--thumbnails", action="store_true", help="write example_workflows/NAME.jpg")
    args = parser.parse_args()
    runner = _load("ads_runner", os.path.join(ROOT, "__main__.py"))
    workflows = _load("ads_workflows", os.path.join(HERE, "workflows.py"))
    failures = 0
    with tempfile.TemporaryDirectory() as workdir:
        folders = {}
        for _, files, _ in workflows.EXAMPLES.values():  # empty files, so the dropdowns list the names
            for folder, description in files.items():
                if folder.startswith("models/"):
                    path = os.path.join(workdir, folder.split("/", 1)[1])
                    os.makedirs(path, exist_ok=True)
                    open(os.path.join(path, description.split()[0]), "wb").close()
                    folders[folder.split("/", 1)[1]] = path
        server = runner.ComfyServer.start(runner.find_comfyui(), workdir, ["--cpu"], model_folders=folders)
        try:
            for name, (graph, _, _) in workflows.EXAMPLES.items():
                png, out = os.path.join(workdir, f"{name}.png"), os.path.join(workdir, f"{name}.json")
                subprocess.run(["node", os.path.join(HERE, "frontend_check.js"), server.url,
                                os.path.join(ROOT, "example_workflows", f"{name}.json"), png, out], check=True)
                with open(out, encoding="utf-8") as handle:
                    produced = {k: {"class_type": v["class_type"], "inputs": v["inputs"]}
                                for k, v in json.load(handle).items()}
                same = produced == workflows.normalised(graph)
                failures += not same
                print(f"{name}: frontend graphToPrompt {'==' if same else '!='} API example")
                if args.thumbnails:
                    from PIL import Image

                    Image.open(png).convert("RGB").crop((90, 85, 1470, 870)).save(
                        os.path.join(ROOT, "example_workflows", f"{name}.jpg"), quality=82)
        finally:
            server.stop()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

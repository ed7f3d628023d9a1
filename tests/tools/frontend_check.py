"""Check the UI examples in the real ComfyUI frontend: load each into headless Chromium, compare the
frontend's own graphToPrompt() with the API example, and (with --thumbnails) save the screenshots as
the templates' thumbnails (example_workflows/NAME.jpg, also used by the README).

Needs Debian's chromium and playwright-core from npm (NODE_PATH pointing at its node_modules);
``bash .ci/run`` installs both and runs this as tests/test_frontend.py:

    apt-get install chromium && (cd /tmp/pw && npm install playwright-core)
    NODE_PATH=/tmp/pw/node_modules COMFYUI_PATH=/path/to/ComfyUI python tests/tools/frontend_check.py --thumbnails
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CHROMIUM = os.environ.get("ADS_CHROMIUM", "/usr/bin/chromium")


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def missing_browser_tools() -> str | None:
    """What the browser check lacks on this machine (None when it can run)."""
    if not os.path.isfile(CHROMIUM):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set ADS_CHROMIUM)"
    if shutil.which("node") is None:
        return "no node on PATH"
    found = subprocess.run(["node", "-e", "require.resolve('playwright-core')"], capture_output=True)
    if found.returncode:
        return "node cannot find playwright-core (npm install playwright-core; NODE_PATH=its node_modules)"
    return None


@dataclass
class FrontendResult:
    name: str
    prompt: dict  # graphToPrompt() output, reduced to class_type + inputs
    expected: dict  # the API example, normalised the same way
    console: list  # errors and warnings the page logged
    missing: list  # node types the frontend could not build
    screenshot: str
    text: tuple = (None, None)  # the page's text before and after a job's command
    preview: dict | None = None  # what checkPreview found
    run: dict | None = None  # what queueAnimated saw


def check_examples(comfyui: str, workdir: str, commands: tuple = (), previews: dict | None = None,
                   runs: tuple = (), model_files: dict | None = None) -> list[FrontendResult]:
    """Start a server with the pack and empty model files, load every UI example in Chromium; then each
    of ``commands`` ``(name, workflow, command id, expected API graph)``: load the workflow, run the
    pack's command on it, and read back the graph. ``previews``: {example: preview check} for the
    context-schedule preview (frontend_check.js ``checkPreview``), run before the API graph is read.
    ``runs``: ``(name, API graph, fps)``: the graph is laid out as a UI workflow, loaded and queued from
    the page with the animated preview at ``fps`` (``queueAnimated``); the screenshot is taken while
    it samples. Previews are on (``--preview-method latent2rgb``). ``model_files``: {folder: [paths]},
    real model files (for ``runs``) copied beside the empty ones."""
    runner = _load("ads_runner", os.path.join(ROOT, "__main__.py"))
    workflows = _load("ads_workflows", os.path.join(HERE, "workflows.py"))
    folders = {}
    for _, files, _ in workflows.EXAMPLES.values():  # empty files, so the dropdowns list the names
        for folder, description in files.items():
            if folder.startswith("models/"):
                path = os.path.join(workdir, folder.split("/", 1)[1])
                os.makedirs(path, exist_ok=True)
                open(os.path.join(path, description.split()[0]), "wb").close()
                folders[folder.split("/", 1)[1]] = path
    for folder, paths in (model_files or {}).items():
        folders.setdefault(folder, os.path.join(workdir, folder))
        os.makedirs(folders[folder], exist_ok=True)
        for path in paths:
            shutil.copy(path, folders[folder])
    server = runner.ComfyServer.start(comfyui, workdir, ["--cpu", "--output-directory", os.path.join(workdir, "out"),
                                                         "--preview-method", "latent2rgb"], model_folders=folders)
    results = []
    try:
        jobs = [{"workflow": os.path.join(ROOT, "example_workflows", f"{name}.json"),
                 "png": os.path.join(workdir, f"{name}.png"), "json": os.path.join(workdir, f"{name}.json")}
                for name in workflows.EXAMPLES]
        for job, name in zip(jobs, workflows.EXAMPLES):
            if name in (previews or {}):
                job["preview"] = previews[name]
        expected = {name: workflows.normalised(graph) for name, (graph, _, _) in workflows.EXAMPLES.items()}
        for name, workflow, command, graph in commands:
            path = os.path.join(workdir, f"{name}.workflow.json")
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(workflow, handle)
            jobs.append({"workflow": path, "command": command, "png": os.path.join(workdir, f"{name}.png"),
                         "json": os.path.join(workdir, f"{name}.json")})
            expected[name] = graph
        object_info = server.get("/object_info") if runs else {}
        for name, graph, fps in runs:
            path = os.path.join(workdir, f"{name}.workflow.json")
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(workflows.api_to_ui(graph, object_info, "animated sampling preview"), handle)
            jobs.append({"workflow": path, "run": {"fps": fps}, "png": os.path.join(workdir, f"{name}.png"),
                         "json": os.path.join(workdir, f"{name}.json")})
            expected[name] = workflows.normalised(graph)
        jobs_path = os.path.join(workdir, "jobs.json")
        with open(jobs_path, "w", encoding="utf-8") as handle:
            json.dump(jobs, handle)
        subprocess.run(["node", os.path.join(HERE, "frontend_check.js"), server.url, jobs_path], check=True, timeout=600)
        for job, name in zip(jobs, expected):
            png, out = job["png"], job["json"]
            with open(out, encoding="utf-8") as handle:
                shown = json.load(handle)
            prompt = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in shown["prompt"].items()}
            results.append(FrontendResult(name, prompt, expected[name], shown["console"], shown["missing"], png,
                                          (shown.get("before"), shown.get("after")), shown.get("preview"),
                                          shown.get("run")))
    finally:
        server.stop()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--thumbnails", action="store_true", help="write example_workflows/NAME.jpg")
    args = parser.parse_args()
    runner = _load("ads_runner", os.path.join(ROOT, "__main__.py"))
    failures = 0
    with tempfile.TemporaryDirectory() as workdir:
        for result in check_examples(runner.find_comfyui(), workdir):
            same = result.prompt == result.expected
            failures += not same
            print(f"{result.name}: frontend graphToPrompt {'==' if same else '!='} API example")
            if args.thumbnails:
                from PIL import Image

                Image.open(result.screenshot).convert("RGB").crop((90, 85, 1470, 870)).save(
                    os.path.join(ROOT, "example_workflows", f"{result.name}.jpg"), quality=82)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

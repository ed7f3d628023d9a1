"""Finding and importing a real ComfyUI for the ComfyUI test tier."""

from __future__ import annotations

import os
import sys

from ads_package import ROOT

SKIP_REASON = ("ComfyUI tier skipped: no ComfyUI found (set COMFYUI_PATH=/path/to/ComfyUI, "
               "or put this pack in ComfyUI/custom_nodes/)")


def skip_or_fail(reason: str) -> None:
    """Skip a test whose tier cannot run here, or fail it under ``.ci/run`` (ADS_REQUIRE_ALL_TIERS=1),
    which installs every tier: there a missing tier is a broken setup, not missing hardware."""
    import pytest

    if os.environ.get("ADS_REQUIRE_ALL_TIERS") == "1":
        pytest.fail(f"{reason} (.ci/run requires every tier)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def import_or_skip(name: str):
    """``pytest.importorskip`` that fails instead under ``.ci/run``, where every test requirement is
    installed: a reference library that stops importing must not turn parity tests into skips."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as error:
        skip_or_fail(f"{name} is not importable ({error}); install requirements-test.txt")


def comfyui_path() -> str | None:
    """COMFYUI_PATH, or the ComfyUI this pack is installed in; None if neither."""
    path = os.environ.get("COMFYUI_PATH")
    if path:
        if not os.path.isfile(os.path.join(path, "main.py")):
            raise RuntimeError(f"COMFYUI_PATH={path!r} is not a ComfyUI checkout (no main.py)")
        return os.path.abspath(path)
    parent = os.path.dirname(ROOT)
    if os.path.basename(parent) == "custom_nodes" and os.path.isfile(os.path.join(parent, "..", "main.py")):
        return os.path.abspath(os.path.join(parent, ".."))
    return None


def import_comfyui(path: str, cpu: bool = True) -> None:
    """Make ComfyUI importable in this process, on the CPU (like ``main.py --cpu``) unless ``cpu`` is
    False (the GPU checks under tests/gpu/ and benchmarks on a GPU machine)."""
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    import comfy.model_management  # noqa: F401  (reads the args above)
    import nodes

    if not os.path.samefile(os.path.dirname(nodes.__file__), path):
        raise RuntimeError(f"top-level 'nodes' resolves to {nodes.__file__}, not ComfyUI's")

"""Packaging rules: fixed import name, no top-level `nodes` shadowing, a ComfyUI-free core."""

import importlib.util
import os
import re

import animatediff_suite
from ads_package import ROOT


def test_pack_imports_under_fixed_name_without_comfyui():
    assert animatediff_suite.__name__ == "animatediff_suite"
    assert os.path.samefile(os.path.dirname(animatediff_suite.__file__), ROOT)
    assert animatediff_suite.WEB_DIRECTORY == "./web/js"


def test_our_nodes_package_is_never_top_level_nodes():
    spec = importlib.util.find_spec("nodes")
    assert spec is None or not os.path.dirname(spec.origin or "").startswith(ROOT)


def test_core_never_imports_comfy():
    pattern = re.compile(r"^\s*(import|from)\s+(comfy|comfy_api|folder_paths|nodes)\b", re.M)
    core = os.path.join(ROOT, "motion_modules")
    offenders = [name for name in os.listdir(core) if name.endswith(".py")
                 and pattern.search(open(os.path.join(core, name), encoding="utf-8").read())]
    assert offenders == []

"""The README's boundary claims, checked against the imports: which node modules touch ComfyUI's
internals (``comfy``, ``comfy_extras``, ``comfy_execution``, ``latent_preview``, ``protocol``; the public
node API ``comfy_api`` and ``folder_paths`` do not count), and that the core never imports ComfyUI at all."""

import ast
import os
import re

from ads_package import ROOT


def comfy_imports(path: str) -> set[str]:
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return {n for n in names if n.split(".")[0] in ("comfy", "comfy_extras", "comfy_execution", "latent_preview",
                                                     "protocol")}


def python_files(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(os.path.join(ROOT, folder)) if f.endswith(".py"))


def test_readme_names_exactly_the_node_modules_that_touch_comfyui_internals():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    sentence = re.search(r"ComfyUI internals are touched by (.*?); the other node modules", readme)
    assert sentence, "README's layout table no longer states which node modules touch ComfyUI internals"
    claimed = set(re.findall(r"`nodes/(\w+\.py)`", sentence.group(1)))
    touching = {f for f in python_files("nodes") if comfy_imports(os.path.join(ROOT, "nodes", f))}
    assert claimed == touching


def test_the_core_never_imports_comfyui():
    for name in python_files("motion_modules"):
        path = os.path.join(ROOT, "motion_modules", name)
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read(), path)
        modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module}
        assert not {m for m in modules if m.split(".")[0] in ("comfy", "comfy_extras", "comfy_api", "folder_paths",
                                                              "nodes")}, name

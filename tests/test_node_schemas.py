"""Every node's schema as ComfyUI's /object_info serves it (``GET_NODE_INFO_V1``: inputs with their defaults,
limits, options and tooltips, outputs, names, descriptions) against the snapshot checked in at
``tests/snapshots/node_schemas.json``. A schema change shows here and is made on purpose:
``ADS_UPDATE_SNAPSHOTS=1`` rewrites the snapshot, whose diff is then reviewed like code. Model files and input
subfolders in combo options (which depend on what the folders hold) are left out."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from ads_package import ROOT

pytestmark = pytest.mark.comfyui
SNAPSHOT = os.path.join(ROOT, "tests", "snapshots", "node_schemas.json")
KEYS = ("display_name", "category", "description", "input", "input_order", "output", "output_name",
        "output_is_list", "output_tooltips", "output_node")


def _files() -> set[str]:
    """Model files and the input directory's subfolders (the training nodes' folder combo): what the
    machine's folders hold, not the schema; the input subfolders also depend on which ComfyUI nodes
    were imported before (the 3D loader makes ``input/3d``)."""
    import folder_paths

    names = {name for folder in folder_paths.folder_names_and_paths for name in folder_paths.get_filename_list(folder)}
    return names | set(folder_paths.get_input_subfolders())


def _plain(value, files):
    """JSON-ready, with the model files left out of combo options (they depend on what the folders hold)."""
    if isinstance(value, dict):
        return {str(k): ([o for o in _plain(v, files) if o not in files] if k == "options" else _plain(v, files))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, files) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def schemas() -> dict:
    from animatediff_suite.nodes import AnimateDiffSuiteExtension

    files = _files()
    found = {}
    for node in asyncio.run(AnimateDiffSuiteExtension().get_node_list()):
        info = node.GET_NODE_INFO_V1()
        found[info["name"]] = {key: _plain(info.get(key), files) for key in KEYS}
    return found


def test_node_schemas_equal_the_snapshot(comfyui):
    found = schemas()
    if os.environ.get("ADS_UPDATE_SNAPSHOTS") == "1":
        with open(SNAPSHOT, "w", encoding="utf-8") as handle:
            json.dump(found, handle, indent=1, sort_keys=True)
            handle.write("\n")
    with open(SNAPSHOT, encoding="utf-8") as handle:
        expected = json.load(handle)
    assert sorted(found) == sorted(expected)
    for name in sorted(expected):
        for key in KEYS:
            assert found[name][key] == expected[name][key], f"{name}: {key} differs from the snapshot"

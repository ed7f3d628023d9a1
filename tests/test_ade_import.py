"""The AnimateDiff-Evolved workflow importer without ComfyUI: mapped graphs against graphs written
out by hand (tests/ade_workflows.py), the report, the editor format's links, the command line.
The ComfyUI tier (test_comfy_server.py) checks the editor format against the real node
schemas and runs every imported graph on a real server."""

from __future__ import annotations

import copy
import importlib
import json
import os
import subprocess
import sys

import pytest

import ade_workflows as ade
from ads_package import ROOT, load_module

runner = load_module("ads_runner", "__main__.py")
importer = runner.ade_importer()
mapping = importlib.import_module(".ade_mapping", importer.__package__)  # the importer's own package


def convert(workflow):
    before = copy.deepcopy(workflow)
    converted, report, mapped = importer.convert(workflow)
    assert workflow == before, "the input workflow was modified"
    return converted, report, mapped


def kinds(report):
    """[(kind, node id)] of report lines 'kind: node ID (TYPE): ...'."""
    return [(line.split(": ", 1)[0], line.split("node ", 1)[1].split(" ", 1)[0]) for line in report]


def test_gen2_workflow_maps_to_the_hand_written_graph():
    converted, report, mapped = convert(ade.GEN2_API)
    assert converted == ade.GEN2_EXPECTED
    assert kinds(report) == ade.GEN2_REPORT_KINDS
    assert mapped == 10  # every ADE node: loader, LoRA, multival, apply, context, FreeInit, settings, ...


def test_gen1_loader_with_unload_and_a_noise_select_checkpoint_loader():
    converted, report, mapped = convert(ade.GEN1_API)
    assert converted == ade.GEN1_EXPECTED
    assert report == [] and mapped == 5


def test_views_only_context_options_become_the_motion_attention_scope():
    converted, report, mapped = convert(ade.VIEWS_API)
    assert converted == ade.VIEWS_EXPECTED
    assert kinds(report) == [("approximate", "2")] and mapped == 6


def test_a_newer_ade_release_is_read_by_the_widget_names_it_saved():
    workflow = copy.deepcopy(ade.LEGACY_UI)
    lora = next(n for n in workflow["nodes"] if n["type"] == "ADE_AnimateDiffLoRALoader")
    lora["widgets_values"] = ["v2_lora_ZoomIn.ckpt", "linear", 0.7]  # a made-up widget before strength
    lora["inputs"] += [{"name": "name", "type": "COMBO", "link": None, "widget": {"name": "name"}},
                       {"name": "blend", "type": "COMBO", "link": None, "widget": {"name": "blend"}},
                       {"name": "strength", "type": "FLOAT", "link": None, "widget": {"name": "strength"}}]
    converted, report, _ = convert(workflow)
    ours = next(n for n in converted["nodes"] if n["id"] == lora["id"])
    assert ours["type"] == "ADS_LoadMotionLora" and ours["widgets_values"] == ["v2_lora_ZoomIn.ckpt", 0.7]
    assert [line for line in report if f"node {lora['id']} " in line] == [
        f"warning: node {lora['id']} (ADE_AnimateDiffLoRALoader): 3 widget values saved by another ADE release; "
        "read by the widget names it saved",
        f"option not mapped: node {lora['id']} (ADE_AnimateDiffLoRALoader): widgets this importer does not know: "
        "blend"]


def test_api_inputs_of_another_ade_release_are_read_by_name_and_unknown_ones_listed():
    graph = copy.deepcopy(ade.GEN1_API)
    graph["2"]["inputs"]["context_window_jitter"] = 0.5  # an input this importer does not know
    del graph["2"]["inputs"]["closed_loop"]  # an input an older release did not have: ADE's default
    converted, report, _ = convert(graph)
    assert report == ["option not mapped: node 2 (ADE_LoopedUniformContextOptions): inputs this importer does "
                      "not know (another ADE release?): context_window_jitter"]
    assert converted["13"]["inputs"]["closed_loop"] is False


def test_every_unmappable_node_and_option_is_reported_and_unmapped_nodes_are_kept():
    converted, report, _ = convert(ade.UNMAPPED_API)
    assert len(report) == len(ade.UNMAPPED_REPORT), "\n".join(report)
    for kind, node_id, words in ade.UNMAPPED_REPORT:
        hits = [line for line in report if line.startswith(f"{kind}: node {node_id} (") and words in line]
        assert len(hits) == 1, (kind, node_id, words, report)
    types = {node_id: node["class_type"] for node_id, node in converted.items()}
    # kept as they were: the ADE nodes that could not be mapped, and the context options they read
    for node_id in ("6", "11", "12", "13"):
        assert converted[node_id] == ade.UNMAPPED_API[node_id]
    # mapped: loader, and FreeInit (in node 10's place) over a new Apply with new context options
    assert types["2"] == "ADS_LoadMotionModel" and types["10"] == "ADS_FreeInit"
    apply_id = converted["10"]["inputs"]["model"][0]
    apply = converted[apply_id]["inputs"]
    assert (apply["motion_scale"], apply["beta_schedule"], apply["norm_semantics"]) == (1.0, "auto",
                                                                                         "AnimateDiff-Evolved")
    context = converted[apply["context_options"][0]]["inputs"]
    assert (context["schedule"], context["fuse_method"], context["noise_type"]) == ("standard_static", "pyramid",
                                                                                     "default")
    assert converted["10"]["inputs"] == {"model": [apply_id, 0], "iterations": 3, "filter": "gaussian",
                                         "spatial_stop": 0.3, "temporal_stop": 0.2, "butterworth_order": 4,
                                         "fast_sampling": False}
    # the nodes that only fed dropped options are gone with them
    assert not {"3", "4", "5", "7", "8", "9"} & set(converted)


def test_settings_from_elsewhere_and_missing_context_options_are_reported_and_left_out():
    """Connected inputs with no equivalent: the gen2 loader's ad_settings (with the ADE nodes that only fed it),
    sample_settings that do not come from Sample Settings (ADE's default noise then), context options whose
    link leads to no node."""
    graph = copy.deepcopy(ade.GEN2_API)
    graph["2"]["inputs"]["ad_settings"] = ["20", 0]
    graph["20"] = {"class_type": "ADE_AnimateDiffSettings", "inputs": {"pe_adjust": ["21", 0]}}
    graph["21"] = {"class_type": "ADE_AdjustPESweetspotStretch", "inputs": {"sweetspot": 16, "new_sweetspot": 24}}
    converted, report, _ = convert(graph)
    assert report[0] == ("option not mapped: node 2 (ADE_LoadAnimateDiffModel): ad_settings is connected but has "
                         "no equivalent; left out (with the ADE nodes that only fed it)")
    assert converted["2"] == ade.GEN2_EXPECTED["2"] and not {"20", "21"} & set(converted)

    graph = copy.deepcopy(ade.GEN1_API)
    graph["4"] = {"class_type": "ADE_AnimateDiffSettings", "inputs": {}}
    converted, report, _ = convert(graph)
    assert report == ["option not mapped: node 3 (ADE_AnimateDiffLoaderGen1): sample_settings does not come from "
                      "Sample Settings; left out"]
    assert converted["13"] == {"class_type": "ADS_ContextOptions",
                               "inputs": {**ade.GEN1_EXPECTED["13"]["inputs"], "noise_type": "default"}}

    graph = copy.deepcopy(ade.GEN1_API)
    graph["3"]["inputs"]["context_options"] = ["99", 0]
    del graph["2"]
    converted, report, _ = convert(graph)
    assert report == ["option not mapped: node 3 (ADE_AnimateDiffLoaderGen1): context_options from nothing has no "
                      "equivalent; left out"]
    expected = dict(ade.GEN1_EXPECTED["3"]["inputs"])
    del expected["context_options"]
    assert converted["3"] == {"class_type": "ADS_ApplyMotionModel", "inputs": expected} and "13" not in converted


def test_editor_format_new_nodes_sit_where_their_ade_node_was():
    """Nodes written in place of an ADE node start at its position, each further one 30 px right and down;
    an ADE node saved without a position (none, or an empty list) places them from the origin."""
    converted, _, _ = convert(ade.LEGACY_UI)
    pos = {n["id"]: n["pos"] for n in converted["nodes"]}
    # 4: the legacy loader at [420, 0] -> Apply (4) and its loader (13); 2: context options at [0, 200];
    # 10: the MotionLoRA loader at [0, 500]
    assert (pos[4], pos[13], pos[14], pos[10]) == ([420, 0], [450, 30], [0, 200], [0, 500])
    workflow = copy.deepcopy(ade.LEGACY_UI)
    for node in workflow["nodes"]:
        if node["id"] == 4:
            del node["pos"]
        elif node["id"] == 2:
            node["pos"] = []
    converted, _, _ = convert(workflow)
    pos = {n["id"]: n["pos"] for n in converted["nodes"]}
    assert (pos[4], pos[13], pos[14], pos[10]) == ([0, 0], [30, 30], [0, 0], [0, 500])


def test_editor_format_keeps_links_consistent_and_lists_the_report_in_a_note():
    converted, report, mapped = convert(ade.LEGACY_UI)
    assert mapped == 3  # context options, the legacy loader, the MotionLoRA loader
    nodes = {n["id"]: n for n in converted["nodes"]}
    links = {row[0]: row for row in converted["links"]}
    assert len(links) == len(converted["links"])
    for link_id, origin, slot, target, target_slot, kind in converted["links"]:
        assert link_id in nodes[origin]["outputs"][slot]["links"]
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
        assert nodes[origin]["outputs"][slot]["type"] == kind or nodes[origin]["type"] == "Reroute"
    for node in nodes.values():
        for socket in node.get("inputs") or []:
            assert socket["link"] is None or links[socket["link"]][3] == node["id"]
    # the reroute that carried ADE's context options went with them; links between kept nodes keep their ids
    assert 3 not in nodes and 2 not in nodes
    kept = (2, 3, 4, 8, 9, 10, 11, 14)
    assert {k: links[k][1:5] for k in kept} == {r[0]: r[1:5] for r in ade.LEGACY_UI["links"] if r[0] in kept}
    assert converted["last_link_id"] >= max(links) and converted["last_node_id"] >= max(nodes)
    # an older ADE release saved 2 of the legacy loader's 4 widgets: read by position, and said so
    assert kinds(report) == [("warning", "4")]
    assert "2 widget values" in report[0] and "older" in report[0]
    note = next(n for n in nodes.values() if n["type"] == "Note")
    assert note["widgets_values"] == ["\n".join(report)]
    assert converted["extra"]["animatediff_suite_import"] == {"report": report}


@pytest.mark.parametrize("name", ["txt2vid_freeinit", "long_loop_sd15", "txt2vid_motionlora"])
def test_a_workflow_without_ade_nodes_comes_back_unchanged(name):
    with open(os.path.join(ROOT, "example_workflows", f"{name}.json"), encoding="utf-8") as handle:
        workflow = json.load(handle)
    assert convert(workflow) == (workflow, [], 0)
    api = runner.load_example(name)
    assert convert(api) == (api, [], 0)


def test_links_saved_as_objects_are_written_back_as_objects():
    workflow = copy.deepcopy(ade.LEGACY_UI)
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    workflow["links"] = [dict(zip(keys, row)) for row in workflow["links"]]
    converted, _, _ = convert(workflow)
    as_rows, _, _ = convert(ade.LEGACY_UI)
    assert converted["links"] == [dict(zip(keys, row)) for row in as_rows["links"]]


@pytest.mark.parametrize("text, expected", [
    ('"0": "a cat",\n"8": "a dog"', [(0, "a cat"), (8, "a dog")]),
    ('0 = "a cat", 8 = "a\\"dog\\""', [(0, "a cat"), (8, 'a"dog"')]),
    ('"4": "two\n lines",', [(4, "two lines")]),
    ('"0": "a", "-1": "b"', None),      # from the end
    ('"0.5": "a"', None),               # relative
    ('"0:8": "a"', None),               # range
    ('"0": "a `key` b"', None),         # value key
    ("0: a cat", None),                 # not ADE's syntax
    ("", None),
])
def test_prompt_schedules(text, expected):
    assert mapping.parse_ade_prompts(text) == expected


def test_prompt_scheduling_latents_takes_the_frame_count_from_the_latent_and_passes_it_on():
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}},
        "2": {"class_type": "ADE_EmptyLatentImageLarge", "inputs": {"width": 256, "height": 256, "batch_size": 24}},
        "3": {"class_type": "ADE_PromptSchedulingLatents", "inputs": {
            "prompts": '"0": "day", "12": "night"', "clip": ["1", 1], "latent": ["2", 0],
            "prepend_text": ["5", 0], "print_schedule": True, "tensor_interp": "lerp"}},
        "4": {"class_type": "KSampler", "inputs": {"positive": ["3", 0], "latent_image": ["3", 1]}},
        "5": {"class_type": "PrimitiveStringMultiline", "inputs": {"value": "masterpiece"}},
    }
    converted, report, mapped = convert(graph)
    assert converted["3"] == {"class_type": "ADS_PromptTravel", "inputs": {
        "clip": ["1", 1], "text": "0: day\n12: night", "frames": 24, "prefix": ["5", 0], "suffix": "",
        "interpolation": "linear"}}
    assert converted["4"]["inputs"] == {"positive": ["3", 0], "latent_image": ["2", 0]}
    assert kinds(report) == [("option not mapped", "3")] and "print_schedule" in report[0]
    assert mapped == 2


def test_not_a_workflow_is_an_error_naming_what_was_expected():
    for bad in ({}, [], {"nodes": "x"}, {"1": {"inputs": {}}}):
        with pytest.raises(importer.WorkflowError, match="not a ComfyUI workflow"):
            importer.convert(bad)
    for broken in ({"nodes": [{"type": "KSampler"}], "links": []},  # a node without an id
                   {"1": {"class_type": "ADE_AnimateDiffLoRALoader", "inputs": "x"}}):
        with pytest.raises(importer.WorkflowError, match="could not be read"):
            importer.convert(broken)


def test_command_line(tmp_path):
    source, target = tmp_path / "ade.json", tmp_path / "out.json"
    source.write_text(json.dumps(ade.UNMAPPED_API), encoding="utf-8")
    done = subprocess.run([sys.executable, "-P", os.path.join(ROOT, "__main__.py"), "import-ade", str(source),
                           str(target)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    expected, report, mapped = importer.convert(ade.UNMAPPED_API)
    assert json.loads(target.read_text(encoding="utf-8")) == expected
    lines = done.stdout.splitlines()
    assert lines[0] == f"{target}: {mapped} AnimateDiff-Evolved node(s) mapped, {len(report)} report line(s)"
    assert [line.strip() for line in lines[1:]] == report
    assert "comfy" not in done.stderr.lower()

    source.write_text("{not json", encoding="utf-8")
    done = subprocess.run([sys.executable, "-P", os.path.join(ROOT, "__main__.py"), "import-ade", str(source),
                           str(target)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and str(source) in done.stderr


def test_editor_format_state_note_and_an_option_without_equivalent_written_out():
    """A workflow of the newer frontend (with "state"), whose legacy loader saved all four widgets with
    apply_v2_models_properly false: the state's ids follow the written graph, the report line is the whole
    sentence, and the Note holding the report is the node written out here (above the topmost node)."""
    workflow = copy.deepcopy(ade.LEGACY_UI)
    workflow["state"] = {"lastGroupId": 3, "lastNodeId": 0, "lastLinkId": 0, "lastRerouteId": 0}
    loader = next(n for n in workflow["nodes"] if n["type"] == "ADE_AnimateDiffLoaderWithContext")
    loader["widgets_values"] = ["mm_sd_v15_v2.ckpt", "sqrt_linear (AnimateDiff)", 1.0, False]
    converted, report, _ = convert(workflow)
    assert report == [f"option not mapped: node {loader['id']} (ADE_AnimateDiffLoaderWithContext): "
                      "apply_v2_models_properly = false (v2 models run as v1) has no equivalent; v2 models run properly"]
    assert converted["state"] == {"lastGroupId": 3, "lastNodeId": converted["last_node_id"],
                                  "lastLinkId": converted["last_link_id"], "lastRerouteId": 0}
    *others, note = converted["nodes"]
    top = min(n["pos"][1] for n in others)
    assert note == {"id": max(n["id"] for n in others) + 1, "type": "Note", "pos": [0, top - 260], "size": [600, 220],
                    "flags": {}, "order": len(others), "mode": 0, "inputs": [], "outputs": [], "properties": {},
                    "title": "Imported from AnimateDiff-Evolved", "widgets_values": ["\n".join(report)]}
    assert converted["last_node_id"] == note["id"]
    for node in others:  # what the frontend reads of every node, ours included
        assert {"id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs"} <= set(node), node["type"]


def test_a_linked_widget_keeps_its_link_on_a_socket_typed_as_the_editor_types_it():
    """A widget driven by another node's output (not a primitive, whose value is saved on the target) keeps
    its link on the new node, on a widget socket of the type the editor gives it: COMBO for a list of
    options (a loader's model name), INT for a number; the widget keeps a placeholder value."""
    workflow = copy.deepcopy(ade.LEGACY_UI)
    picker = {"id": 20, "type": "SomeModelPicker", "pos": [-300, 0], "size": [200, 60], "flags": {}, "order": 0,
              "mode": 0, "inputs": [], "properties": {}, "widgets_values": [],
              "outputs": [{"name": "model", "type": "COMBO", "links": [30], "slot_index": 0},
                          {"name": "length", "type": "INT", "links": [31], "slot_index": 1}]}
    workflow["nodes"].append(picker)
    for node in workflow["nodes"]:
        if node["id"] == 4:  # the legacy loader: its model_name widget driven by the picker
            node["inputs"].append({"name": "model_name", "type": "COMBO", "link": 30, "widget": {"name": "model_name"}})
        if node["id"] == 2:  # the context options: context_length from the picker instead of the primitive
            node["inputs"][2]["link"] = 31
    workflow["links"] = [row for row in workflow["links"] if row[0] != 13]
    workflow["links"] += [[30, 20, 0, 4, 3, "COMBO"], [31, 20, 1, 2, 2, "INT"]]
    workflow["nodes"] = [n for n in workflow["nodes"] if n["id"] != 11]  # the primitive, now unlinked
    workflow["last_node_id"], workflow["last_link_id"] = 20, 31
    converted, _, _ = convert(workflow)
    nodes = {n["id"]: n for n in converted["nodes"]}
    loader, options = nodes[21], nodes[22]  # new ids follow the workflow's last one
    assert (loader["type"], options["type"]) == ("ADS_LoadMotionModel", "ADS_ContextOptions")
    links = {row[0]: row for row in converted["links"]}
    model_link, length_link = loader["inputs"][0]["link"], options["inputs"][0]["link"]
    assert loader["inputs"] == [{"name": "model_name", "type": "COMBO", "link": model_link,
                                 "widget": {"name": "model_name"}}]
    assert options["inputs"] == [{"name": "context_length", "type": "INT", "link": length_link,
                                  "widget": {"name": "context_length"}}]
    assert links[model_link][1:] == [20, 0, 21, 0, "COMBO"] and links[length_link][1:] == [20, 1, 22, 0, "INT"]
    assert nodes[20]["outputs"][0]["links"] == [model_link] and nodes[20]["outputs"][1]["links"] == [length_link]
    assert loader["widgets_values"] == [""] and options["widgets_values"][0] == 16

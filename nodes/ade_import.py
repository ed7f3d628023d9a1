"""Open a workflow made with ComfyUI-AnimateDiff-Evolved (ADE): its AnimateDiff nodes become this pack's.

``convert(workflow)`` takes a workflow in the editor's format (``nodes`` / ``links``) or the API
format (``{id: {class_type, inputs}}``) and returns the same format with ADE's nodes mapped
(``ade_mapping.py``), every other node and link kept, and a report: one line per ADE node or
option that could not be mapped (the node is kept as it was) or maps only approximately. Mapped
graphs use ``norm_semantics = "AnimateDiff-Evolved"`` and ADE's meaning of each window schedule.

These three modules (``ade_import``, ``ade_mapping``, ``ade_tables``) import nothing from ComfyUI, so
``python <pack> import-ade in.json out.json`` runs without it; the editor's "Convert
AnimateDiff-Evolved workflow" command reaches ``convert`` through the ``/animatediff_suite/import_ade``
route (``ade_routes.py``). The mapping table is in the README's migration section.
"""

from __future__ import annotations

import copy
import json

from .ade_mapping import Importer, Link, Node, WorkflowError, is_ade
from .ade_tables import ADE_SOCKETS, ADE_WIDGETS, OUR_NODES


def detect_format(workflow) -> str:
    if isinstance(workflow, dict) and isinstance(workflow.get("nodes"), list):
        return "ui"
    if isinstance(workflow, dict) and workflow and all(
            isinstance(v, dict) and "class_type" in v for v in workflow.values()):
        return "api"
    raise WorkflowError("not a ComfyUI workflow: expected the editor's format (with 'nodes' and 'links') or the "
                        "API format ({id: {'class_type', 'inputs'}})")


def _link_rows(workflow: dict) -> dict:
    rows = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            row = (link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                   link.get("type"))
        else:
            row = tuple(link[:6])
        rows[row[0]] = row
    return rows


def _read_api(workflow: dict, report: list) -> dict:
    nodes = {}
    for node_id, raw in workflow.items():
        inputs = {name: Link(str(v[0]), int(v[1])) if isinstance(v, list) and len(v) == 2 else v
                  for name, v in (raw.get("inputs") or {}).items()}
        node = nodes[str(node_id)] = Node(str(node_id), raw["class_type"], inputs, raw)
        known = set(ADE_WIDGETS.get(node.type, ())) | set(ADE_SOCKETS.get(node.type, ()))
        unknown = [name for name in inputs if known and name not in known]
        if unknown:  # another ADE release: what the importer knows is read by name
            report.append(f"option not mapped: node {node.id} ({node.type}): inputs this importer does not know "
                          f"(another ADE release?): {', '.join(unknown)}")
    return nodes


def _read_ui(workflow: dict, report: list) -> dict:
    rows = _link_rows(workflow)
    nodes = {}
    for raw in workflow["nodes"]:
        node_id, inputs = str(raw["id"]), {}
        for socket in raw.get("inputs") or []:
            row = rows.get(socket.get("link"))
            if row is not None:
                inputs[socket["name"]] = Link(str(row[1]), int(row[2]))
        nodes[node_id] = Node(node_id, raw.get("type", ""), inputs, raw, mode=raw.get("mode", 0) or 0)
    for node in nodes.values():
        if node.type in ADE_WIDGETS:
            _read_widgets(node, nodes, report)
    return nodes


def _read_widgets(node: Node, nodes: dict, report: list) -> None:
    """Name the saved widget values; another ADE release's are read by the widget names it saved."""
    values, known = node.raw.get("widgets_values"), ADE_WIDGETS[node.type]
    where = f"node {node.id} ({node.type})"
    if isinstance(values, dict):
        named = dict(values)
    else:
        values, names = list(values or []), list(known)
        saved = [s["name"] for s in node.raw.get("inputs") or [] if isinstance(s.get("widget"), dict)]
        if len(saved) == len(values) and saved != names[:len(saved)]:
            names = saved
            report.append(f"warning: {where}: {len(values)} widget values saved by another ADE release; read by "
                          "the widget names it saved")
        elif len(values) != len(names) and not (len(values) == len(names) - 1 and names[-1] == "deprecation_warning"):
            release = "an older" if len(values) < len(names) else "a newer"
            report.append(f"warning: {where}: {len(values)} widget values where this importer knows {len(names)} "
                          f"({', '.join(names)}); read as {release} ADE release, by position"
                          + ("; missing ones take ADE's defaults" if len(values) < len(names) else ""))
        named = dict(zip(names, values))
    unknown = [name for name in named if name not in known]
    if unknown:
        report.append(f"option not mapped: {where}: widgets this importer does not know: {', '.join(unknown)}")
    for name, value in named.items():
        link = node.inputs.get(name)
        if link is None or getattr(nodes.get(link.node), "type", None) == "PrimitiveNode":
            node.inputs[name] = value  # a widget value (a primitive's value is saved on its target too)


def _write_api(nodes: dict) -> dict:
    out = {}
    for node in nodes.values():
        entry = copy.deepcopy(node.raw) if node.raw is not None else {"class_type": node.type}
        entry["inputs"] = {k: [v.node, v.slot] if isinstance(v, Link) else copy.deepcopy(v)
                           for k, v in node.inputs.items()}
        out[node.id] = entry
    return out


def _new_ui_node(node: Node, by_id: dict, offset: int) -> dict:
    sockets, widgets, outputs = OUR_NODES[node.type]
    origin = by_id.get(node.origin, {})
    x, y = (origin.get("pos") or [0, 0])[:2] if isinstance(origin.get("pos"), list) else (0, 0)
    inputs = [{"name": name, "type": kind, "link": None} for name, kind in sockets]
    values = []
    for name, default, kind in widgets:
        value = node.inputs.get(name, default)
        if isinstance(value, Link):
            inputs.append({"name": name, "type": kind, "link": None, "widget": {"name": name}})
            value = default
        values.append(value)
    return {"id": int(node.id), "type": node.type, "pos": [x + 30 * offset, y + 30 * offset],
            "size": [340, 40 + 24 * (max(len(sockets), len(outputs)) + len(widgets))], "flags": {},
            "order": origin.get("order", 0), "mode": 0, "inputs": inputs,
            "outputs": [{"name": name, "type": kind, "slot_index": slot, "links": []}
                        for slot, (name, kind) in enumerate(outputs)],
            "properties": {"Node name for S&R": node.type}, "widgets_values": values}


def _write_ui(workflow: dict, nodes: dict, report: list, changed: bool) -> dict:
    out = copy.deepcopy(workflow)
    by_id = {str(raw["id"]): raw for raw in workflow["nodes"]}
    written, offsets = {}, {}
    for node in nodes.values():
        if node.raw is not None:
            entry = copy.deepcopy(node.raw)
            for socket in entry.get("inputs") or []:
                socket["link"] = None
            for output in entry.get("outputs") or []:
                output["links"] = []
        else:
            offsets[node.origin] = offsets.get(node.origin, -1) + 1
            entry = _new_ui_node(node, by_id, offsets[node.origin])
        written[node.id] = entry
    rows, before = [], {row[1:5]: row[0] for row in _link_rows(workflow).values()}
    next_id = max(before.values(), default=0) + 1
    for node in nodes.values():
        entry = written[node.id]
        for name, link in node.inputs.items():
            if not isinstance(link, Link):
                continue
            slot = next((i for i, s in enumerate(entry.get("inputs") or []) if s["name"] == name), None)
            origin = written.get(link.node)
            outputs = (origin or {}).get("outputs") or []
            if slot is None or link.slot >= len(outputs):
                report.append(f"warning: node {node.id} ({node.type}): input {name} lost its link")
                continue
            link_id = before.get((int(link.node), link.slot, int(node.id), slot))
            if link_id is None:
                link_id, next_id = next_id, next_id + 1
            kind = outputs[link.slot].get("type", "*")
            rows.append([link_id, int(link.node), link.slot, int(node.id), slot, kind])
            entry["inputs"][slot]["link"] = link_id
            outputs[link.slot]["links"].append(link_id)
    rows.sort()
    if workflow.get("links") and isinstance(workflow["links"][0], dict):
        keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
        out["links"] = [dict(zip(keys, row)) for row in rows]
    else:
        out["links"] = rows
    out["nodes"] = list(written.values())
    last_node = max((int(i) for i in written), default=0)
    if report:
        last_node += 1
        top = min(((n.get("pos") or [0, 0])[1] for n in out["nodes"] if isinstance(n.get("pos"), list)), default=0)
        out["nodes"].append({"id": last_node, "type": "Note", "pos": [0, top - 260], "size": [600, 220],
                             "flags": {}, "order": len(out["nodes"]), "mode": 0, "inputs": [], "outputs": [],
                             "properties": {}, "title": "Imported from AnimateDiff-Evolved",
                             "widgets_values": ["\n".join(report)]})
    last_link = max([row[0] for row in rows] + [workflow.get("last_link_id") or 0])
    out["last_node_id"], out["last_link_id"] = max(last_node, workflow.get("last_node_id") or 0), last_link
    if isinstance(out.get("state"), dict):
        out["state"].update(lastNodeId=out["last_node_id"], lastLinkId=last_link)
    if report or changed:
        out.setdefault("extra", {})["animatediff_suite_import"] = {"report": list(report)}
    return out


def _subgraph_nodes(workflow: dict) -> list:
    subgraphs = (workflow.get("definitions") or {}).get("subgraphs") or []
    return [(sub.get("name", sub.get("id")), n) for sub in subgraphs for n in sub.get("nodes") or []]


def convert(workflow: dict) -> tuple[dict, list[str], int]:
    """``(converted workflow, report lines, number of ADE nodes mapped)``; the input is not modified.

    Report lines start with ``node not mapped`` (the node is kept as it was), ``option not mapped``
    (the node is mapped without it), ``approximate`` (mapped to the nearest equivalent) or ``warning``.
    """
    kind = detect_format(workflow)
    report: list[str] = []
    try:
        nodes = _read_ui(workflow, report) if kind == "ui" else _read_api(workflow, report)
        importer = Importer(nodes, report)
        importer.run()
    except (KeyError, TypeError, AttributeError, IndexError) as exc:  # a node or link saved in no known shape
        raise WorkflowError(f"the workflow could not be read ({type(exc).__name__}: {exc}); is it a ComfyUI "
                            "workflow saved by the editor or exported in API format?") from exc
    if kind == "ui":
        for name, raw in _subgraph_nodes(workflow):
            if is_ade(raw.get("type", "")):
                report.append(f"node not mapped: node {raw.get('id')} ({raw['type']}) in subgraph {name!r}: "
                              "nodes inside subgraphs are not converted; unpack the subgraph first")
        return _write_ui(workflow, importer.nodes, report, importer.mapped > 0), report, importer.mapped
    return _write_api(importer.nodes), report, importer.mapped


def main(argv: list[str]) -> int:
    """``import-ade IN.json OUT.json``: convert a workflow file; prints the report."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="import-ade", description="Convert a ComfyUI-AnimateDiff-Evolved "
                                     "workflow (editor or API format) to AnimateDiff Suite nodes.")
    parser.add_argument("input", help="workflow JSON saved by ComfyUI (editor format or 'Export (API)')")
    parser.add_argument("output", help="where to write the converted workflow (same format)")
    args = parser.parse_args(argv)
    try:
        with open(args.input, encoding="utf-8") as file:
            workflow = json.load(file)
        converted, report, mapped = convert(workflow)
    except (OSError, json.JSONDecodeError, WorkflowError) as exc:
        print(f"import-ade: {args.input}: {exc}", file=sys.stderr)
        return 2
    with open(args.output, "w", encoding="utf-8") as file:
        json.dump(converted, file, indent=2)
    print(f"{args.output}: {mapped} AnimateDiff-Evolved node(s) mapped, {len(report)} report line(s)")
    for line in report:
        print(f"  {line}")
    return 0

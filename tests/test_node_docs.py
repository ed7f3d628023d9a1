"""Every node of the pack has a help page in ComfyUI's node-docs convention (web/js/docs/<node id>.md,
served as /extensions/<pack>/docs/<node id>.md and shown by the editor's node help), titled with the
node's display name, whose Inputs and Outputs sections name exactly the node's inputs and outputs."""

from __future__ import annotations

import asyncio
import os
import re

import pytest

from ads_package import ROOT

pytestmark = pytest.mark.comfyui
DOCS = os.path.join(ROOT, "web", "js", "docs")


def schemas():
    from animatediff_suite.nodes import AnimateDiffSuiteExtension

    return [node.define_schema() for node in asyncio.run(AnimateDiffSuiteExtension().get_node_list())]


def section(text: str, title: str) -> list[str]:
    """The names each bullet of ``## title`` documents: the backticked words before its first colon."""
    body = re.search(rf"^## {title}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert body, f"no '## {title}' section"
    names = []
    for bullet in re.findall(r"^- (.*)$", body.group(1), re.M):
        head = re.split(r":\s", bullet, maxsplit=1)[0]
        names += re.findall(r"`([^`]+)`", head)
    return names


def output_name(output) -> str:
    return output.display_name or output.io_type


def test_every_node_has_a_help_page_naming_its_inputs_and_outputs(comfyui):
    nodes = schemas()
    assert sorted(f[:-3] for f in os.listdir(DOCS)) == sorted(s.node_id for s in nodes)  # no stale pages
    for schema in nodes:
        with open(os.path.join(DOCS, f"{schema.node_id}.md"), encoding="utf-8") as handle:
            text = handle.read()
        assert text.splitlines()[0] == f"# {schema.display_name}", schema.node_id
        inputs = section(text, "Inputs")
        assert sorted(set(inputs)) == sorted(i.id for i in schema.inputs), schema.node_id
        outputs = section(text, "Outputs")
        assert sorted(set(outputs)) == sorted({output_name(o) for o in schema.outputs}), schema.node_id


def test_every_input_and_output_has_a_tooltip(comfyui):
    missing = [f"{s.node_id}.{port.id or output_name(port)}" for s in schemas() for port in [*s.inputs, *s.outputs]
               if not port.tooltip]
    assert missing == []

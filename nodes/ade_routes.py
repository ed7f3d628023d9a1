"""POST /animatediff_suite/import_ade: the editor's "Convert AnimateDiff-Evolved workflow" command.

The body is ``{"workflow": <the editor's workflow JSON>}``; the answer is ``{"workflow", "report",
"mapped"}`` (``ade_import.convert``) or a 400 with ``{"error"}``. The route takes a workflow, never
a file path.
"""

from __future__ import annotations

import logging
import sys

from .ade_import import convert
from .ade_mapping import WorkflowError

ROUTE = "/animatediff_suite/import_ade"
log = logging.getLogger(__name__)


def register_routes() -> bool:
    """Add the route to the running ComfyUI server; False where there is none (ComfyUI as a library)."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return False
    instance.routes.post(ROUTE)(import_ade)
    return True


async def import_ade(request):
    from aiohttp import web

    try:
        body = await request.json()
    except ValueError:
        return web.json_response({"error": "the request body is not JSON"}, status=400)
    try:
        converted, report, mapped = convert(body.get("workflow") if isinstance(body, dict) else None)
    except WorkflowError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    log.info("AnimateDiff-Evolved workflow converted: %d node(s) mapped, %d report line(s)", mapped, len(report))
    return web.json_response({"workflow": converted, "report": report, "mapped": mapped})

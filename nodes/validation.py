"""Queue-time checks of a node's widget values, for nodes that define ``validate_inputs``.

ComfyUI (execution.py, v0.3.64 and later) skips its own min/max and combo checks for every input that
a node's ``validate_inputs`` names, and for all inputs when it takes ``**kwargs``; it never checks
that a FLOAT is finite (NaN passes every comparison; the HTTP API's JSON parser accepts NaN and
Infinity), and it does not check V3 combo values at all. ``check_widgets`` does those checks from the
node's own schema, so a value sent over the API is held to what the widget allows.
"""

from __future__ import annotations

import math


def check_widgets(node_cls, values: dict) -> bool | str:
    """True, or a message naming the first input whose value the widget would not allow."""
    spec = node_cls.INPUT_TYPES(include_hidden=False)
    for section in ("required", "optional"):
        for name, (kind, *extra) in spec.get(section, {}).items():
            value = values.get(name)
            if value is None:  # not given, or linked from another node (known only when it runs)
                continue
            problem = _widget_problem(kind, extra[0] if extra else {}, value)
            if problem:
                return f"{name} = {value!r} {problem}"
    return True


def _widget_problem(kind, info: dict, value) -> str | None:
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"is not a number; expected {kind}"
        if kind == "FLOAT" and not math.isfinite(value):
            return "is not a finite number"
        if "min" in info and value < info["min"]:
            return f"is below the minimum {info['min']}"
        if "max" in info and value > info["max"]:
            return f"is above the maximum {info['max']}"
    options = kind if isinstance(kind, list) else info.get("options") if kind == "COMBO" else None
    if options is not None and value not in options:
        shown = options if len(options) <= 20 else f"{len(options)} options"
        return f"is not one of {shown}"
    return None

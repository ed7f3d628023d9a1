"""The one exception type the core raises for bad user input."""


class MotionModelError(ValueError):
    """A motion model, MotionLoRA or adapter file that cannot be used, with the reason.

    Messages name the file (or ``<state dict>``), what was expected and what was found.
    """


def describe_keys(keys, limit: int = 5) -> str:
    """Format a few keys for an error message: ``'a', 'b', ... (+12 more)``."""
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    more = len(keys) - limit
    return f"{shown} (+{more} more)" if more > 0 else shown

"""AnimateDiff Suite: animate any Stable Diffusion model inside ComfyUI.

ComfyUI imports this package under a mangled module name and reads ``comfy_entrypoint``
(V3 node API). Nothing ComfyUI-specific is imported until ComfyUI asks for the nodes, so
the pure-PyTorch core in ``motion_modules/`` stays importable without ComfyUI.
"""

WEB_DIRECTORY = "./web/js"


async def comfy_entrypoint():
    """Return the pack's ComfyExtension (called by ComfyUI when it loads custom nodes)."""
    from .nodes import AnimateDiffSuiteExtension

    return AnimateDiffSuiteExtension()

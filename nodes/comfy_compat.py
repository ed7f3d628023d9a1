"""The one place that knows ComfyUI versions: what changed after v0.3.64, feature-detected.

The pack is built and tested on ComfyUI v0.3.64. Newer releases were read file by file (README,
"Supported ComfyUI"); each difference the pack depends on has one helper here:

- ``comfy_api``: ``latest`` is marked unstable; versioned modules (``v0_0_2`` in v0.3.64, ``v0_0_3``
  later) re-export its ``io``. ``api`` is the newest stable version listed by
  ``comfy_api.version_list``, else the newest versioned one, else ``latest``.
- Dynamic VRAM: on NVIDIA GPUs newer releases set ``comfy.model_patcher.CoreModelPatcher`` to
  ``ModelPatcherDynamic`` (which reroutes to the plain patcher on CPU) and core loaders build
  their patchers from it. ``new_model_patcher`` builds ours the same way, so the motion model's
  patcher is dynamic exactly when the UNet's is (a plain one beside dynamic ones changes how
  ``load_models_gpu`` frees memory), and records ``cached_patcher_init`` where the patcher has it
  (MultiGPU deep clones and non-dynamic delegates rebuild a model through it).
- MultiGPU: per-device clones are additional models under ``"multigpu"``; the motion modules and
  the v1 norm stand-ins are placed for one device, so ``check_no_multigpu`` refuses them clearly.
- Core context windows keep their handler in ``model_options["context_handler"]`` and run outside
  the CALC_COND_BATCH wrappers; ``check_no_core_context_windows`` refuses the combination with ours.
- Progress updates are throttled (``comfy.utils.PROGRESS_THROTTLE_MIN_INTERVAL``): intermediate
  window updates may not reach the client; the first and last of a bar always do.
- ``outer_sample`` gains keyword arguments (``latent_shapes``): every wrapper passes ``*args,
  **kwargs`` on. ``model_base`` copies ``transformer_options`` per call: per-call facts are set
  before the UNet is called and objects in it are shared by reference, so a copy loses nothing.
"""

from __future__ import annotations

import importlib

import comfy.model_patcher
import comfy.utils

from ..motion_modules import MotionModelError


def _api_module():
    """The comfy_api module to build nodes with (see the module docstring)."""
    try:
        from comfy_api.version_list import supported_versions
    except ImportError:
        supported_versions = []

    def version(cls) -> tuple:
        try:
            return tuple(int(p) for p in str(getattr(cls, "VERSION", "")).split("."))
        except ValueError:
            return ()  # "latest"

    versioned = sorted((cls for cls in supported_versions if version(cls)), key=version, reverse=True)
    ranked = [cls for cls in versioned if getattr(cls, "STABLE", False)] + versioned
    for cls in ranked:
        try:
            module = importlib.import_module(cls.__module__)
        except ImportError:
            continue
        if hasattr(module, "io") and hasattr(module, "ComfyExtension"):
            return module
    return importlib.import_module("comfy_api.latest")


api = _api_module()
io = api.io
ComfyExtension = api.ComfyExtension


def is_dynamic(patcher) -> bool:
    """Whether ``patcher`` loads its weights dynamically (newer releases' ModelPatcherDynamic)."""
    check = getattr(patcher, "is_dynamic", None)
    return bool(check()) if callable(check) else False


def new_model_patcher(model, load_device, offload_device, rebuild=None, disable_dynamic: bool = False):
    """A ModelPatcher for ``model`` of the kind core loaders make in this process.

    Args:
        rebuild: ``(factory, args)``: ``factory(*args, disable_dynamic=...)`` returns a fresh patcher of
            the same model; recorded as ``cached_patcher_init`` where ComfyUI has it.
        disable_dynamic: a plain ModelPatcher even where core loaders make dynamic ones.
    """
    cls = comfy.model_patcher.ModelPatcher
    if not disable_dynamic:
        cls = getattr(comfy.model_patcher, "CoreModelPatcher", cls)
    patcher = cls(model, load_device=load_device, offload_device=offload_device)
    if rebuild is not None and hasattr(patcher, "cached_patcher_init"):
        patcher.cached_patcher_init = rebuild
    return patcher


def multigpu_clones(patcher) -> list:
    """The per-device clones ComfyUI's MultiGPU support attached to ``patcher`` (none in v0.3.64)."""
    additional = getattr(patcher, "additional_models", None) or {}
    return list(additional.get("multigpu", []))


def check_no_multigpu(patcher, where: str) -> None:
    if multigpu_clones(patcher):
        raise MotionModelError(f"{where}: this MODEL is split across several GPUs (ComfyUI's MultiGPU); "
                               "AnimateDiff Suite's motion modules run on one device. Sample without the "
                               "MultiGPU node")


def core_context_handler(model_options: dict):
    """ComfyUI core's context-window handler in ``model_options`` (its Context Windows nodes), or None."""
    return (model_options or {}).get("context_handler")


def check_no_core_context_windows(model_options: dict, where: str) -> None:
    handler = core_context_handler(model_options)
    if handler is not None:
        raise MotionModelError(
            f"{where}: this MODEL also has ComfyUI's own context windows ({type(handler).__name__}, from a "
            "'Context Windows' core node). They run outside this pack's windows and motion modules, so the "
            "two would window the clip twice; use only Context Options (AnimateDiff), which also gives "
            "FreeNoise, and remove the core Context Windows node")


def progress_is_throttled() -> bool:
    """Whether ComfyUI drops progress updates that come too fast (newer releases)."""
    return hasattr(comfy.utils, "PROGRESS_THROTTLE_MIN_INTERVAL")

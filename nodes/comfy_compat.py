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
- Previews: ``preview_sender`` sends a preview image the way the progress hook does (with metadata to
  clients that announced ``supports_preview_metadata``, else as an unencoded preview), from any thread;
  ``get_executing_context`` and the progress registry's display node ids are read where present.
- ``outer_sample`` gains keyword arguments (``latent_shapes``): every wrapper passes ``*args,
  **kwargs`` on. ``model_base`` copies ``transformer_options`` per call: per-call facts are set
  before the UNet is called and objects in it are shared by reference, so a copy loses nothing.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Callable

import comfy.model_management
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


def new_model_patcher(model, rebuild=None, disable_dynamic: bool = False):
    """A ModelPatcher for ``model`` of the kind core loaders make in this process, loaded and offloaded where
    ComfyUI puts the UNet (so weights that run inside the UNet's calls live beside it).

    Args:
        rebuild: ``(factory, args)``: ``factory(*args, disable_dynamic=...)`` returns a fresh patcher of
            the same model; recorded as ``cached_patcher_init`` where ComfyUI has it.
        disable_dynamic: a plain ModelPatcher even where core loaders make dynamic ones.
    """
    cls = comfy.model_patcher.ModelPatcher
    if not disable_dynamic:
        cls = getattr(comfy.model_patcher, "CoreModelPatcher", cls)
    patcher = cls(model, load_device=comfy.model_management.get_torch_device(),
                  offload_device=comfy.model_management.unet_offload_device())
    if rebuild is not None and hasattr(patcher, "cached_patcher_init"):
        patcher.cached_patcher_init = rebuild
    return patcher


def forget_loaded(modules) -> int:
    """Unload ComfyUI's loaded-model entries whose model is one of ``modules`` and drop them from its list;
    returns how many. A module trained in its own patcher outlives that patcher (it is returned and saved);
    ComfyUI would keep its entry until the module dies and warn of a memory leak at every later load.
    (``current_loaded_models`` and ``LoadedModel.real_model``/``model_unload`` exist from v0.3.64 on; where
    they do not, nothing is done.)"""
    loaded = getattr(comfy.model_management, "current_loaded_models", None)
    if not isinstance(loaded, list):
        return 0
    wanted, dropped = {id(m) for m in modules}, 0
    for index in reversed(range(len(loaded))):
        entry = loaded[index]
        reference = getattr(entry, "real_model", None)
        real = reference() if callable(reference) else None
        if real is None or id(real) not in wanted:
            continue
        if getattr(entry, "model", None) is not None and hasattr(entry, "model_unload"):
            entry.model_unload()
        loaded.pop(index)
        dropped += 1
    return dropped


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


def prompt_server():
    """The running ComfyUI server (``PromptServer.instance``), or None (ComfyUI used as a library)."""
    return getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)


@dataclass(frozen=True)
class PreviewSender:
    """Sends preview images to the client of the running prompt, shown on the executing node (any thread)."""
    client_id: str
    send: Callable  # send(PIL image): queued on the server's event loop (PromptServer.send_sync)


def preview_sender(max_size: int | None) -> PreviewSender | None:
    """A sender for the node executing now, or None without a server or a client to show it to.

    Called on the sampling thread (it reads the executing node there); the returned ``send`` may be
    called from any thread. Images are sent as JPEG, contained in ``max_size`` pixels as ComfyUI's own
    previews are."""
    server = prompt_server()
    client_id = getattr(server, "client_id", None)
    if server is None or client_id is None:
        return None
    from protocol import BinaryEventTypes

    prompt_id, node_id = _executing(server)
    metadata = None
    if hasattr(BinaryEventTypes, "PREVIEW_IMAGE_WITH_METADATA") and _supports_metadata(server, client_id):
        metadata = {"node_id": node_id, "prompt_id": prompt_id, "display_node_id": node_id,
                    "parent_node_id": None, "real_node_id": node_id, **_display_ids(node_id)}

    def send(image) -> None:
        preview = ("JPEG", image, max_size)
        if metadata is None:
            server.send_sync(BinaryEventTypes.UNENCODED_PREVIEW_IMAGE, preview, client_id)
        else:
            server.send_sync(BinaryEventTypes.PREVIEW_IMAGE_WITH_METADATA, (preview, dict(metadata)), client_id)

    return PreviewSender(client_id, send)


def _executing(server) -> tuple:
    """(prompt id, node id) of the node executing on this thread."""
    try:
        from comfy_execution.utils import get_executing_context
        context = get_executing_context()
    except ImportError:
        context = None
    if context is not None:
        return context.prompt_id, context.node_id
    return getattr(server, "last_prompt_id", None), getattr(server, "last_node_id", None)


def _supports_metadata(server, client_id: str) -> bool:
    try:
        from comfy_api import feature_flags
    except ImportError:
        return False
    return bool(feature_flags.supports_feature(getattr(server, "sockets_metadata", {}), client_id,
                                               "supports_preview_metadata"))


def _display_ids(node_id) -> dict:
    """The display/parent/real node ids the progress registry gives ``node_id`` (nodes in subgraphs)."""
    try:
        from comfy_execution.progress import get_progress_state
        dynprompt = get_progress_state().dynprompt
        return {"display_node_id": dynprompt.get_display_node_id(node_id),
                "parent_node_id": dynprompt.get_parent_node_id(node_id),
                "real_node_id": dynprompt.get_real_node_id(node_id)}
    except (ImportError, AttributeError, KeyError, TypeError):
        return {}

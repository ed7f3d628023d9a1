"""Model folders of the pack, registered with ComfyUI's folder_paths (names the community uses)."""

import functools
import hashlib
import os

import folder_paths

from ..motion_modules import MotionModelError

MOTION_MODELS = "animatediff_models"
MOTION_LORAS = "animatediff_motion_lora"
MOTION_PREDICTORS = "animatediff_motion_predictor"
EXTENSIONS = {".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin"}


def register_folders() -> None:
    """Add ``models/animatediff_models``, ``models/animatediff_motion_lora`` and
    ``models/animatediff_motion_predictor``; keep any paths that ``extra_model_paths.yaml`` already gave
    these names."""
    for name in (MOTION_MODELS, MOTION_LORAS, MOTION_PREDICTORS):
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))
        paths, extensions = folder_paths.folder_names_and_paths[name]
        folder_paths.folder_names_and_paths[name] = (paths, set(extensions) | EXTENSIONS)


def full_path(folder: str, name: str) -> str:
    """Resolve a dropdown value through folder_paths only (never a raw path from the user)."""
    path = folder_paths.get_full_path(folder, name)
    if path is None or not os.path.isfile(path):
        raise MotionModelError(f"{name!r} is not in models/{folder} any more (deleted or renamed after the "
                               "prompt was queued?); refresh the node's list and pick a file that exists")
    return path


def file_fingerprint(folder: str, name: str):
    """What changes when the file behind a dropdown value is replaced (size, mtime), so ComfyUI re-runs
    a loader whose file changed under the same name instead of reusing its cached output."""
    path = folder_paths.get_full_path(folder, name) if name else None
    try:
        stat = os.stat(path) if path else None
    except OSError:
        stat = None
    return (name, stat.st_size, stat.st_mtime_ns) if stat else (name, None, None)


def sha256_prefix(path: str, chars: int = 10) -> str:
    """The first ``chars`` hex digits of the file's SHA-256 (Civitai's "AutoV2" hash at 10), cached per
    (path, size, mtime): compare it with a download page's hash to know which file was loaded."""
    stat = os.stat(path)
    return _sha256(path, stat.st_size, stat.st_mtime_ns)[:chars]


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()

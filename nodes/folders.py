"""Model folders of the pack, registered with ComfyUI's folder_paths (names the community uses)."""

import os

import folder_paths

MOTION_MODELS = "animatediff_models"
MOTION_LORAS = "animatediff_motion_lora"
EXTENSIONS = {".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin"}


def register_folders() -> None:
    """Add ``models/animatediff_models`` and ``models/animatediff_motion_lora``; keep any paths that
    ``extra_model_paths.yaml`` already gave these names."""
    for name in (MOTION_MODELS, MOTION_LORAS):
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))
        paths, extensions = folder_paths.folder_names_and_paths[name]
        folder_paths.folder_names_and_paths[name] = (paths, set(extensions) | EXTENSIONS)


def full_path(folder: str, name: str) -> str:
    """Resolve a dropdown value through folder_paths only (never a raw path from the user)."""
    return folder_paths.get_full_path_or_raise(folder, name)

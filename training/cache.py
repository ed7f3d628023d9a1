"""On-disk cache of VAE latents and text embeddings (``[data] cache = true``).

A latent is stored under a key made of the clip's content hash (the file's bytes, every frame file of a
frame folder, or an in-memory clip's pixels), the frames drawn, the flip, the training size and a hash
of the VAE's weights; a text embedding under the caption and a hash of the text encoder's weights and
patches (LoRAs applied to CLIP). A changed file, setting or model is a new key, never a stale hit, so
runs may share one folder. Entries are safetensors files written atomically; what is read back is
bit-identical to what was computed, so a cached run trains the same weights as an uncached one.
"""

from __future__ import annotations

import hashlib
import logging
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .checkpoints import atomic_write

log = logging.getLogger(__name__)


def hash_update(digest, value) -> None:
    """Feed tensors (by dtype, shape and bytes), containers and plain values into ``digest``."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            digest.update(str(key).encode())
            hash_update(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"[{len(value)}".encode())
        for item in value:
            hash_update(digest, item)
    elif hasattr(value, "weights"):  # ComfyUI's weight adapters (LoRA patches) keep their tensors here
        digest.update(type(value).__name__.encode())
        hash_update(digest, value.weights)
    else:
        digest.update(repr(value).encode())


def weights_hash(module: torch.nn.Module, patches: dict | None = None) -> str:
    """sha256 of every weight of ``module`` (and of the ModelPatcher patches applied over them)."""
    digest = hashlib.sha256()
    hash_update(digest, module.state_dict())
    if patches:
        hash_update(digest, patches)
    return digest.hexdigest()


class DiskCache:
    """Tensors by key in ``folder/<kind>/<key[:2]>/<key>.safetensors``; counts hits and misses."""

    def __init__(self, folder: str):
        self.folder = folder
        self.hits = self.misses = 0

    def _path(self, kind: str, key: str) -> str:
        return os.path.join(self.folder, kind, key[:2], f"{key}.safetensors")

    def get(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        path = self._path(kind, key)
        if not os.path.exists(path):
            self.misses += 1
            return None
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as error:  # a damaged entry is recomputed and rewritten
            log.warning("cache entry %s is unreadable (%s); computing it again", path, error)
            self.misses += 1
            return None
        self.hits += 1
        return tensors

    def put(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self._path(kind, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda temp: save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                                                   temp))


def key_of(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        hash_update(digest, part)
    return digest.hexdigest()

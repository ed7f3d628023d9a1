"""Resumable training state on disk: atomic writes, the last K kept, refusals that say what differs."""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any, Callable

import torch

from ..motion_modules import MotionModelError
from .config import Config

log = logging.getLogger(__name__)
STATE_PATTERN = re.compile(r"^state-(\d{8})\.pt$")
# keys that may change between a run and its resumption: more steps, other saving, logging, caching or
# validation (none of them changes what is trained), and the optimizer setting (the trainer compares the
# optimizer it resolves to, e.g. auto -> adamw8bit on a GPU, with the saved run's)
RESUMABLE_CHANGES = ("train.steps", "train.optimizer", "output.save_every", "output.keep_last", "output.log_every",
                     "output.tensorboard", "data.cache", "data.cache_folder", "validation.every",
                     "validation.prompt", "validation.negative", "validation.steps", "validation.cfg",
                     "validation.sampler", "validation.scheduler", "validation.seed")


class ResumeError(MotionModelError):
    """A run cannot resume from its checkpoint (the message lists what differs)."""


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Write ``path`` through a temp file in the same folder, fsync, then rename over it."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, temp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(handle)
    try:
        write(temp)
        with open(temp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def check_writable(folder: str, needed_bytes: int) -> None:
    """Before the first step: the folder exists (or is created), is writable, and has room."""
    try:
        os.makedirs(folder, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".probe-", dir=folder)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise MotionModelError(f"output folder {folder!r} is not writable ({error.strerror})") from error
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise MotionModelError(f"output folder {folder!r} has {free / 2**20:.0f} MiB free; the checkpoints "
                               f"need about {needed_bytes / 2**20:.0f} MiB")


def state_paths(folder: str) -> list[str]:
    """Resumable states in ``folder``, oldest first."""
    paths = [p for p in glob.glob(os.path.join(folder, "state-*.pt")) if STATE_PATTERN.match(os.path.basename(p))]
    return sorted(paths)


def save_state(folder: str, step: int, state: dict[str, Any], keep_last: int) -> str:
    path = os.path.join(folder, f"state-{step:08d}.pt")
    atomic_write(path, lambda temp: torch.save(state, temp))
    for old in state_paths(folder)[:-keep_last]:
        os.remove(old)
    return path


def load_state(path: str) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as error:
        raise ResumeError(f"cannot read the training state {os.path.basename(path)!r} ({error})") from error


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``key: saved -> current`` lines for every config value that differs (nested tables flattened)."""
    lines = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        old, new = saved.get(key, "<unset>"), current.get(key, "<unset>")
        if isinstance(old, dict) and isinstance(new, dict):
            lines += config_differences(old, new, f"{name}.")
        elif old != new and name not in RESUMABLE_CHANGES:
            lines.append(f"{name}: {json.dumps(old)} -> {json.dumps(new)}")
    return lines


def with_defaults(saved: dict, defaults: dict) -> dict:
    """A saved config with the keys it predates filled in by their defaults (a state written before a
    key existed trained as if it had its default value)."""
    merged = dict(defaults)
    for key, value in saved.items():
        merged[key] = with_defaults(value, defaults[key]) if isinstance(value, dict) and isinstance(
            defaults.get(key), dict) else value
    return merged


def check_resumable(state: dict[str, Any], config_json: str, base_id: str, data_id: str, processes: int = 1) -> None:
    saved = with_defaults(json.loads(state["config"]), dataclasses.asdict(Config()))
    problems = config_differences(saved, json.loads(config_json))
    if state.get("processes", 1) != processes:
        problems.append(f"processes (torchrun --nproc_per_node): {state.get('processes', 1)} -> {processes} "
                        "(the global batch and data order depend on it)")
    if state["base_id"] != base_id:
        problems.append(f"base model: {state['base_id']} -> {base_id}")
    if state["data_id"] != data_id:
        problems.append(f"training data: {state['data_id']} -> {data_id}")
    if problems:
        raise ResumeError("cannot resume: this run differs from the saved one:\n  " + "\n  ".join(problems)
                          + "\n(start a new run under another name, or restore the original settings)")

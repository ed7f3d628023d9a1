"""A long day of real use, through one real server: good prompts of every kind, alternating with
failing, refused and interrupted ones. Shared by tests/test_soak.py and tests/benchmarks/bench_soak.py."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from server_helpers import executed, failure, graph, latents, refused, rss_bytes, run_interrupted, start_server

TRAVEL = "0: a fox sitting\n8: a fox jumping\n15: a fox asleep"

# Good prompts: two motion models, MotionLoRA strengths, windows on/off, prompt travel, FreeInit, SD1.5 and SDXL.
GOOD = {
    "plain_sd15": lambda: graph(None, seed=1, prefix="plain_sd15"),
    "v2": lambda: graph("v2.ckpt", seed=2, prefix="v2"),
    "v3": lambda: graph("v3.ckpt", seed=3, prefix="v3"),
    "v2_lora_0.5": lambda: graph("v2.ckpt", seed=4, lora_strength=0.5, prefix="lora05"),
    "v2_lora_-1.2": lambda: graph("v2.ckpt", seed=4, lora_strength=-1.2, prefix="lora12"),
    "v3_windows_24": lambda: graph("v3.ckpt", seed=5, frames=24, context={}, prefix="windows"),
    "v2_travel": lambda: graph("v2.ckpt", seed=6, travel=TRAVEL, prefix="travel"),
    "v2_freeinit": lambda: graph("v2.ckpt", seed=7, free_init=2, prefix="freeinit"),
    "sdxl_motion": lambda: graph("sdxl.ckpt", seed=8, family="SDXL", prefix="sdxl"),
    "plain_sdxl": lambda: graph(None, seed=9, family="SDXL", prefix="plain_sdxl"),
}


def _failing() -> dict:  # an SDXL motion model on an SD1.5 model: fails in Apply Motion Model
    return graph("sdxl.ckpt", seed=2, prefix="failing")


def _refused() -> dict:
    nodes = graph("v2.ckpt", prefix="refused")
    nodes["3"]["inputs"]["motion_scale"] = float("nan")
    return nodes


def _interrupted() -> dict:
    return graph("v2.ckpt", seed=10, frames=48, steps=6, context={}, prefix="interrupted")


BAD = ["failing", "interrupted", "refused"]


def schedule(prompts: int) -> list[str]:
    """``prompts`` names: the good ones in turn (never the same twice in a row), a bad one after every third."""
    names, good, bad = [], 0, 0
    while len(names) < prompts:
        names.append(list(GOOD)[good % len(GOOD)])
        good += 1
        if good % 3 == 0 and len(names) < prompts:
            names.append(BAD[bad % len(BAD)])
            bad += 1
    return names


@dataclass
class SoakResult:
    outputs: dict = field(default_factory=dict)  # name -> list of latents, one per run
    rss: list = field(default_factory=list)  # (prompt number, bytes) after each prompt
    seconds: float = 0.0


def soak(server, prompts: int, log=None) -> SoakResult:
    """Queue ``schedule(prompts)`` one after the other; check that bad ones fail as expected."""
    result = SoakResult()
    started = time.monotonic()
    for number, name in enumerate(schedule(prompts), 1):
        if name in GOOD:
            entry = server.run(GOOD[name]())
            assert executed(entry, "7"), f"prompt {number} ({name}) was served from the cache"
            result.outputs.setdefault(name, []).append(latents(server, entry))
        elif name == "failing":
            kind, data = failure(server.wait(server.queue(_failing())))
            assert kind == "execution_error" and "is SDXL" in data["exception_message"], data
        elif name == "refused":
            assert "motion_scale = nan" in str(refused(server, _refused()))
        else:
            kind, _ = failure(run_interrupted(server, _interrupted(), at_value=4))
            assert kind == "execution_interrupted"
        result.rss.append((number, rss_bytes(server)))
        if log:
            log(f"{number:4d} {name:14s} rss {result.rss[-1][1] / 2**20:8.1f} MiB")
    result.seconds = time.monotonic() - started
    return result


def fresh_outputs(comfyui: str, root, names, workers: int = 2) -> dict[str, torch.Tensor]:
    """Each good prompt run alone, in a server started for it (``workers`` servers at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    def alone(name: str) -> torch.Tensor:
        server = start_server(comfyui, root / f"fresh_{name}")
        try:
            return latents(server, server.run(GOOD[name]()))
        finally:
            server.stop()

    names = list(names)
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(names, pool.map(alone, names)))

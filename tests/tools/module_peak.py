"""Print the peak resident memory (bytes) one motion module adds on CPU: ``positions frames channels backend``.

Run in a fresh process (tests/test_memory_estimate.py). The peak is Linux's VmHWM, reset to the
current RSS just before the forward (``/proc/self/clear_refs``), minus that RSS.
"""

import gc
import sys

import torch

sys.path.insert(0, sys.argv[5])
import ads_package  # noqa: E402

ads_package.register()
from animatediff_suite.motion_modules.temporal import VanillaTemporalModule  # noqa: E402

positions, frames, channels, backend = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(2)
module = VanillaTemporalModule(channels, 8, max(frames, 32), "per_frame", zero_init=False).eval()
for layer in module.modules():
    if hasattr(layer, "backend"):
        layer.backend = backend
side = int(positions ** 0.5)
x = torch.randn(frames, channels, side, side)


def high_water_mark() -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        return int(next(line for line in handle if line.startswith("VmHWM:")).split()[1]) * 1024


with torch.no_grad():
    module(x[:2], 2)  # warm up kernels and allocator
    gc.collect()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")
    before = high_water_mark()
    module(x, frames)
print(high_water_mark() - before)

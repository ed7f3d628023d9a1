"""Data-parallel training under ``torchrun``: every process draws the whole global batch's random
numbers from the same generator and trains on its own share of the clips; gradients are averaged
with an all-reduce before each optimizer step, so N processes with ``batch_size`` B step exactly as
one process with ``batch_size`` N x B would (up to float summation order). Process 0 writes.

The trained parameters live in ComfyUI weight wrappers and a motion model that ComfyUI calls, not
in one ``nn.Module`` forward, so the all-reduce is explicit rather than a DistributedDataParallel
wrapper; the arithmetic is the same (DDP also averages gradients by all-reduce).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def average_gradients(self, params) -> None:
        """Replace each gradient by its mean over the processes (a missing one counts as zero)."""
        if self.size == 1:
            return
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad.div_(self.size)

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

    def mean(self, value: float) -> float:
        """The mean of a float over the processes (NaN anywhere gives NaN)."""
        if self.size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self._device())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return float(tensor) / self.size

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on one of them (a stop request, say)."""
        if self.size == 1:
            return flag
        tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._device())
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def world_from_environment() -> World:
    """The process group ``torchrun`` describes in the environment (gloo on the CPU, NCCL on GPUs);
    one process when there is none. Each process sees only its own GPU (LOCAL_RANK)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        dist.init_process_group(backend=backend)
        log.info("process %d of %d (%s)", dist.get_rank(), size, backend)
    return World(dist.get_rank(), dist.get_world_size())


def pin_local_device() -> None:
    """Before ComfyUI picks its device: under torchrun, show each process only its LOCAL_RANK GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ \
            and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = os.environ["LOCAL_RANK"]

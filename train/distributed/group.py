"""Joining torchrun's process group, and the collectives that always go through it (gloo on CPU).

``torchrun --nproc-per-node N -m train fit ...`` starts N copies of the command; ``setup`` joins them. Without
torchrun's environment (``WORLD_SIZE`` unset or 1) every function here is a no-op.
"""
from __future__ import annotations

import os
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from train.errors import TrainError

__all__ = ["all_reduce_dense", "all_reduce_max", "barrier", "broadcast_float", "is_main", "local_cpus", "rank",
           "requested_size", "setup", "sum_float", "world_size"]


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def requested_size() -> int:
    """The number of processes torchrun started (``WORLD_SIZE``), 1 without torchrun."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise TrainError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def setup() -> None:
    """Join torchrun's process group (gloo) when the environment names more than one process.

    Each process is first pinned to its share of the CPUs it may use (``local_cpus``), so the gloo threads
    that joining starts are pinned with it.
    """
    size = requested_size()
    if size <= 1 or dist.is_initialized():
        return
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise TrainError(f"WORLD_SIZE={size} but {', '.join(missing)} unset: start data-parallel training with "
                         "torchrun --nproc-per-node N -m train fit ...")
    cpus = local_cpus()
    if cpus is not None and os.environ.get("TRAIN_PIN", "1") != "0":
        os.sched_setaffinity(0, cpus)
    dist.init_process_group("gloo", timeout=timedelta(minutes=30))


def local_cpus(usable: list[int] | None = None) -> set[int] | None:
    """This process's CPUs: torchrun's ``LOCAL_WORLD_SIZE`` processes on this machine split the usable CPUs into
    near-equal contiguous blocks, the ``LOCAL_RANK``-th is this one's. None (no pinning) where the machine has
    fewer usable CPUs than local processes or torchrun did not say.

    A process left to the scheduler moves between cores and meets the other processes' gloo threads on its
    own; every step waits for the slowest process, so one preempted step costs all of them.
    """
    try:
        local, here = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    except (KeyError, ValueError):
        return None
    usable = sorted(os.sched_getaffinity(0)) if usable is None else usable
    if here < 1 or not 0 <= local < here or len(usable) < here:
        return None
    return {int(c) for c in np.array_split(np.array(usable), here)[local]}


def all_reduce_dense(tensors: list[torch.Tensor]) -> None:
    """Sum ``tensors`` over all processes in place, as one flat message."""
    if world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def barrier() -> None:
    """Wait until every process gets here (nothing with one process)."""
    if world_size() > 1:
        dist.barrier()


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of ``t`` over all processes (``t`` itself with one process)."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def sum_float(value: float) -> float:
    """``value`` summed over all processes."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def broadcast_float(value: float) -> float:
    """Process 0's ``value``, on every process."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(t, 0)
    return float(t.item())

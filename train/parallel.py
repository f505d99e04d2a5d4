"""Data-parallel training under ``torchrun``: one process per core (or machine), gloo on CPU.

``torchrun --nproc-per-node N -m train fit ...`` starts N copies of the command; each reads the data,
builds the same model from the same seed and trains on its share of every batch. The optimizer
(``train.optim``) sums the gradients of all processes before each step, so every process takes the
same step a single process would take on the whole batch (``batch_size`` is the global batch), and the
models stay identical. Process 0 evaluates, decides early stopping for all, and writes the bundle.

Without torchrun's environment (``WORLD_SIZE`` unset or 1) every function here is a no-op.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from train.errors import TrainError

__all__ = ["all_gather", "all_gather_seconds", "all_reduce_dense", "all_reduce_max", "broadcast_float", "is_main", "rank", "requested_size", "setup",
           "shard_batches", "sum_float", "world_size"]


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
    """Join torchrun's process group (gloo) when the environment names more than one process."""
    size = requested_size()
    if size <= 1 or dist.is_initialized():
        return
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise TrainError(f"WORLD_SIZE={size} but {', '.join(missing)} unset: start data-parallel training with "
                         "torchrun --nproc-per-node N -m train fit ...")
    dist.init_process_group("gloo", timeout=timedelta(minutes=30))


def shard_batches(order: torch.Tensor, batch_size: int, size: int | None = None,
                  me: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """This process's rows of every batch of ``order`` and where its batches end.

    Batch ``s`` is ``order[s * batch_size:(s + 1) * batch_size]`` for everyone; process ``r`` of ``N``
    takes the ``r``-th of its N near-equal parts. Returns the local rows, in batch order, and the end
    offset of each local batch within them, so a batch is a slice of one pre-gathered block.
    ``size`` and ``me`` default to this process's world size and rank.
    """
    size = world_size() if size is None else size
    me = rank() if me is None else me
    steps = (len(order) + batch_size - 1) // batch_size
    if size == 1:
        return order, [min(len(order), (s + 1) * batch_size) for s in range(steps)]
    parts = [order[s * batch_size:(s + 1) * batch_size].tensor_split(size)[me] for s in range(steps)]
    ends, total = [], 0
    for part in parts:
        total += len(part)
        ends.append(total)
    return torch.cat(parts), ends


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


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of ``t`` over all processes (``t`` itself with one process)."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather(t: torch.Tensor) -> torch.Tensor:
    """Every process's ``t`` (the same shape everywhere), stacked in rank order: (processes, *t.shape)."""
    if world_size() == 1:
        return t.unsqueeze(0)
    out = t.new_empty((world_size(), *t.shape))
    dist.all_gather(list(out.unbind(0)), t)  # gloo writes each process's part into its row of ``out``
    return out


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


def all_gather_seconds(floats: int, repeats: int = 30) -> float:
    """Median seconds of one ``all_gather`` of ``floats`` float32 per process, every process arriving together.

    A barrier precedes each timed call, so no process waits for a slower one: this is the collective's own
    cost (latency and transfer), the part of training's ``gather`` seconds that is not waiting.
    """
    message = torch.zeros(floats)
    all_gather(message)  # connections warm
    seconds = []
    for _ in range(repeats):
        if world_size() > 1:
            dist.barrier()
        started = time.perf_counter()
        all_gather(message)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


if __name__ == "__main__":  # torchrun --nproc-per-node N -m train.parallel FLOATS: process 0 prints the median
    torch.set_num_threads(1)
    setup()
    size = int(sys.argv[1])
    result = {"processes": world_size(), "floats": size, "seconds": all_gather_seconds(size)}
    if is_main():
        print(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()

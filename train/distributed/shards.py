"""Which part of the work each process takes: its rows of every batch, its range of a flat tensor."""
from __future__ import annotations

import torch

from train.distributed.group import rank, world_size

__all__ = ["shard_batches", "shard_range"]


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


def shard_range(n: int, size: int | None = None, me: int | None = None, align: int = 16) -> tuple[int, int]:
    """Process ``me``'s part [start, stop) of ``n`` elements split in ``size`` near-equal contiguous parts whose
    bounds are multiples of ``align`` (16 float32: no cache line written by two processes)."""
    size = world_size() if size is None else size
    me = rank() if me is None else me
    units = (n + align - 1) // align
    return min(units * me // size * align, n), min(units * (me + 1) // size * align, n)

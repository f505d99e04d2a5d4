"""The all-gather and the barrier of data-parallel training, through shared memory where it can carry them
(``train.distributed.shm``), else through torch.distributed (gloo)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from train.distributed import shm
from train.distributed.group import world_size

__all__ = ["all_gather", "send_buffer", "sync"]


def all_gather(t: torch.Tensor, copy: bool = True) -> torch.Tensor:
    """Every process's ``t`` (the same shape everywhere), stacked in rank order: (processes, *t.shape).

    Where every process runs on this machine (torchrun's ``LOCAL_WORLD_SIZE`` is its ``WORLD_SIZE``), a 1-D
    float32 ``t`` travels through shared memory (``shm.LocalGather``); otherwise, and with ``TRAIN_SHM=0`` or
    ``TRAIN_GATHER=gloo``, gloo.
    ``copy=False`` may return the shared blocks themselves, valid until this process's next all-gather but one;
    ``t`` itself may be ``send_buffer``'s block, which saves writing it.
    """
    if world_size() == 1:
        return t.unsqueeze(0)
    local = shm.local_gather(t.numel()) if t.dtype == torch.float32 and t.dim() == 1 else None
    if local is not None:
        return local(t, copy)
    out = t.new_empty((world_size(), *t.shape))
    dist.all_gather(list(out.unbind(0)), t)  # gloo writes each process's part into its row of ``out``
    return out


def send_buffer(floats: int) -> torch.Tensor:
    """Where to write a float32 message of ``floats`` for the next ``all_gather``: the shared block when shared
    memory carries it, so the message is not copied again, else a new tensor. Collective, like ``all_gather``."""
    local = shm.local_gather(floats)
    return local.block(floats) if local is not None else torch.empty(floats)


def sync() -> None:
    """Wait until every process gets here: through the shared all-gather's flags where shared memory carries the
    messages (no kernel call), else a gloo barrier. Nothing with one process."""
    if world_size() == 1:
        return
    local = shm.built_gather()
    if local is not None:
        local.sync()
    else:
        dist.barrier()

"""The optimizer's step where the processes share their parameters and shared memory carries the message."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from train.distributed.shards import shard_range
from train.distributed.shm import LocalGather
from train.distributed.wire import block_offsets, merge_owned, message_floats, pack, row_sources, sum_owned_dense
from train.errors import TrainError

if TYPE_CHECKING:
    from train.optim import FlatAdam, RowwiseAdam

__all__ = ["SharedStep"]


class SharedStep:
    """``TrainingOptimizer.step`` where the processes share their parameters and shared memory carries the message
    (``shm.local_gather``): ``exchange``'s message with ``owners``, its sums, the steps of the rows and the
    dense range this process owns, then the wait for everyone (``LocalGather.sync``). The same kernels run in the
    same order as through ``exchange``, ``RowwiseAdam.step`` and ``FlatAdam.step``, so the steps are the same bits.

    What does not change between steps is worked out once: views of the blocks and their headers, where each
    group's rows go in the message, the dense ranges, the state as numpy arrays, scratch for the sums. A step is
    then a few C calls with little Python between them. That matters because this Python runs with cold caches
    (forward and backward have just walked the tables and the batch): there each small torch or numpy operation
    costs several times what it costs in a loop. Measured on two processes at batch 2048, the optimizer's time
    besides waiting went from 1.7-2.1 ms a step through the general form to 1.0-1.2 ms.

    ``run`` returns False, having written only its message, where some process read more rows than a block holds;
    the caller then takes the general path, which grows the blocks (and a new ``SharedStep`` follows).
    """

    def __init__(self, tables: RowwiseAdam, flat: FlatAdam | None, gather: LocalGather) -> None:
        self.tables, self.flat, self.gather = tables, flat, gather
        self.size, self.me = gather.size, gather.me
        groups = tables.param_groups
        self.capacity = list(tables.capacity)
        self.shapes = [tuple(group["flat"].shape) for group in groups]
        self.dense = (flat.param_groups[0]["grad"].numpy() if flat is not None else np.zeros(0, dtype=np.float32))
        self.own = shard_range(len(self.dense), self.size, self.me)
        self.head = len(groups) * (self.size + 1)
        self.offsets = block_offsets(self.shapes, self.capacity, self.head + len(self.dense))
        floats = message_floats(self.shapes, len(self.dense), self.capacity, self.size)
        if floats > gather.floats:
            raise TrainError(f"data-parallel training: a {floats}-float message in {gather.floats}-float blocks")
        self.gradients = [flat.param_groups[0]["grad"]] if flat is not None else []  # ``pack``'s dense gradients
        self.headers = gather.arrays[:, :, :self.head].view(np.int32)  # (set, process, header)
        self.state = [(group["flat"].numpy(), group["exp_avg"].numpy(), group["exp_avg_sq"].numpy())
                      for group in groups]
        self.slots = [group["slot"].numpy() for group in groups]
        self.scratch = []  # per group: merged rows, each entry's position, the sums
        for (rows, width), size in zip(self.shapes, self.capacity):
            entries = size * self.size
            self.scratch.append((np.empty(min(entries, rows), dtype=np.int64), np.empty(entries, dtype=np.int64),
                                 np.zeros((min(entries, rows), width), dtype=np.float32)))
        self.flat_arrays = flat.arrays(*self.own) if flat is not None else None

    def run(self, touched: list[tuple[torch.Tensor | None, torch.Tensor | None]],
            during: Callable[[], None] | None = None) -> bool:
        """Exchange, sum and step ``touched`` (``RowwiseAdam._touched`` of each group) and the dense gradient; then
        wait for everyone. False: nothing summed or stepped (some process's rows outgrew their block). ``during``
        runs once the message is sent, before waiting for the others' (``TrainingOptimizer.step``)."""
        gather, me, size, head, dense = self.gather, self.me, self.size, self.head, self.dense
        clock = self.tables.exchange_parts
        started = time.perf_counter()
        part = gather.calls % 2
        written = pack(gather.arrays[part, me], touched, self.shapes, self.offsets, self.capacity, self.gradients,
                       len(dense), row_sources(touched), size, self.own)
        packed, ahead = time.perf_counter(), [0.0]

        def timed() -> None:
            begun = time.perf_counter()
            during()
            ahead[0] = time.perf_counter() - begun

        gather.sync(timed if during is not None else None)
        received = time.perf_counter()
        clock["pack"] = clock.get("pack", 0.0) + packed - started
        clock["gather"] = clock.get("gather", 0.0) + received - packed - ahead[0]
        clock["ahead"] = clock.get("ahead", 0.0) + ahead[0]
        clock["floats"] = float(written)
        headers = self.headers[part]
        counts = len(touched) * size
        sent = headers[:, :counts].astype(np.int64).reshape(size, len(touched), size)  # (process, group, owner)
        if (sent.sum(axis=2) > self.capacity).any():
            self.tables.exchange_seconds += received - started
            return False
        everyone = gather.arrays[part]
        if len(dense):
            start, stop = self.own
            sum_owned_dense(dense[start:stop], everyone[:, head + start:head + stop], me)
        summed = merge_owned(everyone, sent, headers[:, counts:], me, self.shapes, self.offsets, self.slots,
                              self.scratch)
        unpacked = time.perf_counter()
        clock["unpack"] = clock.get("unpack", 0.0) + unpacked - received
        for group, pair, state in zip(self.tables.param_groups, summed, self.state):
            if pair is not None:
                self.tables._advance(group, *pair, state)
        if self.flat is not None:
            self.flat._advance(self.flat_arrays)
        stepped = time.perf_counter()
        gather.sync()  # nobody reads the parameters before everyone wrote its part
        waited = time.perf_counter() - stepped
        clock["sync"] = clock.get("sync", 0.0) + waited
        self.tables.exchange_seconds += unpacked - started + waited  # as through ``exchange``: not the steps
        return True

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
import mmap
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from train import _local
from train.errors import TrainError

__all__ = ["LocalGather", "all_gather", "all_gather_seconds", "all_reduce_dense", "all_reduce_max", "barrier",
           "broadcast_float", "is_main", "local_cpus", "local_gather", "rank", "requested_size", "send_buffer", "setup",
           "shard_batches", "shard_range", "shared_floats", "shared_floats_available", "sum_float", "sync",
           "transport", "world_size"]


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


def barrier() -> None:
    """Wait until every process gets here (nothing with one process)."""
    if world_size() > 1:
        dist.barrier()


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of ``t`` over all processes (``t`` itself with one process)."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather(t: torch.Tensor, copy: bool = True) -> torch.Tensor:
    """Every process's ``t`` (the same shape everywhere), stacked in rank order: (processes, *t.shape).

    Where every process runs on this machine (torchrun's ``LOCAL_WORLD_SIZE`` is its ``WORLD_SIZE``), a 1-D
    float32 ``t`` travels through shared memory (``LocalGather``); otherwise, and with ``TRAIN_SHM=0``, gloo.
    ``copy=False`` may return the shared blocks themselves, valid until this process's next all-gather but one;
    ``t`` itself may be ``send_buffer``'s block, which saves writing it.
    """
    if world_size() == 1:
        return t.unsqueeze(0)
    local = _local_gather(t.dtype, t.dim(), t.numel())
    if local is not None:
        return local(t, copy)
    out = t.new_empty((world_size(), *t.shape))
    dist.all_gather(list(out.unbind(0)), t)  # gloo writes each process's part into its row of ``out``
    return out


class LocalGather:
    """An all-gather of float32 vectors through one shared-memory file, for processes on one machine.

    Each process writes its message into its own block, publishes the call's number in its flag (a release
    store) and spins until every flag shows it (``train/_local.pyx``): no socket, no kernel call, no thread
    hand-off, and a waiting process keeps its core and caches. Calls alternate between two sets of blocks, so a
    process may write call k + 2 only after every other one published k + 1, that is, after it finished reading
    call k. Gloo's all-gather of the same 120k floats took 1.0-1.3 ms after the last process arrived.

    Building it is collective: process 0 creates the file (in /dev/shm where it exists), the others map it, and
    once all have, process 0 removes its name, so nothing is left behind when training ends or fails. Where the
    file cannot be made or mapped by some process, ``ok`` is False everywhere and gloo carries the messages.
    """

    TIMEOUT_S = 1800.0  # as long as gloo's own timeout (``setup``)
    FLAG_STRIDE = 8     # int64s per flag: each process's flag on its own cache line

    def __init__(self, floats: int) -> None:
        self.floats, self.size, self.me, self.calls = int(floats), world_size(), rank(), 0
        self.group = dist.group.WORLD  # the process group it serves: a new one gets new shared memory
        flags = self.size * self.FLAG_STRIDE
        self._map = _shared_mapping(8 * flags + 4 * 2 * self.size * self.floats, "train-gather-")
        self.ok = self._map is not None  # False: some process could not use the file, so none does
        if not self.ok:
            return
        memory = torch.frombuffer(self._map, dtype=torch.int64, count=flags)
        self.flags = memory.numpy()
        self.blocks = torch.frombuffer(self._map, dtype=torch.float32, offset=8 * flags,
                                       count=2 * self.size * self.floats).view(2, self.size, self.floats)
        self.arrays = self.blocks.numpy()  # the same blocks for C kernels: (set, process, floats)

    def block(self, n: int) -> torch.Tensor:
        """This process's block for the next call, its first ``n`` floats: write a message here to save a copy."""
        return self.blocks[self.calls % 2, self.me, :n]

    def __call__(self, t: torch.Tensor, copy: bool = True) -> torch.Tensor:
        n = t.numel()
        part = self.calls % 2
        mine = self.blocks[part, self.me, :n]
        if t.data_ptr() != mine.data_ptr():
            mine.copy_(t.reshape(-1))
        self.sync()
        everyone = self.blocks[part, :, :n]
        return everyone.clone() if copy else everyone

    def sync(self, during: Callable[[], None] | None = None) -> None:
        """Publish this call and wait until every process has published it; on its own, a call with no message
        (a barrier that keeps the calls' alternation). ``during``: run between publishing and waiting where some
        process has not published yet, that is, where this one would wait; the last to arrive does not run it,
        so it delays nobody."""
        self.calls += 1
        _local.publish(self.flags, self.me * self.FLAG_STRIDE, self.calls)
        if during is not None and not _local.published(self.flags, self.FLAG_STRIDE, self.size, self.calls):
            during()
        if not _local.wait_all(self.flags, self.FLAG_STRIDE, self.size, self.calls, self.TIMEOUT_S):
            raise TrainError(f"data-parallel training: a process did not reach call {self.calls} of the shared "
                             f"all-gather within {self.TIMEOUT_S:.0f} s")


def _create_file(size: int, prefix: str) -> str:
    """A new file of ``size`` bytes in /dev/shm (where it exists), its pages reserved (``posix_fallocate``): on a
    full /dev/shm that fails here, with an OSError, instead of with a SIGBUS at the first write into a mapping."""
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
    handle, path = tempfile.mkstemp(prefix=prefix, dir=folder)
    try:
        os.posix_fallocate(handle, 0, max(int(size), 1))
    except OSError:
        os.close(handle)
        os.unlink(path)
        raise
    os.close(handle)
    return path


def _shared_mapping(size: int, prefix: str) -> mmap.mmap | None:
    """``size`` bytes of zero-filled shared memory that every process maps (collective, every process on this
    machine); None in every process where some process could not make or map it.

    Process 0 creates the file (``_create_file``), the others map it, and once all have, process 0 removes its
    name, so nothing is left behind when training ends or fails.
    """
    path: list[str | None] = [None]
    if is_main():
        try:
            path[0] = _create_file(size, prefix)
        except OSError:
            path[0] = ""  # no room for the file: every process goes on without it
    dist.broadcast_object_list(path, 0)
    mapped = None
    if path[0]:
        try:
            with open(path[0], "r+b") as handle:  # its page table filled now, not by faults while training
                mapped = mmap.mmap(handle.fileno(), 0, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        except OSError:
            mapped = None
    verdict = torch.tensor([0.0 if mapped is not None else 1.0])
    dist.all_reduce(verdict, op=dist.ReduceOp.MAX)  # also the barrier: everyone has mapped the file (or not)
    if is_main() and path[0]:
        os.unlink(path[0])
    return mapped if verdict.item() == 0 else None


def shared_floats(floats: int) -> torch.Tensor | None:
    """A float32 tensor of ``floats`` zeros that every process sees, or None where shared memory cannot carry it
    (as for ``all_gather``: torchrun's ``LOCAL_WORLD_SIZE`` must be the world size, ``TRAIN_SHM`` not 0, and the
    file must be made and mapped everywhere). Collective."""
    if not shared_floats_available():
        return None
    mapped = _shared_mapping(4 * floats, "train-state-")
    return None if mapped is None else torch.frombuffer(mapped, dtype=torch.float32, count=floats)


def shared_floats_available() -> bool:
    """Whether ``all_gather`` and ``shared_floats`` may use shared memory here (several processes, all on this
    machine, ``TRAIN_SHM`` not 0); whether the files can be made is known only by trying."""
    return world_size() > 1 and _all_local()


def sync() -> None:
    """Wait until every process gets here: through the shared all-gather's flags where shared memory carries the
    messages (no kernel call), else a gloo barrier. Nothing with one process."""
    if world_size() == 1:
        return
    local = _GATHER.get("gather")
    if local is not None and local.ok and local.group is dist.group.WORLD and _all_local():
        local.sync()
    else:
        dist.barrier()


def shard_range(n: int, size: int | None = None, me: int | None = None, align: int = 16) -> tuple[int, int]:
    """Process ``me``'s part [start, stop) of ``n`` elements split in ``size`` near-equal contiguous parts whose
    bounds are multiples of ``align`` (16 float32: no cache line written by two processes)."""
    size = world_size() if size is None else size
    me = rank() if me is None else me
    units = (n + align - 1) // align
    return min(units * me // size * align, n), min(units * (me + 1) // size * align, n)


_GATHER: dict[str, LocalGather] = {}


def local_gather(floats: int) -> LocalGather | None:
    """The shared-memory all-gather whose blocks hold ``floats`` per process (built or grown now, collectively),
    None where gloo carries the messages. For a caller that writes its message into ``arrays[calls % 2, me]`` and
    calls ``sync()``, as ``all_gather`` of ``send_buffer``'s block does."""
    return _local_gather(torch.float32, 1, floats) if world_size() > 1 else None


def send_buffer(floats: int) -> torch.Tensor:
    """Where to write a float32 message of ``floats`` for the next ``all_gather``: the shared block when shared
    memory carries it, so the message is not copied again, else a new tensor. Collective, like ``all_gather``."""
    local = local_gather(floats)
    return local.block(floats) if local is not None else torch.empty(floats)


def _local_gather(dtype: torch.dtype, dim: int, floats: int) -> LocalGather | None:
    """The shared-memory all-gather for a ``dim``-D ``dtype`` tensor of ``floats`` elements, built (collectively)
    or grown on first need; None where gloo must carry it (``transport``). Every process decides alike: the
    environment is the same, and so is the message's length (gloo requires it)."""
    if dtype != torch.float32 or dim != 1 or not _all_local() or transport() != "shm":
        return None
    current = _GATHER.get("gather")
    if current is None or current.group is not dist.group.WORLD or (current.ok and current.floats < floats):
        _GATHER["gather"] = current = LocalGather(max(floats * 5 // 4, 1024))
    return current if current.ok else None


TRANSPORTS = ("shm", "gloo")


def transport() -> str:
    """What carries the all-gather between processes on one machine: ``TRAIN_GATHER``, "shm" (``LocalGather``, the
    default) or "gloo" (torch.distributed; the parameters may still be shared, ``shared_floats``)."""
    value = os.environ.get("TRAIN_GATHER", "shm")
    if value not in TRANSPORTS:
        raise TrainError(f"TRAIN_GATHER={value!r}: expected one of {', '.join(TRANSPORTS)}")
    return value


def _all_local() -> bool:
    """Whether shared memory may carry what the processes exchange: torchrun says every process runs on this
    machine (``LOCAL_WORLD_SIZE`` is the world size) and ``TRAIN_SHM`` does not turn it off."""
    return (os.environ.get("TRAIN_SHM", "1") != "0"
            and os.environ.get("LOCAL_WORLD_SIZE", "") == str(world_size()))


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

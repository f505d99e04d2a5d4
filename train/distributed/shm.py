"""Shared memory between the processes of one machine: the all-gather through it (``LocalGather``) and tensors
that every process sees (``shared_floats``).

Both are used only where torchrun says every process runs on this machine (``LOCAL_WORLD_SIZE`` is the world
size), ``TRAIN_SHM`` is not 0 and, for the all-gather, ``TRAIN_GATHER`` is not "gloo" (``transport``). Side by side
on two processes of a 2-core machine, training through it took 1.22 times the samples a second of training through
gloo (median of 7 pairs of runs taken in turn, ``bench/results/ddp-transport-20261207.json``).
"""
from __future__ import annotations

import mmap
import os
import tempfile
from typing import Callable

import torch
import torch.distributed as dist

from train.distributed import _flags
from train.distributed.group import is_main, rank, world_size
from train.errors import TrainError

__all__ = ["LocalGather", "TRANSPORTS", "built_gather", "local_gather", "shared_floats", "shared_floats_available",
           "transport"]


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


class LocalGather:
    """An all-gather of float32 vectors through one shared-memory file, for processes on one machine.

    Each process writes its message into its own block, publishes the call's number in its flag (a release
    store) and spins until every flag shows it (``train/distributed/_flags.pyx``): no socket, no kernel call, no thread
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
        _flags.publish(self.flags, self.me * self.FLAG_STRIDE, self.calls)
        if during is not None and not _flags.published(self.flags, self.FLAG_STRIDE, self.size, self.calls):
            during()
        if not _flags.wait_all(self.flags, self.FLAG_STRIDE, self.size, self.calls, self.TIMEOUT_S):
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


_GATHER: dict[str, LocalGather] = {}


def local_gather(floats: int) -> LocalGather | None:
    """The shared-memory all-gather whose blocks hold ``floats`` float32 per process, built (collectively) or grown
    on first need; None where gloo carries the messages (one process, not all on this machine, ``transport``). For
    a caller that writes its message into ``arrays[calls % 2, me]`` and calls ``sync()``, as ``all_gather`` of
    ``send_buffer``'s block does. Every process decides alike: the environment is the same, and so is the
    message's length (gloo requires it)."""
    if world_size() == 1 or not _all_local() or transport() != "shm":
        return None
    current = _GATHER.get("gather")
    if current is None or current.group is not dist.group.WORLD or (current.ok and current.floats < floats):
        _GATHER["gather"] = current = LocalGather(max(floats * 5 // 4, 1024))
    return current if current.ok else None


def built_gather() -> LocalGather | None:
    """The shared-memory all-gather this process group built so far and may still use, None if none (``sync``)."""
    local = _GATHER.get("gather")
    return local if local is not None and local.ok and local.group is dist.group.WORLD and _all_local() else None

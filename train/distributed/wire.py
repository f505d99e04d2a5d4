"""The gradient exchange's wire protocol: one message per process and step, all-gathered, then summed.

A message is a header (per group its count of rows read per owner, then per group the earlier group whose row
tensor it shares, -1 if none), the dense gradients, and per group a block of ``capacity`` rows of 1 + width floats:
the row number (int32 bits), then its gradient. ``exchange`` writes, sends and sums it; ``SharedStep``
(``train.distributed.shared_step``) does the same with the parts worked out once.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from train import _rows
from train.distributed.gather import all_gather, send_buffer
from train.distributed.group import rank
from train.distributed.shards import shard_range
from train.errors import TrainError

__all__ = ["EXCHANGE_PARTS", "OWNER_SHIFT", "block_offsets", "exchange", "merge_owned", "message_floats", "pack",
           "row_sources", "sum_owned_dense"]


# the exchange's timed parts (``exchange``, ``SharedStep``): "ahead" is the next batch's preparation, run while a
# process waits for the others (``TrainingOptimizer.step``'s ``during``), not counted in "gather"
EXCHANGE_PARTS = ("pack", "gather", "ahead", "unpack", "sync")
OWNER_SHIFT = 6  # with sharded state a table row belongs to process (row >> 6) % processes: blocks of 64 rows


def exchange(touched: list[tuple[torch.Tensor | None, torch.Tensor | None]], shapes: list[tuple[int, int]],
             dense: list[torch.Tensor], capacity: list[int], clock: dict[str, float] | None = None,
             slots: list[torch.Tensor] | None = None,
             owners: int = 1) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Every process's touched rows with their summed gradients, and ``dense`` summed in place: one message.

    ``shapes`` are the groups' (rows, width). Each process sends, in one all-gather, a header (per group its
    count of rows read per owner, then per group the earlier group whose row tensor it shares, -1 if none), its
    dense gradients and per group a block of ``capacity`` rows of 1 + width floats: the row number (int32 bits),
    then its gradient (``pack_owned`` in ``train/_rows.pyx``), its count of them first, the rest unused. Every
    process then sums what it received (``merge_blocks``, in C, straight from the received message), so it
    updates the union of the rows read, as one process would on the whole batch. The fused forward stages one row
    tensor for the linear weights and the vectors of the same fields: where every process says a group shares an
    earlier group's rows, the later group's sums reuse the earlier merge's positions (``add_blocks``).

    ``owners`` > 1 (the processes, when the parameters and Adam's moments sit in shared memory,
    ``TrainingOptimizer``): row r belongs to process ``(r >> OWNER_SHIFT) % owners`` and each block lists its rows
    owner by owner, so this process sums, and returns, only the rows it owns (an empty pair for a group whose rows
    some process read but none of them its own; (None, None) where nobody read any), and sums ``dense`` (one flat
    tensor) only over its ``shard_range``, the other processes' ranges of its own gradient left out of the
    message. Every row's sum adds the processes' gradients in process order either way, so the sums are the
    bits one owner would get.

    Where some process read more rows than a block holds (the first step, and rarely later), every process
    saw the same counts, so all grow ``capacity`` (in place, 25 % above the largest count) the same way and
    send again. A batch of 2048 reads a few thousand rows per group, so a step sends ~10^5 floats, not the
    tables as dense copies (~1.5M floats), in one collective.

    ``clock``, when given, is charged the seconds of each part: ``pack`` (writing the message), ``gather``
    (the all-gather: the transfer and the wait for the slowest process) and ``unpack`` (the sums); its
    ``floats`` is the length of the last message's written part (header, dense gradients, rows) per process.
    """
    if any(n >= 1 << 31 for n, _ in shapes):
        raise TrainError("data-parallel training: a table group holds 2**31 rows or more")
    groups = len(shapes)
    me = rank() if owners > 1 else 0
    dense_size = sum(t.numel() for t in dense)
    if owners > 1 and (len(dense) > 1 or (dense and not dense[0].is_contiguous())):
        raise TrainError("data-parallel training: sharded state needs the dense gradients as one flat tensor")
    own = shard_range(dense_size, owners, me) if owners > 1 else (0, dense_size)
    shares = row_sources(touched)
    clock = {} if clock is None else clock
    head = groups * (owners + 1)
    while True:
        started = time.perf_counter()
        message, written = _message(touched, shapes, dense, dense_size, capacity, shares, owners,
                                    own if owners > 1 else None)
        packed = time.perf_counter()
        gathered = all_gather(message, copy=False)  # read before this function returns
        received = time.perf_counter()
        clock["pack"] = clock.get("pack", 0.0) + packed - started
        clock["gather"] = clock.get("gather", 0.0) + received - packed
        clock["floats"] = float(written)  # what was written, not the blocks' unused room
        header = gathered.numpy()[:, :head].view(np.int32)
        sent = header[:, :groups * owners].astype(np.int64).reshape(-1, groups, owners)  # (process, group, owner)
        longest = sent.sum(axis=2).max(axis=0).tolist()
        if all(n <= c for n, c in zip(longest, capacity)):
            break
        capacity[:] = [max(c, n + n // 4) for c, n in zip(capacity, longest)]
    shared = header[:, groups * owners:]
    offset = head
    if owners > 1:
        if dense_size:
            start, stop = own
            sum_owned_dense(dense[0].view(-1)[start:stop].numpy(), gathered.numpy()[:, offset + start:offset + stop],
                             me)
        offset += dense_size
    elif len(dense) == 1 and dense[0].is_contiguous():  # ``FlatAdam``'s one gradient: summed straight into it
        torch.sum(gathered[:, offset:offset + dense_size], dim=0, out=dense[0].view(-1))
        offset += dense_size
    elif dense:
        summed = gathered[:, offset:offset + dense_size].sum(dim=0)
        for t in dense:
            t.copy_(summed[offset - head:offset - head + t.numel()].view_as(t))
            offset += t.numel()
    offsets = block_offsets(shapes, capacity, offset)
    out = [(None, None) if pair is None else (torch.from_numpy(pair[0]), torch.from_numpy(pair[1]))
           for pair in merge_owned(gathered.numpy(), sent, shared, me, shapes, offsets,
                                   None if slots is None else [slot.numpy() for slot in slots])]
    clock["unpack"] = clock.get("unpack", 0.0) + time.perf_counter() - received
    return out


def sum_owned_dense(mine: np.ndarray, received: np.ndarray, me: int) -> None:
    """Add to ``mine`` (this process's own range of its dense gradient) that range of every other process's message
    (``received``: (processes, range), row ``me`` not read), in process order, in place."""
    if len(received) == 2:  # a + b == b + a in floating point: the process-order sum, without a copy
        np.add(received[1 - me], mine, out=mine)
        return
    parts = [mine if p == me else received[p] for p in range(len(received))]
    total = parts[0].copy()
    for part in parts[1:]:
        total += part
    mine[:] = total


def merge_owned(received: np.ndarray, sent: np.ndarray, shares: np.ndarray, me: int, shapes: list[tuple[int, int]],
                offsets: list[int], slots: list[np.ndarray] | None = None,
                scratch: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
                ) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Per group, the rows owner ``me`` owns that some process read, with their gradients summed in process order,
    from every process's block (``received``: (processes, floats), each group's blocks from ``offsets[g]``).

    ``sent`` counts each process's rows by group and owner (process, group, owner); ``shares`` (process, group) names
    the earlier group whose rows each process's group repeats, -1 if none: where every process says so, the group's
    sums reuse that merge's positions (``add_blocks``), else ``merge_blocks`` makes them. A group gets an empty pair
    where others read rows but none of this owner's (its step still counts), None where nobody read any. ``slots``:
    the groups' ``unique_rows`` scratch (new ones if None); ``scratch``: per group arrays for the rows, positions and
    sums, large enough for every process's block (``SharedStep``), else new arrays."""
    out: list[tuple[np.ndarray, np.ndarray] | None] = []
    merged: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}  # a merged group's rows, positions and count
    for g, ((table_rows, width), offset) in enumerate(zip(shapes, offsets)):
        per_process = np.ascontiguousarray(sent[:, g, me])
        entries = int(per_process.sum())
        if not entries:
            out.append((np.zeros(0, dtype=np.int64), np.zeros((0, width), dtype=np.float32))
                       if sent[:, g].any() else None)
            continue
        starts = sent[:, g, :me].sum(axis=1)  # this owner's run in each block, in rows
        lead = int(shares[0, g])
        if lead >= 0 and lead in merged and (shares[:, g] == lead).all():
            rows, position, k = merged[lead]
            sums = (scratch[g][2][:k] if scratch is not None and k <= len(scratch[g][2])
                    else np.zeros((k, width), dtype=np.float32))
            sums.fill(0.0)
            _rows.add_blocks(received, offset, width, per_process, starts, position, sums)
        else:
            room = min(entries, table_rows)
            if scratch is not None:
                rows, position, sums = scratch[g][0][:room], scratch[g][1][:entries], scratch[g][2][:room]
                sums.fill(0.0)
            else:
                rows, position = np.empty(room, dtype=np.int64), np.empty(entries, dtype=np.int64)
                sums = np.zeros((room, width), dtype=np.float32)
            slot = slots[g] if slots is not None else np.full(table_rows, -1, dtype=np.int32)
            k = _rows.merge_blocks(received, offset, width, per_process, starts, slot, rows, position, sums)
            merged[g] = (rows, position, k)
            sums = sums[:k]
        out.append((rows[:k], sums))
    return out


def message_floats(shapes: list[tuple[int, int]], dense_size: int, capacity: list[int], owners: int) -> int:
    """The length of ``_message``'s message: header, dense gradients, and ``capacity`` rows of each group."""
    return len(shapes) * (owners + 1) + dense_size + sum(c * (w + 1) for (_, w), c in zip(shapes, capacity))


def _message(touched: list[tuple[torch.Tensor | None, torch.Tensor | None]], shapes: list[tuple[int, int]],
             dense: list[torch.Tensor], dense_size: int, capacity: list[int], shares: list[int], owners: int,
             own: tuple[int, int] | None) -> tuple[torch.Tensor, int]:
    """This process's part of the all-gather (``pack``), written into ``send_buffer``'s block, and the length of
    its written part."""
    message = send_buffer(message_floats(shapes, dense_size, capacity, owners))
    offsets = block_offsets(shapes, capacity, len(shapes) * (owners + 1) + dense_size)
    return message, pack(message.numpy(), touched, shapes, offsets, capacity, dense, dense_size, shares, owners, own)


def block_offsets(shapes: list[tuple[int, int]], capacity: list[int], start: int) -> list[int]:
    """Where each group's block of ``capacity`` rows (1 + width floats each) starts in a message, the first at
    ``start`` (after the header and the dense gradients)."""
    offsets = []
    for (_, width), size in zip(shapes, capacity):
        offsets.append(start)
        start += size * (width + 1)
    return offsets


def row_sources(touched: list[tuple[torch.Tensor | None, torch.Tensor | None]]) -> list[int]:
    """Per group, the earlier group whose row tensor it stages (the fused forward's linear weights and vectors read
    the same rows), -1 if none."""
    return [next((j for j in range(g) if rows is not None and touched[j][0] is rows), -1)
            for g, (rows, _) in enumerate(touched)]


def pack(message: np.ndarray, touched: list[tuple[torch.Tensor | None, torch.Tensor | None]],
         shapes: list[tuple[int, int]], offsets: list[int], capacity: list[int], dense: list[torch.Tensor],
         dense_size: int, shares: list[int], owners: int, own: tuple[int, int] | None) -> int:
    """Write a process's message into ``message``: header (rows per group and owner, then ``shares``), dense
    gradients (without ``own``, the range this process sums itself, where given), then per group its rows and their
    gradients from ``offsets[g]`` (``pack_owned``: ``capacity`` rows of each; slots past a group's count are left
    as they are, nobody reads them; more rows than fit: the header alone tells the counts). Returns the length of
    the written part (the header, the dense gradients and every row read)."""
    groups = len(shapes)
    head = groups * (owners + 1)
    counts = np.zeros((groups, owners), dtype=np.int64)
    if dense and own is None:
        torch.cat([t.reshape(-1) for t in dense], out=torch.from_numpy(message[head:head + dense_size]))
    elif dense:  # one flat gradient: every range but this process's own
        flat = dense[0].view(-1).numpy()
        message[head:head + own[0]] = flat[:own[0]]
        message[head + own[1]:head + dense_size] = flat[own[1]:]
    written = head + dense_size
    for g, ((rows, grads), (_, width), size) in enumerate(zip(touched, shapes, capacity)):
        if rows is None:
            continue
        if len(rows) <= size:
            _rows.pack_owned(message, offsets[g], rows.contiguous().numpy(), grads.contiguous().numpy(), OWNER_SHIFT,
                             counts[g])
        else:
            counts[g] = np.bincount((rows.numpy() >> OWNER_SHIFT) % owners, minlength=owners)
        written += len(rows) * (width + 1)
    header = message[:head].view(np.int32)
    header[:groups * owners] = counts.reshape(-1)
    header[groups * owners:] = shares
    return written

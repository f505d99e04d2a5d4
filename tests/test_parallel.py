"""Data-parallel training: batches split across processes, and torchrun on 2 processes writes one bundle."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from train.distributed import _flags, shm  # noqa: E402
from train.distributed.gather import all_gather, send_buffer, sync  # noqa: E402
from train.distributed.group import local_cpus  # noqa: E402
from train.distributed.shards import shard_batches, shard_range  # noqa: E402
from train.distributed.wire import exchange  # noqa: E402
from train.errors import TrainError  # noqa: E402
from train.optim import RowwiseAdam, merge_sum  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_each_batch_is_split_across_the_processes_and_nothing_is_lost():
    order = torch.randperm(23, generator=torch.Generator().manual_seed(0))
    shards = [shard_batches(order, 8, size=3, me=r) for r in range(3)]
    assert shard_batches(order, 8, size=1, me=0)[1] == [8, 16, 23]
    for s, batch in enumerate(order.split(8)):
        parts = []
        for rows, ends in shards:
            start = ends[s - 1] if s else 0
            parts.append(rows[start:ends[s]])
        assert torch.equal(torch.cat(parts), batch)  # process r holds the r-th part of batch s
    assert [len(ends) for _, ends in shards] == [3, 3, 3]
    assert sorted(torch.cat([rows for rows, _ in shards]).tolist()) == list(range(23))


def test_merge_sum_lists_each_row_once_with_its_gradients_summed_in_process_order():
    parts = [torch.tensor([7, 2, 9]), torch.tensor([3, 9, 7, 0]), torch.tensor([5, 3])]
    values = torch.arange(18, dtype=torch.float32).view(9, 2)
    slot = torch.full((10,), -1, dtype=torch.int32)
    rows, (sums, doubled) = merge_sum(torch.cat(parts).to(torch.int32), [values, 2 * values[:, :1]], 10, slot)
    assert rows.tolist() == [7, 2, 9, 3, 0, 5]  # the first part, then each later part's new rows in order
    expected = torch.zeros(10, 2).index_add_(0, torch.cat(parts), values)
    assert torch.equal(sums, expected[rows]) and torch.equal(doubled, 2 * expected[rows][:, :1])
    assert torch.all(slot == -1)
    alone, (same,) = merge_sum(torch.tensor([4, 1], dtype=torch.int32), [values[:2]], 10)
    assert alone.tolist() == [4, 1] and torch.equal(same, values[:2])
    with pytest.raises(IndexError, match="row 10 .*10 rows"):
        merge_sum(torch.tensor([4, 10], dtype=torch.int32), [values[:2]], 10, slot)
    assert torch.all(slot == -1)


def test_each_local_process_is_pinned_to_its_own_block_of_cpus(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for local, expected in ((0, {0, 1}), (1, {2, 3})):
        monkeypatch.setenv("LOCAL_RANK", str(local))
        assert local_cpus([0, 1, 2, 3]) == expected
    assert local_cpus([5]) is None  # fewer CPUs than processes: left to the scheduler
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert local_cpus([0, 1]) is None  # not started by torchrun


def test_the_transport_is_shared_memory_unless_train_gather_names_gloo(monkeypatch):
    monkeypatch.delenv("TRAIN_GATHER", raising=False)
    assert shm.transport() == "shm"
    monkeypatch.setenv("TRAIN_GATHER", "gloo")
    assert shm.transport() == "gloo"
    monkeypatch.setenv("TRAIN_GATHER", "tcp")
    with pytest.raises(TrainError, match="TRAIN_GATHER='tcp': expected one of shm, gloo"):
        shm.transport()


def test_the_spin_wait_sees_every_flag_and_gives_up_after_its_timeout():
    flags = torch.zeros(16, dtype=torch.int64).numpy()
    _flags.publish(flags, 0, 3)
    _flags.publish(flags, 8, 4)
    assert _flags.wait_all(flags, 8, 2, 3, 1.0)
    assert not _flags.wait_all(flags, 8, 2, 4, 0.05)  # flag 0 says 3
    assert _flags.published(flags, 8, 2, 3) and not _flags.published(flags, 8, 2, 4)  # one look, no wait
    with pytest.raises(IndexError):
        _flags.wait_all(flags, 8, 3, 1, 0.05)
    with pytest.raises(IndexError):
        _flags.publish(flags, 16, 1)


def _no_room(size: int, prefix: str) -> str:
    raise OSError(28, "No space left on device")


def _gather_worker(rank: int, store: str, out: str, room: bool) -> None:
    _join(rank, store, "shared memory")
    if not room:  # process 0 cannot make the file: both processes go on with gloo
        shm._create_file = _no_room
    results = []
    for step, n in enumerate((5, 3, 2000, 7)):  # the third call outgrows the first shared file
        message = send_buffer(n)
        message.copy_(torch.arange(n, dtype=torch.float32) + 100 * rank + step)
        results.append(all_gather(message, copy=step % 2 == 0).clone())
    results.append(all_gather(torch.ones(2, dtype=torch.float64) * rank))  # float64: gloo carries it
    results.append(shm._GATHER["gather"].ok)
    ran: list[int] = []  # ``during`` runs in the process that arrives first, which would wait, not in the last
    if rank == 1:
        time.sleep(0.3)
    sync() if not room else shm._GATHER["gather"].sync(during=lambda: ran.append(rank))
    results.append(ran)
    torch.save(results, Path(out) / f"out-{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("room", [True, False], ids=["shared file", "no room for it"])
def test_the_shared_memory_all_gather_stacks_every_message_and_leaves_no_file(tmp_path, room):
    before = set(Path("/dev/shm").glob("train-gather-*")) if Path("/dev/shm").is_dir() else set()
    results = _run_two(_gather_worker, tmp_path, room)
    assert results[0][5] is room and results[1][5] is room  # both use the file, or neither
    if room:
        assert results[0][6] == [0] and results[1][6] == []
    for step, n in enumerate((5, 3, 2000, 7)):
        expected = torch.stack([torch.arange(n, dtype=torch.float32) + 100 * r + step for r in range(2)])
        assert torch.equal(results[0][step], expected) and torch.equal(results[1][step], expected)
    assert torch.equal(results[0][4], torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64))
    after = set(Path("/dev/shm").glob("train-gather-*")) if Path("/dev/shm").is_dir() else set()
    assert after <= before


def _run_two(worker, tmp_path: Path, *args) -> list:
    """``worker(rank, store_file, out_dir, *args)`` in two gloo processes; what each saved, in rank order."""
    mp.start_processes(worker, args=(str(tmp_path / "store"), str(tmp_path), *args), nprocs=2, join=True,
                       start_method="fork")
    return [torch.load(tmp_path / f"out-{r}.pt") for r in range(2)]


TRANSPORTS = ["shared memory", "gloo"]


def _join(rank: int, store: str, transport: str = "gloo") -> None:
    """Join a group of two; the all-gathers travel through shared memory where torchrun would say both processes
    run on this machine (``LOCAL_WORLD_SIZE``), else through gloo."""
    torch.set_num_threads(1)
    if transport == "shared memory":
        os.environ["LOCAL_WORLD_SIZE"] = "2"
    else:
        os.environ.pop("LOCAL_WORLD_SIZE", None)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)


def _touched(rank: int, step: int) -> tuple[list, list[torch.Tensor]]:
    """Rank-dependent rows for two groups (widths 1 and 3, 50 rows each) and two dense gradients."""
    g = torch.Generator().manual_seed(10 * step + rank)
    rows = torch.randperm(50, generator=g)[:8 + 12 * step + 5 * rank]  # step 1 outgrows the first capacity
    other = torch.randperm(50, generator=g)[:6]
    # process 0 shares one row tensor between its groups; process 1 only at step 1, where both do
    second = rows if rank == 0 or step == 1 else other
    touched = [(rows, torch.randn(len(rows), 1, generator=g)), (second, torch.randn(len(second), 3, generator=g))]
    if step == 2 and rank == 1:
        touched[0] = (None, None)  # a process may read no row of a group
    return touched, [torch.randn(4, 2, generator=g), torch.randn(3, generator=g)]


def _exchange_worker(rank: int, store: str, out: str, transport: str) -> None:
    _join(rank, store, transport)
    capacity, results = [0, 0], []
    for step in range(3):
        touched, dense = _touched(rank, step)
        summed = exchange(touched, [(50, 1), (50, 3)], dense, capacity)
        results.append((summed, dense, list(capacity)))
    torch.save(results, Path(out) / f"out-{rank}.pt")
    dist.destroy_process_group()


def _expected(step: int, group: int, width: int) -> torch.Tensor:
    """The group's gradients of both processes summed into a dense (50, width) table."""
    total = torch.zeros(50, width)
    for rank in range(2):
        rows, grads = _touched(rank, step)[0][group]
        if rows is not None:
            total.index_add_(0, rows, grads)
    return total


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_exchange_sums_every_processes_rows_and_dense_gradients_the_same_way_in_each(tmp_path, transport):
    results = _run_two(_exchange_worker, tmp_path, transport)
    for step in range(3):
        for rank in range(2):
            summed, dense, capacity = results[rank][step]
            for group, width in ((0, 1), (1, 3)):
                rows, grads = summed[group]
                assert len(torch.unique(rows)) == len(rows)  # each row once: the update may index by them
                table = torch.zeros(50, width).index_put_((rows,), grads)
                assert torch.allclose(table, _expected(step, group, width), atol=1e-6)
                other_rows, other_grads = results[1 - rank][step][0][group]
                assert torch.equal(rows, other_rows) and torch.equal(grads, other_grads)  # bit for bit alike
            want = [sum(_touched(r, step)[1][i] for r in range(2)) for i in range(2)]
            assert all(torch.allclose(d, w, atol=1e-6) for d, w in zip(dense, want))
            assert capacity == results[1 - rank][step][2]
    assert results[0][1][2][0] >= 8 + 12 + 5  # grown for the larger second step


def _tables(seed: int = 0) -> list[torch.nn.Embedding]:
    torch.manual_seed(seed)
    return [torch.nn.Embedding(30, 1), torch.nn.Embedding(30, 4)]


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, 30, (16,), generator=torch.Generator().manual_seed(step))


def _train_tables(tables: list[torch.nn.Embedding], dense: torch.nn.Parameter, parts: list[torch.Tensor],
                  optimizer: RowwiseAdam) -> None:
    """Row-wise Adam on the tables; plain gradient descent on ``dense``, with the gradient the exchange summed."""
    for part in parts:
        optimizer.zero_grad()
        dense.grad = None
        loss = ((tables[0](part).sum(1) + tables[1](part) @ dense) ** 2).sum()
        loss.backward()
        optimizer.step(dense=[dense.grad])
        with torch.no_grad():
            dense -= 0.01 * dense.grad


def _adam_worker(rank: int, store: str, out: str, transport: str) -> None:
    _join(rank, store, transport)
    tables, dense = _tables(), torch.nn.Parameter(torch.linspace(-1, 1, 4))
    optimizer = RowwiseAdam([{"params": [tables[0].weight], "eps": 0.1, "l2": 1e-3},
                             {"params": [tables[1].weight], "eps": 0.1, "l2": 0.0}],
                            {id(t.weight): t for t in tables}, lr=0.05)
    _train_tables(tables, dense, [_batch(step).tensor_split(2)[rank] for step in range(4)], optimizer)
    torch.save([t.weight.detach() for t in tables] + [dense.detach()], Path(out) / f"out-{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_two_processes_take_the_step_one_process_takes_on_the_whole_batch(tmp_path, transport):
    """Each process steps on its half of every batch; the tables and the dense weights stay identical across
    processes and equal one process stepping on the whole batches."""
    two = _run_two(_adam_worker, tmp_path, transport)
    assert all(torch.equal(a, b) for a, b in zip(*two))
    tables, dense = _tables(), torch.nn.Parameter(torch.linspace(-1, 1, 4))
    optimizer = RowwiseAdam([{"params": [tables[0].weight], "eps": 0.1, "l2": 1e-3},
                             {"params": [tables[1].weight], "eps": 0.1, "l2": 0.0}],
                            {id(t.weight): t for t in tables}, lr=0.05)
    _train_tables(tables, dense, [_batch(step) for step in range(4)], optimizer)
    one = [t.weight.detach() for t in tables] + [dense.detach()]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(two[0], one))
    assert not torch.equal(one[1], _tables()[1].weight) and not torch.equal(one[2], torch.linspace(-1, 1, 4))


@pytest.mark.slow
def test_torchrun_on_two_processes_trains_what_one_process_trains(synthetic_data, tmp_path):
    """The gradients of both parts of every batch are summed, so the two runs take the same steps. The fixture's
    14,400 training rows make 11 batches of 1,309 and a last one of 1 row, which one process holds alone."""
    def fit(out: Path, processes: int) -> subprocess.CompletedProcess:
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                     "--standalone"] if processes > 1 else [sys.executable])
        return subprocess.run([*launcher, "-m", "train", "fit", "--data", str(synthetic_data), "--model", "deepfm",
                               "--epochs", "2", "--set", "batch_size=1309", "--out", str(out), "--quiet"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)

    two = fit(tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    one = fit(tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    printed = json.loads(two.stdout)  # one JSON document: only process 0 prints
    meta_two = json.loads((tmp_path / "two" / "meta.json").read_text())
    meta_one = json.loads((tmp_path / "one" / "meta.json").read_text())
    assert printed["model_id"] == meta_two["model_id"]
    assert meta_two["training"]["processes"] == 2 and meta_one["training"]["processes"] == 1
    assert meta_two["hyperparameters"] == meta_one["hyperparameters"]
    assert meta_two["parity"]["max_abs_diff"] <= 1e-6
    for split in ("train", "val", "test"):
        assert meta_two["metrics"][split]["auc"] == pytest.approx(meta_one["metrics"][split]["auc"], abs=1e-4)
    for a, b in zip(meta_two["training"]["history"], meta_one["training"]["history"]):
        assert a["train_logloss"] == pytest.approx(b["train_logloss"], rel=1e-4)


def test_pack_owned_writes_each_owners_rows_as_one_run_in_their_order():
    from train import _rows
    rows = torch.tensor([130, 5, 64, 200, 70, 1, 127, 128])  # blocks of 64 rows: 2, 0, 1, 3, 1, 0, 1, 2
    grads = torch.arange(16, dtype=torch.float32).view(8, 2)
    for owners, runs in ((1, [[130, 5, 64, 200, 70, 1, 127, 128]]),
                         (2, [[130, 5, 1, 128], [64, 200, 70, 127]]),
                         (3, [[5, 200, 1], [64, 70, 127], [130, 128]])):
        message, counts = torch.full((3 + 8 * 3,), -7.0), torch.zeros(owners, dtype=torch.long)
        _rows.pack_owned(message.numpy(), 3, rows.numpy(), grads.numpy(), 6, counts.numpy())
        assert counts.tolist() == [len(run) for run in runs]
        block = message[3:].view(8, 3)
        assert block[:, 0].contiguous().view(torch.int32).tolist() == sum(runs, [])
        order = [rows.tolist().index(r) for r in sum(runs, [])]
        assert torch.equal(block[:, 1:], grads[order])
        assert torch.all(message[:3] == -7.0)  # nothing before the offset
    with pytest.raises(ValueError):
        _rows.pack_owned(torch.zeros(10).numpy(), 3, rows.numpy(), grads.numpy(), 6,
                         torch.zeros(2, dtype=torch.long).numpy())  # the message is too short


def test_each_process_owns_a_cache_aligned_part_of_the_dense_weights():
    for n, size in ((100, 2), (1000, 3), (5, 2), (0, 2)):
        parts = [shard_range(n, size, me) for me in range(size)]
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))  # no gap, no overlap
        assert all(start % 16 == 0 for start, _ in parts)
    assert shard_range(1000, 2, 0) == (0, 496) and shard_range(1000, 2, 1) == (496, 1000)


def _wide(rank: int, step: int) -> tuple[list, torch.Tensor]:
    """Rank-dependent rows over 300-row groups (so both processes own some), one flat dense gradient."""
    g = torch.Generator().manual_seed(100 * step + rank)
    rows = torch.randperm(300, generator=g)[:40 + 30 * step + 7 * rank]
    touched = [(rows, torch.randn(len(rows), 1, generator=g)), (rows, torch.randn(len(rows), 3, generator=g))]
    if step == 2:
        touched[1] = (rows[:3] if rank == 0 else None, torch.randn(3, 3, generator=g) if rank == 0 else None)
    return touched, torch.randn(37, generator=g)


def _owned_worker(rank: int, store: str, out: str) -> None:
    _join(rank, store, "shared memory")
    results = []
    capacity = {1: [0, 0], 2: [0, 0]}
    for step in range(3):
        touched, dense = _wide(rank, step)
        for owners in (1, 2):
            flat = dense.clone()
            results.append((owners, exchange(touched, [(300, 1), (300, 3)], [flat], capacity[owners], owners=owners),
                            flat))
    torch.save(results, Path(out) / f"out-{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_with_sharded_state_each_process_sums_only_the_rows_and_dense_range_it_owns(tmp_path):
    results = _run_two(_owned_worker, tmp_path)
    for step in range(3):
        everyone = results[0][2 * step]
        assert everyone[0] == 1 and torch.equal(everyone[2], results[1][2 * step][2])
        for group in range(2):
            all_rows, all_sums = everyone[1][group]
            owned = [results[rank][2 * step + 1][1][group] for rank in range(2)]
            if all_rows is None:
                assert owned == [(None, None), (None, None)]
                continue
            for rank, (rows, sums) in enumerate(owned):
                assert torch.all((rows >> 6) % 2 == rank)  # only its own rows
                picked = torch.tensor([all_rows.tolist().index(r) for r in rows.tolist()], dtype=torch.long)
                assert torch.equal(sums, all_sums[picked])  # the same bits as the full sum
            assert sorted(torch.cat([rows for rows, _ in owned]).tolist()) == sorted(all_rows.tolist())
        for rank in range(2):
            start, stop = shard_range(37, 2, rank)
            assert torch.equal(results[rank][2 * step + 1][2][start:stop], everyone[2][start:stop])
    # step 2, second group: only process 0 read rows; each process still gets a pair (maybe empty), so both count
    # the step for the group's bias correction
    assert all(results[rank][5][1][1][0] is not None for rank in range(2))


def _sharded_worker(rank: int, store: str, out: str, shard: str) -> None:
    from train.optim import FlatAdam, TrainingOptimizer
    os.environ["TRAIN_SHARD"] = "0" if shard == "0" else "1"
    if shard == "gloo":  # shared state, the messages and the barrier through gloo (``TRAIN_GATHER``)
        os.environ["TRAIN_GATHER"] = "gloo"
    if shard == "no room":  # the state's file cannot be made: every process keeps its own state
        make = shm._create_file
        shm._create_file = lambda size, prefix: _no_room(size, prefix) if "state" in prefix else make(size, prefix)
    _join(rank, store, "shared memory")
    torch.manual_seed(0)
    tables = [torch.nn.Embedding(300, 1), torch.nn.Embedding(300, 4)]
    dense = torch.nn.Parameter(torch.linspace(-1, 1, 4))
    tables_adam = RowwiseAdam([{"params": [tables[0].weight], "eps": 0.1, "l2": 1e-3},
                               {"params": [tables[1].weight], "eps": 0.1, "l2": 0.0}],
                              {id(t.weight): t for t in tables}, lr=0.05)
    optimizer = TrainingOptimizer([tables_adam, FlatAdam([dense], lr=0.01, eps=1e-8)], [], tables)
    optimizer.prepare(16, 1)  # blocks for 8 rows: the first step's 16 outgrow them, the general path grows them
    waits = []  # ``during`` runs while a step waits for the other process, with shared state only
    for step in range(4):
        part = torch.randint(0, 300, (32,), generator=torch.Generator().manual_seed(step)).tensor_split(2)[rank]
        optimizer.zero_grad()
        loss = ((tables[0](part).sum(1) + tables[1](part) @ dense) ** 2).sum()
        loss.backward()
        optimizer.step(during=lambda: waits.append(step))
    shared = bool(optimizer._shared)
    fast = optimizer._fast is not None  # the steps after the first went through ``SharedStep``
    optimizer.finish()
    weights = [t.weight.detach().clone() for t in tables] + [dense.detach().clone()]
    if rank == 0:  # each process has its own copy again
        with torch.no_grad():
            dense.add_(1.0)
            tables[1].weight.add_(1.0)
    dist.barrier()
    private = torch.equal(tables[1].weight.detach(), weights[1]) and torch.equal(dense.detach(), weights[2])
    # ``during`` ran at most once a step, and only where the state is shared (where it ran depends on timing)
    once = len(waits) == len(set(waits)) and set(waits) <= {0, 1, 2, 3} and (shared or not waits)
    gathered_by_gloo = shm.built_gather() is None
    torch.save((weights, shared and fast and once, private, (shared, fast, gathered_by_gloo, waits)),
               Path(out) / f"out-{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_state_takes_the_same_steps_bit_for_bit_and_gives_each_process_its_copy_back(tmp_path):
    for name in ("one", "two", "three", "four"):
        (tmp_path / name).mkdir()
    sharded = _run_two(_sharded_worker, tmp_path / "one", "1")
    whole = _run_two(_sharded_worker, tmp_path / "two", "0")
    no_room = _run_two(_sharded_worker, tmp_path / "three", "no room")
    by_gloo = _run_two(_sharded_worker, tmp_path / "four", "gloo")
    assert [s for _, s, _, _ in sharded] == [True, True] and [s for _, s, _, _ in whole + no_room] == [False] * 4
    assert [facts[2] for _, _, _, facts in sharded] == [False, False]  # the shared all-gather carried them
    # TRAIN_GATHER=gloo: the state is still shared, but no shared all-gather, so no step plan and nothing run ahead
    assert [facts for _, _, _, facts in by_gloo] == [(True, False, True, [])] * 2
    for weights, _, _, _ in sharded + whole + no_room + by_gloo:
        assert all(torch.equal(a, b) for a, b in zip(weights, whole[0][0]))
    assert sharded[1][2] and by_gloo[1][2]  # process 0's change after ``finish`` is not seen by process 1
    torch.manual_seed(0)
    start = [torch.nn.Embedding(300, 1).weight, torch.nn.Embedding(300, 4).weight]
    assert not torch.equal(whole[0][0][1], start[1].detach()) and not torch.equal(whole[0][0][0], start[0].detach())

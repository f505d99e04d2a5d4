"""The fused training forward equals deepctr's forward, gradients and row-wise steps; the row exchange sums right."""
from __future__ import annotations

import copy
import os
import socket

import pytest

torch = pytest.importorskip("torch")

from bidder.spec import default_spec  # noqa: E402
from train.fused import FusedForward, fused_forward, unique_rows  # noqa: E402
from train.models import build_model, resolve_hyperparameters  # noqa: E402
from train.optim import build_optimizer  # noqa: E402
from train.trainer import training_forward  # noqa: E402

SMALL = {"deepfm": {"dnn_hidden_units": [16, 8]}, "autoint": {"dnn_hidden_units": [16], "att_layer_num": 2}}
pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(model, rows: int, seed: int) -> torch.Tensor:
    """Random indices per column within its table; about half of the multi-valued field's slots are padding."""
    g = torch.Generator().manual_seed(seed)
    columns = max(stop for _, stop in model.feature_index.values())
    x = torch.zeros((rows, columns))
    for name, (start, stop) in model.feature_index.items():
        buckets = model.embedding_dict[name].num_embeddings
        # a small range, so rows repeat within a batch and their gradients must add up
        values = torch.randint(0, min(buckets, 40), (rows, stop - start), generator=g).float()
        if stop - start > 1:
            values[torch.rand((rows, stop - start), generator=g) < 0.5] = 0
        x[:, start:stop] = values
    return x


def _model(architecture: str, **overrides):
    hp = resolve_hyperparameters(architecture, {**SMALL[architecture], **overrides})
    return build_model(architecture, default_spec(), hp, 0), hp


@pytest.mark.parametrize("architecture", ["deepfm", "autoint"])
@pytest.mark.parametrize("combiner", ["sum", "mean"])
def test_the_fused_forward_and_its_gradients_equal_deepctrs(architecture, combiner):
    model, hp = _model(architecture, usertag_combiner=combiner)
    optimizer = build_optimizer(model, hp)
    x = _inputs(model, 64, seed=1)
    fused = training_forward(model, optimizer, hp, x.shape[1])
    assert isinstance(fused, FusedForward)
    model.train()

    expected = model(x)
    expected.sum().backward()
    dense_grads = {n: p.grad.clone() for n, p in model.named_parameters() if "embedding_dict" not in n}
    table_grads = [optimizer.tables._touched(group) for group in optimizer.tables.param_groups]
    optimizer.zero_grad()

    got = fused(x)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    got.sum().backward()
    for name, grad in dense_grads.items():
        assert torch.allclose(dict(model.named_parameters())[name].grad, grad, atol=1e-6, rtol=1e-5), name
    for group, (rows, grads) in zip(optimizer.tables.param_groups, table_grads):
        staged_rows, staged_grads = optimizer.tables._touched(group)
        # the same rows read, padding row 0 included (each list in its own order), with the same gradients
        assert torch.equal(staged_rows.sort().values, rows.sort().values)
        assert torch.allclose(staged_grads[staged_rows.argsort()], grads[rows.argsort()], atol=1e-6, rtol=1e-5)
    optimizer.finish()


@pytest.mark.parametrize("architecture", ["deepfm", "autoint"])
def test_training_steps_with_the_fused_forward_move_the_same_weights(architecture):
    states = []
    for fused in (False, True):
        model, hp = _model(architecture, fused_forward=fused)
        optimizer = build_optimizer(model, hp)
        forward = training_forward(model, optimizer, hp, 34)
        assert (forward is model) is not fused
        model.train()
        for step in range(3):
            x = _inputs(model, 128, seed=10 + step)
            y = (torch.rand(128, generator=torch.Generator().manual_seed(step)) < 0.3).float()
            loss = torch.nn.functional.binary_cross_entropy(forward(x).reshape(-1), y, reduction="sum")
            optimizer.zero_grad()
            (loss + optimizer.penalty()).backward()
            optimizer.step()
        optimizer.finish()
        states.append(copy.deepcopy(model.state_dict()))
    start = _model(architecture)[0].state_dict()
    for name, value in states[0].items():
        assert torch.allclose(states[1][name], value, atol=1e-6), name
        if "embedding_dict" in name:  # rows no step read stayed where they started
            assert torch.equal(states[1][name][40:], start[name][40:]), name


def test_a_prepared_batch_gives_the_forward_it_would_compute_and_only_for_that_batch():
    """``prepare`` works out the next batch's inputs ahead (while a process waits for the others); the forward of that
    batch uses them and gives the same bits, and a forward of any other tensor ignores them."""
    model, hp = _model("deepfm")
    optimizer = build_optimizer(model, hp)
    fused = training_forward(model, optimizer, hp, 34)
    first, second = _inputs(model, 64, seed=3), _inputs(model, 64, seed=4)
    want = [fused(first).detach(), fused(second).detach()]
    fused.prepare(first)
    assert fused._prepared is not None and fused._prepared[0] is first
    assert torch.equal(fused(first).detach(), want[0])
    assert fused._prepared is None  # used once
    fused.prepare(first)
    assert torch.equal(fused(second).detach(), want[1])  # another batch: computed from its own inputs
    assert torch.equal(fused(first.clone()).detach(), want[0])  # equal values, another tensor: not the prepared one
    optimizer.finish()


def test_the_fused_forward_is_used_only_where_it_computes_the_model():
    model, hp = _model("deepfm")
    optimizer = build_optimizer(model, hp)
    masks = {"embedding_dict.domain.weight": torch.ones(1)}
    assert fused_forward(model, optimizer.tables, 34, grad_masks=masks) is None  # hooks live on the tables
    assert fused_forward(model, optimizer.tables, 34, grad_masks={"dnn.linears.0.weight": torch.ones(1)}) is not None
    assert fused_forward(model, None, 34) is None  # dense tables: deepctr's forward
    assert fused_forward(model, optimizer.tables, 35) is None  # a column no table reads
    optimizer.finish()
    for architecture in ("dcnv2", "logreg"):
        hp = resolve_hyperparameters(architecture)
        other = build_model(architecture, default_spec(), hp, 0)
        optimizer = build_optimizer(other, hp)
        assert training_forward(other, optimizer, hp, 34) is other
        optimizer.finish()


def test_unique_rows_lists_each_row_once_in_order_of_first_reading_and_where_every_entry_went():
    index = torch.tensor([5, 3, 5, 0, 9, 3, 3])
    rows, position = unique_rows(index, 12)
    assert rows.tolist() == [5, 3, 0, 9] and torch.equal(rows[position], index)
    assert sorted(rows.tolist()) == torch.unique(index).tolist()
    columns = torch.tensor([[0, 2], [1, 2], [0, 0]])  # two columns of tables that start at rows 0 and 4
    slot = torch.full((8,), -1, dtype=torch.int32)
    rows, position = unique_rows(columns, 8, torch.tensor([0, 4]), slot)
    assert rows.tolist() == [0, 6, 1, 4] and position.tolist() == [[0, 1], [2, 1], [0, 3]]
    assert torch.all(slot == -1)  # the scratch is left as it came, ready for the next batch
    assert unique_rows(torch.tensor([], dtype=torch.long), 8, slot=slot)[0].numel() == 0


@pytest.mark.parametrize("bad", [8, -1])
def test_unique_rows_refuses_a_row_outside_the_table_and_leaves_the_scratch_clean(bad):
    slot = torch.full((8,), -1, dtype=torch.int32)
    with pytest.raises(IndexError, match=f"row {bad} .*8 rows"):
        unique_rows(torch.tensor([1, 2, bad, 3]), 8, slot=slot)
    assert torch.all(slot == -1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exchange_worker(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    from train.distributed.wire import exchange

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mine = [(torch.tensor([1, 4, 7]), torch.full((3, 2), 1.0 + rank)) if rank == 0 else
                (torch.tensor([4, 8]), torch.tensor([[10.0, 20.0], [30.0, 40.0]])),
                (None, None) if rank == 0 else (torch.tensor([2]), torch.tensor([[5.0]]))]
        dense = [torch.full((2, 2), float(rank + 1)), torch.tensor([rank * 1.5])]
        capacity = [0, 0]
        out = exchange(mine, [(10, 2), (3, 1)], dense, capacity)
        grown = list(capacity)  # the first message was too small for anyone's rows: it grew and sent again
        dense_again = [torch.full((2, 2), float(rank + 1)), torch.tensor([rank * 1.5])]
        again = exchange(mine, [(10, 2), (3, 1)], dense_again, capacity)  # now the blocks hold them at once
        assert [(r.tolist(), g.tolist()) for r, g in again] == [(r.tolist(), g.tolist()) for r, g in out]
        assert [d.tolist() for d in dense_again] == [d.tolist() for d in dense] and capacity == grown
        queue.put((rank, [(r.tolist(), g.tolist()) for r, g in out], [d.tolist() for d in dense], grown))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_the_exchange_sums_every_processs_rows_and_dense_gradients():
    """Two gloo processes: the union of their rows with gradients summed, and the dense gradients summed."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    workers = [context.Process(target=_exchange_worker, args=(rank, port, queue)) for rank in range(2)]
    for w in workers:
        w.start()
    results = {rank: (tables, dense, grown) for rank, tables, dense, grown in (queue.get(timeout=120) for _ in workers)}
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    for rank in range(2):
        tables, dense, grown = results[rank]
        assert grown == [3, 1]  # 25 % above the largest count, rounded down: 3 and 1 rows
        assert tables[0] == ([1, 4, 7, 8], [[1.0, 1.0], [11.0, 21.0], [1.0, 1.0], [30.0, 40.0]])
        assert tables[1] == ([2], [[5.0]])  # rows only one process read
        assert dense == [[[3.0, 3.0], [3.0, 3.0]], [1.5]]

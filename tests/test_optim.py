"""Sparse table updates: touched rows move, untouched rows and their Adam state do not, the answer is right."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from bidder.spec import default_spec  # noqa: E402
from train.errors import TrainError  # noqa: E402
from train.models import build_model, resolve_hyperparameters  # noqa: E402
from train.optim import FlatAdam, RowwiseAdam, build_optimizer, dense_adam  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _tables(seed: int = 0, rows: tuple[int, ...] = (10, 7), dim: int = 3) -> list[torch.nn.Embedding]:
    torch.manual_seed(seed)
    return [torch.nn.Embedding(n, dim) for n in rows]


def _loss(tables, batches) -> torch.Tensor:
    return sum((table(index) ** 2 * torch.arange(1, 4)).sum() for table, index in zip(tables, batches))


def test_touched_rows_take_adams_step_and_untouched_rows_and_their_state_stay():
    tables = _tables()
    before = [t.weight.detach().clone() for t in tables]
    optimizer = RowwiseAdam([{"params": [t.weight for t in tables], "eps": 0.1, "l2": 0.0}],
                            {id(t.weight): t for t in tables}, lr=0.01)
    assert all(t.sparse for t in tables)
    batches = [torch.tensor([1, 4, 4, 9]), torch.tensor([0, 0, 6])]  # repeated rows: gradients add up
    _loss(tables, batches).backward()
    optimizer.step()

    reference = _tables()  # the same start, torch's dense Adam, same epsilon: one step must agree
    dense = torch.optim.Adam([t.weight for t in reference], lr=0.01, eps=0.1)
    _loss(reference, batches).backward()
    dense.step()
    group = optimizer.param_groups[0]
    for table, ref, old, touched, offset in zip(tables, reference, before, batches, group["offsets"]):
        rows = torch.unique(touched)
        untouched = torch.tensor([r for r in range(len(old)) if r not in set(rows.tolist())])
        assert torch.allclose(table.weight[rows], ref.weight[rows], atol=1e-7)
        assert not torch.equal(table.weight[rows], old[rows])
        assert torch.equal(table.weight[untouched], old[untouched])
        for moment in ("exp_avg", "exp_avg_sq"):
            state = group[moment][offset:offset + len(old)]
            assert torch.all(state[untouched] == 0) and torch.all(state[rows].abs().sum(1) > 0)

    # a second step that reads other rows leaves the first step's rows, and their moments, alone
    kept = [t.weight.detach().clone() for t in tables]
    moments = group["exp_avg"].clone(), group["exp_avg_sq"].clone()
    optimizer.zero_grad()
    _loss(tables, [torch.tensor([2]), torch.tensor([3])]).backward()
    optimizer.step()
    assert torch.equal(tables[0].weight[[1, 4, 9]], kept[0][[1, 4, 9]])
    assert torch.equal(tables[1].weight[[0, 6]], kept[1][[0, 6]])
    assert torch.equal(group["exp_avg"][[1, 4, 9, 10, 16]], moments[0][[1, 4, 9, 10, 16]])
    assert torch.equal(group["exp_avg_sq"][[1, 4, 9, 10, 16]], moments[1][[1, 4, 9, 10, 16]])
    assert not torch.equal(tables[0].weight[2], kept[0][2]) and not torch.equal(tables[1].weight[3], kept[1][3])


def test_the_l2_penalty_reaches_touched_rows_only():
    tables = _tables(rows=(6,))
    before = tables[0].weight.detach().clone()
    optimizer = RowwiseAdam([{"params": [tables[0].weight], "eps": 0.1, "l2": 0.5}], {id(tables[0].weight): tables[0]},
                            lr=0.01)
    index = torch.tensor([2, 5])
    tables[0](index).sum().mul(0).backward()  # the loss itself gives zero gradient: only the penalty moves
    optimizer.step()
    reference = _tables(rows=(6,))
    dense = torch.optim.Adam([reference[0].weight], lr=0.01, eps=0.1)
    (0.5 * reference[0].weight[index].square().sum()).backward()
    dense.step()
    assert torch.allclose(tables[0].weight, reference[0].weight, atol=1e-7)
    assert torch.equal(tables[0].weight[[0, 1, 3, 4]], before[[0, 1, 3, 4]])
    assert torch.all(tables[0].weight[index].abs() < before[index].abs())  # decayed towards zero


def test_a_tiny_logistic_regression_converges_to_the_known_log_odds():
    """Three hashed values with click rates 10 %, 50 % and 80 %; a fourth row is never read."""
    torch.manual_seed(0)
    table = torch.nn.Embedding(4, 1)
    torch.nn.init.zeros_(table.weight)
    optimizer = RowwiseAdam([{"params": [table.weight], "eps": 1e-8, "l2": 0.0}], {id(table.weight): table}, lr=0.05)
    rates = torch.tensor([0.1, 0.5, 0.8])
    index = torch.arange(3).repeat_interleave(10)
    labels = torch.cat([torch.tensor([1.0] * int(10 * r) + [0.0] * (10 - int(10 * r))) for r in rates])
    for _ in range(1500):
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(table(index).reshape(-1), labels, reduction="sum")
        loss.backward()
        optimizer.step()
    assert torch.allclose(table.weight[:3, 0], torch.log(rates / (1 - rates)), atol=0.02)
    assert table.weight[3, 0] == 0 and optimizer.param_groups[0]["exp_avg_sq"][3, 0] == 0


def test_the_row_update_is_adams_step_on_the_rows_and_leaves_the_others():
    """Row-wise Adam's C loop against the same step in torch on the gathered rows (float32, the L2 term included)."""
    g = torch.Generator().manual_seed(3)
    group = {"flat": torch.randn(500, 8, generator=g), "exp_avg": torch.randn(500, 8, generator=g) * 1e-3,
             "exp_avg_sq": torch.rand(500, 8, generator=g) * 1e-4, "betas": (0.9, 0.999), "eps": 0.1, "lr": 4e-3,
             "l2": 1e-5, "step": 4}
    rows, grad = torch.randperm(500, generator=g)[:120], torch.randn(120, 8, generator=g) * 1e-2
    flat, m, v = group["flat"].clone(), group["exp_avg"].clone(), group["exp_avg_sq"].clone()
    RowwiseAdam._update(group, rows, grad.clone())
    full = grad + 2 * 1e-5 * flat[rows]
    m[rows], v[rows] = m[rows] * 0.9 + 0.1 * full, v[rows] * 0.999 + 0.001 * full * full
    flat[rows] -= 4e-3 / (1 - 0.9 ** 5) * m[rows] / ((v[rows] / (1 - 0.999 ** 5)).sqrt() + 0.1)
    for name, expected in (("flat", flat), ("exp_avg", m), ("exp_avg_sq", v)):
        assert torch.allclose(group[name], expected, rtol=1e-6, atol=1e-9), name
    others = torch.ones(500, dtype=torch.bool).index_fill_(0, rows, False)
    assert torch.equal(group["flat"][others], flat[others]) and group["step"] == 5
    with pytest.raises(IndexError, match="row 500 is outside"):
        RowwiseAdam._update(group, torch.tensor([1, 500]), grad[:2].clone())


def test_flat_adam_takes_torchs_adam_steps_with_the_parameters_in_one_storage():
    torch.manual_seed(1)
    ours, theirs = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    theirs.load_state_dict(ours.state_dict())
    flat = FlatAdam(list(ours.parameters()), lr=0.01, eps=1e-8)
    reference = torch.optim.Adam(theirs.parameters(), lr=0.01, eps=1e-8)
    assert ours.weight.data_ptr() == flat.param_groups[0]["flat"].data_ptr()  # the weights now live in it
    x = torch.randn(7, 5)
    for step in range(4):
        for model, optimizer in ((ours, flat), (theirs, reference)):
            optimizer.zero_grad()
            (model(x + step) ** 2).sum().backward()
            optimizer.step()
        assert ours.weight.grad.data_ptr() == flat.param_groups[0]["grad"].data_ptr()  # added into, in place
        for a, b in zip(ours.parameters(), theirs.parameters()):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    flat.finish()
    assert ours.weight.grad is None


@pytest.fixture(scope="module")
def small_model():
    spec = default_spec()
    hp = resolve_hyperparameters("deepfm", {"dnn_hidden_units": [16]})
    return spec, hp


def test_build_optimizer_keeps_the_table_epsilons_and_moves_deepfm_tables_into_flat_groups(small_model):
    spec, hp = small_model
    hp = {**hp, "table_eps": 0.25, "vector_eps": 0.5}
    model = build_model("deepfm", spec, hp, 0)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = build_optimizer(model, hp)
    tables, dense = optimizer.optimizers
    assert isinstance(tables, RowwiseAdam) and isinstance(dense, FlatAdam)
    assert sorted(g["eps"] for g in tables.param_groups) == [0.25, 0.5]
    assert all(g["l2"] == hp["l2_reg_embedding"] for g in tables.param_groups)  # deepctr's strengths, per table
    assert dense.param_groups[0]["eps"] == hp["adam_eps"]
    assert {name: p for name, p in model.named_parameters()}.keys() == weights.keys()
    for name, p in model.named_parameters():  # moving into flat storage changed no value
        assert torch.equal(p.detach(), weights[name]), name
    # the tables' L2 terms leave the loss (they are row-wise now); deepfm has no other L2 term
    assert optimizer.penalty() == 0.0

    columns = max(stop for _, stop in model.feature_index.values())
    x = torch.arange(1, 6).float().reshape(-1, 1).expand(5, columns).contiguous()  # rows 1..5 of every table
    loss = model(x).sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    for name, p in model.named_parameters():
        if "embedding_dict" in name:
            untouched = [0, *range(6, len(p))]  # rows no input read
            assert torch.equal(p.detach()[untouched], weights[name][untouched]), name
            assert (p.detach()[1:6] != weights[name][1:6]).any(1).all(), name
        else:
            assert not torch.equal(p.detach(), weights[name]), name
    optimizer.finish()
    assert not any(m.sparse for m in model.modules() if isinstance(m, torch.nn.Embedding))


def test_dense_mode_is_torch_adam_with_the_whole_penalty(small_model):
    spec, hp = small_model
    model = build_model("deepfm", spec, {**hp, "sparse_tables": False}, 0)
    optimizer = build_optimizer(model, {**hp, "sparse_tables": False})
    assert len(optimizer.optimizers) == 1 and isinstance(optimizer.optimizers[0], torch.optim.Adam)
    assert [g["eps"] for g in optimizer.param_groups] == [g["eps"] for g in dense_adam(model, hp).param_groups]
    assert torch.allclose(optimizer.penalty(), model.get_regularization_loss())


def test_l1_on_a_table_is_refused(small_model):
    spec, hp = small_model
    model = build_model("deepfm", spec, hp, 0)
    model.add_regularization_weight(model.embedding_dict.parameters(), l1=1e-4)
    with pytest.raises(TrainError, match="L1 penalty on an embedding table"):
        build_optimizer(model, hp)


def test_sparse_tables_is_a_recorded_hyperparameter():
    assert resolve_hyperparameters("deepfm")["sparse_tables"] is True
    assert resolve_hyperparameters("deepfm", {"sparse_tables": "false"})["sparse_tables"] is False
    with pytest.raises(TrainError, match="sparse_tables"):
        resolve_hyperparameters("deepfm", {"sparse_tables": "sometimes"})

"""The optimizer: row-wise (lazy) Adam over the hashed embedding tables, torch's Adam over the dense layers.

A batch of 512 rows reads about 1.4 % of the tables' rows, yet dense Adam (with deepctr's L2 penalty
summed over every row) reads and writes every row and three buffers per step: about 45 % of a DeepFM
epoch. With ``sparse_tables`` (the default) the tables are updated the way TorchRec's fused row-wise
optimizers do it:

- the tables of one parameter group share one flat storage (each table's weight is a view of it), so a
  step is a handful of tensor operations per group, not per table;
- the rows a batch read and their summed gradients come either from the fused training forward
  (``train/fused.py``: one gather per group into a small leaf tensor, whose gradient is already summed
  per row) or from each ``nn.Embedding``'s sparse gradient (``sparse=True``), made unique and summed
  (``merge_sum``); Adam then updates those rows and their moments in place, in one pass over them in C
  (``train/_rows.pyx``);
- rows the batch did not read keep their weights and both Adam moments as they are (lazy Adam, as
  TensorFlow Addons' ``LazyAdam``; bias correction uses the group's step count);
- deepctr's L2 penalty ``l2 * sum(w ** 2)`` is applied to the touched rows only, as its gradient
  ``2 * l2 * w`` added to theirs once per step. Dense training decays every row at every step; here a
  row decays only in the steps that read it, so rarely seen rows keep more of what they learned. With
  Adam's table epsilon (0.1) the dense penalty moved an unread row by about ``lr * 2e-5 * |w| / 0.1``
  per step, far below anything that changes a score. Test AUC, DeepFM on the default bundle's 1M rows
  at batch 512: 0.7188 row-wise, 0.7193 dense (``bench/results/batch-lr-1m-20261126.json``).

Each group keeps its own epsilon (``table_eps`` for the linear weights, ``vector_eps`` for the
vectors): the reasoning of ``dense_adam`` below holds row by row.

Under ``torchrun`` (``train.distributed``), ``step()`` first sums the gradients of every process in one
message (``train.distributed.wire.exchange``): each process's rows read with their gradients and its dense
gradients, all-gathered, so the union of the rows read is updated as one process would update it on the whole
batch. Where every process runs on this machine, the weights and Adam moments of the tables and dense layers sit
in shared memory (``TrainingOptimizer.prepare``), and each process sums and steps only its part: the table rows in
blocks of 64 by row number, one range of the dense layers (``train.distributed.shared_step``); then all wait for
each other (``train.distributed.gather.sync``) before anyone reads the weights again. Otherwise every process keeps its own copy and steps all of it.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable

import numpy as np
import torch

from train import _rows
from train.distributed import shm
from train.distributed.gather import send_buffer, sync
from train.distributed.group import all_reduce_dense, barrier, is_main, world_size
from train.distributed.shards import shard_range
from train.distributed.shared_step import SharedStep
from train.distributed.wire import exchange, message_floats
from train.errors import TrainError
from train.fused import unique_rows

__all__ = ["FlatAdam", "TrainingOptimizer", "RowwiseAdam", "build_optimizer", "dense_adam",
           "table_embeddings"]


def table_embeddings(model: torch.nn.Module) -> tuple[list[torch.nn.Embedding], list[torch.nn.Embedding]]:
    """The model's hashed tables: (linear weights, vectors); deepctr keeps them in two ModuleDicts."""
    linear = [m for m in model.linear_model.modules() if isinstance(m, torch.nn.Embedding)]
    vectors = ([m for m in model.embedding_dict.modules() if isinstance(m, torch.nn.Embedding)]
               if hasattr(model, "embedding_dict") else [])
    return linear, vectors


def dense_adam(model: torch.nn.Module, hp: dict) -> torch.optim.Adam:
    """torch's Adam over every parameter, with one epsilon for the hashed tables and the usual one elsewhere.

    Adam divides each update by the parameter's recent gradient size, so a table row seen a few
    times moves by about ``lr`` per step whether its examples were clicks (gradient ~1) or
    impressions without a click (gradient ~CTR). At a CTR under 1 % that lets every mid-frequency
    value drift quickly towards "never clicks", which is the overfitting seen as validation AUC
    falling after the first epoch. A table epsilon well above the size of a no-click gradient makes
    such rows move in proportion to their gradient, while rows seen in every batch still get Adam's
    normalised steps.
    """
    linear, vectors = (list(m.weight for m in part) for part in table_embeddings(model))
    taken = {id(t) for t in linear + vectors}
    dense = [p for p in model.parameters() if id(p) not in taken]
    groups = [{"params": linear, "eps": hp["table_eps"]}]
    if vectors:
        groups.append({"params": vectors, "eps": hp.get("vector_eps", hp["table_eps"])})
    if dense:
        groups.append({"params": dense, "eps": hp["adam_eps"]})
    return torch.optim.Adam(groups, lr=hp["lr"])


class RowwiseAdam(torch.optim.Optimizer):
    """Lazy Adam for embedding tables with sparse gradients; each group's tables share one flat storage.

    Every group names ``params`` (``nn.Embedding`` weights of one width), ``eps`` and ``l2`` (deepctr's
    L2 strength, applied to touched rows). Building the optimizer moves each group's weights into one
    flat tensor (the parameters stay the same objects, their data becomes views of it) and switches
    their embeddings to sparse gradients.
    """

    def __init__(self, groups: list[dict[str, Any]], embeddings: dict[int, torch.nn.Embedding], lr: float,
                 betas: tuple[float, float] = (0.9, 0.999)) -> None:
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": 1e-8, "l2": 0.0})
        self.exchange_seconds = 0.0  # time in ``exchange`` under torchrun (waiting for the others included)
        self.exchange_parts: dict[str, float] = {}  # ``exchange``'s seconds by part, and its message size
        self.capacity = [0] * len(self.param_groups)  # rows per group each process's block holds (``exchange``)
        for group in self.param_groups:
            weights = group["params"]
            widths = {w.shape[1] for w in weights}
            if len(widths) != 1:
                raise TrainError(f"row-wise Adam: one group holds tables of widths {sorted(widths)}")
            with torch.no_grad():
                flat = torch.cat([w.detach() for w in weights])
                offsets, start = [], 0
                for w in weights:
                    offsets.append(start)
                    w.data = flat[start:start + w.shape[0]]
                    start += w.shape[0]
                    embeddings[id(w)].sparse = True
            group["flat"] = flat
            group["offsets"] = offsets
            group["step"] = 0
            group["exp_avg"] = torch.zeros_like(flat)
            group["exp_avg_sq"] = torch.zeros_like(flat)
            group["slot"] = torch.full((len(flat),), -1, dtype=torch.int32)  # ``unique_rows``' scratch

    @torch.no_grad()
    def step(self, closure=None, dense: list[torch.Tensor] | None = None, owners: int = 1,
             touched: list[tuple[torch.Tensor | None, torch.Tensor | None]] | None = None):  # noqa: D102
        """One row-wise step; under torchrun the rows (and ``dense``, the other gradients) are summed first.

        ``owners`` > 1: the tables and moments are shared by the processes (``TrainingOptimizer``), and this one
        steps only the rows it owns (``exchange``). ``touched``: the groups' ``_touched``, where the caller took
        them already."""
        touched = [self._touched(group) for group in self.param_groups] if touched is None else touched
        if world_size() > 1:
            started = time.perf_counter()
            touched = exchange(touched, [tuple(group["flat"].shape) for group in self.param_groups], dense or [],
                               self.capacity, self.exchange_parts, [group["slot"] for group in self.param_groups],
                               owners)
            self.exchange_seconds += time.perf_counter() - started
        for group, (rows, grads) in zip(self.param_groups, touched):
            if rows is not None:
                self._update(group, rows, grads)
        return None

    @staticmethod
    def _touched(group: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The group's touched rows (unique, in flat numbering) and their summed gradients, this process's.

        A fused forward (``train/fused.py``) stages them itself: the rows it read and a leaf holding them,
        whose gradient is already summed per row. Otherwise they come from the tables' sparse gradients.
        """
        staged = group.pop("staged", None)
        if staged is not None:
            rows, leaf = staged
            return (rows, leaf.grad) if leaf.grad is not None else (None, None)
        indices, values = [], []
        for w, offset in zip(group["params"], group["offsets"]):
            g = w.grad
            if g is None:
                continue
            if not g.is_sparse:
                raise TrainError("row-wise Adam expects sparse table gradients (was the embedding switched back "
                                 "to dense?)")
            indices.append(g._indices()[0] + offset)
            values.append(g._values())
        if not indices:
            return None, None
        index, value = torch.cat(indices), torch.cat(values)
        rows, sums = merge_sum(index, [value], len(group["flat"]), group["slot"])
        return rows, sums[0]

    @staticmethod
    def _update(group: dict[str, Any], rows: torch.Tensor, grad: torch.Tensor) -> None:
        """Adam's step on the rows, in place: one pass over them in C (``train/_rows.pyx``, ``adam_rows``).

        In torch the same step is eleven passes (three gathers, the arithmetic, three writes back); the rows are
        spread over the table, so each pass is a walk of cache misses. ``grad`` is overwritten.
        """
        RowwiseAdam._advance(group, rows.contiguous().numpy(), grad.contiguous().numpy())

    @staticmethod
    def _advance(group: dict[str, Any], rows: np.ndarray, grad: np.ndarray,
                 state: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> None:
        """``_update`` on numpy arrays (``grad`` overwritten); ``state``: the group's weights and moments as numpy
        arrays, where the caller keeps them."""
        beta1, beta2 = group["betas"]
        group["step"] += 1
        weight, exp_avg, exp_avg_sq = state or (group["flat"].numpy(), group["exp_avg"].numpy(),
                                                group["exp_avg_sq"].numpy())
        _rows.adam_rows(weight, exp_avg, exp_avg_sq, rows, grad, group["lr"], beta1, beta2, group["eps"],
                        group["l2"], 1 - beta1 ** group["step"], 1 - beta2 ** group["step"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for w in group["params"]:
                w.grad = None


class FlatAdam(torch.optim.Optimizer):
    """Adam over the dense (non-table) parameters, kept in one flat storage with their gradients in another.

    Building it moves the parameters' data into one flat tensor and makes their ``.grad`` views of one flat
    gradient, which backward adds into in place (``zero_grad`` zeroes it and keeps the views). A step is then one
    pass in C (``train/_rows.pyx``, ``adam_flat``), where torch's fused Adam spends most of its 0.4 ms a step in
    Python over the parameter list; and under torchrun the dense gradients go into the message and come back
    summed as one tensor.
    """

    def __init__(self, params: list[torch.Tensor], lr: float, eps: float, betas: tuple[float, float] = (0.9, 0.999)):
        super().__init__([{"params": params}], {"lr": lr, "betas": betas, "eps": eps})
        group = self.param_groups[0]
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1) for p in params]) if params else torch.zeros(0)
            grad = torch.zeros_like(flat)
            offset = 0
            for p in params:
                p.data = flat[offset:offset + p.numel()].view_as(p)
                p.grad = grad[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
        group.update(flat=flat, grad=grad, exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat), step=0)

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002 - the views must stay
        self.param_groups[0]["grad"].zero_()

    @torch.no_grad()
    def step(self, closure=None, part: tuple[int, int] | None = None):  # noqa: D102 - torch's signature
        """Adam's step; ``part`` (start, stop): only those elements (the range this process owns where the
        parameters are shared, ``TrainingOptimizer``)."""
        start, stop = part if part is not None else (0, len(self.param_groups[0]["flat"]))
        self._advance(self.arrays(start, stop))
        return None

    def arrays(self, start: int, stop: int) -> tuple[np.ndarray, ...]:
        """Elements [start, stop) of the weights, both moments and the gradient, as numpy views (``_advance``)."""
        group = self.param_groups[0]
        return tuple(group[key][start:stop].numpy() for key in ("flat", "exp_avg", "exp_avg_sq", "grad"))

    def _advance(self, arrays: tuple[np.ndarray, ...]) -> None:
        """Adam's step on ``arrays`` (weights, moments, gradient: ``arrays(start, stop)``)."""
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        group["step"] += 1
        _rows.adam_flat(*arrays, group["lr"], beta1, beta2, group["eps"], 1 - beta1 ** group["step"],
                        1 - beta2 ** group["step"])

    def finish(self) -> None:
        """Drop the gradient views (the parameters stay views of the flat storage)."""
        for p in self.param_groups[0]["params"]:
            p.grad = None


def merge_sum(ids: torch.Tensor, values: list[torch.Tensor], rows: int,
              slot: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The distinct rows of ``ids`` (in order of first appearance; every row below ``rows``) and, for each of
    ``values`` (one row of gradients per entry of ``ids``), the sum of each row's entries, added in their order.

    One pass over the entries in C (``unique_rows``, then ``train/_rows.pyx``'s ``add_rows``), not over the
    table; ``slot`` is the group's table-sized int32 scratch of -1.
    """
    distinct, position = unique_rows(ids, rows, slot=slot)
    sums = []
    for v in values:
        total = v.new_zeros((len(distinct), v.shape[1]))
        _rows.add_rows(position.numpy(), v.contiguous().numpy(), total.numpy())
        sums.append(total)
    return distinct, sums


class TrainingOptimizer:
    """What the training loop steps: the table optimizer (if any), the dense Adam, and the L2 penalty.

    ``penalty()`` is the part of deepctr's regularisation the loss must carry: all of it in dense mode,
    only the non-table weights' with sparse tables (their share is applied row-wise by ``RowwiseAdam``).
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer], penalized: list[tuple[torch.Tensor, float, float]],
                 sparse: list[torch.nn.Embedding]) -> None:
        self.optimizers = optimizers
        self.penalized = penalized
        self.sparse = sparse
        self.dense_params = [p for opt in optimizers if not isinstance(opt, RowwiseAdam)
                             for group in opt.param_groups for p in group["params"]]
        self.flat = next((opt for opt in optimizers if isinstance(opt, FlatAdam)), None)
        self.tables = next((opt for opt in optimizers if isinstance(opt, RowwiseAdam)), None)
        self._exchange_seconds = 0.0
        self._shared: bool | None = None  # under torchrun: parameters and moments in shared memory (``_share``)
        self._fast: SharedStep | None = None  # ``step``'s plan with shared parameters and messages (``_shared_step``)
        self._fast_capacity: list[int] | None = None  # the blocks' capacity ``_fast`` was decided for

    @property
    def exchange_seconds(self) -> float:
        """Seconds spent summing gradients across processes so far (0 with one process)."""
        return self._exchange_seconds + (self.tables.exchange_seconds if self.tables is not None else 0.0)

    @property
    def exchange_parts(self) -> dict[str, float]:
        """``exchange``'s seconds so far by part (``EXCHANGE_PARTS``) and its message size (floats)."""
        return dict(self.tables.exchange_parts) if self.tables is not None else {}

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    def penalty(self) -> torch.Tensor | float:
        total: torch.Tensor | float = 0.0
        for weight, l1, l2 in self.penalized:
            if l1 > 0:
                total = total + l1 * weight.abs().sum()
            if l2 > 0:
                total = total + l2 * weight.square().sum()
        return total

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self, during: Callable[[], None] | None = None) -> None:
        """Under torchrun the dense gradients travel with the table rows (``exchange``), in one message; where the
        processes share their parameters (``_share``), each steps the part it owns, then all wait for each other.

        ``during``: work that does not read the parameters (the next batch's ``FusedForward.prepare``), run at most
        once, while this process would wait for the others' gradients, where the state is shared (``SharedStep``,
        ``LocalGather.sync``): the last process to send does not run it, as it would delay everyone."""
        dense = ([self.flat.param_groups[0]["grad"]] if self.flat is not None
                 else [p.grad for p in self.dense_params if p.grad is not None])
        if self._shared is None and world_size() > 1:
            self._shared = self._share()
        if self._shared:
            touched = [self.tables._touched(group) for group in self.tables.param_groups]
            fast = self._shared_step()
            if fast is not None and fast.run(touched, during):
                return
            size = world_size()
            self.tables.step(dense=dense, owners=size, touched=touched)
            if self.flat is not None:
                self.flat.step(part=shard_range(len(self.flat.param_groups[0]["flat"]), size))
            started = time.perf_counter()
            sync()  # nobody reads the parameters before everyone wrote its part
            waited = time.perf_counter() - started
            self.tables.exchange_seconds += waited
            self.tables.exchange_parts["sync"] = self.tables.exchange_parts.get("sync", 0.0) + waited
            return
        tables = [opt for opt in self.optimizers if isinstance(opt, RowwiseAdam)]
        if world_size() > 1 and not tables:
            started = time.perf_counter()
            all_reduce_dense(dense)
            self._exchange_seconds += time.perf_counter() - started
        for opt in self.optimizers:
            if isinstance(opt, RowwiseAdam):
                opt.step(dense=dense)
            else:
                opt.step()

    def _shared_step(self) -> SharedStep | None:
        """``step``'s plan where the parameters are shared and shared memory carries the messages, None where gloo
        carries them. Made again when the blocks grew (collective then: every process sees the same counts)."""
        if self._fast_capacity != self.tables.capacity:
            self._fast_capacity = list(self.tables.capacity)
            shapes = [tuple(group["flat"].shape) for group in self.tables.param_groups]
            dense = len(self.flat.param_groups[0]["flat"]) if self.flat is not None else 0
            size = world_size()
            gather = shm.local_gather(message_floats(shapes, dense, self.tables.capacity, size))
            self._fast = SharedStep(self.tables, self.flat, gather) if gather is not None else None
        return self._fast

    def finish(self) -> None:
        """Give the embeddings back their dense gradients (for export, scoring and any later training), and each
        process its own copy of shared parameters."""
        self._fast, self._fast_capacity = None, None
        for embedding in self.sparse:
            embedding.sparse = False
        if self._shared:
            self._relocate(lambda t: t.clone())
            self._shared = False
        if self.flat is not None:
            self.flat.finish()

    def prepare(self, batch_size: int, columns: int) -> None:
        """Before the first step under torchrun (collective): share the parameters (``_share``) and, where shared
        memory carries the messages, size them for the most table entries one process's part of a batch of
        ``batch_size`` rows of ``columns`` indices reads, so that the first epoch neither builds shared memory nor
        sends a step twice to grow its blocks."""
        size = world_size()
        if size == 1:
            return
        if self._shared is None:
            self._shared = self._share()
        tables = self.tables
        if tables is None or not shm.shared_floats_available():
            return
        entries = -(-batch_size // size) * columns
        capacity = [min(len(group["flat"]), entries) for group in tables.param_groups]
        dense = len(self.flat.param_groups[0]["flat"]) if self.flat is not None else sum(
            p.numel() for p in self.dense_params)
        floats = message_floats([tuple(group["flat"].shape) for group in tables.param_groups], dense, capacity,
                                 size if self._shared else 1)
        if floats <= self.MESSAGE_LIMIT:
            tables.capacity[:] = [max(a, b) for a, b in zip(tables.capacity, capacity)]
            send_buffer(floats)  # builds the shared all-gather for messages this long

    MESSAGE_LIMIT = 1 << 24  # floats per process: longer messages are sized as they come (64 MB each, twice over)

    def _state(self) -> list[tuple[dict[str, Any], str]]:
        """Where the tables' and dense layers' weights and Adam moments are kept: (group, key) pairs."""
        groups = list(self.tables.param_groups) + ([self.flat.param_groups[0]] if self.flat is not None else [])
        return [(group, key) for group in groups for key in ("flat", "exp_avg", "exp_avg_sq")]

    def _relocate(self, place) -> None:
        """Move every ``_state`` tensor to ``place(tensor)``, the parameters staying views of their group's ``flat``."""
        for group, key in self._state():
            group[key] = place(group[key])
        for group in self.tables.param_groups:
            for w, offset in zip(group["params"], group["offsets"]):
                w.data = group["flat"][offset:offset + w.shape[0]]
        if self.flat is not None:
            group, offset = self.flat.param_groups[0], 0
            for p in group["params"]:
                p.data = group["flat"][offset:offset + p.numel()].view_as(p)
                offset += p.numel()

    def _share(self) -> bool:
        """Under torchrun on one machine, put the weights and Adam's moments of the tables and the dense layers in
        shared memory (process 0's values; collective), so that each process steps only its part of them: the rows
        it owns and its range of the dense layers (``exchange`` with ``owners``). Every process then sums and
        steps half as much (with two) as when each steps everything. False (nothing moved) where other optimizers
        take part, ``TRAIN_SHARD=0`` or shared memory cannot be had."""
        if (self.tables is None or os.environ.get("TRAIN_SHARD", "1") == "0"
                or any(opt is not self.tables and opt is not self.flat for opt in self.optimizers)):
            return False
        align = 16  # each tensor on its own cache lines
        sizes = [(group[key].numel() + align - 1) // align * align for group, key in self._state()]
        memory = shm.shared_floats(sum(sizes))
        if memory is None:
            return False
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        places = {id(group[key]): memory[start:start + group[key].numel()].view_as(group[key])
                  for (group, key), start in zip(self._state(), starts)}
        if is_main():
            for group, key in self._state():
                places[id(group[key])].copy_(group[key])
        barrier()
        self._relocate(lambda t: places[id(t)])
        return True


def build_optimizer(model: torch.nn.Module, hp: dict[str, Any]) -> TrainingOptimizer:
    """The optimizer ``hp`` asks for: ``sparse_tables`` true gives row-wise Adam on the tables."""
    regularized = _regularization_terms(model)
    if not hp.get("sparse_tables", False):
        return TrainingOptimizer([dense_adam(model, hp)], regularized, [])
    linear, vectors = table_embeddings(model)
    by_weight = {id(m.weight): m for m in linear + vectors}
    strength = {id(w): (l1, l2) for w, l1, l2 in regularized}
    for m in linear + vectors:
        if strength.get(id(m.weight), (0.0, 0.0))[0] > 0:
            raise TrainError("sparse_tables: an L1 penalty on an embedding table is not supported; "
                             "set sparse_tables=false")
    groups = []
    for part, eps in ((linear, hp["table_eps"]), (vectors, hp.get("vector_eps", hp["table_eps"]))):
        by_l2: dict[float, list[torch.Tensor]] = {}
        for m in part:
            by_l2.setdefault(strength.get(id(m.weight), (0.0, 0.0))[1], []).append(m.weight)
        groups += [{"params": weights, "eps": eps, "l2": l2} for l2, weights in by_l2.items()]
    tables = RowwiseAdam(groups, by_weight, lr=hp["lr"])
    dense = [p for p in model.parameters() if id(p) not in by_weight]
    optimizers: list[torch.optim.Optimizer] = [tables]
    if dense:
        optimizers.append(FlatAdam(dense, lr=hp["lr"], eps=hp["adam_eps"]))
    penalized = [(w, l1, l2) for w, l1, l2 in regularized if id(w) not in by_weight]
    return TrainingOptimizer(optimizers, penalized, linear + vectors)


def _regularization_terms(model: torch.nn.Module) -> list[tuple[torch.Tensor, float, float]]:
    """deepctr's ``regularization_weight`` as (weight, l1, l2), one entry per weight (strengths summed)."""
    terms: dict[int, list] = {}
    for weights, l1, l2 in getattr(model, "regularization_weight", []):
        for w in _weights(weights):
            entry = terms.setdefault(id(w), [w, 0.0, 0.0])
            entry[1] += l1
            entry[2] += l2
    return [(w, l1, l2) for w, l1, l2 in terms.values() if l1 > 0 or l2 > 0]


def _weights(items: Iterable) -> Iterable[torch.Tensor]:
    for item in items:
        yield item[1] if isinstance(item, tuple) else item

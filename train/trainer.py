"""The training loop: Adam on shuffled mini-batches, early stopping on validation AUC.

deepctr's own ``fit()`` is avoided on purpose: it prints, re-concatenates inputs every call and offers
no hook for keeping the best epoch's weights. The loss is deepctr's (summed binary cross-entropy plus
the model's L2 terms), so its regularisation strengths mean what they mean in deepctr.
"""
from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from train.data.dataset import Dataset
from train.distributed import group as process_group
from train.distributed.shards import shard_batches
from train.distributed.wire import EXCHANGE_PARTS
from train.errors import TrainError
from train.evaluate import binary_metrics, oracle_metrics, predict
from train.fused import fused_forward
from train.models import build_model, deepctr_input, parameter_count, resolve_hyperparameters
from train.optim import TrainingOptimizer, build_optimizer

__all__ = ["TrainedModel", "fit_epochs", "split_metrics", "train_model"]


@dataclass
class TrainedModel:
    architecture: str
    model: torch.nn.Module           # the deepctr model, best epoch's weights, in eval mode
    hyperparameters: dict[str, Any]
    metrics: dict[str, dict]          # train / val / test (and oracle on synthetic data)
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    processes: int = 1                # data-parallel processes that trained it (torchrun)

    @property
    def parameters(self) -> int:
        return parameter_count(self.model)


def train_model(dataset: Dataset, architecture: str, *, epochs: int | None = None, seed: int = 0,
                progress: bool = True, threads: int = 1, **overrides: Any) -> TrainedModel | None:
    """Train ``architecture`` on ``dataset.train``, keep the epoch with the best validation AUC.

    Under torchrun only process 0 gets the result; the others get None (``train.distributed``).
    ``threads`` is torch's intra-op thread count while training. One is the default: these models are
    small per batch, and on a machine shared with other jobs several spinning threads per process
    slow every step down by an order of magnitude.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        return _train(dataset, architecture, epochs, seed, progress, overrides)
    finally:
        torch.set_num_threads(previous)


def check_training(architecture: str, epochs: int | None = None,
                   overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The hyper-parameters a run would use; bad names, values or epochs raise TrainError.

    Cheap: callers run it before reading any data, so a typo fails in a second, not after featurizing.
    """
    hp = resolve_hyperparameters(architecture, overrides)
    if epochs is not None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise TrainError(f"epochs must be a positive integer, got {epochs!r}")
        hp["epochs"] = epochs
    return hp


def _train(dataset: Dataset, architecture: str, epochs: int | None, seed: int, progress: bool,
           overrides: dict[str, Any]) -> TrainedModel | None:
    """Train; under torchrun every process trains its share, process 0 evaluates and gets the result.

    Other processes return None once training ends: they hold the same weights, and only one writes.
    """
    hp = check_training(architecture, epochs, overrides)
    process_group.setup()
    progress = progress and process_group.is_main()
    started = time.perf_counter()
    model = build_model(architecture, dataset.spec, hp, seed)
    _start_at_base_rate(model, dataset.train.labels, dataset.train.weights)
    history, best_epoch = fit_epochs(model, dataset, hp, seed=seed, progress=progress, desc=architecture)
    if not process_group.is_main():
        return None
    return TrainedModel(architecture, model, hp, split_metrics(model, dataset), history, best_epoch,
                        round(time.perf_counter() - started, 2), process_group.world_size())


def fit_epochs(model: torch.nn.Module, dataset: Dataset, hp: dict[str, Any], *, seed: int = 0, progress: bool = True,
               desc: str = "model", targets: np.ndarray | None = None, keep_start: bool = False,
               grad_masks: dict[str, torch.Tensor] | None = None) -> tuple[list[dict], int]:
    """Train ``model`` in place for up to ``hp["epochs"]`` epochs; keep the epoch with the best validation AUC.

    ``targets`` replaces the training labels (a distilled student learns from the teacher's
    probabilities mixed with the labels); ``keep_start`` counts the model as it comes in as epoch 0,
    so fine-tuning never returns something worse on validation than its start; ``grad_masks`` (parameter
    name -> 0/1 tensor) keep removed weights at zero (Adam never moves a weight whose gradient stays 0).
    Under torchrun every process trains its share of each batch and process 0 validates and decides
    for all; the other processes keep their last epoch's weights. Rows with ``weights`` (a weight column in
    the log: ``train logs --ips-clip``) count in the loss by their weight, scaled to mean 1 so that the learning
    rate means what it means unweighted; validation (early stopping) stays unweighted. Returns (history, best epoch).
    """
    main = process_group.is_main()
    spec = dataset.spec
    optimizer = build_optimizer(model, hp)
    hooks = [param.register_hook(lambda grad, mask=grad_masks[name]: grad * mask)
             for name, param in model.named_parameters() if grad_masks and name in grad_masks]
    x_train = torch.from_numpy(deepctr_input(dataset.train.inputs, spec))
    y_train = torch.from_numpy((dataset.train.labels if targets is None else targets).astype(np.float32))
    w_train = loss_weights(dataset.train.weights)
    x_val = torch.from_numpy(deepctr_input(dataset.val.inputs, spec)) if main else None
    forward = training_forward(model, optimizer, hp, x_train.shape[1], grad_masks)
    shuffle = torch.Generator().manual_seed(seed)  # the same order in every process

    history: list[dict] = []
    best_score, best_state, best_epoch, stale = -math.inf, None, 0, 0
    if keep_start and main:
        val = binary_metrics(dataset.val.labels, predict(model, x_val))
        best_score, best_state = _score(val), copy.deepcopy(model.state_dict())
        history.append({"epoch": 0, "val_auc": val["auc"], "val_logloss": val["logloss"]})
    # the processes read and featurized the data apart, some faster than others: the first epoch's seconds should
    # not include waiting for the slowest of them, nor building what the gradient exchange keeps
    optimizer.prepare(hp["batch_size"], x_train.shape[1])
    process_group.barrier()
    try:
        for epoch in range(1, hp["epochs"] + 1):
            epoch_started, exchanged = time.perf_counter(), optimizer.exchange_seconds
            parts = optimizer.exchange_parts
            for group in optimizer.param_groups:
                group["lr"] = hp["lr"] * hp["lr_decay"] ** (epoch - 1)
            train_loss = _run_epoch(model, optimizer, x_train, y_train, hp["batch_size"], shuffle,
                                    desc=f"{desc} epoch {epoch}/{hp['epochs']}", progress=progress,
                                    forward=forward, weights=w_train)
            seconds = round(time.perf_counter() - epoch_started, 2)
            if main:
                val = binary_metrics(dataset.val.labels, predict(model, x_val))
                score = _score(val)
                history.append({"epoch": epoch, "train_logloss": round(train_loss, 6), "val_auc": val["auc"],
                                "val_logloss": val["logloss"], "seconds": seconds,
                                "samples_per_s": round(len(x_train) / max(seconds, 1e-9), 1)})
                if process_group.world_size() > 1:  # the gradient exchange's share of the epoch, waiting included
                    history[-1]["exchange_seconds"] = round(optimizer.exchange_seconds - exchanged, 4)
                    now = optimizer.exchange_parts  # its parts (row-wise tables only) and the message size
                    history[-1].update({f"exchange_{name}_seconds": round(now[name] - parts.get(name, 0.0), 3)
                                        for name in EXCHANGE_PARTS if name in now})
                    if "floats" in now:
                        history[-1]["exchange_floats"] = int(now["floats"])
                if progress:
                    tqdm.write(f"{desc} epoch {epoch}: train logloss {train_loss:.5f}  val auc {val['auc']}  "
                               f"val logloss {val['logloss']}")
            else:
                score = 0.0
            score = process_group.broadcast_float(score)  # process 0 decides for all
            if score > best_score:
                best_score, best_epoch, stale = score, epoch, 0
                best_state = copy.deepcopy(model.state_dict()) if main else None
            else:
                stale += 1
                if stale >= hp["patience"]:
                    break
    finally:
        optimizer.finish()
        for hook in hooks:
            hook.remove()
    if main:
        model.load_state_dict(best_state)
    model.eval()
    return history, best_epoch


def loss_weights(weights: np.ndarray | None) -> torch.Tensor | None:
    """The rows' weights in the training loss, scaled to mean 1 (None: every row weighs 1)."""
    if weights is None or len(weights) == 0:
        return None
    w = np.asarray(weights, dtype=np.float64)
    return torch.from_numpy((w / w.mean()).astype(np.float32))


def _score(val: dict[str, Any]) -> float:
    # a validation split with one class has no AUC; fall back to log loss so stopping still works
    return val["auc"] if val["auc"] is not None else -(val["logloss"] or 0.0)


def split_metrics(model: torch.nn.Module, dataset: Dataset) -> dict[str, dict]:
    """Train, validation and test metrics of ``model`` (and the oracle's on synthetic data)."""
    spec = dataset.spec
    metrics = {name: binary_metrics(part.labels, predict(model, deepctr_input(part.inputs, spec)))
               for name, part in (("train", dataset.train), ("val", dataset.val), ("test", dataset.test))}
    if dataset.test.pctr_true is not None:
        metrics["oracle"] = oracle_metrics(dataset.test.labels, dataset.test.pctr_true)
    return metrics


def _start_at_base_rate(model: torch.nn.Module, labels: np.ndarray, weights: np.ndarray | None = None) -> None:
    """Set the output bias to the log-odds of the training CTR (weighted as the loss weighs the rows).

    deepctr starts it at 0 (a predicted CTR of 50 %); with Adam at lr 5e-4 the bias alone would need
    about ten thousand steps to reach a CTR under 1 %, so every embedding gets dragged downwards
    instead, which costs the first epoch most of its value.
    """
    rate = float(np.clip(np.average(labels, weights=weights), 1e-6, 1 - 1e-6)) if len(labels) else 0.5
    with torch.no_grad():
        model.out.bias.fill_(float(np.log(rate / (1 - rate))))


class PhaseClock:
    """Seconds spent in each phase of the training loop, summed over the steps (``train speed --profile``).

    ``mark(name)`` charges the time since the previous mark to ``name``; the loop calls it at every
    phase boundary, so the phases add up to the epoch's time between ``start()`` and the last mark.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def start(self) -> None:
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now


class _NoClock:
    def start(self) -> None:
        pass

    def mark(self, name: str) -> None:
        pass


def training_forward(model: torch.nn.Module, optimizer: TrainingOptimizer, hp: dict[str, Any], columns: int,
                     grad_masks: dict[str, torch.Tensor] | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """What computes the model's output while training: the fused forward where it applies, else the model.

    ``fused_forward`` (hyper-parameter, default true) with ``sparse_tables`` uses ``train/fused.py``:
    the same function of the same parameters in fewer operations; AutoInt's ``fused_attention`` (default
    true) runs its attention layers there as a C kernel.
    """
    if hp.get("fused_forward", False) and optimizer.tables is not None:
        fused = fused_forward(model, optimizer.tables, columns, grad_masks, hp.get("fused_attention", False))
        if fused is not None:
            return fused
    return model


def _run_epoch(model, optimizer: TrainingOptimizer, x: torch.Tensor, y: torch.Tensor, batch_size: int,
               generator: torch.Generator, desc: str, progress: bool, clock: PhaseClock | None = None,
               forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
               weights: torch.Tensor | None = None) -> float:
    """One pass in a fresh random order; returns the mean training log loss (over all processes), each row's
    term times its ``weights`` entry when given.

    The epoch's rows are gathered once, in shuffled order, into one block (this process's share of
    every batch under torchrun); each batch is then a slice of it, so assembling a batch costs no copy.
    A forward that can ``prepare`` a batch (``FusedForward``) is handed the next one during the optimizer's step,
    which runs it while waiting for the other processes where it waits (``TrainingOptimizer.step``).

    ``clock``, when given, is charged per phase: ``data`` (the shuffle and gather, and the batch slices),
    ``forward`` (model and loss), ``regularization`` (deepctr's L2 terms the loss carries: every weight
    with dense tables, the non-table weights with ``sparse_tables``), ``backward``, ``optimizer``
    (zero_grad, the gradient exchange under torchrun, and the steps) and ``other`` (the loss
    read-back and the progress bar).
    """
    clock = clock or _NoClock()
    forward = forward or model
    model.train()
    clock.start()
    order = torch.randperm(len(x), generator=generator)
    mine, ends = shard_batches(order, batch_size)
    x_epoch, y_epoch = x.index_select(0, mine), y.index_select(0, mine)
    w_epoch = weights.index_select(0, mine) if weights is not None else None
    total = 0.0
    prepare = getattr(forward, "prepare", None)  # ``FusedForward``: the next batch's inputs, while waiting
    with tqdm(total=len(ends), desc=desc, unit="batch", disable=not progress, leave=False) as bar:
        clock.mark("data")
        start, upcoming = 0, None
        for step, end in enumerate(ends):
            x_batch = upcoming if upcoming is not None else x_epoch[start:end]
            y_batch = y_epoch[start:end]
            w_batch = w_epoch[start:end] if w_epoch is not None else None
            upcoming = x_epoch[end:ends[step + 1]] if step + 1 < len(ends) else None
            start = end
            clock.mark("data")
            if len(x_batch):
                pred = forward(x_batch).reshape(-1)
                loss = F.binary_cross_entropy(pred, y_batch, weight=w_batch, reduction="sum")
            else:  # a batch of fewer rows than processes: this one has none, and still takes part in the step
                loss = torch.zeros(())
            clock.mark("forward")
            regularization = optimizer.penalty()
            clock.mark("regularization")
            optimizer.zero_grad()
            clock.mark("optimizer")
            objective = loss + regularization
            if objective.requires_grad:
                objective.backward()
            clock.mark("backward")
            ahead = prepare is not None and upcoming is not None and len(upcoming) > 0
            optimizer.step(during=functools.partial(prepare, upcoming) if ahead else None)
            clock.mark("optimizer")
            total += loss.item()
            bar.update(1)
            if step % 100 == 0:
                bar.set_postfix(logloss=f"{total / max(1, end):.5f}")
            clock.mark("other")
    return process_group.sum_float(total) / max(1, len(x))

"""The training loop: Adam on shuffled mini-batches, early stopping on validation AUC.

deepctr's own ``fit()`` is avoided on purpose: it prints, re-concatenates inputs every call and offers
no hook for keeping the best epoch's weights. The loss is deepctr's (summed binary cross-entropy plus
the model's L2 terms), so its regularisation strengths mean what they mean in deepctr.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from train.data.dataset import Dataset
from train.errors import TrainError
from train.evaluate import binary_metrics, oracle_metrics, predict
from train.models import build_model, deepctr_input, parameter_count, resolve_hyperparameters

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

    @property
    def parameters(self) -> int:
        return parameter_count(self.model)


def train_model(dataset: Dataset, architecture: str, *, epochs: int | None = None, seed: int = 0,
                progress: bool = True, threads: int = 1, **overrides: Any) -> TrainedModel:
    """Train ``architecture`` on ``dataset.train``, keep the epoch with the best validation AUC.

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
           overrides: dict[str, Any]) -> TrainedModel:
    hp = check_training(architecture, epochs, overrides)
    started = time.perf_counter()
    model = build_model(architecture, dataset.spec, hp, seed)
    _start_at_base_rate(model, dataset.train.labels)
    history, best_epoch = fit_epochs(model, dataset, hp, seed=seed, progress=progress, desc=architecture)
    return TrainedModel(architecture, model, hp, split_metrics(model, dataset), history, best_epoch,
                        round(time.perf_counter() - started, 2))


def fit_epochs(model: torch.nn.Module, dataset: Dataset, hp: dict[str, Any], *, seed: int = 0, progress: bool = True,
               desc: str = "model", targets: np.ndarray | None = None, keep_start: bool = False,
               grad_masks: dict[str, torch.Tensor] | None = None) -> tuple[list[dict], int]:
    """Train ``model`` in place for up to ``hp["epochs"]`` epochs; keep the epoch with the best validation AUC.

    ``targets`` replaces the training labels (a distilled student learns from the teacher's
    probabilities mixed with the labels); ``keep_start`` counts the model as it comes in as epoch 0,
    so fine-tuning never returns something worse on validation than its start; ``grad_masks`` (parameter
    name -> 0/1 tensor) keep removed weights at zero (Adam never moves a weight whose gradient stays 0).
    Returns (history, best epoch).
    """
    spec = dataset.spec
    optimizer = _adam(model, hp)
    hooks = [param.register_hook(lambda grad, mask=grad_masks[name]: grad * mask)
             for name, param in model.named_parameters() if grad_masks and name in grad_masks]
    x_train = torch.from_numpy(deepctr_input(dataset.train.inputs, spec))
    y_train = torch.from_numpy((dataset.train.labels if targets is None else targets).astype(np.float32))
    x_val = torch.from_numpy(deepctr_input(dataset.val.inputs, spec))
    shuffle = torch.Generator().manual_seed(seed)

    history: list[dict] = []
    best_score, best_state, best_epoch, stale = -math.inf, None, 0, 0
    if keep_start:
        val = binary_metrics(dataset.val.labels, predict(model, x_val))
        best_score, best_state = _score(val), copy.deepcopy(model.state_dict())
        history.append({"epoch": 0, "val_auc": val["auc"], "val_logloss": val["logloss"]})
    try:
        for epoch in range(1, hp["epochs"] + 1):
            epoch_started = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = hp["lr"] * hp["lr_decay"] ** (epoch - 1)
            train_loss = _run_epoch(model, optimizer, x_train, y_train, hp["batch_size"], shuffle,
                                    desc=f"{desc} epoch {epoch}/{hp['epochs']}", progress=progress)
            val = binary_metrics(dataset.val.labels, predict(model, x_val))
            score = _score(val)
            history.append({"epoch": epoch, "train_logloss": round(train_loss, 6), "val_auc": val["auc"],
                            "val_logloss": val["logloss"], "seconds": round(time.perf_counter() - epoch_started, 2)})
            if progress:
                tqdm.write(f"{desc} epoch {epoch}: train logloss {train_loss:.5f}  val auc {val['auc']}  "
                           f"val logloss {val['logloss']}")
            if score > best_score:
                best_score, best_state, best_epoch, stale = score, copy.deepcopy(model.state_dict()), epoch, 0
            else:
                stale += 1
                if stale >= hp["patience"]:
                    break
    finally:
        for hook in hooks:
            hook.remove()
    model.load_state_dict(best_state)
    model.eval()
    return history, best_epoch


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


def _adam(model: torch.nn.Module, hp: dict) -> torch.optim.Adam:
    """Adam with one epsilon for the hashed tables and the usual one for the dense weights.

    Adam divides each update by the parameter's recent gradient size, so a table row seen a few
    times moves by about ``lr`` per step whether its examples were clicks (gradient ~1) or
    impressions without a click (gradient ~CTR). At a CTR under 1 % that lets every mid-frequency
    value drift quickly towards "never clicks", which is the overfitting seen as validation AUC
    falling after the first epoch. A table epsilon well above the size of a no-click gradient makes
    such rows move in proportion to their gradient, while rows seen in every batch still get Adam's
    normalised steps.
    """
    linear = [m.weight for m in model.linear_model.modules() if isinstance(m, torch.nn.Embedding)]
    vectors = [m.weight for m in model.embedding_dict.modules() if isinstance(m, torch.nn.Embedding)]
    taken = {id(t) for t in linear + vectors}
    dense = [p for p in model.parameters() if id(p) not in taken]
    groups = [{"params": linear, "eps": hp["table_eps"]}]
    if vectors:
        groups.append({"params": vectors, "eps": hp.get("vector_eps", hp["table_eps"])})
    if dense:
        groups.append({"params": dense, "eps": hp["adam_eps"]})
    return torch.optim.Adam(groups, lr=hp["lr"])


def _start_at_base_rate(model: torch.nn.Module, labels: np.ndarray) -> None:
    """Set the output bias to the log-odds of the training CTR.

    deepctr starts it at 0 (a predicted CTR of 50 %); with Adam at lr 5e-4 the bias alone would need
    about ten thousand steps to reach a CTR under 1 %, so every embedding gets dragged downwards
    instead, which costs the first epoch most of its value.
    """
    rate = float(np.clip(labels.mean(), 1e-6, 1 - 1e-6)) if len(labels) else 0.5
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


def _run_epoch(model, optimizer, x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator,
               desc: str, progress: bool, clock: PhaseClock | None = None) -> float:
    """One pass in a fresh random order; returns the mean training log loss.

    ``clock``, when given, is charged per phase: ``data`` (batch assembly), ``forward`` (model and loss),
    ``regularization`` (deepctr's L2 terms, computed over the whole tables), ``backward``, ``optimizer``
    (zero_grad and Adam's step) and ``other`` (the loss read-back and the progress bar).
    """
    clock = clock or _NoClock()
    model.train()
    clock.start()
    order = torch.randperm(len(x), generator=generator)
    steps = (len(x) + batch_size - 1) // batch_size
    total = 0.0
    with tqdm(total=steps, desc=desc, unit="batch", disable=not progress, leave=False) as bar:
        clock.mark("other")
        for step in range(steps):
            index = order[step * batch_size:(step + 1) * batch_size]
            x_batch, y_batch = x[index], y[index]
            clock.mark("data")
            pred = model(x_batch).reshape(-1)
            loss = F.binary_cross_entropy(pred, y_batch, reduction="sum")
            clock.mark("forward")
            regularization = model.get_regularization_loss()
            clock.mark("regularization")
            optimizer.zero_grad()
            clock.mark("optimizer")
            (loss + regularization).backward()
            clock.mark("backward")
            optimizer.step()
            clock.mark("optimizer")
            total += loss.item()
            bar.update(1)
            if step % 100 == 0:
                bar.set_postfix(logloss=f"{total / min(len(x), (step + 1) * batch_size):.5f}")
            clock.mark("other")
    return total / max(1, len(x))

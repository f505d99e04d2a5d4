"""Training throughput, measured before it is optimised: our loop against deepctr-torch's own ``fit()``.

Both loops train the same freshly initialised model (same seed, the output bias at the training CTR's
log-odds, the same Adam parameter groups and settings, batch size and epochs) on the same first N rows of
the training split, taking turns (ours, deepctr, ours, deepctr ...). Only the training epochs are timed:
not featurizing, not fit()'s one-off input copy, not scoring. Each run is then scored on the test split
(AUC), so a faster loop that learns less shows up.

``profile`` adds one more epoch of our loop with every phase of a step timed (``train.trainer.PhaseClock``):
data (batch assembly), forward, regularization (deepctr's L2 terms over the whole embedding tables),
backward, optimizer (zero_grad and Adam's step over every parameter) and other (loss read-back, progress).
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from bidder.spec import FeatureSpec
from train._deepctr import VERSION as DEEPCTR_VERSION
from train._deepctr import BaseModel
from train.data.dataset import Dataset, load_dataset
from train.errors import TrainError
from train.evaluate import binary_metrics, predict
from train.fit import report_skipped, resolve_spec
from train.models import ARCHITECTURES, build_model, deepctr_input, parameter_count
from train.distributed.shm import TRANSPORTS
from train.distributed.wire import EXCHANGE_PARTS
from train.optim import build_optimizer, dense_adam
from train.trainer import PhaseClock, _run_epoch, _start_at_base_rate, check_training, training_forward

__all__ = ["LOOPS", "PHASES", "check_processes", "check_speed", "measure_processes", "measure_speed",
           "render_processes", "render_table"]

LOOPS = ("ours", "deepctr")
#: deepctr fit()'s optimizer settings unless told otherwise: the ones our loop shipped with before sparse
#: tables and larger batches (fit() has no sparse path: it always runs torch's Adam over every parameter)
DEEPCTR_BATCH_SIZE = 512
DEEPCTR_LR = 5e-4
PHASES = ("data", "forward", "regularization", "backward", "optimizer", "other")


def check_speed(models: tuple[str, ...], *, rows: int | None = None, epochs: int = 1, repeats: int = 1,
                threads: int = 1, overrides: dict[str, Any] | None = None,
                deepctr_batch_size: int = DEEPCTR_BATCH_SIZE,
                deepctr_lr: float = DEEPCTR_LR) -> dict[str, dict[str, dict[str, Any]]]:
    """Each model's hyper-parameters for each loop; a bad model, count or setting raises TrainError.

    ``overrides`` (``--set``) apply to both loops; deepctr's fit() then takes ``deepctr_batch_size``
    and ``deepctr_lr``. Cheap: called before any data is read.
    """
    if not models:
        raise TrainError(f"--models: no model given; choose from {', '.join(ARCHITECTURES)}")
    unknown = [m for m in models if m not in ARCHITECTURES]
    if unknown:
        raise TrainError(f"--models: unknown model(s) {', '.join(unknown)}; choose from {', '.join(ARCHITECTURES)}")
    if len(set(models)) != len(models):
        raise TrainError(f"--models: a model is named twice ({','.join(models)})")
    for name, value in (("--rows", rows), ("--epochs", epochs), ("--repeats", repeats), ("--threads", threads)):
        if value is None and name == "--rows":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TrainError(f"{name} must be a positive integer, got {value!r}")
    if rows is not None and rows < 2:
        raise TrainError(f"--rows must be at least 2 (a batch needs rows of both loops), got {rows}")
    if isinstance(deepctr_batch_size, bool) or not isinstance(deepctr_batch_size, int) or deepctr_batch_size < 1:
        raise TrainError(f"--deepctr-batch-size must be a positive integer, got {deepctr_batch_size!r}")
    if not deepctr_lr > 0:
        raise TrainError(f"--deepctr-lr must be positive, got {deepctr_lr!r}")
    settings = {}
    for model in models:
        ours = check_training(model, epochs, overrides)
        settings[model] = {"ours": ours, "deepctr": {**ours, "batch_size": deepctr_batch_size, "lr": deepctr_lr,
                                                     "sparse_tables": False}}
    return settings


def measure_speed(data_dir: str | Path, *, models: tuple[str, ...] = ("deepfm", "autoint"), rows: int | None = None,
                  epochs: int = 1, repeats: int = 1, threads: int = 1, seed: int = 0, profile: bool = False,
                  progress: bool = True, skip_bad_lines: bool = False,
                  spec: FeatureSpec | str | Path | None = None, overrides: dict[str, Any] | None = None,
                  deepctr_batch_size: int = DEEPCTR_BATCH_SIZE, deepctr_lr: float = DEEPCTR_LR) -> dict[str, Any]:
    """Time both training loops on ``models``; returns settings, versions, machine and the figures."""
    settings = check_speed(models, rows=rows, epochs=epochs, repeats=repeats, threads=threads, overrides=overrides,
                           deepctr_batch_size=deepctr_batch_size, deepctr_lr=deepctr_lr)
    dataset = load_dataset(data_dir, resolve_spec(spec), seed=seed, skip_bad_lines=skip_bad_lines, progress=progress)
    report_skipped(dataset)
    available = len(dataset.train)
    if rows is not None and rows > available:
        raise TrainError(f"--rows {rows}: the training split of {data_dir} holds {available} rows")
    n = available if rows is None else rows
    train = dataset.train.take(np.arange(n))
    x_train = torch.from_numpy(deepctr_input(train.inputs, dataset.spec))
    y_train = torch.from_numpy(train.labels.astype(np.float32))
    x_test = torch.from_numpy(deepctr_input(dataset.test.inputs, dataset.spec))

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    load_before = list(os.getloadavg())
    started = time.perf_counter()
    try:
        results = [_measure_model(model, settings[model], dataset, x_train, y_train, x_test, epochs=epochs,
                                  repeats=repeats, seed=seed, profile=profile, progress=progress)
                   for model in models]
    finally:
        torch.set_num_threads(previous)
    return {
        "measured_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "settings": {"data": str(data_dir), "source": dataset.source, "data_digest": dataset.digest,
                     "split": dataset.split, "train_rows": n, "train_split_rows": available,
                     "test_rows": len(dataset.test), "epochs": epochs, "repeats": repeats, "threads": threads,
                     "seed": seed, "profile": profile, "order": "ours, deepctr taking turns per repeat",
                     "timed": "training epochs only (no featurizing, no fit() input copy, no scoring)",
                     "hyperparameters": settings},
        "versions": _versions(),
        "machine": {**_machine(), "loadavg_before": load_before, "loadavg_after": list(os.getloadavg())},
        "seconds": round(time.perf_counter() - started, 2),
        "models": results,
    }


def _measure_model(architecture: str, loops: dict[str, dict[str, Any]], dataset: Dataset, x_train: torch.Tensor,
                   y_train: torch.Tensor, x_test: torch.Tensor, *, epochs: int, repeats: int, seed: int,
                   profile: bool, progress: bool) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    for repeat in range(1, repeats + 1):
        for loop in LOOPS:
            hp = loops[loop]
            model = _fresh_model(architecture, hp, dataset, seed)
            label = f"{architecture} {loop} {repeat}/{repeats}"
            if loop == "ours":
                optimizer = build_optimizer(model, hp)
                try:
                    epoch_seconds = _fit_ours(model, optimizer, hp, x_train, y_train, epochs, seed, label, progress)
                finally:
                    optimizer.finish()
            else:
                epoch_seconds = _fit_deepctr(model, dense_adam(model, hp), hp, x_train, y_train, epochs, seed,
                                             progress)
            test = binary_metrics(dataset.test.labels, predict(model, x_test))
            # the rate from the seconds as written: a tiny epoch of a few ms must not disagree with its own JSON
            epoch_seconds = [round(s, 6) for s in epoch_seconds]
            runs.append({"loop": loop, "repeat": repeat, "epoch_seconds": epoch_seconds,
                         "samples_per_s": round(len(x_train) * epochs / sum(epoch_seconds), 1),
                         "test_auc": test["auc"], "test_logloss": test["logloss"]})
    summary = {}
    for loop in LOOPS:
        mine = [r for r in runs if r["loop"] == loop]
        summary[loop] = {"samples_per_s": round(statistics.median(r["samples_per_s"] for r in mine), 1),
                         "test_auc": mine[0]["test_auc"], "test_logloss": mine[0]["test_logloss"]}
    ratio = summary["ours"]["samples_per_s"] / summary["deepctr"]["samples_per_s"]
    hp = loops["ours"]
    model = _fresh_model(architecture, hp, dataset, seed)
    result = {"model": architecture, "batch_size": hp["batch_size"], "deepctr_batch_size": loops["deepctr"]["batch_size"],
              "sparse_tables": hp["sparse_tables"], "parameters": _parameters(model),
              **summary, "ratio_ours_to_deepctr": round(ratio, 3), "runs": runs}
    if profile:
        result["profile"] = _profile(model, hp, x_train, y_train, seed, f"{architecture} profile", progress)
    return result


def _fresh_model(architecture: str, hp: dict[str, Any], dataset: Dataset, seed: int) -> BaseModel:
    model = build_model(architecture, dataset.spec, hp, seed)
    # the training CTR of the whole split, as train_model sets it; the same for both loops
    _start_at_base_rate(model, dataset.train.labels)
    return model


def _fit_ours(model, optimizer, hp, x, y, epochs, seed, label, progress) -> list[float]:
    shuffle = torch.Generator().manual_seed(seed)
    seconds = []
    for epoch in range(1, epochs + 1):
        for group in optimizer.param_groups:  # as train_model does
            group["lr"] = hp["lr"] * hp["lr_decay"] ** (epoch - 1)
        started = time.perf_counter()
        _run_epoch(model, optimizer, x, y, hp["batch_size"], shuffle, desc=f"{label} epoch {epoch}", progress=progress,
                   forward=training_forward(model, optimizer, hp, x.shape[1]))
        seconds.append(time.perf_counter() - started)
    return seconds


class _EpochTimer:
    """A deepctr callback timing each epoch from its start to its end."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._started = 0.0

    def set_model(self, model) -> None:
        pass

    def set_params(self, params) -> None:
        pass

    def on_train_begin(self, logs=None) -> None:
        pass

    def on_train_end(self, logs=None) -> None:
        pass

    def on_epoch_begin(self, epoch, logs=None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None) -> None:
        self.seconds.append(time.perf_counter() - self._started)


def _fit_deepctr(model: BaseModel, optimizer, hp, x, y, epochs, seed, progress) -> list[float]:
    """deepctr's ``fit()`` as its README uses it: compile, then fit on the input matrix; no validation.

    deepctr has no learning-rate decay; the default ``lr_decay`` is 1.0, so both loops run the same
    schedule. fit() prints to stdout, which carries this command's JSON, so its prints go to stderr
    (or nowhere without ``progress``).
    """
    model.compile(optimizer, "binary_crossentropy")
    timer = _EpochTimer()
    torch.manual_seed(seed)  # fit()'s DataLoader shuffles with torch's global generator
    with contextlib.ExitStack() as stack:
        sink = sys.stderr if progress else stack.enter_context(open(os.devnull, "w"))
        stack.enter_context(contextlib.redirect_stdout(sink))
        model.fit([x.numpy()], y.numpy(), batch_size=hp["batch_size"], epochs=epochs, verbose=1 if progress else 0,
                  shuffle=True, callbacks=[timer])
    if len(timer.seconds) != epochs:
        raise TrainError(f"deepctr fit() ran {len(timer.seconds)} epoch(s) of {epochs}")
    return timer.seconds


def _profile(model, hp, x, y, seed, label, progress) -> dict[str, Any]:
    """One epoch of our loop with each phase of every step timed; phases sum to the epoch's time."""
    optimizer = build_optimizer(model, hp)
    clock = PhaseClock()
    started = time.perf_counter()
    try:
        _run_epoch(model, optimizer, x, y, hp["batch_size"], torch.Generator().manual_seed(seed), desc=label,
                   progress=progress, clock=clock, forward=training_forward(model, optimizer, hp, x.shape[1]))
        epoch = time.perf_counter() - started
        penalty_backward = _penalty_backward_seconds(optimizer)
    finally:
        optimizer.finish()
    total = sum(clock.seconds.values())
    phases = {name: {"seconds": round(clock.seconds.get(name, 0.0), 4),
                     "share": round(clock.seconds.get(name, 0.0) / total, 4) if total else 0.0,
                     "us_per_step": round(1e6 * clock.seconds.get(name, 0.0) / _steps(len(x), hp), 1)}
              for name in PHASES}
    steps = _steps(len(x), hp)
    whole_table = (clock.seconds.get("regularization", 0.0) + clock.seconds.get("optimizer", 0.0)
                   + penalty_backward * steps)
    return {"epoch_seconds": round(epoch, 4), "phase_seconds_total": round(total, 4),
            "steps": steps, "samples_per_s": round(len(x) / epoch, 1), "phases": phases,
            "penalty_backward_us_per_step": round(1e6 * penalty_backward, 1),
            "whole_table_share_estimate": round(whole_table / total, 4) if total else 0.0,
            "touched_table_rows_per_batch": _touched_rows(model, x, hp, seed)}


def _penalty_backward_seconds(optimizer, steps: int = 30) -> float:
    """Mean seconds of the backward pass of the loss's L2 penalty alone (part of every step's backward).

    With dense tables, ``whole_table_share_estimate`` is regularization + optimizer + this backward,
    times the steps, over the epoch: the work done on every table row whether the batch read it or not.
    With ``sparse_tables`` the same sum is an upper bound: the table share of it is row-wise.
    """
    seconds = 0.0
    for _ in range(steps):
        optimizer.zero_grad()
        penalty = optimizer.penalty()
        if not isinstance(penalty, torch.Tensor) or not penalty.requires_grad:  # no L2 terms in the loss
            return 0.0
        started = time.perf_counter()
        penalty.backward()
        seconds += time.perf_counter() - started
    optimizer.zero_grad()
    return seconds / steps


def _steps(rows: int, hp: dict[str, Any]) -> int:
    return (rows + hp["batch_size"] - 1) // hp["batch_size"]


def _touched_rows(model: BaseModel, x: torch.Tensor, hp: dict[str, Any], seed: int, batches: int = 20) -> dict:
    """Distinct embedding-table rows a batch reads (mean over ``batches`` random batches) against all rows.

    Each input column indexes its field's tables (a linear weight and a vector per field); a multi-valued
    field's columns share their tables. Padding index 0 counts as a row like any other.
    """
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + 1))
    tables = {}  # table name -> its input columns
    for name, (start, stop) in model.feature_index.items():
        tables[name] = list(range(start, stop))
    counts = []
    for b in range(min(batches, _steps(len(x), hp))):
        batch = x[order[b * hp["batch_size"]:(b + 1) * hp["batch_size"]]]
        counts.append(sum(int(torch.unique(batch[:, cols]).numel()) for cols in tables.values()))
    all_rows = sum(int(model.embedding_dict[name].num_embeddings) for name in tables if name in model.embedding_dict)
    mean = float(np.mean(counts)) if counts else 0.0
    return {"mean": round(mean, 1), "of": all_rows, "share": round(mean / all_rows, 5) if all_rows else None}


def _parameters(model: BaseModel) -> dict[str, int]:
    tables = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    total = parameter_count(model)
    return {"total": total, "embedding_tables": int(tables), "dense": int(total - tables)}


def render_table(result: dict[str, Any]) -> str:
    """The figures as a markdown table, and each profile as a line of shares."""
    s = result["settings"]
    lines = [f"training throughput: {s['train_rows']:,} training rows, {s['epochs']} epoch(s), "
             f"{s['threads']} thread(s), {s['repeats']} repeat(s) (median), test AUC on {s['test_rows']:,} rows",
             "",
             "| model | batch ours / deepctr | ours samples/s | deepctr fit() samples/s | ours / deepctr | ours test AUC | deepctr test AUC |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m in result["models"]:
        lines.append(f"| {m['model']} | {m['batch_size']} / {m['deepctr_batch_size']} | {m['ours']['samples_per_s']:,.0f} | "
                     f"{m['deepctr']['samples_per_s']:,.0f} | {m['ratio_ours_to_deepctr']:.2f}× | "
                     f"{_auc(m['ours']['test_auc'])} | {_auc(m['deepctr']['test_auc'])} |")
    profiled = [m for m in result["models"] if "profile" in m]
    if profiled:
        lines += ["", "| profile (our loop, one epoch) | epoch s | " + " | ".join(PHASES) + " |",
                  "|---|---:|" + "---:|" * len(PHASES)]
        for m in profiled:
            p = m["profile"]
            lines.append(f"| {m['model']} | {p['epoch_seconds']:.2f} | " +
                         " | ".join(f"{100 * p['phases'][k]['share']:.1f} %" for k in PHASES) + " |")
        for m in profiled:
            p = m["profile"]
            if m["sparse_tables"]:
                lines.append(f"{m['model']}: sparse tables: the loss carries {p['penalty_backward_us_per_step'] / 1000:.1f} ms "
                             f"of L2 backward a step; regularization and optimizer (row-wise on the tables) are "
                             f"{100 * p['whole_table_share_estimate']:.0f} % of the epoch")
            else:
                lines.append(f"{m['model']}: the L2 penalty's backward alone takes {p['penalty_backward_us_per_step'] / 1000:.1f} ms "
                             f"a step; with regularization and optimizer, work over every table row is about "
                             f"{100 * p['whole_table_share_estimate']:.0f} % of the epoch")
        for m in profiled:
            t, par = m["profile"]["touched_table_rows_per_batch"], m["parameters"]
            lines.append(f"{m['model']}: {par['embedding_tables']:,} of {par['total']:,} parameters are embedding "
                         f"tables; a batch reads {t['mean']:,.0f} of their {t['of']:,} rows ({100 * (t['share'] or 0):.2f} %)")
    return "\n".join(lines)


def _auc(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "deepctr-torch": DEEPCTR_VERSION, "numpy": np.__version__}
    try:
        out["bidder"] = importlib.metadata.version("bidder")
    except importlib.metadata.PackageNotFoundError:
        out["bidder"] = None
    return out


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    return {"cpu_model": cpu, "nproc": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "kernel": platform.release(), "commit": commit}


def check_processes(model: str, processes: tuple[int, ...], *, repeats: int = 2, epochs: int = 1,
                    overrides: dict[str, Any] | None = None, transports: tuple[str, ...] = ("shm",)) -> dict[str, Any]:
    """``measure_processes``'s arguments checked before anything runs; returns the model's hyper-parameters."""
    if model not in ARCHITECTURES:
        raise TrainError(f"--model: unknown model {model!r}; choose from {', '.join(ARCHITECTURES)}")
    if not processes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in processes):
        raise TrainError(f"--processes must be positive integers, got {','.join(map(str, processes)) or 'none'}")
    for name, value in (("--repeats", repeats), ("--epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TrainError(f"{name} must be a positive integer, got {value!r}")
    unknown = [t for t in transports if t not in TRANSPORTS]
    if not transports or unknown or len(set(transports)) != len(transports):
        raise TrainError(f"--transports must name distinct transports among {', '.join(TRANSPORTS)}, "
                         f"got {','.join(transports) or 'none'}")
    return check_training(model, epochs, overrides)


def measure_processes(data_dir: str | Path, *, model: str = "deepfm", processes: tuple[int, ...] = (1, 2),
                      repeats: int = 2, epochs: int = 1, overrides: dict[str, Any] | None = None, seed: int = 0,
                      transports: tuple[str, ...] = ("shm",), progress: bool = True) -> dict[str, Any]:
    """``train fit`` under ``torchrun --nproc-per-node N`` for each N, taking turns; samples/s and test AUC.

    Each run is the documented command (one thread per process) writing a bundle into a temporary folder;
    its figures come from the bundle's ``meta.json``: the epochs' seconds and ``exchange_seconds`` (the
    gradient exchange, waiting for the slower process included) as process 0 measured them, with its parts
    (writing the message, the all-gather, the sums), and the test AUC. For each N > 1 the all-gather of the
    same message is then timed alone, every process arriving together (``train.studies.all_gather``), so the
    all-gather's seconds split into its own cost and waiting for the slower process. The machine's load
    average is recorded before and after: other jobs on the cores depress the many-process figures most.

    With several ``transports`` (``train.distributed.shm.TRANSPORTS``, set through ``TRAIN_GATHER``) every N > 1
    runs once per transport in each repeat, one after the other, and each run is keyed "N transport";
    ``transport_ratios`` then gives, per repeat, the first transport's samples/s over each other's: runs taken
    minutes apart are never paired.
    """
    hp = check_processes(model, processes, repeats=repeats, epochs=epochs, overrides=overrides, transports=transports)
    if not Path(data_dir).is_dir():
        raise TrainError(f"--data {data_dir}: no such folder")
    sets = [arg for name, value in (overrides or {}).items() for arg in ("--set", f"{name}={value}")]
    load_before = list(os.getloadavg())
    started = time.perf_counter()
    runs = []
    configs = [(n, t) for n in processes for t in (transports if n > 1 else transports[:1])]
    order = [(repeat, n, t) for repeat in range(1, repeats + 1) for n, t in configs]
    with tempfile.TemporaryDirectory(prefix="speed-ddp-") as tmp, \
            tqdm(order, desc="torchrun runs", unit="run", disable=not progress) as bar:
        for repeat, n, t in bar:
            bar.set_postfix(processes=n, transport=t)
            out = Path(tmp) / f"run-{repeat}-{n}-{t}"
            command = ["-m", "train", "fit", "--data", str(data_dir), "--model", model, "--epochs", str(epochs),
                       "--seed", str(seed), "--threads", "1", "--out", str(out), "--quiet", *sets]
            _torchrun(n, command, f"torchrun with {n} process(es) failed", t)
            meta = json.loads((out / "meta.json").read_text())
            history = meta["training"]["history"]
            seconds = sum(h["seconds"] for h in history)
            rows = meta["data"]["rows"]["train"]
            runs.append({"processes": n, "transport": t, "key": _key(n, t, transports), "repeat": repeat,
                         "epoch_seconds": [h["seconds"] for h in history],
                         "exchange_seconds": [h.get("exchange_seconds", 0.0) for h in history],
                         **{f"exchange_{part}_seconds": [h.get(f"exchange_{part}_seconds", 0.0) for h in history]
                            for part in EXCHANGE_PARTS},
                         "exchange_floats": history[-1].get("exchange_floats", 0),
                         "samples_per_s": round(rows * len(history) / seconds, 1),
                         "train_logloss": history[-1]["train_logloss"], "test_auc": meta["metrics"]["test"]["auc"]})
        # the all-gather alone, every process arriving together: what of ``gather`` is not waiting
        alone = {}
        for n, t in ((n, t) for n, t in configs if n > 1):
            key = _key(n, t, transports)
            floats = max(r["exchange_floats"] for r in runs if r["key"] == key)
            if not floats:  # dense tables: gradients summed by all_reduce_dense, not this message
                continue
            printed = _torchrun(n, ["-m", "train.studies.all_gather", str(floats)],
                                f"timing the all-gather alone on {n} processes failed", t)
            alone[key] = {"floats": floats, "ms": round(1e3 * json.loads(printed)["seconds"], 3)}
    keys = [_key(n, t, transports) for n, t in configs]
    median = {k: round(statistics.median(r["samples_per_s"] for r in runs if r["key"] == k), 1) for k in keys}
    base = median[keys[0]]
    # each run against the first process count's run of the same repeat, which ran just before it: the machine's
    # speed drifts over minutes, so pairs taken in turn say more than medians taken minutes apart
    first = {r["repeat"]: r["samples_per_s"] for r in runs if r["key"] == keys[0]}
    pairs = {k: [round(r["samples_per_s"] / first[r["repeat"]], 3) for r in runs if r["key"] == k] for k in keys}
    by_run = {(r["repeat"], r["processes"], r["transport"]): r["samples_per_s"] for r in runs}
    transport_ratios = {str(n): {t: [round(by_run[(repeat, n, transports[0])] / by_run[(repeat, n, t)], 3)
                                     for repeat in range(1, repeats + 1)] for t in transports[1:]}
                        for n in processes if n > 1 and len(transports) > 1}
    return {
        "measured_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": ("python -m torch.distributed.run --standalone --nproc-per-node N " + " ".join(
            ["-m", "train", "fit", "--data", str(data_dir), "--model", model, "--epochs", str(epochs),
             "--seed", str(seed), "--threads", "1", "--out", "TMP", "--quiet", *sets])),
        "settings": {"data": str(data_dir), "model": model, "processes": list(processes), "repeats": repeats,
                     "epochs": epochs, "threads_per_process": 1, "transports": list(transports),
                     "order": "each N (and each transport) in turn, per repeat",
                     "batch_size": hp["batch_size"], "lr": hp["lr"],
                     "timed": "training epochs of process 0 (meta.json training.history)"},
        "versions": _versions(),
        "machine": {**_machine(), "loadavg_before": load_before, "loadavg_after": list(os.getloadavg())},
        "seconds": round(time.perf_counter() - started, 2),
        "median_samples_per_s": median,
        "ratio_to_first": {k: round(v / base, 3) for k, v in median.items()},
        "pair_ratios": pairs,
        "pair_ratio_median": {k: round(statistics.median(v), 3) for k, v in pairs.items()},
        "transport_ratios": transport_ratios,
        "transport_ratio_median": {n: {t: round(statistics.median(v), 3) for t, v in ratios.items()}
                                   for n, ratios in transport_ratios.items()},
        "steps_per_epoch": (rows + hp["batch_size"] - 1) // hp["batch_size"],
        "all_gather_alone": alone,
        "runs": runs,
    }


def _key(processes: int, transport: str, transports: tuple[str, ...]) -> str:
    """A run's name in the result: the process count, with the transport where several were compared."""
    return str(processes) if processes == 1 or len(transports) == 1 else f"{processes} {transport}"


def _torchrun(n: int, args: list[str], failure: str, transport: str = "shm") -> str:
    """``args`` under ``torchrun --standalone --nproc-per-node n``, one thread per process, the all-gather carried by
    ``transport``; what it printed. A failed run raises TrainError: ``failure`` and the last line the run wrote
    to stderr."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                           *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TRAIN_GATHER": transport})
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise TrainError(f"{failure}: {last}")
    return done.stdout


def _pairs(result: dict[str, Any], key: str) -> str:
    """Each run's ratio to the first process count's run just before it, and their median ("–" in older files)."""
    pairs = result.get("pair_ratios", {}).get(key)
    if not pairs:
        return "–"
    return f"{', '.join(f'{p:.2f}' for p in pairs)} ({result['pair_ratio_median'][key]:.2f}×)"


def render_processes(result: dict[str, Any]) -> str:
    """The runs as markdown tables: processes (and transport), median samples/s, its ratio, exchange share, test
    AUC; then the exchange per step by part (medians over the runs), with the all-gather alone beside the
    all-gather; then, where transports were compared, the first's samples/s over each other's, run by run."""
    s = result["settings"]
    lines = [f"{s['model']} on {s['data']}: {s['epochs']} epoch(s), batch {s['batch_size']}, one thread per process, "
             f"load average {result['machine']['loadavg_before'][0]:.1f} before / "
             f"{result['machine']['loadavg_after'][0]:.1f} after", "",
             "| processes | samples/s (median) | runs | × first | × first, run by run (median) | exchange share "
             "| test AUC |", "|---:|---:|---|---:|---|---:|---:|"]
    parts = []
    keys = list(dict.fromkeys(r.get("key", str(r["processes"])) for r in result["runs"]))
    for key in keys:
        mine = [r for r in result["runs"] if r.get("key", str(r["processes"])) == key]
        share = statistics.median(sum(r["exchange_seconds"]) / sum(r["epoch_seconds"]) for r in mine)
        lines.append(f"| {key} | {result['median_samples_per_s'][key]:,.0f} | "
                     f"{' / '.join(format(r['samples_per_s'], ',.0f') for r in mine)} | "
                     f"{result['ratio_to_first'][key]:.2f}× | {_pairs(result, key)} | {100 * share:.0f} % | "
                     f"{mine[0]['test_auc']:.4f} |")
        alone = result.get("all_gather_alone", {}).get(key)
        if alone:
            steps = result["steps_per_epoch"] * s["epochs"]
            per_step = {part: statistics.median(1e3 * sum(r.get(f"exchange_{part}_seconds", [0.0])) / steps
                                                for r in mine)
                        for part in EXCHANGE_PARTS}
            parts.append(f"| {key} | {alone['floats']:,} | {per_step['pack']:.2f} | {per_step['gather']:.2f} | "
                         f"{alone['ms']:.2f} | {max(0.0, per_step['gather'] - alone['ms']):.2f} | "
                         f"{per_step['ahead']:.2f} | {per_step['unpack']:.2f} | {per_step['sync']:.2f} |")
    if parts:
        lines += ["", "| processes | message floats | pack ms/step | all-gather ms/step | all-gather alone ms | "
                      "waiting ms/step | next batch while waiting ms/step | unpack ms/step | sync ms/step |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *parts]
    compared = result.get("transport_ratios", {})
    if compared:
        first = s["transports"][0]
        lines += ["", f"| processes | {first} over | run by run | median |", "|---:|---|---|---:|"]
        lines += [f"| {n} | {t} | {', '.join(f'{x:.3f}' for x in ratios)} | "
                  f"{result['transport_ratio_median'][n][t]:.3f}× |"
                  for n, by in compared.items() for t, ratios in by.items()]
    return "\n".join(lines)

"""One model from a log folder to a served bundle: load, train, calibrate, export lean ONNX, check parity, write.

A DeepFM bundle also gets its factorized graphs (``train/factorize.py``), checked against the lean one.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bidder.spec import FeatureSpec, default_spec, load_spec
from train.bundle import write_bundle
from train.calibrate import Calibration, calibration_report, choose_for_serving
from train.calibrate import apply as apply_calibration
from train.data.dataset import Dataset, load_dataset
from train.evaluate import binary_metrics, predict
from train.export import check_parity, export_lean
from train.factorize import bundle_graphs
from train.gbdt import GbdtModel, export_gbdt, gbdt_parity
from train.models import deepctr_input
from train.trainer import TrainedModel, check_training, train_model

__all__ = ["calibrate", "calibrate_predictions", "fit_bundle", "save_bundle", "save_gbdt_bundle", "resolve_spec"]

log = logging.getLogger("train")


def fit_bundle(data_dir: str | Path | Dataset, model: str, out_dir: str | Path, *, epochs: int | None = None, seed: int = 0,
               progress: bool = True, skip_bad_lines: bool = False, spec: FeatureSpec | str | Path | None = None,
               data_label: str | None = None, threads: int = 1, **hyperparameters: Any) -> Path | None:
    """Train ``model`` on the logs in ``data_dir`` and write its bundle to ``out_dir`` (returned).

    Under ``torchrun --nproc-per-node N`` the processes train together and process 0 writes the bundle;
    the others return None.

    ``data_dir`` may be a ``Dataset`` already read (then ``spec`` and ``skip_bad_lines`` are its own).
    ``spec`` defaults to the bidder's iPinYou spec; ``data_label`` replaces the data path recorded in
    ``meta.json`` (for data generated into a temporary folder); ``threads`` is torch's thread count
    while training. Other keywords are hyper-parameters.
    """
    check_training(model, epochs, hyperparameters)  # before the data: a typo must not wait for featurizing
    if isinstance(data_dir, Dataset):
        dataset = data_dir
    else:
        dataset = load_dataset(data_dir, resolve_spec(spec), seed=seed, skip_bad_lines=skip_bad_lines,
                               progress=progress)
        report_skipped(dataset)
    trained = train_model(dataset, model, epochs=epochs, seed=seed, progress=progress, threads=threads,
                          **hyperparameters)
    if trained is None:  # a torchrun process other than 0: process 0 writes the bundle
        return None
    return save_bundle(trained, dataset, out_dir, data_label=data_label)


def calibrate(trained: TrainedModel, dataset: Dataset) -> tuple[Calibration, dict[str, Any], dict[str, Any]]:
    """The calibration ``trained`` is exported with (``train/calibrate.py``); see ``calibrate_predictions``."""
    spec = dataset.spec
    raw = {name: predict(trained.model, deepctr_input(part.inputs, spec))
           for name, part in (("train", dataset.train), ("val", dataset.val), ("test", dataset.test))}
    return calibrate_predictions(raw, dataset, trained.metrics)


def calibrate_predictions(raw: dict[str, np.ndarray], dataset: Dataset, metrics: dict[str, Any]
                          ) -> tuple[Calibration, dict[str, Any], dict[str, Any]]:
    """Fit, judge and report the calibration of a model whose predictions per split are ``raw``.

    The Bayesian shift is fitted on the training rows, then on the validation rows with that fit as prior, and kept
    when its posterior is sure the level moved (``choose_for_serving``). Returns the calibration (the identity when
    it was not kept), ``metrics`` with the train/val/test entries of the served (calibrated) model, and
    ``meta.json``'s ``calibration`` entry.
    """
    choice = choose_for_serving(raw["train"], dataset.train.labels, raw["val"], dataset.val.labels)
    served = dict(metrics)
    for name, part in (("train", dataset.train), ("val", dataset.val), ("test", dataset.test)):
        served[name] = binary_metrics(part.labels, apply_calibration(raw[name], choice.calibration))
    entry = calibration_report(choice, raw["test"], dataset.test.labels, dataset.test.pctr_true)
    log.info("calibration (Platt fitted on %s rows): scale %.4f shift %.4f (95 %% mean factor %s), held-out val log "
             "loss %.6f -> %.6f: %s; test mean/CTR %s -> %s", choice.fitted_on, choice.candidate.calibration.scale,
             choice.candidate.calibration.shift, entry["candidate"]["mean_factor_95"], choice.logloss_raw,
             choice.logloss_calibrated, "kept" if choice.kept else "not kept (identity exported)",
             entry["test"]["before"]["mean_over_ctr"], entry["test"]["after"]["mean_over_ctr"])
    return choice.calibration, served, entry


def resolve_spec(spec: FeatureSpec | str | Path | None) -> FeatureSpec:
    if spec is None:
        return default_spec()
    if isinstance(spec, FeatureSpec):
        return spec
    return load_spec(spec)


def report_skipped(dataset: Dataset) -> None:
    if dataset.bad_lines.count:
        log.warning(dataset.bad_lines.summary())


def save_bundle(trained: TrainedModel, dataset: Dataset, out_dir: str | Path, *, data_label: str | None = None,
                extra_meta: dict[str, Any] | None = None) -> Path:
    """Calibrate ``trained``, export it lean, prove parity on held-out rows, write the bundle; nothing is
    written on failure.

    ``extra_meta`` adds top-level ``meta.json`` entries (``train/compress/``'s ``compression``).
    """
    spec = dataset.spec
    calibration, metrics, calibration_entry = calibrate(trained, dataset)
    with tempfile.TemporaryDirectory(prefix="bundle-") as tmp:
        onnx_path = export_lean(trained.model, spec, trained.architecture, Path(tmp) / "model.onnx",
                                combiner=trained.hyperparameters["usertag_combiner"], calibration=calibration)
        parity = check_parity(trained.model, onnx_path, spec, dataset.test, calibration=calibration)
        extra_files, graphs = bundle_graphs(trained.architecture, trained.hyperparameters, onnx_path, spec, Path(tmp),
                                            held_out=dataset.test.inputs)
        return write_bundle(
            out_dir, onnx_path=onnx_path, spec=spec, architecture=trained.architecture,
            hyperparameters=trained.hyperparameters,
            data={"source": dataset.source, "path": data_label or dataset.path, "digest": dataset.digest,
                  "rows": dataset.rows(), "split": dataset.split, "skipped_lines": dataset.bad_lines.count},
            metrics=metrics, parity=parity, graphs=graphs, extra_files=extra_files, calibration=calibration_entry,
            training={"parameters": trained.parameters, "best_epoch": trained.best_epoch,
                      "epochs_run": len(trained.history), "seconds": trained.seconds, "processes": trained.processes,
                      "history": trained.history},
            extra_meta=extra_meta)


def save_gbdt_bundle(model: GbdtModel, metrics: dict[str, Any], dataset: Dataset, out_dir: str | Path) -> Path:
    """``save_bundle`` for LightGBM (``train/gbdt.py``): calibrate, export, prove parity, write."""
    spec = dataset.spec
    raw = {name: model.predict(part.inputs, spec)
           for name, part in (("train", dataset.train), ("val", dataset.val), ("test", dataset.test))}
    calibration, served, entry = calibrate_predictions(raw, dataset, metrics)
    with tempfile.TemporaryDirectory(prefix="bundle-") as tmp:
        onnx_path = export_gbdt(model, spec, Path(tmp) / "model.onnx", calibration=calibration)
        parity = gbdt_parity(model, onnx_path, spec, dataset.test.inputs, calibration)
        return write_bundle(
            out_dir, onnx_path=onnx_path, spec=spec, architecture="lightgbm",
            hyperparameters={**model.hyperparameters, "kept_tags": int(len(model.tags))},
            data={"source": dataset.source, "path": dataset.path, "digest": dataset.digest, "rows": dataset.rows(),
                  "split": dataset.split, "skipped_lines": dataset.bad_lines.count},
            metrics=served, parity=parity, calibration=entry,
            training={"trees": model.best_iteration, "seconds": model.seconds})

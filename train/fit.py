"""One model from a log folder to a served bundle: load, train, export lean ONNX, check parity, write.

A DeepFM bundle also gets its factorized graphs (``train/factorize.py``), checked against the lean one.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from bidder.factorized import GRAPH
from bidder.spec import FeatureSpec, default_spec, load_spec
from train.bundle import write_bundle
from train.data.dataset import Dataset, load_dataset
from train.export import check_parity, export_lean
from train.factorize import write_graphs
from train.trainer import TrainedModel, check_training, train_model

__all__ = ["fit_bundle", "save_bundle", "resolve_spec"]

log = logging.getLogger("train")


def fit_bundle(data_dir: str | Path, model: str, out_dir: str | Path, *, epochs: int | None = None, seed: int = 0,
               progress: bool = True, skip_bad_lines: bool = False, spec: FeatureSpec | str | Path | None = None,
               data_label: str | None = None, threads: int = 1, **hyperparameters: Any) -> Path:
    """Train ``model`` on the logs in ``data_dir`` and write its bundle to ``out_dir`` (returned).

    ``spec`` defaults to the bidder's iPinYou spec; ``data_label`` replaces the data path recorded in
    ``meta.json`` (for data generated into a temporary folder); ``threads`` is torch's thread count
    while training. Other keywords are hyper-parameters.
    """
    check_training(model, epochs, hyperparameters)  # before the data: a typo must not wait for featurizing
    feature_spec = resolve_spec(spec)
    dataset = load_dataset(data_dir, feature_spec, seed=seed, skip_bad_lines=skip_bad_lines, progress=progress)
    report_skipped(dataset)
    trained = train_model(dataset, model, epochs=epochs, seed=seed, progress=progress, threads=threads,
                          **hyperparameters)
    return save_bundle(trained, dataset, out_dir, data_label=data_label)


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
    """Export ``trained`` lean, prove parity on held-out rows, write the bundle; nothing is written on failure.

    ``extra_meta`` adds top-level ``meta.json`` entries (``train/compress.py``'s ``compression``).
    """
    spec = dataset.spec
    with tempfile.TemporaryDirectory(prefix="bundle-") as tmp:
        onnx_path = export_lean(trained.model, spec, trained.architecture, Path(tmp) / "model.onnx",
                                combiner=trained.hyperparameters["usertag_combiner"])
        parity = check_parity(trained.model, onnx_path, spec, dataset.test)
        graphs, extra_files = None, None
        # the others do not split into imp and candidate parts; FM + linear alone has no DNN to split
        if trained.architecture == "deepfm" and trained.hyperparameters.get("dnn_hidden_units"):
            extra_files, entry = write_graphs(onnx_path, spec, Path(tmp), held_out=dataset.test.inputs,
                                              combiner=trained.hyperparameters["usertag_combiner"])
            graphs = {GRAPH: entry}
        return write_bundle(
            out_dir, onnx_path=onnx_path, spec=spec, architecture=trained.architecture,
            hyperparameters=trained.hyperparameters,
            data={"source": dataset.source, "path": data_label or dataset.path, "digest": dataset.digest,
                  "rows": dataset.rows(), "split": dataset.split, "skipped_lines": dataset.bad_lines.count},
            metrics=trained.metrics, parity=parity, graphs=graphs, extra_files=extra_files,
            training={"parameters": trained.parameters, "best_epoch": trained.best_epoch,
                      "epochs_run": len(trained.history), "seconds": trained.seconds, "history": trained.history},
            extra_meta=extra_meta)

"""Writing a model bundle from training: the model's ``meta.json`` record (architecture, metrics, parity,
library versions) and its files, written through ``bidder.bundle`` (the format's one owner: file names,
format version, digests, staged writes).
"""
from __future__ import annotations

import datetime as dt
import platform
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import torch

from bidder import bundle as bundle_format
from bidder.bundle import META_FILE, MODEL_FILE, SPEC_FILE, Bundle, BundleError, file_sha256
from bidder.spec import FeatureSpec
from train._deepctr import VERSION as DEEPCTR_VERSION
from train.errors import TrainError
from train.export import OUTPUT

__all__ = ["MODEL_FILE", "SPEC_FILE", "META_FILE", "file_sha256", "install_bundle", "library_versions", "model_id",
           "open_bundle", "read_bundle", "write_bundle"]


def library_versions() -> dict[str, str]:
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "deepctr_torch": DEEPCTR_VERSION, "python": platform.python_version()}


def model_id(architecture: str, created: dt.datetime, onnx_sha256: str) -> str:
    return f"{architecture}-{created:%Y%m%d%H%M%S}-{onnx_sha256[:8]}"


def open_bundle(bundle: str | Path) -> Bundle:
    """An existing bundle, checked as the bidder checks it (``bidder.bundle.Bundle.open``); ``TrainError`` names
    what is missing or does not match."""
    bundle = Path(bundle)
    if not (bundle / MODEL_FILE).is_file() or not (bundle / META_FILE).is_file():
        raise TrainError(f"{bundle}: not a model bundle (needs {MODEL_FILE} and {META_FILE})")
    try:
        return Bundle.open(bundle)
    except BundleError as exc:
        raise TrainError(str(exc)) from None


def read_bundle(bundle: str | Path) -> tuple[dict[str, Any], FeatureSpec]:
    """(meta.json, spec) of an existing bundle (``open_bundle``)."""
    opened = open_bundle(bundle)
    return opened.meta, opened.spec


def write_bundle(out_dir: str | Path, *, onnx_path: Path, spec: FeatureSpec, architecture: str,
                 hyperparameters: dict[str, Any], data: dict[str, Any], metrics: dict[str, Any],
                 parity: dict[str, Any], training: dict[str, Any] | None = None,
                 graphs: dict[str, Any] | None = None, extra_files: dict[str, Path] | None = None,
                 calibration: dict[str, Any] | None = None, extra_meta: dict[str, Any] | None = None) -> Path:
    """Move ``onnx_path`` into ``out_dir`` as ``model.onnx`` with its spec and metadata; returns ``out_dir``.

    ``extra_files`` (name -> path) are copied in beside it and ``graphs`` becomes ``meta.json``'s entry
    describing them; ``extra_meta`` adds top-level entries (a compressed bundle's ``compression``).
    """
    created = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    sha = file_sha256(onnx_path)
    meta = {
        "model_id": model_id(architecture, created, sha),
        "architecture": architecture,
        "created": created.isoformat().replace("+00:00", "Z"),
        "spec_digest": spec.digest,
        "onnx_sha256": sha,
        "inputs": {name: [None, spec.input_width(name)] for name in spec.input_names},
        "output": OUTPUT,
        "hyperparameters": hyperparameters,
        "data": data,
        "metrics": metrics,
        "parity": parity,
        "versions": library_versions(),
    }
    if calibration is not None:
        meta["calibration"] = calibration
    if training is not None:
        meta["training"] = training
    meta["graphs"] = graphs or {}
    meta.update(extra_meta or {})
    files = {**(extra_files or {}), MODEL_FILE: onnx_path, SPEC_FILE: spec.to_json().encode()}
    return bundle_format.write_bundle(out_dir, files, meta)


def install_bundle(staged: Path, out_dir: Path) -> Path:
    """Copy the bundle in ``staged`` over ``out_dir`` (created if needed) as one write; files of ``out_dir`` that
    are not a bundle's (a catalog beside the model) stay. Returns ``out_dir``."""
    return bundle_format.install(staged, out_dir)

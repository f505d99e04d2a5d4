"""Writing a model bundle: ``model.onnx``, ``spec.json`` and ``meta.json`` in one directory.

A bundle may hold more graphs (a DeepFM bundle its factorized ones, ``train/factorize.py``), listed
under ``meta.json``'s ``graphs``. The files are written next to their final names and moved into
place only once all exist, ``meta.json`` last, so a reader (the bidder reloading its model) never
sees a half-written bundle, and a failed export leaves the previous bundle untouched.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import torch

from bidder.factorized import CANDIDATE_FILE, FACTORIZED_FILE
from bidder.retrieval import AD_TOWER_FILE, IMP_TOWER_FILE
from bidder.shading import MARKET_FILE
from bidder.spec import FeatureSpec, SpecError, load_spec
from train._deepctr import VERSION as DEEPCTR_VERSION
from train.errors import TrainError
from train.export import OUTPUT

__all__ = ["MODEL_FILE", "SPEC_FILE", "META_FILE", "library_versions", "model_id", "read_bundle", "replace_files",
           "write_bundle"]

MODEL_FILE, SPEC_FILE, META_FILE = "model.onnx", "spec.json", "meta.json"
# removed when a new bundle does not list them: they were built for the model it replaces
EXTRA_GRAPH_FILES = (CANDIDATE_FILE, FACTORIZED_FILE, IMP_TOWER_FILE, AD_TOWER_FILE, MARKET_FILE)


def library_versions() -> dict[str, str]:
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "deepctr_torch": DEEPCTR_VERSION, "python": platform.python_version()}


def model_id(architecture: str, created: dt.datetime, onnx_sha256: str) -> str:
    return f"{architecture}-{created:%Y%m%d%H%M%S}-{onnx_sha256[:8]}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_bundle(bundle: str | Path) -> tuple[dict[str, Any], FeatureSpec]:
    """(meta.json, spec) of an existing bundle whose model.onnx and spec.json match its meta.json.

    ``TrainError`` names what is missing or does not match.
    """
    bundle = Path(bundle)
    meta_path, model_path = bundle / META_FILE, bundle / MODEL_FILE
    if not model_path.is_file() or not meta_path.is_file():
        raise TrainError(f"{bundle}: not a model bundle (needs {MODEL_FILE} and {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrainError(f"{meta_path}: cannot read: {exc}") from None
    if not isinstance(meta, dict):
        raise TrainError(f"{meta_path}: expected a JSON object")
    if meta.get("onnx_sha256") not in (None, file_sha256(model_path)):
        raise TrainError(f"{model_path}: does not match meta.json's onnx_sha256")
    try:
        spec = load_spec(bundle)
    except SpecError as exc:
        raise TrainError(str(exc)) from None
    if meta.get("spec_digest") not in (None, spec.digest):
        raise TrainError(f"{bundle}: spec.json does not match meta.json's spec_digest")
    return meta, spec


def write_bundle(out_dir: str | Path, *, onnx_path: Path, spec: FeatureSpec, architecture: str,
                 hyperparameters: dict[str, Any], data: dict[str, Any], metrics: dict[str, Any],
                 parity: dict[str, Any], training: dict[str, Any] | None = None,
                 graphs: dict[str, Any] | None = None, extra_files: dict[str, Path] | None = None,
                 calibration: dict[str, Any] | None = None, extra_meta: dict[str, Any] | None = None) -> Path:
    """Move ``onnx_path`` into ``out_dir`` as ``model.onnx`` with its spec and metadata; returns ``out_dir``.

    ``extra_files`` (name -> path) are copied in beside it and ``graphs`` becomes ``meta.json``'s entry
    describing them; ``extra_meta`` adds top-level entries (a compressed bundle's ``compression``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
    if graphs:
        meta["graphs"] = graphs
    meta.update(extra_meta or {})
    extra_files = extra_files or {}
    staged = {name: out / f".{name}.tmp" for name in [*extra_files, MODEL_FILE, SPEC_FILE, META_FILE]}
    try:
        for name, path in extra_files.items():
            shutil.copyfile(path, staged[name])
        shutil.copyfile(onnx_path, staged[MODEL_FILE])
        staged[SPEC_FILE].write_text(spec.to_json())
        staged[META_FILE].write_text(json.dumps(meta, indent=2) + "\n")
        replace_files(out, staged)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    for name in EXTRA_GRAPH_FILES:  # a previous bundle's graphs that this one's meta.json no longer lists
        if name not in extra_files:
            (out / name).unlink(missing_ok=True)
    return out


def install_bundle(staged: Path, out_dir: Path) -> Path:
    """Copy the bundle in ``staged`` over ``out_dir`` (created if needed), every file, ``meta.json`` last;
    files of ``out_dir`` that ``staged`` lacks (a catalog beside the model) stay. Returns ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in staged.iterdir() if p.is_file() and p.name != META_FILE) + [META_FILE]
    with tempfile.TemporaryDirectory(prefix=".install-", dir=out_dir) as tmp:
        copies = {name: Path(tmp) / name for name in names}
        for name, path in copies.items():
            shutil.copyfile(staged / name, path)
        replace_files(out_dir, copies)
    return out_dir


def replace_files(out_dir: Path, staged: dict[str, Path]) -> None:
    """Move each staged file onto ``out_dir / name``, in order: put ``meta.json`` last, so the files
    it lists exist before a reader can see it list them."""
    for name, path in staged.items():
        os.replace(path, out_dir / name)

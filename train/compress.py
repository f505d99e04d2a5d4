"""Compressing a bundle: INT8 quantization, DNN neuron pruning, distillation and attention-head pruning.

``python -m train compress --bundle SRC --method METHOD --out DST [--data DIR]`` writes a normal
bundle (``bidder serve`` loads it unchanged) whose ``meta.json`` gains ``compression``: the method,
its settings, the source's model id, the size ratio of the two ``model.onnx`` files and, when test
rows are at hand (``--data``), the paired test AUC delta against the source with a bootstrap 95 %
interval.

Methods:

- ``int8-dynamic``: ONNX Runtime's dynamic quantization (weights int8, activations quantized per
  call). ``ops=dnn`` quantizes the DNN's matrix products only, ``ops=tables`` the embedding tables'
  Gathers only (uint8 with one scale per table, one DequantizeLinear after each Gather), ``ops=all`` both.
- ``int8-static``: ONNX Runtime's static quantization, activation ranges calibrated on training rows;
  QDQ or QOperator format, per channel or per tensor.
- ``int8-embeddings``: the hashed tables (most of the bundle's bytes) as int8 with one scale per row
  (``Gather`` on the int8 table, ``Cast``, ``Mul`` by the row's gathered scale) or as float16
  (``Gather`` then ``Cast``); the rest of the graph stays float32. Built as a torch module and
  exported, so its ONNX is checked against that module like any lean export (<= 1e-6).
- ``prune``: structured pruning of the DNN: whole neurons, ranked by mean activation times the norm
  of their outgoing weights on training rows, are removed, then a short fine-tune.
- ``distill``: a smaller student (a narrower DeepFM, or FM + linear with ``student=fm``) trained on
  ``label_weight * label + (1 - label_weight) * teacher probability`` (binary cross-entropy against
  that soft target is the same mix of the two losses); ``label_weight=1`` is the label-only control.
- ``heads``: AutoInt attention heads, ranked by how much validation log loss rises when each alone
  is removed; the least important are removed (their value projection zeroed and kept at zero while
  fine-tuning), and the exported graph computes only the kept heads.

The trainable methods start from the bundle's own ``model.onnx``: its weights are loaded back into the
deepctr model they came from (``deepctr_from_bundle``), which is proven equal to the source graph
(<= 1e-6) before anything else happens.

Factorized graphs (``candidate.onnx`` / ``factorized.onnx``, DeepFM with a DNN only): a pruned or
distilled DeepFM student is a float32 DeepFM like any other, and bundles whose tables alone are
compressed (``int8-embeddings``, ``int8-dynamic`` with ``ops=tables``) keep them compressed in the
factorized graphs too (``train/factorize.py`` dequantizes after the Gather as model.onnx does), so each
gets its own graphs, checked against its own ``model.onnx`` at export and again at load. A bundle
whose DNN is quantized gets none: the factorized graphs split the first DNN layer by sides and sum the
halves, so a graph that quantizes that layer's whole input at once cannot be reproduced to the
bidder's 1e-6 load-time tolerance, and float32 factorized layers beside it would make the bidder serve
other weights than its model.onnx. Such a bundle is scored row by row through its model.onnx.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

from bidder.factorized import random_inputs
from bidder.spec import FeatureSpec
from train.bundle import MODEL_FILE, read_bundle, write_bundle
from train.calibrate import Calibration
from train.data.dataset import Dataset, Split, load_dataset
from train.errors import TrainError
from train.factorize import bundle_graphs
from train.evaluate import binary_metrics, paired_auc_delta
from train.export import (CALIBRATION_SCALE, CALIBRATION_SHIFT, OUTPUT, Embeddings, LeanModel, check_parity,
                          export_module, graph_calibration, lean_module, serving_session)
from train.fit import report_skipped, save_bundle
from train.models import build_model, deepctr_input, parameter_count, resolve_hyperparameters
from train.trainer import TrainedModel, fit_epochs, split_metrics

__all__ = ["DEFAULT_CHAIN", "METHODS", "compress_bundle", "compress_chain", "check_method", "deepctr_from_bundle",
           "onnx_probabilities"]

log = logging.getLogger("train")

#: method -> (needs --data, default settings)
METHODS: dict[str, tuple[bool, dict[str, Any]]] = {
    "int8-dynamic": (False, {"ops": "dnn", "per_channel": True}),
    "int8-static": (True, {"format": "qdq", "ops": "dnn", "per_channel": True, "calibration_rows": 4096}),
    "int8-embeddings": (False, {"dtype": "int8", "scale": "fp16"}),
    "prune": (True, {"keep": 0.25, "epochs": 1, "lr": 2.5e-4, "importance_rows": 20000}),
    "distill": (True, {"student": "64,32", "embedding_dim": 8, "label_weight": 0.5, "epochs": 4}),
    "heads": (True, {"remove": 0.5, "epochs": 1, "lr": 2.5e-4, "importance_rows": 20000}),
}
_CHOICES = {"ops": ("dnn", "tables", "all"), "format": ("qdq", "qoperator"), "dtype": ("int8", "fp16"), "scale": ("fp16", "fp32")}
TRAINABLE = ("deepfm", "autoint", "logreg")  # architectures deepctr_from_bundle reads back
BOOTSTRAP = 1000


def check_method(method: str, settings: dict[str, str] | None = None, has_data: bool = True) -> dict[str, Any]:
    """The settings ``method`` runs with (defaults, then ``settings``); a bad method, name or value raises."""
    if method not in METHODS:
        raise TrainError(f"--method {method!r}: unknown; choose one of {', '.join(METHODS)}")
    needs_data, defaults = METHODS[method]
    if needs_data and not has_data:
        raise TrainError(f"--method {method} needs training rows: pass --data DIR")
    out = dict(defaults)
    for name, value in (settings or {}).items():
        if name not in defaults:
            raise TrainError(f"--set {name}=...: not a setting of {method} (known: {', '.join(sorted(defaults))})")
        default = defaults[name]
        try:
            if isinstance(default, bool):
                if str(value).lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                out[name] = str(value).lower() in ("true", "1")
            elif isinstance(default, int):
                out[name] = int(value)
            elif isinstance(default, float):
                out[name] = float(value)
            else:
                out[name] = str(value)
        except ValueError:
            raise TrainError(f"--set {name}={value}: expected {type(default).__name__}") from None
    for name, allowed in _CHOICES.items():
        if name in out and out[name] not in allowed:
            raise TrainError(f"--set {name}={out[name]}: choose one of {', '.join(allowed)}")
    for name in ("keep", "label_weight"):
        if name in out and not 0.0 <= out[name] <= 1.0:
            raise TrainError(f"--set {name}={out[name]}: must lie in [0, 1]")
    if "keep" in out and out["keep"] == 0.0:
        raise TrainError("--set keep=0: would remove every neuron")
    for name in ("epochs", "calibration_rows", "importance_rows", "embedding_dim"):
        if name in out and out[name] < (0 if name == "epochs" else 1):
            raise TrainError(f"--set {name}={out[name]}: must be positive")
    if "remove" in out and not out["remove"] > 0:
        raise TrainError(f"--set remove={out['remove']}: must be positive (a fraction < 1 or a count of heads)")
    if "student" in out:
        _student_units(out["student"])
    return out


def _student_units(text: str) -> list[int]:
    if text == "fm":
        return []
    try:
        units = [int(part) for part in text.split(",")]
    except ValueError:
        units = []
    if not units or any(u < 1 for u in units):
        raise TrainError(f"--set student={text}: expected 'fm' or hidden layer widths such as 64,32")
    return units


# -- the command --------------------------------------------------------------------------------------------
def compress_bundle(source: str | Path, method: str, out_dir: str | Path, *, data: str | Path | Dataset | None = None,
                    settings: dict[str, Any] | None = None, seed: int = 0, progress: bool = True,
                    threads: int = 1) -> dict[str, Any]:
    """Write ``method``'s compression of bundle ``source`` to ``out_dir``; returns its ``compression`` entry."""
    chosen = check_method(method, settings, has_data=data is not None)
    source = Path(source)
    meta, spec = read_bundle(source)
    architecture = meta.get("architecture")
    if method in ("prune", "distill", "heads", "int8-embeddings") and architecture not in TRAINABLE:
        raise TrainError(f"{source}: {method} reads the weights back into their model; supported for "
                         f"{', '.join(TRAINABLE)}, this bundle is {architecture!r}")
    if method == "heads" and architecture != "autoint":
        raise TrainError(f"{source}: heads prunes AutoInt attention heads, this bundle is {architecture!r}")
    if method == "prune" and architecture == "logreg":
        raise TrainError(f"{source}: prune removes DNN neurons, a logreg bundle has none")
    dataset = data if isinstance(data, Dataset) or data is None else _load(data, spec, seed, progress)
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        with tempfile.TemporaryDirectory(prefix="compress-") as tmp:
            entry = _compress(source, meta, spec, method, chosen, Path(out_dir), dataset, seed, progress, Path(tmp))
    finally:
        torch.set_num_threads(previous)
    carry_graphs(source, meta, Path(out_dir))
    return entry


#: graphs a compressed bundle is given as they are: they read the spec's features, not the CTR model's weights
#: (the win-price model, and the two towers of retrieval, trained with the source as teacher)
CARRIED_GRAPHS = ("market", "twotower")


def carry_graphs(source: Path, meta: dict[str, Any], out: Path) -> list[str]:
    """Copy ``CARRIED_GRAPHS`` of bundle ``source`` (whose meta.json is ``meta``) into the bundle written at ``out``:
    their files and their meta.json entries. Returns their names."""
    graphs = meta.get("graphs") or {}
    carried = [name for name in CARRIED_GRAPHS if isinstance(graphs.get(name), dict)]
    if not carried:
        return []
    out_meta = json.loads((out / "meta.json").read_text())
    for name in carried:
        entry = graphs[name]
        files = list(entry.get("files") or [])
        terms = entry.get("terms")
        if isinstance(terms, dict) and isinstance(terms.get("file"), str):
            files.append(terms["file"])
        for file in files:
            if not (source / file).is_file():
                raise TrainError(f"{source}: meta.json graphs.{name} lists {file}, which the bundle does not have")
            shutil.copyfile(source / file, out / file)  # the bundle load checks them against the entry's sha256
        out_meta.setdefault("graphs", {})[name] = entry
    (out / "meta.json").write_text(json.dumps(out_meta, indent=2) + "\n")
    return carried


#: what ``python -m train default`` ships: the trained DeepFM distilled into a 64,32 student, whose tables
#: are then stored as uint8 with a scale per table (README "Model compression" gives the study behind it)
DEFAULT_CHAIN: tuple[tuple[str, dict[str, str]], ...] = (("distill", {"student": "64,32"}),
                                                         ("int8-dynamic", {"ops": "tables"}))


def compress_chain(source: str | Path, steps: tuple[tuple[str, dict[str, Any]], ...], out_dir: str | Path, *,
                   data: Dataset, seed: int = 0, progress: bool = True, threads: int = 1) -> dict[str, Any]:
    """Apply ``steps`` ((method, settings) each) one after the other, from bundle ``source`` into ``out_dir``.

    The written bundle's ``compression`` spans the chain: ``method`` joins the steps' methods, ``steps``
    holds each step's own entry, and size ratio and paired test AUC delta are against ``source``. When
    the rows are the source's own (same digest), ``meta.json``'s ``data`` is the source's record.
    """
    if not steps:
        raise TrainError("compress_chain: no steps")
    for method, settings in steps:  # every step's settings checked before the first one trains
        check_method(method, {k: str(v) for k, v in settings.items()}, has_data=True)
    source = Path(source)
    source_meta, _ = read_bundle(source)
    entries = []
    with tempfile.TemporaryDirectory(prefix="compress-chain-") as tmp:
        current = source
        for k, (method, settings) in enumerate(steps):
            target = Path(out_dir) if k == len(steps) - 1 else Path(tmp) / f"step-{k}"
            step = compress_bundle(current, method, target, data=data, settings=settings, seed=seed,
                                   progress=progress, threads=threads)
            # a step's own parity (a student's ONNX vs its torch model; a quantized graph vs its source) is
            # kept: the written bundle's meta.json has only the last one
            entries.append({**step, "parity": read_bundle(target)[0].get("parity")})
            current = target
    entry = {"method": " + ".join(method for method, _ in steps), "settings": {}, "steps": entries,
             "source_model_id": source_meta.get("model_id"), "source_bytes": (source / MODEL_FILE).stat().st_size}
    if (source_meta.get("data") or {}).get("digest") == data.digest:
        meta_path = Path(out_dir) / "meta.json"
        meta = json.loads(meta_path.read_text())
        meta["data"] = source_meta["data"]
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    _finish_entry(Path(out_dir), source / MODEL_FILE, entry, data)
    return entry


def _load(data: str | Path, spec: FeatureSpec, seed: int, progress: bool) -> Dataset:
    dataset = load_dataset(data, spec, seed=seed, progress=progress)
    report_skipped(dataset)
    return dataset


def _compress(source: Path, meta: dict[str, Any], spec: FeatureSpec, method: str, settings: dict[str, Any],
              out: Path, dataset: Dataset | None, seed: int, progress: bool, tmp: Path) -> dict[str, Any]:
    started = time.perf_counter()
    src_model = source / MODEL_FILE
    entry: dict[str, Any] = {"method": method, "settings": settings, "source_model_id": meta.get("model_id"),
                             "source_bytes": src_model.stat().st_size}
    if method in ("int8-dynamic", "int8-static"):
        path = tmp / MODEL_FILE
        _quantize(src_model, path, method, settings, spec, dataset, seed)
        hp = meta.get("hyperparameters") or {}
        extra_files, graphs = None, None
        if method == "int8-dynamic" and settings["ops"] == "tables":  # float32 DNN: the graphs can equal it
            held_out = dataset.test if dataset is not None else _random_split(spec, seed)
            extra_files, graphs = bundle_graphs(meta["architecture"], hp, path, spec, tmp, held_out=held_out.inputs)
        write_bundle(out, onnx_path=path, spec=spec, architecture=meta["architecture"], hyperparameters=hp,
                     data=meta.get("data") or {}, metrics=_onnx_metrics(path, dataset),
                     parity=_quantized_parity(src_model, path, spec, dataset), training=meta.get("training"),
                     calibration=meta.get("calibration"), graphs=graphs, extra_files=extra_files,
                     extra_meta={"compression": entry})
    elif method == "int8-embeddings":
        teacher, hp, calibration = deepctr_from_bundle(source, meta, spec, dataset)
        lean = lean_module(teacher, spec, meta["architecture"], hp["usertag_combiner"], calibration)
        lean.embeddings = QuantizedEmbeddings(lean.embeddings, settings["dtype"], settings["scale"])
        path = export_module(lean, spec, tmp / MODEL_FILE)
        held_out = dataset.test if dataset is not None else _random_split(spec, seed)
        parity = check_parity(lean, path, spec, held_out)
        # the compressed tables stay compressed in the factorized graphs, which equal this model.onnx
        extra_files, graphs = bundle_graphs(meta["architecture"], hp, path, spec, tmp, held_out=held_out.inputs)
        write_bundle(out, onnx_path=path, spec=spec, architecture=meta["architecture"], hyperparameters=hp,
                     data=meta.get("data") or {}, metrics=_onnx_metrics(path, dataset), parity=parity,
                     training=meta.get("training"), calibration=meta.get("calibration"), graphs=graphs,
                     extra_files=extra_files, extra_meta={"compression": entry})
    else:
        # a trained student is calibrated anew on the validation split (save_bundle), like any trained model
        teacher, hp, _ = deepctr_from_bundle(source, meta, spec, dataset)
        build = {"prune": _prune, "distill": _distill, "heads": _prune_heads}[method]
        trained, details = build(teacher, hp, meta, spec, dataset, settings, seed, progress, src_model)
        entry["details"] = details
        trained.seconds = round(time.perf_counter() - started, 2)
        save_bundle(trained, dataset, out, extra_meta={"compression": entry})
    _finish_entry(out, src_model, entry, dataset)
    return entry


def _finish_entry(out: Path, src_model: Path, entry: dict[str, Any], dataset: Dataset | None) -> None:
    """Size ratio and paired test AUC delta into ``entry`` and the written ``meta.json``."""
    model = out / MODEL_FILE
    entry["bytes"] = model.stat().st_size
    entry["size_ratio"] = round(entry["bytes"] / entry["source_bytes"], 4)
    if dataset is not None and len(dataset.test):
        inputs = dataset.test.inputs
        entry["paired_test_auc"] = paired_auc_delta(dataset.test.labels, onnx_probabilities(src_model, inputs),
                                                    onnx_probabilities(model, inputs), resamples=BOOTSTRAP)
    else:
        entry["paired_test_auc"] = None  # no test rows given (--data)
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["compression"] = entry
    staged = out / ".meta.json.tmp"
    staged.write_text(json.dumps(meta, indent=2) + "\n")
    staged.replace(meta_path)


def onnx_probabilities(path: str | Path, inputs: dict[str, np.ndarray], batch: int = 8192) -> np.ndarray:
    """Click probabilities of a bundle graph for all rows of ``inputs``, via the serving session options."""
    session = serving_session(path)
    n = len(next(iter(inputs.values())))
    parts = [session.run([OUTPUT], {k: np.ascontiguousarray(v[i:i + batch]) for k, v in inputs.items()})[0].reshape(-1)
             for i in range(0, n, batch)]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def _onnx_metrics(path: Path, dataset: Dataset | None) -> dict[str, Any]:
    if dataset is None:
        return {}
    return {name: binary_metrics(part.labels, onnx_probabilities(path, part.inputs))
            for name, part in (("val", dataset.val), ("test", dataset.test)) if len(part)}


def _random_split(spec: FeatureSpec, seed: int, rows: int = 2048) -> Split:
    """Random valid rows, for a parity check when no data was given."""
    return Split(random_inputs(spec, rows, np.random.default_rng(seed)), np.zeros(rows, dtype=np.float32))


# -- reading a bundle back into its model -----------------------------------------------------------------------
def deepctr_from_bundle(bundle: Path, meta: dict[str, Any], spec: FeatureSpec,
                        dataset: Dataset | None = None) -> tuple[nn.Module, dict[str, Any], Calibration | None]:
    """The deepctr model whose lean export is ``bundle``'s model.onnx, its hyper-parameters and the
    calibration the graph folds in (``train/calibrate.py``; None when it has none).

    Inverts ``train.export.lean_module``: the tables are split back into each field's vector and
    linear weight, the DNN, attention and output weights are copied. The result is checked against
    the graph (``check_parity``: held-out rows when ``dataset`` is given, else random valid rows).
    """
    architecture = meta.get("architecture")
    stored = dict(meta.get("hyperparameters") or {})
    kept_heads = stored.pop("att_kept_heads", None)
    no_dnn = stored.get("dnn_hidden_units") == []  # an FM + linear student
    if no_dnn:
        del stored["dnn_hidden_units"]
    try:
        hp = resolve_hyperparameters(architecture, stored)
    except TrainError as exc:
        raise TrainError(f"{bundle}: meta.json hyperparameters: {exc}") from None
    if no_dnn:
        hp["dnn_hidden_units"] = []
    model = build_model(architecture, spec, hp, seed=0)
    graph = onnx.load(str(bundle / MODEL_FILE))
    init = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}

    def need(name: str) -> np.ndarray:
        if name not in init:
            raise TrainError(f"{bundle / MODEL_FILE}: no initializer {name!r}; not a lean {architecture} graph "
                             "(already quantized bundles cannot be read back)")
        return init[name]

    state = model.state_dict()
    vectors = architecture != "logreg"
    dim = hp["embedding_dim"] if vectors else 0

    def put(key: str, value: np.ndarray) -> None:
        if key not in state or tuple(state[key].shape) != tuple(value.shape):
            raise TrainError(f"{bundle / MODEL_FILE}: {key} has shape {tuple(value.shape)}, "
                             f"meta.json's hyper-parameters give {tuple(state[key].shape) if key in state else 'none'}")
        state[key] = torch.from_numpy(np.array(value)).to(state[key].dtype)

    if spec.single_fields:
        single = need("embeddings.single_table")
        for f, start in zip(spec.single_fields, spec.sparse_offsets):
            rows = single[start:start + f.buckets]
            if vectors:
                put(f"embedding_dict.{f.name}.weight", rows[:, :dim])
            put(f"linear_model.embedding_dict.{f.name}.weight", rows[:, dim:dim + 1])
    for i, f in enumerate(spec.multi_fields):
        rows = need(f"embeddings.multi_table_{i}")
        if vectors:
            put(f"embedding_dict.{f.name}.weight", rows[:, :dim])
        put(f"linear_model.embedding_dict.{f.name}.weight", rows[:, dim:dim + 1])
    put("out.bias", need("bias").reshape(1))
    for k in range(len(hp.get("dnn_hidden_units", []))):
        put(f"dnn.linears.{k}.weight", need(f"head.dnn.layers.{k}.weight"))
        put(f"dnn.linears.{k}.bias", need(f"head.dnn.layers.{k}.bias"))
    if "dnn_linear.weight" in state:
        known = {"bias", CALIBRATION_SCALE, CALIBRATION_SHIFT} | {
            n for n in init if n.startswith(("embeddings.", "head."))}
        outs = [v for n, v in init.items() if n not in known and v.ndim == 2 and v.shape[1] == 1]
        if len(outs) != 1:
            raise TrainError(f"{bundle / MODEL_FILE}: expected one output weight [n, 1], found {len(outs)}")
        put("dnn_linear.weight", outs[0].T)
    for i in range(hp.get("att_layer_num", 0) if architecture == "autoint" else 0):
        prefix = f"head.attention.{i}"
        columns = None
        if kept_heads is not None:  # only the kept heads' columns are in the graph (train.export.AttentionLayer)
            size = hp["embedding_dim"] // hp["att_head_num"]
            columns = np.concatenate([np.arange(h * size, (h + 1) * size) for h in kept_heads[i]])
        for ours, theirs in (("w_query", "W_Query"), ("w_key", "W_key"), ("w_value", "W_Value")):
            weight = need(f"{prefix}.{ours}")
            if columns is not None:
                full = np.zeros((weight.shape[0], weight.shape[0]), dtype=np.float32)
                full[:, columns] = weight
                weight = full
            put(f"int_layers.{i}.{theirs}", weight)
        if hp["att_res"]:
            put(f"int_layers.{i}.W_Res", need(f"{prefix}.w_res"))
    model.load_state_dict(state)
    model.eval()
    if kept_heads is not None:
        for layer, kept in zip(model.int_layers, kept_heads):
            layer.kept_heads = list(kept)
        hp["att_kept_heads"] = kept_heads
    calibration = graph_calibration(init)  # the graph is the model's probabilities through this map
    check_parity(model, bundle / MODEL_FILE, spec, dataset.test if dataset is not None else _random_split(spec, 0),
                 calibration=calibration)
    return model, hp, calibration


# -- int8 ------------------------------------------------------------------------------------------------------
class _Calibration(CalibrationDataReader):
    """Training rows for static quantization's range calibration, in batches of 64."""

    def __init__(self, inputs: dict[str, np.ndarray], rows: int, batch: int = 64) -> None:
        n = min(rows, len(next(iter(inputs.values()))))
        self.batches = iter([{k: np.ascontiguousarray(v[i:min(i + batch, n)]) for k, v in inputs.items()}
                             for i in range(0, n, batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)

    def rewind(self) -> None:  # not needed: one calibration pass
        pass


def _quantize(src: Path, out: Path, method: str, settings: dict[str, Any], spec: FeatureSpec,
              dataset: Dataset | None, seed: int) -> None:
    """ONNX Runtime's quantizer on ``src``'s matrix products (``ops=dnn``), table Gathers (``ops=tables``) or both."""
    ops = {"dnn": ["MatMul", "Gemm"], "tables": ["Gather"], "all": ["MatMul", "Gemm", "Gather"]}[settings["ops"]]
    # the quantizer logs a line per tensor on the root logger, and a warning advising its shape-inference
    # pre-processing (for models with dynamic shapes in convolutions; it changes nothing here)
    logging.disable(logging.WARNING)
    try:
        _run_quantizer(src, out, method, settings, dataset, seed, ops)
    finally:
        logging.disable(logging.NOTSET)
    onnx.checker.check_model(str(out))


def _run_quantizer(src: Path, out: Path, method: str, settings: dict[str, Any], dataset: Dataset | None, seed: int,
                   ops: list[str]) -> None:
    if method == "int8-dynamic":
        quantize_dynamic(str(src), str(out), per_channel=settings["per_channel"], weight_type=QuantType.QInt8,
                         op_types_to_quantize=ops)
    else:
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(dataset.train))[:settings["calibration_rows"]]
        reader = _Calibration({k: v[np.sort(order)] for k, v in dataset.train.inputs.items()},
                              settings["calibration_rows"])
        quantize_static(str(src), str(out), reader,
                        quant_format=QuantFormat.QDQ if settings["format"] == "qdq" else QuantFormat.QOperator,
                        per_channel=settings["per_channel"], weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8, op_types_to_quantize=ops)


def _quantized_parity(src: Path, out: Path, spec: FeatureSpec, dataset: Dataset | None) -> dict[str, Any]:
    """What a quantized graph can be checked against: how far it moves from the float32 source."""
    rows = dataset.test if dataset is not None else _random_split(spec, 0)
    n = min(2048, len(rows))
    inputs = {k: v[:n] for k, v in rows.inputs.items()}
    diff = np.abs(onnx_probabilities(out, inputs).astype(np.float64) - onnx_probabilities(src, inputs))
    return {"reference": "float32 source model.onnx (quantization has no exact reference)",
            "max_abs_diff_from_source": float(diff.max()), "mean_abs_diff_from_source": float(diff.mean()),
            "rows": n}


class QuantizedEmbeddings(Embeddings):
    """``Embeddings`` whose tables are int8 with one scale per row, or float16.

    A multi field's count column (1 per tag, 0 for padding) is not stored: only the mean combiner reads
    it, and then it is ``index != 0``.
    """

    def __init__(self, source: Embeddings, dtype: str, scale_dtype: str) -> None:
        nn.Module.__init__(self)
        self.names, self.has_single, self.n_multi = source.names, source.has_single, source.n_multi
        self.mean, self.dim, self.dtype = source.mean, source.dim, dtype
        self.scale_dtype = torch.float16 if scale_dtype == "fp16" else torch.float32
        tables = (["single_table"] if self.has_single else []) + [f"multi_table_{i}" for i in range(self.n_multi)]
        if self.has_single:
            self.register_buffer("single_offsets", source.single_offsets.clone())
        for name in tables:
            table = getattr(source, name)
            if name.startswith("multi"):
                table = table[:, :-1]
            if dtype == "fp16":
                self.register_buffer(f"{name}_fp16", table.half())
            else:
                scale = table.abs().amax(dim=1, keepdim=True) / 127.0
                scale = scale.to(self.scale_dtype)  # the stored scale is what quantizes, so rounding stays exact
                safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
                self.register_buffer(f"{name}_int8", torch.clamp(torch.round(table / safe), -127, 127).to(torch.int8))
                self.register_buffer(f"{name}_scale", scale)

    def gather(self, table: str, index: torch.Tensor) -> torch.Tensor:
        if self.dtype == "fp16":
            rows = F.embedding(index, getattr(self, f"{table}_fp16")).float()
        else:
            rows = F.embedding(index, getattr(self, f"{table}_int8")).float()
            rows = rows * F.embedding(index, getattr(self, f"{table}_scale")).float()
        if self.mean and table.startswith("multi"):
            rows = torch.cat([rows, (index != 0).unsqueeze(-1).float()], dim=-1)
        return rows


# -- pruning, distillation, head pruning ---------------------------------------------------------------------------
def _tuning_hp(hp: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    tuned = dict(hp)
    tuned["epochs"] = max(1, settings["epochs"])
    if "lr" in settings:
        tuned["lr"] = settings["lr"]
    return tuned


def _trained(architecture: str, model: nn.Module, hp: dict[str, Any], dataset: Dataset, history: list[dict],
             best_epoch: int) -> TrainedModel:
    return TrainedModel(architecture, model, hp, split_metrics(model, dataset), history, best_epoch)


def _dnn_input_sample(model: nn.Module, dataset: Dataset, rows: int, seed: int) -> torch.Tensor:
    index = np.sort(np.random.default_rng(seed).permutation(len(dataset.train))[:rows])
    x = torch.from_numpy(deepctr_input({k: v[index] for k, v in dataset.train.inputs.items()}, dataset.spec))
    captured: list[torch.Tensor] = []
    hook = model.dnn.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        hook.remove()
    return captured[0]


def _prune(teacher: nn.Module, hp: dict[str, Any], meta: dict[str, Any], spec: FeatureSpec, dataset: Dataset,
           settings: dict[str, Any], seed: int, progress: bool, src_model: Path) -> tuple[TrainedModel, dict]:
    """Remove the least important neurons of every DNN layer (keep a ``keep`` fraction), then fine-tune."""
    architecture = meta["architecture"]
    units = hp["dnn_hidden_units"]
    if not units:
        raise TrainError("prune: this bundle's model has no DNN layers")
    h = _dnn_input_sample(teacher, dataset, settings["importance_rows"], seed)
    linears = list(teacher.dnn.linears)
    out_w = teacher.dnn_linear.weight.detach()[0]  # the deep output is the last columns of dnn_linear's input
    deep_start = out_w.shape[0] - units[-1]
    kept: list[torch.Tensor] = []
    with torch.no_grad():
        for k, layer in enumerate(linears):
            h = torch.relu(layer(h))
            outgoing = (linears[k + 1].weight.norm(dim=0) if k + 1 < len(linears) else out_w[deep_start:].abs())
            importance = h.mean(dim=0) * outgoing
            n_keep = max(1, math.ceil(settings["keep"] * layer.out_features))
            kept.append(torch.sort(torch.argsort(importance, descending=True)[:n_keep]).values)
    pruned_hp = {**hp, "dnn_hidden_units": [len(k) for k in kept]}
    student = build_model(architecture, spec, pruned_hp, seed)
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    previous = torch.arange(linears[0].in_features)
    for k, rows in enumerate(kept):
        state[f"dnn.linears.{k}.weight"] = state[f"dnn.linears.{k}.weight"][rows][:, previous]
        state[f"dnn.linears.{k}.bias"] = state[f"dnn.linears.{k}.bias"][rows]
        previous = rows
    columns = torch.cat([torch.arange(deep_start), deep_start + kept[-1]])
    state["dnn_linear.weight"] = state["dnn_linear.weight"][:, columns]
    student.load_state_dict(state)
    _copy_kept_heads(teacher, student)
    history, best = fit_epochs(student, dataset, _tuning_hp(pruned_hp, settings), seed=seed, progress=progress,
                               desc="prune fine-tune", keep_start=True, grad_masks=_head_masks(student))
    details = {"dnn_hidden_units": {"before": units, "after": pruned_hp["dnn_hidden_units"]},
               "parameters": {"before": parameter_count(teacher), "after": parameter_count(student)},
               "fine_tune": history}
    return _trained(architecture, student, pruned_hp, dataset, history, best), details


def _distill(teacher: nn.Module, hp: dict[str, Any], meta: dict[str, Any], spec: FeatureSpec, dataset: Dataset,
             settings: dict[str, Any], seed: int, progress: bool, src_model: Path) -> tuple[TrainedModel, dict]:
    """A DeepFM student (narrow DNN, or FM + linear) on labels mixed with the teacher's probabilities."""
    units = _student_units(settings["student"])
    student_hp = resolve_hyperparameters("deepfm", {"embedding_dim": settings["embedding_dim"],
                                                    "usertag_combiner": hp["usertag_combiner"]})
    student_hp["dnn_hidden_units"] = units
    student_hp["epochs"] = max(1, settings["epochs"])
    weight = settings["label_weight"]
    targets = dataset.train.labels.astype(np.float64)
    if weight < 1.0:
        teacher_p = onnx_probabilities(src_model, dataset.train.inputs).astype(np.float64)
        targets = weight * targets + (1.0 - weight) * teacher_p
    student = build_model("deepfm", spec, student_hp, seed)
    rate = float(np.clip(targets.mean(), 1e-6, 1 - 1e-6))
    with torch.no_grad():
        student.out.bias.fill_(math.log(rate / (1 - rate)))
    history, best = fit_epochs(student, dataset, student_hp, seed=seed, progress=progress, desc="student",
                               targets=targets.astype(np.float32))
    details = {"student": {"architecture": "deepfm", "dnn_hidden_units": units,
                           "embedding_dim": settings["embedding_dim"]},
               "label_weight": weight, "teacher_architecture": meta["architecture"],
               "parameters": {"teacher": parameter_count(teacher), "student": parameter_count(student)}}
    return _trained("deepfm", student, student_hp, dataset, history, best), details


def _head_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gradient masks that keep removed heads' value columns at zero while fine-tuning."""
    masks = {}
    for i, layer in enumerate(getattr(model, "int_layers", [])):
        kept = getattr(layer, "kept_heads", None)
        if kept is not None:
            masks[f"int_layers.{i}.W_Value"] = _value_mask(layer, kept)
    return masks


def _value_mask(layer: nn.Module, kept: list[int]) -> torch.Tensor:
    mask = torch.zeros_like(layer.W_Value)
    size = layer.att_embedding_size
    for h in kept:
        mask[:, h * size:(h + 1) * size] = 1.0
    return mask


def _copy_kept_heads(teacher: nn.Module, student: nn.Module) -> None:
    for mine, theirs in zip(getattr(student, "int_layers", []), getattr(teacher, "int_layers", [])):
        if getattr(theirs, "kept_heads", None) is not None:
            mine.kept_heads = list(theirs.kept_heads)


def _prune_heads(teacher: nn.Module, hp: dict[str, Any], meta: dict[str, Any], spec: FeatureSpec, dataset: Dataset,
                 settings: dict[str, Any], seed: int, progress: bool, src_model: Path) -> tuple[TrainedModel, dict]:
    """Remove the AutoInt heads whose removal alone raises validation log loss least, then fine-tune."""
    layers = list(teacher.int_layers)
    heads = [(i, h) for i, layer in enumerate(layers)
             for h in (getattr(layer, "kept_heads", None) or range(layer.head_num))]
    remove = settings["remove"]
    count = int(round(remove * len(heads))) if remove < 1 else int(remove)
    count = min(count, len(heads) - len(layers))  # every layer keeps one head
    if count < 1:
        raise TrainError(f"heads: --set remove={remove} removes no head of {len(heads)}")
    n = min(settings["importance_rows"], len(dataset.val))
    x_val = torch.from_numpy(deepctr_input({k: v[:n] for k, v in dataset.val.inputs.items()}, spec))
    y_val = dataset.val.labels[:n]

    def logloss() -> float:
        with torch.no_grad():
            return float(binary_metrics(y_val, teacher(x_val).reshape(-1).numpy())["logloss"])

    base = logloss()
    cost: dict[tuple[int, int], float] = {}
    for i, h in heads:
        value = layers[i].W_Value
        size = layers[i].att_embedding_size
        saved = value.detach()[:, h * size:(h + 1) * size].clone()
        with torch.no_grad():
            value[:, h * size:(h + 1) * size] = 0.0
        cost[(i, h)] = logloss() - base
        with torch.no_grad():
            value[:, h * size:(h + 1) * size] = saved
    removed: list[tuple[int, int]] = []
    remaining = {i: [h for j, h in heads if j == i] for i in range(len(layers))}
    for i, h in sorted(cost, key=cost.get):
        if len(removed) == count:
            break
        if len(remaining[i]) > 1:
            remaining[i].remove(h)
            removed.append((i, h))
    student = teacher
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.kept_heads = remaining[i]
            layer.W_Value.mul_(_value_mask(layer, remaining[i]))
    pruned_hp = {**hp, "att_kept_heads": [remaining[i] for i in range(len(layers))]}
    history, best = fit_epochs(student, dataset, _tuning_hp(pruned_hp, settings), seed=seed, progress=progress,
                               desc="heads fine-tune", keep_start=True, grad_masks=_head_masks(student))
    details = {"heads": {"before": len(heads), "after": len(heads) - len(removed)},
               "removed": [list(pair) for pair in removed],
               "val_logloss_increase_alone": {f"{i}.{h}": round(c, 6) for (i, h), c in sorted(cost.items())},
               "fine_tune": history}
    return _trained("autoint", student, pruned_hp, dataset, history, best), details

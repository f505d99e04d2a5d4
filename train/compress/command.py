"""The ``compress`` command: a method's settings checked, the bundle read, the method run, the compressed
bundle written (with the graphs it carries over) and its ``compression`` entry measured; a chain of methods."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bidder.bundle import Bundle, add_graph, update_meta
from bidder.spec import FeatureSpec
from train.bundle import MODEL_FILE, open_bundle, read_bundle, write_bundle
from train.compress.common import onnx_metrics, onnx_probabilities, random_split
from train.compress.distill import distill, student_units
from train.compress.embeddings import QuantizedEmbeddings
from train.compress.heads import prune_heads
from train.compress.int8 import quantize, quantized_parity
from train.compress.prune import prune_neurons
from train.compress.readback import deepctr_from_bundle
from train.data.dataset import Dataset, load_dataset
from train.errors import TrainError
from train.evaluate import paired_auc_delta
from train.export import check_parity, export_module, lean_module
from train.factorize import bundle_graphs
from train.fit import report_skipped, save_bundle

__all__ = ["CARRIED_GRAPHS", "DEFAULT_CHAIN", "METHODS", "carry_graphs", "check_method", "compress_bundle",
           "compress_chain"]


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
        student_units(out["student"])
    return out


def compress_bundle(source: str | Path, method: str, out_dir: str | Path, *, data: str | Path | Dataset | None = None,
                    settings: dict[str, Any] | None = None, seed: int = 0, progress: bool = True,
                    threads: int = 1) -> dict[str, Any]:
    """Write ``method``'s compression of bundle ``source`` to ``out_dir``; returns its ``compression`` entry."""
    chosen = check_method(method, settings, has_data=data is not None)
    opened = open_bundle(source)
    source, meta, spec = opened.path, opened.meta, opened.spec
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
    carry_graphs(opened, Path(out_dir))
    return entry


#: graphs a compressed bundle is given as they are: they read the spec's features, not the CTR model's weights
#: (the win-price model, and the two towers of retrieval, trained with the source as teacher)
CARRIED_GRAPHS = ("market", "twotower")


def carry_graphs(source: Bundle, out: Path) -> list[str]:
    """Add ``CARRIED_GRAPHS`` of bundle ``source`` to the bundle written at ``out``: their files and their meta.json
    entries, as they are. Returns their names."""
    carried = [name for name in CARRIED_GRAPHS if source.graph(name) is not None]
    for name in carried:
        add_graph(out, name, {file: source.file(file) for file in source.graph_files(name)}, source.graph(name))
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
        update_meta(out_dir, {"data": source_meta["data"]})
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
        quantize(src_model, path, method, settings, spec, dataset, seed)
        hp = meta.get("hyperparameters") or {}
        extra_files, graphs = None, None
        if method == "int8-dynamic" and settings["ops"] == "tables":  # float32 DNN: the graphs can equal it
            held_out = dataset.test if dataset is not None else random_split(spec, seed)
            extra_files, graphs = bundle_graphs(meta["architecture"], hp, path, spec, tmp, held_out=held_out.inputs)
        write_bundle(out, onnx_path=path, spec=spec, architecture=meta["architecture"], hyperparameters=hp,
                     data=meta.get("data") or {}, metrics=onnx_metrics(path, dataset),
                     parity=quantized_parity(src_model, path, spec, dataset), training=meta.get("training"),
                     calibration=meta.get("calibration"), graphs=graphs, extra_files=extra_files,
                     extra_meta={"compression": entry})
    elif method == "int8-embeddings":
        teacher, hp, calibration = deepctr_from_bundle(source, meta, spec, dataset)
        lean = lean_module(teacher, spec, meta["architecture"], hp["usertag_combiner"], calibration)
        lean.embeddings = QuantizedEmbeddings(lean.embeddings, settings["dtype"], settings["scale"])
        path = export_module(lean, spec, tmp / MODEL_FILE)
        held_out = dataset.test if dataset is not None else random_split(spec, seed)
        parity = check_parity(lean, path, spec, held_out)
        # the compressed tables stay compressed in the factorized graphs, which equal this model.onnx
        extra_files, graphs = bundle_graphs(meta["architecture"], hp, path, spec, tmp, held_out=held_out.inputs)
        write_bundle(out, onnx_path=path, spec=spec, architecture=meta["architecture"], hyperparameters=hp,
                     data=meta.get("data") or {}, metrics=onnx_metrics(path, dataset), parity=parity,
                     training=meta.get("training"), calibration=meta.get("calibration"), graphs=graphs,
                     extra_files=extra_files, extra_meta={"compression": entry})
    else:
        # a trained student is calibrated anew on the validation split (save_bundle), like any trained model
        teacher, hp, _ = deepctr_from_bundle(source, meta, spec, dataset)
        build = {"prune": prune_neurons, "distill": distill, "heads": prune_heads}[method]
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
    update_meta(out, {"compression": entry})

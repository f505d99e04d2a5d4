"""Reading a bundle's ``model.onnx`` back into the deepctr model it was exported from (``deepctr_from_bundle``),
where the trainable methods (``prune``, ``distill``, ``heads``, ``int8-embeddings``) start."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import numpy_helper

from bidder.spec import FeatureSpec
from train.bundle import MODEL_FILE
from train.calibrate import Calibration
from train.compress.common import random_split
from train.data.dataset import Dataset
from train.errors import TrainError
from train.export import CALIBRATION_SCALE, CALIBRATION_SHIFT, check_parity, graph_calibration
from train.models import build_model, resolve_hyperparameters

__all__ = ["deepctr_from_bundle"]


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
    check_parity(model, bundle / MODEL_FILE, spec, dataset.test if dataset is not None else random_split(spec, 0),
                 calibration=calibration)
    return model, hp, calibration

"""Gradient-boosted trees (LightGBM) on the same featurized rows, served as an ONNX graph with the bidder's inputs.

The features are the featurizer's own: each single-valued field's hashed index is a LightGBM categorical
column (its native categorical splits: a split sends a set of indices left), and the multi-valued ``usertag``
becomes one 0/1 column per tag index seen at least ``min_tag_count`` times in training (a tree cannot read
a set of indices; a multi-hot of every one of its 4,096 buckets would be 4,096 mostly empty columns). The
raw fields through LightGBM's categorical handling would be the same columns up to hash collisions, so they
are not a second variant here.

Export: onnxmltools converts the booster (``TreeEnsembleClassifier``, ai.onnx.ml), with its post-transform
set to none so the graph reads the raw margin; around it the graph turns the int64 inputs ``sparse`` and
``usertag`` into the float feature matrix (a cast; an Equal against the kept tags and a ReduceMax over
the tag slots), then applies the calibration (``calibration_scale``/``calibration_shift``, as the neural
graphs do) and the sigmoid: output ``ctr [batch, 1]``, so the bidder's row scorer serves it unchanged.
Nothing factorizes: every tree reads imp and candidate fields together.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bidder.spec import FeatureSpec
from train.calibrate import Calibration
from train.data.dataset import Dataset
from train.errors import ParityError, TrainError
from train.evaluate import binary_metrics, oracle_metrics
from train.export import CALIBRATION_SCALE, CALIBRATION_SHIFT, OPSET, OUTPUT, PARITY_ROWS, PARITY_TOLERANCE, \
    serving_session

__all__ = ["DEFAULTS", "GbdtModel", "check_gbdt", "export_gbdt", "gbdt_parity", "train_gbdt"]

#: LightGBM settings (``--set lightgbm.NAME=VALUE``); trees are added until validation AUC stops rising for
#: ``early_stopping_rounds`` rounds, at most ``n_estimators``. The categorical ones regularise hard: hashed ids with
#: a few clicks each are what a categorical split overfits. Picked by validation AUC on 200k synthetic rows (seed
#: 2013) among eight settings: num_leaves 63, cat_smooth 20, cat_l2 10, max_cat_threshold 64, min_data_per_group
#: 200 stopped after 14 trees at validation AUC 0.686; these reached 0.739 (docs/training.md, "The model study").
DEFAULTS: dict[str, Any] = {"n_estimators": 2000, "learning_rate": 0.05, "num_leaves": 15, "min_child_samples": 200,
                            "cat_smooth": 500.0, "cat_l2": 200.0, "max_cat_threshold": 8, "min_data_per_group": 2000,
                            "reg_lambda": 1.0, "feature_fraction": 0.8, "early_stopping_rounds": 50,
                            "min_tag_count": 20}
_ML_OPSET = 3
_CONVERTER_OPSET = 15  # the highest main opset onnxmltools 1.16 converts LightGBM for; the wrapper graph uses OPSET


@dataclass
class GbdtModel:
    booster: Any                 # lightgbm.Booster
    tags: np.ndarray             # the usertag indices with a column, in column order
    hyperparameters: dict[str, Any]
    best_iteration: int
    seconds: float = 0.0

    def features(self, inputs: dict[str, np.ndarray], spec: FeatureSpec) -> np.ndarray:
        """The float32 matrix the trees read: the single fields' indices, then a 0/1 column per kept tag."""
        return gbdt_features(inputs, spec, self.tags)

    def raw_margin(self, inputs: dict[str, np.ndarray], spec: FeatureSpec) -> np.ndarray:
        return self.booster.predict(self.features(inputs, spec), raw_score=True, num_iteration=self.best_iteration)

    def predict(self, inputs: dict[str, np.ndarray], spec: FeatureSpec) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.raw_margin(inputs, spec)))


def check_gbdt(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """``DEFAULTS`` with ``overrides`` (command-line strings allowed); bad names or values raise TrainError."""
    hp = dict(DEFAULTS)
    for name, value in (overrides or {}).items():
        if name not in hp:
            raise TrainError(f"hyper-parameter {name!r} is not used by lightgbm (known: {', '.join(sorted(hp))})")
        kind = type(DEFAULTS[name])
        try:
            number = float(value)
            if kind is int and not number.is_integer():
                raise ValueError
            hp[name] = kind(number)
        except (TypeError, ValueError):
            raise TrainError(f"hyper-parameter {name!r}: expected {kind.__name__}, got {value!r}") from None
        if not hp[name] > 0:
            raise TrainError(f"hyper-parameter {name!r} must be positive, got {value!r}")
    if not 0 < hp["feature_fraction"] <= 1:
        raise TrainError(f"hyper-parameter 'feature_fraction' must be in (0, 1], got {hp['feature_fraction']!r}")
    return hp


def gbdt_features(inputs: dict[str, np.ndarray], spec: FeatureSpec, tags: np.ndarray) -> np.ndarray:
    columns = []
    if spec.single_fields:
        columns.append(inputs[spec.input_names[0]].astype(np.float32))
    for f in spec.multi_fields:
        slots = inputs[f.name]
        columns.append((slots[:, :, None] == tags[None, None, :]).any(axis=1).astype(np.float32))
    return np.concatenate(columns, axis=1)


def _kept_tags(dataset: Dataset, min_count: int) -> np.ndarray:
    if len(dataset.spec.multi_fields) > 1:
        raise TrainError("lightgbm: the spec has more than one multi-valued field; one is supported")
    if not dataset.spec.multi_fields:
        return np.zeros(0, np.int64)
    slots = dataset.train.inputs[dataset.spec.multi_fields[0].name]
    counts = np.bincount(slots.reshape(-1), minlength=dataset.spec.multi_fields[0].buckets)
    counts[0] = 0  # padding
    return np.flatnonzero(counts >= min_count).astype(np.int64)


def _params(hp: dict[str, Any], seed: int, threads: int) -> dict[str, Any]:
    return {"objective": "binary", "learning_rate": hp["learning_rate"], "num_leaves": hp["num_leaves"],
            "min_child_samples": hp["min_child_samples"], "cat_smooth": hp["cat_smooth"], "cat_l2": hp["cat_l2"],
            "max_cat_threshold": hp["max_cat_threshold"], "min_data_per_group": hp["min_data_per_group"],
            "reg_lambda": hp["reg_lambda"], "feature_fraction": hp["feature_fraction"], "metric": "auc",
            "seed": seed, "deterministic": True, "num_threads": max(1, int(threads)), "verbose": -1}


def train_gbdt(dataset: Dataset, *, seed: int = 0, threads: int = 1, progress: bool = True,
               **overrides: Any) -> tuple[GbdtModel, dict[str, dict]]:
    """Boost on ``dataset.train`` with early stopping on validation AUC; the model and its split metrics."""
    import lightgbm as lgb
    from tqdm import tqdm

    hp = check_gbdt(overrides)
    started = time.perf_counter()
    spec = dataset.spec
    tags = _kept_tags(dataset, hp["min_tag_count"])
    categorical = list(range(len(spec.single_fields)))
    train = lgb.Dataset(gbdt_features(dataset.train.inputs, spec, tags), dataset.train.labels,
                        categorical_feature=categorical, free_raw_data=True)
    val = lgb.Dataset(gbdt_features(dataset.val.inputs, spec, tags), dataset.val.labels, reference=train,
                      categorical_feature=categorical)
    with tqdm(total=hp["n_estimators"], desc="lightgbm", unit="tree", disable=not progress, leave=False) as bar:
        booster = lgb.train(_params(hp, seed, threads), train, num_boost_round=hp["n_estimators"], valid_sets=[val],
                            callbacks=[lgb.early_stopping(hp["early_stopping_rounds"], verbose=False),
                                       lambda env: bar.update(1)])
    model = GbdtModel(booster, tags, hp, max(1, booster.best_iteration or booster.current_iteration()))
    model.seconds = round(time.perf_counter() - started, 2)
    metrics = {name: binary_metrics(part.labels, model.predict(part.inputs, spec))
               for name, part in (("train", dataset.train), ("val", dataset.val), ("test", dataset.test))}
    if dataset.test.pctr_true is not None:
        metrics["oracle"] = oracle_metrics(dataset.test.labels, dataset.test.pctr_true)
    return model, metrics


def export_gbdt(model: GbdtModel, spec: FeatureSpec, path: str | Path, *, calibration: Calibration) -> Path:
    """The serving graph: int64 ``sparse``/``usertag`` -> features -> trees (raw margin) -> calibration -> sigmoid."""
    import onnxmltools
    from onnxmltools.convert.common.data_types import FloatTensorType

    width = len(spec.single_fields) + len(model.tags) * len(spec.multi_fields)
    converted = onnxmltools.convert_lightgbm(model.booster,
                                             initial_types=[("features", FloatTensorType([None, width]))],
                                             zipmap=False, target_opset=_CONVERTER_OPSET)
    trees = [n for n in converted.graph.node if n.op_type == "TreeEnsembleClassifier"]
    if len(trees) != 1:
        raise TrainError(f"lightgbm export: expected one TreeEnsembleClassifier from onnxmltools, got {len(trees)}")
    tree = trees[0]
    for attribute in tree.attribute:
        if attribute.name == "post_transform":
            attribute.s = b"NONE"  # the raw margin: calibration and the sigmoid follow in the graph
    del tree.output[:]
    tree.output.extend(["tree_label", "tree_scores"])
    del tree.input[:]
    tree.input.append("features")
    nodes, initializers = [], [
        numpy_helper.from_array(np.array([[calibration.scale]], np.float32), CALIBRATION_SCALE),
        numpy_helper.from_array(np.array([[calibration.shift]], np.float32), CALIBRATION_SHIFT),
        numpy_helper.from_array(np.array([1], np.int64), "margin_start"),
        numpy_helper.from_array(np.array([2], np.int64), "margin_end"),
        numpy_helper.from_array(np.array([1], np.int64), "axis_1"),
    ]
    parts = []
    if spec.single_fields:
        nodes.append(helper.make_node("Cast", [spec.input_names[0]], ["single_features"], to=TensorProto.FLOAT))
        parts.append("single_features")
    for i, f in enumerate(spec.multi_fields):
        initializers.append(numpy_helper.from_array(model.tags.reshape(1, 1, -1), f"{f.name}_kept"))
        nodes += [helper.make_node("Unsqueeze", [f.name, "axis_2"], [f"{f.name}_slots"]),
                  helper.make_node("Equal", [f"{f.name}_slots", f"{f.name}_kept"], [f"{f.name}_hits"]),
                  helper.make_node("Cast", [f"{f.name}_hits"], [f"{f.name}_hits_float"], to=TensorProto.FLOAT),
                  helper.make_node("ReduceMax", [f"{f.name}_hits_float"], [f"{f.name}_features"], axes=[1],
                                   keepdims=0)]
        parts.append(f"{f.name}_features")
    if spec.multi_fields:
        initializers.append(numpy_helper.from_array(np.array([2], np.int64), "axis_2"))
    nodes.append(helper.make_node("Concat", parts, ["features"], axis=1) if len(parts) > 1
                 else helper.make_node("Identity", parts, ["features"]))
    nodes += [tree,
              helper.make_node("Slice", ["tree_scores", "margin_start", "margin_end", "axis_1"], ["margin"]),
              helper.make_node("Mul", ["margin", CALIBRATION_SCALE], ["margin_scaled"]),
              helper.make_node("Add", ["margin_scaled", CALIBRATION_SHIFT], ["logit"]),
              helper.make_node("Sigmoid", ["logit"], [OUTPUT])]
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", spec.input_width(name)])
              for name in spec.input_names]
    output = helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", 1])
    graph = helper.make_graph(nodes, "lightgbm", inputs, [output], initializers)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                         helper.make_opsetid("ai.onnx.ml", _ML_OPSET)],
                                   producer_name="train.gbdt")
    onnx_model.ir_version = 8
    onnx.checker.check_model(onnx_model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(onnx_model, str(path))
    return path


def gbdt_parity(model: GbdtModel, path: str | Path, spec: FeatureSpec, inputs: dict[str, np.ndarray],
                calibration: Calibration, *, rows: int = PARITY_ROWS, batch_sizes: tuple[int, ...] = (1, 64),
                tolerance: float = PARITY_TOLERANCE) -> dict[str, Any]:
    """Max |LightGBM (float64, calibrated) - ONNX Runtime| over held-out rows, at each batch size and all at once."""
    n = min(rows, len(next(iter(inputs.values()))))
    if n == 0:
        raise ParityError("parity check needs held-out rows, got none")
    feeds = {name: np.ascontiguousarray(arr[:n]) for name, arr in inputs.items()}
    expected = 1.0 / (1.0 + np.exp(-(calibration.scale * model.raw_margin(feeds, spec) + calibration.shift)))
    session = serving_session(path)
    sizes = [b for b in batch_sizes if b < n] + [n]
    worst = 0.0
    for size in sizes:
        got = np.concatenate([session.run([OUTPUT], {k: v[i:i + size] for k, v in feeds.items()})[0].reshape(-1)
                              for i in range(0, n, size)])
        diff = float(np.max(np.abs(got.astype(np.float64) - expected)))
        if not np.isfinite(diff) or diff > tolerance:
            raise ParityError(f"{path}: ONNX Runtime differs from LightGBM by {diff:.3g} at batch size {size} over "
                              f"{n} rows (tolerance {tolerance:g})")
        worst = max(worst, diff)
    return {"max_abs_diff": worst, "rows": n, "batch_sizes": sizes, "tolerance": tolerance}

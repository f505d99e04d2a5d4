"""Logistic regression on hashed one-hot features plus explicit feature crosses: a reference, not a served model.

The classic CTR baseline before factorisation machines: one weight per field value and one per
(value, value) pair of chosen fields, fitted by L-BFGS (scikit-learn) with the L2 strength picked on
validation AUC. Given the field pairs the synthetic generator's true logit uses
(:data:`GENERATOR_CROSSES`), it measures how much of the oracle's AUC a model that already knows where
the interactions are can learn from the same rows: the learnable ceiling the deep models are compared
with. It reads the same featurized split as every other model and has no ONNX export.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp

from bidder.spec import FeatureSpec
from train.data.dataset import Dataset
from train.errors import TrainError
from train.evaluate import binary_metrics

__all__ = ["GENERATOR_CROSSES", "design_matrix", "fit_crossed_logreg"]

#: The interactions in ``train.data.synthetic``'s true logit, as pairs of spec fields.
GENERATOR_CROSSES: tuple[tuple[str, str], ...] = (
    ("advertiser", "domain"), ("creative", "slotvisibility"), ("hour", "region"), ("usertag", "advertiser"))

CROSS_BITS = 20                          # columns per cross: 2**20, hashed
C_GRID = (0.01, 0.03, 0.1)          # inverse L2 strengths tried, the best on validation AUC is kept
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # multiplicative hashing of a pair key into CROSS_BITS bits


def design_matrix(inputs: dict[str, np.ndarray], spec: FeatureSpec,
                  crosses: Sequence[tuple[str, str]] = ()) -> sp.csr_matrix:
    """One-hot columns for every bucket of every field, then ``2**CROSS_BITS`` hashed columns per cross.

    Padding entries of multi-valued fields (index 0) are left out; a single field's index 0 (missing)
    is a value like any other.
    """
    values = dict(_field_values(inputs, spec))
    multi = {f.name for f in spec.multi_fields}
    for a, b in crosses:
        for name in (a, b):
            if name not in values:
                raise TrainError(f"cross {a}x{b}: no field {name!r} in the spec")
        if a in multi and b in multi:
            raise TrainError(f"cross {a}x{b}: crosses of two multi-valued fields are not supported")
    n = len(next(iter(inputs.values())))
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    offset = 0
    for f in spec.fields:
        row, idx = values[f.name]
        rows.append(row)
        cols.append(idx + offset)
        offset += f.buckets
    for a, b in crosses:
        row, key = _pair_keys(values[a], values[b], spec.field(b).buckets, b_single=b not in multi)
        rows.append(row)
        cols.append(offset + (key * _GOLDEN >> np.uint64(64 - CROSS_BITS)).astype(np.int64))
        offset += 1 << CROSS_BITS
    row = np.concatenate(rows)
    col = np.concatenate(cols)
    return sp.csr_matrix((np.ones(len(row), dtype=np.float32), (row, col)), shape=(n, offset))


def fit_crossed_logreg(dataset: Dataset, crosses: Sequence[tuple[str, str]] = GENERATOR_CROSSES,
                       c_grid: Sequence[float] = C_GRID) -> dict[str, Any]:
    """Fit on ``dataset.train``, pick C on ``dataset.val``; return val/test metrics and the choice."""
    from sklearn.linear_model import LogisticRegression  # only this reference needs scikit-learn

    if dataset.train.labels.min() == dataset.train.labels.max():
        raise TrainError("the training split has one class only: nothing to fit")
    started = time.perf_counter()
    spec = dataset.spec
    x_train, x_val, x_test = (design_matrix(part.inputs, spec, crosses)
                              for part in (dataset.train, dataset.val, dataset.test))
    best: tuple[float, float, Any] | None = None
    for c in c_grid:
        model = LogisticRegression(C=c, max_iter=500, tol=1e-5).fit(x_train, dataset.train.labels)
        auc = binary_metrics(dataset.val.labels, _predict(model, x_val))["auc"]
        score = auc if auc is not None else -np.inf
        if best is None or score > best[0]:
            best = (score, c, model)
    assert best is not None
    _, c, model = best
    return {"crosses": [f"{a} × {b}" for a, b in crosses], "C": c,
            "parameters": int(np.count_nonzero(model.coef_)) + 1,
            "val": binary_metrics(dataset.val.labels, _predict(model, x_val)),
            "test": binary_metrics(dataset.test.labels, _predict(model, x_test)),
            "seconds": round(time.perf_counter() - started, 2)}


def _predict(model: Any, x: sp.csr_matrix) -> np.ndarray:
    return model.predict_proba(x)[:, 1].astype(np.float32) if x.shape[0] else np.zeros(0, np.float32)


def _field_values(inputs: dict[str, np.ndarray], spec: FeatureSpec):
    """(field name, (row numbers, bucket indices)) for every field, multi-valued padding dropped."""
    sparse = inputs[spec.input_names[0]]
    for column, f in enumerate(spec.single_fields):
        yield f.name, (np.arange(len(sparse)), sparse[:, column].astype(np.int64))
    for f in spec.multi_fields:
        block = inputs[f.name]
        row, pos = np.nonzero(block)
        yield f.name, (row, block[row, pos].astype(np.int64))


def _pair_keys(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], b_buckets: int,
               b_single: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rows and ``a * b_buckets + b`` keys for every pair of values the two fields share a row with.

    One of the two is single-valued, so its indices are one per row and can be looked up by row.
    """
    (row_a, idx_a), (row_b, idx_b) = a, b
    if b_single:
        return row_a, (idx_a * b_buckets + idx_b[row_a]).astype(np.uint64)
    return row_b, (idx_a[row_b] * b_buckets + idx_b).astype(np.uint64)

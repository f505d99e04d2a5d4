"""Scoring a split: predictions in batches, AUC and log loss, and the oracle's figures on synthetic data."""
from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

__all__ = ["binary_metrics", "oracle_metrics", "paired_auc_delta", "predict"]

EPS = 1e-7
PREDICT_BATCH = 16384


@torch.no_grad()
def predict(model: torch.nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = PREDICT_BATCH) -> np.ndarray:
    """Click probabilities (float32) of a deepctr model for the rows of its float input matrix."""
    was_training = model.training
    model.eval()
    x = torch.as_tensor(x)
    out = [model(x[i:i + batch_size]).reshape(-1) for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def binary_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float | int | None]:
    """AUC (None when the split holds one class only), mean log loss, rows, observed and predicted CTR."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    auc = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else None
    logloss = float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p))) if len(y) else None
    return {"auc": _rounded(auc), "logloss": _rounded(logloss), "rows": int(len(y)),
            "ctr": _rounded(float(y.mean())) if len(y) else None,
            "mean_prediction": _rounded(float(p.mean())) if len(y) else None}


def oracle_metrics(labels: np.ndarray, pctr_true: np.ndarray) -> dict[str, float | int | None]:
    """The best any model can do on this split: the metrics of the true click probability."""
    return binary_metrics(labels, pctr_true)


def paired_auc_delta(labels: np.ndarray, base: np.ndarray, other: np.ndarray, *, resamples: int = 1000,
                     seed: int = 0) -> dict[str, float | int | None]:
    """AUC(other) - AUC(base) on the same rows, with a paired bootstrap 95 % interval.

    Each resample draws the rows with replacement (how often each is drawn is its weight) and scores both
    models on that same draw, so the interval reflects the difference, not each AUC's own noise.
    """
    y = np.asarray(labels) > 0
    if not 0 < y.sum() < len(y):
        return {"delta": None, "low": None, "high": None, "resamples": 0}
    rankers = [_WeightedAuc(y, np.asarray(s, dtype=np.float64)) for s in (base, other)]
    ones = np.ones(len(y))
    delta = rankers[1](ones) - rankers[0](ones)
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for i in range(resamples):
        weights = np.bincount(rng.integers(0, len(y), len(y)), minlength=len(y)).astype(np.float64)
        draws[i] = rankers[1](weights) - rankers[0](weights)
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"delta": _rounded(float(delta)), "low": _rounded(float(low)), "high": _rounded(float(high)),
            "resamples": resamples}


class _WeightedAuc:
    """AUC of fixed scores under row weights in O(rows): the rows are sorted and tied scores grouped once."""

    def __init__(self, positive: np.ndarray, scores: np.ndarray) -> None:
        order = np.argsort(scores, kind="stable")
        _, self.group = np.unique(scores[order], return_inverse=True)
        self.order, self.positive = order, positive[order]

    def __call__(self, weights: np.ndarray) -> float:
        w = weights[self.order]
        pos = np.bincount(self.group, weights=np.where(self.positive, w, 0.0))
        neg = np.bincount(self.group, weights=np.where(self.positive, 0.0, w))
        below = np.cumsum(neg) - neg  # negatives scored strictly lower than each group
        total = pos.sum() * neg.sum()
        return float(np.sum(pos * (below + 0.5 * neg)) / total) if total else float("nan")


def _rounded(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, 6)

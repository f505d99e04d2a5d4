"""Scoring a split: predictions in batches, AUC and log loss, and the oracle's figures on synthetic data."""
from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

__all__ = ["binary_metrics", "oracle_metrics", "predict"]

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


def _rounded(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, 6)

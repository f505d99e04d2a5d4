"""Probability calibration: Platt scaling fitted on the validation split, folded into the served graph.

Why Platt (``p' = sigmoid(scale * logit(p) + shift)``) and not isotonic regression:

* the miscalibration to fix is a shift of the whole curve (the trained model's mean is ~24 % under the
  observed CTR: early stopping ends before the output bias has caught up, and the L2 terms pull the
  tables towards "no click"); two parameters capture a shift and a tilt of the log-odds;
* the validation split holds ~80k rows but only ~700 clicks: isotonic regression fits a step function
  with one free value per step and overfits that few positives; Platt has two parameters;
* Platt is strictly increasing (for ``scale`` > 0) and smooth, so the ranking (AUC) is untouched and
  near-equal predictions stay distinct, which bid prices need; isotonic ties whole ranges of
  predictions to one value;
* it folds into any exported graph as two scalar ops before the final sigmoid (``train/export.py``,
  ``train/factorize.py``), so served probabilities are calibrated and parity holds without a lookup
  table in the bid path.

``expected_calibration_error`` uses 20 equal-count bins of the predicted probability: at a CTR near
1 % equal-width bins would put almost every row into the first bin.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from train.errors import TrainError

__all__ = ["Calibration", "IDENTITY", "apply", "calibration_report", "expected_calibration_error", "fit_platt",
           "summary"]

ECE_BINS = 20
SCALE_PRIOR_SD = 0.25
_CLIP = 1e-7


class Calibration(NamedTuple):
    """``p' = sigmoid(scale * logit(p) + shift)``."""
    scale: float
    shift: float

    def describe(self) -> dict[str, Any]:
        return {"method": "platt", "scale": self.scale, "shift": self.shift}


IDENTITY = Calibration(1.0, 0.0)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _CLIP, 1 - _CLIP)
    return np.log(p) - np.log1p(-p)


def apply(probs: np.ndarray, calibration: Calibration) -> np.ndarray:
    """Calibrated probabilities (float64) of ``probs``."""
    z = calibration.scale * _logit(probs) + calibration.shift
    return 1.0 / (1.0 + np.exp(-z))


def fit_platt(probs: np.ndarray, labels: np.ndarray, *, scale_prior_sd: float = SCALE_PRIOR_SD,
              iterations: int = 50) -> Calibration:
    """The (scale, shift) maximising the log-likelihood of ``labels``, with a N(1, sd²) prior on the scale.

    The shift is free, so the calibrated mean on the fitted rows equals their observed rate. The prior
    keeps the scale near 1 when the predictions hardly vary (an undertrained model: a free fit would
    stretch its logits many-fold, and with them every float32 rounding error of the served graphs);
    with a trained model the likelihood outweighs it. Newton's method, float64.
    Raises ``TrainError`` when the labels hold one class only (nothing to calibrate against).
    """
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    z = _logit(probs).reshape(-1)
    if len(y) != len(z):
        raise TrainError(f"calibration: {len(z)} predictions but {len(y)} labels")
    positives = y.sum()
    if not 0 < positives < len(y):
        raise TrainError(f"calibration needs clicks and non-clicks in the validation split; it has {int(positives)} "
                         f"click(s) in {len(y)} rows")
    x = np.stack([z, np.ones_like(z)], axis=1)
    precision = np.diag([1.0 / scale_prior_sd ** 2, 0.0])
    w = np.array([1.0, 0.0])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        gradient = x.T @ (p - y) + precision @ (w - [1.0, 0.0])
        hessian = (x * (p * (1 - p))[:, None]).T @ x + precision
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    if not (np.all(np.isfinite(w)) and w[0] > 0):
        raise TrainError(f"calibration: Platt fit gave scale {w[0]:.4g}, shift {w[1]:.4g}; expected a positive scale "
                         "(the model's ranking is worse than chance on the validation split)")
    return Calibration(float(w[0]), float(w[1]))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Σ over bins of predicted probability: (bin share) × |mean prediction − observed rate|.

    The bins are cut at the predictions' quantiles (about equal counts); equal predictions share a bin.
    """
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if len(p) == 0:
        return math.nan
    edges = np.quantile(p, np.linspace(0, 1, bins + 1)[1:-1])
    index = np.searchsorted(edges, p, side="left")
    counts = np.bincount(index, minlength=bins)
    gap = np.abs(np.bincount(index, weights=p, minlength=bins) - np.bincount(index, weights=y, minlength=bins))
    return float(gap.sum() / len(p)) if counts.sum() else math.nan


def summary(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    y = np.asarray(labels, dtype=np.float64)
    mean, ctr = float(np.mean(probs)), float(y.mean())
    return {"mean_prediction": round(mean, 6), "ctr": round(ctr, 6),
            "mean_over_ctr": round(mean / ctr, 4) if ctr > 0 else None,
            "ece": round(expected_calibration_error(probs, labels), 6)}


def calibration_report(calibration: Calibration, raw: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """``meta.json``'s ``calibration`` entry: the map and the test figures before and after it."""
    return {**calibration.describe(), "fitted_on": "val", "scale_prior_sd": SCALE_PRIOR_SD, "ece_bins": ECE_BINS,
            "test": {"before": summary(raw, labels), "after": summary(apply(raw, calibration), labels)}}

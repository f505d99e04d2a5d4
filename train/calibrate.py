"""Probability calibration: a Bayesian Platt map whose level is learnt from the served model's own training rows, then
refined with its scale on the validation rows, kept only when its posterior is sure the level moved, folded into the
served graph.

The map is ``p' = sigmoid(scale * logit(p) + shift)``. What is fitted, on which rows, and when it is kept:

* **Platt, not isotonic.** It is strictly increasing (scale > 0), so the ranking (AUC) is untouched; isotonic
  regression has one free value per step, overfits a few hundred positives and ties whole ranges of predictions
  to one value, which bid prices cannot use. The map folds into any exported graph as two scalar ops before the
  final sigmoid (``calibration_scale``/``calibration_shift``: ``train/export.py``, ``train/factorize.py``,
  ``train/gbdt.py``), so no lookup table sits in the bid path.
* **Fitted on enough clicks: the training rows.** The validation split holds a tenth of the training rows, about
  200 clicks at 200,000 synthetic rows, whose own noise (±1/√clicks, 7 %) is larger than the error being
  corrected: a maximum-likelihood Platt on it moved the mean by that noise (the issue's 0.98 -> 0.88). The
  training rows hold ten times the clicks. What they measure is the level: a trained model's mean is off by an
  amount of its own (run to run, 0.8 to 1.24 of the truth at 200k rows), and on the synthetic data that offset is
  the same on the rows it trained on as on later ones (seed 2014, 200k rows: 1.238 on train, 1.216 on val, 1.206
  on test). Models trained on folds have offsets of their own (0.82 to 1.20 in the same run), so cross-fitting
  would estimate someone else's error. The tilt (``scale``) is not fitted on training rows, where the model has
  memorised the labels and its predictions look sharper than they are; it is fitted on the validation rows only.
* **Shrunk by how few clicks there are: a Bayesian shift, in two steps** (``fit_level``). On the training rows:
  prior ``shift ~ N(0, PRIOR_SD²)``, posterior mode (Newton in float64). A model's level on later rows may still
  differ from its level on the rows it trained on (at 1M rows, seed 2015: the training rows said +1 %, the test
  rows needed +6 %), so that posterior, widened by ``MISMATCH_SD``, is the prior of a second fit on the validation
  rows, which fits the scale too (prior ``N(1, PRIOR_SD²)``; the level is taken where a change of scale leaves the
  mean prediction as it is, so it means there what the training rows' shift means). Each likelihood's weight grows
  with its clicks, the priors' do not: with few validation clicks the training rows decide the level and the scale
  stays near 1, with many the validation rows decide both, with few of both the identity does. The Laplace approximation
  (inverse Hessian at the mode) gives the 95 % interval of the shift and of the factor it puts on the mean
  prediction, both reported.
* **Kept when its posterior says the map moved** (``choose_by_posterior``, what ``choose_for_serving`` runs). The
  map is exported when the identity (scale 1, shift 0) lies outside the ``KEEP_COVERAGE`` (90 %) credible ellipse
  of the Laplace posterior of (scale, shift), otherwise the identity (the graph still carries the two constants, at
  1 and 0). One test of the whole map that is exported: a level that moved, a tilt that moved, or both. Kept, the
  whole map is exported, its scale shrunk towards 1 by its prior. The posterior weighs every click the model has:
  the training rows' through the second step's prior, the validation rows' directly. The rule served before
  (``choose_by_folds`` with 2 folds: kept when the validation log loss of rows each map was not fitted on falls)
  weighs only the validation clicks, and a level error δ changes their summed log loss by about clicks·δ²/2
  against a noise of about √clicks·δ: it confirms a correction only when δ is well above 2/√(validation clicks),
  14 % at 200 clicks, 6 % at 1,000, so it dropped maps whose posterior lay below 1
  (``bench/results/calibration-20261207``). ``held_out_logloss`` (K folds) is still computed and recorded.

With ``prior_sd=inf`` and ``fit_scale`` ``fit_platt`` is plain maximum-likelihood Platt: the calibration study fits it
on the validation split alone to show what the map shipped before did.

``expected_calibration_error`` uses 20 equal-count bins of the predicted probability: at a CTR near 1 %
equal-width bins would put almost every row into the first bin. On synthetic data it is also measured against
``pctr_true`` (the truth's mean per bin instead of the click rate), which the test clicks' noise does not blur.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from train.errors import TrainError

__all__ = ["Calibration", "Choice", "FOLDS", "IDENTITY", "KEEP_COVERAGE", "MISMATCH_SD", "PRIOR_SD", "PlattFit", "apply",
           "calibration_report", "choose", "choose_by_folds", "choose_by_posterior", "choose_for_serving",
           "expected_calibration_error", "fit_level", "fit_platt", "held_out_logloss", "keep_always", "log_loss",
           "summary", "truth_summary"]

ECE_BINS = 20
PRIOR_SD = 0.25          # of the shift around 0 (and of the scale around 1): log-odds, about ±25 % on the mean, 1 sd
MISMATCH_SD = 0.05       # how far a model's level on later rows may sit from its level on its training rows (1 sd)
INTERVAL_Z = 1.959964    # 95 % two-sided
KEEP_COVERAGE = 0.90     # the posterior credible region that must exclude the identity for the map to be kept
FOLDS = 5                # validation folds of the held-out log loss
_CLIP = 1e-7


class Calibration(NamedTuple):
    """``p' = sigmoid(scale * logit(p) + shift)``: the two constants the exported graphs carry."""
    scale: float
    shift: float

    def describe(self) -> dict[str, Any]:
        return {"method": "platt", "scale": self.scale, "shift": self.shift}


IDENTITY = Calibration(1.0, 0.0)


@dataclass(frozen=True)
class PlattFit:
    """A fitted map with its Laplace posterior: ``covariance`` of (scale, shift) and the clicks it saw."""
    calibration: Calibration
    covariance: np.ndarray
    rows: int
    clicks: int

    def interval(self) -> dict[str, list[float]]:
        """95 % intervals of scale and shift (normal approximation of the posterior)."""
        sd = np.sqrt(np.diag(self.covariance))
        centre = np.array(self.calibration)
        low, high = centre - INTERVAL_Z * sd, centre + INTERVAL_Z * sd
        return {"scale": [round(float(low[0]), 4), round(float(high[0]), 4)],
                "shift": [round(float(low[1]), 4), round(float(high[1]), 4)]}

    def identity_distance2(self) -> float:
        """The identity's squared Mahalanobis distance from the posterior mode, over the fitted parameters (those
        with a variance): above the χ² quantile of their count, the identity lies outside that credible region."""
        free = np.diag(self.covariance) > 0
        gap = (np.array(self.calibration) - np.array(IDENTITY))[free]
        return float(gap @ np.linalg.solve(self.covariance[np.ix_(free, free)], gap))

    def mean_factor_interval(self, probs: np.ndarray, coverage: float = 0.95, draws: int = 2000,
                             seed: int = 0) -> list[float]:
        """``coverage`` interval of (mean calibrated / mean raw prediction) over ``probs``, from posterior draws."""
        p = np.asarray(probs, dtype=np.float64).reshape(-1)
        if len(p) == 0:
            return [math.nan, math.nan]
        sample = np.random.default_rng(seed).multivariate_normal(np.array(self.calibration), self.covariance, draws)
        z = _logit(p)
        factors = np.array([np.mean(_sigmoid(s * z + b)) for s, b in sample]) / p.mean()
        low, high = np.percentile(factors, [50 * (1 - coverage), 50 * (1 + coverage)])
        return [round(float(low), 4), round(float(high), 4)]


@dataclass(frozen=True)
class Choice:
    """What a bundle exports (``calibration``) and why: the candidate, its held-out log loss, kept or not."""
    calibration: Calibration
    candidate: PlattFit
    kept: bool
    fitted_on: str
    judged_on: str
    logloss_raw: float          # validation log loss per row, each row by a map fitted without it
    logloss_calibrated: float
    val_mean_factor: list[float]  # the candidate's interval (KEEP_COVERAGE unless judged at another coverage) of its
                                  # factor on the mean validation prediction


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _CLIP, 1 - _CLIP)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def apply(probs: np.ndarray, calibration: Calibration) -> np.ndarray:
    """Calibrated probabilities (float64) of ``probs``."""
    return _sigmoid(calibration.scale * _logit(probs) + calibration.shift)


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64).reshape(-1), _CLIP, 1 - _CLIP)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p))) if len(y) else math.nan


def fit_platt(probs: np.ndarray, labels: np.ndarray, *, fit_scale: bool = False, prior_sd: float = PRIOR_SD,
              prior_shift: float = 0.0, scale_prior_sd: float | None = None, one_class_ok: bool = False,
              iterations: int = 50) -> PlattFit:
    """The posterior mode of the shift (and, with ``fit_scale``, the scale) and its Laplace covariance.

    Priors: ``shift ~ N(prior_shift, prior_sd²)``, ``scale ~ N(1, scale_prior_sd²)`` (``scale_prior_sd`` defaults to
    ``prior_sd``); without ``fit_scale`` the scale is 1.
    ``prior_sd`` = inf is plain maximum likelihood (the calibrated mean on the fitted rows then equals their
    observed rate). Raises ``TrainError`` when the labels hold one class only (unless ``one_class_ok``: a shift
    under a proper prior is defined then too), or when a fitted scale is not positive (the predictions rank worse
    than chance on these rows).
    """
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    z = _logit(probs).reshape(-1)
    if len(y) != len(z):
        raise TrainError(f"calibration: {len(z)} predictions but {len(y)} labels")
    if not prior_sd > 0:
        raise TrainError(f"calibration: the prior's standard deviation must be positive, got {prior_sd!r}")
    positives = y.sum()
    scale_sd = prior_sd if scale_prior_sd is None else scale_prior_sd
    if not 0 < positives < len(y) and not (one_class_ok and math.isfinite(prior_sd)
                                           and (not fit_scale or math.isfinite(scale_sd))):
        raise TrainError(f"calibration needs clicks and non-clicks; its rows hold {int(positives)} click(s) in "
                         f"{len(y)} rows")
    # the level is the shift at the logit where a change of scale leaves the mean prediction as it is (the mean of
    # the logits weighted by p(1 - p)), not at logit 0 (p = 0.5, far from any CTR): so the level means what the
    # shift alone means, the mean prediction, and its prior does not hold the scale back
    weight = _sigmoid(z) * (1 - _sigmoid(z))
    centre_logit = float(np.sum(weight * z) / np.sum(weight)) if fit_scale else 0.0
    x = np.stack([z - centre_logit, np.ones_like(z)], axis=1)
    free = [0, 1] if fit_scale else [1]
    centre = np.array([1.0, float(prior_shift)])
    precision = np.diag([1.0 / scale_sd ** 2, 1.0 / prior_sd ** 2][2 - len(free):])
    w = centre.copy()  # (scale, level): logit' = scale * (z - centre_logit) + centre_logit + level

    def gradient_and_hessian() -> tuple[np.ndarray, np.ndarray]:
        p = _sigmoid(x @ w + centre_logit)
        xf = x[:, free]
        return (xf.T @ (p - y) + precision @ (w[free] - centre[free]),
                (xf * (p * (1 - p))[:, None]).T @ xf + precision)

    for _ in range(iterations):
        gradient, hessian = gradient_and_hessian()
        step = np.linalg.solve(hessian, gradient)
        w[free] -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    if not (np.all(np.isfinite(w)) and w[0] > 0):
        raise TrainError(f"calibration: Platt fit gave scale {w[0]:.4g}, level {w[1]:.4g}; expected a positive scale "
                         "(the model ranks these rows worse than chance)")
    covariance = np.zeros((2, 2))
    covariance[np.ix_(free, free)] = np.linalg.inv(gradient_and_hessian()[1])
    to_shift = np.array([[1.0, 0.0], [-centre_logit, 1.0]])  # (scale, level) -> (scale, shift)
    covariance = to_shift @ covariance @ to_shift.T
    w = np.array([w[0], w[1] + centre_logit * (1.0 - w[0])])
    return PlattFit(Calibration(float(w[0]), float(w[1])), covariance, len(y), int(positives))


def fit_level(train: np.ndarray, train_labels: np.ndarray, val: np.ndarray, val_labels: np.ndarray) -> PlattFit:
    """The map in two steps: the training rows' shift (identity prior), widened by ``MISMATCH_SD``, becomes the prior
    of the shift fitted with the scale on the validation rows (scale prior ``N(1, PRIOR_SD²)``). With few validation
    clicks the training rows decide the level and the scale stays near 1; with many the validation rows decide both;
    with few clicks anywhere the identity does."""
    first = fit_platt(train, train_labels)
    sd = math.sqrt(first.covariance[1, 1] + MISMATCH_SD ** 2)
    return fit_platt(val, val_labels, fit_scale=True, prior_shift=first.calibration.shift, prior_sd=sd,
                     scale_prior_sd=PRIOR_SD, one_class_ok=True)


def held_out_logloss(train: np.ndarray, train_labels: np.ndarray, val: np.ndarray, val_labels: np.ndarray, *,
                     folds: int = FOLDS, seed: int = 0) -> tuple[float, float]:
    """Validation log loss per row, raw and through ``fit_level``, each validation row scored by the map fitted
    without its fold (the training rows and the other ``folds - 1`` folds)."""
    if folds < 2:
        raise TrainError(f"calibration: held-out judgement needs at least 2 folds, got {folds}")
    y = np.asarray(val_labels, dtype=np.float64).reshape(-1)
    p = np.asarray(val, dtype=np.float64).reshape(-1)
    fold = np.random.default_rng(seed).permutation(len(y)) * folds // max(1, len(y))
    raw = calibrated = 0.0
    for k in range(folds):
        judged = fold == k
        fitted = fit_level(train, train_labels, p[~judged], y[~judged]).calibration
        raw += log_loss(p[judged], y[judged]) * judged.sum()
        calibrated += log_loss(apply(p[judged], fitted), y[judged]) * judged.sum()
    return raw / max(1, len(y)), calibrated / max(1, len(y))


def choose_by_folds(train: np.ndarray, train_labels: np.ndarray, val: np.ndarray, val_labels: np.ndarray, *,
                    folds: int = FOLDS, seed: int = 0) -> Choice:
    """``fit_level`` on all rows, kept when it lowers the validation log loss of rows it was not fitted on
    (``held_out_logloss``); otherwise the identity. ``folds=2`` is the halves rule served before."""
    raw, calibrated = held_out_logloss(train, train_labels, val, val_labels, folds=folds, seed=seed)
    candidate = fit_level(train, train_labels, val, val_labels)
    kept = bool(calibrated < raw)
    return Choice(candidate.calibration if kept else IDENTITY, candidate, kept, "train, then val",
                  f"val ({folds} folds, each by the map fitted without it)", raw, calibrated,
                  candidate.mean_factor_interval(val, coverage=KEEP_COVERAGE))


def choose_by_posterior(train: np.ndarray, train_labels: np.ndarray, val: np.ndarray, val_labels: np.ndarray, *,
                        coverage: float = KEEP_COVERAGE, judge: str = "map", folds: int = FOLDS) -> Choice:
    """``fit_level`` on all rows, kept when its posterior says the map moved; otherwise the identity.

    ``judge="map"`` (served): the identity (scale 1, shift 0) lies outside the posterior's ``coverage`` credible
    ellipse of (scale, shift), one test of the whole map that is exported. ``judge="level"``: the ``coverage``
    interval of the factor the map puts on the mean validation prediction excludes 1, the level alone.
    The posterior's second step has the training rows' fit as prior, so either test weighs every click the model
    has (train and val), where a held-out log loss weighs only the validation clicks and cannot tell a few per
    cent of level from their noise. The held-out log loss (``held_out_logloss``) is recorded, not used.
    """
    if judge not in ("map", "level"):
        raise TrainError(f"calibration: judge must be 'map' or 'level', got {judge!r}")
    if not 0 < coverage < 1:
        raise TrainError(f"calibration: coverage must lie between 0 and 1, got {coverage!r}")
    candidate = fit_level(train, train_labels, val, val_labels)
    factor = candidate.mean_factor_interval(val, coverage=coverage)
    if judge == "map":
        kept = candidate.identity_distance2() > -2.0 * math.log(1.0 - coverage)  # the χ² quantile, 2 degrees
        judged_on = f"posterior ({coverage:.0%} credible region of scale and shift excludes the identity)"
    else:
        kept = factor[0] > 1 or factor[1] < 1
        judged_on = f"posterior ({coverage:.0%} mean factor on val excludes 1)"
    raw, calibrated = held_out_logloss(train, train_labels, val, val_labels, folds=folds)
    return Choice(candidate.calibration if kept else IDENTITY, candidate, bool(kept), "train, then val", judged_on,
                  raw, calibrated, factor)


def keep_always(train: np.ndarray, train_labels: np.ndarray, val: np.ndarray, val_labels: np.ndarray, *,
                folds: int = FOLDS) -> Choice:
    """``fit_level`` on all rows, always exported: the posterior mode, trusting the priors' shrinkage alone."""
    candidate = fit_level(train, train_labels, val, val_labels)
    raw, calibrated = held_out_logloss(train, train_labels, val, val_labels, folds=folds)
    return Choice(candidate.calibration, candidate, True, "train, then val", "not judged", raw, calibrated,
                  candidate.mean_factor_interval(val, coverage=KEEP_COVERAGE))


def choose_for_serving(train: np.ndarray, train_labels: np.ndarray, val: np.ndarray, val_labels: np.ndarray
                       ) -> Choice:
    """The keep rule every exported bundle goes through (``train/fit.py``) and the calibration study serves."""
    return choose_by_posterior(train, train_labels, val, val_labels)


def choose(candidate: PlattFit, held_out: np.ndarray, labels: np.ndarray, *, fitted_on: str,
           judged_on: str) -> Choice:
    """Keep ``candidate`` when it lowers the log loss of the held-out predictions ``held_out``; else the identity."""
    raw = log_loss(held_out, labels)
    calibrated = log_loss(apply(held_out, candidate.calibration), labels)
    kept = bool(calibrated < raw)
    return Choice(candidate.calibration if kept else IDENTITY, candidate, kept, fitted_on, judged_on, raw, calibrated,
                  candidate.mean_factor_interval(held_out, coverage=KEEP_COVERAGE))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Σ over bins of predicted probability: (bin share) × |mean prediction − mean label|.

    The bins are cut at the predictions' quantiles (about equal counts); equal predictions share a bin.
    ``labels`` may be probabilities (``pctr_true``): the error is then against the truth.
    """
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if len(p) == 0:
        return math.nan
    edges = np.quantile(p, np.linspace(0, 1, bins + 1)[1:-1])
    index = np.searchsorted(edges, p, side="left")
    gap = np.abs(np.bincount(index, weights=p, minlength=bins) - np.bincount(index, weights=y, minlength=bins))
    return float(gap.sum() / len(p))


def summary(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    y = np.asarray(labels, dtype=np.float64)
    mean, ctr = float(np.mean(probs)), float(y.mean())
    return {"mean_prediction": round(mean, 6), "ctr": round(ctr, 6),
            "mean_over_ctr": round(mean / ctr, 4) if ctr > 0 else None,
            "ece": round(expected_calibration_error(probs, labels), 6),
            "logloss": round(log_loss(probs, labels), 6)}


def truth_summary(probs: np.ndarray, pctr_true: np.ndarray) -> dict[str, float]:
    """Against the generator's truth on the same rows: mean prediction / mean ``pctr_true``, ECE, and the
    expected log loss (``pctr_true`` in place of the labels: the log loss without the clicks' noise)."""
    truth = float(np.mean(pctr_true))
    return {"mean_over_true": round(float(np.mean(probs)) / truth, 4) if truth > 0 else None,
            "ece_true": round(expected_calibration_error(probs, pctr_true), 6),
            "logloss_true": round(log_loss(probs, pctr_true), 7)}


def calibration_report(choice: Choice, raw_test: np.ndarray, labels: np.ndarray,
                       pctr_true: np.ndarray | None = None) -> dict[str, Any]:
    """``meta.json``'s ``calibration`` entry: the exported map, the candidate with its interval, the held-out
    judgement, and the test figures before and after (against ``pctr_true`` too, on synthetic data)."""
    fit = choice.candidate
    test = {"before": summary(raw_test, labels), "after": summary(apply(raw_test, choice.calibration), labels)}
    if pctr_true is not None:
        test["before"].update(truth_summary(raw_test, pctr_true))
        test["after"].update(truth_summary(apply(raw_test, choice.calibration), pctr_true))
    return {**choice.calibration.describe(), "kept": choice.kept, "fitted_on": choice.fitted_on,
            "judged_on": choice.judged_on, "prior_sd": PRIOR_SD, "ece_bins": ECE_BINS,
            "candidate": {"scale": round(fit.calibration.scale, 6), "shift": round(fit.calibration.shift, 6),
                          "interval_95": fit.interval(), "mean_factor_95": fit.mean_factor_interval(raw_test),
                          "rows": fit.rows, "clicks": fit.clicks},
            "held_out_logloss": {"raw": round(choice.logloss_raw, 6),
                                 "calibrated": round(choice.logloss_calibrated, 6)},
            "val_mean_factor": {"coverage": KEEP_COVERAGE, "interval": choice.val_mean_factor},
            "identity_distance2": round(fit.identity_distance2(), 4),
            "test": test}


"""Calibration: the Bayesian Platt fit recovers a known map and shrinks with few clicks, a map that does not help on
held-out rows is not kept, ECE, and every exported graph carries the calibration within 1e-6."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from bidder.factorized import FactorizedScorer
from bidder.scorer import Scorer
from bidder.spec import default_spec
from train.calibrate import (IDENTITY, MISMATCH_SD, Calibration, apply, choose, choose_by_halves,
                             expected_calibration_error, fit_level, fit_platt, truth_summary)
from train.data.dataset import load_dataset
from train.errors import ParityError, TrainError
from train.export import CALIBRATION_SCALE, CALIBRATION_SHIFT, check_parity, export_lean
from train.trainer import train_model


def test_platt_recovers_a_known_map():
    rng = np.random.default_rng(0)
    z = rng.normal(-4.0, 1.2, 400_000)
    labels = rng.random(len(z)) < 1 / (1 + np.exp(-(1.3 * z + 0.4)))
    fitted = fit_platt(1 / (1 + np.exp(-z)), labels, fit_scale=True).calibration
    assert fitted.scale == pytest.approx(1.3, abs=0.03)
    assert fitted.shift == pytest.approx(0.4, abs=0.12)


def test_shift_recovers_a_known_miscalibration_with_its_interval():
    # a model 25 % high in odds everywhere: the served fit (shift only) finds log(0.8) and its interval holds it
    rng = np.random.default_rng(2)
    z = rng.normal(-4.3, 0.9, 300_000)
    labels = rng.random(len(z)) < 1 / (1 + np.exp(-(z + np.log(0.8))))
    fit = fit_platt(1 / (1 + np.exp(-z)), labels)
    assert fit.calibration.scale == 1.0
    assert fit.calibration.shift == pytest.approx(np.log(0.8), abs=0.06)
    low, high = fit.interval()["shift"]
    assert low < np.log(0.8) < high and high - low < 0.15
    factor = fit.mean_factor_interval(1 / (1 + np.exp(-z)))
    assert factor[0] < 0.8 * 1.02 and factor[1] > 0.8 * 0.98


def test_maximum_likelihood_matches_the_observed_rate_on_its_own_data():
    # with an intercept and no prior, the fit's mean prediction equals the observed rate
    rng = np.random.default_rng(1)
    probs = rng.uniform(0.001, 0.03, 50_000)
    labels = rng.random(len(probs)) < 1.3 * probs
    calibrated = apply(probs, fit_platt(probs, labels, prior_sd=np.inf).calibration)
    assert calibrated.mean() == pytest.approx(labels.mean(), rel=1e-6)


def test_few_clicks_shrink_the_shift_towards_the_identity():
    # 1,500 rows at 1 % predicted, 4 clicks: the observed rate says "4x too high", the prior says "a few clicks"
    probs = np.full(1500, 0.01)
    labels = np.zeros(1500)
    labels[:4] = 1
    mle = fit_platt(probs, labels, prior_sd=np.inf).calibration.shift
    bayes = fit_platt(probs, labels)
    assert mle == pytest.approx(np.log((4 / 1500) / (1 - 4 / 1500)) - np.log(0.01 / 0.99), abs=1e-6)
    assert abs(bayes.calibration.shift) < 0.5 * abs(mle)
    # with 100 times the rows at the same rate the data win
    many = fit_platt(np.full(150_000, 0.01), np.r_[np.ones(400), np.zeros(149_600)]).calibration.shift
    assert many == pytest.approx(mle, rel=0.06)  # 400 clicks against the prior: within 4 %


def test_a_map_that_does_not_help_on_held_out_rows_is_not_kept():
    rng = np.random.default_rng(3)
    probs = rng.uniform(0.005, 0.03, 40_000)
    labels = rng.random(len(probs)) < probs  # the raw model is calibrated on the held-out rows
    wrong = fit_platt(probs, rng.random(len(probs)) < 1.5 * probs)  # fitted on other, miscalibrated rows
    choice = choose(wrong, probs, labels, fitted_on="train", judged_on="val")
    assert not choice.kept and choice.calibration == IDENTITY
    assert choice.logloss_calibrated > choice.logloss_raw
    fixed = choose(fit_platt(probs * 1.5, labels), probs * 1.5, labels, fitted_on="train", judged_on="val")
    assert fixed.kept and fixed.calibration.shift < -0.3 and fixed.logloss_calibrated < fixed.logloss_raw


def test_the_level_comes_from_training_rows_when_validation_has_few_clicks_and_from_validation_when_many():
    rng = np.random.default_rng(4)

    def rows(n, level):
        z = rng.normal(-4.3, 0.9, n)
        return 1 / (1 + np.exp(-z)), rng.random(n) < 1 / (1 + np.exp(-(z + level)))

    train = rows(400_000, np.log(0.8))                      # training rows: the model is 25 % high in odds
    few, many = rows(3_000, np.log(1.1)), rows(600_000, np.log(1.1))  # later rows: 10 % low

    def factor(fit, probs):  # what the map does to the mean prediction
        return apply(probs, fit.calibration).mean() / probs.mean()

    assert 0.76 < factor(fit_level(*train, *few), few[0]) < 0.9  # near the training rows (0.8), far from 1.1
    assert factor(fit_level(*train, *many), many[0]) == pytest.approx(1.1, abs=0.03)
    assert fit_level(*train, *many).calibration.scale == pytest.approx(1.0, abs=0.03)  # the slope was right
    # the second step's interval is narrower than the first's widened prior
    assert np.diff(fit_level(*train, *many).interval()["shift"])[0] < 2 * 1.96 * MISMATCH_SD


def test_the_scale_is_fitted_on_validation_rows_when_they_hold_enough_clicks():
    rng = np.random.default_rng(6)
    z = rng.normal(-4.3, 0.9, 400_000)
    probs = 1 / (1 + np.exp(-z))
    labels = rng.random(len(z)) < 1 / (1 + np.exp(-(0.8 * z - 0.86)))  # overconfident: the true slope is 0.8
    fit = fit_level(probs[:200_000], labels[:200_000], probs[200_000:], labels[200_000:])
    assert fit.calibration.scale == pytest.approx(0.8, abs=0.06)
    assert apply(probs, fit.calibration).mean() == pytest.approx(labels.mean(), rel=0.05)


def test_choose_by_halves_keeps_a_level_that_holds_on_unseen_validation_rows():
    rng = np.random.default_rng(5)
    z = rng.normal(-4.3, 0.9, 300_000)
    probs = 1 / (1 + np.exp(-z))
    high = rng.random(len(z)) < 0.7 * probs  # the model is 1/0.7 too high everywhere
    val = slice(0, 60_000)
    kept = choose_by_halves(probs, high, probs[val], high[val])
    assert kept.kept and apply(probs, kept.calibration).mean() / probs.mean() == pytest.approx(0.7, abs=0.03)
    calibrated = rng.random(len(z)) < probs  # already calibrated: nothing to gain on held-out halves
    left = choose_by_halves(probs, calibrated, probs[val], calibrated[val])
    assert apply(probs, left.candidate.calibration).mean() / probs.mean() == pytest.approx(1.0, abs=0.03)


def test_truth_summary_scores_against_the_true_probability():
    truth = np.linspace(0.005, 0.03, 1000)
    exact = truth_summary(truth, truth)
    assert exact["mean_over_true"] == 1.0 and exact["ece_true"] == 0.0
    high = truth_summary(truth * 1.1, truth)
    assert high["mean_over_true"] == pytest.approx(1.1) and high["ece_true"] > 0
    assert high["logloss_true"] > exact["logloss_true"]


def test_platt_refuses_labels_of_one_class():
    with pytest.raises(TrainError, match="clicks and non-clicks"):
        fit_platt(np.full(10, 0.1), np.zeros(10))


def test_expected_calibration_error_known_values():
    labels = np.array([1] * 10 + [0] * 90)
    assert expected_calibration_error(np.full(100, 0.1), labels) == pytest.approx(0.0)
    assert expected_calibration_error(np.full(100, 0.2), labels) == pytest.approx(0.1)
    # two bins: predictions 0 (labels 0) and 1 (labels 1) are perfectly calibrated
    assert expected_calibration_error(np.array([0.0, 0.0, 1.0, 1.0]), np.array([0, 0, 1, 1]), bins=2) == 0.0


@pytest.fixture(scope="module")
def dataset(synthetic_data):
    return load_dataset(synthetic_data, default_spec(), progress=False)


def test_calibration_is_folded_into_the_graph(dataset, tmp_path):
    trained = train_model(dataset, "deepfm", epochs=1, progress=False)
    calibration = Calibration(1.25, 0.3)
    path = export_lean(trained.model, dataset.spec, "deepfm", tmp_path / "model.onnx", combiner="sum",
                       calibration=calibration)
    names = {t.name for t in onnx.load(str(path)).graph.initializer}
    assert {CALIBRATION_SCALE, CALIBRATION_SHIFT} <= names
    assert check_parity(trained.model, path, dataset.spec, dataset.test, calibration=calibration)["max_abs_diff"] <= 1e-6
    with pytest.raises(ParityError):  # the graph is not the uncalibrated model
        check_parity(trained.model, path, dataset.spec, dataset.test)


def test_trained_bundle_is_calibrated_on_training_rows_and_judged_on_validation(small_bundle):
    meta = json.loads((small_bundle / "meta.json").read_text())
    entry = meta["calibration"]
    assert entry["method"] == "platt" and entry["fitted_on"] == "train, then val"
    assert entry["judged_on"].startswith("val (two halves")
    assert entry["scale"] > 0
    candidate = entry["candidate"]
    assert candidate["interval_95"]["shift"][0] <= candidate["shift"] <= candidate["interval_95"]["shift"][1]
    assert candidate["clicks"] == int(round(meta["metrics"]["val"]["ctr"] * meta["metrics"]["val"]["rows"]))
    held_out = entry["held_out_logloss"]
    if entry["kept"]:
        assert entry["shift"] == pytest.approx(candidate["shift"], abs=1e-6)
        assert held_out["calibrated"] <= held_out["raw"]
    else:
        assert (entry["scale"], entry["shift"]) == (1.0, 0.0) and held_out["calibrated"] >= held_out["raw"]
    assert set(entry["test"]) == {"before", "after"} and "mean_over_true" in entry["test"]["after"]
    # the factorized graphs carry the same calibration: the load-time parity check passes
    scorer = Scorer(small_bundle)
    assert FactorizedScorer.for_scorer(scorer).check_parity(scorer, rows=500) <= 1e-6


def test_the_lightgbm_graph_carries_the_calibration(dataset, tmp_path):
    from train.gbdt import export_gbdt, gbdt_parity, train_gbdt

    model, _ = train_gbdt(dataset, progress=False, n_estimators=20, early_stopping_rounds=20)
    for calibration in (Calibration(1.0, -0.4), IDENTITY):
        path = export_gbdt(model, dataset.spec, tmp_path / "model.onnx", calibration=calibration)
        names = {t.name for t in onnx.load(str(path)).graph.initializer}
        assert {CALIBRATION_SCALE, CALIBRATION_SHIFT} <= names
        assert gbdt_parity(model, path, dataset.spec, dataset.test.inputs, calibration)["max_abs_diff"] <= 1e-6
    with pytest.raises(ParityError):  # the identity graph is not the shifted model
        gbdt_parity(model, path, dataset.spec, dataset.test.inputs, Calibration(1.0, -0.4))


def test_calibration_study_writes_its_table_json_and_plot(tmp_path):
    from train.studies.calibration import calibration_study

    results = calibration_study(tmp_path / "study", rows=(4000,), seeds=(3,), epochs=1, progress=False)
    [run] = results["runs"]
    assert set(run["test"]) == {"raw", "platt on val", "served"}
    assert run["tolerance"] == pytest.approx(2 / np.sqrt(run["train_clicks"]), abs=1e-4)
    assert (tmp_path / "study" / "data" / "synth-4000-3" / "train.log.txt").is_file()
    assert json.loads((tmp_path / "study" / "calibration.json").read_text()) == results
    assert "| 4,000 | 3 |" in (tmp_path / "study" / "calibration.md").read_text()
    assert (tmp_path / "study" / "calibration.png").stat().st_size > 10_000

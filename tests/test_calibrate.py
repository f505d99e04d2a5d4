"""Calibration: the Bayesian Platt fit recovers a known map and shrinks with few clicks, the served keep rule keeps a
level its posterior is sure of and exports the identity otherwise, a map that does not help on held-out rows is not
kept by the log-loss rules, ECE, the study saves and re-scores its predictions, and every exported graph carries the
calibration within 1e-6."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from bidder.factorized import FactorizedScorer
from bidder.scorer import Scorer
from bidder.spec import default_spec
from train.calibrate import (IDENTITY, KEEP_COVERAGE, MISMATCH_SD, Calibration, apply, choose, choose_by_folds,
                             choose_by_posterior, choose_for_serving, expected_calibration_error, fit_level, fit_platt,
                             held_out_logloss, keep_always, truth_summary)
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


def _model_rows(rng, n, level):
    """``n`` predictions and clicks drawn at ``level`` times the odds the model predicts."""
    z = rng.normal(-4.3, 0.9, n)
    return 1 / (1 + np.exp(-z)), rng.random(n) < 1 / (1 + np.exp(-(z + np.log(level))))


def _factor(choice, probs):
    return apply(probs, choice.calibration).mean() / probs.mean()


@pytest.mark.parametrize("folds", [2, 5])
def test_choose_by_folds_keeps_a_level_that_holds_on_unseen_validation_rows(folds):
    rng = np.random.default_rng(5)
    z = rng.normal(-4.3, 0.9, 300_000)
    probs = 1 / (1 + np.exp(-z))
    high = rng.random(len(z)) < 0.7 * probs  # the model is 1/0.7 too high everywhere
    val = slice(0, 60_000)
    kept = choose_by_folds(probs, high, probs[val], high[val], folds=folds)
    assert kept.kept and _factor(kept, probs) == pytest.approx(0.7, abs=0.03)
    assert kept.judged_on == f"val ({folds} folds, each by the map fitted without it)"
    calibrated = rng.random(len(z)) < probs  # already calibrated: nothing to gain on held-out rows
    left = choose_by_folds(probs, calibrated, probs[val], calibrated[val], folds=folds)
    assert apply(probs, left.candidate.calibration).mean() / probs.mean() == pytest.approx(1.0, abs=0.03)


def test_held_out_logloss_scores_every_validation_row_once_and_refuses_one_fold():
    rng = np.random.default_rng(8)
    train, val = _model_rows(rng, 100_000, 0.7), _model_rows(rng, 20_000, 0.7)
    raw, calibrated = held_out_logloss(*train, *val, folds=4)
    y, p = val[1].astype(float), val[0]
    assert raw == pytest.approx(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)), rel=1e-9)
    assert calibrated < raw  # 30 % too high: every fold's map helps on the rows it did not see
    with pytest.raises(TrainError, match="at least 2 folds"):
        held_out_logloss(*train, *val, folds=1)


def test_the_served_rule_keeps_a_level_its_posterior_is_sure_of():
    # 15 % too high; about 3,600 training and 360 validation clicks: the 90 % interval of the mean factor lies
    # below 1, so the map is kept and brings the mean to the truth
    rng = np.random.default_rng(9)
    train, val = _model_rows(rng, 200_000, 0.85), _model_rows(rng, 20_000, 0.85)
    choice = choose_for_serving(*train, *val)
    low, high = choice.val_mean_factor
    assert choice.kept and high < 1 and choice.calibration == choice.candidate.calibration
    assert choice.judged_on == f"posterior ({KEEP_COVERAGE:.0%} credible region of scale and shift excludes the identity)"
    assert choice.candidate.identity_distance2() > -2 * np.log(1 - KEEP_COVERAGE)
    assert _factor(choice, val[0]) == pytest.approx(0.85, abs=0.04)
    assert low < _factor(choice, val[0]) < high


def test_the_served_rule_exports_the_identity_for_a_calibrated_model_but_in_about_one_draw_in_ten():
    # calibrated models: the candidate moves the map by its noise, the identity stays inside the 90 % credible
    # region and is exported; the test's size is 10 %, so about one draw in ten keeps a (small) map
    kept = 0
    for seed in range(10, 20):
        rng = np.random.default_rng(seed)
        train, val = _model_rows(rng, 200_000, 1.0), _model_rows(rng, 20_000, 1.0)
        choice = choose_for_serving(*train, *val)
        outside = choice.candidate.identity_distance2() > -2 * np.log(1 - KEEP_COVERAGE)
        assert choice.kept == outside
        if not choice.kept:
            assert choice.calibration == IDENTITY and _factor(choice, val[0]) == pytest.approx(1.0, abs=1e-12)
        else:
            assert 0.93 < _factor(choice, val[0]) < 1.07
        kept += choice.kept
    assert kept <= 2


def test_the_served_rule_keeps_a_tilt_at_the_right_level_which_the_level_interval_alone_would_drop():
    # the mean is right, the model is overconfident (true slope 0.75 in logit): the level's interval holds 1, the
    # credible region of (scale, shift) does not hold the identity
    rng = np.random.default_rng(13)

    def rows(n):
        z = rng.normal(-4.3, 0.9, n)
        p = 1 / (1 + np.exp(-z))
        centre = np.sum(p * (1 - p) * z) / np.sum(p * (1 - p))  # where a change of slope keeps the mean
        return p, rng.random(n) < 1 / (1 + np.exp(-(0.75 * (z - centre) + centre)))

    train, val = rows(200_000), rows(40_000)
    served = choose_for_serving(*train, *val)
    level = choose_by_posterior(*train, *val, judge="level")
    assert served.kept and served.calibration.scale < 0.85
    assert not level.kept and level.val_mean_factor[0] < 1 < level.val_mean_factor[1]
    with pytest.raises(TrainError, match="judge must be 'map' or 'level'"):
        choose_by_posterior(*train, *val, judge="tilt")


def test_the_served_rule_with_too_few_clicks_exports_the_identity_or_a_shrunk_map():
    # 20 % too high, but about 90 training and 9 validation clicks: the posterior cannot tell, and even the candidate
    # moves the mean less than the clicks alone say
    rng = np.random.default_rng(11)
    train, val = _model_rows(rng, 5_000, 0.8), _model_rows(rng, 500, 0.8)
    choice = choose_for_serving(*train, *val)
    clicks_say = (train[1].sum() + val[1].sum()) / (train[0].sum() + val[0].sum())
    assert not choice.kept and choice.calibration == IDENTITY
    assert abs(np.log(apply(val[0], choice.candidate.calibration).mean() / val[0].mean())) < abs(np.log(clicks_say))


def test_the_posterior_rule_keeps_a_few_per_cent_that_validation_log_loss_cannot_confirm():
    # 6 % too high, as the 1M-row runs are: 10,000 training and 900 validation clicks. The posterior, with the
    # training clicks behind its prior, is sure of the level; the held-out log loss of 900 clicks moves by less
    # than its own noise (about 1/sqrt(clicks) times the level error per click)
    rng = np.random.default_rng(12)
    train, val = _model_rows(rng, 550_000, 0.94), _model_rows(rng, 50_000, 0.94)
    choice = choose_by_posterior(*train, *val, coverage=0.90, judge="level")
    assert choice.kept and choice.val_mean_factor[1] < 1 and choose_for_serving(*train, *val).kept
    assert _factor(choice, val[0]) == pytest.approx(0.94, abs=0.025)
    gain = (choice.logloss_raw - choice.logloss_calibrated) * len(val[1])  # summed over the validation rows
    assert gain < 2 * np.sqrt(val[1].sum()) * 0.06
    always = keep_always(*train, *val)
    assert always.kept and always.calibration == choice.calibration


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
    assert entry["judged_on"] == f"posterior ({KEEP_COVERAGE:.0%} credible region of scale and shift excludes the identity)"
    assert entry["kept"] == (entry["identity_distance2"] > -2 * np.log(1 - KEEP_COVERAGE))
    assert entry["scale"] > 0
    candidate = entry["candidate"]
    assert candidate["interval_95"]["shift"][0] <= candidate["shift"] <= candidate["interval_95"]["shift"][1]
    assert candidate["clicks"] == int(round(meta["metrics"]["val"]["ctr"] * meta["metrics"]["val"]["rows"]))
    if entry["kept"]:
        assert entry["shift"] == pytest.approx(candidate["shift"], abs=1e-6)
    else:
        assert (entry["scale"], entry["shift"]) == (1.0, 0.0)
    assert set(entry["held_out_logloss"]) == {"raw", "calibrated"}
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
    from train.studies.calibration import KEEP_RULES, calibration_study, predictions_path, rescore

    results = calibration_study(tmp_path / "study", rows=(4000,), seeds=(3,), epochs=1, progress=False)
    [run] = results["runs"]
    assert set(run["test"]) == {"raw", "platt on val", "served"}
    assert run["tolerance"] == pytest.approx(2 / np.sqrt(run["train_clicks"]), abs=1e-4)
    assert (tmp_path / "study" / "data" / "synth-4000-3" / "train.log.txt").is_file()
    assert json.loads((tmp_path / "study" / "calibration.json").read_text()) == results
    assert "| 4,000 | 3 |" in (tmp_path / "study" / "calibration.md").read_text()
    assert (tmp_path / "study" / "calibration.png").stat().st_size > 10_000
    assert set(run["rules"]) == set(KEEP_RULES) and run["rules"]["posterior map 90 %"]["kept"] == run["served"]["kept"]
    with np.load(predictions_path(tmp_path / "study", 4000, 3)) as saved:
        assert {f"{split}_{column}" for split in ("train", "val", "test") for column in ("prob", "label", "pctr_true")
                } <= set(saved.files)
        assert int(saved["test_label"].sum()) == run["test_clicks"]
    # re-scored from the saved predictions, without training: the same report
    again = rescore(tmp_path / "study", tmp_path / "again", rows=(4000,), seeds=(3,), progress=False)
    assert again == results
    assert (tmp_path / "again" / "calibration.md").read_text() == (tmp_path / "study" / "calibration.md").read_text()
    with pytest.raises(TrainError, match="no saved predictions for 1 of 2 runs"):
        rescore(tmp_path / "study", tmp_path / "again", rows=(4000,), seeds=(3, 4), progress=False)

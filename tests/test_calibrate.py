"""Calibration: Platt scaling recovers a known map, ECE, and the calibrated graph keeps parity."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from bidder.factorized import FactorizedScorer
from bidder.scorer import Scorer
from bidder.spec import default_spec
from train.calibrate import Calibration, apply, expected_calibration_error, fit_platt
from train.data.dataset import load_dataset
from train.errors import ParityError, TrainError
from train.export import CALIBRATION_SCALE, CALIBRATION_SHIFT, check_parity, export_lean
from train.trainer import train_model


def test_platt_recovers_a_known_map():
    rng = np.random.default_rng(0)
    z = rng.normal(-4.0, 1.2, 400_000)
    labels = rng.random(len(z)) < 1 / (1 + np.exp(-(1.3 * z + 0.4)))
    fitted = fit_platt(1 / (1 + np.exp(-z)), labels)
    assert fitted.scale == pytest.approx(1.3, abs=0.03)
    assert fitted.shift == pytest.approx(0.4, abs=0.12)


def test_platt_matches_the_observed_rate_on_its_own_data():
    # with an intercept, the maximum-likelihood fit's mean prediction equals the observed rate
    rng = np.random.default_rng(1)
    probs = rng.uniform(0.001, 0.03, 50_000)
    labels = rng.random(len(probs)) < 1.3 * probs
    calibrated = apply(probs, fit_platt(probs, labels))
    assert calibrated.mean() == pytest.approx(labels.mean(), rel=1e-6)


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


def test_trained_bundle_is_calibrated_on_validation(small_bundle):
    meta = json.loads((small_bundle / "meta.json").read_text())
    entry = meta["calibration"]
    assert entry["method"] == "platt" and entry["fitted_on"] == "val" and entry["scale"] > 0
    assert set(entry["test"]) == {"before", "after"}
    val = meta["metrics"]["val"]
    assert val["mean_prediction"] == pytest.approx(val["ctr"], rel=1e-3)
    # the factorized graphs carry the same calibration: the load-time parity check passes
    scorer = Scorer(small_bundle)
    assert FactorizedScorer.for_scorer(scorer).check_parity(scorer, rows=500) <= 1e-6

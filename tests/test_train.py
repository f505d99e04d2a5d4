"""Training and bundles: the bundle round trip, hyper-parameter checks, early stopping, the study."""
from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
import torch
from deepctr_torch.inputs import combined_dnn_input

from bidder.spec import default_spec, load_spec
from train.__main__ import main
from train.studies.compare import compare
from train.data.dataset import load_dataset
from train.data.synthetic import generate
from train.errors import DataError, TrainError
from train.fit import fit_bundle
from train.crosses import C_GRID, CROSS_BITS, design_matrix, fit_crossed_logreg
from train.models import build_model, deepctr_input, resolve_hyperparameters
from train.trainer import train_model

META_KEYS = {"model_id", "architecture", "created", "spec_digest", "onnx_sha256", "inputs", "output",
             "hyperparameters", "data", "metrics", "parity", "versions"}


@pytest.fixture(scope="module")
def meta(small_bundle) -> dict:
    return json.loads((small_bundle / "meta.json").read_text())


def test_bundle_round_trip(small_bundle, meta):
    spec = default_spec()
    assert load_spec(small_bundle) == spec
    assert sorted(p.name for p in small_bundle.iterdir()) == ["candidate.onnx", "factorized.onnx", "meta.json",
                                                             "model.onnx", "spec.json"]  # DeepFM: factorized too
    assert META_KEYS <= set(meta)
    assert meta["architecture"] == "deepfm"
    assert meta["spec_digest"] == spec.digest
    assert meta["onnx_sha256"] == hashlib.sha256((small_bundle / "model.onnx").read_bytes()).hexdigest()
    assert re.fullmatch(r"deepfm-\d{14}-[0-9a-f]{8}", meta["model_id"])
    assert meta["model_id"].endswith(meta["onnx_sha256"][:8])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta["created"])
    assert meta["inputs"] == {"sparse": [None, 18], "usertag": [None, 16]}
    assert meta["output"] == "ctr"
    assert set(meta["versions"]) == {"torch", "onnx", "onnxruntime", "deepctr_torch", "python"}


def test_bundle_metrics_data_and_parity(meta):
    assert meta["data"]["source"] == "synthetic"
    assert len(meta["data"]["digest"]) == 64
    assert sum(meta["data"]["rows"].values()) == 20000
    for split in ("train", "val", "test", "oracle"):
        assert {"auc", "logloss"} <= set(meta["metrics"][split])
        assert 0.0 < meta["metrics"][split]["logloss"] < 1.0
    assert 0.5 < meta["metrics"]["oracle"]["auc"] < 1.0
    parity = meta["parity"]
    assert parity["max_abs_diff"] <= 1e-6 and parity["rows"] >= 1000
    assert parity["batch_sizes"][:2] == [1, 64]
    hp = meta["hyperparameters"]
    assert (hp["embedding_dim"], hp["lr"], hp["batch_size"], hp["dnn_hidden_units"]) == (8, 4e-3, 2048, [256, 128, 64])
    assert hp["sparse_tables"] is True and (hp["table_eps"], hp["vector_eps"]) == (0.1, 0.1)
    assert meta["training"]["epochs_run"] == 1 and meta["training"]["processes"] == 1


def test_synthetic_data_gives_the_same_digest(synthetic_data, meta, tmp_path):
    generate(tmp_path, rows=20000, seed=7)
    again = load_dataset(tmp_path, default_spec(), progress=False)
    assert again.digest == meta["data"]["digest"]


def test_hyperparameters_are_checked_by_name():
    assert resolve_hyperparameters("autoint")["embedding_dim"] >= 16
    assert resolve_hyperparameters("deepfm", {"dnn_hidden_units": "128,64"})["dnn_hidden_units"] == [128, 64]
    assert resolve_hyperparameters("deepfm", {"lr": "1e-3"})["lr"] == 1e-3
    with pytest.raises(TrainError, match="'att_head_num' is not used by deepfm"):
        resolve_hyperparameters("deepfm", {"att_head_num": 2})
    with pytest.raises(TrainError, match="'batch_size': expected int"):
        resolve_hyperparameters("deepfm", {"batch_size": "big"})
    with pytest.raises(TrainError, match="'embedding_dim' .* multiple of 'att_head_num'"):
        resolve_hyperparameters("autoint", {"embedding_dim": 18})
    with pytest.raises(TrainError, match="unknown model 'wide'"):
        resolve_hyperparameters("wide")


def test_early_stopping_keeps_the_best_epoch(synthetic_data):
    data = load_dataset(synthetic_data, default_spec(), progress=False)
    result = train_model(data, "logreg", epochs=3, patience=1, progress=False)
    aucs = [h["val_auc"] for h in result.history]
    assert 1 <= len(aucs) <= 3
    assert result.best_epoch == 1 + int(np.argmax(aucs))
    assert result.metrics["val"]["auc"] == pytest.approx(max(aucs), abs=1e-6)


def test_training_is_reproducible(synthetic_data):
    data = load_dataset(synthetic_data, default_spec(), progress=False)
    a = train_model(data, "logreg", epochs=1, seed=3, progress=False)
    b = train_model(data, "logreg", epochs=1, seed=3, progress=False)
    assert a.metrics["test"] == b.metrics["test"]


def test_the_fit_weighs_each_rows_loss_by_its_weight():
    """Two exchanges, each half clicked; on exchange 1 a click weighs 4: the weighted fit learns 0.8 there, 0.5 on
    exchange 2; unweighted, both 0.5."""
    from bidder import Featurizer
    from train.data.dataset import Dataset, Split
    from train.evaluate import predict

    spec = default_spec()

    def record(exchange: str) -> dict:
        return {"weekday": 3, "hour": 14, "useragent": "Mozilla/5.0 (Windows NT 6.1)", "IP": "1.2.3.*", "region": "1",
                "city": "2", "adexchange": exchange, "domain": "example.com", "url": None, "urlid": None,
                "usertag": None, "slotid": "s1", "slotwidth": "300", "slotheight": "250", "slotvisibility": "Na",
                "slotformat": "0", "slotprice": "7", "creative": "cr", "advertiser": "1458"}

    exchange = np.array(["1", "2"] * 200)
    labels = np.tile([1, 1, 0, 0], 100).astype(np.float32)
    inputs = Featurizer(spec).transform([record(e) for e in exchange])
    probe = deepctr_input(Featurizer(spec).transform([record("1"), record("2")]), spec)
    predicted = {}
    for name, weights in (("weighted", np.where((exchange == "1") & (labels == 1), 4.0, 1.0)), ("unweighted", None)):
        split = Split(inputs, labels, None, None if weights is None else weights.astype(np.float32))
        trained = train_model(Dataset(spec, split, split, split, "hand-made", "", "", "random"), "logreg", epochs=1,
                              progress=False, batch_size=16, lr=0.05)
        predicted[name] = predict(trained.model, probe)
    assert predicted["weighted"][0] - predicted["weighted"][1] > 0.15
    assert abs(predicted["unweighted"][0] - predicted["unweighted"][1]) < 0.03


def test_fit_bundle_reports_bad_data_and_writes_nothing(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="no train.log.txt"):
        fit_bundle(tmp_path / "data", "deepfm", tmp_path / "bundle", progress=False)
    assert not (tmp_path / "bundle").exists()


def test_cli_rejects_unknown_hyperparameter(synthetic_data, tmp_path, capsys):
    code = main(["fit", "--data", str(synthetic_data), "--model", "logreg", "--out", str(tmp_path / "b"),
                 "--quiet", "--set", "dropout=0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "hyper-parameter 'dropout' is not used by logreg" in err and "Traceback" not in err


def test_compare_writes_table_plot_and_bundles(tmp_path):
    data = tmp_path / "data"
    generate(data, rows=6000, seed=5)
    results = compare(data, tmp_path / "out", models=("deepfm", "logreg"), epochs=1, progress=False)
    names = [r["model"] for r in results["rows"]]
    assert names == ["deepfm", "deepfm (stock deepctr graph)", "logreg"]
    for row in results["rows"]:
        assert row["latency_1_us"] > 0 and row["latency_b9_us"] > 0 and row["latency_64_us"] > 0
        assert row["onnx_bytes"] > 0 and row["train_seconds"] > 0 and 0 < row["auc"] < 1 and row["logloss"] > 0
        assert 0.5 < row["calibration"] < 2
        assert row["parity_max_abs_diff"] <= 1e-6
    table = (tmp_path / "out" / "compare.md").read_text()
    assert "| deepfm | lean |" in table and "stock" in table
    assert (tmp_path / "out" / "compare.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["rows"] == results["rows"]
    for model in ("deepfm", "logreg"):
        assert (tmp_path / "out" / model / "model.onnx").exists()
    assert "deepfm_within_0.005_of_oracle" in results["targets"]
    ref = results["reference"]
    assert ref["crosses"] == ["advertiser × domain", "creative × slotvisibility", "hour × region", "usertag × advertiser"]
    assert 0.5 < ref["test"]["auc"] < 1.0 and ref["C"] in C_GRID
    assert "Reference, not served: logistic regression" in table


def test_compare_cli_runs_the_lightgbm_row(tmp_path, capsys):
    data = tmp_path / "data"
    generate(data, rows=6000, seed=5)
    code = main(["compare", "--data", str(data), "--out", str(tmp_path / "out"), "--models", "lightgbm",
                 "--no-reference", "--quiet", "--set", "lightgbm.n_estimators=30"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    [row] = json.loads(captured.out)["rows"]
    assert row["model"] == "lightgbm" and row["graph"] == "lean" and row["parity_max_abs_diff"] <= 1e-6
    assert row["latency_b9_us"] > 0 and row["train_seconds"] > 0 and 0 < row["parameters"] <= 30
    assert {"auc", "logloss", "calibration", "latency_b9_us", "train_seconds"} <= set(row)
    meta = json.loads((tmp_path / "out" / "lightgbm" / "meta.json").read_text())
    assert meta["architecture"] == "lightgbm" and meta["calibration"]["fitted_on"] == "train, then val"
    assert "| lightgbm | lean |" in (tmp_path / "out" / "compare.md").read_text()


def test_compare_can_skip_the_reference(tmp_path):
    data = tmp_path / "data"
    generate(data, rows=3000, seed=6)
    results = compare(data, tmp_path / "out", models=("logreg",), epochs=1, progress=False, reference=False)
    assert results["reference"] is None
    assert "Reference" not in (tmp_path / "out" / "compare.md").read_text()


def test_deep_towers_start_alive():
    """deepctr's N(0, 1e-4) tower weights leave a dead DNN; the default Glorot init does not."""
    spec = default_spec()
    x = torch.from_numpy(deepctr_input(spec.allocate(256), spec))
    for column, f in enumerate(spec.single_fields):
        x[:, column] = torch.randint(1, f.buckets, (256,)).float()
    for architecture in ("deepfm", "autoint", "dcnv2"):
        hp = resolve_hyperparameters(architecture, {"init_std": 0.01})
        stds = {}
        for how in ("glorot", "deepctr"):
            model = build_model(architecture, spec, {**hp, "dnn_init": how}, seed=0)
            with torch.no_grad():
                embedded, dense = model.input_from_feature_columns(x, model.dnn_feature_columns, model.embedding_dict)
                stds[how] = float(model.dnn(combined_dnn_input(embedded, dense)).std(dim=0).mean())  # across rows
        assert stds["glorot"] > 20 * stds["deepctr"], (architecture, stds)
    with pytest.raises(TrainError, match="'dnn_init': expected 'glorot' or 'deepctr'"):
        resolve_hyperparameters("deepfm", {"dnn_init": "he"})


def test_cross_design_matrix_counts_every_value_and_pair():
    spec = default_spec()
    inputs = spec.allocate(3)
    inputs["sparse"][:] = np.arange(1, len(spec.single_fields) + 1)
    inputs["usertag"][0, :2] = [5, 9]          # two tags, the rest padding
    inputs["usertag"][1, :1] = [5]
    x = design_matrix(inputs, spec, [("creative", "slotvisibility"), ("usertag", "advertiser")])
    singles = len(spec.single_fields)
    assert x.shape == (3, sum(f.buckets for f in spec.fields) + 2 * 2 ** CROSS_BITS)
    assert list(np.asarray(x.sum(axis=1)).ravel()) == [singles + 2 + 1 + 2, singles + 1 + 1 + 1, singles + 1]
    # identical rows share columns; one more tag gives one more pair column
    assert set(x[1].indices) < set(x[0].indices)
    with pytest.raises(TrainError, match="no field 'keyword'"):
        design_matrix(inputs, spec, [("keyword", "advertiser")])


def test_crossed_logreg_learns_the_generators_interactions(synthetic_data):
    data = load_dataset(synthetic_data, default_spec(), progress=False)
    plain = fit_crossed_logreg(data, crosses=(), c_grid=(0.03,))
    crossed = fit_crossed_logreg(data, c_grid=(0.03,))
    # more columns give more parameters by construction; what the crosses must buy is fit on held-out rows
    # (on this data: test AUC 0.700 vs 0.684, log loss 0.0778 vs 0.0786)
    assert crossed["test"]["auc"] > plain["test"]["auc"] + 0.005
    assert crossed["test"]["logloss"] < plain["test"]["logloss"]
    assert crossed["val"]["auc"] > plain["val"]["auc"]
    assert {"auc", "logloss"} <= set(crossed["test"]) and crossed["C"] == 0.03

"""``python -m train compress``: every method writes a bundle the bidder serves, scoring like its own graph."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from bidder.factorized import FactorizedScorer
from bidder.scorer import Scorer
from train.__main__ import main

TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def dataset(synthetic_data):
    from bidder.spec import default_spec
    from train.data.dataset import load_dataset

    return load_dataset(synthetic_data, default_spec(), progress=False)


@pytest.fixture(scope="session")
def autoint_bundle(request, tmp_path_factory):
    from conftest import _trained_bundle

    return _trained_bundle(request, tmp_path_factory, "autoint")


def _served_equals_own_graph(bundle, records) -> np.ndarray:
    """The bidder's scores for ``records`` equal plain ONNX Runtime on the bundle's model.onnx."""
    scorer = Scorer(bundle)
    if scorer.factorized_files():
        FactorizedScorer.for_scorer(scorer)  # what `bidder serve` does at load: checked against model.onnx
    served = scorer.predict(records)
    inputs = scorer.spec.allocate(len(records))
    scorer.featurizer.transform_into(inputs, records)
    plain = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = plain.run(["ctr"], inputs)[0].reshape(-1)
    assert np.max(np.abs(served - expected)) <= TOLERANCE
    with pytest.raises(ValueError, match=r"^record 1: "):
        scorer.predict([records[0], {"slotprice": "cheap"}])
    return served


METHODS = [
    ("int8-dynamic", [], False),
    ("int8-dynamic", ["--set", "ops=all"], False),
    ("int8-dynamic", ["--set", "ops=tables"], False),
    ("int8-static", ["--set", "format=qdq", "--set", "calibration_rows=256"], True),
    ("int8-static", ["--set", "format=qoperator", "--set", "calibration_rows=256"], True),
    ("int8-embeddings", [], False),
    ("int8-embeddings", ["--set", "dtype=fp16"], False),
    ("prune", ["--set", "importance_rows=2000"], True),
    ("distill", ["--epochs", "1", "--set", "student=16"], True),
    ("distill", ["--epochs", "1", "--set", "student=fm"], True),
]


@pytest.mark.slow
@pytest.mark.parametrize("method,settings,with_data", METHODS)
def test_each_method_writes_a_bundle_the_bidder_serves(small_bundle, synthetic_data, sample_records, tmp_path,
                                                       capsys, method, settings, with_data):
    out = tmp_path / "compressed"
    data = ["--data", str(synthetic_data)] if with_data else []
    assert main(["compress", "--bundle", str(small_bundle), "--method", method, "--out", str(out), "--quiet",
                 *data, *settings]) == 0
    meta = json.loads((out / "meta.json").read_text())
    source = json.loads((small_bundle / "meta.json").read_text())
    entry = meta["compression"]
    assert entry["method"] == method and entry["source_model_id"] == source["model_id"]
    assert entry["size_ratio"] == round((out / "model.onnx").stat().st_size
                                        / (small_bundle / "model.onnx").stat().st_size, 4)
    if with_data:
        paired = entry["paired_test_auc"]
        assert paired["low"] <= paired["delta"] <= paired["high"]
    else:
        assert entry["paired_test_auc"] is None
    assert json.loads(capsys.readouterr().out)["compression"]["method"] == method
    _served_equals_own_graph(out, sample_records[:40])
    if method == "int8-embeddings" or settings == ["--set", "ops=tables"]:  # tables alone compressed: graphs too
        assert meta["graphs"]["factorized"]["parity"]["max_abs_diff"] <= TOLERANCE
        assert (out / "factorized.onnx").stat().st_size < (small_bundle / "factorized.onnx").stat().st_size * 0.6
        assert entry["size_ratio"] < 1.0
    elif method.startswith("int8"):
        assert meta["graphs"] == {} and not (out / "factorized.onnx").exists()
        assert entry["size_ratio"] < 1.0
    else:  # a trained float32 student: its ONNX equals its torch model, factorized graphs when it has a DNN
        assert meta["parity"]["max_abs_diff"] <= TOLERANCE
        assert bool(meta.get("graphs")) == ("student=fm" not in settings)


def test_int8_embeddings_are_int8_per_row_and_close_to_the_source(small_bundle, dataset, tmp_path):
    import onnx
    from onnx import numpy_helper

    from train.compress import compress_bundle, onnx_probabilities

    entry = compress_bundle(small_bundle, "int8-embeddings", tmp_path / "q", data=dataset, progress=False)
    tables = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "q" / "model.onnx")).graph.initializer}
    assert tables["embeddings.single_table_int8"].dtype == np.int8
    assert tables["embeddings.single_table_scale"].shape == (len(tables["embeddings.single_table_int8"]), 1)
    assert entry["size_ratio"] < 0.45
    source = onnx_probabilities(small_bundle / "model.onnx", dataset.test.inputs)
    quantized = onnx_probabilities(tmp_path / "q" / "model.onnx", dataset.test.inputs)
    assert 0 < np.max(np.abs(source - quantized)) < 1e-3
    assert abs(entry["paired_test_auc"]["delta"]) < 0.002


def test_the_model_read_back_from_a_bundle_is_its_graph(small_bundle, autoint_bundle, dataset):
    from train.bundle import read_bundle
    from train.compress import deepctr_from_bundle
    from train.export import torch_probabilities

    for bundle in (small_bundle, autoint_bundle):
        meta, spec = read_bundle(bundle)
        model, hp, calibration = deepctr_from_bundle(bundle, meta, spec, dataset)  # raises ParityError above 1e-6
        assert calibration is not None and calibration.scale > 0  # trained bundles are calibrated
        assert hp["dnn_hidden_units"] == meta["hyperparameters"]["dnn_hidden_units"]
        got = torch_probabilities(model, {k: v[:500] for k, v in dataset.test.inputs.items()}, spec)
        assert got.shape == (500,) and np.all((got > 0) & (got < 1))


@pytest.mark.slow
def test_heads_removes_autoint_heads_and_the_graph_computes_only_the_kept_ones(autoint_bundle, dataset, tmp_path,
                                                                               sample_records):
    import onnx

    from train.compress import compress_bundle

    entry = compress_bundle(autoint_bundle, "heads", tmp_path / "h", data=dataset, progress=False,
                            settings={"remove": "0.5", "importance_rows": "2000"})
    meta = json.loads((tmp_path / "h" / "meta.json").read_text())
    kept = meta["hyperparameters"]["att_kept_heads"]
    assert entry["details"]["heads"] == {"before": 12, "after": 6} and sum(map(len, kept)) == 6
    assert all(len(layer) >= 1 for layer in kept)
    assert meta["parity"]["max_abs_diff"] <= TOLERANCE
    shapes = {t.name: list(t.dims) for t in onnx.load(str(tmp_path / "h" / "model.onnx")).graph.initializer}
    for i, layer in enumerate(kept):
        assert shapes[f"head.attention.{i}.w_query"] == [16, 4 * len(layer)]
    _served_equals_own_graph(tmp_path / "h", sample_records[:40])
    # a head-pruned bundle reads back (and compresses further)
    again = compress_bundle(tmp_path / "h", "int8-embeddings", tmp_path / "hq", data=dataset, progress=False)
    assert again["source_model_id"] == meta["model_id"]
    _served_equals_own_graph(tmp_path / "hq", sample_records[:40])


def test_prune_keeps_the_most_important_neurons(small_bundle, dataset, tmp_path):
    from train.compress import compress_bundle

    entry = compress_bundle(small_bundle, "prune", tmp_path / "p", data=dataset, progress=False,
                            settings={"keep": "0.25", "epochs": "1", "importance_rows": "2000"})
    assert entry["details"]["dnn_hidden_units"] == {"before": [256, 128, 64], "after": [64, 32, 16]}
    assert entry["details"]["parameters"]["after"] < entry["details"]["parameters"]["before"]
    assert entry["details"]["fine_tune"][0]["epoch"] == 0  # the pruned model before fine-tuning is a candidate


@pytest.mark.parametrize("args,message", [
    (["--method", "int4"], "--method 'int4': unknown; choose one of int8-dynamic"),
    (["--method", "prune"], "--method prune needs training rows: pass --data DIR"),
    (["--method", "distill"], "--method distill needs training rows"),
    (["--method", "heads"], "--method heads needs training rows"),
    (["--method", "int8-dynamic", "--set", "bits=4"], "not a setting of int8-dynamic"),
    (["--method", "int8-dynamic", "--epochs", "2"], "--epochs: int8-dynamic does not train"),
    (["--method", "int8-static", "--data", "DATA", "--set", "format=qint"], "format=qint: choose one of qdq, qoperator"),
    (["--method", "distill", "--data", "DATA", "--set", "student=wide"], "student=wide: expected 'fm' or"),
    (["--method", "prune", "--data", "DATA", "--set", "keep=2"], "keep=2.0: must lie in [0, 1]"),
])
def test_compress_refuses_bad_arguments_with_one_line(small_bundle, tmp_path, capsys, args, message):
    args = [a.replace("DATA", str(tmp_path)) for a in args]
    status = main(["compress", "--bundle", str(small_bundle), "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_compress_refuses_what_is_not_a_bundle_and_an_existing_out(small_bundle, logreg_bundle, tmp_path, capsys):
    assert main(["compress", "--bundle", str(tmp_path), "--method", "int8-dynamic", "--out", str(tmp_path / "o")]) == 2
    assert "not a model bundle (needs model.onnx and meta.json)" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "model.onnx").write_bytes(b"keep me")
    assert main(["compress", "--bundle", str(small_bundle), "--method", "int8-dynamic", "--out", str(taken)]) == 2
    assert "already holds a bundle (model.onnx); pass --force" in capsys.readouterr().err
    assert (taken / "model.onnx").read_bytes() == b"keep me"
    assert main(["compress", "--bundle", str(small_bundle), "--method", "int8-dynamic", "--out",
                 str(small_bundle), "--force"]) == 2
    assert "is the source bundle" in capsys.readouterr().err
    assert main(["compress", "--bundle", str(logreg_bundle), "--method", "heads", "--data", str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 2
    assert "heads prunes AutoInt attention heads, this bundle is 'logreg'" in capsys.readouterr().err


def test_paired_auc_delta_is_the_auc_difference_with_an_interval_around_it():
    from sklearn.metrics import roc_auc_score

    from train.evaluate import paired_auc_delta

    rng = np.random.default_rng(3)
    labels = rng.random(20000) < 0.05
    base = rng.random(20000) + 0.4 * labels
    other = np.round(base + rng.normal(0, 0.3, 20000), 2)  # worse, with ties
    paired = paired_auc_delta(labels, base, other, resamples=200)
    expected = roc_auc_score(labels, other) - roc_auc_score(labels, base)
    assert paired["delta"] == pytest.approx(expected, abs=1e-6)
    assert paired["low"] < paired["delta"] < paired["high"] < 0
    same = paired_auc_delta(labels, base, base, resamples=50)
    assert same["delta"] == same["low"] == same["high"] == 0.0


def test_the_study_runs_the_named_variants_with_the_ones_they_start_from(tmp_path, capsys):
    from train.studies.compress_study import select_variants

    assert [name for name, *_ in select_variants("deepfm", ["distill 64,32 + int8-embeddings", "int8-embeddings"])] \
        == ["int8-embeddings", "distill 64,32", "distill 64,32 + int8-embeddings"]
    assert select_variants("autoint", ["distill 64,32 + int8-embeddings"]) == []  # not a variant of AutoInt's plan
    assert len(select_variants("deepfm", None)) == len(select_variants("deepfm", [n for n, *_ in
                                                                                   select_variants("deepfm", None)]))
    status = main(["compress-study", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--variant", "int4"])
    err = capsys.readouterr().err
    assert status == 2 and "--variant 'int4': not a variant of the study" in err and len(err.strip().splitlines()) == 1


def test_bench_bundles_times_bundles_taking_turns(tmp_path, capsys):
    import shutil

    from bench.__main__ import main as bench_main
    from bidder import DEFAULT_BUNDLE

    copy = shutil.copytree(DEFAULT_BUNDLE, tmp_path / "copy")
    out = tmp_path / "bundles.json"
    assert bench_main(["bundles", "--bundle", str(DEFAULT_BUNDLE), "--bundle", str(copy), "--rounds", "1",
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    first, second = result["us_per_request"]
    assert set(result["us_per_request"][first]) == {f"{s}_at{a}" for s in ("lone", "batch8", "batch32") for a in (2, 1)}
    assert result["ratio_to_first"][first]["lone_at2"] == 1.0 and out.with_suffix(".png").is_file()
    assert result["prices"][first] == result["prices"][second]  # the same model bids the same
    capsys.readouterr()
    assert bench_main(["bundles", "--bundle", str(copy), "--out", str(out)]) == 2
    assert "give two or more bundles" in capsys.readouterr().err
    meta = json.loads((copy / "meta.json").read_text())
    del meta["graphs"]["market"]
    for name in ("market.onnx", "market-terms.npz"):  # the graph's files, and their digests
        (copy / name).unlink()
        del meta["files"][name]
    (copy / "meta.json").write_text(json.dumps(meta))
    assert bench_main(["bundles", "--bundle", str(DEFAULT_BUNDLE), "--bundle", str(copy), "--out", str(out)]) == 2
    assert "has no win-price model" in capsys.readouterr().err

"""``python -m train fit``: arguments are checked before any data is read; an existing bundle needs --force."""
from __future__ import annotations

import pytest

import train.fit
from train.__main__ import main


@pytest.fixture
def data_never_read(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the data was read before the arguments were checked")

    monkeypatch.setattr(train.fit, "load_dataset", refuse)


@pytest.mark.parametrize("extra,message", [
    (["--set", "learning_rate=0.1"], "hyper-parameter 'learning_rate' is not used by deepfm"),
    (["--set", "batch_size=big"], "hyper-parameter 'batch_size'"),
    (["--epochs", "0"], "epochs must be a positive integer"),
    (["--model", "tabtransformer", "--set", "heads=3"], "'embedding_dim' (16) must be a multiple of 'heads' (3)"),
    (["--model", "tabtransformer", "--set", "dropout=1.5"], "hyper-parameter 'dropout' must be in [0, 1)"),
    (["--model", "tabtransformer", "--set", "layers=0"], "hyper-parameter 'layers' must be positive"),
])
def test_fit_checks_settings_before_reading_data(tmp_path, data_never_read, capsys, extra, message):
    model = [] if "--model" in extra else ["--model", "deepfm"]
    status = main(["fit", "--data", str(tmp_path), *model, "--out", str(tmp_path / "b"), *extra])
    err = capsys.readouterr().err
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1


def test_compare_checks_settings_before_reading_data(tmp_path, monkeypatch, capsys):
    import train.studies.compare

    monkeypatch.setattr(train.studies.compare, "compare", lambda *a, **k: pytest.fail("compare ran"))
    status = main(["compare", "--data", str(tmp_path), "--models", "deepfm,dcnv2", "--set", "dcnv2.cross_num=x"])
    assert status == 2 and "cross_num" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--models", "lightgbm", "--set", "lightgbm.num_leaves=many"], "hyper-parameter 'num_leaves': expected int"),
    (["--models", "lightgbm", "--set", "lightgbm.num_leaves=0"], "hyper-parameter 'num_leaves' must be positive"),
    (["--models", "lightgbm", "--set", "lightgbm.depth=3"], "hyper-parameter 'depth' is not used by lightgbm"),
    (["--models", "lightgbm", "--set", "lightgbm.feature_fraction=2"], "'feature_fraction' must be in (0, 1]"),
    (["--models", "xgboost"], "--models: unknown model(s) xgboost"),
])
def test_compare_refuses_bad_lightgbm_settings_in_one_line(tmp_path, monkeypatch, capsys, extra, message):
    import train.studies.compare

    monkeypatch.setattr(train.studies.compare, "compare", lambda *a, **k: pytest.fail("compare ran"))
    status = main(["compare", "--data", str(tmp_path), *extra])
    err = capsys.readouterr().err
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("extra,message", [
    (["--rows", "200k"], "--rows '200k': expected comma-separated integers"),
    (["--rows", "500"], "expected row counts of at least 1000"),
    (["--seeds", "-1"], "non-negative seeds"),
    (["--from-predictions", "no-such-study"], "no saved predictions for 9 of 9 runs"),
])
def test_calibration_study_refuses_bad_sizes_in_one_line(tmp_path, capsys, extra, message):
    status = main(["calibration-study", "--out", str(tmp_path / "study"), "--quiet", *extra])
    err = capsys.readouterr().err
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1


def test_fit_refuses_to_overwrite_a_bundle_without_force(tmp_path, data_never_read, capsys):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"the model someone wants to keep")
    args = ["fit", "--data", str(tmp_path), "--model", "deepfm", "--out", str(out)]
    assert main(args) == 2
    assert "already holds a bundle (model.onnx); pass --force" in capsys.readouterr().err
    assert (out / "model.onnx").read_bytes() == b"the model someone wants to keep"
    with pytest.raises(AssertionError, match="the data was read"):  # --force gets past the check
        main(args + ["--force"])


def test_fit_into_an_empty_or_new_folder_needs_no_force(tmp_path, data_never_read):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new"):
        with pytest.raises(AssertionError, match="the data was read"):
            main(["fit", "--data", str(tmp_path), "--model", "deepfm", "--out", str(out)])

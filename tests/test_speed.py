"""`python -m train speed`: both training loops on the same rows, the JSON it writes, the phase profile."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("deepctr_torch")

from train.__main__ import main  # noqa: E402
from train.distributed.wire import EXCHANGE_PARTS  # noqa: E402
from train.studies.speed import LOOPS, PHASES  # noqa: E402

ROWS = 3000


@pytest.fixture(scope="module")
def speed_run(synthetic_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("speed") / "speed.json"
    code = main(["speed", "--data", str(synthetic_data), "--models", "deepfm,autoint", "--rows", str(ROWS),
                 "--repeats", "2", "--profile", "--threads", "1", "--quiet", "--out", str(out)])
    assert code == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_both_loops_run_on_the_same_rows_taking_turns(speed_run):
    settings = speed_run["settings"]
    assert settings["train_rows"] == ROWS and settings["epochs"] == 1 and settings["threads"] == 1
    assert settings["test_rows"] > 0 and settings["train_split_rows"] > ROWS
    assert [m["model"] for m in speed_run["models"]] == ["deepfm", "autoint"]
    for model in speed_run["models"]:
        assert [(r["loop"], r["repeat"]) for r in model["runs"]] == [("ours", 1), ("deepctr", 1),
                                                                    ("ours", 2), ("deepctr", 2)]
        for run in model["runs"]:
            assert len(run["epoch_seconds"]) == 1 and run["epoch_seconds"][0] > 0
            assert run["samples_per_s"] == pytest.approx(ROWS / run["epoch_seconds"][0], rel=1e-3)
            assert 0.5 < run["test_auc"] < 1
        for loop in LOOPS:
            assert model[loop]["samples_per_s"] > 0 and 0.5 < model[loop]["test_auc"] < 1
        assert model["ratio_ours_to_deepctr"] == pytest.approx(
            model["ours"]["samples_per_s"] / model["deepctr"]["samples_per_s"], rel=1e-2)
        assert model["batch_size"] == {"deepfm": 2048, "autoint": 512}[model["model"]]
        assert model["deepctr_batch_size"] == 512 and model["sparse_tables"]
        assert model["parameters"]["embedding_tables"] + model["parameters"]["dense"] == model["parameters"]["total"]


@pytest.mark.slow
def test_the_json_records_settings_versions_and_machine(speed_run):
    assert {"measured_at", "settings", "versions", "machine", "models"} <= set(speed_run)
    assert {"torch", "deepctr-torch", "numpy", "python"} <= set(speed_run["versions"])
    assert {"cpu_model", "nproc", "loadavg_before", "loadavg_after"} <= set(speed_run["machine"])
    loops = speed_run["settings"]["hyperparameters"]["deepfm"]
    assert loops["ours"]["batch_size"] == 2048 and loops["ours"]["sparse_tables"] is True
    assert loops["deepctr"]["batch_size"] == 512 and loops["deepctr"]["lr"] == 5e-4
    assert loops["deepctr"]["sparse_tables"] is False


@pytest.mark.slow
def test_the_profile_phases_add_up_to_the_epoch(speed_run):
    for model in speed_run["models"]:
        profile = model["profile"]
        assert set(profile["phases"]) == set(PHASES)
        total = sum(p["seconds"] for p in profile["phases"].values())
        # regularization: nothing left to compute with sparse tables (a microsecond a step rounds to 0)
        assert all(p["seconds"] > 0 for name, p in profile["phases"].items() if name not in ("other", "regularization"))
        assert total == pytest.approx(profile["epoch_seconds"], rel=0.05)
        assert sum(p["share"] for p in profile["phases"].values()) == pytest.approx(1, abs=1e-3)
        # sparse tables: the tables' L2 is applied row-wise, and neither model has another L2 term in its loss
        assert profile["penalty_backward_us_per_step"] == 0 and 0 < profile["whole_table_share_estimate"] < 1
        touched = profile["touched_table_rows_per_batch"]
        assert 0 < touched["mean"] < touched["of"]


@pytest.mark.slow
def test_the_table_and_json_are_printed(synthetic_data, capsys):
    assert main(["speed", "--data", str(synthetic_data), "--models", "logreg", "--rows", "600", "--quiet"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # stdout is the JSON alone: deepctr's prints do not land there
    assert result["models"][0]["model"] == "logreg" and "profile" not in result["models"][0]
    assert "| logreg | 512 / 512 |" in captured.err and "ours / deepctr" in captured.err


@pytest.mark.slow
def test_dense_tables_and_the_deepctr_settings_can_be_chosen(synthetic_data, tmp_path):
    out = tmp_path / "speed.json"
    assert main(["speed", "--data", str(synthetic_data), "--models", "deepfm", "--rows", "1200", "--quiet",
                 "--set", "sparse_tables=false", "--set", "batch_size=256", "--deepctr-batch-size", "300",
                 "--deepctr-lr", "0.001", "--profile", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    loops = result["settings"]["hyperparameters"]["deepfm"]
    assert (loops["ours"]["batch_size"], loops["ours"]["sparse_tables"]) == (256, False)
    assert (loops["deepctr"]["batch_size"], loops["deepctr"]["lr"]) == (300, 0.001)
    profile = result["models"][0]["profile"]
    assert profile["steps"] == 5 and profile["penalty_backward_us_per_step"] > 0  # dense: the whole L2 in the loss


@pytest.mark.parametrize("args, message", [
    (["--models", "deepfm,nope"], "unknown model(s) nope"),
    (["--models", ","], "no model given"),
    (["--models", "deepfm,deepfm"], "named twice"),
    (["--rows", "0"], "--rows must be a positive integer"),
    (["--rows", "1"], "--rows must be at least 2"),
    (["--epochs", "0"], "--epochs must be a positive integer"),
    (["--repeats", "-1"], "--repeats must be a positive integer"),
    (["--threads", "0"], "--threads must be a positive integer"),
    (["--out", "/no/such/folder/speed.json"], "does not exist"),
    (["--set", "batch_size=0"], "'batch_size' must be positive"),
    (["--set", "nope=1"], "hyper-parameter 'nope' is not used"),
    (["--deepctr-batch-size", "0"], "--deepctr-batch-size must be a positive integer"),
    (["--deepctr-lr", "0"], "--deepctr-lr must be positive"),
])
def test_bad_arguments_exit_2_before_reading_data(tmp_path, capsys, args, message):
    # the data folder does not exist: the argument checks must come first
    assert main(["speed", "--data", str(tmp_path / "missing"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_missing_data_and_too_many_rows_exit_2(tmp_path, synthetic_data, capsys):
    assert main(["speed", "--data", str(tmp_path / "missing"), "--quiet"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["speed", "--data", str(synthetic_data), "--rows", "10000000", "--quiet"]) == 2
    assert "--rows 10000000: the training split" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--processes", "0"], "--processes must be positive integers"),
    (["--processes", "1,two"], "expected comma-separated integers"),
    (["--processes", ","], "--processes must be positive integers"),
    (["--model", "nope"], "unknown model 'nope'"),
    (["--repeats", "0"], "--repeats must be a positive integer"),
    (["--epochs", "0"], "--epochs must be a positive integer"),
    (["--set", "batch_size=0"], "'batch_size' must be positive"),
    (["--out", "/no/such/folder/ddp.json"], "expected a JSON file name in an existing folder"),
    (["--transports", "shm,tcp"], "--transports must name distinct transports among shm, gloo, got shm,tcp"),
    (["--transports", "gloo,gloo"], "--transports must name distinct transports"),
    (["--transports", ","], "--transports must name distinct transports among shm, gloo, got none"),
    ([], "no such folder"),
])
def test_speed_ddp_bad_arguments_exit_2_before_any_run(tmp_path, capsys, args, message):
    assert main(["speed-ddp", "--data", str(tmp_path / "missing"), "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.mark.slow
def test_speed_ddp_runs_torchrun_with_one_and_two_processes(synthetic_data, tmp_path, capsys):
    out = tmp_path / "ddp.json"
    assert main(["speed-ddp", "--data", str(synthetic_data), "--processes", "1,2", "--repeats", "1",
                 "--set", "batch_size=1000", "--quiet", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    runs = {r["processes"]: r for r in result["runs"]}
    assert sorted(runs) == [1, 2] and result["settings"]["batch_size"] == 1000
    assert runs[1]["exchange_seconds"] == [0.0] and runs[2]["exchange_seconds"][0] > 0
    parts = {part: runs[2][f"exchange_{part}_seconds"][0] for part in EXCHANGE_PARTS}
    # writing and summing the message always take time; what is left of the all-gather once a process has spent
    # its waits preparing the next batch ("ahead") can round to 0 on this small run
    assert parts["pack"] > 0 and parts["unpack"] > 0 and min(parts.values()) >= 0
    assert sum(parts.values()) <= runs[2]["exchange_seconds"][0] + 0.02  # rounding
    assert runs[1]["exchange_floats"] == 0 and runs[2]["exchange_floats"] > 0
    alone = result["all_gather_alone"]
    assert list(alone) == ["2"] and alone["2"]["floats"] == runs[2]["exchange_floats"] and alone["2"]["ms"] > 0
    assert runs[2]["test_auc"] == pytest.approx(runs[1]["test_auc"], abs=1e-4)  # the same steps, split in two
    assert result["ratio_to_first"]["1"] == 1.0 and len(result["machine"]["loadavg_before"]) == 3
    pair = runs[2]["samples_per_s"] / runs[1]["samples_per_s"]  # the one repeat's two runs, taken in turn
    assert result["pair_ratios"] == {"1": [1.0], "2": [pytest.approx(pair, abs=1e-3)]}
    assert result["pair_ratio_median"]["2"] == pytest.approx(pair, abs=1e-3)
    assert "--nproc-per-node N" in result["command"]


@pytest.mark.slow
def test_speed_ddp_compares_the_transports_run_by_run(synthetic_data, tmp_path, capsys):
    out = tmp_path / "ddp.json"
    assert main(["speed-ddp", "--data", str(synthetic_data), "--processes", "2", "--transports", "shm,gloo",
                 "--repeats", "1", "--set", "batch_size=1000", "--quiet", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    runs = {r["key"]: r for r in result["runs"]}
    assert list(runs) == ["2 shm", "2 gloo"] and [r["transport"] for r in runs.values()] == ["shm", "gloo"]
    assert runs["2 gloo"]["exchange_ahead_seconds"] == [0.0]  # only the shared all-gather prepares while waiting
    assert runs["2 shm"]["test_auc"] == runs["2 gloo"]["test_auc"]  # the same steps, bit for bit
    ratio = runs["2 shm"]["samples_per_s"] / runs["2 gloo"]["samples_per_s"]
    assert result["transport_ratios"] == {"2": {"gloo": [pytest.approx(ratio, abs=1e-3)]}}
    assert result["transport_ratio_median"]["2"]["gloo"] == pytest.approx(ratio, abs=1e-3)
    assert set(result["all_gather_alone"]) == {"2 shm", "2 gloo"}
    assert all(a["floats"] == runs[k]["exchange_floats"] and a["ms"] > 0 for k, a in result["all_gather_alone"].items())

"""Data-parallel training: batches split across processes, and torchrun on 2 processes writes one bundle."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from train.parallel import shard_batches  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_each_batch_is_split_across_the_processes_and_nothing_is_lost():
    order = torch.randperm(23, generator=torch.Generator().manual_seed(0))
    shards = [shard_batches(order, 8, size=3, me=r) for r in range(3)]
    assert shard_batches(order, 8, size=1, me=0)[1] == [8, 16, 23]
    for s, batch in enumerate(order.split(8)):
        parts = []
        for rows, ends in shards:
            start = ends[s - 1] if s else 0
            parts.append(rows[start:ends[s]])
        assert torch.equal(torch.cat(parts), batch)  # process r holds the r-th part of batch s
    assert [len(ends) for _, ends in shards] == [3, 3, 3]
    assert sorted(torch.cat([rows for rows, _ in shards]).tolist()) == list(range(23))


@pytest.mark.slow
def test_torchrun_on_two_processes_trains_what_one_process_trains(synthetic_data, tmp_path):
    """The gradients of both halves of every batch are summed, so the two runs take the same steps."""
    def fit(out: Path, processes: int) -> subprocess.CompletedProcess:
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                     "--standalone"] if processes > 1 else [sys.executable])
        return subprocess.run([*launcher, "-m", "train", "fit", "--data", str(synthetic_data), "--model", "deepfm",
                               "--epochs", "2", "--set", "batch_size=1000", "--out", str(out), "--quiet"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)

    two = fit(tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    one = fit(tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    printed = json.loads(two.stdout)  # one JSON document: only process 0 prints
    meta_two = json.loads((tmp_path / "two" / "meta.json").read_text())
    meta_one = json.loads((tmp_path / "one" / "meta.json").read_text())
    assert printed["model_id"] == meta_two["model_id"]
    assert meta_two["training"]["processes"] == 2 and meta_one["training"]["processes"] == 1
    assert meta_two["hyperparameters"] == meta_one["hyperparameters"]
    assert meta_two["parity"]["max_abs_diff"] <= 1e-6
    for split in ("train", "val", "test"):
        assert meta_two["metrics"][split]["auc"] == pytest.approx(meta_one["metrics"][split]["auc"], abs=1e-4)
    for a, b in zip(meta_two["training"]["history"], meta_one["training"]["history"]):
        assert a["train_logloss"] == pytest.approx(b["train_logloss"], rel=1e-4)

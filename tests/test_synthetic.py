"""The synthetic iPinYou generator: determinism, layout, catalog consistency and realistic structure."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bidder.reference import os_browser
from train.data.ipinyou import LogReader
from train.data.synthetic import ADVERTISERS, COLUMNS, generate

IPINYOU_ADVERTISERS = {1458, 2259, 2261, 2821, 2997, 3358, 3386, 3427, 3476}
ROOT = Path(__file__).resolve().parents[1]


def digest(folder: Path) -> str:
    return hashlib.sha256((folder / "train.log.txt").read_bytes() + (folder / "test.log.txt").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def frame(synthetic_data) -> pd.DataFrame:
    parts = [pd.read_csv(synthetic_data / name, sep="\t", dtype=str, keep_default_na=False)
             for name in ("train.log.txt", "test.log.txt")]
    return pd.concat(parts, ignore_index=True)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(a, rows=3000, seed=11)
    generate(b, rows=3000, seed=11)
    generate(c, rows=3000, seed=12)
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)


def test_layout_is_make_ipinyou_data_plus_pctr_true(synthetic_data, frame):
    header = (synthetic_data / "train.log.txt").read_text().split("\n", 1)[0].split("\t")
    assert header == list(COLUMNS) and header[-1] == "pctr_true"
    assert len(frame) == 20000
    lines = (synthetic_data / "test.log.txt").read_text().splitlines()
    assert len(lines) == 4001 and all(len(x.split("\t")) == len(COLUMNS) for x in lines)
    assert frame["click"].isin(["0", "1"]).all()
    p = frame["pctr_true"].astype(float)
    assert ((p > 0) & (p < 1)).all()


def test_test_log_is_later_than_train_log(synthetic_data):
    def stamps(name):
        chunk = next(iter(LogReader(synthetic_data / name, chunk_rows=10**6)))
        return chunk.timestamps

    train, test = stamps("train.log.txt"), stamps("test.log.txt")
    assert (np.diff(train) >= 0).all() and (np.diff(test) >= 0).all()
    assert train.max() <= test.min()


def test_ctr_and_truth_are_plausible(frame):
    clicks = frame["click"].astype(int)
    p = frame["pctr_true"].astype(float)
    assert 0.001 <= clicks.mean() <= 0.02
    assert abs(clicks.mean() - p.mean()) < 0.004  # clicks are drawn from the truth


def test_advertisers_creatives_and_sizes_match_the_catalog(frame):
    assert set(ADVERTISERS) == IPINYOU_ADVERTISERS
    by_id = {c["id"]: (adv, c["w"], c["h"]) for adv, creatives in ADVERTISERS.items() for c in creatives}
    assert len(by_id) == sum(len(c) for c in ADVERTISERS.values())  # creative ids are unique
    for c in (c for creatives in ADVERTISERS.values() for c in creatives):
        assert len(c["id"]) == 32 and isinstance(c["w"], int) and isinstance(c["h"], int)
    assert set(frame["advertiser"].astype(int)) == IPINYOU_ADVERTISERS
    triples = frame[["creative", "advertiser", "slotwidth", "slotheight"]].drop_duplicates()
    for creative, adv, w, h in triples.itertuples(index=False):
        assert by_id[creative] == (int(adv), int(w), int(h))


def test_values_look_like_ipinyou(frame):
    assert frame["IP"].str.fullmatch(r"\d+\.\d+\.\d+\.\*").all()
    assert frame["urlid"].eq("null").all()
    tags = frame["usertag"]
    assert tags.eq("null").any()
    counts = tags[tags != "null"].str.count(",") + 1
    assert counts.max() <= 8
    vocabulary = set(",".join(tags[tags != "null"]).split(","))
    assert 50 <= len(vocabulary) <= 70
    families = {os_browser(ua) for ua in frame["useragent"].unique()}
    assert len(families) >= 8  # desktop and mobile, several browsers
    assert frame["adexchange"].isin(["1", "2", "3", "4", "null"]).all()
    assert frame["timestamp"].str.fullmatch(r"201306\d{11}").all()


def test_long_tails(frame):
    # 20k rows already show the head-and-tail shape of the real logs
    assert frame["domain"].nunique() > 1000
    assert frame["slotid"].nunique() > 2000
    assert frame["IP"].nunique() > 3000
    top_domain_share = frame["domain"].value_counts(normalize=True).iloc[0]
    assert 0.01 < top_domain_share < 0.3


def test_payprice_respects_floor_and_bid(frame):
    pay = frame["payprice"].astype(int)
    assert (pay >= frame["slotprice"].astype(int)).all()
    assert (pay <= frame["bidprice"].astype(int)).all()
    assert 40 < pay.median() < 200


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="rows"):
        generate(tmp_path, rows=0, seed=1)
    with pytest.raises(ValueError, match="seed"):
        generate(tmp_path, rows=100, seed=-1)


def test_cli_synth(tmp_path):
    out = subprocess.run([sys.executable, "-m", "train", "synth", "--rows", "500", "--seed", "3", "--out",
                          str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert '"rows"' in out.stdout and (tmp_path / "test.log.txt").exists()
    bad = subprocess.run([sys.executable, "-m", "train", "synth", "--rows", "-5", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "error: rows must be" in bad.stderr and "Traceback" not in bad.stderr

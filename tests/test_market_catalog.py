"""The large synthetic market: its catalog loads, matches its logs, is deterministic; bad sizes are refused."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bidder.campaigns import load_catalog
from train.data.market_catalog import CAMPAIGNS_FILE, generate_market

ROOT = Path(__file__).resolve().parents[1]


def digest(folder: Path) -> str:
    return hashlib.sha256(b"".join((folder / n).read_bytes()
                                   for n in ("train.log.txt", "test.log.txt", CAMPAIGNS_FILE))).hexdigest()


@pytest.fixture(scope="module")
def market(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("market")
    return out, generate_market(out, rows=4000, seed=5, creatives=2500)


def test_the_catalog_loads_and_has_the_creatives_campaigns_and_advertisers_asked_for(market):
    out, summary = market
    catalog = load_catalog(out / CAMPAIGNS_FILE)
    assert len(catalog) == 2500 == summary["catalog"]["creatives"]
    campaigns = json.loads((out / CAMPAIGNS_FILE).read_text())["campaigns"]
    assert len(campaigns) == 50 and len({c["advertiser"] for c in campaigns}) == 25
    assert all(0 < c["value_per_click"] < 20 for c in campaigns)
    kinds = [set(c["targeting"]) - {"sizes"} for c in campaigns]
    assert any(k == {"domains"} for k in kinds) and any(k == {"exchanges"} for k in kinds) and any(not k for k in kinds)
    assert len(catalog.sizes) >= 8


def test_the_logs_show_catalog_creatives_at_their_own_size_and_targeted_domains_exist_in_the_logs(market):
    out, summary = market
    frame = pd.concat([pd.read_csv(out / n, sep="\t", dtype=str, keep_default_na=False)
                       for n in ("train.log.txt", "test.log.txt")])
    assert len(frame) == 4000
    catalog = load_catalog(out / CAMPAIGNS_FILE)
    by_id = {c.creative_id: c for c in catalog.candidates}
    shown = [by_id[c] for c in frame["creative"]]  # KeyError: a creative the catalog does not have
    assert all((str(c.w), str(c.h)) == (w, h) for c, w, h in zip(shown, frame["slotwidth"], frame["slotheight"]))
    assert all(str(c.advertiser) == a for c, a in zip(shown, frame["advertiser"]))
    p = frame["pctr_true"].astype(float)
    assert ((p > 0) & (p < 1)).all()
    # domain targeting names the market's domains (popular ones often), so it can match live traffic
    targeted = set().union(*(c.domains for c in catalog.candidates if c.domains))
    assert targeted & set(frame["domain"])


def test_same_arguments_same_bytes(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_market(a, rows=500, seed=1, creatives=300)
    generate_market(b, rows=500, seed=1, creatives=300)
    generate_market(c, rows=500, seed=2, creatives=300)
    assert digest(a) == digest(b) != digest(c)


def test_synth_without_creatives_writes_no_catalog_and_bad_counts_are_one_line_errors(tmp_path):
    def synth(*args):
        return subprocess.run([sys.executable, "-m", "train", "synth", "--rows", "200", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    done = synth("--out", str(tmp_path / "plain"))
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "plain" / CAMPAIGNS_FILE).exists()
    for bad in ("5", "2000000"):
        done = synth("--out", str(tmp_path / "bad"), "--creatives", bad)
        assert done.returncode == 2
        assert done.stderr.startswith("error: --creatives:") and done.stderr.count("\n") == 1, done.stderr

"""The bundle format (``bidder/bundle.py``): its version, the digest of every file, the graphs a bundle must hold
for what its meta.json claims, and the writers every training command goes through."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bidder import DEFAULT_BUNDLE
from bidder.bundle import (AD_TOWER_FILE, CANDIDATE_FILE, FACTORIZED_FILE, FORMAT_VERSION, IMP_TOWER_FILE,
                           MARKET_FILE, MODEL_FILE, SPEC_FILE, TERMS_FILE, Bundle, BundleError, add_graph, upgrade)
from bidder.currencies import CURRENCY_FILE
from bidder.scorer import Scorer
from bidder.shading import WinModel
from tamper import as_format1, rewrite_meta
from train.__main__ import main as train_main

#: twotower graphs for the checks that come before their sessions: any ONNX file will do
FAKE_TOWERS = {"files": [IMP_TOWER_FILE, AD_TOWER_FILE], "parity": {"imp_tower": 0.0, "ad_tower": 0.0}}


def bundle_bytes(bundle: Path) -> dict[str, bytes]:
    """Every file of ``bundle`` and its bytes, hidden (staging) files included."""
    return {p.name: p.read_bytes() for p in sorted(bundle.iterdir()) if p.is_file()} | {
        p.name: b"<folder>" for p in bundle.iterdir() if p.is_dir()}


@pytest.fixture
def bundle(tmp_path) -> Path:
    """A copy of the shipped bundle (format 2: a CTR model, its factorized graphs, a win-price model and its terms)."""
    return Path(shutil.copytree(DEFAULT_BUNDLE, tmp_path / "bundle"))


@pytest.fixture
def towers_bundle(bundle) -> Path:
    add_graph(bundle, "twotower", {IMP_TOWER_FILE: bundle / CANDIDATE_FILE, AD_TOWER_FILE: bundle / CANDIDATE_FILE},
              FAKE_TOWERS)
    return bundle


def serve_error(bundle: Path) -> str:
    """The one stderr line of ``python -m bidder serve --model BUNDLE``, which must refuse it with exit status 2."""
    done = subprocess.run([sys.executable, "-m", "bidder", "serve", "--no-pin", "--model", str(bundle)],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


# -- the format version ----------------------------------------------------------------------------------------
def test_the_shipped_bundle_is_the_current_format_with_a_digest_per_file():
    opened = Bundle.open(DEFAULT_BUNDLE)
    assert opened.version == FORMAT_VERSION == opened.meta["format_version"] == 2
    # the catalog and its currency table sit beside the bundle's files, read (and reloaded) with the catalog
    on_disk = {p.name for p in DEFAULT_BUNDLE.iterdir()} - {"meta.json", "campaigns.json", CURRENCY_FILE}
    assert set(opened.meta["files"]) == on_disk == set(opened.digests)
    assert opened.digests == opened.meta["files"]
    assert opened.digests[MODEL_FILE] == hashlib.sha256((DEFAULT_BUNDLE / MODEL_FILE).read_bytes()).hexdigest()


@pytest.mark.parametrize("version", [3, 0, "2", True, None])
def test_a_format_version_it_does_not_know_is_refused(bundle, version):
    rewrite_meta(bundle, lambda meta: meta.update(format_version=version))
    with pytest.raises(BundleError, match=rf"format_version {version!r} is not a bundle format this bidder reads "
                                          r"\(1, 2\)"):
        Scorer(bundle)


def test_bidder_serve_refuses_an_unknown_version_in_one_error_line(bundle):
    rewrite_meta(bundle, lambda meta: meta.update(format_version=99))
    assert serve_error(bundle) == (f"error: {bundle / 'meta.json'}: format_version 99 is not a bundle format this "
                                   "bidder reads (1, 2); it was written by another version of it")


def test_format_1_is_read_and_its_recorded_digests_checked(bundle, caplog):
    rewrite_meta(bundle, as_format1)
    rewrite_meta(bundle, lambda meta: meta["graphs"]["market"].update(
        sha256=hashlib.sha256((bundle / MARKET_FILE).read_bytes()).hexdigest()))
    with caplog.at_level(logging.WARNING, logger="bidder"):
        scorer = Scorer(bundle)
    assert scorer.opened.version == 1 and not caplog.records  # it lists its graphs: nothing left out
    assert WinModel.for_scorer(scorer).native and len(scorer.factorized_files()) == 2
    rewrite_meta(bundle, lambda meta: meta["graphs"]["market"].update(sha256="0" * 64))
    with pytest.raises(BundleError, match=f"{MARKET_FILE}: its sha256 .* is not the 000000000000… meta.json records"):
        Scorer(bundle)
    rewrite_meta(bundle, lambda meta: meta["graphs"]["market"].pop("sha256"))
    (bundle / MODEL_FILE).write_bytes((bundle / MODEL_FILE).read_bytes() + b"\0")  # format 1 has onnx_sha256
    with pytest.raises(BundleError, match=f"{MODEL_FILE}: its sha256 .* meta.json records"):
        Scorer(bundle)


def test_format_1_without_graphs_serves_with_a_warning_that_shading_is_off(bundle, caplog):
    rewrite_meta(bundle, as_format1)
    rewrite_meta(bundle, lambda meta: meta.pop("graphs"))
    with caplog.at_level(logging.WARNING, logger="bidder"):
        scorer = Scorer(bundle)
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "lists no graphs" in caplog.text and "first-price shading is off" in caplog.text
    assert WinModel.for_scorer(scorer) is None and scorer.factorized_files() == ()


def test_format_2_without_graphs_is_refused(bundle):
    rewrite_meta(bundle, lambda meta: meta.pop("graphs"))
    with pytest.raises(BundleError, match='no "graphs": format 2 lists every graph the bundle holds'):
        Scorer(bundle)


# -- digests -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [MODEL_FILE, SPEC_FILE, CANDIDATE_FILE, FACTORIZED_FILE, MARKET_FILE, TERMS_FILE,
                                  IMP_TOWER_FILE, AD_TOWER_FILE])
def test_a_file_that_changed_after_the_bundle_was_written_is_refused(towers_bundle, name):
    path = towers_bundle / name
    path.write_bytes(path.read_bytes() + b"\n")  # spec.json still parses, to the same spec: only its digest differs
    with pytest.raises(BundleError, match=f"{name}: its sha256 .* is not the .* meta.json records: the file "
                                          "changed after the bundle was written"):
        Scorer(towers_bundle)


@pytest.mark.parametrize("name, claimed_by", [(MODEL_FILE, "model.onnx"), (CANDIDATE_FILE, "graphs.factorized"),
                                              (FACTORIZED_FILE, "graphs.factorized"), (MARKET_FILE, "graphs.market"),
                                              (TERMS_FILE, "graphs.market.terms"), (AD_TOWER_FILE, "graphs.twotower")])
def test_a_file_claimed_but_missing_is_refused(towers_bundle, name, claimed_by):
    (towers_bundle / name).unlink()
    expected = (f"no {MODEL_FILE}" if name == MODEL_FILE
                else f"meta.json {claimed_by} lists {name} but the bundle has no such file")
    with pytest.raises(BundleError, match=expected):
        Scorer(towers_bundle)


def test_files_and_graphs_must_agree(bundle):
    rewrite_meta(bundle, lambda meta: meta["files"].pop(MARKET_FILE))
    with pytest.raises(BundleError, match=f'graphs.market needs {MARKET_FILE}, and "files" has no digest for it'):
        Scorer(bundle)
    shutil.copytree(DEFAULT_BUNDLE, bundle, dirs_exist_ok=True)
    rewrite_meta(bundle, lambda meta: meta["graphs"].pop("market"))  # the graph is gone, its digests are not
    with pytest.raises(BundleError, match=f'"files" lists {TERMS_FILE}, which nothing in meta.json claims'):
        Scorer(bundle)


@pytest.mark.parametrize("change, message", [
    (lambda g: g["market"].update(files=["other.onnx"]), r"graphs.market.files is \['other.onnx'\], expected "
                                                         r"\['market.onnx'\]"),
    (lambda g: g["factorized"].update(files=[FACTORIZED_FILE, CANDIDATE_FILE]), "graphs.factorized.files is"),
    (lambda g: g["market"].pop("terms"), r'graphs.market.terms must be \{"file": "market-terms.npz", ...\}'),
    (lambda g: g.update(ranker={"files": []}), "graphs.ranker: not a graph this bidder knows"),
    (lambda g: g.update(market=[MARKET_FILE]), "graphs.market must be an object"),
])
def test_a_graph_entry_unlike_its_kind_is_refused(bundle, change, message):
    rewrite_meta(bundle, lambda meta: change(meta["graphs"]))
    with pytest.raises(BundleError, match=message):
        Scorer(bundle)


# -- writing ---------------------------------------------------------------------------------------------------------
def test_add_graph_adds_one_graph_and_changes_nothing_else(bundle):
    before = json.loads((bundle / "meta.json").read_text())
    meta = add_graph(bundle, "twotower", {IMP_TOWER_FILE: bundle / CANDIDATE_FILE,
                                          AD_TOWER_FILE: (bundle / CANDIDATE_FILE).read_bytes()}, FAKE_TOWERS)
    assert meta == json.loads((bundle / "meta.json").read_text())
    assert meta["graphs"] == {**before["graphs"], "twotower": FAKE_TOWERS}
    assert meta["files"] == {**before["files"], IMP_TOWER_FILE: before["files"][CANDIDATE_FILE],
                             AD_TOWER_FILE: before["files"][CANDIDATE_FILE]}
    assert {k: v for k, v in meta.items() if k not in ("graphs", "files")} == {
        k: v for k, v in before.items() if k not in ("graphs", "files")}
    assert Bundle.open(bundle).digests == meta["files"]
    assert not [p for p in bundle.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_add_graph_writes_a_format_1_bundle_as_format_2(bundle):
    rewrite_meta(bundle, as_format1)
    add_graph(bundle, "twotower", {IMP_TOWER_FILE: bundle / CANDIDATE_FILE, AD_TOWER_FILE: bundle / CANDIDATE_FILE},
              FAKE_TOWERS)
    opened = Bundle.open(bundle)
    assert opened.version == 2 and set(opened.digests) == {p.name for p in DEFAULT_BUNDLE.iterdir()} - {
        "meta.json", "campaigns.json", CURRENCY_FILE} | {IMP_TOWER_FILE, AD_TOWER_FILE}


@pytest.mark.parametrize("failing_move", [1, 2, 3])  # the first graph, the second, meta.json
def test_add_graph_that_fails_midway_leaves_the_bundle_as_it_was(bundle, monkeypatch, failing_move):
    before = bundle_bytes(bundle)
    real, moves = os.replace, []

    def replace(src, dst):
        moves.append(dst)
        if len(moves) == failing_move:
            raise OSError(28, "No space left on device", str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        add_graph(bundle, "market", {MARKET_FILE: bundle / CANDIDATE_FILE, TERMS_FILE: b"other terms"},
                  json.loads((bundle / "meta.json").read_text())["graphs"]["market"])
    monkeypatch.undo()
    assert bundle_bytes(bundle) == before
    assert Bundle.open(bundle).digests[MARKET_FILE] == hashlib.sha256(before[MARKET_FILE]).hexdigest()


def test_add_graph_refuses_an_entry_unlike_its_kind_before_writing_anything(bundle):
    before = bundle_bytes(bundle)
    with pytest.raises(BundleError, match=r"graphs.twotower.files is \['imp_tower.onnx'\]"):
        add_graph(bundle, "twotower", {IMP_TOWER_FILE: b"x"}, {"files": [IMP_TOWER_FILE]})
    with pytest.raises(BundleError, match=f"would claim {AD_TOWER_FILE}, which nothing writes"):
        add_graph(bundle, "twotower", {IMP_TOWER_FILE: b"x"}, FAKE_TOWERS)
    assert bundle_bytes(bundle) == before


def test_bundle_upgrade_rewrites_only_meta_json(bundle, capsys):
    rewrite_meta(bundle, as_format1)
    rewrite_meta(bundle, lambda meta: meta["graphs"]["market"].update(
        sha256=hashlib.sha256((bundle / MARKET_FILE).read_bytes()).hexdigest()))
    before = bundle_bytes(bundle)
    assert train_main(["bundle-upgrade", str(bundle)]) == 0
    result = json.loads(capsys.readouterr().out)
    after = bundle_bytes(bundle)
    assert {k: v for k, v in after.items() if k != "meta.json"} == {k: v for k, v in before.items()
                                                                     if k != "meta.json"}
    meta = json.loads(after["meta.json"])
    assert (result["from"], result["to"], meta["format_version"]) == (1, 2, 2)
    assert meta["files"] == result["files"] == json.loads((DEFAULT_BUNDLE / "meta.json").read_text())["files"]
    assert "sha256" not in meta["graphs"]["market"]  # format 2 keeps digests in "files" only
    assert Bundle.open(bundle).version == 2
    assert upgrade(bundle)["from"] == 2 and bundle_bytes(bundle) == after  # the current format: left as it is


def test_bundle_upgrade_records_that_a_bundle_without_graphs_has_none(bundle, caplog):
    rewrite_meta(bundle, as_format1)
    rewrite_meta(bundle, lambda meta: meta.pop("graphs"))
    upgrade(bundle)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bidder"):
        scorer = Scorer(bundle)
    assert scorer.meta["graphs"] == {} and not caplog.records
    assert not (bundle / MARKET_FILE).exists() and not (bundle / CANDIDATE_FILE).exists()  # unlisted: removed


def test_bundle_upgrade_errors_are_one_line(tmp_path, bundle, capsys):
    assert train_main(["bundle-upgrade", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nothing'}: no model.onnx"
    rewrite_meta(bundle, as_format1)
    (bundle / SPEC_FILE).write_text((bundle / SPEC_FILE).read_text().replace('"buckets"', '"bucket"', 1))
    assert train_main(["bundle-upgrade", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


# -- every writer ------------------------------------------------------------------------------------------------------
def assert_written(bundle: Path) -> None:
    """``bundle`` is format 2, its meta.json records the digest of every file it holds, and they match."""
    opened = Bundle.open(bundle)
    assert opened.version == 2
    held = {p.name for p in bundle.iterdir()} - {"meta.json", "campaigns.json", CURRENCY_FILE}
    assert set(opened.meta["files"]) == held
    assert opened.meta["files"] == {name: hashlib.sha256((bundle / name).read_bytes()).hexdigest() for name in held}


def test_fit_writes_through_the_format(small_bundle, logreg_bundle):
    assert_written(small_bundle)
    assert_written(logreg_bundle)
    assert set(Bundle.open(small_bundle).graphs) == {"factorized"} and Bundle.open(logreg_bundle).graphs == {}


def test_factorize_writes_through_the_format(bundle):
    from train.factorize import factorize_bundle

    factorize_bundle(bundle)
    assert_written(bundle)


def test_market_writes_through_the_format(small_bundle, synthetic_data, tmp_path):
    from train.market import market_bundle

    bundle = shutil.copytree(small_bundle, tmp_path / "bundle")
    market_bundle(synthetic_data, bundle, epochs=2, progress=False)  # as test_shading trains it
    assert_written(bundle)
    assert set(Bundle.open(bundle).graphs) == {"factorized", "market"}


def test_twotower_writes_through_the_format(bundle, tmp_path):
    from train.data.market_catalog import generate_market
    from train.twotower import train_twotower

    generate_market(tmp_path / "market", rows=300, seed=2, creatives=200)
    train_twotower(tmp_path / "market", bundle, progress=False, steps=2, batch=16, uniform=16, dim=4,
                   embedding_dim=4, hidden=8)
    assert_written(bundle)
    assert set(Bundle.open(bundle).graphs) == {"factorized", "market", "twotower"}


def test_compress_and_install_write_through_the_format(bundle, tmp_path):
    from train.bundle import install_bundle
    from train.compress import compress_bundle

    compress_bundle(bundle, "int8-dynamic", tmp_path / "int8", settings={"ops": "dnn"}, progress=False)
    assert_written(tmp_path / "int8")  # a quantized DNN: no factorized graphs, the market model carried over
    assert set(Bundle.open(tmp_path / "int8").graphs) == {"market"}
    installed = install_bundle(tmp_path / "int8", bundle)  # over a bundle whose factorized graphs it does not list
    assert_written(installed)
    assert not (installed / FACTORIZED_FILE).exists() and (installed / "campaigns.json").exists()

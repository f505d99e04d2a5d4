"""Two-tower retrieval: the towers' export parity, top K against brute force, filters before top K,
the engine and server with a large catalog (reload under load included), and bad input."""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bidder import DEFAULT_BUNDLE, OPENRTB_EXAMPLES
from bidder.app import STATE, Config, create_app
from bidder.batch import Batch
from bidder.campaigns import load_catalog
from bidder.conformance import IAB_CONTENT_1
from bidder.engine import BidEngine, Outcome
from bidder.factorized import FactorizedScorer, candidate_fields, random_inputs
from bidder.metrics import Metrics
from bidder.retrieval import (AD_TOWER_FILE, GRAPH, IMP_TOWER_FILE, SMALL_CATALOG, AdIndex, Towers,
                              ann_available, retriever_for)
from bidder.scorer import BundleError, Scorer
from bidder.spec import SPARSE_INPUT
from catalogs import parse_catalog
from train.data.market_catalog import CAMPAIGNS_FILE, generate_market
from train.errors import ParityError, TrainError
from train.twotower import TowerModel, _export, _parity, check_settings, train_twotower

ROOT = Path(__file__).resolve().parents[1]
BANNER = OPENRTB_EXAMPLES / "bid-request-2.5" / "simple-banner.json"
TINY = {"steps": 20, "batch": 32, "uniform": 64, "dim": 8, "embedding_dim": 4, "hidden": 16}
NOW = 1_370_970_000.0


@pytest.fixture(scope="session")
def market(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("market")
    generate_market(out, rows=3000, seed=1, creatives=2000)
    return out


@pytest.fixture(scope="session")
def tower_bundle(market, tmp_path_factory) -> Path:
    """The default ranker with tiny towers trained on the 2,000-creative market."""
    bundle = tmp_path_factory.mktemp("towers") / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    train_twotower(market, bundle, progress=False, **TINY)
    return bundle


@pytest.fixture(scope="session")
def other_market(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("other-market")
    generate_market(out, rows=300, seed=2, creatives=1500)
    return out


def banner(w: int = 300, h: int = 250, domain: str | None = None, badv: list[str] | None = None) -> bytes:
    request = json.loads(BANNER.read_text())
    request["imp"][0]["banner"].update({"w": w, "h": h})
    request["imp"][0]["banner"].pop("format", None)
    request["imp"][0]["bidfloor"] = 0.0
    if domain is not None:
        request["site"]["domain"] = domain
    if badv is not None:
        request["badv"] = badv
    return json.dumps(request).encode()


# -- export ------------------------------------------------------------------------------------------------------
def test_the_bundle_lists_the_towers_with_parity_within_1e_6(tower_bundle):
    entry = json.loads((tower_bundle / "meta.json").read_text())["graphs"][GRAPH]
    assert entry["files"] == [IMP_TOWER_FILE, AD_TOWER_FILE]
    assert 0 <= entry["parity"]["imp_tower"] <= 1e-6 and 0 <= entry["parity"]["ad_tower"] <= 1e-6
    assert entry["training"]["teacher"] == "factorized" and entry["training"]["catalog_creatives"] == 2000
    assert entry["training"]["final_loss"] < entry["training"]["first_loss"]
    assert "factorized" in json.loads((tower_bundle / "meta.json").read_text())["graphs"]  # the ranker's graphs stay


def test_export_parity_is_checked_and_catches_a_graph_that_differs(tmp_path):
    scorer = Scorer(DEFAULT_BUNDLE, max_batch=4)
    spec = scorer.spec
    model = TowerModel(spec, check_settings(TINY), seed=3).eval()
    rows = random_inputs(spec, 300, np.random.default_rng(0))
    _export(model.imp, spec, tmp_path / "imp.onnx", "imp_vec")
    assert _parity(model.imp, tmp_path / "imp.onnx", spec, rows, "imp_vec") <= 1e-6
    with torch.no_grad():
        model.imp.mlp[2].bias += 1e-4  # the torch tower moves, the exported graph does not
    with pytest.raises(ParityError, match="differs from the trained tower"):
        _parity(model.imp, tmp_path / "imp.onnx", spec, rows, "imp_vec")


def test_each_tower_reads_only_its_own_fields(tower_bundle):
    scorer = Scorer(tower_bundle, max_batch=4)
    towers = Towers(tower_bundle, scorer.spec, scorer.featurizer)
    spec = scorer.spec
    rows = random_inputs(spec, 50, np.random.default_rng(1))
    cand = set(candidate_fields(spec))
    columns = np.array([f.name in cand for f in spec.single_fields])
    other = random_inputs(spec, 50, np.random.default_rng(2))

    def run(session, output, inputs):
        names = {a.name for a in session.get_inputs()}
        return session.run([output], {k: v for k, v in inputs.items() if k in names})[0]

    mixed_for_imp = dict(rows, **{SPARSE_INPUT: np.where(columns, other[SPARSE_INPUT], rows[SPARSE_INPUT])})
    np.testing.assert_array_equal(run(towers.imp_session, "imp_vec", rows), run(towers.imp_session, "imp_vec", mixed_for_imp))
    mixed_for_ad = {k: (np.where(columns, rows[k], other[k]) if k == SPARSE_INPUT else other[k]) for k in rows}
    np.testing.assert_array_equal(run(towers.ad_session, "ad_vec", rows), run(towers.ad_session, "ad_vec", mixed_for_ad))
    vectors = run(towers.imp_session, "imp_vec", rows)
    assert (vectors[:, -1] > 0).all() and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)


def test_a_bundle_whose_meta_has_no_parity_figure_or_a_bad_one_is_refused(tower_bundle, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tower_bundle, bad)
    meta = json.loads((bad / "meta.json").read_text())
    meta["graphs"][GRAPH]["parity"]["ad_tower"] = 1e-3
    (bad / "meta.json").write_text(json.dumps(meta))
    scorer = Scorer(bad, max_batch=4)
    with pytest.raises(BundleError, match="parity ad_tower"):
        Towers(bad, scorer.spec, scorer.featurizer)


def test_bad_settings_are_refused_before_any_data_is_read(tmp_path):
    with pytest.raises(TrainError, match="unknown two-tower setting"):
        check_settings({"dimm": 3})
    with pytest.raises(TrainError, match="--steps: must be positive"):
        check_settings({"steps": 0})
    with pytest.raises(TrainError, match="not a model bundle"):
        train_twotower(tmp_path, tmp_path / "nothing", progress=False, **TINY)


# -- top K against brute force -------------------------------------------------------------------------------------
def brute_force(catalog, matrix, query, w, h, domain, exchange, blocked, k) -> set[str]:
    eligible = [c for c in catalog.candidates if (c.w, c.h) == (w, h) and c.runs_on(domain, exchange, blocked)]
    scores = [float(matrix[c.index] @ query) for c in eligible]
    order = np.argsort(-np.array(scores), kind="stable")[:k]
    return {eligible[i].creative_id for i in order}


def test_exact_top_k_is_brute_force_over_the_eligible_creatives(market):
    catalog = load_catalog(market / CAMPAIGNS_FILE)
    rng = np.random.default_rng(4)
    matrix = rng.normal(size=(len(catalog), 9)).astype(np.float32)
    index = AdIndex(catalog, matrix)
    domains = sorted({d for c in catalog.candidates if c.domains for d in c.domains})
    adomains = sorted({d for c in catalog.candidates for d in c.adomain})
    checked = 0
    for trial in range(60):
        w, h = sorted(catalog.sizes)[trial % len(catalog.sizes)]
        domain = domains[rng.integers(len(domains))] if trial % 3 else "nowhere.example"
        exchange = [None, "1", "2", "3", "4"][trial % 5]
        blocked = frozenset(rng.choice(adomains, size=trial % 4, replace=False).tolist())
        query = rng.normal(size=9).astype(np.float32)
        for k in (1, 5, 40):
            got = [catalog.candidates[i] for i in index.top_k(query, w, h, domain, exchange, blocked, k)]
            assert {c.creative_id for c in got} == brute_force(catalog, matrix, query, w, h, domain, exchange,
                                                                 blocked, k)
            scores = [float(matrix[c.index] @ query) for c in got]
            assert scores == sorted(scores, reverse=True)  # best first
            checked += len(got)
    assert checked > 1000


def test_the_bounded_exact_search_skips_blocks_yet_equals_brute_force():
    """A size of 6,000 creatives: open blocks and targeted rows whose bound is below the k-th best score are
    skipped, and nothing is lost by it (a negative query bias too)."""
    rng = np.random.default_rng(6)
    campaigns = [{"id": f"c{i}", "advertiser": i, "value_per_click": 1.0,
                  **({"targeting": {"exchanges": ["1"]}} if i % 3 == 0 else {}),
                  "creatives": [{"id": f"c{i}-{j}", "w": 300, "h": 250, "adomain": [f"a{i % 7}.example"],
                                 "nurl": "https://x.example/${AUCTION_PRICE}"} for j in range(60)]}
                 for i in range(100)]
    catalog = parse_catalog({"campaigns": campaigns})
    matrix = rng.normal(size=(len(catalog), 9)).astype(np.float32)
    matrix[:, -1] = rng.normal(0, 3, len(catalog))  # the bias spreads the scores, as log(value) does
    index = AdIndex(catalog, matrix)
    part = index.sizes[(300, 250)]
    skipped = 0
    for trial in range(40):
        query = rng.normal(size=9)
        query[-1] = (abs(query[-1]) + 0.5) * (-1 if trial % 5 == 4 else 1)
        query = (query / np.linalg.norm(query)).astype(np.float32)
        exchange = [None, "1"][trial % 2]
        blocked = frozenset({"a3.example"}) if trial % 4 == 1 else frozenset()
        k = [1, 10, 200][trial % 3]
        got = index.top_k(query, 300, 250, None, exchange, blocked, k)
        assert {catalog.candidates[i].creative_id for i in got} == brute_force(
            catalog, matrix, query, 300, 250, None, exchange, blocked, k)
        skipped += len(part.positions) - part.search(query, None, exchange, blocked, k)[1]
    assert skipped > 40 * 1000  # the bound did prune


def test_exact_top_k_equals_brute_force_whatever_the_mix_of_targeting():
    """Campaigns targeted by domain, by exchange (one on two exchanges sits in both exchanges' runs), by both,
    or not at all; blocked advertisers; k from 1 to more than are eligible."""
    rng = np.random.default_rng(11)
    domains = [f"d{i}.example" for i in range(6)]
    campaigns = []
    for i in range(160):
        targeting = {}
        if i % 4 in (1, 3):
            targeting["domains"] = rng.choice(domains, size=1 + i % 3, replace=False).tolist()
        if i % 4 in (2, 3) or i % 7 == 0:
            targeting["exchanges"] = rng.choice(["1", "2", "3"], size=1 + i % 2, replace=False).tolist()
        campaigns.append({"id": f"c{i}", "advertiser": i, "value_per_click": 1.0, "targeting": targeting,
                          "creatives": [{"id": f"c{i}-{j}", "w": 300, "h": 250, "adomain": [f"a{i % 9}.example"],
                                         "nurl": "https://x.example/${AUCTION_PRICE}"} for j in range(12)]})
    catalog = parse_catalog({"campaigns": campaigns})
    matrix = rng.normal(size=(len(catalog), 6)).astype(np.float32)
    matrix[:, -1] = rng.normal(0, 2, len(catalog))
    index = AdIndex(catalog, matrix)
    asked = []
    for trial in range(80):
        query = rng.normal(size=6).astype(np.float32)
        domain = [None, *domains, "nowhere.example"][trial % 8]
        exchange = [None, "1", "2", "3", "9"][trial % 5]
        blocked = frozenset(f"a{j}.example" for j in rng.choice(9, size=trial % 3, replace=False).tolist())
        for k in (1, 7, 300, 2000):
            got = index.top_k(query, 300, 250, domain, exchange, blocked, k)
            assert len(set(got.tolist())) == len(got)  # a creative in two runs is retrieved once
            assert {catalog.candidates[i].creative_id for i in got} == brute_force(
                catalog, matrix, query, 300, 250, domain, exchange, blocked, k)
            scores = matrix[got] @ query
            assert np.all(np.diff(scores) <= 0)  # best first
        asked.append((query, (300, 250, domain, exchange, blocked)))
    # a batch's imps searched together (each run of rows read once for an exchange's imps): the same answers
    for k in (1, 7, 300):
        together = index.top_k_many(np.stack([q for q, _ in asked]), [where for _, where in asked], k)
        assert [r.tolist() for r in together] == [index.top_k(q, *where, k).tolist() for q, where in asked]


def test_filters_come_before_top_k_so_ineligible_favourites_never_take_a_place(market):
    catalog = load_catalog(market / CAMPAIGNS_FILE)
    w, h = 300, 250
    size = catalog.for_size(w, h)
    matrix = np.zeros((len(catalog), 2), dtype=np.float32)
    # the best-scoring creatives of the size are all targeted elsewhere or of a blocked advertiser
    targeted = [c for c in size if c.domains is not None or c.exchanges is not None]
    blocked_adomain = size[0].adomain[0]
    for rank, c in enumerate(targeted + [c for c in size if blocked_adomain in c.adomain]):
        matrix[c.index] = [1000.0 - rank, 0.0]
    for c in size:
        if not matrix[c.index].any():
            matrix[c.index] = [np.random.default_rng(c.index).random(), 0.0]
    index = AdIndex(catalog, matrix)
    query = np.array([1.0, 0.0], dtype=np.float32)
    k = 30
    got = [catalog.candidates[i] for i in index.top_k(query, w, h, "nowhere.example", None,
                                                       frozenset({blocked_adomain}), k)]
    assert len(got) == k
    assert all(c.domains is None and c.exchanges is None and blocked_adomain not in c.adomain for c in got)
    # nothing eligible: nothing retrieved
    assert len(index.top_k(query, 7, 7, None, None, frozenset(), k)) == 0


@pytest.mark.skipif(not ann_available(), reason="faiss-cpu is not installed (pip install 'bidder[ann]')")
def test_approximate_top_k_respects_the_filters_and_mostly_agrees_with_exact(market):
    catalog = load_catalog(market / CAMPAIGNS_FILE)
    rng = np.random.default_rng(5)
    matrix = rng.normal(size=(len(catalog), 8)).astype(np.float32)
    exact, approximate = AdIndex(catalog, matrix), AdIndex(catalog, matrix, ann=True)
    overlap = []
    for trial in range(40):
        query = rng.normal(size=8).astype(np.float32)
        exchange = [None, "1", "2"][trial % 3]
        got = approximate.top_k(query, 300, 250, None, exchange, frozenset(), 20, approximate=True)
        assert all(catalog.candidates[i].runs_on(None, exchange, frozenset()) for i in got)
        want = exact.top_k(query, 300, 250, None, exchange, frozenset(), 20)
        assert len(got) == len(want)
        overlap.append(len(set(got) & set(want)) / len(want))
    assert np.mean(overlap) >= 0.9


# -- the engine ----------------------------------------------------------------------------------------------------
def engines(bundle: Path, catalog_path: Path, k: int):
    scorer = Scorer(bundle)
    catalog = load_catalog(catalog_path)
    factorized = FactorizedScorer.for_scorer(scorer, max_imps=scorer.max_batch, max_rows=scorer.max_batch)
    retriever = retriever_for(scorer, catalog, k)
    with_retrieval = BidEngine(scorer, catalog, Metrics(), now=NOW, factorized=factorized, retriever=retriever)
    exhaustive = BidEngine(scorer, catalog, Metrics(), now=NOW, factorized=factorized)
    return with_retrieval, exhaustive, retriever, catalog


def retrieved(engine: BidEngine, body: bytes):
    """The request prepared and its candidates retrieved (as the batch does), or the Outcome that ended it; the
    request's rows as ``candidates`` and, per imp, (record, candidates) as ``groups``."""
    pending = engine.prepare(body, None, 0.0)
    if isinstance(pending, Outcome):
        return pending
    assert pending.waiting and not pending.n_rows  # retrieval waits for the batch
    batch = Batch([pending], engine.catalog.candidates, engine.features)
    engine.featurize(batch)
    engine.retrieve(batch)
    if batch.outcomes[0] is not None:
        return batch.outcomes[0]
    return SimpleNamespace(candidates=[c for eligible in pending.candidates for c in eligible],
                           groups=list(zip(pending.records, pending.candidates)))


def test_the_engine_scores_the_k_retrieved_and_bids_the_ranker_best_of_them(tower_bundle, market):
    engine, exhaustive, retriever, catalog = engines(tower_bundle, market / CAMPAIGNS_FILE, k=25)
    assert retriever is not None and len(catalog) > SMALL_CATALOG
    body = banner()
    pending = retrieved(engine, body)
    assert len(pending.candidates) == 25
    query = retriever.query(pending.groups[0][0])
    assert list(pending.candidates) == list(retriever.eligible(query, 300, 250, pending.groups[0][0]["domain"], None,
                                                               frozenset()))
    answer = json.loads(engine.bid(body).body)
    crid = answer["seatbid"][0]["bid"][0]["crid"]
    assert crid in {c.creative_id for c in pending.candidates}
    # with K at least the eligible count, retrieval changes nothing: the same bid as scoring everything
    wide, _, _, _ = engines(tower_bundle, market / CAMPAIGNS_FILE, k=len(catalog))
    for size in ((300, 250), (728, 90), (160, 600)):
        assert wide.bid(banner(*size)).body == exhaustive.bid(banner(*size)).body


def test_each_imp_of_a_request_retrieves_by_its_own_vector(tower_bundle, market):
    engine, _, retriever, _ = engines(tower_bundle, market / CAMPAIGNS_FILE, k=10)
    request = json.loads(banner())
    imp = request["imp"][0]
    request["imp"] = [{**imp, "id": str(n), "tagid": f"slot-{n}", "bidfloor": floor,
                       "banner": {**imp["banner"], "pos": pos}}
                      for n, (floor, pos) in enumerate(((0.0, 1), (0.5, 3), (3.0, 7)))]
    pending = retrieved(engine, json.dumps(request).encode())
    groups = pending.groups
    assert len(groups) == 3
    for record, candidates in groups:
        assert list(candidates) == list(retriever.eligible(retriever.query(record), 300, 250, record["domain"], None,
                                                           frozenset()))
    assert len({tuple(c.index for c in candidates) for _, candidates in groups}) > 1  # the imps' top K differ


def test_a_deal_buyer_the_k_left_out_still_bids_through_its_deal(tower_bundle, market, tmp_path):
    engine, _, _, catalog = engines(tower_bundle, market / CAMPAIGNS_FILE, k=10)
    first = {c.campaign_id for c in retrieved(engine, banner()).candidates}
    data = json.loads((market / CAMPAIGNS_FILE).read_text())
    buyer = next(c for c in data["campaigns"] if c["id"] not in first and not c.get("targeting", {}).get("domains")
                 and not c.get("targeting", {}).get("exchanges") and any((x["w"], x["h"]) == (300, 250)
                                                                          for x in c["creatives"]))
    buyer["deals"] = [{"dealid": "D-far"}]
    (tmp_path / "deals.json").write_text(json.dumps(data))
    engine, _, _, _ = engines(tower_bundle, tmp_path / "deals.json", k=10)
    request = json.loads(banner())
    request["imp"][0]["pmp"] = {"private_auction": 1, "deals": [{"id": "D-far", "bidfloor": 0.0}]}
    body = json.dumps(request).encode()
    pending = retrieved(engine, body)
    assert {c.campaign_id for c in pending.candidates} == {buyer["id"]}  # only the deal's buyer may bid
    bid = json.loads(engine.bid(body).body)["seatbid"][0]["bid"][0]
    assert (bid["cid"], bid["dealid"]) == (buyer["id"], "D-far")
    request["imp"][0]["pmp"]["private_auction"] = 0  # open auction: the K and the deal's buyer
    opened = retrieved(engine, json.dumps(request).encode())
    assert {c.campaign_id for c in opened.candidates} == first | {buyer["id"]}


def test_badv_and_sizes_without_creatives_under_retrieval(tower_bundle, market):
    engine, _, _, catalog = engines(tower_bundle, market / CAMPAIGNS_FILE, k=10)
    pending = retrieved(engine, banner())
    blocked = sorted({d for c in pending.candidates for d in c.adomain})
    again = retrieved(engine, banner(badv=blocked))
    if isinstance(again, Outcome):  # every eligible creative was of a blocked advertiser
        assert again.reason == "no_eligible_creative"
    else:
        assert len(again.candidates) == 10 and not set(blocked) & {d for c in again.candidates for d in c.adomain}
    assert engine.bid(banner(7, 7)).reason == "no_eligible_creative"


def test_blocking_rules_come_before_top_k_under_retrieval(tower_bundle, market, tmp_path):
    """Creatives a request's bcat excludes take no place in the K: the K are the best of the others."""
    engine, _, _, _ = engines(tower_bundle, market / CAMPAIGNS_FILE, k=10)
    first = {c.campaign_id for c in retrieved(engine, banner()).candidates}
    data = json.loads((market / CAMPAIGNS_FILE).read_text())
    for campaign in data["campaigns"]:
        if campaign["id"] in first:
            for creative in campaign["creatives"]:
                creative["cat"] = ["IAB7-39"]
    (tmp_path / "cats.json").write_text(json.dumps(data))
    engine, _, _, _ = engines(tower_bundle, tmp_path / "cats.json", k=10)
    assert {c.campaign_id for c in retrieved(engine, banner()).candidates} == first  # metadata alone: the same K
    request = json.loads(banner())
    request["bcat"] = ["IAB7"]
    again = retrieved(engine, json.dumps(request).encode())
    assert len(again.candidates) == 10 and not first & {c.campaign_id for c in again.candidates}
    request["bcat"] = sorted(IAB_CONTENT_1)  # nothing left: counted under the rule
    for campaign in data["campaigns"]:
        for creative in campaign["creatives"]:
            creative["cat"] = ["IAB1"]
    (tmp_path / "all.json").write_text(json.dumps(data))
    engine, _, _, _ = engines(tower_bundle, tmp_path / "all.json", k=10)
    outcome = retrieved(engine, json.dumps(request).encode())
    assert isinstance(outcome, Outcome) and outcome.reason == "blocked_category"


class _PoisonedFeaturizer:
    """Delegates to the real featurizer, but a record of the domain 'bad.example' cannot be featurized."""

    def __init__(self, featurizer):
        self.featurizer = featurizer

    def transform_into(self, buffers, records):
        if any(r.get("domain") == "bad.example" for r in records):
            raise ValueError("record 0: field 'domain': a bad value")
        return self.featurizer.transform_into(buffers, records)


def test_a_batch_runs_the_imp_tower_once_and_a_bad_record_fails_its_request_alone(tower_bundle, market, monkeypatch):
    engine, _, retriever, _ = engines(tower_bundle, market / CAMPAIGNS_FILE, k=10)
    bodies = [banner(), banner(728, 90), banner(domain="bad.example"), banner(160, 600)]
    alone = [engine.bid(body) for body in bodies]
    calls = []
    vectors_of = retriever.towers.vectors_of

    def counted(features, n):
        assert features is engine.features  # the imps as the batch featurized them, not featurized again
        calls.append(n)
        return vectors_of(features, n)

    monkeypatch.setattr(retriever.towers, "vectors_of", counted)
    monkeypatch.setattr(engine.scorer, "featurizer", _PoisonedFeaturizer(engine.scorer.featurizer))
    good = [0, 1, 3]
    outcomes = engine.score_batch([engine.prepare(bodies[k], None, float("inf")) for k in good])
    assert calls == [3]  # one imp tower call for the batch's imps
    assert [o.body for o in outcomes] == [alone[k].body for k in good]
    calls.clear()
    outcomes = engine.score_batch([engine.prepare(body, None, float("inf")) for body in bodies])
    assert calls == [3]  # the bad request left the batch when featurized: one call for the others' imps
    assert outcomes[2].status == 400 and b"cannot featurize" in outcomes[2].body
    assert [outcomes[k].body for k in good] == [alone[k].body for k in good]


def test_small_catalogs_skip_retrieval(tower_bundle):
    scorer = Scorer(tower_bundle)
    assert retriever_for(scorer, load_catalog(DEFAULT_BUNDLE / "campaigns.json"), 5) is None


def test_a_large_catalog_with_a_bundle_without_towers_is_refused_unless_retrieval_is_off(market):
    scorer = Scorer(DEFAULT_BUNDLE)
    catalog = load_catalog(market / CAMPAIGNS_FILE)
    with pytest.raises(BundleError, match="need retrieval.*python -m train twotower.*--no-retrieval"):
        retriever_for(scorer, catalog)
    assert retriever_for(scorer, catalog, enabled=False) is None


# -- the server ----------------------------------------------------------------------------------------------------
def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bidder", "serve", "--port", "1", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_refuses_k_0_and_a_large_catalog_without_towers_in_one_line(market):
    for args, message in ((["--retrieve-k", "0"], "error: --retrieve-k must be a positive"),
                          (["--campaigns", str(market / CAMPAIGNS_FILE)], "error: ")):
        done = serve(*args)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr
    assert "need retrieval" in done.stderr and "twotower" in done.stderr


async def test_reload_of_a_large_catalog_under_load_fails_no_request(aiohttp_client, tower_bundle, market, other_market):
    first, second = market / CAMPAIGNS_FILE, other_market / CAMPAIGNS_FILE
    client = await aiohttp_client(create_app(Config(model=tower_bundle, campaigns=first, now=NOW, retrieve_k=50)))
    statuses: list[int] = []
    stop = asyncio.Event()

    async def load(size):
        body = banner(*size)
        while not stop.is_set():
            response = await client.post("/bid", data=body)
            statuses.append(response.status)
            await response.read()

    workers = [asyncio.create_task(load(size)) for size in ((300, 250), (728, 90), (160, 600), (300, 250))]
    for target in (second, first, second):
        response = await client.post("/admin/reload", json={"campaigns": str(target)})
        assert response.status == 200, await response.text()
    stop.set()
    await asyncio.gather(*workers)
    assert len(statuses) > 20 and set(statuses) <= {200, 204}, sorted(set(statuses))
    state = client.app[STATE]
    assert len(state.engine.catalog) == 1500 and state.engine.retriever is not None
    assert state.engine.retriever.index.matrix.shape[0] == 1500


def test_train_twotower_cli_refuses_bad_settings_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "train", "twotower", "--data", str(tmp_path), "--bundle",
                           str(tmp_path), "--steps", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr == "error: --steps: must be positive, got 0\n", done.stderr


def test_bench_retrieval_reports_agreement_baselines_and_bid_timings(tower_bundle, market, tmp_path):
    from bench.retrieval import main

    out = tmp_path / "retrieval.json"
    assert main(["--data", str(market), "--bundle", str(tower_bundle), "--out", str(out), "--k", "5,40",
                 "--imps", "30", "--bid-requests", "16", "--bid-k", "10", "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 1000
    modes = {(r["mode"], r["k"]) for r in report["results"]}
    assert {("exact", 5), ("exact", 40), ("ad_only", 5), ("value_only", 40)} <= modes
    exact = {r["k"]: r for r in report["results"] if r["mode"] == "exact"}
    assert 0 <= exact[5]["top1_recall"] <= exact[40]["top1_recall"] <= 1 and exact[40]["imps"] == 30
    assert exact[5]["value_lost_cpm"] >= exact[40]["value_lost_cpm"] >= 0
    assert set(report["bid_ms"]) == {"retrieval_k10", "exhaustive"}
    assert report["bid_ms"]["retrieval_k10"]["requests"] == 16 and report["bid_ms"]["exhaustive"]["bids"] > 0
    assert set(report["exact_rows_scored"]) == {"5", "40"} and 0 < report["exact_rows_scored"]["5"] <= 1
    stages = report["stages"]
    assert set(stages["imp_tower_us"]) == {"one_imp", "per_imp_of_8"} and min(stages["imp_tower_us"].values()) > 0
    assert {"alone_200_rows_cold", "8_requests_in_one_call_hot"} <= set(stages["ranker_ms_per_request"])
    assert main(["--data", str(market), "--bundle", str(tower_bundle), "--out", str(out), "--k", "0"]) == 2

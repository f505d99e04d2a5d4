"""First-price bid shading: the censored likelihood, the argmax, the served win-price graph, /bid with at=1 vs 2."""
from __future__ import annotations

import json
import math
import shutil
import time

import numpy as np
import onnxruntime as ort
import pytest
import torch

from bidder.app import DEFAULT_CAMPAIGNS, STATE, Config, create_app
import bidder.openrtb
from bidder.batch import Batch
from bidder.campaigns import load_catalog
from bidder.engine import BidEngine
from bidder.metrics import Metrics
from bidder.scorer import BundleError, Scorer
from bidder import _shading
from bidder.shading import (FLOOR_INPUT, GRID, GRID_OUTPUT, MARKET_FILE, NATIVE_TOLERANCE, OUTPUTS, TERMS_FILE,
                            VALUE_INPUT, WIN_OUTPUT, WinModel, best_bids, bid_grid)
from bidder.spec import SPARSE_INPUT, default_spec
from oracle import metric
from tamper import as_format1, restamp, rewrite_meta
from train.__main__ import main as train_main
from train.data.bidlog import BID_LOG, read_bid_log, split_bid_log
from train.market import EXACT, LOST, WON_BELOW, censored_nll, market_bundle

FIXED_NOW = 1_370_530_800.0


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch):
    monkeypatch.setattr(bidder.openrtb.time, "time", lambda: FIXED_NOW)


def _cdf(z):
    return 0.5 * (1.0 + np.vectorize(math.erf)(np.asarray(z) / math.sqrt(2.0)))


# -- the censored likelihood -------------------------------------------------------------------------------
def test_censored_nll_known_values():
    mu, sigma = torch.zeros(3), torch.ones(3)
    kind = torch.tensor([LOST, WON_BELOW, EXACT])
    threshold = torch.tensor([1.0, math.e, 1.0], dtype=torch.float64)
    per_row = [censored_nll(mu[i:i + 1], sigma[i:i + 1], kind[i:i + 1], threshold[i:i + 1]).item() for i in range(3)]
    assert per_row[0] == pytest.approx(math.log(2))                     # P(market >= median) = 1/2
    assert per_row[1] == pytest.approx(-math.log(_cdf(1.0)))           # P(ln market < 1)
    assert per_row[2] == pytest.approx(0.5 * math.log(2 * math.pi))    # density of N(0, 1) at 0, at price 1


def test_censored_likelihood_recovers_a_known_market():
    # market ~ logN(1.2, 0.5); bids at random; first price hides the price of a win, second price shows it
    rng = np.random.default_rng(0)
    n = 20_000
    market = np.exp(1.2 + 0.5 * rng.normal(size=n))
    bid = np.exp(rng.uniform(0.0, 2.5, n))
    first = rng.random(n) < 0.5
    won = bid > market
    kind = np.where(~won, LOST, np.where(first, WON_BELOW, EXACT))
    threshold = np.where(won & ~first, market, bid)
    mu = torch.zeros(1, requires_grad=True)
    log_sigma = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([mu, log_sigma], max_iter=200, line_search_fn="strong_wolfe")
    kind_t, threshold_t = torch.from_numpy(kind), torch.from_numpy(threshold)

    def closure():
        optimizer.zero_grad()
        loss = censored_nll(mu.expand(n), torch.exp(log_sigma).expand(n), kind_t, threshold_t)
        loss.backward()
        return loss

    optimizer.step(closure)
    assert mu.item() == pytest.approx(1.2, abs=0.04)
    assert math.exp(log_sigma.item()) == pytest.approx(0.5, abs=0.04)
    # dropping the censored rows (wins only, as a naive fit would) biases the estimate down
    exact = np.log(threshold[kind == EXACT])
    assert exact.mean() < 1.2 - 0.15


# -- the argmax --------------------------------------------------------------------------------------------
def test_best_bid_is_the_brute_force_argmax_over_the_grid():
    rng = np.random.default_rng(1)
    n = 200
    values = rng.uniform(0.5, 20.0, n)
    floors = values * rng.uniform(0.0, 0.6, n)
    mu, sigma = rng.normal(1.0, 0.8, n), rng.uniform(0.2, 1.0, n)
    grid = bid_grid(values, floors)
    win = _cdf((np.log(np.maximum(grid, 1e-300)) - mu[:, None]) / sigma[:, None])
    bids, surplus = best_bids(values, grid, win)
    for i in range(n):
        brute = max(range(GRID), key=lambda k: ((values[i] - grid[i, k]) * win[i, k], -k))
        assert bids[i] == grid[i, brute]
        assert surplus[i] == pytest.approx((values[i] - grid[i, brute]) * win[i, brute])
        assert floors[i] <= bids[i] < values[i]
        # the grid loses little against a 20 000-point search
        fine = np.linspace(floors[i], values[i], 20_000)
        best_fine = np.max((values[i] - fine) * _cdf((np.log(np.maximum(fine, 1e-300)) - mu[i]) / sigma[i]))
        assert surplus[i] >= 0.995 * best_fine - 1e-12


def test_no_positive_surplus_means_no_bid_candidate():
    values, floors = np.array([2.0, 2.0]), np.array([2.0, 0.0])
    grid = bid_grid(values, floors)
    bids, surplus = best_bids(values, grid, np.ones_like(grid))
    assert surplus[0] == 0.0  # value at the floor: nothing to gain
    assert bids[1] == 0.0 and surplus[1] == 2.0  # a sure win at any bid: the lowest bid


# -- the bid log and the trained model -----------------------------------------------------------------------
def test_bid_log_is_censored_as_documented(synthetic_data):
    log = read_bid_log(synthetic_data / BID_LOG, default_spec(), progress=False)
    assert len(log) == 20_000 and 0.2 < log.first_price.mean() < 0.8 and 0.2 < log.won.mean() < 0.9
    assert np.array_equal(log.won, log.bid > log.market_true)
    assert np.all(log.bid >= log.floor - 1e-6)
    assert np.all(np.isnan(log.paid[~log.won]))
    assert np.allclose(log.paid[log.won & log.first_price], log.bid[log.won & log.first_price])
    second = log.won & ~log.first_price
    assert np.allclose(log.paid[second], np.maximum(log.market_true, log.floor)[second], atol=1e-6)
    assert log.clicks[~log.won].sum() == 0 and log.clicks[log.won].sum() > 0
    parts = split_bid_log(log)
    assert [len(p) for p in parts.values()] == [14_400, 1_600, 4_000]


@pytest.fixture(scope="module")
def market_bundle_dir(small_bundle, synthetic_data, tmp_path_factory):
    bundle = tmp_path_factory.mktemp("market") / "bundle"
    shutil.copytree(small_bundle, bundle)
    market_bundle(synthetic_data, bundle, epochs=2, progress=False)
    return bundle


def test_market_graph_is_listed_with_its_parity_and_figures(market_bundle_dir):
    entry = json.loads((market_bundle_dir / "meta.json").read_text())["graphs"]["market"]
    assert entry["files"] == [MARKET_FILE] and entry["parity"]["max_abs_diff"] <= 1e-6
    assert entry["terms"]["file"] == TERMS_FILE and entry["terms"]["max_abs_diff"] <= NATIVE_TOLERANCE
    test = entry["metrics"]["test"]
    assert test["censored_nll"] > 0 and 0 <= test["mae_vs_truth"] < 0.2
    assert len(test["win_rate_by_bin"]) == 10
    assert "slotid" in entry["fields"] and "creative" not in entry["fields"]


def _graph_outputs(bundle, scorer, records, values, floors):
    session = ort.InferenceSession(str(bundle / MARKET_FILE), providers=["CPUExecutionProvider"])
    return dict(zip(OUTPUTS, session.run(list(OUTPUTS), {
        SPARSE_INPUT: scorer.featurizer.transform(records)[SPARSE_INPUT],
        VALUE_INPUT: values.astype(np.float32).reshape(-1, 1), FLOOR_INPUT: floors.astype(np.float32).reshape(-1, 1)})))


def _graph_only(model: WinModel) -> WinModel:
    """``model`` served by its graph, as a bundle without the terms is."""
    model.native = False
    return model


@pytest.mark.parametrize("native", [True, False])
def test_served_bids_equal_python_onnx_runtime_and_the_argmax(market_bundle_dir, sample_records, native):
    scorer = Scorer(market_bundle_dir)
    model = WinModel.for_scorer(scorer, max_imps=8)  # 20 records: three calls
    assert model.native
    if not native:
        _graph_only(model)
    records = sample_records[:20]
    values = np.linspace(1.0, 30.0, len(records))
    floors = values * np.linspace(0.0, 0.5, len(records))
    bids, surplus = model.shade(scorer.featurizer, records, values.tolist(), floors.tolist())
    got = _graph_outputs(market_bundle_dir, scorer, records, values, floors)
    if native:  # double precision against the graph's float32: the same grid bid, the same surplus to rounding
        assert np.allclose(bids, got["bid"][:, 0], rtol=1e-6) and np.allclose(surplus, got["surplus"][:, 0], rtol=1e-5)
    else:
        assert np.array_equal(np.array(bids, dtype=np.float32), got["bid"][:, 0])
        assert np.array_equal(np.array(surplus, dtype=np.float32), got["surplus"][:, 0])
    # the graph's grid is bid_grid's (to float32 rounding) and its bid the brute-force argmax over it
    assert np.allclose(got[GRID_OUTPUT], bid_grid(values, floors), rtol=1e-6)
    expected_bids, expected_surplus = best_bids(values, got[GRID_OUTPUT].astype(np.float64), got[WIN_OUTPUT])
    assert np.allclose(bids, expected_bids, rtol=1e-6) and np.allclose(surplus, expected_surplus, rtol=1e-5)
    assert np.all(np.diff(got[WIN_OUTPUT], axis=1) >= 0) and np.all(np.array(bids) < values)
    assert np.all(np.array(bids) >= (floors if native else floors.astype(np.float32)))


@pytest.mark.parametrize("native", [True, False])
def test_shading_rows_featurized_already_equals_featurizing_them(market_bundle_dir, sample_records, native):
    """The bid path hands the search the rows the factorized scorer featurized (any order, any subset)."""
    scorer = Scorer(market_bundle_dir)
    model = WinModel.for_scorer(scorer, max_imps=4)  # 7 imps: two calls
    if not native:
        _graph_only(model)
    featurized = scorer.featurizer.transform(sample_records[:12])[SPARSE_INPUT]
    for rows in ([0, 1, 2, 3, 4, 5, 6], [5, 6, 7, 8, 9, 10, 11], [11, 2, 7, 3, 0, 9, 4]):
        values = [3.0 + r for r in rows]
        floors = [0.1 * r for r in rows]
        expected = model.shade(scorer.featurizer, [sample_records[r] for r in rows], values, floors)
        assert model.shade_rows(featurized, rows, values, floors) == expected


def test_engine_shades_the_same_with_and_without_factorized_features(market_bundle_dir, openrtb_examples):
    from bidder.factorized import FactorizedScorer

    scorer = Scorer(market_bundle_dir)
    market = WinModel.for_scorer(scorer, max_imps=scorer.max_batch)
    factorized = FactorizedScorer.for_scorer(scorer, max_imps=scorer.max_batch, max_rows=scorer.max_batch)
    engine = BidEngine(scorer, load_catalog(DEFAULT_CAMPAIGNS), Metrics(), now=FIXED_NOW, factorized=factorized,
                       market=market)
    pendings = [engine.prepare(_request(openrtb_examples, 1), None, 0.0) for _ in range(3)]
    batch = Batch(pendings, engine.catalog.candidates, engine.features)
    for stage in (engine.featurize, engine.layout, engine.score, engine.value, engine.shade):
        stage(batch)
    assert batch.features is factorized.imp_inputs and len(batch.records) == 3 and len(batch.shaded) == 3
    imps = sorted(batch.shaded)
    values = [batch.best_value[j] for j in imps]
    owner = {p.first_imp + position: p for p in pendings for position in range(len(p.imp_ids))}
    floors = [owner[j].floors[batch.imp_ids[j]] for j in imps]
    again, _ = market.shade(scorer.featurizer, [batch.records[j] for j in imps], values, floors)  # featurized anew
    assert [batch.shaded[j] for j in imps] == again
    engine.encode_all(batch)
    assert all(b"price" in outcome.body for outcome in batch.outcomes)


def test_native_search_is_the_graphs_on_random_imps(market_bundle_dir, sample_records):
    """P(win) at every grid bid and the best bid of each imp: the native search against the graph."""
    scorer = Scorer(market_bundle_dir)
    model = WinModel.for_scorer(scorer, max_imps=64)
    assert model.native_difference(rows=512, seed=3) <= NATIVE_TOLERANCE
    records = sample_records[:64]
    rng = np.random.default_rng(1)
    values = np.exp(rng.uniform(-2.0, 5.0, len(records)))
    floors = values * rng.uniform(0.0, 0.9, len(records))
    sparse = scorer.featurizer.transform(records)[SPARSE_INPUT]
    bids, surplus, win = model._search.search(sparse, values, floors)
    got = _graph_outputs(market_bundle_dir, scorer, records, values, floors)
    assert np.max(np.abs(win - got[WIN_OUTPUT])) <= NATIVE_TOLERANCE
    # the bid is the grid point of highest surplus over the native P(win), the first of equal ones
    expected_bids, expected_surplus = best_bids(values, bid_grid(values, floors), win)
    assert np.allclose(bids, expected_bids, rtol=1e-12) and np.allclose(surplus, expected_surplus, rtol=1e-12)
    # where the two precisions pick different grid bids, they are near-ties: by the graph's own P(win), the
    # native bid's surplus is the best to the tolerance
    index = np.rint((bids - floors) / ((values - floors) / GRID)).astype(int)
    rows = np.arange(len(bids))
    graph_surplus = (values[:, None] - got[GRID_OUTPUT]) * got[WIN_OUTPUT]
    best = graph_surplus.max(axis=1)
    assert np.all(graph_surplus[rows, index] >= best - NATIVE_TOLERANCE * np.maximum(1.0, np.abs(best)))
    assert np.mean(np.isclose(bids, got["bid"][:, 0], rtol=1e-6)) > 0.5
    assert np.all((floors <= bids) & (bids < values))


def test_pruned_search_is_the_plain_grid_search_bit_for_bit(market_bundle_dir, sample_records):
    """``shade`` skips the grid bids whose surplus bound cannot reach the best: its bids and surpluses are the plain
    loop's (``search`` works out every grid bid) exactly, over imps whose best bid lies anywhere on the grid."""
    scorer = Scorer(market_bundle_dir)
    model = WinModel.for_scorer(scorer, max_imps=64)
    records = (sample_records * 40)[:2000]
    sparse = scorer.featurizer.transform(records)[SPARSE_INPUT]
    rng = np.random.default_rng(7)
    values = np.exp(rng.uniform(-4.0, 9.0, len(records)))
    floors = values * np.where(rng.random(len(records)) < 0.2, 0.0, rng.uniform(0.0, 1.0, len(records)))
    floors[:20] = values[:20]  # nothing between floor and value: every grid bid is the floor
    bids, surplus = model._search.shade(sparse, list(range(len(records))), values.tolist(), floors.tolist())
    plain_bids, plain_surplus, _ = model._search.search(sparse, values, floors)
    assert np.array_equal(bids, plain_bids) and np.array_equal(surplus, plain_surplus)
    index = np.rint((plain_bids - floors) / np.where(values > floors, (values - floors) / GRID, 1.0))
    assert len(np.unique(index)) > GRID // 4  # the best bids are spread over the grid, not at its ends only


def test_native_search_refuses_indices_out_of_range(market_bundle_dir):
    model = WinModel.for_scorer(Scorer(market_bundle_dir), max_imps=4)
    sparse = np.zeros((2, model.spec.input_width(SPARSE_INPUT)), dtype=np.int64)
    with pytest.raises(ValueError, match="row 2 is outside"):
        model.shade_rows(sparse, [0, 2], [1.0, 1.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="differ in length"):
        model._search.shade(sparse, [0, 1], [1.0], [0.0, 0.0])
    sparse[1, model.terms.columns[0]] = 10**9
    with pytest.raises(ValueError, match="outside the market table"):
        model.shade_rows(sparse, [0, 1], [1.0, 1.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="grid must be >= 1"):
        _shading.Search(model.terms.table, model.terms.columns, model.terms.starts, -1.0, 1.0, 0)


def _rewrite_meta(bundle, change) -> None:
    meta = json.loads((bundle / "meta.json").read_text())
    change(meta["graphs"]["market"])
    (bundle / "meta.json").write_text(json.dumps(meta))


def test_a_bundle_without_the_terms_is_served_by_the_graph(market_bundle_dir, tmp_path, openrtb_examples):
    """Bundles of format 1 may predate the terms (format 2 requires them)."""
    bundle = tmp_path / "b"
    shutil.copytree(market_bundle_dir, bundle)
    rewrite_meta(bundle, as_format1)
    _rewrite_meta(bundle, lambda entry: entry.pop("terms"))
    (bundle / TERMS_FILE).unlink()
    graph = WinModel.for_scorer(Scorer(bundle))
    assert graph is not None and not graph.native
    with pytest.raises(ValueError, match="can only be searched through the graph"):
        graph.native = True
    prices = []
    for path in (market_bundle_dir, bundle):
        scorer = Scorer(path)
        engine = BidEngine(scorer, load_catalog(DEFAULT_CAMPAIGNS), Metrics(), now=FIXED_NOW,
                           market=WinModel.for_scorer(scorer))
        prices.append(json.loads(engine.bid(_request(openrtb_examples, 1)).body)["seatbid"][0]["bid"][0]["price"])
    assert prices[0] == pytest.approx(prices[1], abs=2e-6)


def test_broken_terms_are_refused_at_load(market_bundle_dir, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(market_bundle_dir, bundle)
    terms = dict(np.load(bundle / TERMS_FILE))
    (bundle / TERMS_FILE).write_bytes(b"not an npz")
    with pytest.raises(BundleError, match=f"{TERMS_FILE}: its sha256 .* is not the .* meta.json records"):
        WinModel.for_scorer(Scorer(bundle))
    restamp(bundle)  # from here on the digests match: the terms' own checks must refuse them
    with pytest.raises(BundleError, match="not readable as the market model's terms"):
        WinModel.for_scorer(Scorer(bundle))
    np.savez(bundle / TERMS_FILE, **{k: v for k, v in terms.items() if k != "starts"})
    restamp(bundle)
    with pytest.raises(BundleError, match="has no starts"):
        WinModel.for_scorer(Scorer(bundle))
    np.savez(bundle / TERMS_FILE, **{**terms, "table": terms["table"].astype(np.float64)})
    restamp(bundle)
    with pytest.raises(BundleError, match="table must be finite float32"):
        WinModel.for_scorer(Scorer(bundle))
    np.savez(bundle / TERMS_FILE, **{**terms, "k_range": np.array([1.0, -1.0])})
    restamp(bundle)
    with pytest.raises(BundleError, match="k_range must be"):
        WinModel.for_scorer(Scorer(bundle))
    np.savez(bundle / TERMS_FILE, **{**terms, "table": terms["table"] + np.float32(0.05)})  # not the graph's model
    restamp(bundle)
    with pytest.raises(BundleError, match="differ from the graph"):
        WinModel.for_scorer(Scorer(bundle))
    (bundle / TERMS_FILE).unlink()
    with pytest.raises(BundleError, match=f"lists {TERMS_FILE} but the bundle has no such file"):
        WinModel.for_scorer(Scorer(bundle))


def test_a_bundle_without_a_market_model_shades_nothing(small_bundle):
    assert WinModel.for_scorer(Scorer(small_bundle)) is None


def test_a_broken_market_entry_is_refused_at_load(market_bundle_dir, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(market_bundle_dir, bundle)
    (bundle / MARKET_FILE).write_bytes((bundle / MARKET_FILE).read_bytes() + b"\0")
    with pytest.raises(BundleError, match="sha256"):
        WinModel.for_scorer(Scorer(bundle))
    (bundle / MARKET_FILE).unlink()
    with pytest.raises(BundleError, match="no such file"):
        WinModel.for_scorer(Scorer(bundle))


# -- /bid ------------------------------------------------------------------------------------------------------
def _request(openrtb_examples, at: int | None, floor: float | None = 0.0) -> bytes:
    request = json.loads(openrtb_examples["bid-request-2.5/simple-banner.json"])
    request.pop("at", None)
    if at is not None:
        request["at"] = at
    if floor is None:
        request["imp"][0].pop("bidfloor", None)
    else:
        request["imp"][0]["bidfloor"] = floor
    return json.dumps(request).encode()


async def test_first_price_is_shaded_second_price_is_not(aiohttp_client, market_bundle_dir, openrtb_examples):
    client = await aiohttp_client(create_app(Config(model=market_bundle_dir, campaigns=DEFAULT_CAMPAIGNS)))
    prices = {}
    for at in (None, 2, 1):
        response = await client.post("/bid", data=_request(openrtb_examples, at))
        assert response.status == 200
        prices[at] = (await response.json())["seatbid"][0]["bid"][0]["price"]
    assert prices[None] == prices[2]  # OpenRTB's default auction type is second price
    assert 0 < prices[1] < prices[2]
    page = await (await client.get("/metrics")).text()
    assert metric(page, "bidder_shading_ratio_count", auction="first_price") == 1
    assert metric(page, "bidder_shading_ratio_count", auction="second_price") == 2
    assert metric(page, "bidder_shading_ratio_sum", auction="second_price") == 2.0  # bid at its value: 1 each
    assert metric(page, "bidder_shading_ratio_sum", auction="first_price") == pytest.approx(prices[1] / prices[2],
                                                                                           rel=1e-5)
    # no floor given: the search starts at zero and still bids
    response = await client.post("/bid", data=_request(openrtb_examples, 1, floor=None))
    assert response.status == 200 and 0 < (await response.json())["seatbid"][0]["bid"][0]["price"] < prices[2]


async def test_first_price_without_a_market_model_bids_the_value(aiohttp_client, small_bundle, openrtb_examples):
    client = await aiohttp_client(create_app(Config(model=small_bundle, campaigns=DEFAULT_CAMPAIGNS)))
    first = await (await client.post("/bid", data=_request(openrtb_examples, 1))).json()
    second = await (await client.post("/bid", data=_request(openrtb_examples, 2))).json()
    assert first["seatbid"][0]["bid"][0]["price"] == second["seatbid"][0]["bid"][0]["price"]


@pytest.mark.parametrize("at", [0, 3, 501, -1])
async def test_an_unsupported_auction_type_is_refused(aiohttp_client, small_bundle, openrtb_examples, at):
    client = await aiohttp_client(create_app(Config(model=small_bundle, campaigns=DEFAULT_CAMPAIGNS)))
    response = await client.post("/bid", data=_request(openrtb_examples, at))
    assert response.status == 400
    body = await response.json()
    assert body["path"] == "$.at" and "auction type" in body["error"]


def test_floor_is_respected_and_no_surplus_means_no_bid(market_bundle_dir, openrtb_examples):
    engine = BidEngine(Scorer(market_bundle_dir), load_catalog(DEFAULT_CAMPAIGNS), Metrics(),
                       market=WinModel.for_scorer(Scorer(market_bundle_dir)))

    def value_at(floor: float) -> float | None:  # the imp's value: the second-price bid at this floor
        outcome = engine.bid(_request(openrtb_examples, 2, floor=floor))
        return json.loads(outcome.body)["seatbid"][0]["bid"][0]["price"] if outcome.status == 200 else None

    unfloored = value_at(0.0)
    for share in (0.9, 0.7, 0.5, 0.3):  # the floor is a feature: a floor high in the value it leaves
        floor = round(unfloored * share, 6)
        value = value_at(floor)
        if value is not None and value > floor:
            break
    else:
        pytest.fail(f"no floor below the value found (value without a floor: {unfloored})")
    shaded = json.loads(engine.bid(_request(openrtb_examples, 1, floor=floor)).body)["seatbid"][0]["bid"][0]["price"]
    assert floor <= shaded < value
    # a floor equal to the imp's unrounded value at that floor: surplus 0 at best. The floor is a bucketized
    # feature, so the value is constant over a bucket of floors, and a value that falls in its own bucket is such
    # a floor (JSON carries the float exactly).
    def exact_value(floor: float) -> float:
        pending = engine.prepare(_request(openrtb_examples, 2, floor=floor), None, time.perf_counter())
        batch = Batch([pending], engine.catalog.candidates, engine.features)
        for stage in (engine.featurize, engine.layout, engine.score, engine.value):
            stage(batch)
        return batch.best_value[0]  # pCTR × value per click × 1000 of the imp's best row

    for k in range(1, 41):
        floor = exact_value(round(unfloored * k / 40, 6))
        if exact_value(floor) == floor:
            break
    else:
        pytest.fail("no floor equal to the value it leaves found")
    assert value_at(floor) == round(floor, 6)  # second price bids the value, which just clears the floor
    at_value = engine.bid(_request(openrtb_examples, 1, floor=floor))
    assert (at_value.status, at_value.reason) == (204, "no_surplus")
    assert metric(engine.metrics.render().decode(), "bidder_nobid_imps_total", reason="no_surplus") == 1


# -- the command line ---------------------------------------------------------------------------------------------
def test_train_default_fits_the_win_price_model_too(tmp_path, capsys):
    """``train default`` reproduces the shipped bundle: the CTR model, then the market model on the same data's bid log."""
    out = tmp_path / "default"
    assert train_main(["default", "--out", str(out), "--rows", "3000", "--epochs", "1", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    entry = json.loads((out / "meta.json").read_text())["graphs"]["market"]
    assert summary["market"] == entry and (out / MARKET_FILE).is_file()
    assert entry["data"] == "synthetic: python -m train synth --rows 3000 --seed 2013"
    assert (out / TERMS_FILE).is_file() and WinModel.for_scorer(Scorer(out)).native
    # the CTR model shipped is the trained DeepFM distilled into a 64,32 student with 8-bit tables (train/compress/)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["compression"]["method"] == "distill + int8-dynamic" == summary["compression"]["method"]
    assert [(s["method"], s["settings"].get("ops")) for s in meta["compression"]["steps"]] == [
        ("distill", None), ("int8-dynamic", "tables")]
    assert meta["compression"]["size_ratio"] < 0.3 and meta["hyperparameters"]["dnn_hidden_units"] == [64, 32]
    assert meta["data"]["path"] == entry["data"] and meta["graphs"]["factorized"]["parity"]["max_abs_diff"] <= 1e-6


def test_train_market_errors(tmp_path, small_bundle, synthetic_data, capsys):
    assert train_main(["market", "--data", str(synthetic_data), "--bundle", str(tmp_path)]) == 2
    assert "not a model bundle" in capsys.readouterr().err
    bundle = tmp_path / "b"
    shutil.copytree(small_bundle, bundle)
    assert train_main(["market", "--data", str(tmp_path), "--bundle", str(bundle)]) == 2
    assert f"no such file (python -m train synth writes {BID_LOG})" in capsys.readouterr().err
    assert train_main(["market", "--data", str(synthetic_data), "--bundle", str(bundle), "--epochs", "0"]) == 2
    assert "--epochs must be a positive integer" in capsys.readouterr().err


# -- cost (`pytest --benchmark`) -------------------------------------------------------------------------------
@pytest.mark.parametrize("at", [2, 1])
def test_bench_bid_first_vs_second_price(benchmark, market_bundle_dir, openrtb_examples, at):
    """The full in-process bid of the simple-banner request (factorized scoring), shaded (at=1) or not (at=2)."""
    from bidder.factorized import FactorizedScorer

    benchmark.group = "in-process bid, simple-banner: at=2 (value) vs at=1 (shaded)"
    scorer = Scorer(market_bundle_dir)
    engine = BidEngine(scorer, load_catalog(DEFAULT_CAMPAIGNS), Metrics(), now=FIXED_NOW,
                       factorized=FactorizedScorer.for_scorer(scorer, max_imps=scorer.max_batch,
                                                              max_rows=scorer.max_batch),
                       market=WinModel.for_scorer(scorer, max_imps=scorer.max_batch))
    assert benchmark(engine.bid, _request(openrtb_examples, at)).status == 200


def test_bench_shading_reports_both_auctions(market_bundle_dir, small_bundle, tmp_path, capsys):
    from bench.__main__ import main as bench_main

    out = tmp_path / "shading.json"
    assert bench_main(["shading", "--bundle", str(market_bundle_dir), "--rounds", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["us_per_request"]) == {f"{s}_at{a}" for s in ("lone", "batch8", "batch32") for a in (1, 2)}
    assert set(result["ratio_at1_over_at2"]) == {"lone", "batch8", "batch32"}
    assert result["prices"]["at1"] < result["prices"]["at2"] and out.with_suffix(".png").is_file()
    assert set(result["search_us_per_call"]) == {"native", "graph"}
    capsys.readouterr()
    assert bench_main(["shading", "--bundle", str(market_bundle_dir), "--rounds", "0", "--out", str(out)]) == 2
    assert "error: --rounds must be >= 1" in capsys.readouterr().err
    assert bench_main(["shading", "--bundle", str(small_bundle), "--out", str(out)]) == 2
    assert "has no win-price model" in capsys.readouterr().err


# -- the replay -----------------------------------------------------------------------------------------------
def test_replay_writes_every_strategy_and_a_plot(market_bundle_dir, synthetic_data, tmp_path, capsys):
    from bench.__main__ import main as bench_main

    out = tmp_path / "replay.json"
    assert bench_main(["replay", "--data", str(synthetic_data), "--bundle", str(market_bundle_dir), "--out", str(out),
                       "--quiet"]) == 0
    result = json.loads(out.read_text())
    for name in ("truthful", "fixed", "model", "oracle"):
        row = result["strategies"][name]
        assert set(row) >= {"wins", "spend", "value", "surplus"}
        assert row["surplus"] == pytest.approx(row["value"] - row["spend"], abs=1e-3)
    fp = result["strategies"]
    assert fp["oracle"]["surplus"] > fp["truthful"]["surplus"] and fp["model"]["surplus"] > fp["truthful"]["surplus"]
    assert fp["truthful"]["wins"] >= fp["fixed"]["wins"]  # the value is the highest bid of all
    assert 0.05 <= result["first_price"]["fixed_factor"] <= 1.0
    assert set(result["second_price"]["strategies"]) == {"truthful", "fixed", "model", "oracle"}
    assert out.with_suffix(".png").stat().st_size > 10_000
    capsys.readouterr()


def test_replay_errors(small_bundle, synthetic_data, tmp_path, capsys):
    from bench.__main__ import main as bench_main

    assert bench_main(["replay", "--data", str(synthetic_data), "--bundle", str(small_bundle),
                       "--out", str(tmp_path / "r.json")]) == 2
    assert "has no win-price model" in capsys.readouterr().err
    assert bench_main(["replay", "--data", str(synthetic_data), "--bundle", str(small_bundle),
                       "--out", str(tmp_path / "missing" / "r.json")]) == 2
    assert capsys.readouterr().err.startswith("error: --out")


async def test_graph_shading_serves_the_same_bids(aiohttp_client, market_bundle_dir, openrtb_examples):
    """``bidder serve --graph-shading``: market.onnx through ONNX Runtime instead of the native search, the same
    bids to a micro-dollar."""
    prices = []
    for native in (True, False):
        app = create_app(Config(model=market_bundle_dir, campaigns=DEFAULT_CAMPAIGNS, native_shading=native))
        client = await aiohttp_client(app)
        response = await client.post("/bid", data=_request(openrtb_examples, 1))
        assert response.status == 200
        prices.append((await response.json())["seatbid"][0]["bid"][0]["price"])
        assert app[STATE].engine.market.native is native
    assert prices[0] == pytest.approx(prices[1], abs=1.0000001e-6)


def test_a_compressed_bundle_keeps_the_win_price_model(market_bundle_dir, tmp_path):
    """``train compress`` carries the market graph and its terms over: they read the spec's imp fields, not the
    CTR model's weights."""
    from train.compress import compress_bundle
    from train.errors import TrainError

    out = tmp_path / "int8"
    compress_bundle(market_bundle_dir, "int8-dynamic", out, settings={"ops": "tables"}, progress=False)
    source = json.loads((market_bundle_dir / "meta.json").read_text())["graphs"]["market"]
    assert json.loads((out / "meta.json").read_text())["graphs"]["market"] == source
    assert (out / TERMS_FILE).read_bytes() == (market_bundle_dir / TERMS_FILE).read_bytes()
    assert WinModel.for_scorer(Scorer(out)).native
    broken = tmp_path / "broken"
    shutil.copytree(market_bundle_dir, broken)
    (broken / TERMS_FILE).unlink()
    with pytest.raises(TrainError, match=f"lists {TERMS_FILE} but the bundle has no such file"):
        compress_bundle(broken, "int8-dynamic", tmp_path / "out2", settings={"ops": "tables"}, progress=False)

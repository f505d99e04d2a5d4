"""Micro-batching across requests: batched answers equal lone answers bit for bit, failures stay alone."""
from __future__ import annotations

import asyncio
import json

import msgspec
import pytest

from bidder.app import DEFAULT_CAMPAIGNS, STATE, Config, create_app
import bidder.openrtb
from bidder.batching import Batcher
from bidder.campaigns import load_catalog
from bidder.engine import BidEngine, Outcome
from bidder.factorized import FactorizedScorer
from bidder.metrics import Metrics
from bidder.openrtb import DEFAULT_SEAT, BidResponse, encode_response
from bidder.scorer import Scorer
from oracle import metric

FIXED_NOW = 1_370_530_800.0  # Thursday 2013-06-06 15:00 UTC: weekday/hour must not move during a test


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch):
    """The request's weekday/hour come from the wall clock; a test must not straddle an hour."""
    monkeypatch.setattr(bidder.openrtb.time, "time", lambda: FIXED_NOW)


def distinct_requests(openrtb_examples, n: int) -> list[tuple[str, bytes]]:
    """n different bid requests: ids, slots, floors, sizes, user agents, two imps, exchange routes."""
    base = json.loads(openrtb_examples["bid-request-2.5/simple-banner.json"])
    sizes = [(300, 250), (728, 90), (160, 600), (300, 250), (336, 280)]
    out = []
    for i in range(n):
        request = json.loads(json.dumps(base))
        request["id"] = f"batch-{i}"
        imp = request["imp"][0]
        imp["tagid"] = f"slot-{i % 7}"
        imp["bidfloor"] = [0.0, 0.5, 2.0, 9.0][i % 4]
        imp["banner"]["w"], imp["banner"]["h"] = sizes[i % len(sizes)]
        request["device"]["ua"] = request["device"]["ua"] + f" build/{i % 3}"
        if i % 3 == 0:
            second = json.loads(json.dumps(imp))
            second["id"] = "2"
            second["banner"]["w"], second["banner"]["h"] = sizes[(i + 1) % len(sizes)]
            request["imp"].append(second)
        route = "/bid" if i % 2 else f"/bid/{1 + i % 4}"
        out.append((route, json.dumps(request).encode()))
    return out


@pytest.fixture
async def client(aiohttp_client, small_bundle):
    return await aiohttp_client(create_app(Config(model=small_bundle, campaigns=DEFAULT_CAMPAIGNS)))


async def test_concurrent_requests_get_the_answers_they_get_alone(client, openrtb_examples):
    requests = distinct_requests(openrtb_examples, 24)
    alone = []
    for route, body in requests:
        response = await client.post(route, data=body)
        alone.append((response.status, await response.read()))
    assert sum(status == 200 for status, _ in alone) >= 12  # the comparison must be about bids, not 204s
    before = metric(await (await client.get("/metrics")).text(), "bidder_batch_requests_count")

    async def send(route, body):
        response = await client.post(route, data=body)
        return response.status, await response.read()

    together = await asyncio.gather(*(send(route, body) for route, body in requests))
    assert together == alone
    text = await (await client.get("/metrics")).text()
    calls = metric(text, "bidder_batch_requests_count") - before
    assert calls < sum(status == 200 for status, _ in alone), "no two concurrent requests shared an ORT call"


@pytest.fixture(params=["factorized", "rows"])
def scoring(request) -> str:
    return request.param


def make_engine(bundle, max_batch: int = 256, scoring: str = "factorized") -> BidEngine:
    scorer = Scorer(bundle, max_batch=max_batch)
    factorized = None
    if scoring == "factorized":
        assert scorer.factorized_files(), "a DeepFM bundle carries factorized graphs"
        factorized = FactorizedScorer.for_scorer(scorer, max_imps=max_batch, max_rows=max_batch)
    return BidEngine(scorer, load_catalog(DEFAULT_CAMPAIGNS), Metrics(), factorized=factorized)


async def test_requests_submitted_in_one_turn_share_one_call(small_bundle, openrtb_examples, scoring):
    engine = make_engine(small_bundle, scoring=scoring)
    bodies = [body for _, body in distinct_requests(openrtb_examples, 12)]
    alone = [engine.bid(body) for body in bodies]
    engine.metrics = metrics = Metrics()
    prepared = [engine.prepare(body, None, float("inf")) for body in bodies]
    assert all(p.__class__ is not Outcome for p in prepared)
    together = await asyncio.gather(*(engine.submit(p) for p in prepared))
    assert together == alone
    assert sum(metrics.batch_requests.counts) == 1 and metrics.batch_requests.sum == len(bodies)
    assert metrics.batch_rows.sum == sum(len(p.rows) for p in prepared)


async def test_batches_are_cut_at_max_batch_rows_without_splitting_a_request(small_bundle, openrtb_examples,
                                                                              scoring):
    engine = make_engine(small_bundle, max_batch=20, scoring=scoring)
    reference = make_engine(small_bundle, scoring=scoring)
    bodies = [body for _, body in distinct_requests(openrtb_examples, 12)]
    prepared = [engine.prepare(body, None, float("inf")) for body in bodies]
    together = await asyncio.gather(*(engine.submit(p) for p in prepared))
    assert together == [reference.bid(body) for body in bodies]
    rows = engine.metrics.batch_rows
    over = [n for n in [len(p.rows) for p in prepared] if n > 20]  # scored alone, in chunks of 20
    assert sum(rows.counts[rows.bounds.index(32.0) + 1:]) == 0
    assert rows.sum == sum(len(p.rows) for p in prepared)
    assert sum(engine.metrics.batch_requests.counts) > 1 + len(over)


class Observed:
    """Stands in for a histogram series: the values observed, in order."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def observe(self, value: float) -> None:
        self.values.append(value)


def calls_of(sizes: list[int], limit: int) -> list[tuple[int, int]]:
    """The scoring calls of a batch of requests with ``sizes`` rows, as (rows, requests), by the documented rule:
    requests in order, a call closed before the request that would take it past ``limit`` rows, a request of more
    than ``limit`` rows alone."""
    if sum(sizes) <= limit:
        return [(sum(sizes), len(sizes))]
    calls, rows, requests = [], 0, 0
    for n in sizes:
        if requests and (n > limit or rows + n > limit):
            calls.append((rows, requests))
            rows = requests = 0
        if n > limit:
            calls.append((n, 1))
            continue
        rows, requests = rows + n, requests + 1
    return calls + [(rows, requests)] if requests else calls


@pytest.mark.parametrize("limit", [9, 17, 18, 21, 27, 45])  # 17, 21: calls filled to the row
async def test_each_call_of_a_cut_batch_is_what_the_rule_says(small_bundle, openrtb_examples, scoring, limit):
    """Every call a batch larger than ``max_batch`` is cut into, its rows and requests as observed by the
    ``bidder_batch_rows``/``bidder_batch_requests`` histograms, is the rule's; the answers are the uncut engine's."""
    engine = make_engine(small_bundle, max_batch=limit, scoring=scoring)
    reference = make_engine(small_bundle, scoring=scoring)
    bodies = [body for _, body in distinct_requests(openrtb_examples, 24)]
    prepared = [engine.prepare(body, None, float("inf")) for body in bodies]
    assert all(p.__class__ is not Outcome for p in prepared)
    sizes = [p.n_rows for p in prepared]
    assert len(set(sizes)) > 1 and any(n > limit for n in sizes) == (limit < max(sizes))
    engine.metrics.batch_rows, engine.metrics.batch_requests = rows, requests = Observed(), Observed()
    together = await asyncio.gather(*(engine.submit(p) for p in prepared))
    assert together == [reference.bid(body) for body in bodies]
    expected = calls_of(sizes, limit)
    assert len(expected) > 1
    assert list(zip(rows.values, requests.values)) == expected


def test_a_plain_response_is_what_msgspec_writes_for_its_structs(small_bundle, openrtb_examples):
    """Without deals or notices a bid's JSON is its ids and price followed by its creative's fields encoded once:
    byte for byte what ``encode_response`` writes for the same BidResponse (ids that need escaping, two imps, prices
    in another currency)."""
    engine = make_engine(small_bundle)
    for i, (route, body) in enumerate(distinct_requests(openrtb_examples, 12)):
        request = json.loads(body)
        request["id"] = f'q"\\{i}\u00e9\u2028</script>'
        for imp in request["imp"]:
            imp["id"] = imp["id"] + '"\t'
        if i % 4 == 1:
            request["cur"] = ["JPY"]
        outcome = engine.bid(json.dumps(request).encode(), route.removeprefix("/bid").lstrip("/") or None)
        if outcome.status == 204:
            continue
        response = msgspec.json.decode(outcome.body, type=BidResponse)
        assert response.id == request["id"] and response.cur == ("JPY" if i % 4 == 1 else "USD")
        assert {b.impid for b in response.seatbid[0].bid} <= {imp["id"] for imp in request["imp"]}
        assert encode_response(response) == outcome.body
        assert response.seatbid[0].seat == DEFAULT_SEAT
        templates = {t.crid: t for t in engine._bid_templates.values()}
        for bid in response.seatbid[0].bid:  # the creative's fields are its template's, the ids and price the bid's
            fields = msgspec.structs.replace(bid, id="", impid="", price=0.0)
            assert msgspec.json.encode(fields) == msgspec.json.encode(templates[bid.crid])
            assert bid.id == f"{request['id']}-{bid.impid}" and bid.price > 0


def test_a_request_larger_than_max_batch_is_scored_in_chunks(small_bundle, openrtb_examples, scoring):
    body = dict(distinct_requests(openrtb_examples, 1))["/bid/1"]
    small, large = make_engine(small_bundle, max_batch=4, scoring=scoring), make_engine(small_bundle, scoring=scoring)
    assert small.bid(body) == large.bid(body)
    assert small.bid(body).status == 200


async def test_requests_scored_alone_for_their_size_leave_the_rest_of_the_batch_to_bid(small_bundle, openrtb_examples,
                                                                                       scoring):
    """Each request here has more rows than max_batch: each is scored alone, and every one is answered."""
    engine = make_engine(small_bundle, max_batch=4, scoring=scoring)
    bodies = [body for _, body in distinct_requests(openrtb_examples, 5)]
    alone = [engine.bid(body) for body in bodies]
    prepared = [engine.prepare(body, None, float("inf")) for body in bodies]
    together = await asyncio.gather(*(engine.submit(p) for p in prepared))
    assert together == alone and [o.status for o in together].count(200) >= 3


class PoisonedFeaturizer:
    """Delegates to the real featurizer, but a row whose slot is 'poison' cannot be featurized."""

    def __init__(self, featurizer):
        self.featurizer = featurizer

    def transform_into(self, buffers, rows):
        records = [row[1] if isinstance(row, tuple) else row for row in rows]
        if any(record.get("slotid") == "poison" for record in records):
            raise ValueError("record 0: poisoned")
        return self.featurizer.transform_into(buffers, rows)


async def test_a_request_that_cannot_be_featurized_fails_alone(small_bundle, openrtb_examples, scoring):
    engine = make_engine(small_bundle, scoring=scoring)
    bodies = [body for _, body in distinct_requests(openrtb_examples, 6)]
    alone = [engine.bid(body) for body in bodies]
    poisoned = json.loads(bodies[2])
    poisoned["imp"][0]["tagid"] = "poison"
    bodies[2] = json.dumps(poisoned).encode()
    engine.scorer.featurizer = PoisonedFeaturizer(engine.scorer.featurizer)
    prepared = [engine.prepare(body, None, float("inf")) for body in bodies]
    together = await asyncio.gather(*(engine.submit(p) for p in prepared))
    assert together[2].status == 400 and b"poisoned" in together[2].body
    assert [o for i, o in enumerate(together) if i != 2] == [o for i, o in enumerate(alone) if i != 2]


async def test_an_expired_request_is_a_tmax_no_bid_and_the_rest_of_its_batch_bids(small_bundle, openrtb_examples):
    engine = make_engine(small_bundle)
    _, body = distinct_requests(openrtb_examples, 2)[1]
    request = json.loads(body)
    request["tmax"] = 50
    expiring = json.dumps(request).encode()
    import time

    fresh = engine.prepare(expiring, None, time.perf_counter())
    stale = engine.prepare(expiring, None, time.perf_counter() - 0.060)  # received 60 ms ago
    outcomes = await asyncio.gather(engine.submit(stale), engine.submit(fresh))
    assert [o.status for o in outcomes] == [204, 200]
    assert outcomes[0].reason == "tmax"
    # BidEngine.bid: received now unless the caller says when
    assert engine.bid(expiring).status == 200
    late = engine.bid(expiring, received=time.perf_counter() - 0.060)
    assert (late.status, late.reason) == (204, "tmax")


async def test_batcher_hands_each_item_its_own_result_or_exception():
    seen = []

    def process(items):
        seen.append(list(items))
        return [ValueError(item) if item == "bad" else item.upper() for item in items]

    batcher = Batcher(process)
    futures = [batcher.submit(x) for x in ("a", "bad", "c")]
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert seen == [["a", "bad", "c"]]
    assert results[0] == "A" and results[2] == "C" and isinstance(results[1], ValueError)
    assert await batcher.submit("d") == "D" and seen[-1] == ["d"]  # a lone item waits for no company


async def test_batcher_survives_a_crashing_batch_and_a_cancelled_waiter():
    calls = []

    def process(items):
        calls.append(len(items))
        if "boom" in items:
            raise RuntimeError("bug")
        return list(items)

    batcher = Batcher(process)
    first, second = batcher.submit("boom"), batcher.submit("x")
    results = await asyncio.gather(first, second, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    cancelled, kept = batcher.submit("y"), batcher.submit("z")
    cancelled.cancel()
    assert await kept == "z" and calls == [2, 2]


async def test_the_server_keeps_serving_after_a_crashing_batch(client, openrtb_examples):
    engine = client.server.app[STATE].engine
    route, body = distinct_requests(openrtb_examples, 2)[1]
    good = await client.post(route, data=body)
    assert good.status == 200
    expected = await good.read()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "value", lambda *a: 1 / 0)
        broken = await client.post(route, data=body)
    assert broken.status == 500 and (await broken.json())["error"] == "internal error"
    again = await client.post(route, data=body)
    assert again.status == 200 and await again.read() == expected


async def test_factorized_and_row_scoring_choose_alike_and_price_within_the_parity_tolerance(small_bundle,
                                                                                            openrtb_examples):
    factorized, rows = make_engine(small_bundle, scoring="factorized"), make_engine(small_bundle, scoring="rows")
    catalog = {c.creative_id: c for c in rows.catalog.candidates}
    compared = 0
    for route, body in distinct_requests(openrtb_examples, 24):
        exchange = route.rpartition("/")[2] if route != "/bid" else None
        a, b = factorized.bid(body, exchange), rows.bid(body, exchange)
        assert a.status == b.status
        if a.status != 200:
            continue
        bids_a = [bid for seat in json.loads(a.body)["seatbid"] for bid in seat["bid"]]
        bids_b = [bid for seat in json.loads(b.body)["seatbid"] for bid in seat["bid"]]
        assert [x["crid"] for x in bids_a] == [x["crid"] for x in bids_b]
        for x, y in zip(bids_a, bids_b):
            # |Δ pCTR| <= 1e-6 (the parity contract) bounds |Δ price| by 1e-6 × value per click × 1000
            assert abs(x["price"] - y["price"]) <= 1e-6 * catalog[x["crid"]].value_per_click * 1000 + 1e-6
            compared += 1
    assert compared >= 12


async def test_serving_without_batching_or_factorized_graphs_answers_the_same(aiohttp_client, small_bundle,
                                                                               openrtb_examples):
    requests = distinct_requests(openrtb_examples, 8)
    answers = {}
    for batching in (True, False):
        client = await aiohttp_client(create_app(Config(model=small_bundle, campaigns=DEFAULT_CAMPAIGNS,
                                                        batching=batching)))
        answers[batching] = [await (await client.post(route, data=body)).read() for route, body in requests]
    assert answers[True] == answers[False]
    client = await aiohttp_client(create_app(Config(model=small_bundle, campaigns=DEFAULT_CAMPAIGNS,
                                                    factorized=False)))
    assert client.server.app[STATE].engine.factorized is None
    served = [await (await client.post(route, data=body)).read() for route, body in requests]
    assert [len(b) > 0 for b in served] == [len(b) > 0 for b in answers[True]]


@pytest.mark.parametrize("max_batch", [256, 9, 4])  # one chunk; a chunk per request; each scored alone
async def test_a_bug_met_by_one_request_fails_that_request_only(small_bundle, openrtb_examples, max_batch):
    engine = make_engine(small_bundle, max_batch=max_batch)
    bodies = [body for _, body in distinct_requests(openrtb_examples, 5)]
    alone = [engine.bid(body) for body in bodies]
    encode = engine.encode  # the per-request stage: prices and encodes each request of a batch on its own

    def encode_or_crash(batch, k, *events):
        if batch.pendings[k].request.id == "batch-3":
            raise ZeroDivisionError("a pricing bug")
        return encode(batch, k, *events)

    engine.encode = encode_or_crash
    prepared = [engine.prepare(body, None, float("inf")) for body in bodies]
    together = await asyncio.gather(*(engine.submit(p) for p in prepared), return_exceptions=True)
    assert isinstance(together[3], ZeroDivisionError)
    assert [o for i, o in enumerate(together) if i != 3] == [o for i, o in enumerate(alone) if i != 3]


def test_thread_batcher_runs_off_the_loop_and_sends_what_came_meanwhile_as_the_next_batch():
    """The notices' store batches: one batch in flight in the batcher's thread; what is submitted while it runs
    goes as the next batch, together; a failing batch fails its own items only."""
    import threading

    from bidder.batching import ThreadBatcher

    release = threading.Event()
    batches: list[tuple[list, str]] = []

    def process(items):
        batches.append((list(items), threading.current_thread().name))
        if items[0] == "first":
            release.wait(5)
        if "bad" in items:
            raise RuntimeError("store down")
        return [f"{item}!" for item in items]

    async def main():
        batcher = ThreadBatcher(process, "test-store")
        first = batcher.submit("first")
        await asyncio.sleep(0.05)  # "first" is in flight, held by the event
        later = [batcher.submit(name) for name in ("a", "b", "c")]
        await asyncio.sleep(0.05)
        assert not any(f.done() for f in later)  # the loop went on serving meanwhile
        release.set()
        assert await first == "first!" and [await f for f in later] == ["a!", "b!", "c!"]
        bad = [batcher.submit("bad"), batcher.submit("x")]
        results = await asyncio.gather(*bad, return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)
        assert await batcher.submit("after") == "after!"  # the batcher goes on after a failure
        batcher.close()

    asyncio.run(main())
    assert [items for items, _ in batches] == [["first"], ["a", "b", "c"], ["bad", "x"], ["after"]]
    assert all(name.startswith("test-store") for _, name in batches)


async def test_an_eager_batcher_answers_in_the_turn_or_hands_the_batch_to_its_thread():
    from bidder.batching import EagerBatcher, ThreadBatcher

    attempts, threaded = [], []

    def attempt(items):
        attempts.append(list(items))
        if "boom" in items:
            raise RuntimeError("bug")
        return None if "wait" in items else [item.upper() for item in items]

    def in_thread(items):
        threaded.append(list(items))
        return [ValueError(item) if item == "bad" else item + "!" for item in items]

    batcher = EagerBatcher(attempt, ThreadBatcher(in_thread, "test-thread"))
    assert await asyncio.gather(batcher.submit("a"), batcher.submit("b")) == ["A", "B"] and threaded == []
    results = await asyncio.gather(*(batcher.submit(x) for x in ("wait", "bad", "c")), return_exceptions=True)
    assert results[0] == "wait!" and isinstance(results[1], ValueError) and results[2] == "c!"
    assert attempts[-1] == ["wait", "bad", "c"] and sum(map(len, threaded)) == 3 and batcher.deferred == 1
    crashed = await asyncio.gather(batcher.submit("boom"), batcher.submit("d"), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in crashed)  # a bug in the attempt reaches every item, none waits
    batcher.close()

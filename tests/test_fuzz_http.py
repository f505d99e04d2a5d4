"""Fuzzing the HTTP edge: random and mutated bodies only ever get 200/204/400/413, and the app lives on."""
from __future__ import annotations

import json
import random

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bidder.app import DEFAULT_CAMPAIGNS, Config, create_app
from oracle import bid_and_check, metric, raw_catalog

ALLOWED = {200, 204, 400, 413}
# edge values a plain strategy rarely draws: overflow-prone numbers, empties, control characters
extremes = st.sampled_from([1e308, -1e308, 5e-324, 2**63, -2**63 - 1, 2**64, 0, -1, "", "\x00", "\u2028", "USD",
                            "${AUCTION_PRICE}", [], {}])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30) | extremes,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def mutate(document, rng: random.Random, replacement):
    """Replace, delete or retype one node of a parsed JSON document."""
    paths = []

    def walk(node, path):
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + [k])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, path + [i])

    walk(document, [])
    path = rng.choice(paths[1:]) if len(paths) > 1 else []
    if not path:
        return replacement
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    if rng.random() < 0.3 and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = replacement
    return document


# one app for the whole module, so the last tests see the app every fuzz test has been at
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(small_bundle):
    app = create_app(Config(model=small_bundle, campaigns=DEFAULT_CAMPAIGNS, max_body=16 * 1024))
    async with TestClient(TestServer(app)) as client:
        yield client


async def _check(client, route: str, body: bytes) -> None:
    response = await client.post(route, data=body)
    assert response.status in ALLOWED, (route, body[:200], response.status, await response.text())
    if response.status in (400, 413):
        answer = await response.json()
        assert answer["error"] and answer["path"].startswith("$")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
async def test_mutated_iab_examples(client, openrtb_examples, data):
    name = data.draw(st.sampled_from(sorted(openrtb_examples)))
    document = json.loads(openrtb_examples[name])
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    for _ in range(data.draw(st.integers(1, 4))):
        document = mutate(document, rng, data.draw(json_values))
    await _check(client, data.draw(st.sampled_from(["/bid", "/bid/3", "/predict"])), json.dumps(document).encode())
    assert (await client.get("/healthz")).status == 200


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()),
       route=st.sampled_from(["/bid", "/predict"]))
async def test_random_bodies(client, body, route):
    await _check(client, route, body)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(st.dictionaries(st.sampled_from(["useragent", "IP", "slotprice", "usertag", "timestamp",
                                                          "weekday", "domain"]), json_values, max_size=5),
                        max_size=5))
async def test_random_predict_records(client, records):
    await _check(client, "/predict", json.dumps({"records": records}).encode())


async def test_worker_still_bids_after_the_fuzzing(client, openrtb_examples, small_bundle):
    text = await (await client.get("/metrics")).text()
    assert metric(text, "bidder_responses_total") >= 150, "runs after the fuzz tests, on their app"
    catalog = raw_catalog(DEFAULT_CAMPAIGNS)
    for name in ("bid-request-2.6/simple-banner.json", "bid-request-2.5/mobile.json"):
        expectation, _ = await bid_and_check(client, json.loads(openrtb_examples[name]), catalog, small_bundle)
        assert expectation.status == 200  # and the right creative at the right price


EDGE_VALUES = [1e308, -1e308, 2**63, -1, 0, "", "\x00", None, [], {}, True]


def _leaf_paths(node, path=()):
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from _leaf_paths(v, path + (k,))
    elif isinstance(node, list) and node:
        for i, v in enumerate(node):
            yield from _leaf_paths(v, path + (i,))
    else:
        yield path


async def test_every_leaf_of_every_example_set_to_each_edge_value(client, openrtb_examples):
    """Deterministic sweep, through the engine (no HTTP) to stay fast: no value anywhere raises."""
    from bidder.app import STATE

    engine = client.server.app[STATE].engine
    statuses = set()
    for name, body in openrtb_examples.items():
        for path in _leaf_paths(json.loads(body)):
            for value in EDGE_VALUES:
                document = json.loads(body)
                parent = document
                for key in path[:-1]:
                    parent = parent[key]
                parent[path[-1]] = value
                outcome = engine.bid(json.dumps(document).encode(), exchange="1")
                assert outcome.status in ALLOWED, (name, path, value, outcome)
                statuses.add(outcome.status)
    assert statuses == {200, 204, 400}

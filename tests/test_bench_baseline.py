"""The FastAPI baseline does the bidder's work: same bids through both apps in process, same features as the twin.

Skipped without the `bench` extra (fastapi, uvicorn, orjson; mmh3 comes with `dev`).
"""
from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("orjson")
pytest.importorskip("mmh3")

from bench import baseline  # noqa: E402
from bench.load import DEFAULT_BODY  # noqa: E402
from bidder import DEFAULT_BUNDLE, reference  # noqa: E402
from bidder.app import Config, create_app  # noqa: E402
from bidder.spec import load_spec  # noqa: E402

# A fixed receive time for both servers (a Wednesday, 14:00 UTC), so weekday/hour cannot differ between them.
NOW = 1_371_045_600.0


async def asgi_request(app, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP request through an ASGI app, in process."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8082)}
    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.fixture(scope="module")
def baseline_app():
    return baseline.create_app(DEFAULT_BUNDLE)


@pytest.fixture
async def bidder_client(aiohttp_client, monkeypatch):
    monkeypatch.setattr(time, "time", lambda: NOW)
    # the baseline runs model.onnx on every row: compare with the bidder doing the same (its factorized graphs
    # equal model.onnx within 1e-6, not bit for bit; tests/test_batching.py holds them to that)
    return await aiohttp_client(create_app(Config(factorized=False)))


async def both(bidder_client, baseline_app, path: str, body: bytes) -> tuple[tuple[int, bytes], tuple[int, bytes]]:
    response = await bidder_client.post(path, data=body, headers={"Content-Type": "application/json"})
    return (response.status, await response.read()), await asgi_request(baseline_app, "POST", path, body)


def same_answer(base: dict, served: dict) -> bool:
    """The same response, prices to a micro-dollar: a first-price bid is searched by the baseline over the win-price
    graph in float32 and by the bidder over the same model's terms in double (``bidder/shading.py``), so its
    rounding to micro-dollars may differ by one."""
    def split(answer: dict) -> tuple[dict, list[float]]:
        answer = json.loads(json.dumps(answer))
        prices = [bid.pop("price") for seat in answer.get("seatbid", []) for bid in seat["bid"]]
        return answer, prices

    (base, base_prices), (served, prices) = split(base), split(served)
    return base == served and len(prices) == len(base_prices) and all(
        abs(a - b) <= 1.0000001e-6 for a, b in zip(base_prices, prices))


async def test_baseline_bids_what_the_bidder_bids_on_the_simple_banner(bidder_client, baseline_app):
    request = DEFAULT_BODY.read_bytes()
    (status, body), (base_status, base_body) = await both(bidder_client, baseline_app, "/bid", request)
    assert status == base_status == 200
    bid, base_bid = json.loads(body), json.loads(base_body)
    assert same_answer(base_bid, bid), (base_bid, bid)
    assert base_bid["seatbid"][0]["bid"][0]["price"] > 0


async def test_baseline_agrees_on_every_example_and_exchange(bidder_client, baseline_app, openrtb_examples):
    answered = set()
    for name, request in openrtb_examples.items():
        if b'"pmp"' in request:  # the day-one baseline knows no deals: it bids private auctions as open market
            continue
        for path in ("/bid", "/bid/openx"):
            (status, body), (base_status, base_body) = await both(bidder_client, baseline_app, path, request)
            assert base_status == status, (name, path)
            if status == 200:
                assert same_answer(json.loads(base_body), json.loads(body)), (name, path, base_body, body)
            answered.add(status)
    assert answered == {200, 204}  # the examples include bids and no-bids (video, native)


async def test_baseline_refuses_bad_requests_and_reports_ready(baseline_app):
    assert (await asgi_request(baseline_app, "POST", "/bid", b"{not json"))[0] == 400
    assert (await asgi_request(baseline_app, "POST", "/bid", b'{"imp": [{"id": "1"}]}'))[0] == 400
    assert (await asgi_request(baseline_app, "POST", "/bid", b'{"id": "r", "imp": []}'))[0] == 400
    status, body = await asgi_request(baseline_app, "GET", "/readyz")
    assert status == 200 and json.loads(body)["ready"] is True
    assert (await asgi_request(baseline_app, "GET", "/healthz"))[0] == 200


def test_baseline_features_equal_the_twins(sample_records):
    spec = load_spec(DEFAULT_BUNDLE)
    records = [*sample_records[:256],
               {"weekday": 0, "hour": 23, "useragent": "", "IP": "2001:db8::1", "region": None, "slotprice": 0,
                "slotformat": True, "creative": 1.0, "advertiser": 2.5, "usertag": ["", "7", None]},
               {"slotprice": 10**12, "usertag": [str(i) for i in range(40)], "domain": "ünïcode.example"}]
    got = baseline.featurize(spec, records)
    expected = reference.featurize(spec, records)
    assert got.keys() == expected.keys()
    for name in expected:
        assert (got[name] == expected[name]).all(), name

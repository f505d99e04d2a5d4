"""The HTTP app in-process (aiohttp test client): OpenRTB examples, /predict, errors, metrics, reload."""
from __future__ import annotations

import asyncio
import json
import shutil

import msgspec
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bidder.app import DEFAULT_CAMPAIGNS, Config, create_app
from bidder.campaigns import load_catalog
from bidder.metrics import NO_BID_REASONS
from bidder.scorer import Scorer
from oracle import metric

NO_BANNER = {"bid-request-2.5/video.json", "bid-request-2.6/video.json", "bid-request-2.5/native-ad.json"}


@pytest.fixture
async def client(aiohttp_client, small_bundle):
    app = create_app(Config(model=small_bundle, campaigns=DEFAULT_CAMPAIGNS, max_body=64 * 1024))
    return await aiohttp_client(app)


async def test_every_iab_example_gets_a_valid_bid_or_a_counted_no_bid(client, openrtb_examples):
    below_deal_floor = 0
    for name, body in openrtb_examples.items():
        request = json.loads(body)
        response = await client.post("/bid", data=body)
        if name in NO_BANNER:
            assert response.status == 204, name
            continue
        private = any(imp.get("pmp", {}).get("private_auction") for imp in request["imp"])
        if private and response.status == 204:  # the default catalog's deal buyer valued it under the deal floor
            below_deal_floor += 1
            continue
        assert response.status == 200, (name, await response.text())
        answer = await response.json()
        assert answer["id"] == request["id"] and answer["cur"] == "USD"
        imps = {imp["id"]: imp for imp in request["imp"]}
        bids = [b for seat in answer["seatbid"] for b in seat["bid"]]
        assert bids, name
        for b in bids:
            imp = imps[b["impid"]]
            deals = {d["id"]: d for d in imp.get("pmp", {}).get("deals", [])}
            if imp.get("pmp", {}).get("private_auction"):
                assert b["dealid"] in deals, name
            floor = deals[b["dealid"]]["bidfloor"] if "dealid" in b else imp.get("bidfloor", 0)
            assert b["price"] >= floor, name
            assert b["crid"] and b["adomain"] and b["adid"]
            assert "${AUCTION_PRICE}" in b["nurl"]
            banner = imp["banner"]
            assert (b["w"], b["h"]) == (banner["w"], banner["h"])
    text = await (await client.get("/metrics")).text()
    assert metric(text, "bidder_nobids_total", reason="below_floor") == below_deal_floor
    assert metric(text, "bidder_nobids_total", reason="unsupported_format") == len(NO_BANNER)
    # 2.5 mobile.json's second imp is a 0x0 interstitial: counted per imp, the request still bids
    assert metric(text, "bidder_nobid_imps_total", reason="no_eligible_creative") == 1


async def test_exchange_route_and_blocked_advertisers(client, openrtb_examples):
    request = json.loads(openrtb_examples["bid-request-2.5/simple-banner.json"])
    first = await (await client.post("/bid/2", json=request)).json()
    winner = first["seatbid"][0]["bid"][0]["adomain"][0]
    request["badv"] = [winner]
    second = await (await client.post("/bid/2", json=request)).json()
    assert second["seatbid"][0]["bid"][0]["adomain"][0] != winner


@pytest.mark.parametrize("change,reason", [
    (lambda r: r.update(cur=["XTS"]), "currency"),  # XTS: ISO 4217 test code, no rate
    (lambda r: r["imp"][0].update(bidfloorcur="XTS"), "floor_currency"),
    (lambda r: r["imp"][0].update(bidfloor=10_000.0), "below_floor"),
    (lambda r: r["imp"][0]["banner"].update(w=1, h=1), "no_eligible_creative"),
    (lambda r: r.update(tmax=0.0000001), None),
])
async def test_no_bid_reasons_are_counted(client, openrtb_examples, change, reason):
    request = json.loads(openrtb_examples["bid-request-2.5/simple-banner.json"])
    change(request)
    response = await client.post("/bid", json=request)
    if reason is None:  # a fractional tmax is a type error, not a timeout
        assert response.status == 400
        return
    assert response.status == 204
    text = await (await client.get("/metrics")).text()
    assert metric(text, "bidder_nobids_total", reason=reason) == 1


@pytest.mark.parametrize("body,path", [
    (b"{not json", "$"),
    (b"[]", "$"),
    (b'{"imp": [{"id": "1"}]}', "$.id"),
    (b'{"id": "", "imp": [{"id": "1"}]}', "$.id"),
    (b'{"id": "r"}', "$.imp"),
    (b'{"id": "r", "imp": []}', "$.imp"),
    (b'{"id": "r", "imp": [{"banner": {"w": 300, "h": 250}}]}', "$.imp[0].id"),
    (b'{"id": "r", "imp": [{"id": "1", "banner": {"w": "300", "h": 250}}]}', "$.imp[0].banner.w"),
    (b'{"id": "r", "imp": [{"id": "1", "bidfloor": -1}]}', "$.imp[0].bidfloor"),
    (b'{"id": "r", "imp": [{"id": "1"}], "device": {"geo": {"city": 5}}}', "$.device.geo.city"),
    (b'{"id": "r\xff", "imp": [{"id": "1"}]}', "$.id"),
])
async def test_bad_requests_get_400_naming_the_path(client, body, path):
    response = await client.post("/bid", data=body)
    assert response.status == 400
    answer = await response.json()
    assert answer["path"] == path and answer["error"]


async def test_oversized_bodies_get_413(client):
    big = b'{"id": "r", "imp": [{"id": "1"}], "ext": "' + b"x" * 70_000 + b'"}'
    response = await client.post("/bid", data=big)
    answer = await response.json()
    assert response.status == 413 and answer["path"] == "$" and str(64 * 1024) in answer["error"]  # names the limit

    async def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(20):
            yield b"x" * 8192

    response = await client.post("/bid", data=chunks())
    assert response.status == 413


async def test_predict_equals_scorer(client, small_bundle, sample_records):
    records = sample_records[:50]
    response = await client.post("/predict", data=msgspec.json.encode({"records": records}))
    assert response.status == 200
    answer = await response.json()
    expected = Scorer(small_bundle).predict(records)
    np.testing.assert_array_equal(np.asarray(answer["ctr"], dtype=np.float32), expected)
    assert answer["model"] == json.loads((small_bundle / "meta.json").read_text())["model_id"]


@pytest.mark.parametrize("payload,path,kind", [
    ({"records": [{}, {"useragent": ["a"]}]}, "$.records[1].useragent", "bad_request"),
    ({"records": [{"slotprice": "cheap"}]}, "$.records[0].slotprice", "bad_request"),
    ({"records": [{}, {"timestamp": "2013130614150212"}]}, "$.records[1].timestamp", "bad_record"),  # month 13
    ({"records": {"a": 1}}, "$.records", "bad_request"),
    ({"rows": []}, "$.rows", "bad_request"),
])
async def test_predict_rejects_bad_records(client, payload, path, kind):
    response = await client.post("/predict", json=payload)
    assert response.status == 400
    answer = await response.json()
    assert answer["path"] == path and isinstance(answer["error"], str) and answer["error"]
    text = await (await client.get("/metrics")).text()
    assert metric(text, "bidder_errors_total", kind=kind) == 1
    assert metric(text, "bidder_responses_total", route="/predict", status="400") == 1


async def test_health_readiness_and_metrics_parse(client, openrtb_examples):
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200 and (await ready.json())["ready"] is True
    await client.post("/bid", data=openrtb_examples["bid-request-2.5/simple-banner.json"])
    await client.post("/bid", data=b"{")
    text = await (await client.get("/metrics")).text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {"bidder_request_seconds", "bidder_bids", "bidder_nobids", "bidder_errors", "bidder_model_info",
            "bidder_responses", "bidder_reloads"} <= set(families)
    assert metric(text, "bidder_request_seconds_count", route="/bid") == 2
    assert metric(text, "bidder_bids_total") == 1
    assert metric(text, "bidder_errors_total", kind="bad_request") == 1
    assert metric(text, "bidder_responses_total", route="/bid", status="400") == 1
    exported = {(s.name, s.labels.get("reason")) for f in families.values() for s in f.samples}
    assert all(("bidder_nobids_total", reason) in exported for reason in NO_BID_REASONS)
    model = [s for s in families["bidder_model_info"].samples]
    assert len(model) == 1 and model[0].labels["architecture"] == "deepfm" and model[0].value == 1


async def test_reload_under_load_fails_no_request(client, small_bundle, logreg_bundle, tmp_path, openrtb_examples):
    """Switching between two different models while 8 clients bid: every request is answered 200."""
    body = openrtb_examples["bid-request-2.5/simple-banner.json"]
    broken = tmp_path / "broken"
    shutil.copytree(small_bundle, broken)
    (broken / "model.onnx").write_bytes(b"not a model")
    statuses: list[int] = []
    stop = asyncio.Event()

    async def load():
        while not stop.is_set():
            response = await client.post("/bid", data=body)
            statuses.append(response.status)

    workers = [asyncio.create_task(load()) for _ in range(8)]
    await asyncio.sleep(0.05)
    ok = await client.post("/admin/reload", json={"model": str(logreg_bundle)})
    during = len(statuses)
    refused = await client.post("/admin/reload", json={"model": str(broken)})
    ok_again = await client.post("/admin/reload", json={"model": str(small_bundle)})
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*workers)
    assert (await ok.json())["model"] == json.loads((logreg_bundle / "meta.json").read_text())["model_id"]
    assert (await ok_again.json())["model"] == json.loads((small_bundle / "meta.json").read_text())["model_id"]
    assert 0 < during < len(statuses), "requests were answered before, during and after the reloads"
    assert refused.status == 422 and "old model still serving" in (await refused.json())["error"]
    assert statuses and set(statuses) == {200}, set(statuses)
    text = await (await client.get("/metrics")).text()
    assert metric(text, "bidder_reloads_total", result="ok") == 2
    assert metric(text, "bidder_reloads_total", result="refused") == 1


async def test_admin_reload_is_loopback_only(client, monkeypatch):
    from aiohttp.web_request import BaseRequest

    monkeypatch.setattr(BaseRequest, "remote", property(lambda self: "203.0.113.9"))
    assert (await client.post("/admin/reload", json={})).status == 403


async def test_absurd_floors_are_no_bids_not_errors(client, openrtb_examples):
    request = json.loads(openrtb_examples["bid-request-2.5/simple-banner.json"])
    request["imp"][0]["bidfloor"] = 1e308
    response = await client.post("/bid", json=request)
    assert response.status == 204
    text = await (await client.get("/metrics")).text()
    assert metric(text, "bidder_nobids_total", reason="below_floor") == 1


async def test_every_imp_of_a_request_is_bid_in_one_batch(client, openrtb_examples):
    request = json.loads(openrtb_examples["bid-request-2.5/simple-banner.json"])
    request["imp"] = [{"id": "a", "banner": {"w": 300, "h": 250}, "bidfloor": 0.01},
                      {"id": "b", "banner": {"format": [{"w": 728, "h": 90}, {"w": 160, "h": 600}]}},
                      {"id": "c", "video": {"mimes": ["video/mp4"]}}]
    response = await client.post("/bid", json=request)
    assert response.status == 200
    bids = {b["impid"]: b for b in (await response.json())["seatbid"][0]["bid"]}
    assert set(bids) == {"a", "b"}
    assert (bids["a"]["w"], bids["a"]["h"]) == (300, 250) and (bids["b"]["w"], bids["b"]["h"]) in {(728, 90),
                                                                                                  (160, 600)}
    text = await (await client.get("/metrics")).text()
    catalog = load_catalog(DEFAULT_CAMPAIGNS)
    rows = sum(len(catalog.for_size(w, h)) for w, h in [(300, 250), (728, 90), (160, 600)])
    assert metric(text, "bidder_scored_rows_sum") == rows and metric(text, "bidder_scored_rows_count") == 1
    assert metric(text, "bidder_nobid_imps_total", reason="unsupported_format") == 1
    assert metric(text, "bidder_bids_total") == 2


async def test_exchange_targeting_and_markup_only_creatives(aiohttp_client, small_bundle, tmp_path,
                                                           openrtb_examples):
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps({"campaigns": [{
        "id": "only-on-3", "advertiser": 1458, "value_per_click": 1.0, "targeting": {"exchanges": ["3"]},
        "creatives": [{"id": "cr", "w": 300, "h": 250, "adomain": ["a.example"], "markup": "<img src='a'>"}]}]}))
    client = await aiohttp_client(create_app(Config(model=small_bundle, campaigns=catalog)))
    body = openrtb_examples["bid-request-2.5/simple-banner.json"]
    assert (await client.post("/bid", data=body)).status == 204
    assert (await client.post("/bid/2", data=body)).status == 204
    response = await client.post("/bid/3", data=body)
    assert response.status == 200
    (bid,) = (await response.json())["seatbid"][0]["bid"]
    assert bid["adm"] == "<img src='a'>" and "nurl" not in bid and bid["crid"] == "cr"
    text = await (await client.get("/metrics")).text()
    assert metric(text, "bidder_nobids_total", reason="no_eligible_creative") == 2


async def test_predict_edge_cases(client):
    response = await client.post("/predict", json={"records": []})
    assert response.status == 200 and (await response.json())["ctr"] == []
    response = await client.post("/predict", data=b'{"records": [' + b'{},' * 30_000 + b'{}]}')
    assert response.status == 413


async def test_a_broken_catalog_is_refused_on_reload(client, tmp_path):
    broken = tmp_path / "catalog.json"
    broken.write_text('{"campaigns": [{"id": "c"}]}')
    before = (await (await client.get("/readyz")).json())["model"]
    response = await client.post("/admin/reload", json={"campaigns": str(broken)})
    assert response.status == 422 and "advertiser" in (await response.json())["error"]
    assert (await (await client.get("/readyz")).json())["model"] == before
    assert (await client.post("/admin/reload", data=b"{nope")).status == 400

"""OpenRTB → raw records, the campaign catalog and pricing, without HTTP."""
from __future__ import annotations

import calendar
import json

import pytest

from bidder.campaigns import CatalogError, load_catalog, parse_catalog
from bidder.openrtb import (USD_TO_CNY, RequestError, decode_request, imp_fields, imp_sizes, request_fields,
                            slotprice_from_usd_cpm)
from bidder.pricing import best_per_imp, bid_cpm
from bidder.server import DEFAULT_CAMPAIGNS


def test_mapping_of_a_2_5_mobile_request(openrtb_examples):
    request = decode_request(openrtb_examples["bid-request-2.5/mobile.json"])
    now = calendar.timegm((2013, 6, 6, 14, 30, 0))  # a Thursday
    shared = request_fields(request, "3", now=now)
    assert shared["weekday"] == 3 and shared["hour"] == 14
    assert shared["useragent"].startswith("Mozilla/5.0 (iPhone")
    assert shared["IP"] == "123.145.167.189"
    assert (shared["region"], shared["city"]) == ("CA", "Los Angeles")
    assert shared["domain"] == "12345"  # app.bundle
    assert shared["adexchange"] == "3" and shared["url"] is None
    first = imp_fields(shared, request.imp[0])
    assert first["slotid"] == "agltb3B1Yi1pbmNyDQsSBFNpdGUY7fD0FAw"
    assert first["slotvisibility"] == "FirstView" and first["slotformat"] == "0"
    assert first["slotprice"] == round(0.5 * USD_TO_CNY * 100)
    assert imp_sizes(request.imp[0]) == [(728, 90)] and imp_sizes(request.imp[1]) == []
    assert imp_fields(shared, request.imp[1])["slotformat"] == "1"  # interstitial


def test_mapping_of_site_user_segments_and_time_offset(openrtb_examples):
    request = decode_request(openrtb_examples["bid-request-2.5/expandable-creative.json"])
    shared = request_fields(request, None, now=calendar.timegm((2013, 6, 6, 20, 0, 0)), utc_offset_hours=8)
    assert shared["weekday"] == 4 and shared["hour"] == 4  # Friday 04:00 in UTC+8
    assert shared["domain"] == "www.foobar.com" and shared["adexchange"] is None
    body = json.loads(openrtb_examples["bid-request-2.5/expandable-creative.json"])
    expected = [s["id"] for d in body["user"]["data"] for s in d.get("segment", []) if "id" in s]
    assert shared["usertag"] == expected and expected


def test_format_list_wins_over_w_h_and_duplicates_go():
    request = decode_request(json.dumps({"id": "r", "imp": [{"id": "1", "banner": {
        "w": 300, "h": 250, "format": [{"w": 728, "h": 90}, {"w": 728, "h": 90}, {"w": 0, "h": 0}]}}]}).encode())
    assert imp_sizes(request.imp[0]) == [(728, 90)]


def test_ipv6_devices_and_unknown_fields():
    request = decode_request(b'{"id": "r", "imp": [{"id": "1", "ext": {"x": 1}}], "device": {"ipv6": "2001:db8::1"},'
                             b' "future_field": [1, 2]}')
    assert request_fields(request, None)["IP"] == "2001:db8::1"


def test_errors_carry_the_path():
    with pytest.raises(RequestError) as info:
        decode_request(b'{"id": "r", "imp": [{"id": "1", "banner": {"format": [{"w": "a"}]}}]}')
    assert info.value.path == "$.imp[0].banner.format[0].w"


def test_floor_conversion_is_explicit():
    assert slotprice_from_usd_cpm(0.0) == 0
    assert slotprice_from_usd_cpm(1.0) == round(USD_TO_CNY * 100)


def test_default_catalog_matches_the_synthetic_advertisers():
    from train.data.synthetic import ADVERTISERS

    catalog = load_catalog(DEFAULT_CAMPAIGNS)
    served = {(c.advertiser, c.creative_id, c.w, c.h) for c in catalog.candidates}
    trained = {(adv, c["id"], c["w"], c["h"]) for adv, creatives in ADVERTISERS.items() for c in creatives}
    assert served == trained
    assert len(catalog.for_size(300, 250)) == 9


def _catalog(**creative):
    base = {"id": "cr", "w": 300, "h": 250, "adomain": ["a.com"], "nurl": "https://w/${AUCTION_PRICE}"}
    return {"campaigns": [{"id": "c", "advertiser": 1, "value_per_click": 1.0, "creatives": [dict(base, **creative)]}]}


@pytest.mark.parametrize("data,message", [
    ({"campaigns": {}}, "expected an object with a 'campaigns' list"),
    (_catalog(nurl="https://w/no-macro"), r"campaigns\[0\].creatives\[0\].nurl: must carry"),
    (_catalog(w=0), r"campaigns\[0\].creatives\[0\]: w and h must be positive"),
    (_catalog(adomain=[]), r"campaigns\[0\].creatives\[0\].adomain"),
    ({"campaigns": [{"id": "c", "advertiser": 1, "value_per_click": 0, "creatives": []}]}, "value_per_click"),
    ({"campaigns": [{"id": "c", "advertiser": "x", "value_per_click": 1, "creatives": []}]}, "advertiser"),
])
def test_catalog_errors_name_the_entry(data, message):
    with pytest.raises(CatalogError, match=message):
        parse_catalog(data)


def test_catalog_targeting_and_disabled_campaigns(tmp_path):
    data = _catalog()
    data["campaigns"][0]["targeting"] = {"domains": ["news.com"], "exchanges": ["2"]}
    data["campaigns"].append({"id": "off", "advertiser": 2, "value_per_click": 1.0, "enabled": False,
                              "creatives": _catalog()["campaigns"][0]["creatives"]})
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(data))
    catalog = load_catalog(path)
    (candidate,) = catalog.candidates
    assert candidate.runs_on("news.com", "2", frozenset())
    assert not candidate.runs_on("other.com", "2", frozenset())
    assert not candidate.runs_on("news.com", "1", frozenset())
    assert not candidate.runs_on("news.com", "2", frozenset({"a.com"}))
    with pytest.raises(CatalogError, match="invalid JSON"):
        path.write_text("{")
        load_catalog(path)


def test_pricing_respects_floors_and_picks_the_best_per_imp():
    catalog = parse_catalog({"campaigns": [
        {"id": f"c{v}", "advertiser": v, "value_per_click": v, "creatives": _catalog(id=f"cr{v}")["campaigns"][0]["creatives"]}
        for v in (1, 2, 3)]})
    cands = list(catalog.candidates)
    ctr = [0.01, 0.01, 0.001, 0.01]
    best = best_per_imp([0, 0, 0, 1], [cands[0], cands[1], cands[2], cands[0]], ctr, floors=[5.0, 20.0])
    assert set(best) == {0}  # imp 1's only bid (10 CPM) is under its 20 CPM floor
    assert best[0].candidate.advertiser == 2 and best[0].price == pytest.approx(bid_cpm(0.01, 2))

"""Private marketplace deals: catalog entries, matching an imp's pmp, deal floors, and the IAB PMP examples."""
from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bidder.campaigns import CampaignDeal, CatalogError
from bidder.deals import DealOffer, deal_candidates, match_deal
from bidder.engine import BidEngine
from bidder.metrics import NO_BID_REASONS, Metrics
from bidder.openrtb import decode_request
from bidder.pricing import best_per_imp
from bidder.scorer import Scorer
from catalogs import parse_catalog

PMP_EXAMPLES = ["bid-request-2.5/pmp-with-direct-deal.json", "bid-request-2.6/pmp-with-direct-deal.json"]


def catalog_data(*campaigns: dict) -> dict:
    return {"campaigns": [
        {"id": c.get("id", f"c{i}"), "advertiser": 1458 + i, "value_per_click": c.get("value", 1000.0),
         **({"deals": c["deals"]} if "deals" in c else {}),
         "creatives": [{"id": f"cr{i}", "w": 300, "h": 250, "adomain": [c.get("adomain", f"brand{i}.example")],
                        "nurl": "https://win.example/?p=${AUCTION_PRICE}"}]}
        for i, c in enumerate(campaigns)]}


def imp_with(pmp: dict, bidfloor: float = 0.03):
    body = {"id": "r", "imp": [{"id": "1", "bidfloor": bidfloor, "banner": {"w": 300, "h": 250}, "pmp": pmp}]}
    return decode_request(json.dumps(body).encode()).imp[0]


def metric(metrics: Metrics, name: str, **labels) -> float:
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


# --- the catalog ----------------------------------------------------------------------------------------

def test_campaigns_declare_deals_with_an_optional_seat():
    catalog = parse_catalog(catalog_data({"deals": [{"dealid": "A", "seat": "Agency1"}, {"dealid": "B"}]}, {}))
    first, second = catalog.candidates
    assert first.deals == (CampaignDeal("A", "Agency1"), CampaignDeal("B", None))
    assert second.deals == ()


@pytest.mark.parametrize("deals,message", [
    ({}, "deals: expected a list"),
    ([{"dealid": ""}], "deals[0].dealid"),
    ([{"deal": "A"}], "unknown keys ['deal']"),
    ([{"dealid": "A"}, {"dealid": "A"}], "deals[1].dealid: duplicate deal 'A'"),
    ([{"dealid": "A", "seat": 7}], "deals[0].seat"),
])
def test_bad_deal_entries_are_refused(deals, message):
    with pytest.raises(CatalogError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_catalog(catalog_data({"deals": deals}))


# --- matching -------------------------------------------------------------------------------------------

def candidate(deals: list[dict], adomain: str = "brand0.example"):
    return parse_catalog(catalog_data({"deals": deals, "adomain": adomain})).candidates[0]


def test_a_deal_matches_by_id_and_seat():
    imp = imp_with({"private_auction": 1, "deals": [{"id": "D1", "bidfloor": 2.5, "wseat": ["Agency1"]}]})
    assert match_deal(candidate([{"dealid": "D1", "seat": "Agency1"}]), imp) == DealOffer("D1", "Agency1", 2.5,
                                                                                          False, True)
    assert match_deal(candidate([{"dealid": "D1", "seat": "Agency3"}]), imp) is None  # seat not allowed
    assert match_deal(candidate([{"dealid": "D1"}]), imp) is None   # the bidder's own seat is not in wseat
    assert match_deal(candidate([{"dealid": "D2", "seat": "Agency1"}]), imp) is None  # another deal
    assert match_deal(candidate([]), imp) is None


def test_deal_without_seat_list_takes_the_bidders_seat_and_the_imp_floor():
    imp = imp_with({"deals": [{"id": "D1"}]}, bidfloor=1.25)
    assert match_deal(candidate([{"dealid": "D1"}]), imp) == DealOffer("D1", "bidder", 1.25, False, False)


def test_advertiser_domains_currency_lowest_floor_and_fixed_price():
    deals = [{"id": "EUR", "bidfloor": 0.1, "bidfloorcur": "EUR"},
             {"id": "other-brand", "bidfloor": 0.2, "wadomain": ["other.example"]},
             {"id": "high", "bidfloor": 4.0},
             {"id": "fixed", "bidfloor": 3.0, "at": 3}]
    imp = imp_with({"private_auction": 1, "deals": deals})
    owned = candidate([{"dealid": d["id"]} for d in deals])
    assert match_deal(owned, imp) == DealOffer("fixed", "bidder", 3.0, True, True)


def test_private_auctions_keep_only_candidates_with_a_deal():
    catalog = parse_catalog(catalog_data({}, {"deals": [{"dealid": "D1"}]}, {}))
    private = imp_with({"private_auction": 1, "deals": [{"id": "D1", "bidfloor": 2}]})
    kept, offers = deal_candidates(catalog.candidates, private, first_row=10)
    assert [c.campaign_id for c in kept] == ["c1"] and offers == {10: DealOffer("D1", "bidder", 2.0, False, True)}
    open_ = imp_with({"private_auction": 0, "deals": [{"id": "D1", "bidfloor": 2}]})
    kept, offers = deal_candidates(catalog.candidates, open_, first_row=0)
    assert len(kept) == 3 and offers == {1: DealOffer("D1", "bidder", 2.0, False, False)}


# --- pricing --------------------------------------------------------------------------------------------

def test_deal_floors_in_pricing():
    cands = parse_catalog(catalog_data({"value": 1.0}, {"value": 1.0})).candidates
    private = DealOffer("D", "bidder", 2.5, False, True)
    # value 2.0 under the deal's 2.5: a private deal cannot bid, an open one falls back to the imp floor
    assert best_per_imp([0], cands[:1], [0.002], [0.03], {0: private}) == {}
    fallback = best_per_imp([0], cands[:1], [0.002], [0.03], {0: DealOffer("D", "bidder", 2.5, False, False)})
    assert fallback[0].deal is None and fallback[0].price == 2.0
    won = best_per_imp([0], cands[:1], [0.003], [0.03], {0: private})
    assert won[0].deal == private and won[0].price == 3.0
    fixed = best_per_imp([0], cands[:1], [0.003], [0.03], {0: DealOffer("D", "bidder", 2.5, True, True)})
    assert fixed[0].price == 2.5
    # the best row decides; a later open-market winner does not keep the earlier row's deal
    mixed = best_per_imp([0, 0], cands, [0.003, 0.004], [0.03], {0: private})
    assert mixed[0].candidate is cands[1] and mixed[0].deal is None


# --- the IAB PMP examples through the engine -----------------------------------------------------------

def engine_for(small_bundle, data: dict) -> BidEngine:
    return BidEngine(Scorer(small_bundle, max_batch=16), parse_catalog(data), Metrics())


@pytest.mark.parametrize("name", PMP_EXAMPLES)
def test_private_auction_bids_only_through_a_matching_deal(small_bundle, openrtb_examples, name):
    body = openrtb_examples[name]
    engine = engine_for(small_bundle, catalog_data({}, {"id": "buyer", "deals": [{"dealid": "AB-Agency1-0001",
                                                                                   "seat": "Agency1"}]}))
    outcome = engine.bid(body)
    assert outcome.status == 200, outcome
    (seat,) = json.loads(outcome.body)["seatbid"]
    (bid,) = seat["bid"]
    assert seat["seat"] == "Agency1" and bid["dealid"] == "AB-Agency1-0001" and bid["cid"] == "buyer"
    assert bid["price"] >= 2.5  # the deal's floor, not the imp's 0.03


@pytest.mark.parametrize("name", PMP_EXAMPLES)
@pytest.mark.parametrize("deals", [None, [{"dealid": "AB-Agency1-0001", "seat": "Agency3"}],
                                   [{"dealid": "AB-Agency1-0001"}], [{"dealid": "ZZ-0001", "seat": "Agency1"}]])
def test_private_auction_without_a_matching_deal_is_a_counted_no_bid(small_bundle, openrtb_examples, name, deals):
    engine = engine_for(small_bundle, catalog_data({}, {} if deals is None else {"deals": deals}))
    outcome = engine.bid(openrtb_examples[name])
    assert (outcome.status, outcome.reason) == (204, "no_matching_deal")
    assert metric(engine.metrics, "bidder_nobids_total", reason="no_matching_deal") == 1
    assert metric(engine.metrics, "bidder_nobid_imps_total", reason="no_matching_deal") == 1
    assert "no_matching_deal" in NO_BID_REASONS


@pytest.mark.parametrize("name", PMP_EXAMPLES)
def test_deal_floor_is_respected(small_bundle, openrtb_examples, name):
    engine = engine_for(small_bundle, catalog_data({"value": 0.001, "deals": [{"dealid": "XY-Agency2-0001",
                                                                               "seat": "Agency2"}]}))
    outcome = engine.bid(openrtb_examples[name])
    assert (outcome.status, outcome.reason) == (204, "below_floor")


@pytest.mark.parametrize("name", PMP_EXAMPLES)
def test_open_auction_with_deals_bids_either_way(small_bundle, openrtb_examples, name):
    request = json.loads(openrtb_examples[name])
    request["imp"][0]["pmp"]["private_auction"] = 0
    body = json.dumps(request).encode()
    open_market = json.loads(engine_for(small_bundle, catalog_data({})).bid(body).body)
    (bid,) = open_market["seatbid"][0]["bid"]
    assert "dealid" not in bid and open_market["seatbid"][0]["seat"] == "bidder"
    through_deal = json.loads(engine_for(small_bundle, catalog_data(
        {"deals": [{"dealid": "XY-Agency2-0001", "seat": "Agency2"}]})).bid(body).body)
    (seat,) = through_deal["seatbid"]
    assert seat["seat"] == "Agency2" and seat["bid"][0]["dealid"] == "XY-Agency2-0001"
    assert seat["bid"][0]["price"] >= 2.0


def test_deal_and_open_market_bids_of_one_request_sit_in_their_seats(small_bundle, openrtb_examples):
    request = json.loads(openrtb_examples["bid-request-2.5/pmp-with-direct-deal.json"])
    request["imp"].append({"id": "2", "banner": {"w": 300, "h": 250}})
    engine = engine_for(small_bundle, catalog_data({"deals": [{"dealid": "AB-Agency1-0001", "seat": "Agency1"}]}))
    answer = json.loads(engine.bid(json.dumps(request).encode()).body)
    seats = {seat["seat"]: [(b["impid"], b.get("dealid")) for b in seat["bid"]] for seat in answer["seatbid"]}
    assert seats == {"Agency1": [("1", "AB-Agency1-0001")], "bidder": [("2", None)]}

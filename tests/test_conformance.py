"""OpenRTB conformance (docs/conformance.md): blocking rules, creative metadata, privacy signals, currencies.

Every blocking rule is pinned end to end over HTTP: a request that must get no bid (counted under its reason) and
the same request without the rule, which gets one. Answers are checked against ``tests/oracle.py`` (which restates
the rules) and every bid against the OpenRTB 2.6 bid rules (``tests/response_rules.py``). The Prebid Server style
requests of ``tests/data/`` run through the same checks.
"""
from __future__ import annotations

import base64
import copy
import json
import random
from pathlib import Path

import oracle
import pytest
from oracle import bid_and_check, metric, post_bid, raw_catalog
from response_rules import violations

from bidder import DEFAULT_BUNDLE
from bidder.app import DEFAULT_CAMPAIGNS, Config, create_app
from bidder.campaigns import CatalogError, decode_catalog, load_catalog
from bidder.conformance import IAB_CONTENT_1, content_categories
from bidder.currencies import CurrencyError, load_currencies, parse_currencies
from bidder.engine import BidEngine
from bidder.events import EventLog, read_lines
from bidder.metrics import Metrics
from bidder.openrtb import decode_request
from bidder.privacy import PrivacyMemory, personal_data, tcf_purposes, withhold
from bidder.scorer import Scorer

DATA = Path(__file__).parent / "data"


def tcf_string(purposes: set[int]) -> str:
    """A TCF v2 core string consenting to ``purposes`` (no vendors), written field by field per the spec."""
    bits = "000010" + format(16726464000, "036b") * 2 + format(7, "012b") + format(1, "012b") + format(1, "06b")
    bits += format(4, "06b") + format(13, "06b") + format(150, "012b") + format(4, "06b") + "00" + "0" * 12
    bits += "".join("1" if p in purposes else "0" for p in range(1, 25)) + "0" * 24 + "0" + "000011000100"
    bits += "0" * 17 * 2 + "0" * 12
    bits += "0" * (-len(bits) % 8)
    return base64.urlsafe_b64encode(int(bits, 2).to_bytes(len(bits) // 8, "big")).decode().rstrip("=")


# -- a catalog whose one 300x250 creative carries every kind of metadata ------------------------------------
RICH = {"id": "rich", "w": 300, "h": 250, "adomain": ["rich.example"], "nurl": "https://w.example/?p=${AUCTION_PRICE}",
        "cat": ["IAB22-2"], "attr": [4], "btype": 3, "mimes": ["text/javascript"], "api": [5],
        "bundle": "com.example.rich"}


def rich_catalog(requires_consent: bool = False) -> dict:
    return {"campaigns": [{"id": "c-rich", "advertiser": 1458, "value_per_click": 2.0,
                           "requires_consent": requires_consent, "deals": [{"dealid": "D-1", "seat": "agency-1"}],
                           "creatives": [copy.deepcopy(RICH)]}]}


@pytest.fixture
async def rich(aiohttp_client, small_bundle, tmp_path):
    path = tmp_path / "rich.json"
    path.write_text(json.dumps(rich_catalog(requires_consent=True)))
    return await aiohttp_client(create_app(Config(model=small_bundle, campaigns=path))), raw_catalog(path)


BASE = {"id": "r", "imp": [{"id": "1", "banner": {"w": 300, "h": 250, "api": [3, 5], "mimes": ["text/javascript"]}}],
        "site": {"domain": "news.example", "page": "https://news.example/a"},
        "device": {"ua": "Mozilla/5.0", "ip": "81.2.69.160", "geo": {"region": "BE", "city": "Berlin"}},
        "user": {"id": "u-1", "data": [{"segment": [{"id": "10006"}]}]}}

# (rule, the change that blocks the rich creative, the counted reason)
RULES = [
    ("bseat", {"bseat": ["bidder"]}, "blocked_seat"),
    ("wseat", {"wseat": ["another-seat"]}, "blocked_seat"),
    ("bcat subcategory", {"bcat": ["IAB22-2"]}, "blocked_category"),
    ("bcat tier 1", {"bcat": ["IAB22"]}, "blocked_category"),
    ("bcat other taxonomy", {"bcat": ["432"], "cattax": 6}, "unknown_cattax"),
    ("bapp", {"bapp": ["com.example.rich"]}, "blocked_app"),
    ("coppa", {"regs": {"coppa": 1}}, "requires_consent"),
    ("gdpr without consent", {"regs": {"gdpr": 1}, "user": {"consent": tcf_string({1, 2})}}, "requires_consent"),
    ("battr", {"imp": [{"id": "1", "banner": {"w": 300, "h": 250, "api": [5], "battr": [4]}}]}, "blocked_attribute"),
    ("btype", {"imp": [{"id": "1", "banner": {"w": 300, "h": 250, "api": [5], "btype": [3]}}]}, "blocked_banner_type"),
    ("mimes", {"imp": [{"id": "1", "banner": {"w": 300, "h": 250, "api": [5], "mimes": ["image/png"]}}]},
     "unsupported_mime"),
    ("api", {"imp": [{"id": "1", "banner": {"w": 300, "h": 250, "api": [3]}}]}, "unsupported_api"),
    ("no api", {"imp": [{"id": "1", "banner": {"w": 300, "h": 250}}]}, "unsupported_api"),
]


@pytest.mark.parametrize("rule,change,reason", RULES, ids=[r[0] for r in RULES])
async def test_each_blocking_rule_refuses_the_bid_and_counts_it(rich, small_bundle, rule, change, reason):
    client, catalog = rich
    expectation, answer = await bid_and_check(client, copy.deepcopy(BASE), catalog, small_bundle)
    assert expectation.status == 200 and answer["seatbid"][0]["bid"][0]["crid"] == "rich"  # without the rule: a bid
    before = await (await client.get("/metrics")).text()
    expectation, _ = await bid_and_check(client, {**copy.deepcopy(BASE), **copy.deepcopy(change)}, catalog,
                                         small_bundle)
    assert expectation.status == 204
    text = await (await client.get("/metrics")).text()
    assert metric(text, "bidder_nobids_total", reason=reason) - metric(before, "bidder_nobids_total",
                                                                       reason=reason) == 1, reason


async def test_the_bid_carries_the_creatives_metadata(rich, small_bundle):
    client, catalog = rich
    _, answer = await bid_and_check(client, {**copy.deepcopy(BASE), "imp": [
        {"id": "1", "exp": 300, "banner": {"w": 300, "h": 250, "api": [5]}}]}, catalog, small_bundle)
    bid = answer["seatbid"][0]["bid"][0]
    assert (bid["cat"], bid["cattax"], bid["attr"], bid["mtype"]) == (["IAB22-2"], 1, [4], 1)
    assert "exp" not in bid  # the notice window: announced with notices on (tests/test_notices.py)
    assert bid["adomain"] == ["rich.example"] and bid["crid"] == "rich" and (bid["w"], bid["h"]) == (300, 250)


async def test_a_blocked_own_seat_still_bids_through_an_allowed_deal_seat(rich, small_bundle):
    client, _ = rich
    request = {**copy.deepcopy(BASE), "wseat": ["agency-1"]}
    request["imp"][0]["pmp"] = {"private_auction": 0, "deals": [{"id": "D-1", "bidfloor": 0.0001}]}
    status, answer, *_ = await post_bid(client, request)
    assert status == 200 and answer["seatbid"][0]["seat"] == "agency-1"
    assert answer["seatbid"][0]["bid"][0]["dealid"] == "D-1"
    request["wseat"] = ["another-seat"]  # the deal's seat blocked too: nothing may bid
    assert (await post_bid(client, request))[0] == 204


def test_a_private_deal_leaves_no_deal_terms_to_the_next_batch():
    """The engine reuses its row arrays from batch to batch: a row that held a private deal's terms holds none
    for the next request."""
    def engine() -> BidEngine:
        return BidEngine(Scorer(DEFAULT_BUNDLE), decode_catalog(json.dumps(rich_catalog()), "rich.json"), Metrics(),
                         now=1.7e9)

    plain = json.dumps(BASE).encode()
    private = copy.deepcopy(BASE)
    private["imp"][0]["pmp"] = {"private_auction": 1, "deals": [{"id": "D-1", "bidfloor": 0.0001}]}
    reused = engine()
    assert reused.bid(json.dumps(private).encode()).status == 200
    assert reused.bid(plain) == engine().bid(plain) and reused.bid(plain).status == 200


async def test_a_deal_floored_in_another_currency_is_bought_at_its_converted_floor(rich, small_bundle):
    client, _ = rich
    request = copy.deepcopy(BASE)
    request["imp"][0]["pmp"] = {"private_auction": 1,
                                "deals": [{"id": "D-1", "bidfloor": 0.0095, "bidfloorcur": "EUR"}]}
    status, answer, *_ = await post_bid(client, request)  # the validator checks the price against 0.01 USD
    assert status == 200 and answer["seatbid"][0]["bid"][0]["dealid"] == "D-1"
    assert answer["seatbid"][0]["bid"][0]["price"] >= 0.0095 / 0.95
    request["imp"][0]["pmp"]["deals"][0]["bidfloorcur"] = "XTS"  # no rate: the deal cannot be bought
    before = await (await client.get("/metrics")).text()
    assert (await post_bid(client, request))[0] == 204
    text = await (await client.get("/metrics")).text()
    assert metric(text, "bidder_nobids_total", reason="no_matching_deal") - metric(
        before, "bidder_nobids_total", reason="no_matching_deal") == 1


async def test_without_consent_personal_data_is_blanked_before_scoring(aiohttp_client, small_bundle):
    """The oracle scores the blanked record: the served price matches only if IP, city and segments were blanked."""
    client = await aiohttp_client(create_app(Config(model=small_bundle, campaigns=DEFAULT_CAMPAIGNS)))
    catalog = raw_catalog(DEFAULT_CAMPAIGNS)
    request = copy.deepcopy(BASE)
    request["imp"][0]["banner"] = {"w": 728, "h": 90}
    request["user"]["data"] = [{"segment": [{"id": s} for s in oracle.SEGMENTS]}]
    with_data, _ = await bid_and_check(client, request, catalog, small_bundle)
    for regs in ({"coppa": 1}, {"gdpr": 1}, {"us_privacy": "1YYN"}, {"gpp": "DBABTA~1YYN", "gpp_sid": [7]}):
        blanked, _ = await bid_and_check(client, {**request, "regs": regs}, catalog, small_bundle)
        assert blanked.imps[0].values != with_data.imps[0].values, regs  # the features did change
    text = await (await client.get("/metrics")).text()
    for case in ("coppa", "gdpr_bad_consent", "us_privacy_opt_out", "gpp_section"):
        assert metric(text, "bidder_privacy_total", case=case) == 1, case


def test_the_event_log_keeps_no_user_key_nor_personal_fields_without_consent(tmp_path):
    events = EventLog(tmp_path).start()
    engine = BidEngine(Scorer(DEFAULT_BUNDLE), load_catalog(DEFAULT_CAMPAIGNS), Metrics(), now=1.7e9, events=events)
    request = copy.deepcopy(BASE)
    request["imp"][0]["banner"] = {"w": 728, "h": 90}
    for n, regs in enumerate((None, {"coppa": 1})):
        body = {**request, "id": f"r{n}"} if regs is None else {**request, "id": f"r{n}", "regs": regs}
        pending = engine.prepare(json.dumps(body).encode(), None, 0.0)
        assert pending.personal_ok is (regs is None) and pending.imp_personal_ok(0) is (regs is None)
        assert engine.bid(json.dumps(body).encode()).status == 200
    events.close()
    logged = {}
    for path in tmp_path.glob("events-*.jsonl.zst"):
        logged.update((r["bid_id"], r) for r in map(json.loads, read_lines(path)))
    assert logged["r0-1"]["user"] == "u-1" and logged["r0-1"]["record"]["IP"] == "81.2.69.160"
    blanked = logged["r1-1"]
    assert blanked["user"] is None and blanked["record"]["usertag"] == []
    assert blanked["record"]["IP"] is None and blanked["record"]["city"] is None
    assert blanked["record"]["region"] == "BE"  # coarse: kept


def test_privacy_signals_decide_per_the_documented_policy():
    def decide(**parts):
        return personal_data(decode_request(json.dumps({"id": "r", "imp": [{"id": "1"}], **parts}).encode()))

    granted = tcf_string({1, 2, 3, 4, 7})
    assert decide() == (True, None)
    assert decide(regs={"coppa": 1}) == (False, "coppa")
    assert decide(regs={"gdpr": 1}, user={"consent": granted}) == (True, "gdpr_consent")
    assert decide(regs={"ext": {"gdpr": 1}}, user={"ext": {"consent": granted}}) == (True, "gdpr_consent")
    assert decide(regs={"gdpr": 1}, user={"consent": tcf_string({1, 3})}) == (False, "gdpr_no_consent")
    assert decide(regs={"gdpr": 1}, user={"consent": "not a tcf string!"}) == (False, "gdpr_bad_consent")
    assert decide(regs={"gdpr": 0}, user={"consent": "anything"}) == (True, None)
    assert decide(regs={"us_privacy": "1YNN"}) == (True, "us_privacy_ok")
    assert decide(regs={"us_privacy": "1---"}) == (True, "us_privacy_ok")
    assert decide(regs={"ext": {"us_privacy": "1YYY"}}) == (False, "us_privacy_opt_out")
    assert decide(regs={"us_privacy": "garbage"}) == (False, "us_privacy_opt_out")
    assert decide(regs={"gpp_sid": [2]}, user={"consent": granted}) == (True, "gdpr_consent")
    assert decide(regs={"gpp_sid": [7, 8]}) == (False, "gpp_section")
    assert decide(regs={"gpp_sid": [1]}) == (False, "gpp_section")  # TCF v1, deprecated: not read either
    assert decide(regs={"gpp_sid": [0, -1]}) == (True, None)       # no section has such a number
    assert decide(regs={"gpp_sid": [True, "7"]}) == (True, None)   # not section numbers
    assert decide(regs={"coppa": "1"}) == (False, "coppa")          # "1" as a string says the same
    assert decide(regs={"coppa": True, "gdpr": True}) == (True, None)  # a boolean is no OpenRTB flag
    assert decide(regs={"us_privacy": "1YXN"}) == (False, "us_privacy_opt_out")  # neither N nor -: unreadable


def test_remembered_privacy_decisions_are_the_policy_s():
    """The engine remembers decisions by regs and consent string: what it answers, asked once or again, is what
    personal_data decides; a boolean flag (True == 1 as a key) is never taken for 1, whichever comes first."""
    memory = PrivacyMemory(size=4)
    granted = tcf_string({1, 3, 4})
    cases = [({"gdpr": 1}, {}), ({"gdpr": True}, {}), ({"gdpr": 1}, {"consent": granted}),
             ({"gdpr": True}, {"consent": granted}), ({"coppa": 1}, {}), ({"coppa": True}, {}),
             ({"ext": {"gdpr": 1}}, {}), ({"ext": {"gdpr": True}}, {}), ({"gpp_sid": [7]}, {}),
             ({"gpp_sid": [2]}, {"consent": granted}), ({"us_privacy": "1YYN"}, {}), ({"us_privacy": "1YNN"}, {}),
             ({"gdpr": 1}, {"consent": {"an": "object"}}),
             ({"coppa": True, "ext": {"gdpr": 1}}, {"consent": granted})]  # a boolean flag, GDPR by regs.ext
    for regs, user in cases + cases[::-1] + cases:  # more than it holds: it starts again and still agrees
        request = decode_request(json.dumps({"id": "r", "imp": [{"id": "1"}], "regs": regs, "user": user}).encode())
        assert memory.personal_data(request) == personal_data(request), (regs, user)
    assert memory.personal_data(decode_request(b'{"id": "r", "imp": [{"id": "1"}], "regs": {"gdpr": true}}')) \
        == (True, None)
    assert memory.personal_data(decode_request(b'{"id": "r", "imp": [{"id": "1"}]}')) == (True, None)
    fresh = PrivacyMemory(size=4)
    for k in range(5):
        fresh.personal_data(decode_request(json.dumps({"id": "r", "imp": [{"id": "1"}],
                                                       "regs": {"us_privacy": f"1YN{k}"}}).encode()))
        assert len(fresh._decided) <= 4


def test_withholding_blanks_the_personal_fields_and_keeps_the_rest():
    shared = {"IP": "81.2.69.*", "city": "Berlin", "usertag": ["10006"], "region": "BE", "domain": "news.example"}
    withhold(shared)
    assert shared == {"IP": None, "city": None, "usertag": [], "region": "BE", "domain": "news.example"}
    assert isinstance(shared["usertag"], list)  # a fresh list per record, as the decoder's are


def test_tcf_purposes_are_read_from_the_core_string():
    for purposes in ({1}, {1, 3, 4}, set(range(1, 11)), set(range(1, 25)), set()):
        assert tcf_purposes(tcf_string(purposes)) == purposes
        assert tcf_purposes(tcf_string(purposes) + ".YAAAAAAAAAAA") == purposes  # segments after the core
    assert tcf_purposes("BOEFEAyOEFEAyAHABDENAI4AAAB9vABAASA") is None  # a TCF v1 string
    assert tcf_purposes("") is None and tcf_purposes(12) is None and tcf_purposes("Zm9v") is None


# -- currencies ------------------------------------------------------------------------------------------------
async def test_a_currency_with_a_rate_is_bid_in_and_floors_are_converted(aiohttp_client, small_bundle):
    client = await aiohttp_client(create_app(Config(model=small_bundle, campaigns=DEFAULT_CAMPAIGNS)))
    catalog = raw_catalog(DEFAULT_CAMPAIGNS)
    request = json.loads((DATA / "prebid-banner-flexible-eur.json").read_text())
    expectation, answer = await bid_and_check(client, request, catalog, small_bundle)
    assert answer["cur"] == "EUR" and expectation.currency == "EUR"
    assert (answer["seatbid"][0]["bid"][0]["w"], answer["seatbid"][0]["bid"][0]["h"]) in {(300, 250), (336, 280)}
    request["cur"] = ["XTS"]  # ISO 4217's code for tests: no rate
    assert (await post_bid(client, request))[0] == 204
    request["cur"], request["imp"][0]["bidfloorcur"] = ["USD"], "XTS"
    assert (await post_bid(client, request))[0] == 204


def test_a_usd_floor_is_converted_into_the_response_currency_with_the_price():
    engine = BidEngine(Scorer(DEFAULT_BUNDLE), load_catalog(DEFAULT_CAMPAIGNS), Metrics(), now=1.7e9)
    request = {**copy.deepcopy(BASE), "at": 2}
    request["imp"][0]["banner"] = {"w": 728, "h": 90}

    def price(**changes) -> tuple[str, float]:
        answer = json.loads(engine.bid(json.dumps({**request, **changes}).encode()).body)
        return answer["cur"], answer["seatbid"][0]["bid"][0]["price"]

    request["imp"][0]["bidfloor"] = 1.0
    _, first = price()  # second price: the value rounded to micro-dollars
    floor = request["imp"][0]["bidfloor"] = round(first * 0.99, 6)
    cur, value = price()  # the floor is one of the model's features: the value at this floor
    eur = engine.catalog.currencies.rate("EUR")
    assert cur == "USD" and value * eur < floor <= value  # a USD floor over the value's worth in EUR
    cur, in_eur = price(cur=["EUR"])  # the floor converted too: it does not lift the price
    assert cur == "EUR" and in_eur == pytest.approx(value * eur, abs=1e-6) and in_eur >= floor * eur
    jpy = engine.catalog.currencies.rate("JPY")
    request["imp"][0].update(bidfloor=round(floor * jpy, 6), bidfloorcur="JPY")  # the same floor, in yen
    assert price() == ("USD", value)


async def test_flexible_sizes_choose_among_the_catalogs_sizes(aiohttp_client, small_bundle):
    client = await aiohttp_client(create_app(Config(model=small_bundle, campaigns=DEFAULT_CAMPAIGNS)))
    catalog = raw_catalog(DEFAULT_CAMPAIGNS)
    request = copy.deepcopy(BASE)
    for banner, sizes in (({"wmin": 700, "wmax": 800, "hmin": 80, "hmax": 100}, {(728, 90)}),
                          ({"format": [{"wratio": 1, "hratio": 1}]}, {(250, 250), (200, 200)}),
                          ({"format": [{"wratio": 1, "hratio": 1, "wmin": 220}]}, {(250, 250)}),
                          ({"format": [{"wratio": 3, "hratio": 1}]}, set())):
        request["imp"][0]["banner"] = banner
        expectation, answer = await bid_and_check(client, request, catalog, small_bundle)
        if sizes:
            bid = answer["seatbid"][0]["bid"][0]
            assert (bid["w"], bid["h"]) in sizes, banner
        else:
            assert expectation.status == 204 and expectation.imp_reasons == ["no_eligible_creative"]


def test_the_currency_table_is_checked_and_travels_with_the_catalog(tmp_path):
    table = load_currencies()
    assert table.rate("USD") == 1.0 and table.cny_per_usd == 7.2 and table.rate("XTS") is None
    assert parse_currencies({"date": "2026-12-01", "base": "EUR", "rates": {"EUR": 1.0, "USD": 1.25, "CNY": 9.0}}
                            ).rate("CNY") == pytest.approx(7.2)
    for bad, message in (({"date": "yesterday", "base": "USD", "rates": {"USD": 1, "CNY": 7}}, "date"),
                         ({"date": "2026-12-01", "base": "USD", "rates": {"USD": 1}}, "rates.CNY"),
                         ({"date": "2026-12-01", "base": "USD", "rates": {"USD": 1, "CNY": -7}}, "rates.CNY"),
                         ({"date": "2026-12-01", "base": "USD", "rates": {"usd": 1}}, "rates.usd"),
                         ({"rates": {}}, "expected exactly")):
        with pytest.raises(CurrencyError, match=message):
            parse_currencies(bad)
    (tmp_path / "campaigns.json").write_text(json.dumps(rich_catalog()))
    (tmp_path / "currencies.json").write_text(json.dumps({"date": "2026-12-07", "base": "USD",
                                                          "rates": {"USD": 1.0, "CNY": 7.1, "EUR": 0.9}}))
    catalog = load_catalog(tmp_path / "campaigns.json")
    assert catalog.currencies.date == "2026-12-07" and catalog.currencies.rate("GBP") is None
    (tmp_path / "currencies.json").write_text("{")
    with pytest.raises(CatalogError, match="currencies.json: cannot read"):
        load_catalog(tmp_path / "campaigns.json")


def test_a_currency_tables_errors_name_its_file(tmp_path):
    with pytest.raises(CurrencyError, match=r"^currencies: date: expected YYYY-MM-DD"):
        parse_currencies({"date": "yesterday", "base": "USD", "rates": {"USD": 1, "CNY": 7}})
    for rates in ([["USD", 1]], {}):
        with pytest.raises(CurrencyError, match=r"^currencies: rates: expected an object of currency codes"):
            parse_currencies({"date": "2026-12-01", "base": "USD", "rates": rates})
    path = tmp_path / "currencies.json"
    path.write_text(json.dumps({"date": "2026-12-01", "base": "USD", "rates": {"USD": 1}}))
    with pytest.raises(CurrencyError) as raised:
        load_currencies(path)
    assert str(raised.value).startswith(f"{path}: rates.CNY: missing")
    with pytest.raises(CurrencyError) as raised:
        load_currencies(tmp_path / "absent.json")
    assert str(raised.value) == f"{tmp_path / 'absent.json'}: no such file"


def test_a_currency_table_converts_from_any_base_and_refuses_bad_rates(tmp_path):
    table = parse_currencies({"date": "2026-12-01", "base": "GBP", "rates": {"GBP": 2.0, "USD": 2.5, "CNY": 18.0}})
    assert table.rate("USD") == 1.0 and table.cny_per_usd == pytest.approx(7.2) and table.rate("GBP") == 0.8
    for bad in ("7", True, 0, -1.0, float("inf"), float("nan")):
        with pytest.raises(CurrencyError, match=r"^currencies: rates.EUR: expected a positive number"):
            parse_currencies({"date": "2026-12-01", "base": "USD", "rates": {"USD": 1, "CNY": 7, "EUR": bad}})
    with pytest.raises(CurrencyError, match=r"^currencies: base: 'EUR' has no rate in rates"):
        parse_currencies({"date": "2026-12-01", "base": "EUR", "rates": {"USD": 1, "CNY": 7}})
    path = tmp_path / "currencies.json"
    path.write_text(json.dumps({"date": "2026-12-01", "base": "USD", "rates": {"USD": 1, "CNY": 7}}))
    assert load_currencies(path).source == str(path) and parse_currencies(json.loads(path.read_text())).source == \
        "currencies"


async def test_a_reload_reads_the_currency_table_again(aiohttp_client, small_bundle, tmp_path):
    (tmp_path / "campaigns.json").write_text(json.dumps(rich_catalog()))
    table = {"date": "2026-12-01", "base": "USD", "rates": {"USD": 1.0, "CNY": 7.2, "EUR": 0.5}}
    (tmp_path / "currencies.json").write_text(json.dumps(table))
    client = await aiohttp_client(create_app(Config(model=small_bundle, campaigns=tmp_path / "campaigns.json")))
    request = {**copy.deepcopy(BASE), "cur": ["EUR"]}
    _, first, *_ = await post_bid(client, request)
    table["rates"]["EUR"], table["date"] = 1.0, "2026-12-02"
    (tmp_path / "currencies.json").write_text(json.dumps(table))
    assert (await client.post("/admin/reload", json={})).status == 200
    _, second, *_ = await post_bid(client, request)
    price = [answer["seatbid"][0]["bid"][0]["price"] for answer in (first, second)]
    assert first["cur"] == second["cur"] == "EUR" and price[1] == pytest.approx(2 * price[0], abs=1e-5)
    table["rates"].pop("CNY")
    (tmp_path / "currencies.json").write_text(json.dumps(table))
    response = await client.post("/admin/reload", json={})
    assert response.status == 422 and "rates.CNY" in (await response.json())["error"]


# -- the catalog's creative metadata ------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,message", [
    ("cat", ["IAB22-2", "IAB99"], r"campaigns\[0\].creatives\[0\].cat\[1\]: unknown IAB content category 'IAB99'"),
    ("cat", "IAB22", r"campaigns\[0\].creatives\[0\].cat: expected a list of category ids"),
    ("cattax", 6, r"campaigns\[0\].creatives\[0\].cattax: taxonomy 6 is not known"),
    ("attr", [4, 18], r"campaigns\[0\].creatives\[0\].attr\[1\]: unknown creative attribute 18"),
    ("api", [0], r"campaigns\[0\].creatives\[0\].api\[0\]: unknown API framework 0"),
    ("btype", 5, r"campaigns\[0\].creatives\[0\].btype: unknown banner type 5"),
    ("mimes", ["png"], r"campaigns\[0\].creatives\[0\].mimes\[0\]: expected a MIME type"),
    ("bundle", "", r"campaigns\[0\].creatives\[0\].bundle: expected a non-empty string"),
])
def test_creative_metadata_is_validated_at_load_with_its_path(field, value, message):
    catalog = rich_catalog()
    catalog["campaigns"][0]["creatives"][0][field] = value
    with pytest.raises(CatalogError, match=message):
        decode_catalog(json.dumps(catalog), "cat.json")


def test_the_taxonomy_reader_skips_comments_and_blank_lines(tmp_path):
    shipped = content_categories()
    assert set(shipped) == IAB_CONTENT_1 and shipped["IAB7-39"] == "Sexuality" and shipped["IAB22-2"] == "Couponing"
    taxonomy = tmp_path / "taxonomy.tsv"
    taxonomy.write_text("# id, name\n\nIAB1\tArts & Entertainment\nIAB1-1\tBooks & Literature\n", encoding="utf-8")
    assert content_categories(taxonomy) == {"IAB1": "Arts & Entertainment", "IAB1-1": "Books & Literature"}


def test_the_taxonomy_file_and_the_default_catalogs_metadata():
    assert len(IAB_CONTENT_1) == 392 and {"IAB1", "IAB7-39", "IAB26-4", "IAB24"} <= IAB_CONTENT_1
    catalog = load_catalog(DEFAULT_CAMPAIGNS)
    assert all(c.meta.cat and c.meta.mimes and c.meta.btype for c in catalog.candidates)
    assert any(c.meta.attr for c in catalog.candidates) and any(c.meta.bundle for c in catalog.candidates)
    assert any(c.meta.requires_consent for c in catalog.candidates)


# -- other projects' requests, and generated ones --------------------------------------------------------------
async def test_prebid_style_requests_get_valid_answers_the_oracle_expects(aiohttp_client, small_bundle):
    client = await aiohttp_client(create_app(Config(model=small_bundle, campaigns=DEFAULT_CAMPAIGNS)))
    catalog = raw_catalog(DEFAULT_CAMPAIGNS)
    statuses = {}
    for path in sorted(DATA.glob("prebid-*.json")):
        expectation, _ = await bid_and_check(client, json.loads(path.read_text()), catalog, small_bundle)
        statuses[path.stem] = (expectation.status, expectation.reason or expectation.imp_reasons)
    assert statuses["prebid-banner-seat-blocked"] == (204, "blocked_seat")
    assert statuses["prebid-banner-gdpr-consent"][0] == 200
    assert statuses["prebid-banner-blocking"][0] == 200, statuses  # some creatives survive every rule
    assert statuses["prebid-app-ccpa-opt-out"][0] == 204, statuses  # the app creative is blocked by bapp


def conformance_requests(catalog: dict, count: int, seed: int) -> list[tuple[str | None, dict]]:
    """``oracle.generate_requests`` with the conformance fields added from a stream of their own."""
    rng = random.Random(seed + 7)
    categories = sorted({c for campaign in catalog["campaigns"] for cr in campaign["creatives"]
                         for c in cr.get("cat") or []})
    out = oracle.generate_requests(catalog, count, seed)
    for _, request in out:
        if rng.random() < 0.3:
            request["bcat"] = rng.sample(categories + ["IAB25", "IAB26"], rng.randint(1, 3))
            if rng.random() < 0.1:
                request["cattax"] = 6
        if rng.random() < 0.1:
            request["bapp"] = ["com.example.mobileshop2997"]
        if rng.random() < 0.08:
            request[rng.choice(["bseat", "wseat"])] = [rng.choice(["bidder", "other"])]
        if rng.random() < 0.3:
            request["regs"] = rng.choice([{"coppa": 1}, {"gdpr": 1}, {"us_privacy": "1YNN"}, {"us_privacy": "1YYN"},
                                          {"gdpr": 1, "consent": None}])
            if "consent" in request["regs"]:
                del request["regs"]["consent"]
                request.setdefault("user", {})["consent"] = tcf_string({1, 3, 4})
        if rng.random() < 0.1:
            request["cur"] = ["EUR"]
        for imp in request["imp"]:
            banner = imp.get("banner")
            if banner is None:
                continue
            if rng.random() < 0.2:
                banner["battr"] = rng.sample([10, 13, 14], rng.randint(1, 2))
            if rng.random() < 0.15:
                banner["btype"] = [rng.choice([2, 3, 4])]
            if rng.random() < 0.15:
                banner["mimes"] = rng.sample(["image/jpeg", "image/png", "image/gif", "text/javascript"], 2)
            if rng.random() < 0.1:
                imp["bidfloorcur"] = "EUR"
            if rng.random() < 0.05:
                banner.pop("w", None), banner.pop("h", None)
                banner["format"] = [{"wratio": 6, "hratio": 5, "wmin": 300}]
    return out


async def test_generated_requests_with_conformance_fields(aiohttp_client, small_bundle):
    client = await aiohttp_client(create_app(Config(model=small_bundle, campaigns=DEFAULT_CAMPAIGNS)))
    catalog = raw_catalog(DEFAULT_CAMPAIGNS)
    reasons: dict[str, int] = {}   # imp reasons the oracle expects
    requests: dict[str, int] = {}  # request no-bids that end before any imp is looked at
    statuses = {200: 0, 204: 0}
    for exchange, request in conformance_requests(catalog, 160, seed=5):
        expectation, _ = await bid_and_check(client, request, catalog, small_bundle, exchange)
        statuses[expectation.status] += 1
        if expectation.reason in ("currency", "blocked_seat") and not expectation.imps:
            requests[expectation.reason] = requests.get(expectation.reason, 0) + 1
        for reason in expectation.imp_reasons:
            reasons[reason] = reasons.get(reason, 0) + 1
    text = await (await client.get("/metrics")).text()
    for reason in ("blocked_category", "unknown_cattax", "blocked_app", "requires_consent", "blocked_attribute",
                   "blocked_banner_type", "unsupported_mime", "floor_currency", "no_eligible_creative"):
        assert metric(text, "bidder_nobid_imps_total", reason=reason) == reasons.get(reason, 0), (reason, reasons)
    for reason, count in requests.items():
        assert metric(text, "bidder_nobids_total", reason=reason) == count, (reason, requests)
    assert requests.get("blocked_seat", 0) >= 2, requests
    assert statuses[200] >= 50 and sum(reasons.get(r, 0) for r in ("blocked_category", "blocked_attribute",
                                                                       "blocked_banner_type")) >= 5, (statuses, reasons)


async def test_an_empty_body_is_said_to_be_empty(aiohttp_client, small_bundle):
    client = await aiohttp_client(create_app(Config(model=small_bundle, campaigns=DEFAULT_CAMPAIGNS)))
    response = await client.post("/bid", data=b"")
    assert response.status == 400 and await response.json() == {"error": "empty request body", "path": "$"}


def test_the_validator_catches_broken_bids():
    request = {"id": "r", "imp": [{"id": "1", "banner": {"format": [{"w": 300, "h": 250}], "battr": [4]},
                                   "bidfloor": 1.0}], "badv": ["bad.example"], "bcat": ["IAB22"], "wseat": ["bidder"]}
    good = {"id": "r", "cur": "USD", "seatbid": [{"seat": "bidder", "bid": [
        {"id": "b", "impid": "1", "price": 1.5, "crid": "c", "adomain": ["ok.example"], "w": 300, "h": 250,
         "mtype": 1, "cat": ["IAB8"], "cattax": 1}]}]}
    assert violations(request, good) == []
    broken = [("price", 0.5, "under the floor"), ("impid", "2", "no imp"), ("w", 728, "size"), ("mtype", 2, "mtype"),
              ("adomain", ["bad.example"], "badv"), ("cat", ["IAB22-1"], "bcat"), ("attr", [4], "battr"),
              ("dealid", "D", "no deal"), ("crid", "", "crid")]
    for field, value, message in broken:
        answer = copy.deepcopy(good)
        answer["seatbid"][0]["bid"][0][field] = value
        assert any(message in v for v in violations(request, answer)), (field, violations(request, answer))
    answer = copy.deepcopy(good)
    answer["seatbid"][0]["seat"] = "other"
    assert any("bseat/wseat" in v for v in violations(request, answer))

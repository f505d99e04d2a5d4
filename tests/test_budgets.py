"""Campaign money terms on the bid path: max_cpm, flight, budgets reserved from leases, committed by billing
notices and released by losses over HTTP; the operator view and the spend metrics; both bankers."""
from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from bidder.__main__ import main
from bidder.app import DEFAULT_CAMPAIGNS, STATE, Config, create_app
from bidder.engine import BidEngine
from bidder.ledger import nanos
from bidder.notices import Keyring, NoticeSettings, SigningKey
from oracle import metric

NOW = 1_796_126_400.0  # 2026-12-01T12:00:00Z
KEYS = Keyring([SigningKey("k1", bytes.fromhex("11" * 32), 0)])
REQUEST = {"id": "req", "imp": [{"id": "1", "banner": {"w": 300, "h": 250}, "exp": 120}],
           "site": {"domain": "news.example"}, "device": {"ua": "Mozilla/5.0"}}


def _catalog(tmp_path: Path, **terms) -> Path:
    """The default catalog's first campaign alone (one 300x250 creative bids), with ``terms``."""
    campaign = json.loads(DEFAULT_CAMPAIGNS.read_text())["campaigns"][0]
    campaign.update(terms)
    path = tmp_path / "campaigns.json"
    path.write_text(json.dumps({"campaigns": [campaign]}))
    return path


def _request(n: int) -> bytes:
    return json.dumps(dict(REQUEST, id=f"req-{n}")).encode()


def _notices(tmp_path: Path) -> NoticeSettings:
    return NoticeSettings(url="https://bidder.example", keyring=KEYS, state_dir=tmp_path / "state", window_s=600,
                          max_window_s=3600)


def _local(url: str, price: float | None = None) -> str:
    if price is not None:
        url = url.replace("${AUCTION_PRICE}", f"{price:.6f}")
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


async def _bid(client, n: int):
    response = await client.post("/bid", data=_request(n))
    if response.status == 204:
        return None
    assert response.status == 200, await response.text()
    return (await response.json())["seatbid"][0]["bid"][0]


async def _nobids(client, reason: str) -> float:
    return metric(await (await client.get("/metrics")).text(), "bidder_nobid_imps_total", reason=reason)


async def test_without_money_terms_the_budget_stage_never_runs(aiohttp_client, tmp_path, monkeypatch):
    def refuse(self, batch):
        raise AssertionError("the budget stage ran without money terms")

    monkeypatch.setattr(BidEngine, "budget", refuse)
    client = await aiohttp_client(create_app(Config(campaigns=_catalog(tmp_path), now=NOW)))
    assert await _bid(client, 1) is not None
    state = client.app[STATE]
    assert not state.engine.money and state.ledger is None and state.metrics.ledger is None


async def test_max_cpm_caps_the_bid_and_a_flight_bounds_it(aiohttp_client, tmp_path):
    free = await aiohttp_client(create_app(Config(campaigns=_catalog(tmp_path), now=NOW)))
    price = (await _bid(free, 1))["price"]
    cap = round(price / 2, 6)
    (tmp_path / "capped").mkdir()
    capped = await aiohttp_client(create_app(Config(campaigns=_catalog(tmp_path / "capped", max_cpm=cap), now=NOW)))
    assert (await _bid(capped, 1))["price"] == cap
    (tmp_path / "later").mkdir()
    later = await aiohttp_client(create_app(Config(
        campaigns=_catalog(tmp_path / "later", flight={"start": "2026-12-02T00:00:00Z"}), now=NOW)))
    assert await _bid(later, 1) is None and await _nobids(later, "flight") == 1
    (tmp_path / "over").mkdir()
    over = await aiohttp_client(create_app(Config(
        campaigns=_catalog(tmp_path / "over", flight={"end": "2026-12-01T12:00:00Z"}), now=NOW)))
    assert await _bid(over, 1) is None and await _nobids(over, "flight") == 1


async def test_each_imp_of_a_request_meets_its_own_campaigns_terms(aiohttp_client, tmp_path):
    """Five imps, each size bought by one campaign: one under a floor no creative reaches, one of a campaign without
    terms bids its value, one out of its flight is held back, one whose max_cpm is under the imp's floor is
    below_floor, and the next imp of that campaign bids at its max_cpm; an imp held back leaves the later imps
    their bids."""
    def campaign(name, advertiser, w, h, **terms):
        return {"id": name, "advertiser": advertiser, "value_per_click": 1.0, **terms, "creatives": [
            {"id": f"{name}-cr", "w": w, "h": h, "adomain": [f"{name}.example"],
             "nurl": "https://w.example/?p=${AUCTION_PRICE}"}]}

    path = tmp_path / "campaigns.json"
    path.write_text(json.dumps({"campaigns": [
        campaign("free", 1458, 300, 250), campaign("over", 3358, 728, 90, flight={"end": "2026-12-01T00:00:00Z"}),
        campaign("capped", 3386, 160, 600, max_cpm=0.05)]}))
    client = await aiohttp_client(create_app(Config(campaigns=path, now=NOW)))
    body = dict(REQUEST, imp=[{"id": "0", "banner": {"w": 300, "h": 250}, "bidfloor": 1e6},  # no row at all
                              {"id": "1", "banner": {"w": 300, "h": 250}},
                              {"id": "2", "banner": {"w": 728, "h": 90}},
                              {"id": "3", "banner": {"w": 160, "h": 600}, "bidfloor": 0.06},
                              {"id": "4", "banner": {"w": 160, "h": 600}, "bidfloor": 0.05}])
    response = await client.post("/bid", data=json.dumps(body))
    assert response.status == 200, await response.text()
    bids = {b["impid"]: b for b in (await response.json())["seatbid"][0]["bid"]}
    assert sorted(bids) == ["1", "4"] and bids["1"]["cid"] == "free" and bids["1"]["price"] > 0.05
    assert bids["4"]["cid"] == "capped" and bids["4"]["price"] == 0.05  # max_cpm, at the floor: still a bid
    assert await _nobids(client, "flight") == 1 and await _nobids(client, "below_floor") == 2


async def test_terms_that_do_not_bind_leave_shaded_and_deal_prices_as_they_are(aiohttp_client, tmp_path):
    """With a max_cpm far above its bids, a campaign bids what it bids without terms: its first-price bids shaded,
    its deal bids at their deal's terms (a fixed price, a floor)."""
    deals = [{"dealid": "D-fixed"}, {"dealid": "D-open"}]
    clients = []
    for name, terms in (("plain", {}), ("termed", {"max_cpm": 1000.0})):
        (tmp_path / name).mkdir()
        clients.append(await aiohttp_client(create_app(Config(campaigns=_catalog(tmp_path / name, deals=deals,
                                                                                 **terms), now=NOW))))
    open_market = dict(REQUEST, at=1)
    through_deals = dict(REQUEST, at=1, imp=[
        {"id": "1", "banner": {"w": 300, "h": 250},
         "pmp": {"private_auction": 1, "deals": [{"id": "D-fixed", "bidfloor": 0.02, "at": 3}]}},
        {"id": "2", "banner": {"w": 300, "h": 250},
         "pmp": {"private_auction": 1, "deals": [{"id": "D-open", "bidfloor": 0.01}]}}])
    answers = []
    for client in clients:
        prices = []
        for body in (open_market, through_deals, dict(REQUEST, at=2)):
            response = await client.post("/bid", data=json.dumps(body))
            assert response.status == 200, await response.text()
            prices.append({b["impid"]: b["price"] for s in (await response.json())["seatbid"] for b in s["bid"]})
        answers.append(prices)
    plain, termed = answers
    assert termed == plain
    shaded, deal, second = plain
    assert shaded["1"] < second["1"] and deal["1"] == 0.02 and deal["2"] == second["1"]


def test_budgets_without_notices_are_refused_in_one_line(tmp_path, capsys):
    path = _catalog(tmp_path, budget={"daily": 10.0})
    assert main(["serve", "--campaigns", str(path), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "campaigns with a budget or frequency caps need notices (--notice-url)" in err
    assert err.count("\n") == 1
    assert main(["serve", "--ledger", "redis://127.0.0.1:1/0", "--port", "1"]) == 2
    assert "--ledger needs --notice-url" in capsys.readouterr().err
    assert main(["serve", "--ledger-refresh", "0", "--port", "1"]) == 2
    assert "--ledger-refresh must be" in capsys.readouterr().err


def test_an_unreachable_redis_banker_is_refused_at_start(tmp_path, capsys):
    assert main(["serve", "--notice-url", "http://127.0.0.1:1", "--state-dir", str(tmp_path),
                 "--ledger", "redis://127.0.0.1:1/0", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --ledger redis://127.0.0.1:1/0: cannot reach the Redis banker")


@pytest.fixture(params=["embedded", "redis"])
def ledger_url(request):
    return None if request.param == "embedded" else request.getfixturevalue("redis_server").url


async def test_spend_is_reserved_at_bid_time_and_committed_by_the_bill(aiohttp_client, tmp_path, ledger_url):
    """Leases of a tenth of a 1-cent budget: bids until the lease holds no more, then no_budget; billing notices
    commit their clearing price, a loss releases its bid; the operator view and the metrics show it."""
    catalog = _catalog(tmp_path, budget={"total": 0.01, "daily": 0.01}, max_cpm=1.0)
    config = Config(campaigns=catalog, now=NOW, notices=_notices(tmp_path), ledger=ledger_url,
                    lease_fraction=0.5, ledger_refresh_s=3600)
    client = await aiohttp_client(create_app(config))
    ledger = client.app[STATE].ledger
    assert ledger is not None and ledger.available(0) == nanos(0.005)
    bids = []
    while (bid := await _bid(client, len(bids))) is not None:
        bids.append(bid)
    assert bids and all(b["price"] <= 1.0 for b in bids)
    assert sum(round(b["price"] * 1e6) for b in bids) <= nanos(0.005) < sum(round(b["price"] * 1e6)
                                                                             for b in bids) + 1_000_000
    assert await _nobids(client, "no_budget") == 1
    billed, lost = bids[0], bids[1:]
    clearing = round(billed["price"] / 2, 6)
    assert (await client.get(_local(billed["burl"], clearing))).status == 200
    assert (await client.get(_local(billed["burl"], clearing))).status == 200  # a retry: counted once
    for bid in lost:
        assert (await client.get(_local(bid["lurl"]))).status == 200
    assert ledger.refresh()
    spent = round(clearing * 1e6)  # nano-USD: the CPM in micro-USD
    assert ledger.view[0].spent_total == spent and ledger.view[0].reserved_total == 0
    assert ledger.available(0) == nanos(0.005)  # topped up again
    report = await (await client.get("/admin/campaigns")).json()
    figures = report["campaigns"]["c1458"]
    assert figures["spent_total"] == figures["spent_today"] == spent / 1e9
    assert (figures["budget_total"], figures["max_cpm"], figures["pacing"]) == (0.01, 1.0, "asap")
    assert report["banker"]["connected"] is True
    text = await (await client.get("/metrics")).text()
    assert metric(text, "bidder_spend_usd_total", campaign="c1458") == spent / 1e9
    assert metric(text, "bidder_budget_remaining_usd", campaign="c1458") == pytest.approx(0.01 - spent / 1e9)


async def test_an_imp_under_its_floor_reserves_nothing(aiohttp_client, tmp_path):
    catalog = _catalog(tmp_path, budget={"daily": 100.0})
    client = await aiohttp_client(create_app(Config(campaigns=catalog, now=NOW, notices=_notices(tmp_path),
                                                    ledger_refresh_s=3600)))
    ledger = client.app[STATE].ledger
    available = ledger.available(0)
    out_of_reach = dict(REQUEST, imp=[dict(REQUEST["imp"][0], bidfloor=1e6)])  # a thousand dollars an impression
    assert (await client.post("/bid", data=json.dumps(out_of_reach))).status == 204
    assert ledger.available(0) == available and await _nobids(client, "below_floor") == 1
    assert await _bid(client, 2) is not None and await _nobids(client, "no_budget") == 0


async def test_every_imp_a_lease_cannot_pay_for_is_counted(aiohttp_client, tmp_path):
    catalog = _catalog(tmp_path, budget={"daily": 0.0001})  # a tenth of a cent: less than one impression costs
    client = await aiohttp_client(create_app(Config(campaigns=catalog, now=NOW, notices=_notices(tmp_path),
                                                    ledger_refresh_s=3600)))
    two_imps = dict(REQUEST, imp=[dict(REQUEST["imp"][0], id=str(n)) for n in (1, 2)])
    assert (await client.post("/bid", data=json.dumps(two_imps))).status == 204
    assert await _nobids(client, "no_budget") == 2 and await _nobids(client, "below_floor") == 0


async def test_the_pacing_hook_throttles_a_campaign(aiohttp_client, tmp_path):
    catalog = _catalog(tmp_path, budget={"daily": 100.0}, pacing="even")
    client = await aiohttp_client(create_app(Config(campaigns=catalog, now=NOW, notices=_notices(tmp_path),
                                                    ledger_refresh_s=3600)))
    ledger = client.app[STATE].ledger
    ledger.pass_rate[ledger.slots["c1458"]] = 0.0
    assert await _bid(client, 1) is None and await _nobids(client, "pacing") == 1
    two_imps = dict(REQUEST, imp=[dict(REQUEST["imp"][0], id=str(n)) for n in (1, 2)])
    assert (await client.post("/bid", data=json.dumps(two_imps))).status == 204
    assert await _nobids(client, "pacing") == 3  # each imp of the request counted
    ledger.pass_rate[ledger.slots["c1458"]] = 1.0
    assert await _bid(client, 2) is not None


async def test_the_operator_view_is_loopback_only(aiohttp_client, tmp_path):
    client = await aiohttp_client(create_app(Config(campaigns=_catalog(tmp_path, max_cpm=2.0), now=NOW)))
    response = await client.get("/admin/campaigns", headers={"X-Forwarded-For": "203.0.113.9"})
    assert response.status == 200  # the test client is loopback; a forwarded header changes nothing
    assert (await response.json())["campaigns"]["c1458"]["max_cpm"] == 2.0


def test_a_bill_token_names_what_the_ledger_commits(tmp_path):
    """The token's bid price is in CPM micro-USD: an impression's cost in nano-USD, the ledger's unit."""
    token = KEYS.sign(NOW, 2_500_000, 600, "r", "1", "r-1", "bidder", "c1458", "cr", "USD", "", "m")
    facts = KEYS.verify(token)
    assert facts.price_micros == nanos(2.5 / 1000)
    assert parse_qs("t=" + token)["t"][0] == token


@pytest.mark.parametrize("scope", ["campaign", "creative"])
async def test_a_user_capped_by_billed_impressions_gets_no_more_bids(aiohttp_client, tmp_path, scope):
    catalog = _catalog(tmp_path, frequency_cap=[{"count": 1, "seconds": 3600, "scope": scope}],
                       requires_consent=False)
    client = await aiohttp_client(create_app(Config(campaigns=catalog, now=NOW, notices=_notices(tmp_path),
                                                    ledger_refresh_s=3600)))

    async def bid_for(n: int, user: dict | None, **parts):
        body = dict(REQUEST, id=f"req-{n}", **({"user": user} if user is not None else {}), **parts)
        response = await client.post("/bid", data=json.dumps(body))
        return (await response.json())["seatbid"][0]["bid"][0] if response.status == 200 else None

    first = await bid_for(1, {"id": "u1"})
    anonymous = await bid_for(2, None)
    for bid in (first, anonymous):
        assert (await client.get(_local(bid["burl"], bid["price"]))).status == 200
    ledger = client.app[STATE].ledger
    assert ledger.refresh()
    assert await bid_for(3, {"id": "u1"}) is None and await _nobids(client, "frequency_cap") == 1
    assert await bid_for(4, {"id": "u1"}, imp=[dict(REQUEST["imp"][0], id=str(n)) for n in (1, 2)]) is None
    assert await _nobids(client, "frequency_cap") == 3  # each imp of the request counted
    assert await bid_for(5, {"buyeruid": "u2"}) is not None  # another user
    assert await bid_for(6, None) is not None  # no user key, even billed before: never capped
    assert await bid_for(7, {"id": "u1"}, regs={"coppa": 1}) is not None  # no consent: not capped by user key
    report = await (await client.get("/admin/campaigns")).json()
    assert report["campaigns"]["c1458"]["cap_hits"] == 3
    assert report["campaigns"]["c1458"]["frequency_cap"] == [{"count": 1, "seconds": 3600, "scope": scope}]


async def test_a_user_key_holding_a_tab_is_capped_through_the_redis_banker(aiohttp_client, tmp_path, redis_server):
    """The banker's impression entries are tab-separated: a tab in a user key must not split them."""
    catalog = _catalog(tmp_path, frequency_cap=[{"count": 1, "seconds": 3600}], requires_consent=False)
    client = await aiohttp_client(create_app(Config(campaigns=catalog, now=NOW, notices=_notices(tmp_path),
                                                    ledger=redis_server.url, ledger_refresh_s=3600)))
    body = json.dumps(dict(REQUEST, user={"id": "tab\tbed"}))
    first = (await (await client.post("/bid", data=body)).json())["seatbid"][0]["bid"][0]
    assert (await client.get(_local(first["burl"], first["price"]))).status == 200
    assert client.app[STATE].ledger.refresh()
    assert (await client.post("/bid", data=body)).status == 204 and await _nobids(client, "frequency_cap") == 1


def test_bench_budgets_caps_every_campaign_and_scores_violations_over_capped_impressions():
    import argparse

    from bench.budgets import capped_catalog, frequency_cap, score_day

    assert frequency_cap("2/3600") == (2, 3600)
    for bad in ("2", "2/x", "0/60", "3/-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            frequency_cap(bad)
    catalog = {"campaigns": [{"id": "a", "creatives": []}, {"id": "b", "creatives": []}]}
    assert capped_catalog(catalog, None) == catalog
    capped = capped_catalog(catalog, (2, 3600))
    assert all(c["frequency_cap"] == [{"count": 2, "seconds": 3600, "scope": "campaign"}] for c in capped["campaigns"])
    assert "frequency_cap" not in catalog["campaigns"][0]
    hourly = [{"spend": 1.0}] * 4
    day = {"requests": 100, "bids": 50, "bills": 30, "notices": {}, "timeouts": 7,
           "campaigns": {"a": {"spend": 4.0, "bills": 20, "cap_violations": 1, "hourly": hourly},
                         "b": {"spend": 2.0, "bills": 10, "cap_violations": 2,
                               "hourly": [{"spend": 2.0}, {"spend": 0.0}]},
                         "unbudgeted": {"spend": 1.0, "bills": 5, "cap_violations": 4, "hourly": hourly}},
           "bidder": {"campaigns": {"a": {"spent_total": 4.0}, "b": {"spent_total": 2.000001}}}}
    scored = score_day(day, {"a": 8.0, "b": 4.0}, 0.5, capped=True)
    assert (scored["use"], scored["cap_violations"], scored["capped_impressions"]) == (1.0, 3, 30)
    assert scored["cap_violation_rate"] == 0.1 and scored["max_ledger_minus_exchange"] == 1e-06
    assert scored["timeouts"] == 7
    a, b = scored["campaigns"]["a"]["rmse_vs_plan"], scored["campaigns"]["b"]["rmse_vs_plan"]
    assert scored["rmse_vs_plan_by_budget"] == pytest.approx((4 * a + 2 * b) / 6, abs=1e-6) and b > a == 0.0
    assert score_day(day, {"a": 8.0, "b": 4.0}, 0.5, capped=False)["cap_violation_rate"] is None


@pytest.mark.slow
@pytest.mark.parametrize("shared", ["two workers, embedded", "two bidders, one Redis"])
def test_bidders_sharing_a_budget_spend_it_without_overspending(tmp_path, shared, request):
    """Every bid billed at its price until the budget is gone: the spend never passes the budget and equals the
    sum of the bills to the micro-dollar, whichever worker or bidder answered each bid and each bill."""
    import time

    from processes import Server, http

    budget = 0.2
    catalog = _catalog(tmp_path, budget={"total": budget}, max_cpm=2.0)
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"id": "k", "secret": "11" * 32, "created": "2026-12-01T00:00:00Z"}]}))
    keys.chmod(0o600)
    common = ["--campaigns", str(catalog), "--notice-url", "http://127.0.0.1:{port}", "--notice-keys", str(keys),
              "--now", "2026-12-01T12:00:00Z", "--ledger-refresh", "0.05", "--lease-fraction", "0.05"]
    if shared.startswith("two workers"):
        servers = [Server(*common, "--state-dir", str(tmp_path / "state"), workers=2)]
    else:
        url = request.getfixturevalue("redis_server").url
        servers = [Server(*common, "--state-dir", str(tmp_path / f"state{i}"), "--ledger", url) for i in (0, 1)]
    try:
        for server in servers:
            server.wait_ready(workers=2 if shared.startswith("two workers") else 1)
        billed = 0
        idle = 0
        n = 0
        while idle < 40:  # until no bidder has had a lease for a while
            server = servers[n % len(servers)]
            status, body = server.post("/bid", _request(n))
            n += 1
            if status == 204:
                idle += 1
                time.sleep(0.01)
                continue
            idle = 0
            bid = json.loads(body)["seatbid"][0]["bid"][0]
            # the bill reaches the other bidder, when there are two
            other = servers[n % len(servers)]
            assert http(other.port, _local(bid["burl"], bid["price"]))[0] == 200
            billed += round(bid["price"] * 1e6)
        time.sleep(0.3)  # the last bills reach the banker
        report = json.loads(servers[0].get("/admin/campaigns")[1])["campaigns"]["c1458"]
    finally:
        for server in servers:
            server.stop()
            server.__exit__()
    assert billed <= nanos(budget)
    assert round(report["spent_total"] * 1e9) == billed
    assert billed >= nanos(budget) - 2 * nanos(0.05 * budget) - 2_000_000  # at most the leases left unused


async def test_a_campaign_out_of_lease_leaves_the_imp_to_the_others(aiohttp_client, tmp_path):
    campaigns = json.loads(DEFAULT_CAMPAIGNS.read_text())["campaigns"][:2]
    (tmp_path / "free").mkdir()
    free = tmp_path / "free" / "campaigns.json"
    free.write_text(json.dumps({"campaigns": campaigns}))
    first = await aiohttp_client(create_app(Config(campaigns=free, now=NOW)))
    winner = (await _bid(first, 1))["cid"]
    for campaign in campaigns:
        if campaign["id"] == winner:
            campaign["budget"] = {"total": 0.001}  # one bid at most: the smallest lease is 0.002 USD
    path = tmp_path / "campaigns.json"
    path.write_text(json.dumps({"campaigns": campaigns}))
    client = await aiohttp_client(create_app(Config(campaigns=path, now=NOW, notices=_notices(tmp_path),
                                                    ledger_refresh_s=3600)))
    winners = [bid and bid["cid"] for bid in [await _bid(client, n) for n in range(5)]]
    other = next(c["id"] for c in campaigns if c["id"] != winner)
    assert winners[-3:] == [other] * 3 and winners.count(winner) <= 1
    assert client.app[STATE].ledger.paused == {winner}
    # the one bid its lease could not pay is the only one lost: from then on the campaign is left out
    assert winners.count(None) == await _nobids(client, "no_budget") <= 1


@pytest.mark.slow
def test_the_ledger_spends_what_the_exchange_charges_and_no_campaign_passes_its_budget(tmp_path):
    """The simulated exchange against two workers sharing the embedded banker, every notice delivered (some twice,
    all with delays): each campaign's spend in the ledger equals the exchange's charges to the micro-dollar, and
    none passes its budget, small enough that several run out within the simulated hour."""
    import time

    from bench.exchange.cli import ExchangeConfig, run_exchange
    from bench.exchange.faults import Faults
    from bench.exchange.traffic import Market
    from bidder.clock import parse_time
    from processes import Server

    budget = 0.02
    catalog = json.loads(DEFAULT_CAMPAIGNS.read_text())
    for campaign in catalog["campaigns"]:
        campaign["budget"] = {"total": budget, "timezone": "America/New_York"}
        assert all(creative["markup"] for creative in campaign["creatives"])  # what the exchange renders and charges
    path = tmp_path / "campaigns.json"
    path.write_text(json.dumps(catalog))
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"id": "k", "secret": "11" * 32, "created": "2026-12-01T00:00:00Z"}]}))
    keys.chmod(0o600)
    anchor = time.time() + 10.0
    start = "2026-12-01T09:00:00Z"
    with Server("--campaigns", str(path), "--notice-url", "http://127.0.0.1:{port}", "--notice-keys", str(keys),
                "--state-dir", str(tmp_path / "state"), "--clock-start", start, "--clock-speed", "720",
                "--clock-anchor", str(anchor), "--ledger-refresh", "0.05", workers=2) as server:
        server.wait_ready(workers=2)
        url = f"http://127.0.0.1:{server.port}/bid/{{exchange}}"
        faults = Faults(delay_s=2.0, late=0.0, lost=0.0, duplicate=0.3, unrendered=0.0, forged=0.0)
        config = ExchangeConfig(bidders=(url,), campaigns=path, start=parse_time(start), speed=720.0, hours=1.0,
                                requests=600, rate=300.0, seed=4, world_seed=5, world_rows=8_000, faults=faults,
                                anchor=anchor)
        report, _ = run_exchange(config, market=Market(world_seed=5, world_rows=8_000))
        time.sleep(0.5)  # the last notices reach the banker, and the worker answering next has read it back
        ledger = json.loads(server.get("/admin/campaigns")[1])["campaigns"]
        server.stop()
    charged = report["bidders"][url]["campaigns"]
    assert report["bidders"][url]["notices"]["lost"] == 0 and report["bidders"][url]["bills"] >= 10
    for campaign, figures in ledger.items():
        spend = charged.get(campaign, {}).get("spend", 0.0)
        assert figures["spent_total"] == pytest.approx(spend, abs=1e-6), campaign
        assert figures["spent_total"] <= budget, campaign
    assert sum(f["spent_total"] > budget / 2 for f in ledger.values()) >= 2  # budgets small enough to bind


@pytest.mark.slow
def test_a_bidder_rides_out_redis_going_away_and_a_restart_keeps_its_spend(tmp_path, redis_server):
    """Redis stopped under a serving bidder: it bids on the leases it holds, then answers no_budget, and bids again
    by itself once Redis is back; stopped and started again, it finds the spend where it left it."""
    import time

    from processes import Server, http

    catalog = _catalog(tmp_path, budget={"total": 1.0}, max_cpm=2.0)
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"id": "k", "secret": "11" * 32, "created": "2026-12-01T00:00:00Z"}]}))
    keys.chmod(0o600)
    args = ["--campaigns", str(catalog), "--notice-url", "http://127.0.0.1:{port}", "--notice-keys", str(keys),
            "--state-dir", str(tmp_path / "state"), "--now", "2026-12-01T12:00:00Z", "--ledger", redis_server.url,
            "--ledger-refresh", "0.05", "--lease-fraction", "0.01"]

    def until(condition, timeout=10.0):
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.05)

    n = 0

    def bid(server):
        nonlocal n
        n += 1
        status, body = server.post("/bid", _request(n))
        return json.loads(body)["seatbid"][0]["bid"][0] if status == 200 else None

    with Server(*args) as server:
        server.wait_ready()
        spent = 0
        for _ in range(3):
            placed = bid(server)
            assert http(server.port, _local(placed["burl"], placed["price"]))[0] == 200
            spent += round(placed["price"] * 1e6)
        until(lambda: json.loads(server.get("/admin/campaigns")[1])["campaigns"]["c1458"]["spent_total"] > 0)
        redis_server.stop()
        placed = 0
        while bid(server) is not None:  # the lease held: at most 1 % of the budget, a few bids
            placed += 1
            assert placed < 100
        assert placed >= 1 and server.get("/healthz")[0] == 200
        until(lambda: json.loads(server.get("/admin/campaigns")[1])["banker"]["connected"] is False)
        assert bid(server) is None  # still no lease: no bid while the banker is away
        redis_server.restart()
        until(lambda: bid(server) is not None)
        server.stop()
    with Server(*args) as again:
        again.wait_ready()
        figures = json.loads(again.get("/admin/campaigns")[1])["campaigns"]["c1458"]
        assert round(figures["spent_total"] * 1e9) == spent
        again.stop()


def test_the_user_key_is_user_id_then_buyeruid_then_the_device_ifa():
    from bidder.openrtb import user_key
    from bidder.openrtb import decode_request

    def key(**parts):
        return user_key(decode_request(json.dumps(dict(REQUEST, **parts)).encode()))

    assert key(user={"id": "u", "buyeruid": "b"}, device={"ifa": "i"}) == "u"
    assert key(user={"buyeruid": "b"}, device={"ifa": "i"}) == "b"
    assert key(user={}, device={"ifa": "i"}) == "i"
    assert key() is None
    assert key(user={"id": 42}) == "42" and key(user={}, device={"ifa": 7}) == "7"  # any JSON, keyed as text


# -- bench budgets ----------------------------------------------------------------------------------------------
def test_bench_budgets_budgets_each_spending_campaign_and_scores_its_day():
    from bench.budgets import budget_catalog, campaign_figures

    catalog = {"campaigns": [{"id": "a", "creatives": []}, {"id": "b", "creatives": []}]}
    budgeted = budget_catalog(catalog, {"a": 10.0, "b": 0.0}, 0.4)
    assert budgeted["campaigns"][0]["budget"] == {"daily": 4.0, "timezone": "UTC"}
    assert budgeted["campaigns"][0]["pacing"] == "even" and "budget" not in budgeted["campaigns"][1]
    assert "budget" not in catalog["campaigns"][0]  # the original is left alone
    on_plan = {"spend": 4.0, "bills": 400, "hourly": [{"spend": 1.0}] * 4, "cap_violations": 0}
    figures = campaign_figures(on_plan, 4.0, {"spent_total": 3.999999})
    assert (figures["use"], figures["overspend"], figures["exhausted_hour"], figures["rmse_vs_plan"]) == (1.0, 0.0,
                                                                                                          4, 0.0)
    assert figures["ledger_minus_exchange"] == -1e-06
    early = campaign_figures({"spend": 4.4, "bills": 440, "hourly": [{"spend": 4.4}, {"spend": 0.0}]}, 4.0, None)
    assert early["exhausted_hour"] == 1 and early["overspend"] == pytest.approx(0.1) and "ledger_spent" not in early
    assert early["rmse_vs_plan"] == pytest.approx(((1.1 - 0.5) ** 2 / 2 + 0.1 ** 2 / 2) ** 0.5)

"""The simulated exchange (``python -m bench exchange``): macros, auction rules, faults, determinism, the
shared clock, and short simulated days over real HTTP against a scripted bidder, the default bidder and
the FastAPI baseline."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from aiohttp import web

from bench.exchange.auction import (LOSS_BELOW_DEAL_FLOOR, LOSS_BELOW_FLOOR, LOSS_INVALID_DEAL, LOSS_LOST_TO_HIGHER,
                                    LOSS_WON, Offer, run_auction)
from bench.exchange.cli import ExchangeConfig, main, run_exchange
from bench.exchange.faults import Faults
from bench.exchange.notices import MACROS, forge, is_local, substitute
from bench.exchange.report import BidderStats
from bench.exchange.terms import TermsError, read_terms
from bench.exchange.traffic import Market, Traffic, arrival_times, hourly_share
from bidder.clock import Clock, parse_time
from train.data.synthetic import ADVERTISERS
from tests.processes import Server, reserve_port

START = parse_time("2026-12-01T00:00:00Z")  # a Tuesday
CATALOG = Path(__file__).resolve().parent.parent / "bidder" / "models" / "default" / "campaigns.json"
CREATIVE = ADVERTISERS[1458][0]["id"]  # a creative the market knows (campaign c1458 of the default catalog)
NO_FAULTS = Faults(delay_s=0.0, late=0.0, lost=0.0, duplicate=0.0, unrendered=0.0, forged=0.0)
TIMING_KEYS = ("rate_rps", "wall_s", "cpu_s", "rate_per_cpu_s", "clock")


@pytest.fixture(scope="module")
def market() -> Market:
    return Market(world_seed=5, world_rows=8_000)  # a small world: the tests need its shape, not its size


@pytest.fixture(scope="module")
def shipped_market() -> Market:
    """The market the shipped bundle was trained on (python -m train synth --rows 1000000 --seed 2013)."""
    return Market(world_seed=2013, world_rows=1_000_000)


# -- macros and notice URLs ----------------------------------------------------------------------------------
def test_every_macro_is_substituted_and_unknown_ones_are_left_alone():
    values = {name: f"<{name.lower()}>" for name in MACROS}
    url = "http://127.0.0.1/n?" + "&".join(f"{name}=${{{name}}}" for name in MACROS) + "&x=${UNKNOWN_MACRO}&y=${a}"
    out = substitute(url, values)
    for name in MACROS:
        assert f"{name}=<{name.lower()}>" in out
    assert out.endswith("&x=${UNKNOWN_MACRO}&y=${a}")
    assert substitute("http://127.0.0.1/plain", values) == "http://127.0.0.1/plain"
    assert substitute("p=${AUCTION_PRICE}&q=${AUCTION_PRICE}", {"AUCTION_PRICE": "1.5"}) == "p=1.5&q=1.5"


def test_only_addresses_on_this_machine_are_local():
    assert is_local("http://127.0.0.1:8080/win") and is_local("http://localhost/x") and is_local("http://[::1]:1/")
    assert is_local("http://127.0.0.5/x")
    for url in ("https://win.bidder.example.com/win?p=1", "http://10.0.0.1/x", "http://192.168.1.1/", "ftp://127.0.0.1/",
                "not a url", "http:///nohost"):
        assert not is_local(url), url


def test_forgeries_alter_the_price_or_the_bid_id_or_replay_an_old_notice():
    template = "http://127.0.0.1/bill?id=${AUCTION_ID}&bid=${AUCTION_BID_ID}&p=${AUCTION_PRICE}"
    values = {"AUCTION_ID": "7", "AUCTION_BID_ID": "b7", "AUCTION_PRICE": "2.000000"}
    genuine = substitute(template, values)
    price = forge(template, values, "price", "zz", None)
    assert price != genuine and "p=20.010000" in price and "id=7&bid=b7" in price
    foreign = forge(template, values, "bid_id", "zz", None)
    assert "id=zz&bid=zz" in foreign and "p=2.000000" in foreign
    assert forge(template, values, "replay", "zz", "http://127.0.0.1/bill?id=1") == "http://127.0.0.1/bill?id=1"
    # a kind the URL cannot carry falls to the next; nothing to alter and nothing to replay: no forgery
    assert forge("http://127.0.0.1/win?p=${AUCTION_PRICE}", values, "bid_id", "zz", None).endswith("p=20.010000")
    assert forge("http://127.0.0.1/win", values, "price", "zz", None) is None


# -- the auction ------------------------------------------------------------------------------------------------
def test_second_price_pays_the_highest_of_the_other_bids_the_market_and_the_floor():
    offers = [Offer(0, 5.0), Offer(1, 3.0)]
    out = run_auction(offers, floor=1.0, market=2.0, first_price=False)
    assert (out.winner, out.price, out.loss) == (0, 3.0, (LOSS_WON, LOSS_LOST_TO_HIGHER))
    assert out.min_to_win == (3.0, 3.0)
    assert run_auction(offers, floor=1.0, market=4.0, first_price=False).price == 4.0
    assert run_auction([Offer(0, 5.0)], floor=4.5, market=2.0, first_price=False).price == 4.5


def test_first_price_pays_the_bid():
    out = run_auction([Offer(0, 5.0), Offer(1, 3.0)], floor=1.0, market=2.0, first_price=True)
    assert (out.winner, out.price, out.min_to_win) == (0, 5.0, (3.0, 5.0))


def test_the_market_wins_unless_beaten_strictly():
    out = run_auction([Offer(0, 2.0)], floor=1.0, market=2.0, first_price=False)
    assert out.winner is None and out.loss == (LOSS_LOST_TO_HIGHER,) and out.min_to_win == (2.0,)
    assert run_auction([Offer(0, 2.000001)], floor=1.0, market=2.0, first_price=False).winner == 0


def test_floors_and_deals():
    out = run_auction([Offer(0, 0.9), Offer(1, 0.5)], floor=1.0, market=0.1, first_price=False)
    assert out.winner is None and out.loss == (LOSS_BELOW_FLOOR, LOSS_BELOW_FLOOR)
    deals = {"D1": 3.0}
    out = run_auction([Offer(0, 2.0, "D1"), Offer(1, 2.5, "NOPE"), Offer(2, 1.5)], floor=1.0, market=0.5,
                      first_price=False, deals=deals)
    assert out.winner == 2 and out.loss == (LOSS_BELOW_DEAL_FLOOR, LOSS_INVALID_DEAL, LOSS_WON)
    out = run_auction([Offer(0, 3.5, "D1"), Offer(1, 1.5)], floor=1.0, market=0.5, first_price=False, deals=deals)
    assert (out.winner, out.price) == (0, 3.0)  # a deal bid pays at least its deal's floor


def test_ties_are_broken_by_the_requests_own_draw():
    offers = [Offer(0, 4.0), Offer(1, 4.0), Offer(2, 1.0)]
    winners = {run_auction(offers, 0.5, 1.0, False, tie_draw=u / 10).winner for u in range(10)}
    assert winners == {0, 1}
    assert run_auction(offers, 0.5, 1.0, False, tie_draw=0.3) == run_auction(offers, 0.5, 1.0, False, tie_draw=0.3)
    out = run_auction(offers, 0.5, 1.0, False, tie_draw=0.9)
    assert out.price == 4.0  # the other tied bid sets the second price


# -- faults, traffic, terms ----------------------------------------------------------------------------------------
def test_fault_draws():
    faults = Faults(delay_s=2.0, late=0.1, lost=0.2, duplicate=0.3)
    assert faults.notice(0.1, 0.9, 0.5).lost and not faults.notice(0.2, 0.9, 0.5).lost
    assert faults.notice(0.9, 0.29, 0.5).duplicate and not faults.notice(0.9, 0.3, 0.5).duplicate
    assert 60 <= faults.delay(0.05) <= 600 and faults.delay(0.1) == 0.0 and faults.delay(0.99) < 60
    assert faults.retries() == 6
    with pytest.raises(ValueError, match="lost"):
        Faults(lost=1.5)


def test_traffic_is_a_function_of_the_seed(market):
    def bodies(seed):
        traffic = Traffic(market, seed, START, 0.2, 3000, 720, 300, 1, [])
        return [traffic.imp(n).body for n in range(len(traffic))]

    first = bodies(3)
    assert len(first) == 300 and first == bodies(3) and first != bodies(4)
    request = json.loads(first[0])
    assert request["imp"][0]["banner"]["w"] and request["user"]["id"] and request["device"]["ua"]
    assert request["at"] in (1, 2) and request["tmax"] > 0 and request["cur"] == ["USD"]
    assert any("app" in json.loads(b) for b in first) and any("site" in json.loads(b) for b in first)
    users = [json.loads(b)["user"]["id"] for b in first]
    assert len(set(users)) < len(users)  # users come back


def test_the_day_has_a_shape():
    times = arrival_times(1, START, 24, 10.0, None)
    per_hour = [((times >= START + h * 3600) & (times < START + (h + 1) * 3600)).sum() for h in range(24)]
    assert per_hour[20] > 5 * per_hour[4]  # evening peak, quiet night
    assert abs(sum(hourly_share(START, 24)) - 1.0) < 1e-9
    saturday = arrival_times(1, START + 4 * 86400, 24, 10.0, None)
    assert len(saturday) < 0.9 * len(times)


def test_terms_read_value_budget_caps_and_deals(tmp_path):
    terms = read_terms(CATALOG)
    assert terms.campaigns["c1458"].value_per_click == 1.2 and terms.campaigns["c1458"].budget is None
    assert terms.campaign_of(None, CREATIVE).id == "c1458" and ("AB-Agency1-0001", "Agency1") in terms.deals
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"campaigns": [{"id": "a", "value_per_click": 1, "creatives": [{"id": "x"}],
                                               "budget": {"daily": 24, "total": 100, "timezone": "UTC"},
                                               "frequency_cap": [{"count": 1, "seconds": 3600}]}]}))
    a = read_terms(path).campaigns["a"]
    assert a.budget["daily"] == 24 and a.caps[0].scope == "campaign"
    path.write_text(json.dumps({"campaigns": [{"id": "a", "value_per_click": 1, "frequency_cap": [{"count": 0}]}]}))
    with pytest.raises(TermsError, match=r"frequency_cap\[0\].count"):
        read_terms(path)


def test_cap_violations_count_billed_impressions_beyond_the_cap(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"campaigns": [{"id": "a", "value_per_click": 1, "creatives": [{"id": "x"}],
                                               "frequency_cap": [{"count": 2, "seconds": 600}]}]}))
    stats = BidderStats("u", 1)
    c = stats.campaign("a", read_terms(path).campaigns["a"])
    for t in (0, 10, 20, 700, 1400, 1410, 1420):
        stats.count_cap_violation(c, user=7, time=t, crid="x")
    stats.count_cap_violation(c, user=8, time=30, crid="x")
    assert c.cap_violations == 2  # t=20 (third in 600 s) and t=1420


# -- a scripted bidder over real HTTP -------------------------------------------------------------------------
class ScriptedBidder:
    """Bids ``price`` on every imp with local nurl/burl/lurl; refuses notices it cannot match to a bid it
    made at that price; answers each first billing notice 500 when ``fail_first_bill``; sleeps ``delay_s``
    before answering bid requests."""

    def __init__(self, price: float = 5.0, fail_first_bill: bool = False, delay_s: float = 0.0, clock=None):
        self.price, self.fail_first_bill, self.delay_s = price, fail_first_bill, delay_s
        self.bids: dict[str, float] = {}
        self.notices: list[tuple[str, dict]] = []
        self.billed: set[str] = set()
        self.seen_bills: set[str] = set()
        self.holder = reserve_port()
        self.port = self.holder.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/bid/{{exchange}}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/bid/{exchange}", self.bid)
        for kind in ("win", "bill", "loss", "click"):
            app.router.add_get(f"/{kind}", self.notice)
        return app

    async def bid(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        base = f"http://127.0.0.1:{self.port}"
        query = "id=${AUCTION_ID}&bid=${AUCTION_BID_ID}&imp=${AUCTION_IMP_ID}&price=${AUCTION_PRICE}"
        price = max(self.price, body["imp"][0]["bidfloor"])
        self.bids[body["id"]] = price
        bid = {"id": f"b-{body['id']}", "impid": "1", "price": price, "adid": "ad1", "crid": CREATIVE, "cid": "c1458",
               "nurl": f"{base}/win?{query}", "burl": f"{base}/bill?{query}",
               "lurl": f"{base}/loss?id=${{AUCTION_ID}}&loss=${{AUCTION_LOSS}}&min=${{AUCTION_MIN_TO_WIN}}",
               "adm": f'<a href="{base}/click?id={body["id"]}"><img src="x"></a>', "w": 300, "h": 250}
        return web.json_response({"id": body["id"], "seatbid": [{"seat": "s1", "bid": [bid]}], "cur": "USD"})

    async def notice(self, request: web.Request) -> web.Response:
        kind, q = request.path.strip("/"), dict(request.query)
        self.notices.append((kind, q))
        if kind in ("win", "bill"):
            made = self.bids.get(q.get("id"))
            if made is None or q.get("bid") != f"b-{q.get('id')}" or float(q.get("price", "inf")) > made:
                return web.Response(status=400, text="unknown bid or wrong price")
        if kind == "bill":
            if self.fail_first_bill and q["id"] not in self.seen_bills:
                self.seen_bills.add(q["id"])
                return web.Response(status=500)
            self.billed.add(q["id"])  # a repeat is answered 200 too: billing is idempotent
        return web.Response(status=200)


@contextmanager
def serving(app: web.Application, port: int, holder):
    """Serve ``app`` on 127.0.0.1:``port`` from a thread with a loop of its own."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True, reuse_port=True)
    loop.run_until_complete(site.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.run_until_complete(runner.cleanup())
        loop.close()
        holder.close()


def day(bidders, faults=NO_FAULTS, hours=1.0, rate=300.0, speed=3600.0, requests=None, seed=1, **kw):
    return ExchangeConfig(bidders=tuple(bidders), campaigns=CATALOG, start=START, speed=speed, hours=hours,
                          requests=requests, rate=rate, seed=seed, world_seed=5, world_rows=8_000, faults=faults, **kw)


def without_timing(report: dict) -> dict:
    out = {k: v for k, v in report.items() if k not in TIMING_KEYS}
    out["config"] = {k: v for k, v in report["config"].items() if k != "anchor"}
    out["bidders"] = {url: {k: v for k, v in b.items() if k not in ("latency_ms", "notice_latency_ms")} for url, b in report["bidders"].items()}
    return out


def test_a_day_against_a_scripted_bidder_charges_notifies_and_clicks(market):
    bidder = ScriptedBidder(price=5.0)
    with serving(bidder.app(), bidder.port, bidder.holder):
        report, _ = run_exchange(day([bidder.url], faults=NO_FAULTS), market=market)
    b = report["bidders"][bidder.url]
    assert report["requests"] == b["requests"] > 100 and b["timeouts"] == 0 and b["errors"] == 0
    assert b["bids"] == b["requests"] and 0 < b["wins"] < b["bids"]
    assert b["bills"] == b["wins"] and b["creative"]["adm"] == b["wins"]
    kinds = [k for k, _ in bidder.notices]
    assert kinds.count("win") == kinds.count("bill") == b["wins"] and kinds.count("loss") == b["bids"] - b["wins"]
    assert b["notices"]["sent"] == b["notices"]["answered"] == len(bidder.notices) - kinds.count("click")
    assert b["notices"]["refused"] == 0 and b["notices"]["unreachable"] == 0
    # what the exchange charged is what the billing notices said, and never more than the bids
    billed = sum(float(q["price"]) for k, q in bidder.notices if k == "bill") / 1000
    assert b["spend"] == pytest.approx(billed, abs=1e-5) and b["spend"] <= b["wins"] * 5.0 / 1000
    losses = [q for k, q in bidder.notices if k == "loss"]
    assert {q["loss"] for q in losses} <= {"100", "102"} and all(float(q["min"]) > 0 for q in losses)
    c = b["campaigns"]["c1458"]
    assert c["bills"] == b["bills"] and c["spend"] == b["spend"] and c["budget"] is None and c["cap_violations"] == 0
    assert 0 < c["value"] and c["surplus"] == pytest.approx(c["value"] - c["spend"], abs=1e-5)
    assert sum(h["spend"] for h in c["hourly"]) == pytest.approx(c["spend"], abs=1e-5)
    assert kinds.count("click") == b["clicks_sent"] == b["clicks"]
    assert not report["partial"] and report["config"]["seed"] == 1 and report["rate_rps"] > 0


def test_duplicates_retries_and_forgeries_are_sent_and_counted(market):
    bidder = ScriptedBidder(price=5.0, fail_first_bill=True)
    faults = Faults(delay_s=1.0, late=0.0, lost=0.0, duplicate=1.0, unrendered=0.0, forged=1.0)
    with serving(bidder.app(), bidder.port, bidder.holder):
        report, _ = run_exchange(day([bidder.url], faults=faults, requests=150), market=market)
    n = report["bidders"][bidder.url]["notices"]
    wins = report["bidders"][bidder.url]["wins"]
    first_sends = sum(n["by_kind"].values())
    assert wins > 10 and n["duplicates_sent"] == first_sends  # every genuine notice was sent twice
    assert n["retries_sent"] == n["by_kind"]["bill"]  # each first billing notice failed once, then succeeded
    # a forgery per win (replays need an earlier notice), the replays counted apart from the altered ones
    assert n["forged_sent"] + n["replays_sent"] > 0.8 * wins and n["replays_sent"] > 0
    assert n["forged_refused"] + n["forged_accepted"] == n["forged_sent"] and n["forged_refused"] > 0
    assert n["sent"] == first_sends + n["duplicates_sent"] + n["retries_sent"] + n["forged_sent"] + n["replays_sent"]
    assert n["refused"] >= n["by_kind"]["bill"]  # the failed first bills


def test_lost_notices_and_unrendered_wins(market):
    bidder = ScriptedBidder(price=5.0)
    faults = Faults(delay_s=0.0, late=0.0, lost=1.0, duplicate=0.0, unrendered=1.0, forged=0.0)
    with serving(bidder.app(), bidder.port, bidder.holder):
        report, _ = run_exchange(day([bidder.url], faults=faults, requests=100), market=market)
    b = report["bidders"][bidder.url]
    assert b["wins"] > 0 and b["bills"] == 0 and b["spend"] == 0 and b["unrendered"] == b["wins"]
    assert b["notices"]["sent"] == 0 and b["notices"]["lost"] == b["requests"]  # every win and loss notice
    assert bidder.notices == []


def test_late_answers_are_no_bids(market):
    bidder = ScriptedBidder(price=5.0, delay_s=0.2)  # every exchange's tmax is under 200 ms
    with serving(bidder.app(), bidder.port, bidder.holder):
        report, _ = run_exchange(day([bidder.url], requests=30, rate=100), market=market)
    b = report["bidders"][bidder.url]
    assert b["timeouts"] == b["requests"] == 30 and b["bids"] == b["wins"] == 0


def test_two_bidders_compete_and_the_same_seed_gives_the_same_day(market):
    high, low = ScriptedBidder(price=6.0), ScriptedBidder(price=4.0)
    faults = Faults(delay_s=1.0, late=0.05, lost=0.05, duplicate=0.05, unrendered=0.1, forged=0.05)
    with serving(high.app(), high.port, high.holder), serving(low.app(), low.port, low.holder):
        first, _ = run_exchange(day([high.url, low.url], faults=faults, requests=250), market=market)
        again, _ = run_exchange(day([high.url, low.url], faults=faults, requests=250), market=market)
        other, _ = run_exchange(day([high.url, low.url], faults=faults, requests=250, seed=2), market=market)
    assert without_timing(first) == without_timing(again)
    assert without_timing(first)["bidders"] != without_timing(other)["bidders"]
    h, lo = first["bidders"][high.url], first["bidders"][low.url]
    assert h["wins"] > 0 and lo["wins"] == 0 and lo["bids"] == h["bids"] == first["requests"]
    # the low bidder is told it lost to a higher bid, and what would have won: the high bid's second price
    losses = [q for k, q in low.notices if k == "loss"]
    assert losses and {q["loss"] for q in losses} == {"102"} and all(float(q["min"]) >= 4.0 for q in losses)


def test_the_bidders_clock_agrees_with_the_exchange_within_a_simulated_second(small_bundle, market, monkeypatch):
    """The bidder's engine reads the simulated time of every request from its own Clock (Config.clock, as
    ``bidder serve --clock-*`` builds it); the exchange's clock, built from the same options, reads the same
    time at the same instant, and the time the bidder prices a request at trails the exchange's send time
    by the wire's latency only."""
    import statistics

    import bidder.engine
    from bidder.__main__ import _parser, simulated_clock
    from bidder.app import Config, create_app

    read = {}
    fields = bidder.engine.request_fields

    def spy(request, exchange, now=None, **kw):
        read[request.id] = (now, time.time())
        return fields(request, exchange, now=now, **kw)

    monkeypatch.setattr(bidder.engine, "request_fields", spy)
    speed, anchor = 120.0, round(time.time() + 2.0, 3)
    args = _parser().parse_args(["serve", "--clock-start", "2026-12-01T00:00:00Z", "--clock-speed", str(speed),
                                 "--clock-anchor", str(anchor)])
    bidder_clock = simulated_clock(args)
    assert bidder_clock == Clock(start=START, speed=speed, anchor=anchor)
    holder = reserve_port()
    port = holder.getsockname()[1]
    url = f"http://127.0.0.1:{port}/bid/{{exchange}}"
    with serving(create_app(Config(model=small_bundle, clock=bidder_clock)), port, holder):
        report, sends = run_exchange(day([url], hours=0.5, rate=150, speed=speed, anchor=anchor), record_sends=True,
                                     market=market)
    exchange_clock = Clock(start=START, speed=speed, anchor=report["clock"]["anchor"])
    assert len(sends) == report["requests"] > 100 and set(read) == {rid for rid, _ in sends}
    # the same instant, read twice a few microseconds apart (x speed): a busy host may preempt the thread between
    # the two reads now and then (a millisecond is 0.12 simulated seconds here), never for a simulated second
    skews = [abs(now - exchange_clock.at(wall)) for now, wall in read.values()]
    assert statistics.median(skews) < 0.05 and max(skews) < 1.0, (statistics.median(skews), max(skews))
    gaps = [read[rid][0] - sent for rid, sent in sends]
    assert min(gaps) >= 0 and statistics.median(gaps) < 1.0, (min(gaps), statistics.median(gaps), max(gaps))
    assert report["bidders"][url]["bids"] > 0


# -- real bidders, as processes ---------------------------------------------------------------------------------
def test_a_short_day_against_the_default_bidder(shipped_market):
    # the shared clock starts 8 s from now: the bidder is ready well before (about 2 s)
    anchor = time.time() + 8.0
    with Server("--clock-start", "2026-12-01T06:00:00Z", "--clock-speed", "720", "--clock-anchor", str(anchor)) as server:
        server.wait_ready()
        url = f"http://127.0.0.1:{server.port}/bid/{{exchange}}"
        config = day([url], faults=Faults(), hours=0.5, rate=400, speed=720.0, anchor=anchor, seed=3)
        config = ExchangeConfig(**{**config.__dict__, "start": parse_time("2026-12-01T06:00:00Z"),
                                   "world_seed": 2013, "world_rows": 1_000_000})
        report, _ = run_exchange(config, market=shipped_market)
        server.stop()
    b = report["bidders"][url]
    assert report["requests"] == b["requests"] > 300 and b["errors"] == 0 and b["invalid"] == 0
    assert b["bids"] > 0.5 * b["requests"] and 0 < b["wins"] <= b["bids"] and b["bills"] > 0 and b["spend"] > 0
    assert b["value"] > 0 and b["unknown_creatives"] == 0
    assert set(b["campaigns"]) <= set(read_terms(CATALOG).campaigns)
    # without --notice-url the win notices go to the catalog's placeholder host (not fetched); the markup comes
    # inline, as adm
    assert b["notices"]["unreachable"] >= b["wins"] and b["notices"]["sent"] == 0
    assert b["creative"]["adm"] == b["wins"]
    assert len(b["hourly"]) == 1 and b["hourly"][0]["win_rate"] is not None


def test_the_fastapi_baseline_bids_through_it_too(shipped_market):
    for module in ("fastapi", "uvicorn", "orjson", "mmh3"):
        pytest.importorskip(module)
    holder = reserve_port()
    port = holder.getsockname()[1]
    holder.close()
    process = subprocess.Popen([sys.executable, "-m", "bench.baseline", "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                import urllib.request
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, "the baseline did not start"
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}/bid/{{exchange}}"
        config = ExchangeConfig(**{**day([url], requests=200, rate=200, speed=720.0).__dict__,
                                   "world_seed": 2013, "world_rows": 1_000_000})
        report, _ = run_exchange(config, market=shipped_market)
    finally:
        process.terminate()
        process.wait(timeout=20)
    b = report["bidders"][url]
    assert b["bids"] > 100 and b["wins"] > 0 and b["errors"] == 0 and b["invalid"] == 0


# -- the command line -----------------------------------------------------------------------------------------
def test_the_command_writes_a_report_and_a_plot(tmp_path, market, monkeypatch, capsys):
    import bench.exchange.cli as cli

    monkeypatch.setattr(cli, "Market", lambda *a: market)
    bidder = ScriptedBidder(price=5.0)
    out = tmp_path / "day.json"
    with serving(bidder.app(), bidder.port, bidder.holder):
        status = main(["--bidder", bidder.url, "--hours", "0.05", "--speed", "3600", "--rate", "300",
                       "--no-progress", "--out", str(out)])
    assert status == 0
    report = json.loads(out.read_text())
    assert report["bidders"][bidder.url]["wins"] > 0 and out.with_suffix(".png").stat().st_size > 10_000
    assert "requests/s" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--bidder", "http://10.1.2.3/bid"], "on this machine"),
    (["--bidder", "http://127.0.0.1:1/bid", "--anchor", "2020-01-01T00:00:00Z"], "in the past"),
    (["--bidder", "http://127.0.0.1:1/bid", "--campaigns", "/nonexistent.json"], "cannot read"),
])
def test_bad_options_are_one_error_line(argv, message, capsys, market, monkeypatch):
    import bench.exchange.cli as cli

    monkeypatch.setattr(cli, "Market", lambda *a: market)
    assert main(argv + ["--no-progress", "--requests", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


def test_bad_fault_rates_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--bidder", "http://127.0.0.1:1/bid", "--lost", "2"])
    assert exit_.value.code == 2 and "from 0 to 1" in capsys.readouterr().err


def test_the_constant_bidder_answers_every_notice(market):
    from bench.exchange.constant import serve

    holder = reserve_port()
    port = holder.getsockname()[1]
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(serve("127.0.0.1", port, 5.0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}/bid/{{exchange}}"
    try:
        report, _ = run_exchange(day([url], faults=Faults(), requests=200), market=market)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        server.close()
        loop.close()
        holder.close()
    b = report["bidders"][url]
    n = b["notices"]
    assert b["bids"] == b["requests"] == report["requests"] > 100
    assert b["wins"] > 0 and n["by_kind"]["win"] > 0 and n["by_kind"]["loss"] > 0
    assert n["answered"] == n["sent"] - n["forged_sent"] - n["replays_sent"] - n["failed"] and n["refused"] == 0

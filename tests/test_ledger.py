"""The spend ledger: leases, reservations, notices and expiry, on both bankers (embedded SQLite, real Redis)."""
from __future__ import annotations

import datetime as dt
import os
import random
import signal
import subprocess
import sys
import textwrap
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bidder.campaigns import CampaignTerms
from bidder.ledger import Ledger, campaign_day, nanos, open_banker
from bidder.ledger.book import TOTAL, UNLIMITED, CampaignSync, Reservation, Settlement
from bidder.ledger.embedded import EmbeddedBanker
from bidder.ledger.redis_banker import RedisBanker, RedisNoticeStore

RETENTION_S = 3600.0
NOON = dt.datetime(2026, 12, 7, 12, tzinfo=dt.timezone.utc).timestamp()
CPM_1 = 1_000_000  # a 1 USD CPM bid: its impression costs a thousandth of a USD, 10^6 nano-USD


class Clock:
    """The engine's clock, moved by hand."""

    def __init__(self, now: float = NOON):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["embedded", "redis"])
def bankers(request, tmp_path):
    """Makes bankers of one back end sharing one set of accounts (as the workers of one machine, or the machines
    of one Redis, share them)."""
    if request.param == "embedded":
        made = lambda: EmbeddedBanker(tmp_path / "state", RETENTION_S)  # noqa: E731
        made.server = None
    else:
        server = request.getfixturevalue("redis_server")
        made = lambda: RedisBanker(server.url, RETENTION_S)  # noqa: E731
        made.server = server
    made.kind = request.param
    return made


def _terms(campaign="c", total=None, daily=None, timezone="UTC", **more):
    return CampaignTerms(campaign, total_usd=total, daily_usd=daily, timezone=ZoneInfo(timezone), **more)


def _ledger(banker, clock, *terms, **options) -> Ledger:
    options.setdefault("lease_fraction", 0.01)
    options.setdefault("min_lease_usd", 0.0)
    ledger = Ledger(banker, clock, refresh_s=3600, grace_s=0.0, **options)
    ledger.use_terms(terms)
    return ledger


def _spend(ledger: Ledger, slot: int, amount: int, prefix: str, clock: Clock, window: float = 60.0) -> list[str]:
    """Reserve bids of ``amount`` until the lease says no; their ids."""
    ids = []
    while ledger.reserve(slot, amount, f"{prefix}{len(ids)}", clock(), window):
        ids.append(f"{prefix}{len(ids)}")
    return ids


def _accounts(banker, campaign="c", day="2026-12-07"):
    return banker.accounts(campaign, day)


def test_a_lease_is_reserved_from_until_it_runs_out_and_bills_commit_the_clearing_price(bankers):
    clock = Clock()
    ledger = _ledger(bankers(), clock, _terms(total=1.0))  # leases of 1 % of 1 USD: ten 1 USD-CPM bids
    assert ledger.refresh() and ledger.available(0) == nanos(0.01)
    bids = _spend(ledger, 0, CPM_1, "b", clock)
    assert len(bids) == 10 and ledger.available(0) == 0
    for bid in bids[:4]:  # cleared at half the bid
        ledger.settle("bill", bid, "c", CPM_1 // 2, CPM_1, clock(), 60)
    for bid in bids[4:6]:
        ledger.settle("loss", bid, "c", None, CPM_1, clock(), 60)
    assert ledger.refresh()
    (spent, reserved, leased), (day_spent, _, _) = _accounts(ledger.banker)
    assert spent == day_spent == 4 * CPM_1 // 2
    assert reserved == 4 * CPM_1  # four bids still wait for their notices
    # topped up again: to twice what the worker reserved since its last call, its pace
    assert leased == ledger.available(0) == 2 * nanos(0.01)
    assert ledger.spent_today(0) == 0.002 and ledger.remaining(0) == pytest.approx(0.998)
    assert ledger.refresh() and ledger.available(0) == nanos(0.01)  # nothing reserved meanwhile: the base lease
    assert _accounts(ledger.banker)[0][2] == nanos(0.01)


def test_two_workers_never_lease_more_than_the_budget_and_spend_it_to_the_nano(bankers):
    clock = Clock()
    budget = 0.05  # fifty 1 USD-CPM impressions
    ledgers = [_ledger(bankers(), clock, _terms(daily=budget), lease_fraction=0.1, holder=f"w{i}") for i in (0, 1)]
    for _ in range(20):
        for i, ledger in enumerate(ledgers):
            ledger.refresh()
            for bid in _spend(ledger, 0, CPM_1, f"{i}-{ledger.calls}-", clock):
                ledger.settle("bill", bid, "c", CPM_1, CPM_1, clock(), 60)
            spent, reserved, leased = _accounts(ledger.banker)[1]
            assert spent + reserved + leased <= nanos(budget)
    for ledger in ledgers:
        ledger.refresh()
    (spent, reserved, leased), day = _accounts(ledgers[0].banker)
    assert spent == day[0] == nanos(budget) and reserved == 0 and leased == 0
    assert not any(ledger.reserve(0, CPM_1, "more", clock(), 60) for ledger in ledgers)


def test_expiry_releases_a_silent_bid_and_commits_a_win_without_a_bill_at_its_price(bankers):
    clock = Clock()
    ledger = _ledger(bankers(), clock, _terms(total=1.0), lease_fraction=0.004)  # four bids
    ledger.refresh()
    silent, won, late, lost = _spend(ledger, 0, CPM_1, "x", clock, window=30.0)
    ledger.settle("win", won, "c", 700_000, CPM_1, clock(), 30)
    ledger.settle("loss", lost, "c", None, CPM_1, clock(), 30)
    ledger.refresh()
    assert _accounts(ledger.banker)[0][:2] == (0, 3 * CPM_1)  # silent, won, late reserved; lost released
    clock.now += 31
    ledger.refresh()
    spent, reserved, _ = _accounts(ledger.banker)[0]
    assert (spent, reserved) == (700_000, 0)  # the win charged at its price, the silent ones released
    ledger.settle("bill", late, "c", 400_000, CPM_1, clock.now - 31, 30)  # after its reservation was released
    ledger.settle("bill", won, "c", 650_000, CPM_1, clock.now - 31, 30)  # the win's bill: its true price
    ledger.settle("bill", won, "c", 650_000, CPM_1, clock.now - 31, 30)  # a retry changes nothing
    ledger.refresh()
    assert _accounts(ledger.banker)[0][:2] == (400_000 + 650_000, 0)
    ledger.settle("bill", silent, "c", None, CPM_1, clock.now - 31, 30)  # a bill without a price: the bid's
    ledger.refresh()
    assert _accounts(ledger.banker)[0][0] == 400_000 + 650_000 + CPM_1


def test_a_notice_that_beats_its_bid_report_to_the_banker_is_counted_once(bankers):
    """Worker B receives the bill of worker A's bid before A has told the banker of the bid."""
    clock = Clock()
    a, b = (_ledger(bankers(), clock, _terms(total=1.0), holder=h) for h in ("a", "b"))
    a.refresh(), b.refresh()
    bid = "early"
    assert a.reserve(0, 600_000, bid, clock(), 60)
    b.settle("bill", bid, "c", 500_000, 600_000, clock(), 60)
    b.refresh()
    assert _accounts(b.banker)[0][:2] == (500_000, 0)
    a.refresh()  # the report of the bid returns its reservation to A's lease: nothing is held twice
    spent, reserved, leased = _accounts(a.banker)[0]
    assert (spent, reserved) == (500_000, 0) and leased == a.available(0) + b.available(0)


def test_the_day_resets_in_the_campaigns_time_zone_once(bankers):
    clock = Clock(dt.datetime(2026, 12, 7, 23, 0, tzinfo=ZoneInfo("America/New_York")).timestamp())
    ledger = _ledger(bankers(), clock, _terms(daily=0.01, timezone="America/New_York"), lease_fraction=1.0)
    ledger.refresh()
    for bid in _spend(ledger, 0, CPM_1, "d1-", clock):
        ledger.settle("bill", bid, "c", CPM_1, CPM_1, clock(), 60)
    ledger.refresh()
    assert ledger.available(0) == 0 and ledger.spent_today(0) == 0.01  # the day's budget is spent
    clock.now += 1800  # 23:30 in New York (04:30 UTC: another day in UTC, not in the campaign's zone)
    ledger.refresh()
    assert ledger.available(0) == 0
    clock.now += 3600  # 00:30: a new day
    ledger.refresh()
    assert ledger.available(0) == nanos(0.01) and ledger.spent_today(0) == 0.0
    clock.now -= 3600  # the clock jumps back to yesterday: that day's budget is spent, the lease is taken back
    ledger.refresh()
    assert ledger.available(0) == 0 and ledger.spent_today(0) == 0.01
    # taken back, it stays counted as leased until the worker's next call confirms what it gave back
    assert _accounts(ledger.banker, day="2026-12-07")[1] == (nanos(0.01), 0, nanos(0.01))
    ledger.refresh()
    assert _accounts(ledger.banker, day="2026-12-07")[1] == (nanos(0.01), 0, 0)
    clock.now += 7200  # the 8th again: its budget, once
    ledger.refresh()
    ((spent, _, leased), today) = _accounts(ledger.banker, day="2026-12-08")
    assert spent == nanos(0.01) and today == (0, 0, nanos(0.01)) and leased == nanos(0.01)
    assert ledger.available(0) == nanos(0.01)


def test_a_restart_keeps_the_spend(bankers):
    clock = Clock()
    ledger = _ledger(bankers(), clock, _terms(total=0.02, daily=0.01), lease_fraction=1.0)
    ledger.refresh()
    for bid in _spend(ledger, 0, CPM_1, "r", clock):
        ledger.settle("bill", bid, "c", CPM_1, CPM_1, clock(), 60)
    ledger.close()  # reports the bills, gives the lease back
    if bankers.server is not None:
        bankers.server.restart()
    again = _ledger(bankers(), clock, _terms(total=0.02, daily=0.01), lease_fraction=1.0)
    again.refresh()
    assert again.spent_today(0) == 0.01 and again.available(0) == 0  # today's budget is spent
    clock.now += 86400
    again.refresh()
    assert again.available(0) == nanos(0.01) and again.remaining(0) == pytest.approx(0.01)


def test_a_killed_worker_s_lease_is_counted_and_never_granted_again(bankers, tmp_path):
    """A worker process takes a lease, reserves from it and is killed with SIGKILL: its lease stays leased."""
    url = None if bankers.server is None else bankers.server.url
    script = textwrap.dedent(f"""
        import sys, time
        from zoneinfo import ZoneInfo
        from bidder.campaigns import CampaignTerms
        from bidder.ledger import Ledger, open_banker
        ledger = Ledger(open_banker({url!r}, {str(tmp_path / "state")!r}, 3600.0), {NOON!r}, refresh_s=3600,
                        lease_fraction=0.5, min_lease_usd=0.0, holder="doomed")
        ledger.use_terms([CampaignTerms("c", total_usd=0.01)])
        ledger.refresh()
        assert ledger.reserve(0, {CPM_1}, "doomed-1", {NOON}, 60)
        ledger.refresh()
        assert ledger.reserve(0, {CPM_1}, "doomed-2", {NOON}, 60)  # never reported
        print("leased", flush=True)
        time.sleep(600)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), *sys.path]))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "leased"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    clock = Clock()
    survivor = _ledger(bankers(), clock, _terms(total=0.01), lease_fraction=1.0, holder="survivor")
    survivor.refresh()
    # the dead worker reported one bid (reserved) and was topped up to 0.005 USD again, one bid of which it
    # reserved without reporting: the banker counts all 0.005 as leased to it, for good
    assert survivor.available(0) == nanos(0.004)
    spent, reserved, leased = _accounts(survivor.banker)[0]
    assert (reserved, leased) == (CPM_1, nanos(0.005) + nanos(0.004))
    clock.now += 120
    survivor.refresh()  # the reported bid expires (released): its amount is free again; the lease is not
    assert survivor.available(0) == nanos(0.004) + CPM_1


def test_the_banker_down_leases_still_bid_then_stop_and_bidding_resumes_when_it_returns(redis_server):
    clock = Clock()
    ledger = _ledger(RedisBanker(redis_server.url, RETENTION_S), clock, _terms(total=1.0))
    assert ledger.refresh() and ledger.connected
    redis_server.stop()
    bids = _spend(ledger, 0, CPM_1, "down", clock)  # the lease held: ten bids, no waiting on the banker
    assert len(bids) == 10
    for bid in bids[:3]:
        ledger.settle("bill", bid, "c", CPM_1, CPM_1, clock(), 60)
    assert not ledger.refresh() and not ledger.connected
    assert not ledger.reserve(0, CPM_1, "down-more", clock(), 60)  # no lease left: no bid
    redis_server.restart()
    assert ledger.refresh() and ledger.connected
    assert ledger.available(0) == 2 * nanos(0.01)  # topped up to its pace, and what was queued reached the banker
    assert _accounts(ledger.banker)[0][:2] == (3 * CPM_1, 7 * CPM_1)


def test_notices_of_campaigns_without_budget_or_caps_never_reach_the_banker(tmp_path):
    ledger = _ledger(EmbeddedBanker(tmp_path, RETENTION_S), Clock(), _terms(total=1.0))
    ledger.settle("bill", "elsewhere-1", "unbudgeted", CPM_1, CPM_1, NOON, 60)
    ledger.settle("bill", "here-1", "c", CPM_1, CPM_1, NOON, 60)
    assert [s.bid_id for s in ledger._settlements] == ["here-1"]


def test_the_embedded_banker_is_the_default_and_redis_urls_are_checked(tmp_path):
    assert isinstance(open_banker(None, tmp_path, RETENTION_S), EmbeddedBanker)
    with pytest.raises(ValueError, match="expected a Redis URL such as redis://"):
        open_banker("http://127.0.0.1:6379/0", tmp_path, RETENTION_S)


def test_notice_dedup_in_redis_counts_a_notice_once(redis_server):
    stores = [RedisNoticeStore(redis_server.url, 600), RedisNoticeStore(redis_server.url, 600)]
    assert stores[0].first_time("b1", "bill", NOON, NOON)
    assert not stores[1].first_time("b1", "bill", NOON, NOON + 5)
    assert stores[1].first_time("b1", "win", NOON, NOON + 5)
    ttl = stores[0].client.ttl("bidder:notice:b1:bill")
    assert 600 < ttl <= 600 + 3600
    # a loop turn's notices in one round trip: a repeat within it, or of an earlier one, is a repeat
    assert stores[1].first_times([("b2", "bill", NOON), ("b2", "bill", NOON), ("b1", "bill", NOON),
                                  ("b2", "loss", NOON)], NOON + 5) == [True, False, False, True]
    assert 600 < stores[0].client.ttl("bidder:notice:b2:loss") <= 600 + 3600


# -- the arithmetic against a plain model of it ----------------------------------------------------------------
class Model:
    """The ledger as a list of bids: spent is the sum of what each bid is charged, reserved the sum of what the
    bids still waiting hold, leased what each holder holds. Nothing is carried from call to call but the bids."""

    def __init__(self, budget: int):
        self.budget = budget
        self.bids: dict[str, dict] = {}
        self.leases = {"a": 0, "b": 0}

    def charge(self, bid: dict) -> int:
        return bid["billed"] if bid["billed"] is not None else (bid["won"] or 0) if bid["expired"] else 0

    def holds(self, bid: dict) -> int:
        settled = bid["billed"] is not None or bid["lost"] or bid["expired"]
        return 0 if settled or not bid["funded"] else bid["amount"]

    def totals(self) -> tuple[int, int, int]:
        return (sum(map(self.charge, self.bids.values())), sum(map(self.holds, self.bids.values())),
                sum(self.leases.values()))


_operations = st.lists(st.one_of(
    st.tuples(st.just("reserve"), st.sampled_from("ab"), st.integers(1, 4) .map(lambda k: k * 250_000)),
    st.tuples(st.just("bill"), st.integers(0, 5), st.integers(0, 1_000_000)),
    st.tuples(st.just("win"), st.integers(0, 5), st.integers(0, 1_000_000)),
    st.tuples(st.just("loss"), st.integers(0, 5), st.just(0)),
    st.tuples(st.just("sync"), st.sampled_from("ab"), st.sampled_from([0, 10, 40])),  # seconds on: expiries
), max_size=60)


_WIN_EXPIRES_THEN_BILLED = [("sync", "a", 0), ("reserve", "a", 500_000), ("win", 0, 400_000), ("sync", "a", 0),
                            ("sync", "a", 40), ("bill", 0, 300_000), ("sync", "a", 0)]
#: a bill relayed by the other holder before the bid's own holder reported it
_BILL_OF_AN_UNREPORTED_BID = [("sync", "a", 0), ("sync", "b", 0), ("reserve", "a", 1_000_000), ("reserve", "b", 250_000),
                              ("sync", "a", 0), ("bill", 1, 1), ("sync", "a", 0)]
#: a win relayed by the other holder after its bid's window, before the bid's own holder reported it
_LATE_WIN_OF_AN_UNREPORTED_BID = [("sync", "a", 0), ("reserve", "a", 250_000), ("sync", "b", 40), ("win", 0, 1),
                                  ("sync", "b", 0)]
_BILL_BEFORE_REPORT = [("sync", "a", 0), ("sync", "b", 0), ("reserve", "a", 750_000), ("bill", 0, 500_000),
                       ("sync", "b", 0), ("sync", "a", 0), ("sync", "a", 40)]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(operations=_WIN_EXPIRES_THEN_BILLED)
@example(operations=_BILL_BEFORE_REPORT)
@example(operations=_LATE_WIN_OF_AN_UNREPORTED_BID)
@example(operations=_BILL_OF_AN_UNREPORTED_BID)
@given(operations=_operations)
def test_the_ledger_arithmetic_matches_a_plain_model(bankers, operations):
    """Reservations, bills (late ones too), wins, losses and expiries in any order, from two holders."""
    banker = bankers()
    if bankers.kind == "redis":
        banker.client.flushdb()
    else:
        for table in ("accounts", "holds", "bids"):
            banker.db.execute(f"DELETE FROM {table}")
    budget = 3_000_000
    model = Model(budget)
    now = NOON
    pending = {"a": [], "b": []}
    notices: list[Settlement] = []
    held = {"a": 0, "b": 0}  # what each holder's lease holds, as the holder counts it
    n = 0
    for op, who, value in operations:
        if op == "reserve" and held[who] >= value:
            bid = f"bid{n}"
            n += 1
            held[who] -= value
            pending[who].append(Reservation(bid, "c", value, now + 30))
            model.bids[bid] = {"amount": value, "funded": False, "expires": now + 30, "billed": None, "won": None,
                               "lost": False, "expired": False, "known": False}
        elif op in ("bill", "win", "loss") and who < n:
            bid = f"bid{who}"
            price = min(value, model.bids[bid]["amount"])
            # a notice's expiry is its bid's (its token's issue time + window), whenever the notice arrives
            notices.append(Settlement(bid, op, "c", price, model.bids[bid]["amount"], "2026-12-07",
                                      model.bids[bid]["expires"]))
        elif op == "sync":
            now += value
            model.leases[who] = held[who]
            for r in pending[who]:
                model.bids[r.bid_id]["funded"] = model.bids[r.bid_id]["known"] = True
            for s in notices:
                bid = model.bids[s.bid_id]
                bid["known"] = True  # the banker knows of a bid from its report or from a notice
                if s.kind == "bill" and bid["billed"] is None:
                    bid["billed"] = s.price
                elif s.kind == "win" and not (bid["billed"] is not None or bid["lost"] or bid["expired"]
                                              or bid["won"] is not None):
                    bid["won"] = s.price
                elif s.kind == "loss" and not (bid["billed"] is not None or bid["lost"] or bid["expired"]
                                               or bid["won"] is not None):
                    bid["lost"] = True
            for bid in model.bids.values():
                if bid["known"] and now >= bid["expires"] and bid["billed"] is None and not bid["lost"]:
                    bid["expired"] = True
            spent, reserved, leased = model.totals()
            want = max(0, min(1_000_000, budget - spent - reserved - leased + held[who]))
            grants = banker.sync(who, now, [CampaignSync("c", "2026-12-07", budget, UNLIMITED, held[who], 1_000_000)],
                                 pending[who], notices)
            pending[who], notices = [], []
            grant = grants["c"]
            held[who] += grant.delta
            if grant.delta >= 0:  # a lease taken back stays counted until the holder's next call
                model.leases[who] = held[who]
            assert held[who] == want
            assert (grant.spent_total, grant.reserved_total, grant.leased_total) == model.totals()
            assert (grant.spent_day,) == (model.totals()[0],)
            # past the budget only by late bills, and for a moment by bills of bids their holder has not reported
            # yet: such a bill is spent while its bid's amount is still inside the holder's lease (counted twice,
            # so less is granted, never more), until the report takes it out
            late = sum(b["billed"] for b in model.bids.values()
                       if b["billed"] is not None and (b["expired"] or not b["funded"]))
            assert sum(model.totals()) <= budget + late
    banker.close()


def test_book_totals_live_under_the_total_account_name():
    assert TOTAL == "T" and UNLIMITED < 0


# -- frequency caps ------------------------------------------------------------------------------------------
def test_frequency_caps_count_billed_impressions_of_a_user_across_workers(bankers):
    from bidder.campaigns import FrequencyCap

    clock = Clock()
    caps = (FrequencyCap(2, 60, "campaign"), FrequencyCap(1, 30, "creative"))
    a, b = (_ledger(bankers(), clock, _terms(total=1.0, frequency_caps=caps), holder=h) for h in ("a", "b"))
    a.refresh(), b.refresh()
    assert a.reserve(0, CPM_1, "u-1", clock(), 60, "user-1", "cr1")
    a.settle("bill", "u-1", "c", CPM_1, CPM_1, clock(), 60)
    a.refresh(), b.refresh()
    assert b.capped(0, "cr1", "user-1", clock())  # the creative's cap: once in 30 s
    assert not b.capped(0, "cr2", "user-1", clock()) and not b.capped(0, "cr1", "user-2", clock())
    # the second impression, billed through B before A reports its bid: counted when the report comes
    assert a.reserve(0, CPM_1, "u-2", clock(), 60, "user-1", "cr2")
    b.settle("bill", "u-2", "c", CPM_1, CPM_1, clock(), 60)
    b.refresh()
    assert not b.capped(0, "cr3", "user-1", clock())
    a.refresh(), b.refresh()
    assert b.capped(0, "cr3", "user-1", clock()) and a.capped(0, "cr3", "user-1", clock())  # the campaign's: 2/60 s
    assert [(i.creative, i.user) for i in a.banker.impressions(0, NOON)] == [("cr1", "user-1"), ("cr2", "user-1")]
    assert a.reserve(0, CPM_1, "anonymous", clock(), 60, "", "cr1")  # no user key: counted nowhere, never capped
    a.settle("bill", "anonymous", "c", CPM_1, CPM_1, clock(), 60)
    clock.now += 31
    a.refresh()
    assert a.capped(0, "cr1", "user-1", clock())  # the campaign's cap still holds
    clock.now += 30
    a.refresh()
    assert not a.capped(0, "cr1", "user-1", clock()) and not a.blocked
    assert a.banker.impressions(0, NOON) == []  # older than the longest window: gone from the log


def test_the_pacing_hook_is_called_after_each_call_that_reached_the_banker(tmp_path):
    clock = Clock()
    ledger = _ledger(EmbeddedBanker(tmp_path, RETENTION_S), clock, _terms(daily=10.0, pacing="even"))
    seen = []

    def pace(ledger: Ledger, now: float) -> None:
        slot = ledger.slots["c"]
        seen.append((now, ledger.spent_today(slot), ledger.daily_budget(slot)))
        ledger.pass_rate[slot] = 0.5

    ledger.on_refresh = pace
    assert ledger.pass_rate == [1.0]
    ledger.refresh()
    assert seen == [(NOON, 0.0, 10.0)] and ledger.pass_rate == [0.5]


_worker_steps = st.lists(st.one_of(
    st.tuples(st.just("bid"), st.sampled_from([0, 1]), st.integers(1, 8).map(lambda k: k * 250_000)),
    st.tuples(st.just("bill"), st.integers(0, 9), st.integers(0, 1_000_000)),
    st.tuples(st.just("loss"), st.integers(0, 9), st.just(0)),
    st.tuples(st.just("refresh"), st.sampled_from([0, 1]), st.sampled_from([0.0, 1.0, 5.0])),
), max_size=50)


def _emptied(bankers):
    """A banker of the fixture's kind with nothing in it (hypothesis runs many examples on one fixture)."""
    banker = bankers()
    if bankers.kind == "redis":
        banker.client.flushdb()
    else:
        for table in ("accounts", "holds", "bids", "impressions"):
            banker.db.execute(f"DELETE FROM {table}")
    return banker


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(steps=[("refresh", 0, 0.0), ("refresh", 1, 0.0), *[("bid", 0, 250_000)] * 14])  # a lease is a bound
@example(steps=[("refresh", 0, 0.0), *[step for k in range(6) for step in  # bills eat the budget: leases shrink
                                       (("bid", 0, 1_000_000), ("bill", k, 1_000_000), ("refresh", 0, 1.0))]])
@given(steps=_worker_steps)
def test_two_workers_leases_never_commit_more_than_the_budget(bankers, steps):
    """Two workers bid (at prices of their own), take bills and losses of each other's bids, refresh in any order.
    At every moment what is committed (the bills, the bids still waiting for theirs, what the leases hold) is within
    the budget, and once both workers have given their leases back the spend is exactly the first bill of each
    billed bid."""
    banker = _emptied(bankers)
    clock = Clock()
    budget = nanos(0.005)
    workers = [_ledger(bankers() if i else banker, clock, _terms(total=0.005), lease_fraction=0.2, holder=f"w{i}")
               for i in (0, 1)]
    bids: list[tuple[str, int]] = []
    billed: dict[str, int] = {}
    settled: set[str] = set()
    for step, who, value in steps:
        if step == "bid":
            bid = f"bid{len(bids)}"
            if workers[who].reserve(0, value, bid, clock(), 600):
                bids.append((bid, value))
        elif step in ("bill", "loss") and who < len(bids):
            bid, amount = bids[who]
            # a bill sent again carries its first price, as an exchange's retries do: which of two workers' copies
            # reaches the banker first is a race, and the spend is then the same either way
            price = billed.get(bid, min(value, amount)) if step == "bill" else min(value, amount)
            workers[len(bids) % 2].settle(step, bid, "c", price, amount, clock(), 600)
            settled.add(bid)
            if step == "bill":
                billed.setdefault(bid, price)
        elif step == "refresh":
            clock.now += value
            workers[who].refresh()
        waiting = sum(amount for bid, amount in bids if bid not in settled)
        held = [worker.available(0) for worker in workers]
        assert min(held) >= 0 and sum(billed.values()) + waiting + sum(held) <= budget
    for worker in workers:
        worker.close()
    (spent, reserved, leased), _ = _accounts(bankers(), day="2026-12-07")
    assert leased == 0 and spent == sum(billed.values())


_NEW_YORK = ZoneInfo("America/New_York")
_LAST_MINUTE = dt.datetime(2026, 12, 6, 23, 59, 30, tzinfo=_NEW_YORK).timestamp()
_day_steps = st.lists(st.one_of(
    st.tuples(st.just("bid"), st.integers(1, 4).map(lambda k: k * 250_000)),
    st.tuples(st.just("refresh"), st.just(0)),
    st.tuples(st.just("tick"), st.sampled_from([1, 20, 45])),
), max_size=60)
# the simulated day's start: a lease granted before midnight, then bids of the new day before the next refresh
_LEASE_THEN_MIDNIGHT = [("refresh", 0), ("tick", 45), *[("bid", 1_000_000)] * 3,
                        *[step for _ in range(6) for step in (("refresh", 0), *[("bid", 1_000_000)] * 3)]]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(steps=_LEASE_THEN_MIDNIGHT)
@given(steps=_day_steps)
def test_a_daily_budget_is_never_overspent_across_midnight_and_each_day_is_charged_its_own_bids(bankers, steps):
    """One worker bids before and after midnight (the campaign's), refreshing at any moment, and every bid is billed
    at its price (no notice lost). The bids made on a day never cost more than the daily budget, and the banker's
    account of each day holds exactly their charges: a lease granted before midnight never pays a bid made after
    it (nor the other way round)."""
    banker = _emptied(bankers)
    clock = Clock(_LAST_MINUTE)
    budget = 0.003
    ledger = _ledger(banker, clock, _terms(daily=budget, timezone="America/New_York"), lease_fraction=0.34)
    billed: dict[str, int] = {}  # the campaign's day -> charges of the bids made on it
    for i, (step, value) in enumerate(steps):
        if step == "bid":
            bid = f"bid{i}"
            if ledger.reserve(0, value, bid, clock(), 600):
                ledger.settle("bill", bid, "c", value, value, clock(), 600)
                day = dt.datetime.fromtimestamp(clock(), _NEW_YORK).strftime("%Y-%m-%d")
                billed[day] = billed.get(day, 0) + value
                assert billed[day] <= nanos(budget)
        elif step == "refresh":
            ledger.refresh()
        else:
            clock.now += value
    ledger.close()
    for day in ("2026-12-06", "2026-12-07"):
        assert _accounts(bankers(), day=day)[1] == (billed.get(day, 0), 0, 0)


def test_a_lease_pays_only_the_bids_of_the_day_it_was_granted_for(tmp_path):
    clock = Clock(_LAST_MINUTE)
    ledger = _ledger(EmbeddedBanker(tmp_path, RETENTION_S), clock, _terms(daily=1.0, timezone="America/New_York"))
    assert not ledger.reserve(0, CPM_1, "before-any-lease", clock(), 60)
    ledger.refresh()
    assert ledger.reserve(0, CPM_1, "last-minute", clock(), 60)
    clock.now += 45  # 00:00:15 in New York: the lease is yesterday's
    assert not ledger.reserve(0, CPM_1, "after-midnight", clock(), 60) and "c" in ledger.paused
    ledger.refresh()  # a lease of the new day
    assert "c" not in ledger.paused and ledger.reserve(0, CPM_1, "after-midnight", clock(), 60)
    assert not ledger.reserve(0, CPM_1, "priced-before-midnight", clock() - 30, 60)
    ledger.refresh()
    assert _accounts(ledger.banker, day="2026-12-06")[1][1] == CPM_1
    assert _accounts(ledger.banker, day="2026-12-07")[1][1] == CPM_1


def test_even_pacing_throttles_a_campaign_spending_ahead_of_its_plan_and_leaves_asap_alone():
    from types import SimpleNamespace

    from bidder.ledger.book import Grant
    from bidder.ledger.pace import EvenPacing

    one_am = 1_796_083_200.0 + 3600  # 2026-12-01T01:00:00Z
    even, asap = _terms(daily=10.0, pacing="even"), _terms("d", daily=10.0, pacing="asap")
    ledger = SimpleNamespace(terms=[even, asap], campaigns=["c", "d"], pass_rate=[1.0, 1.0], view=[None, None])
    pacing = EvenPacing()
    for minutes, spent in ((0, 0.0), (10, 1.0), (20, 2.0), (30, 3.0)):  # a third of the day's budget in 30 min
        ledger.view = [Grant(0, 0, round(spent * 1e9), 0, 0)] * 2
        pacing(ledger, one_am + minutes * 60)
    assert ledger.pass_rate[0] < 0.1 and ledger.pass_rate[1] == 1.0
    ledger.view = [Grant(0, 0, round(3.0 * 1e9), 0, 0)] * 2  # then nothing more spent until 23:00: behind plan
    pacing(ledger, one_am + 22 * 3600)
    assert ledger.pass_rate[0] == 1.0


def _sync(banker, now, reservations=(), settlements=(), holder="h"):
    return banker.sync(holder, now, [CampaignSync("c", "2026-12-07", 10 * CPM_1, UNLIMITED, 0, 0)],
                       list(reservations), list(settlements))


def test_a_clock_set_back_releases_reservations_when_they_fall_due_not_before(bankers):
    """The embedded banker sweeps expired rows in the order they fall due: a clock set back (a bid whose expiry lies
    behind the last sweep) must neither release the bid early nor leave it unswept."""
    banker = bankers()
    _sync(banker, NOON, [Reservation("early", "c", CPM_1, NOON + 30)])
    _sync(banker, NOON + 100)  # swept up to NOON + 100: "early" is released
    assert banker.accounts("c", "2026-12-07")[0][1] == 0
    _sync(banker, NOON + 10, [Reservation("back", "c", CPM_1, NOON + 40)])  # the clock went back 90 s
    assert banker.accounts("c", "2026-12-07")[0][1] == CPM_1  # still reserved: due at NOON + 40
    _sync(banker, NOON + 39)
    assert banker.accounts("c", "2026-12-07")[0][1] == CPM_1
    _sync(banker, NOON + 40)
    assert banker.accounts("c", "2026-12-07")[0][1] == 0
    banker.close()


def test_a_notice_finds_its_bid_by_bid_id_and_expiry(bankers):
    """A bid's report and its notices carry the same expiry (``book.expiry`` of the token's issue time): the bill
    settles the reserved bid, whichever comes first."""
    banker = bankers()
    _sync(banker, NOON, [Reservation("b1", "c", CPM_1, NOON + 30)])
    _sync(banker, NOON + 1, settlements=[Settlement("b1", "bill", "c", CPM_1 // 2, CPM_1, "2026-12-07", NOON + 30),
                                         Settlement("b2", "bill", "c", CPM_1 // 4, CPM_1, "2026-12-07", NOON + 31)])
    _sync(banker, NOON + 2, [Reservation("b2", "c", CPM_1, NOON + 31)])  # its bill came first
    (spent, reserved, _), _ = banker.accounts("c", "2026-12-07")
    assert (spent, reserved) == (CPM_1 // 2 + CPM_1 // 4, 0)
    banker.close()


_LAYOUT_0 = """
CREATE TABLE accounts (campaign TEXT NOT NULL, period TEXT NOT NULL, spent INTEGER NOT NULL DEFAULT 0,
    reserved INTEGER NOT NULL DEFAULT 0, leased INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (campaign, period)) WITHOUT ROWID;
CREATE TABLE holds (holder TEXT NOT NULL, campaign TEXT NOT NULL, lease INTEGER NOT NULL, day TEXT NOT NULL,
    PRIMARY KEY (holder, campaign)) WITHOUT ROWID;
CREATE TABLE bids (bid_id TEXT PRIMARY KEY, campaign TEXT NOT NULL, day TEXT NOT NULL, amount INTEGER NOT NULL,
    funded INTEGER NOT NULL, state TEXT NOT NULL, price INTEGER NOT NULL, expires REAL NOT NULL, user TEXT NOT NULL,
    creative TEXT NOT NULL, due REAL, keep_until REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX bids_due ON bids (due) WHERE due IS NOT NULL;
CREATE INDEX bids_keep ON bids (keep_until);
CREATE TABLE impressions (seq INTEGER PRIMARY KEY AUTOINCREMENT, campaign TEXT NOT NULL, creative TEXT NOT NULL,
    user TEXT NOT NULL, at REAL NOT NULL);
INSERT INTO accounts VALUES ('c', 'T', 0, 2000000, 0), ('c', '2026-12-07', 0, 2000000, 0);
INSERT INTO bids VALUES ('open', 'c', '2026-12-07', 1000000, 1, 'open', 0, {due}, '', '', {due}, {keep});
INSERT INTO bids VALUES ('won', 'c', '2026-12-07', 1000000, 1, 'won', 400000, {due}, '', '', {due}, {keep});
"""


def test_a_ledger_file_of_the_previous_layout_is_converted_with_its_open_bids(tmp_path):
    """A restart on a state directory an earlier bidder wrote keeps its accounts and settles its bids as due."""
    import sqlite3

    db = sqlite3.connect(tmp_path / "ledger.sqlite")
    db.executescript(_LAYOUT_0.format(due=NOON + 30, keep=NOON + 30 + RETENTION_S))
    db.close()
    banker = EmbeddedBanker(tmp_path, RETENTION_S)
    assert banker.db.execute("PRAGMA user_version").fetchone()[0] == 2
    _sync(banker, NOON + 1, settlements=[Settlement("won", "bill", "c", 500_000, CPM_1, "2026-12-07", NOON + 30)])
    assert banker.accounts("c", "2026-12-07")[0][:2] == (500_000, CPM_1)
    _sync(banker, NOON + 30)  # "open" falls due: released
    assert banker.accounts("c", "2026-12-07")[0][:2] == (500_000, 0)
    banker.close()
    banker = EmbeddedBanker(tmp_path, RETENTION_S)  # opened again: nothing to convert
    assert banker.accounts("c", "2026-12-07")[0][:2] == (500_000, 0)
    banker.close()


def test_a_ledger_file_of_a_newer_layout_is_refused(tmp_path):
    import sqlite3

    db = sqlite3.connect(tmp_path / "ledger.sqlite")
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(sqlite3.DatabaseError, match="ledger layout 99 is newer"):
        EmbeddedBanker(tmp_path, RETENTION_S)


def test_a_bid_reported_after_it_fell_due_is_released_at_once(bankers):
    """A report that reaches the banker after its expiry (the banker was out of reach for longer than the window)
    is released by the call that brings it, not left reserved behind the sweep."""
    banker = bankers()
    _sync(banker, NOON + 100)  # the sweep is at NOON + 100
    _sync(banker, NOON + 101, [Reservation("old", "c", CPM_1, NOON + 30)])
    assert banker.accounts("c", "2026-12-07")[0][1] == 0
    banker.close()


@pytest.mark.parametrize("zone", ["UTC", "America/New_York", "America/Santiago", "Asia/Tehran", "Pacific/Apia",
                                  "Australia/Lord_Howe"])
def test_the_cached_day_of_a_notice_is_the_date_in_its_campaigns_zone(zone, tmp_path):
    """``Ledger.day_of`` reuses the bounds of the last day it worked out: across two years of clock changes
    (midnights that do not exist, half-hour shifts, a day skipped) it names the date ``campaign_day`` names, for
    times in order and for times that jump back and forth."""
    ledger = Ledger(EmbeddedBanker(tmp_path, RETENTION_S), 0.0)
    tz = ZoneInfo(zone)
    rng = random.Random(zone)
    t = 1_640_995_200.0  # 2022-01-01 UTC
    for _ in range(12_000):
        t += rng.random() * 3 * 3600
        for when in (t, t - rng.random() * 86_400 * 3):
            assert ledger.day_of(tz, when) == campaign_day(tz, when), (zone, when)


def test_an_embedded_sync_takes_as_many_statements_for_thousands_of_bids_as_for_one(tmp_path):
    """The refresher shares the GIL with the bid path and ``sqlite3`` lets it go at every step of a statement: done
    row by row, a sync of a thousand bids waited for the GIL a thousand times beside a busy event loop (seconds, and
    the leases ran dry). Every bulk read and write is one statement for all its rows (a few for the largest)."""
    banker = EmbeddedBanker(tmp_path / "state", RETENTION_S)
    statements: list[str] = []
    banker.db.set_trace_callback(statements.append)

    def counted(now, reservations=(), settlements=()):
        statements.clear()
        banker.sync("h", now, [CampaignSync(c, "2026-12-07", 10**15, UNLIMITED, 0, 10**12) for c in ("a", "b")],
                    list(reservations), list(settlements))
        return len(statements)

    def bids(prefix, n, expires):
        return [Reservation(f"{prefix}{i}", "ab"[i % 2], CPM_1, expires, f"u{i}", "cr") for i in range(n)]

    def bills(prefix, n, expires):
        return [Settlement(f"{prefix}{i}", "bill", "ab"[i % 2], CPM_1 // 2, CPM_1, "2026-12-07", expires)
                for i in range(n)]

    few = [counted(NOON, bids("x", 1, NOON + 5)), counted(NOON + 1, settlements=bills("x", 1, NOON + 5)),
           counted(NOON + 6)]  # reports, bills (of reported bids), expiry of the unbilled
    many = [counted(NOON + 10, bids("y", 3000, NOON + 15)),
            counted(NOON + 11, settlements=bills("y", 1500, NOON + 15)), counted(NOON + 16)]
    bulk = 3000 // 256 + 8  # 256 rows a statement, the rest in halving sizes: 3000 is 11 x 256 + 128 + 32 + 16 + 8
    assert many[0] <= few[0] + bulk and many[1] <= few[1] + bulk and many[2] == few[2]
    spent, reserved, _ = banker.accounts("a", "2026-12-07")[0]
    assert (spent, reserved) == ((1 + 750) * CPM_1 // 2, 0)  # the bills charged, the rest released at expiry
    banker.close()

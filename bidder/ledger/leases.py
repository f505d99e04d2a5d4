"""A worker's side of the spend ledger: local leases the bid path reserves from, refilled in the background.

The bid path never waits: ``Ledger.reserve`` compares two numbers of the campaign's slot and appends the bid to
a queue. Two lists carry the lease, each written by one thread only, so neither needs a lock: ``granted``
(what the banker handed this worker, written by the refresher) and ``used`` (what the worker's bids reserved,
written by the bid path); what the lease holds is ``granted - used``. The refresher thread calls the banker
every ``refresh_s`` (``Banker.sync``): it reads ``used`` first, then drains the queue, so a bid counted in
``used`` is always among the reservations it reports (a bid reported but not yet in the snapshot is counted
twice for one call: never too little). The banker takes the worker's count of its lease as the truth, so a
reply lost on the way heals at the next call; everything the call carried is sent again until one succeeds.

Notices (``Ledger.settle``) are queued the same way from the notice routes and reach the banker with the next
call, from whichever worker received them.

The pacing hook: ``pass_rate[slot]`` is the probability that a bid of the campaign goes on to reserve (1.0:
every bid, which is ``asap`` pacing and the value until a pacing controller writes it); ``on_refresh`` is called
after every call that reached the banker, and ``spent_today(slot)``, ``daily_budget(slot)`` and ``terms[slot]``
are what a controller reads there.
"""
from __future__ import annotations

import datetime as dt
import logging
import math
import os
import secrets
import socket
import threading
from collections import deque
from typing import Callable, Iterable, Protocol, Sequence

from bidder.campaigns import CampaignTerms
from bidder.clock import millis, read_clock
from bidder.ledger.book import UNLIMITED, CampaignSync, Grant, Impression, Reservation, Settlement, expiry

__all__ = ["Banker", "Ledger", "NANOS_PER_USD", "campaign_day", "nanos"]

log = logging.getLogger("bidder")

NANOS_PER_USD = 1_000_000_000
#: a lease, as a share of the campaign's smallest budget (daily, else total): what one worker may hold
DEFAULT_LEASE_FRACTION = 0.002
#: the smallest lease asked for (USD): two bids at a 1 USD CPM, so that a small budget still bids
DEFAULT_MIN_LEASE_USD = 0.002
#: a lease holds this many of the campaign's largest bid so far, within MAX_LEASE_FRACTION of the budget, and one
#: such bid in any case (a lease that cannot pay a bid is none)
LEASE_BIDS = 4
#: a lease holds twice what the worker reserved in its last interval, up to this share of the budget
MAX_LEASE_FRACTION = 0.05
#: calls to the banker between two sweeps of the users whose impressions all left the longest cap window
SWEEP_EVERY = 240


class Banker(Protocol):
    def sync(self, holder: str, now: float, campaigns: Sequence[CampaignSync], reservations: Sequence[Reservation],
             settlements: Sequence[Settlement]) -> dict[str, Grant]: ...

    def impressions(self, after: int, horizon: float, limit: int = 10_000) -> list[Impression]: ...

    def close(self) -> None: ...


def nanos(usd: float) -> int:
    """USD in integer nano-USD (an impression's cost in nano-USD is its CPM in micro-USD)."""
    return round(usd * NANOS_PER_USD)


def campaign_day(zone: dt.tzinfo, now: float) -> str:
    """The date at ``now`` (Unix seconds) in the campaign's time zone: the name of its daily account."""
    return dt.datetime.fromtimestamp(now, zone).strftime("%Y-%m-%d")


def day_bounds(zone: dt.tzinfo, now: float) -> tuple[float, float, str]:
    """The campaign's day at ``now``: (its first second, the first second of the next day, its name), Unix seconds
    (a day of 23 or 25 hours where the zone changes its clocks)."""
    local = dt.datetime.fromtimestamp(now, zone)
    midnight = dt.datetime(local.year, local.month, local.day, tzinfo=zone)
    return midnight.timestamp(), (midnight + dt.timedelta(days=1)).timestamp(), local.strftime("%Y-%m-%d")


_new_tuple = tuple.__new__

#: the day of a lease the banker has not granted yet: no bid time is in it
NO_DAY = (math.inf, -math.inf, "")


class Ledger:
    """The leases of one worker process, the queue of what the banker must hear, and the refresher thread."""

    def __init__(self, banker: Banker, clock: float | Callable[[], float] | None = None, refresh_s: float = 0.1,
                 grace_s: float = 2.0, lease_fraction: float = DEFAULT_LEASE_FRACTION,
                 min_lease_usd: float = DEFAULT_MIN_LEASE_USD, holder: str | None = None):
        self.banker = banker
        self.clock = clock          # the engine's: days and expiries are on it
        self.refresh_s = refresh_s
        # after a bid's window, before its reservation is settled by the policy: wall seconds (notices travel in
        # wall time), so on the engine's clock the speed of a simulated clock times as many
        self.grace_s = grace_s * (getattr(clock, "speed", 0.0) or 1.0)
        self.lease_fraction = lease_fraction
        self.min_lease = nanos(min_lease_usd)
        # one holder per process start: a killed process's leases stay with its holder, never granted again
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.slots: dict[str, int] = {}          # campaign id -> slot; slots are never reused
        self.campaigns: list[str] = []
        self.terms: list[CampaignTerms | None] = []  # None: no longer in the catalog (its lease goes back)
        self.granted: list[int] = []             # written by the refresher only
        self.used: list[int] = []                # written by the bid path only
        self.largest: list[int] = []             # the largest amount a bid asked of each lease (the bid path's)
        # the day whose account the lease was granted from, per slot: (first second, next day's first second, name),
        # written by the refresher after each call; a bid reserves only from a lease of its own day, so that its
        # spend is charged to that day's budget (one tuple, replaced whole: the bid path reads it in one step)
        self.lease_days: list[tuple[float, float, str]] = []
        self._used_before: list[int] = []        # ``used`` at the refresher's previous call
        self.pass_rate: list[float] = []         # the pacing hook (written by a pacing controller)
        # called by the refresher after each call that reached the banker, with the ledger and the engine's time:
        # where a pacing controller updates ``pass_rate`` from ``spent_today`` (None: pacing off, every rate 1.0)
        self.on_refresh: Callable[[Ledger, float], None] | None = None
        self.view: list[Grant | None] = []       # the accounts after the last call, per slot
        self.cap_hits: list[int] = []            # bids held back by a frequency cap, per slot (this worker)
        # campaigns whose lease could not pay a bid, until the refresher tops it up: the bid path leaves them out
        # of the eligible candidates, so an imp goes to a campaign that can pay (set by the bid path, cleared by
        # the refresher: adding and discarding are each atomic)
        self.paused: set[str] = set()
        # frequency caps: (campaign or creative id, user) -> until when it is capped; the refresher writes it from
        # the banker's log of billed impressions (``seen``: the last entry of it read), the bid path reads it
        self.blocked: dict[tuple[str, str], float] = {}
        self.seen = 0
        self._shown: dict[tuple[str, str], deque[float]] = {}  # (campaign or creative, user) -> impression times
        self._reservations: deque[Reservation] = deque()
        self._last_expiry: tuple[float, float, float] = (math.nan, math.nan, math.nan)  # (now, window, expiry)
        self._days: dict[dt.tzinfo, tuple[float, float, str]] = {}  # per zone, the last day asked (``day_of``)
        self._settlements: deque[Settlement] = deque()
        self._unsent: tuple[list[Reservation], list[Settlement]] = ([], [])
        self.calls = self.failures = 0
        self.connected = False                    # the last call reached the banker
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()             # one call at a time (the thread, close, tests)

    # -- the catalog ------------------------------------------------------------------------------------------
    def use_terms(self, terms: Iterable[CampaignTerms]) -> None:
        """The campaigns of the catalog serving with a budget or frequency caps (at start and on every reload); a
        campaign left out keeps its slot, and its lease goes back to the banker at the next call."""
        budgeted = {t.campaign_id: t for t in terms if t.budgeted or t.frequency_caps}
        for campaign, slot in self.slots.items():
            self.terms[slot] = budgeted.get(campaign)
        for campaign, t in budgeted.items():
            if campaign not in self.slots:
                # every list grows before the slot is published: the refresher reads up to len(campaigns)
                self.granted.append(0)
                self.used.append(0)
                self.largest.append(0)
                self.lease_days.append(NO_DAY)
                self._used_before.append(0)
                self.pass_rate.append(1.0)
                self.view.append(None)
                self.cap_hits.append(0)
                self.terms.append(t)
                self.campaigns.append(campaign)
                self.slots[campaign] = len(self.campaigns) - 1

    # -- the bid path ------------------------------------------------------------------------------------------
    def reserve(self, slot: int, amount: int, bid_id: str, now: float, window: float, user: str = "",
                creative: str = "") -> bool:
        """Take ``amount`` nano-USD from the campaign's lease for a bid priced at ``now`` (the engine's time); False
        (and nothing taken) when the lease holds less, or when it was granted for another day than ``now``'s (a
        bid is charged to the day it was made in, from that day's budget: after midnight the campaign waits for the
        refresher's lease of the new day). ``window``: seconds after ``now`` until the reservation is settled by the
        policy if no notice came; ``user`` (the request's user key, "" without one) and ``creative``: what its
        billing counts towards frequency caps. ``now`` must be the issue time its notice token carries (the engine
        signs a batch's bids at the instant it reserved them): the bid's notices then find its report's row."""
        if amount > self.largest[slot]:
            self.largest[slot] = amount
        start, end, day = self.lease_days[slot]
        if self.granted[slot] - self.used[slot] < amount or (amount and not start <= now < end):
            self.paused.add(self.campaigns[slot])
            return False
        last = self._last_expiry  # a batch's bids share ``now`` and, mostly, their window: worked out once for them
        if last[0] != now or last[1] != window:
            last = self._last_expiry = (now, window, expiry(millis(now), window, self.grace_s))
        # a Reservation built as the tuple it is (its generated __new__ costs twice as much, for every bid)
        self._reservations.append(_new_tuple(Reservation, (bid_id, self.campaigns[slot], amount, last[2], user,
                                                           creative, day)))
        self.used[slot] += amount  # after the append: see the module's docstring
        return True

    def capped(self, slot: int, creative: str, user: str, now: float) -> bool:
        """Whether a user has had as many billed impressions of the campaign (or of ``creative``) as one of its
        frequency caps allows, as the local view has them."""
        blocked = self.blocked
        until = blocked.get((self.campaigns[slot], user))
        if until is not None and now < until:
            return True
        until = blocked.get((creative, user))
        return until is not None and now < until

    def available(self, slot: int) -> int:
        return self.granted[slot] - self.used[slot]

    # -- the notice routes --------------------------------------------------------------------------------------
    def settle(self, kind: str, bid_id: str, campaign: str, price_micros: int | None, bid_micros: int,
               issued: float, window: float) -> None:
        """A counted notice (``kind`` win, bill or loss) of a bid of ``campaign``: ``price_micros`` the clearing
        price (CPM, micro-USD; None when the exchange did not give it: the bid's price is taken), ``bid_micros``
        the bid's, ``issued`` and ``window`` from its token. Queued for the banker; never waits. A notice of a
        campaign the ledger never had (no budget, no frequency cap) is none of its business."""
        slot = self.slots.get(campaign)
        if slot is None:
            return
        zone = self._zone(slot)
        amount = bid_micros  # CPM in micro-USD = an impression's cost in nano-USD
        charge = amount if price_micros is None else min(price_micros, amount)
        # ``issued`` is the token's whole milliseconds over 1000: the same expiry as the bid's report (``reserve``)
        self._settlements.append(Settlement(bid_id, kind, campaign, 0 if kind == "loss" else charge, amount,
                                            self.day_of(zone, issued),
                                            expiry(round(issued * 1000), window, self.grace_s)))

    def day_of(self, zone: dt.tzinfo, t: float) -> str:
        """``campaign_day(zone, t)``, from the bounds of the last day asked of ``zone`` when ``t`` falls in it (a
        notice asks it: working the date out anew costs several microseconds)."""
        bounds = self._days.get(zone)
        if bounds is None or not bounds[0] <= t < bounds[1]:
            bounds = self._days[zone] = day_bounds(zone, t)
        return bounds[2]

    # -- what a pacing controller and the operator view read ----------------------------------------------------
    def spent_today(self, slot: int) -> float:
        """USD the campaign spent today (its time zone's), as the banker said at the last call."""
        grant = self.view[slot]
        return 0.0 if grant is None else grant.spent_day / NANOS_PER_USD

    def daily_budget(self, slot: int) -> float | None:
        terms = self.terms[slot]
        return None if terms is None else terms.daily_usd

    def report(self) -> dict[str, dict]:
        """Per budgeted campaign: budgets, spent (total, today), reserved, leased (all holders), this worker's
        lease and pass rate, as of the last call to the banker."""
        out = {}
        for slot, campaign in enumerate(self.campaigns):
            terms, grant = self.terms[slot], self.view[slot]
            if terms is None:
                continue
            out[campaign] = {
                "budget_total": terms.total_usd, "budget_daily": terms.daily_usd, "timezone": str(terms.timezone),
                "pacing": terms.pacing,
                "spent_total": grant.spent_total / NANOS_PER_USD if grant else 0.0,
                "spent_today": grant.spent_day / NANOS_PER_USD if grant else 0.0,
                "reserved": grant.reserved_total / NANOS_PER_USD if grant else 0.0,
                "leased": grant.leased_total / NANOS_PER_USD if grant else 0.0,
                "lease_here": self.available(slot) / NANOS_PER_USD, "pass_rate": self.pass_rate[slot],
                "cap_hits": self.cap_hits[slot]}
        return out

    def remaining(self, slot: int) -> float | None:
        """USD the campaign has left (the smaller of its total's and today's budget), None before the first call."""
        terms, grant = self.terms[slot], self.view[slot]
        if terms is None or grant is None or not terms.budgeted:
            return None
        left = []
        if terms.total_usd is not None:
            left.append(terms.total_usd - grant.spent_total / NANOS_PER_USD)
        if terms.daily_usd is not None:
            left.append(terms.daily_usd - grant.spent_day / NANOS_PER_USD)
        return min(left)

    # -- the refresher ------------------------------------------------------------------------------------------
    def _target(self, slot: int, now: float, used: int) -> int:
        """The lease the worker asks for: ``lease_fraction`` of the campaign's smallest budget, but at least the
        smallest lease, its largest bid so far (``LEASE_BIDS`` of them within ``MAX_LEASE_FRACTION`` of the budget),
        and twice what it reserved since the previous call (within ``MAX_LEASE_FRACTION`` of the budget): a busy
        worker is not starved between two calls, and several workers share a small budget."""
        terms = self.terms[slot]
        if terms is None or not terms.budgeted or not terms.in_flight(now):
            return 0
        budget = min(b for b in (terms.daily_usd, terms.total_usd) if b is not None)
        most = nanos(budget * MAX_LEASE_FRACTION)
        largest = self.largest[slot]
        pace = min(2 * (used - self._used_before[slot]), most)
        return max(nanos(budget * self.lease_fraction), self.min_lease, largest, min(LEASE_BIDS * largest, most),
                   pace)

    def refresh(self) -> bool:
        """One call to the banker: report, settle, top up. False when the banker could not be reached (what the
        call carried is sent again with the next one)."""
        with self._lock:
            return self._refresh(read_clock(self.clock))

    def _refresh(self, now: float, returning: bool = False) -> bool:
        n = len(self.campaigns)
        granted, bid_path_used = self.granted, self.used
        targets = [0 if returning else self._target(slot, now, bid_path_used[slot]) for slot in range(n)]
        for slot in range(n):  # a lease above its target shrinks here, before the call: the banker never takes
            excess = granted[slot] - bid_path_used[slot] - targets[slot]  # back what a bid may be reserving
            if excess > 0:
                granted[slot] -= excess
        used = bid_path_used[:n]  # before the queue is drained
        reservations, settlements = self._unsent
        for queue, drained in ((self._reservations, reservations), (self._settlements, settlements)):
            popleft = queue.popleft  # what is queued now (the bid path may append meanwhile: that waits a call)
            drained += [popleft() for _ in range(len(queue))]
        campaigns = []
        for slot in range(n):
            terms = self.terms[slot]
            zone = self._zone(slot)
            total = UNLIMITED if terms is None or terms.total_usd is None else nanos(terms.total_usd)
            daily = UNLIMITED if terms is None or terms.daily_usd is None else nanos(terms.daily_usd)
            campaigns.append(CampaignSync(self.campaigns[slot], self.day_of(zone, now), total, daily,
                                          granted[slot] - used[slot], targets[slot]))
        self.calls += 1
        try:
            grants = self.banker.sync(self.holder, now, campaigns, reservations, settlements)
        except Exception as exc:  # noqa: BLE001 - the bid path goes on with the leases it holds
            self.failures += 1
            if self.connected or self.failures == 1:
                log.warning("ledger: %r unreachable (%s: %s); bidding on the leases held", self.banker,
                            type(exc).__name__, exc)
            self.connected = False
            return False
        if not self.connected and self.calls > 1:
            log.info("ledger: %r reachable again", self.banker)
        self.connected = True
        reservations.clear()
        settlements.clear()
        self._used_before[:n] = used
        paused = self.paused
        for slot in range(n):
            campaign = self.campaigns[slot]
            grant = grants[campaign]
            if self.lease_days[slot][2] != campaigns[slot].day:  # the banker moved the lease to this day's account
                self.lease_days[slot] = day_bounds(self._zone(slot), now)
            self.granted[slot] += grant.delta
            self.view[slot] = grant
            if campaign in paused and self.granted[slot] - self.used[slot] > 0:
                paused.discard(campaign)
        self._read_impressions(now)
        if self.on_refresh is not None:
            self.on_refresh(self, now)
        return True

    def _zone(self, slot: int) -> dt.tzinfo:
        terms = self.terms[slot]
        return terms.timezone if terms is not None else dt.timezone.utc

    def _read_impressions(self, now: float) -> None:
        """The banker's new billed impressions of users, into ``blocked``: a (campaign or creative, user) is
        capped until its ``count``-th latest impression is ``seconds`` old, for each cap of its campaign."""
        caps = {self.campaigns[slot]: t.frequency_caps for slot, t in enumerate(self.terms)
                if t is not None and t.frequency_caps}
        if not caps:
            return
        longest = max(cap.seconds for campaign_caps in caps.values() for cap in campaign_caps)
        try:
            new = self.banker.impressions(self.seen, now - longest)
        except Exception as exc:  # noqa: BLE001 - read again at the next call
            log.warning("ledger: cannot read the impressions log (%s: %s)", type(exc).__name__, exc)
            return
        shown, blocked = self._shown, self.blocked
        touched = set()
        for imp in new:
            self.seen = imp.seq
            for key in ((imp.campaign, imp.user), (imp.creative, imp.user)):
                shown.setdefault(key, deque()).append(imp.at)
                touched.add((key, imp.campaign, key[0] == imp.campaign))
        for key, campaign, of_campaign in touched:
            times = shown[key]
            while times and times[0] < now - longest:
                times.popleft()
            until = 0.0
            for cap in caps.get(campaign, ()):
                if (cap.scope == "campaign") == of_campaign and len(times) >= cap.count:
                    until = max(until, times[-cap.count] + cap.seconds)
            if until > now:
                blocked[key] = until
            else:
                blocked.pop(key, None)
        for key in [key for key, until in blocked.items() if until <= now]:
            del blocked[key]
        if self.calls % SWEEP_EVERY == 0:  # users not seen again: their impressions leave the window
            for key in [key for key, times in shown.items() if times[-1] < now - longest]:
                del shown[key]

    def start(self) -> Ledger:
        """A first call (leases before the first bid, if the banker answers), then the refresher thread. Once: a
        second refresher would outlive ``close`` and call a closed banker."""
        if self._thread is not None:
            raise RuntimeError("the ledger's refresher is already running")
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="ledger-refresher", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - a bug here must not end the refreshing
                log.exception("ledger: refresh failed")

    def close(self) -> None:
        """Stop the refresher, report what is queued and give the leases back (one try: if the banker is
        unreachable they stay counted as leased, never spent twice)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self._refresh(read_clock(self.clock), returning=True)
        self.banker.close()

"""The banker's arithmetic: accounts, leases and reservations, in integer nano-USD.

One ``sync`` call is one atomic step of the banker for one lease holder (a worker process): the holder reports
what its lease still holds and the bids it reserved since its last call, hands over the notices it received,
and gets its leases topped up (or taken back). The embedded back end runs this module inside one SQLite
transaction; the Redis back end runs the same steps as a Lua script (``bidder/ledger/redis_banker.py``); the
tests hold both to a plain model of it.

Amounts are integers of nano-USD: the cost of one impression in nano-USD is its CPM in micro-USD, so the
clearing prices of notices (micro-units of CPM) add up exactly, and the spend equals the exchange's charges to
the micro-dollar.

Per campaign there are two accounts, ``T`` (the whole flight, against ``budget.total``) and one per day of the
campaign's time zone (``2026-12-07``, against ``budget.daily``). Each has ``spent`` (committed charges),
``reserved`` (bids waiting for their notices) and ``leased`` (handed to holders, not yet reserved). The banker
grants only what both accounts have left: ``spent + reserved + leased <= budget``.

A bid's row moves through these states::

    open ──win──► won ──bill──► billed        (charge: the clearing price)
      │             └──expiry─► expired        (charge: the win's price; a win is an impression)
      ├──bill──► billed
      ├──loss──► lost                          (charge 0)
      └──expiry► expired                       (charge 0: no notice came, the reservation is released)

A notice can reach the banker before the holder's report of the bid (another worker answered it within one
refresh): the row is then made by the notice, *unfunded*, and the report that comes later only returns the
reservation's amount to the holder's lease. A bill after a row expired charges the difference (late bills:
the only way spend can pass a budget).

A row is found by its bid id *and* its expiry: the report and the notices of one bid compute the same expiry from
the same figures (the token's issue time in whole milliseconds, its window; ``expiry``), so a storage can keep the
rows in the order they fall due, and sweep and purge them as ranges.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol, Sequence

__all__ = ["add_change", "expiry", "OPEN", "WON", "BILLED", "LOST", "EXPIRED", "FINAL", "BidRow", "Book", "CampaignSync", "Grant",
           "Impression", "Reservation", "Settlement", "Storage", "TOTAL", "UNLIMITED", "headroom"]

TOTAL = "T"
#: a budget that is not set
UNLIMITED = -1
OPEN, WON, BILLED, LOST, EXPIRED = "open", "won", "billed", "lost", "expired"
FINAL = frozenset({BILLED, LOST, EXPIRED})
#: rows swept per sync at most (a backlog is worked off over the next calls)
EXPIRE_BATCH = 2000


def expiry(issued_ms: int, window: float, grace: float) -> float:
    """When a bid's reservation is settled by the policy if no notice came: ``issued_ms`` its token's issue time in
    whole milliseconds (``bidder.clock.millis``), ``window`` its notices' window, ``grace`` the banker's margin (all
    seconds). The holder's report and every notice of the bid compute it from the same three numbers, so it is the
    same float for all of them: with the bid id it is the key of the bid's row."""
    return issued_ms / 1000.0 + window + grace


def add_change(moved: dict[tuple[str, str], list[int]], campaign: str, day: str, spent: int, reserved: int) -> None:
    """Add a settled bid's change to its accounts, ``moved[(campaign, day)]`` as [spent, reserved]: a call sums the
    changes of its expired bids and moves each account once."""
    change = moved.get((campaign, day))
    if change is None:
        change = moved[campaign, day] = [0, 0]
    change[0] += spent
    change[1] += reserved


class CampaignSync(NamedTuple):
    """What a holder says of one campaign: its current day, budgets, what its lease holds now, the lease it wants."""
    campaign: str
    day: str
    total: int     # nano-USD; UNLIMITED without a total budget
    daily: int     # nano-USD; UNLIMITED without a daily budget
    held: int      # the holder's lease as the holder counts it (granted - reserved)
    target: int    # the lease it asks for (0: give it all back)


class Reservation(NamedTuple):
    bid_id: str
    campaign: str
    amount: int    # nano-USD: the bid's price per impression (0 for a campaign with frequency caps but no budget)
    expires: float  # Unix seconds (engine clock) after which it is settled by the policy
    user: str = ""      # the request's user key, for frequency caps ("" without one: never capped)
    creative: str = ""
    day: str = ""       # the day of the lease it was reserved from, which is the bid's ("": the holder's lease's)


class Settlement(NamedTuple):
    bid_id: str
    kind: str      # "win" | "bill" | "loss"
    campaign: str
    price: int     # nano-USD: the clearing price per impression (0 for a loss)
    amount: int    # nano-USD: the bid's price (what a win without a bill is capped at)
    day: str       # the day of the bid, in its campaign's time zone
    expires: float


class Grant(NamedTuple):
    """The banker's answer for one campaign: the change to the holder's lease and the accounts after the call."""
    delta: int
    spent_total: int
    spent_day: int
    reserved_total: int
    leased_total: int


class BidRow(NamedTuple):
    bid_id: str
    campaign: str
    day: str
    amount: int     # the reservation's amount once funded (0 until then)
    funded: bool    # the holder's report of the bid arrived
    state: str
    price: int      # win price (won) or the charge (final)
    expires: float
    user: str = ""  # from the holder's report: a billed bid with a user counts towards frequency caps
    creative: str = ""


class Impression(NamedTuple):
    """A billed bid of a user: what frequency caps count (``seq`` orders the banker's log of them)."""
    seq: int
    campaign: str
    creative: str
    user: str
    at: float


class Storage(Protocol):
    """Where the banker's rows live; every call happens inside one atomic step."""
    def account(self, campaign: str, period: str) -> tuple[int, int, int]: ...  # spent, reserved, leased
    def prefetch_accounts(self, keys: Sequence[tuple[str, str]]) -> None: ...  # (campaign, period): read in this step
    def add(self, campaign: str, period: str, spent: int = 0, reserved: int = 0, leased: int = 0) -> None: ...
    def hold(self, holder: str, campaign: str) -> tuple[int, str]: ...  # lease, its day ("" without one)
    def set_hold(self, holder: str, campaign: str, lease: int, day: str) -> None: ...
    def prefetch(self, keys: Sequence[tuple[str, float]]) -> None: ...  # (bid id, expiry): read in this step
    def bid(self, bid_id: str, expires: float) -> BidRow | None: ...
    def put_bid(self, row: BidRow) -> None: ...
    # The rows of reported bids that have none yet, open and funded, each charged to its day in ``days``: all of
    # them written (True) or, when one has a row already, none (False).
    def insert_new(self, reservations: Sequence[Reservation], days: Sequence[str]) -> bool: ...
    # The unsettled rows whose expiry passed, settled by ``Book.expire``'s policy: the storage may settle them in
    # bulk itself (adding each account's change to ``moved`` as ``Book.expire`` does) and return only the rest.
    def expire_due(self, now: float, limit: int, moved: dict[tuple[str, str], list[int]]) -> list[BidRow]: ...
    def purge(self, before: float) -> None: ...  # final rows whose expiry is before ``before``
    def log_impression(self, campaign: str, creative: str, user: str, at: float) -> None: ...


def headroom(budget: int, spent: int, reserved: int, leased: int) -> int | None:
    """What an account can still grant; None when its budget is not set."""
    return None if budget == UNLIMITED else budget - spent - reserved - leased


class Book:
    """The banker's steps over a ``Storage``; ``retention_s`` is how long a settled row is kept after its expiry
    (a late bill within it is matched to its bid; after it, it is charged as a new one)."""

    def __init__(self, storage: Storage, retention_s: float):
        self.storage = storage
        self.retention_s = retention_s
        self.now = 0.0  # the engine's time of the call under way

    def sync(self, holder: str, now: float, campaigns: Sequence[CampaignSync], reservations: Sequence[Reservation],
             settlements: Sequence[Settlement]) -> dict[str, Grant]:
        store = self.storage
        self.now = now
        lease_day: dict[str, str] = {}
        store.prefetch_accounts([(c.campaign, period) for c in campaigns for period in (TOTAL, c.day)])
        for c in campaigns:  # the holder's count of its lease is the truth (a lost reply heals here)
            lease, day = store.hold(holder, c.campaign)
            day = day or c.day
            lease_day[c.campaign] = day
            held = max(c.held, 0)  # overdrawn (bids raced a lease taken back): those bids are reported, reserved
            if held != lease:
                store.add(c.campaign, TOTAL, leased=held - lease)
                store.add(c.campaign, day, leased=held - lease)
                store.set_hold(holder, c.campaign, held, day)
        reserved: dict[tuple[str, str], int] = {}  # new bids' amounts, moved in one step per account below
        # charged to the bid's day even when the lease has moved on to the next one since
        days = [r.day or lease_day.get(r.campaign) or store.hold(holder, r.campaign)[1] for r in reservations]
        # the common case, every report the first word of its bid: their rows written in one step, or none of them
        if store.insert_new(reservations, days):
            for r, day in zip(reservations, days):
                key = (r.campaign, day)
                reserved[key] = reserved.get(key, 0) + r.amount
        else:  # some bid had a row already (a notice came first, a report sent again): each on its own
            store.prefetch([(r.bid_id, r.expires) for r in reservations])
            for r, day in zip(reservations, days):
                self.fund(r, day, reserved)
        store.prefetch([(s.bid_id, s.expires) for s in settlements])
        for (campaign, day), amount in reserved.items():
            store.add(campaign, TOTAL, reserved=amount)
            store.add(campaign, day, reserved=amount)
        for s in settlements:
            self.settle(s)
        moved: dict[tuple[str, str], list[int]] = {}  # expired rows' (spent, reserved) changes, one step per account
        for row in store.expire_due(now, EXPIRE_BATCH, moved):
            self.expire(row, moved)
        for (campaign, day), (spent, reserved) in moved.items():
            store.add(campaign, TOTAL, spent=spent, reserved=reserved)
            store.add(campaign, day, spent=spent, reserved=reserved)
        store.purge(now - self.retention_s)
        return {c.campaign: self.grant(holder, c) for c in campaigns}

    # -- a bid's row ----------------------------------------------------------------------------------------
    def _move(self, row: BidRow, spent: int = 0, reserved: int = 0) -> None:
        self.storage.add(row.campaign, TOTAL, spent=spent, reserved=reserved)
        self.storage.add(row.campaign, row.day, spent=spent, reserved=reserved)

    def _put(self, row: BidRow) -> None:
        self.storage.put_bid(row)

    def fund(self, r: Reservation, day: str, reserved: dict[tuple[str, str], int]) -> None:
        """The holder reserved ``r.amount`` for a bid: it moves from the lease (already counted by ``held``) to
        reserved, unless the bid was settled before its report came (then it simply returns to the budget). A new
        bid's amount is added to ``reserved`` by (campaign, day), which the caller moves in one step per account."""
        row = self.storage.bid(r.bid_id, r.expires)
        if row is None:  # the common case: the first word of a bid
            key = (r.campaign, day)
            reserved[key] = reserved.get(key, 0) + r.amount
            row = BidRow(r.bid_id, r.campaign, day, r.amount, True, OPEN, 0, r.expires, r.user, r.creative)
        elif row.funded:  # a report sent again after a lost reply
            return
        else:
            row = row._replace(amount=r.amount, funded=True, user=r.user, creative=r.creative)
            if row.state not in FINAL:
                self._move(row, reserved=r.amount)
            elif row.state == BILLED:  # billed before its report came: the impression counts now
                self._impression(row)
        self._put(row)

    def _impression(self, row: BidRow) -> None:
        if row.user:
            self.storage.log_impression(row.campaign, row.creative, row.user, self.now)

    def settle(self, s: Settlement) -> None:
        row = self.storage.bid(s.bid_id, s.expires)
        if row is None:  # the notice came before the holder's report of its bid
            row = BidRow(s.bid_id, s.campaign, s.day, 0, False, OPEN, 0, s.expires)
        held = row.amount if row.funded and row.state not in FINAL else 0
        if s.kind == "bill":
            if row.state == BILLED:
                return
            charge = s.price - (row.price if row.state == EXPIRED else 0)
            row = row._replace(state=BILLED, price=s.price)
            self._move(row, spent=charge, reserved=-held)
            self._impression(row)
        elif s.kind == "win":
            if row.state != OPEN:
                return
            row = row._replace(state=WON, price=s.price)
        elif s.kind == "loss":
            if row.state != OPEN:  # a win is stronger evidence than a loss; a settled row stays settled
                return
            row = row._replace(state=LOST, price=0)
            self._move(row, reserved=-held)
        else:
            raise ValueError(f"unknown notice kind {s.kind!r}")
        self._put(row)

    def expire(self, row: BidRow, moved: dict[tuple[str, str], list[int]]) -> None:
        """The policy for a bid whose notices never came: a win without a bill is charged at the win's price
        (never underestimate an impression that happened); a bid without any notice is released. The change to its
        accounts is added to ``moved`` by (campaign, day) as [spent, reserved], which the caller moves."""
        held = row.amount if row.funded else 0
        charge = row.price if row.state == WON else 0
        add_change(moved, row.campaign, row.day, charge, -held)
        self._put(BidRow(row.bid_id, row.campaign, row.day, row.amount, row.funded, EXPIRED, charge, row.expires,
                         row.user, row.creative))  # not _replace: thousands a call, at a third of its cost

    # -- leases ---------------------------------------------------------------------------------------------
    def grant(self, holder: str, c: CampaignSync) -> Grant:
        """Top the holder's lease up to ``c.target`` within what both accounts have left (or take back what they
        are short of); a lease of an earlier day moves to the new day's account first."""
        store = self.storage
        lease, day = store.hold(holder, c.campaign)
        if day and day != c.day and lease:
            store.add(c.campaign, day, leased=-lease)
            store.add(c.campaign, c.day, leased=lease)
        total = store.account(c.campaign, TOTAL)
        daily = store.account(c.campaign, c.day)
        room = [r for r in (headroom(c.total, *total), headroom(c.daily, *daily)) if r is not None]
        delta = c.target - lease
        if room:
            delta = min(delta, min(room))
        delta = max(delta, -lease) if lease > 0 else max(delta, 0)
        if delta > 0:
            store.add(c.campaign, TOTAL, leased=delta)
            store.add(c.campaign, c.day, leased=delta)
            lease += delta
        # A lease taken back (delta < 0) stays counted as leased until the holder's next call says what it gave
        # back: its bids may be reserving from it while this answer travels, and what they reserve is not free.
        store.set_hold(holder, c.campaign, lease, c.day)
        total = store.account(c.campaign, TOTAL)
        spent_day = store.account(c.campaign, c.day)[0]
        return Grant(delta, total[0], spent_day, total[1], total[2])

"""The data a bid request and a batch of them carry through the stages of ``bidder.engine``.

``Pending`` is one request after ``prepare``: its imps that have candidates (or wait for retrieval to choose
them), each with the raw record the model reads. ``Batch`` is what a flush becomes: the requests scored
together, their imps featurized once into one buffer that the scorer, the towers and the win-price search all
read, the rows as arrays (imp, candidate, floor, value per click, deal terms), then the scores, each imp's best
row and value, and the bids. Every stage reads what the stages before it wrote and adds its own part; no stage
works out again what another computed.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from bidder.campaigns import Candidate
from bidder.conformance import Exclusion, Seats
from bidder.openrtb import BidRequest, Imp, user_key
from bidder.pricing import DealOffer

__all__ = ["Batch", "Outcome", "Pending"]


class Outcome(NamedTuple):  # a tuple: one is built per request, a frozen dataclass costs several times more
    status: int
    body: bytes = b""
    reason: str | None = None  # no-bid reason (204) or error kind (4xx)


class Pending:
    """A decoded bid request with rows to score.

    Per imp that can bid (in request order): ``imp_ids`` its index in ``request.imp``, ``records`` its raw
    record, ``candidates`` the eligible candidates of all its sizes and ``offers`` (None when the imp has no
    deals) the deal each of them can bid through, by position. With a large catalog, ``candidates`` is empty
    until retrieval fills it from ``waiting`` (per imp: the imp, its sizes and the blocking rules' exclusion) and
    ``where`` (the targeting context). ``floors`` holds every imp's floor (USD CPM, converted from ``bidfloorcur``),
    ``imp_reason`` the first reason an imp of the request got no rows, ``exchange`` the exchange it came through (the
    bids' notice tokens carry it).
    """

    __slots__ = ("request", "received", "imp_ids", "records", "candidates", "offers", "floors", "imp_reason",
                 "waiting", "where", "n_rows", "first_imp", "first_row", "has_deals", "exchange",
                 "personal_ok", "seats", "currency", "rate", "_user")

    def __init__(self, request: BidRequest, received: float, floors: list[float], exchange: str | None = None):
        self.request = request
        self.received = received
        self.floors = floors
        self.exchange = exchange
        self.imp_ids: list[int] = []
        self.records: list[dict] = []
        self.candidates: list[Sequence[Candidate]] = []
        self.offers: list[dict[int, DealOffer] | None] = []
        self.imp_reason: str | None = None
        self.waiting: list[tuple[Imp, list[tuple[int, int]], Exclusion]] | None = None
        self.where: tuple[str | None, str | None, frozenset[str]] | None = None
        self.n_rows = 0
        self.has_deals = False  # some candidate of some imp can bid through a deal
        self.first_imp = 0  # where its imps and rows start in the batch (``Batch.layout``)
        self.first_row = 0
        # -- conformance (bidder/conformance.py, bidder/privacy.py, bidder/currencies.py)
        # False: no consent to personal data: the records are blanked, and no imp of it is frequency-capped by user
        self.personal_ok = True
        self.seats: Seats | None = None  # the request's bseat/wseat, when it has either
        self.currency = "USD"            # the response's, and its units per USD
        self.rate = 1.0
        self._user: str | None | bool = False  # False: not read yet (``user``)

    def user(self) -> str | None:
        """Who the request is for (``bidder.openrtb.user_key``), read once; None without consent to personal data:
        then nobody is capped nor logged by user key."""
        user = self._user
        if user is False:
            user = self._user = user_key(self.request) if self.personal_ok else None
        return user

    def imp_personal_ok(self, position: int) -> bool:
        """Whether the imp at ``position`` (of ``imp_ids``) may use personal data (a frequency cap by user): today
        every imp of a request shares the request's signals."""
        return self.personal_ok

    def add_imp(self, i: int, record: dict, candidates: Sequence[Candidate],
                offers: dict[int, DealOffer] | None) -> None:
        self.imp_ids.append(i)
        self.records.append(record)
        self.candidates.append(candidates)
        self.offers.append(offers)
        self.n_rows += len(candidates)
        if offers:
            self.has_deals = True

    @property
    def rows(self) -> list[tuple[dict, dict]]:
        """(candidate layer, imp record) pairs: the featurizer's overlay rows for the canonical graph."""
        return [(c.layer, record) for record, eligible in zip(self.records, self.candidates) for c in eligible]


class Batch:
    """Requests scored together, and what each stage worked out for them.

    Imp ``j`` of the batch is imp ``imp_ids[j]`` of its request (a request's imps start at its ``first_imp``); its features are row ``j`` of
    ``features`` (the spec's inputs). Row ``r`` pairs imp ``row_imp[r]`` with catalog candidate ``row_cand[r]``,
    under floor ``row_floor[r]``, at ``row_value[r]`` USD per click, through the deal ``offers[r]`` if it has
    one (its floor in ``deal_floor[r]``, NaN without), for ``r < n_rows`` (the arrays are the engine's, reused
    from batch to batch, and may be longer). A request's imps and rows are consecutive.
    """

    __slots__ = ("pendings", "candidates", "outcomes", "records", "imp_ids", "features", "n_rows",
                 "row_imp", "row_cand", "row_floor", "row_value", "deal_floor", "deal_private", "offers", "scores",
                 "best_row", "best_value", "via_deal", "shaded", "unprofitable", "prices", "held", "propensity",
                 "now")

    def __init__(self, pendings: Sequence[Pending], candidates: Sequence[Candidate], features: dict[str, np.ndarray],
                 now: float = 0.0):
        self.pendings = pendings
        self.now = now  # the engine's clock for the batch: its flights, caps, reservations and notice tokens
        self.candidates = candidates  # the catalog's: ``row_cand`` indexes it
        self.outcomes: list[Outcome | Exception | None] = [None] * len(pendings)
        self.features = features
        self.records: list[dict] = []
        self.imp_ids: list[int] = []
        self.n_rows = 0
        self.offers: dict[int, DealOffer] = {}
        self.scores: np.ndarray | None = None
        self.shaded: dict[int, float] = {}       # batch imp -> its first-price bid (shade)
        self.unprofitable: set[int] = set()      # batch imps left without a bid: no positive expected surplus
        self.row_imp = self.row_cand = self.row_floor = self.row_value = self.deal_floor = self.deal_private = None
        self.best_row = self.best_value = self.via_deal = None
        # the budget stage (campaigns with money terms only): batch imp -> its final price, or why it is held back
        self.prices: dict[int, float] | None = None
        self.held: dict[int, str] | None = None
        # exploration (``--explore``): per batch imp the probability its row was the one bid with; None: not exploring
        self.propensity: list[float] | None = None

    @property
    def n_imps(self) -> int:
        return len(self.records)

    def pair_rows(self, start: int, stop: int) -> list[tuple[dict, dict]]:
        """Rows ``[start, stop)`` as (candidate layer, imp record) pairs: what row scoring featurizes."""
        candidates, records = self.candidates, self.records
        return [(candidates[c].layer, records[i])
                for i, c in zip(self.row_imp[start:stop].tolist(), self.row_cand[start:stop].tolist())]

    def live(self) -> list[int]:
        """Positions of the requests no stage has answered yet."""
        return [k for k, outcome in enumerate(self.outcomes) if outcome is None]


def empty_rows(n: int) -> tuple[np.ndarray, ...]:
    """Fresh row arrays for ``n`` rows, in ``Batch``'s order (imp, candidate, floor, value per click, deal floor,
    private deal): no row has deal terms."""
    return (np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64), np.empty(n, dtype=np.float64),
            np.empty(n, dtype=np.float64), np.full(n, np.nan, dtype=np.float64), np.zeros(n, dtype=np.uint8))

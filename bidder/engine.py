"""The bid path without HTTP: body bytes in, status and body bytes out.

Stages, in the order a request meets them (one method each, over a ``bidder.batch.Batch`` from ``batch``):

    prepare    decode → the imp records → eligible candidates per imp (no-bid and 400 answers end here);
               with a large catalog the imps wait for ``retrieve``
    batch      ``bidder.batching.Batcher``: every request prepared in one loop turn joins one flush, which
               becomes one ``Batch`` (``tmax`` is checked here)
    featurize  every imp of the batch, once, into the buffer the scorer, the towers and the win-price search read
    retrieve   large catalogs: the imp tower for every waiting imp of the batch, then per imp the targeting
               filters and the top K by the two towers (``bidder.retrieval``)
    layout     the batch's rows as arrays: imp, candidate, floor, value per click, deal terms
    score      the rows in as few ORT calls as ``max_batch`` allows, by the factorized graphs when the batch's
               imps are in their buffer, else by ``model.onnx`` row by row
    value      per imp the best row at or above its floor, natively (``bidder.pricing.best_rows``)
    shade      the batch's first-price open-auction imps in one search (``bidder.shading``)
    budget     only when campaigns have money terms: each bid's price capped at its campaign's max_cpm, the
               flight checked, the price reserved from the campaign's lease (``bidder.ledger``)
    encode     per request: the bids priced (rounded, deal terms, shaded) and the BidResponse, or the no-bid

``bid(body)`` runs all of them for one request, synchronously; the server runs ``prepare`` in the
request's handler and ``submit``s what has rows to score.
"""
from __future__ import annotations

import asyncio
import random
import re
import time
from typing import Callable, Iterator, Sequence

import msgspec
import numpy as np
from msgspec.structs import replace

from bidder._features import layout_rows
from bidder.batch import Batch, Outcome, Pending, empty_rows
from bidder.batching import Batcher
from bidder.campaigns import Candidate, Catalog
from bidder.clock import read_clock
from bidder.conformance import NOTHING_EXCLUDED, Exclusion
from bidder.deals import deal_candidates, seat_bids
from bidder.events import EventLog
from bidder.factorized import FactorizedScorer
from bidder.ledger import Ledger
from bidder.metrics import NO_BID_REASONS, Metrics
from bidder.notices import Notices, bid_id_of, micros
from bidder.openrtb import (BANNER, DEFAULT_SEAT, FIRST_PRICE, Bid, BidResponse, Imp, RequestError, SeatBid,
                            decode_predict, decode_request, encode_response, imp_fields, imp_sizes, request_fields)
from bidder.pricing import DealOffer, best_rows, floored_price
from bidder.privacy import PRIVACY_CASES, PrivacyMemory, withhold
from bidder.retrieval import Retriever
from bidder.scorer import Scorer
from bidder.shading import WinModel
from bidder.spec import SPARSE_INPUT

__all__ = ["BidEngine", "Outcome", "Pending", "NO_BID_REASONS"]


class _PredictResponse(msgspec.Struct):
    ctr: list[float]
    model: str


#: a bid's window (seconds) for its reservation's expiry when notices are off (bidder.notices' default)
DEFAULT_WINDOW_S = 600
_FEATURIZER_ERROR = re.compile(r"record (\d+): (?:field '([^']*)')?")
_encoder = msgspec.json.Encoder()
_encode = _encoder.encode
#: what follows a plain response's bids: the seat (``SeatBid``'s default) and the currency's key
_SEAT_CLOSE = b'],"seat":' + _encode(DEFAULT_SEAT) + b'}],"cur":'


def error_body(message: str, path: str = "$") -> bytes:
    return _encoder.encode({"error": message, "path": path})


def _imp_arrays(n: int) -> tuple[np.ndarray, ...]:
    """Per imp: best row, its value, whether it bids through its deal, and the order imps found one."""
    return (np.empty(n, dtype=np.int64), np.empty(n, dtype=np.float64), np.zeros(n, dtype=np.uint8),
            np.empty(n, dtype=np.int64))


class BidEngine:
    """Scores and prices bid requests with one scorer and one catalog (swapped whole on reload).

    The engine owns its batcher: requests prepared against this catalog are scored by this scorer,
    even if a reload installs a new engine while they wait for their turn.
    """

    def __init__(self, scorer: Scorer, catalog: Catalog, metrics: Metrics, utc_offset_hours: float = 0.0,
                 now: float | Callable[[], float] | None = None, factorized: FactorizedScorer | None = None,
                 market: WinModel | None = None, retriever: Retriever | None = None, notices: Notices | None = None,
                 events: EventLog | None = None, ledger: Ledger | None = None, explore: float = 0.0):
        self.scorer = scorer
        # the share of imps bid with a creative drawn at random among those at or above the floor, not the best
        # one (``explore_rows``): what a model trained on the event log then sees beyond its own choices
        if not 0.0 <= explore <= 1.0:
            raise ValueError(f"explore must be a share of imps in [0, 1], got {explore!r}")
        self.explore = explore
        self._explore_rng = random.Random()
        self.events = events  # every bid placed is logged there (``bidder serve --events``); None: not logged
        self.catalog = catalog
        # large catalogs: the top K eligible creatives per imp by the two towers; None: every eligible creative
        self.retriever = retriever
        # the bundle's factorized graphs, their candidate parts computed for this catalog; None: row scoring
        self.factorized = factorized
        if factorized is not None:
            factorized.set_candidates([c.layer for c in catalog.candidates])
        self.market = market  # the bundle's win-price model; None: first-price imps are bid at their value
        self.metrics = metrics
        self._privacy_counts = {case: metrics.privacy.labels(case) for case in PRIVACY_CASES}
        self._privacy = PrivacyMemory()  # the privacy decisions of this engine's requests, remembered
        self.utc_offset_hours = utc_offset_hours
        # Unix seconds every request is taken to arrive at (examples, tests), or a clock to read them from
        # (bidder.clock.Clock: a simulated day); None: the wall clock
        self.now = now
        # bids signed and their notices pointed at the bidder's own routes (bidder/notices.py); None: off
        self.notices = notices
        # campaigns' money terms: the budget stage runs only when some campaign has any (bidder.ledger holds the
        # leases of the budgeted ones); without, the bid path is what it was
        self.ledger = ledger
        self.money = bool(catalog.terms)
        if any(t.budgeted or t.frequency_caps for t in catalog.terms.values()):
            if ledger is None:
                raise ValueError(f"{catalog.source}: campaigns with a budget or frequency caps need the spend ledger "
                                 f"(bidder serve --notice-url: billing notices commit spend and count impressions)")
            ledger.use_terms(catalog.terms.values())
        # where a batch's imps are featurized: the factorized graphs read them there, so does the bid search
        self.features = factorized.imp_inputs if factorized is not None else scorer.spec.allocate(scorer.max_batch)
        self.capacity = len(next(iter(self.features.values())))  # imps a batch may hold
        self._rows = empty_rows(scorer.max_batch)
        self._imps = _imp_arrays(self.capacity)
        self.batcher = Batcher(self.score_batch)
        self._bid_templates: dict[int, Bid] = {}  # catalog index -> its creative's bid fields (``_bid_template``)
        self._bid_tails: dict[int, bytes] = {}  # catalog index -> the same fields, encoded (``_bid_tail``)

    # -- the whole path for one request ------------------------------------------------------------
    def bid(self, body: bytes, exchange: str | None = None, received: float | None = None) -> Outcome:
        prepared = self.prepare(body, exchange, time.perf_counter() if received is None else received)
        if prepared.__class__ is Outcome:
            return prepared
        return self.bid_prepared(prepared)

    def bid_prepared(self, pending: Pending) -> Outcome:
        """Score and price one prepared request on its own (no batch)."""
        outcome = self.score_batch([pending])[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def submit(self, pending: Pending) -> asyncio.Future:
        """Join this loop turn's batch; the future's result is the request's Outcome."""
        return self.batcher.submit(pending)

    # -- prepare -----------------------------------------------------------------------------------
    def prepare(self, body: bytes, exchange: str | None, received: float) -> Outcome | Pending:
        try:
            request = decode_request(body)
        except RequestError as exc:
            return Outcome(400, error_body(exc.message, exc.path), "bad_request")
        catalog = self.catalog
        pending = Pending(request, received, [imp.bidfloor for imp in request.imp], exchange)
        if request.cur and "USD" not in request.cur and not self._currency(pending, request.cur):
            return self._no_bid("currency")
        shared = request_fields(request, exchange, now=read_clock(self.now), utc_offset_hours=self.utc_offset_hours)
        domain = shared["domain"]
        paused = self.ledger.paused if self.ledger is not None else None
        # -- conformance: privacy signals, seats, the request's blocking rules (bidder/privacy.py, conformance.py)
        if request.regs is not None:
            personal_ok, case = self._privacy.personal_data(request)
            if case is not None:
                self._privacy_counts[case].inc()
            if not personal_ok:
                pending.personal_ok = False
                withhold(shared)
        blocking = catalog.blocking
        rules = blocking.request(request, pending.personal_ok, DEFAULT_SEAT)
        pending.seats, seat_ok = rules.seats, rules.seat_ok
        if not seat_ok and not any(imp.pmp for imp in request.imp):
            return self._no_bid("blocked_seat")
        exclusion = rules.exclusion
        blocked = rules.blocked
        needs_api = blocking.needs_api
        cny_per_usd = catalog.currencies.cny_per_usd
        if self.retriever is not None:
            pending.waiting = []
            pending.where = (domain, exchange, blocked)
        for i, imp in enumerate(request.imp):
            if imp.bidfloorcur != "USD" and not self._floor_currency(pending, i, imp):
                pending.imp_reason = self._count_imp(pending.imp_reason, "floor_currency")
                continue
            sizes = imp_sizes(imp, catalog.size_list)
            if not sizes:
                pending.imp_reason = self._count_imp(pending.imp_reason, "unsupported_format" if imp.banner is None
                                                     else "no_eligible_creative")
                continue
            if not seat_ok and imp.pmp is None:
                pending.imp_reason = self._count_imp(pending.imp_reason, "blocked_seat")
                continue
            banner = imp.banner
            imp_exclusion = (blocking.imp_rules(exclusion, banner)
                             if banner.battr or banner.btype or banner.mimes or needs_api else exclusion)
            if pending.waiting is not None:  # the candidates come from the batch's imp vectors (retrieve)
                pending.waiting.append((imp, sizes, imp_exclusion))
                pending.add_imp(i, imp_fields(shared, imp, pending.floors[i], cny_per_usd), (), None)
                continue
            per_size = [catalog.eligible(w, h, domain, exchange, blocked) for w, h in sizes]
            if paused and any(per_size):  # campaigns whose lease is spent leave the imp to the others
                per_size = [[c for c in eligible if c.campaign_id not in paused] for eligible in per_size]
                if not any(per_size):
                    pending.imp_reason = self._count_imp(pending.imp_reason, "no_budget")
                    continue
            if any(per_size):
                self._add_candidates(pending, i, imp, imp_fields(shared, imp, pending.floors[i], cny_per_usd),
                                     per_size, exclusion=imp_exclusion)
            else:
                pending.imp_reason = self._count_imp(pending.imp_reason, "no_eligible_creative")
        if not pending.imp_ids:
            return self._no_bid(pending.imp_reason or "no_eligible_creative")
        return pending

    # -- conformance: currencies and privacy (the rules themselves: bidder/currencies.py, bidder/privacy.py) ------
    def _currency(self, pending: Pending, accepted: Sequence[str]) -> bool:
        """Bid in the first currency of ``accepted`` that the table has a rate for; False when there is none."""
        currencies = self.catalog.currencies
        for currency in accepted:
            rate = currencies.rate(currency)
            if rate is not None:
                pending.currency, pending.rate = currency, rate
                return True
        return False

    def _floor_currency(self, pending: Pending, i: int, imp: Imp) -> bool:
        """Imp ``i``'s floor in USD from its ``bidfloorcur``; False when the table has no rate for it (a floor we
        cannot compare is a floor we cannot meet)."""
        rate = self.catalog.currencies.rate(imp.bidfloorcur)
        if rate is None:
            return False
        pending.floors[i] = imp.bidfloor / rate
        return True

    def _add_candidates(self, pending: Pending, i: int, imp: Imp, record: dict,
                        per_size: Sequence[Sequence[Candidate]], at: int | None = None,
                        exclusion: Exclusion = NOTHING_EXCLUDED) -> None:
        """Give imp ``i`` its eligible candidates of every size, less those the request's rules exclude, kept to its
        deals' buyers in a private auction (appended, or set at its position ``at`` in the request's imps once
        retrieval chose them); an imp left without any counts its reason."""
        if exclusion.excluded:
            kept = [exclusion.kept(e) for e in per_size]
            if not any(kept) and any(per_size):
                pending.imp_reason = self._count_imp(pending.imp_reason,
                                                     exclusion.reason([c for e in per_size for c in e]))
                if at is not None:
                    pending.candidates[at], pending.offers[at] = (), None
                return
            per_size = kept
        if len(per_size) == 1 and imp.pmp is None:  # the common case: one size, no deals
            candidates: Sequence[Candidate] = per_size[0]
            offers = None
        else:
            candidates, offers = [], {}
            unmatched = False  # eligible candidates, none of which can buy the private auction's deals
            for eligible in per_size:
                if eligible and imp.pmp is not None:
                    eligible, size_offers = deal_candidates(eligible, imp, len(candidates), pending.seats,
                                                            pending.floors[i], self.catalog.currencies)
                    offers.update(size_offers)
                    unmatched = unmatched or not eligible
                candidates.extend(eligible)
            offers = offers or None
            if not candidates:
                pending.imp_reason = self._count_imp(pending.imp_reason,
                                                     "no_matching_deal" if unmatched else "no_eligible_creative")
                if at is None:
                    return
        if at is None:
            pending.add_imp(i, record, candidates, offers)
        else:
            pending.candidates[at] = candidates
            pending.offers[at] = offers
            pending.has_deals = pending.has_deals or bool(offers)
            pending.n_rows += len(candidates)

    # -- batch -------------------------------------------------------------------------------------
    def score_batch(self, pendings: Sequence[Pending]) -> list[Outcome | Exception]:
        """One Outcome per request (or the exception a bug raised while pricing it: the batcher raises it in
        that request's handler only). ``tmax`` is checked first; the rest run through the stages in batches of
        at most ``capacity`` imps (a request with more imps is a batch of its own)."""
        outcomes: list[Outcome | Exception | None] = [None] * len(pendings)
        now = time.perf_counter()
        live = []
        for k, pending in enumerate(pendings):
            tmax = pending.request.tmax
            if tmax and (now - pending.received) * 1000.0 >= tmax:
                outcomes[k] = self._no_bid("tmax")
            else:
                live.append(k)
        for positions, features in self._batches(pendings, live):
            batch = Batch([pendings[k] for k in positions], self.catalog.candidates, features, read_clock(self.now))
            self.run(batch)
            for k, outcome in zip(positions, batch.outcomes):
                outcomes[k] = outcome
        return outcomes  # type: ignore[return-value]

    def _batches(self, pendings: Sequence[Pending], live: list[int]) -> Iterator[tuple[list[int], dict]]:
        """Consecutive requests whose imps fit the feature buffer together."""
        positions: list[int] = []
        imps = 0
        for k in live:
            n = len(pendings[k].imp_ids)
            if n > self.capacity:  # alone, in a buffer of its own (scored row by row: not in the graphs' buffer)
                yield [k], self.scorer.spec.allocate(n)
                continue
            if imps + n > self.capacity:
                yield positions, self.features
                positions, imps = [], 0
            positions.append(k)
            imps += n
        if positions:
            yield positions, self.features

    def run(self, batch: Batch) -> None:
        """The stages after ``prepare``, over one batch; each request's outcome lands in ``batch.outcomes``."""
        self.featurize(batch)
        if self.retriever is not None:
            self.retrieve(batch)
        if self.layout(batch):
            self.score(batch)
            self.value(batch)
            if self.explore:
                self.explore_rows(batch)
            self.shade(batch)
            if self.money:
                self.budget(batch)
        self.encode_all(batch)

    def _live(self, batch: Batch) -> list[Pending]:
        outcomes = batch.outcomes
        return [p for k, p in enumerate(batch.pendings) if outcomes[k] is None]

    # -- featurize ---------------------------------------------------------------------------------
    def featurize(self, batch: Batch) -> None:
        """Every imp of the batch's requests into ``batch.features``, once; a request whose records cannot be
        featurized gets its 400 and leaves the batch (the others are featurized without it)."""
        featurizer = self.scorer.featurizer
        self._gather_imps(batch)
        try:
            featurizer.transform_into(batch.features, batch.records)
            return
        except ValueError:
            pass
        for k, pending in enumerate(batch.pendings):  # find the request(s) at fault
            try:
                featurizer.transform_into(batch.features, pending.records)
            except ValueError as exc:
                batch.outcomes[k] = Outcome(400, error_body(f"cannot featurize the request: {exc}"), "bad_request")
        self._gather_imps(batch)
        featurizer.transform_into(batch.features, batch.records)

    @staticmethod
    def _gather_imps(batch: Batch) -> None:
        records, imp_ids = batch.records, batch.imp_ids
        del records[:], imp_ids[:]
        outcomes = batch.outcomes
        for k, pending in enumerate(batch.pendings):
            if outcomes[k] is not None:
                continue
            pending.first_imp = len(records)
            records.extend(pending.records)
            imp_ids.extend(pending.imp_ids)

    # -- retrieve (large catalogs) -------------------------------------------------------------------
    def retrieve(self, batch: Batch) -> None:
        """Choose the candidates of every waiting imp of the batch: the imp tower runs once over the batch's
        featurized imps (in chunks of its buffers), then the targeting filters and the top K of every imp and size,
        searched together (``Retriever.eligible_many``). A request whose imps get no candidate gets its no-bid."""
        outcomes, pendings = batch.outcomes, batch.pendings
        todo = [k for k, pending in enumerate(pendings) if outcomes[k] is None and pending.waiting]
        if not todo:
            return
        retriever = self.retriever
        vectors = retriever.queries_of(batch.features, batch.n_imps)
        # per imp and size: (w, h, domain, exchange, blocked, deal ids, excluded), its imp vector row
        wanted, rows = [], []
        for k in todo:
            pending = pendings[k]
            domain, exchange, blocked = pending.where
            for position, (imp, sizes, exclusion) in enumerate(pending.waiting):
                dealids = [d.id for d in imp.pmp.deals] if imp.pmp is not None and imp.pmp.deals else ()
                for w, h in sizes:
                    wanted.append((w, h, domain, exchange, blocked, dealids, exclusion.excluded))
                    rows.append(pending.first_imp + position)
        found = iter(retriever.eligible_many(vectors[rows], wanted))
        for k in todo:
            pending = pendings[k]
            for position, (imp, sizes, exclusion) in enumerate(pending.waiting):
                per_size = [next(found) for _ in sizes]
                if exclusion.excluded and not any(per_size):  # none left: the rules' doing, or none eligible?
                    domain, exchange, blocked = pending.where
                    per_size = [self.catalog.eligible(w, h, domain, exchange, blocked) for w, h in sizes]
                self._add_candidates(pending, pending.imp_ids[position], imp, pending.records[position], per_size,
                                     at=position, exclusion=exclusion)
            pending.waiting = None
            if not pending.n_rows:
                outcomes[k] = self._no_bid(pending.imp_reason or "no_eligible_creative")

    # -- layout ------------------------------------------------------------------------------------
    def layout(self, batch: Batch) -> int:
        """The rows of the batch's live requests as arrays (``Batch.row_*``: the engine's arrays, reused, of which
        the batch's rows are the first ``n_rows``); returns their number."""
        live = self._live(batch)
        n = 0
        for pending in live:
            n += pending.n_rows
        if n == 0:
            return 0
        rows = self._rows
        if len(rows[0]) < n:
            rows = self._rows = empty_rows(max(n, 2 * len(rows[0])))
        (batch.row_imp, batch.row_cand, batch.row_floor, batch.row_value, batch.deal_floor,
         batch.deal_private) = rows
        batch.n_rows = layout_rows(live, batch.row_imp, batch.row_cand, batch.row_floor, batch.row_value)
        for pending in live:
            if not pending.has_deals:
                continue
            row = pending.first_row
            for candidates, offers in zip(pending.candidates, pending.offers):
                for position, offer in (offers or {}).items():
                    batch.offers[row + position] = offer
                    batch.deal_floor[row + position] = offer.floor
                    batch.deal_private[row + position] = offer.private
                row += len(candidates)
        return batch.n_rows

    # -- score ---------------------------------------------------------------------------------------
    def score(self, batch: Batch) -> None:
        """``batch.scores``: every row's probability (float32), in calls of at most ``max_batch`` rows that never
        split a request (a request with more rows is scored alone, in calls of its own)."""
        factorized = self.factorized
        scorer = factorized if factorized is not None and batch.features is factorized.imp_inputs else self.scorer
        limit = self.scorer.max_batch
        metrics = self.metrics
        live = self._live(batch)
        if batch.n_rows <= limit:  # the common case: one call, its output read where ORT wrote it
            batch.scores = scorer.score_rows(batch, 0, batch.n_rows)
            metrics.batch_rows.observe(batch.n_rows)
            metrics.batch_requests.observe(len(live))
            return
        scores = batch.scores = np.empty(batch.n_rows, dtype=np.float32)
        start = stop = 0
        requests = 0
        for pending in live:
            n = pending.n_rows
            if n > limit or stop - start + n > limit:
                if requests:
                    scores[start:stop] = scorer.score_rows(batch, start, stop)
                    metrics.batch_rows.observe(stop - start)
                    metrics.batch_requests.observe(requests)
                start, requests = stop, 0
            stop += n
            requests += 1
            if n > limit:  # alone
                scores[start:stop] = scorer.score_rows(batch, start, stop)
                metrics.batch_rows.observe(n)
                metrics.batch_requests.observe(1)
                start, requests = stop, 0
        if requests:
            scores[start:stop] = scorer.score_rows(batch, start, stop)
            metrics.batch_rows.observe(stop - start)
            metrics.batch_requests.observe(requests)

    # -- value ---------------------------------------------------------------------------------------
    def value(self, batch: Batch) -> None:
        """Per imp of the batch its best row at or above its floor and that row's value (``bidder.pricing``)."""
        n = batch.n_imps
        imps = self._imps
        if len(imps[0]) < n:
            imps = self._imps = _imp_arrays(n)
        best_row, best_value, via_deal, order = imps
        best_rows(batch.n_rows, n, batch.row_imp, batch.row_cand, batch.scores, batch.row_value, batch.row_floor,
                  batch.deal_floor, batch.deal_private, best_row, best_value, via_deal, order)
        # Python numbers: the stages after read them one by one
        batch.best_row, batch.best_value = best_row[:n].tolist(), best_value[:n].tolist()
        batch.via_deal = via_deal[:n].tolist()
        for row in batch.offers:  # the engine's row arrays hold no deal terms between batches
            batch.deal_floor[row] = np.nan
            batch.deal_private[row] = 0

    # -- explore -------------------------------------------------------------------------------------
    def explore_rows(self, batch: Batch) -> None:
        """With probability ``explore`` per imp, the imp bids with a row drawn uniformly among its open-auction
        rows at or above its floor instead of its best one. Per imp, ``batch.propensity`` is the probability that
        the row it bids with was chosen: ``explore / k + (1 - explore)`` for the best of ``k`` rows, ``explore /
        k`` for another (1 for an imp with one such row, or bidding through a deal, which is never explored)."""
        n, rows = batch.n_imps, batch.n_rows
        row_imp = batch.row_imp[:rows]
        values = batch.scores[:rows].astype(np.float64) * batch.row_value[:rows] * 1000.0
        open_rows = values >= batch.row_floor[:rows]
        for row in batch.offers:  # deal rows are a deal's, never a draw
            open_rows[row] = False
        share, rng = self.explore, self._explore_rng
        propensity = batch.propensity = [1.0] * n
        best_row, best_value = batch.best_row, batch.best_value
        for j in range(n):
            best = best_row[j]
            if best < 0 or batch.via_deal[j]:
                continue
            choices = np.flatnonzero(open_rows & (row_imp == j))
            k = len(choices)
            if k < 2:
                continue
            row = int(choices[rng.randrange(k)]) if rng.random() < share else best
            propensity[j] = share / k + (1.0 - share if row == best else 0.0)
            if row != best:
                best_row[j], best_value[j] = row, float(values[row])

    # -- shade ---------------------------------------------------------------------------------------
    def shade(self, batch: Batch) -> None:
        """First-price open-auction bids lowered to the surplus-maximising bid, all imps of the batch in one
        search (``bidder.shading``), over the imps' features where ``featurize`` wrote them.

        Fills ``batch.shaded`` (imp -> bid) and ``batch.unprofitable`` (imps no bid has a positive expected
        surplus for). Deal bids keep their deal's terms; second-price imps, and first-price ones when the bundle
        has no win-price model, keep their value. If the search fails, the requests it covered fail.
        """
        market = self.market
        if market is None:
            return
        imps: list[int] = []
        values: list[float] = []
        floors: list[float] = []
        best_row, best_value, via_deal, imp_ids = batch.best_row, batch.best_value, batch.via_deal, batch.imp_ids
        first_price = []
        for k, pending in enumerate(batch.pendings):
            if batch.outcomes[k] is not None or pending.request.at != FIRST_PRICE:
                continue
            first_price.append(k)
            imp_floors = pending.floors
            for j in range(pending.first_imp, pending.first_imp + len(pending.imp_ids)):
                if best_row[j] >= 0 and not via_deal[j]:
                    imps.append(j)
                    # the unrounded value: a value within a micro-dollar of the floor leaves no surplus
                    values.append(best_value[j])
                    floors.append(imp_floors[imp_ids[j]])
        if not imps:
            return
        try:
            bids, surplus = market.shade_rows(batch.features[SPARSE_INPUT], imps, values, floors)
        except Exception as exc:  # noqa: BLE001 - the requests it covered fail, the others bid
            for k in first_price:
                batch.outcomes[k] = exc
            return
        shaded, unprofitable = batch.shaded, batch.unprofitable
        for j, bid, gain in zip(imps, bids, surplus):
            if gain > 0.0:
                shaded[j] = bid
            else:
                unprofitable.add(j)

    # -- budget ----------------------------------------------------------------------------------------
    def budget(self, batch: Batch) -> None:
        """Each bid of a campaign with money terms: held back outside its flight (``flight``), its price lowered to
        its ``max_cpm`` (``below_floor`` when that is under the floor), held back when the request's user reached
        one of its frequency caps (``frequency_cap``), then, for a budgeted campaign, passed by the pacing hook
        (``Ledger.pass_rate``: ``pacing``) and its price reserved from the campaign's lease (``no_budget`` when the
        lease holds less); a capped campaign without a budget reserves nothing, but its bid is reported with its
        user so that its billing counts. Fills ``batch.prices`` and ``batch.held``; encode reads them."""
        now = batch.now
        terms_of, ledger, notices = self.catalog.terms, self.ledger, self.notices
        prices: dict[int, float] = {}
        held: dict[int, str] = {}
        batch.prices, batch.held = prices, held
        best_row, best_value, via_deal = batch.best_row, batch.best_value, batch.via_deal
        candidates, row_cand, offers, shaded = batch.candidates, batch.row_cand, batch.offers, batch.shaded
        unprofitable = batch.unprofitable
        in_flight: dict[str, bool] = {}  # per campaign: its flight holds ``now`` (one time for the whole batch)
        for k, pending in enumerate(batch.pendings):
            if batch.outcomes[k] is not None:
                continue
            request = pending.request
            floors = pending.floors
            user = None  # read once per request, when a capped campaign bids
            for position, i in enumerate(pending.imp_ids):
                j = pending.first_imp + position
                row = best_row[j]
                if row < 0 or j in unprofitable:
                    continue
                c = candidates[int(row_cand[row])]
                # the price before money terms (``_price``, inline: this runs for every bid)
                if via_deal[j]:
                    price = offers[row].price(best_value[j])
                else:
                    price = shaded.get(j)
                    price = floored_price(best_value[j] if price is None else price, floors[i])
                campaign = c.campaign_id
                terms = terms_of.get(campaign)
                if terms is None:
                    prices[j] = price
                    continue
                flying = in_flight.get(campaign)
                if flying is None:
                    flying = in_flight[campaign] = terms.in_flight(now)
                if not flying:
                    held[j] = "flight"
                    continue
                max_cpm = terms.max_cpm
                if max_cpm is not None and price > max_cpm:
                    if max_cpm < floors[i]:
                        held[j] = "below_floor"
                        continue
                    price = floored_price(max_cpm, floors[i])
                caps = terms.frequency_caps
                budgeted = terms.budgeted
                if budgeted or caps:
                    slot = ledger.slots[campaign]
                    if caps:
                        if user is None:  # without consent to personal data, nobody is capped by user key
                            user = (pending.user() or "").replace("\t", " ")
                        if user and ledger.capped(slot, c.creative_id, user, now):
                            ledger.cap_hits[slot] += 1
                            held[j] = "frequency_cap"
                            continue
                    rate = ledger.pass_rate[slot]
                    if rate < 1.0 and random.random() >= rate:
                        held[j] = "pacing"
                        continue
                    imp = request.imp[i]
                    window = notices.window(imp.exp) if notices is not None else DEFAULT_WINDOW_S
                    if not ledger.reserve(slot, micros(price) if budgeted else 0, bid_id_of(request.id, imp.id), now,
                                          window, user if caps else "", c.creative_id):
                        held[j] = "no_budget"
                        continue
                prices[j] = price

    # -- encode --------------------------------------------------------------------------------------
    def encode_all(self, batch: Batch) -> None:
        """Each live request's answer; a bug met while pricing one request fails that request only."""
        outcomes = batch.outcomes
        logged: list[tuple] | None = [] if self.events is not None else None  # the batch's bid events
        for k in range(len(batch.pendings)):
            if outcomes[k] is None:
                events: list[tuple] | None = [] if logged is not None else None
                try:
                    outcomes[k] = self.encode(batch, k, events)
                except Exception as exc:  # noqa: BLE001 - handed to this request's handler by the batcher
                    outcomes[k] = exc
                    continue
                if events:
                    logged += events  # a request that failed logs no bid: it placed none
        if logged:
            self.events.bids(logged)  # one stamp, one encoding call for the batch's bids

    def encode(self, batch: Batch, k: int, events: list[tuple] | None = None) -> Outcome:
        """Request ``k``'s bids priced (deal terms, shading, rounding: never under the floor) and its BidResponse,
        or the no-bid (each imp without a bid counted under its reason); with the event log on, each bid's event
        (the arguments of ``EventLog.bid``) is added to ``events``."""
        pending = batch.pendings[k]
        request = pending.request
        metrics = self.metrics
        metrics.scored_rows.observe(pending.n_rows)
        imp_reason = pending.imp_reason
        first_price = request.at == FIRST_PRICE
        shading = first_price and self.market is not None
        observe = (metrics.shading_first if first_price else metrics.shading_second).observe
        best_row, best_value, via_deal = batch.best_row, batch.best_value, batch.via_deal
        candidates, row_cand, shaded = batch.candidates, batch.row_cand, batch.shaded
        prices, held = batch.prices, batch.held
        imps, floors = request.imp, pending.floors
        # no deals and no notices: each bid is its creative's fields as encoded once, after its ids and price
        plain = not pending.has_deals and self.notices is None
        bids: list = []  # Bid structs, or each bid's JSON when ``plain``
        deals: list[DealOffer | None] = []
        for position, i in enumerate(pending.imp_ids):
            j = pending.first_imp + position
            row = best_row[j]
            if row < 0:
                if pending.candidates[position]:
                    imp_reason = self._count_imp(imp_reason, "below_floor")
                continue
            if j in batch.unprofitable:
                imp_reason = self._count_imp(imp_reason, "no_surplus")
                continue
            if held is not None:  # the budget stage ran: its price, or why the imp is held back
                price = prices.get(j)
                if price is None:
                    imp_reason = self._count_imp(imp_reason, held.get(j, "below_floor"))
                    continue
            value = best_value[j]
            deal: DealOffer | None = batch.offers[row] if via_deal[j] else None
            if deal is not None:
                if held is None:
                    price = deal.price(value)
                if not shading:
                    observe(1.0)
            elif shading:
                if held is None:
                    price = floored_price(shaded[j], floors[i])
                observe(price / value)
            else:
                if held is None:
                    price = floored_price(value, floors[i])
                observe(1.0)
            c = candidates[int(row_cand[row])]
            imp = imps[i]
            deals.append(deal)
            bid_id = bid_id_of(request.id, imp.id)
            if events is not None:
                record = pending.records[position]
                events.append((bid_id, record, c.layer, c.campaign_id, c.creative_id, self.scorer.model_id,
                               float(batch.scores[row]), value, price, price / value if value > 0 else 1.0, floors[i],
                               request.at, record["adexchange"], pending.user(),  # no consent: no user key logged
                               batch.propensity[j] if batch.propensity is not None else 1.0))
            if pending.rate != 1.0:
                price = self._in_currency(price, imp, floors[i], pending)
            if plain:  # the bid's JSON: its ids and price, then its creative's fields as encoded once
                bids.append(b"".join((b'{"id":', _encode(bid_id), b',"impid":', _encode(imp.id), b',"price":',
                                      _encode(price), self._bid_tails.get(c.index) or self._bid_tail(c))))
                continue
            template = self._bid_templates.get(c.index) or self._bid_template(c)
            bids.append(replace(template, id=bid_id, impid=imp.id, price=price, dealid=deal.dealid) if deal else
                        replace(template, id=bid_id, impid=imp.id, price=price))
            if self.notices is not None:
                self._sign(bids[-1], pending, imp, deal, c, batch.now)
        if not bids:
            return self._no_bid(imp_reason or "below_floor")
        metrics.bids.inc(len(bids))
        if plain:  # what encode_response writes for BidResponse(id, [SeatBid(bids)], currency), field for field
            return Outcome(200, b"".join((b'{"id":', _encode(request.id), b',"seatbid":[{"bid":[', b",".join(bids),
                                          _SEAT_CLOSE, _encode(pending.currency), b"}")))
        seatbid = seat_bids(bids, deals) if pending.has_deals else [SeatBid(bid=bids)]
        return Outcome(200, encode_response(BidResponse(id=request.id, seatbid=seatbid, cur=pending.currency)))

    def _bid_template(self, c: Candidate) -> Bid:
        """The fields of ``c``'s bids that are the creative's, built once per engine (a bid is a copy with its
        ids and price: msgspec matches the 16 keywords of a whole Bid several times slower than 3)."""
        meta = c.meta
        template = self._bid_templates[c.index] = Bid(
            id="", impid="", price=0.0, adid=c.creative_id, crid=c.creative_id, adomain=c.adomain, w=c.w, h=c.h,
            mtype=BANNER, nurl=c.nurl, cid=c.campaign_id, adm=c.markup, cat=meta.bid_cat,
            cattax=meta.cattax if meta.bid_cat else None, attr=meta.bid_attr)
        return template

    def _bid_tail(self, c: Candidate) -> bytes:
        """The JSON of ``c``'s bid fields after ``price`` (``adid`` on, with the closing brace), as msgspec encodes
        them in a whole Bid: a plain bid is its ids and price followed by these bytes."""
        template = self._bid_templates.get(c.index) or self._bid_template(c)
        encoded = _encode(template)  # '{"id":"","impid":"","price":0.0,"adid":...}': the first ',"adid":' is the field
        tail = self._bid_tails[c.index] = encoded[encoded.index(b',"adid":'):]
        return tail

    @staticmethod
    def _in_currency(price: float, imp: Imp, floor_usd: float, pending: Pending) -> float:
        """A USD price in the response's currency, in micro-units, never under the imp's floor there."""
        floor = imp.bidfloor if imp.bidfloorcur == pending.currency else floor_usd * pending.rate
        return max(round(price * pending.rate, 6), floor)

    def _sign(self, bid: Bid, pending: Pending, imp: Imp, deal: DealOffer | None, c: Candidate, now: float) -> None:
        """Notices on: the bid's notice URLs and click link carry its signed facts, issued at ``now`` (the batch's
        time on the engine's clock, at which the budget stage reserved its price: see ``Ledger.reserve``)."""
        self.notices.dress(bid, pending.request.id, imp.exp, deal.seat if deal is not None else DEFAULT_SEAT, c,
                           pending.exchange, self.scorer.model_id, now, pending.currency)

    # -- /predict ----------------------------------------------------------------------------------
    def predict(self, body: bytes) -> Outcome:
        try:
            records = decode_predict(body)
        except RequestError as exc:
            return Outcome(400, error_body(exc.message, exc.path), "bad_request")
        try:
            ctr = self.scorer.predict(records)
        except ValueError as exc:
            message = str(exc)
            where = _FEATURIZER_ERROR.match(message)  # "record 3: field 'timestamp': ..."
            path = "$.records" if where is None else f"$.records[{where[1]}]" + (f".{where[2]}" if where[2] else "")
            return Outcome(400, error_body(message, path), "bad_record")
        return Outcome(200, _encoder.encode(_PredictResponse(ctr=ctr.tolist(), model=self.scorer.model_id)))

    def _count_imp(self, current: str | None, reason: str) -> str:
        self.metrics.nobid_imps.labels(reason).inc()
        return current or reason

    def _no_bid(self, reason: str) -> Outcome:
        self.metrics.nobids.labels(reason).inc()
        return Outcome(204, b"", reason)

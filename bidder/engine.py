"""The bid path without HTTP: body bytes in, status and body bytes out.

Stages, in the order a request meets them (one function each):

    prepare   decode → the imp records → eligible candidates per imp (no-bid and 400 answers end here);
              with a large catalog the imps wait for ``retrieve``
    batch     ``bidder.batching.Batcher``: every request prepared in one loop turn joins one batch
    retrieve  large catalogs: the imp tower once for every imp of the batch, then per imp the targeting
              filters and the top K by the two towers (``bidder.retrieval``)
    score     the batch's rows in as few ORT calls as ``max_batch`` allows (``tmax`` checked first)
    value     best candidate per imp at or above its floor (``bidder.pricing``)
    shade     first-price imps of the whole batch: the surplus-maximising bid (``bidder.shading``)
    encode    the BidResponse

``bid(body)`` runs all of them for one request, synchronously; the server runs ``prepare`` in the
request's handler and ``submit``s what has rows to score.
"""
from __future__ import annotations

import asyncio
import re
import time
from typing import Callable, NamedTuple, Sequence

import msgspec
import numpy as np

from bidder._features import group_rows
from bidder.batching import Batcher
from bidder.campaigns import Candidate, Catalog
from bidder.deals import DealOffer, deal_candidates, seat_bids
from bidder.factorized import FactorizedScorer
from bidder.metrics import NO_BID_REASONS, Metrics
from bidder.openrtb import (FIRST_PRICE, Bid, BidRequest, BidResponse, Imp, RequestError, SeatBid, decode_predict,
                            decode_request, encode_response, imp_fields, imp_sizes, request_fields)
from bidder.pricing import PricedBid, best_per_imp, bid_cpm, floored_price
from bidder.retrieval import Retriever
from bidder.scorer import Scorer
from bidder.shading import WinModel
from bidder.spec import SPARSE_INPUT

__all__ = ["BidEngine", "Outcome", "Pending", "NO_BID_REASONS"]


class Outcome(NamedTuple):  # a tuple: one is built per request, a frozen dataclass costs several times more
    status: int
    body: bytes = b""
    reason: str | None = None  # no-bid reason (204) or error kind (4xx)


class Pending:
    """A decoded bid request with rows to score.

    ``groups`` holds (imp record, eligible candidates) per imp and size; the rows are their
    concatenation, row ``r`` being ``candidates[r]`` for imp ``owners[r]``; ``offers`` maps a row to the
    deal its candidate can bid through. With a large catalog they are empty until ``BidEngine.retrieve``
    fills them from ``waiting``: per imp (its index, the imp, its record, its sizes).
    """

    __slots__ = ("request", "received", "groups", "owners", "candidates", "floors", "offers", "imp_reason",
                 "waiting", "where")

    def __init__(self, request: BidRequest, received: float, groups: list[tuple[dict, Sequence[Candidate]]],
                 owners: list[int], candidates: list[Candidate], floors: list[float],
                 offers: dict[int, DealOffer], imp_reason: str | None,
                 waiting: list[tuple[int, Imp, dict, list[tuple[int, int]]]] | None = None,
                 where: tuple[str | None, str | None, frozenset[str]] | None = None):
        self.request = request
        self.received = received
        self.groups = groups
        self.owners = owners
        self.candidates = candidates
        self.floors = floors          # per imp of the request (USD CPM)
        self.offers = offers
        self.imp_reason = imp_reason  # first reason an imp of this request got no rows
        self.waiting = waiting        # imps whose candidates retrieval chooses; None once chosen (or never)
        self.where = where            # (domain, exchange, blocked advertiser domains) for the targeting filters

    def imp_records(self) -> dict[int, dict]:
        """imp index -> its record (the raw fields the imp's rows share)."""
        out: dict[int, dict] = {}
        owners = self.owners
        row = 0
        for record, eligible in self.groups:
            out[owners[row]] = record
            row += len(eligible)
        return out

    @property
    def rows(self) -> list[tuple[dict, dict]]:
        """(candidate layer, imp record) pairs: the featurizer's overlay rows for the canonical graph."""
        return [(c.layer, record) for record, eligible in self.groups for c in eligible]


class _PredictResponse(msgspec.Struct):
    ctr: list[float]
    model: str


_NOTHING_BLOCKED: frozenset[str] = frozenset()
_NO_IMPS: frozenset[int] = frozenset()
_FEATURIZER_ERROR = re.compile(r"record (\d+): (?:field '([^']*)')?")
_encoder = msgspec.json.Encoder()


def error_body(message: str, path: str = "$") -> bytes:
    return _encoder.encode({"error": message, "path": path})


class BidEngine:
    """Scores and prices bid requests with one scorer and one catalog (swapped whole on reload).

    The engine owns its batcher: requests prepared against this catalog are scored by this scorer,
    even if a reload installs a new engine while they wait for their turn.
    """

    def __init__(self, scorer: Scorer, catalog: Catalog, metrics: Metrics, utc_offset_hours: float = 0.0,
                 now: float | Callable[[], float] | None = None, factorized: FactorizedScorer | None = None,
                 market: WinModel | None = None, retriever: Retriever | None = None):
        self.scorer = scorer
        self.catalog = catalog
        # large catalogs: the top K eligible creatives per imp by the two towers; None: every eligible creative
        self.retriever = retriever
        # the bundle's factorized graphs, their candidate parts computed for this catalog; None: row scoring
        self.factorized = factorized
        if factorized is not None:
            factorized.set_candidates([c.layer for c in catalog.candidates])
        self.market = market  # the bundle's win-price model; None: first-price imps are bid at their value
        self.metrics = metrics
        self.utc_offset_hours = utc_offset_hours
        # Unix seconds every request is taken to arrive at (examples, tests), or a clock to read them from
        # (bidder.clock.Clock: a simulated day); None: the wall clock
        self.now = now
        self.batcher = Batcher(self.score_batch)

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
        if request.cur and "USD" not in request.cur:
            return self._no_bid("currency")
        now = self.now() if callable(self.now) else self.now
        shared = request_fields(request, exchange, now=now, utc_offset_hours=self.utc_offset_hours)
        domain = shared["domain"]
        blocked = frozenset(request.badv) if request.badv else _NOTHING_BLOCKED
        catalog = self.catalog
        groups: list[tuple[dict, tuple[Candidate, ...]]] = []
        owners: list[int] = []
        chosen: list[Candidate] = []
        floors: list[float] = []
        offers: dict[int, DealOffer] = {}  # row -> the deal its candidate can bid through
        imp_reason: str | None = None
        waiting: list[tuple[int, Imp, dict, list[tuple[int, int]]]] = []  # imps for retrieve (large catalogs)
        for i, imp in enumerate(request.imp):
            floors.append(imp.bidfloor)
            if imp.bidfloorcur != "USD":  # no FX table: a floor we cannot compare is a floor we cannot meet
                imp_reason = self._count_imp(imp_reason, "floor_currency")
                continue
            sizes = imp_sizes(imp)
            if not sizes:
                imp_reason = self._count_imp(imp_reason, "unsupported_format" if imp.banner is None
                                             else "no_eligible_creative")
                continue
            if self.retriever is not None:  # the candidates come from the batch's imp vectors (retrieve)
                waiting.append((i, imp, imp_fields(shared, imp), sizes))
                continue
            per_size = [catalog.eligible(w, h, domain, exchange, blocked) for w, h in sizes]
            record = imp_fields(shared, imp) if any(per_size) else None
            imp_reason = self._add_rows(i, imp, record, per_size, groups, owners, chosen, offers, imp_reason)
        if waiting:
            return Pending(request, received, groups, owners, chosen, floors, offers, imp_reason, waiting,
                           (domain, exchange, blocked))
        if not groups:
            return self._no_bid(imp_reason or "no_eligible_creative")
        return Pending(request, received, groups, owners, chosen, floors, offers, imp_reason)

    # -- retrieve (large catalogs, a batch of requests) ----------------------------------------------
    def retrieve(self, batch: Sequence[Pending]) -> list[Outcome | None]:
        """Choose the candidates of every waiting imp of ``batch``: the imp tower runs once for all of them (in
        chunks of its buffers), then the targeting filters and the top K of every imp and size, searched
        together (``Retriever.eligible_many``).

        Per request None (its rows are ready) or the Outcome that ends it: the no-bid when no imp has a
        candidate, 400 when a record cannot be featurized (that request alone: the others are retried
        without it).
        """
        outcomes: list[Outcome | None] = [None] * len(batch)
        todo = [k for k, pending in enumerate(batch) if pending.waiting is not None]
        if not todo:
            return outcomes
        retriever = self.retriever
        try:
            vectors = retriever.queries([record for k in todo for _, _, record, _ in batch[k].waiting])
        except ValueError:  # some record is bad: each request's imps on their own
            vectors, ready = [], []
            for k in todo:
                try:
                    vectors.append(retriever.queries([record for _, _, record, _ in batch[k].waiting]))
                    ready.append(k)
                except ValueError as exc:
                    outcomes[k] = Outcome(400, error_body(f"cannot featurize the request: {exc}"), "bad_request")
            if not ready:
                return outcomes
            todo, vectors = ready, np.concatenate(vectors)
        wanted, rows = [], []  # per imp and size: (w, h, domain, exchange, blocked, deal ids), its imp vector row
        row = 0
        for k in todo:
            domain, exchange, blocked = batch[k].where
            for _, imp, _, sizes in batch[k].waiting:
                dealids = [d.id for d in imp.pmp.deals] if imp.pmp is not None and imp.pmp.deals else ()
                for w, h in sizes:
                    wanted.append((w, h, domain, exchange, blocked, dealids))
                    rows.append(row)
                row += 1
        found = iter(retriever.eligible_many(vectors[rows], wanted))
        for k in todo:
            outcomes[k] = self._choose(batch[k], found)
        return outcomes

    def _choose(self, pending: Pending, found) -> Outcome | None:
        """Fill ``pending``'s rows from ``found`` (the retrieved candidates of each waiting imp and size, in
        order); the no-bid if no imp has any."""
        groups, owners, chosen, offers = pending.groups, pending.owners, pending.candidates, pending.offers
        imp_reason = pending.imp_reason
        for i, imp, record, sizes in pending.waiting:
            imp_reason = self._add_rows(i, imp, record, [next(found) for _ in sizes], groups, owners, chosen, offers,
                                        imp_reason)
        pending.waiting = None
        pending.imp_reason = imp_reason
        if not groups:
            return self._no_bid(imp_reason or "no_eligible_creative")
        return None

    def _add_rows(self, i: int, imp: Imp, record: dict | None, per_size: Sequence[Sequence[Candidate]],
                  groups: list, owners: list[int], chosen: list[Candidate], offers: dict[int, DealOffer],
                  imp_reason: str | None) -> str | None:
        """Append imp ``i``'s rows (its eligible candidates of each size, kept to its deals' buyers in a private
        auction) to a request's rows; returns the request's first no-bid reason, this imp's if it got none."""
        bids = False  # some size of the imp has candidates
        unmatched = False  # eligible candidates, none of which can buy the private auction's deals
        for eligible in per_size:
            if eligible and imp.pmp is not None:
                eligible, imp_offers = deal_candidates(eligible, imp, len(chosen))
                offers.update(imp_offers)
                unmatched = unmatched or not eligible
            if not eligible:
                continue
            groups.append((record, eligible))
            owners.extend([i] * len(eligible))
            chosen.extend(eligible)
            bids = True
        if not bids:
            imp_reason = self._count_imp(imp_reason, "no_matching_deal" if unmatched else "no_eligible_creative")
        return imp_reason

    # -- score (a batch of requests) -----------------------------------------------------------------
    def score_batch(self, batch: Sequence[Pending]) -> list[Outcome | Exception]:
        """One Outcome per request: the batch's rows scored in chunks of at most ``max_batch`` rows.

        A request whose pricing raised gets the exception instead (the batcher raises it in that
        request's handler only).

        A request is never split across chunks; one with more rows than ``max_batch`` is scored alone,
        in chunks of its own. ``tmax`` is checked here, just before scoring.
        """
        outcomes: list[Outcome | None] = [None] * len(batch)
        limit = self.scorer.max_batch
        now = time.perf_counter()
        if self.retriever is not None:
            outcomes = self.retrieve(batch)
        chunk: list[int] = []
        chunk_rows = 0
        for k, pending in enumerate(batch):
            if outcomes[k] is not None:  # retrieval ended it
                continue
            tmax = pending.request.tmax
            if tmax and (now - pending.received) * 1000.0 >= tmax:
                outcomes[k] = self._no_bid("tmax")
                continue
            n = len(pending.candidates)
            if n > limit:
                outcomes[k] = self._score_alone(pending)
                continue
            if chunk_rows + n > limit:
                self._score_chunk(batch, chunk, chunk_rows, outcomes)
                chunk, chunk_rows = [], 0
            chunk.append(k)
            chunk_rows += n
        if chunk:
            self._score_chunk(batch, chunk, chunk_rows, outcomes)
        return outcomes  # type: ignore[return-value]

    def _score_chunk(self, batch: Sequence[Pending], chunk: list[int], rows: int,
                     outcomes: list[Outcome | None]) -> None:
        try:
            scores, featurized = self._score_rows([batch[k] for k in chunk], rows)
        except ValueError:
            for k in chunk:  # one request's bad row must not fail the others: score them one by one
                outcomes[k] = self._score_alone(batch[k])
            return
        metrics = self.metrics
        metrics.batch_rows.observe(rows)
        metrics.batch_requests.observe(len(chunk))
        pendings, slices = [], []
        start = 0
        for k in chunk:
            pending = batch[k]
            n = len(pending.candidates)
            pendings.append(pending)
            slices.append(scores[start:start + n])
            start += n
        for k, outcome in zip(chunk, self.price_all(pendings, slices, featurized)):
            outcomes[k] = outcome

    def _score_rows(self, pendings: Sequence[Pending], rows: int) -> tuple[list[float], list[dict] | None]:
        """The ``rows`` rows of ``pendings`` as Python floats (one ORT call per ``max_batch`` rows), and the
        imp records featurized on the way: record ``k`` of the list is row ``k`` of the factorized graph's
        imp inputs (None when the rows went through ``model.onnx``)."""
        factorized = self.factorized
        if factorized is None:
            return self._score_with_model(pendings, rows), None
        # factorized: each imp record featurized once; a row only names its imp and its candidate
        groups = pendings[0].groups if len(pendings) == 1 else [group for p in pendings for group in p.groups]
        records: list[dict] = []
        limit = factorized.max_rows
        if rows <= limit:  # the common case: straight into the graph's row buffers
            group_rows(groups, records, factorized.row_imp, factorized.row_cand)
        else:
            row_imp, row_cand = np.empty(rows, dtype=np.int64), np.empty(rows, dtype=np.int64)
            group_rows(groups, records, row_imp, row_cand)
        n_imps = len(records)
        if n_imps > factorized.max_imps:  # more imps than the buffers hold
            return self._score_with_model(pendings, rows), None
        self.scorer.featurizer.transform_into(factorized.imp_inputs, records)
        if rows <= limit:
            return factorized.run(n_imps, rows).tolist(), records
        scores: list[float] = []
        for start in range(0, rows, limit):
            n = min(limit, rows - start)
            factorized.row_imp[:n] = row_imp[start:start + n]
            factorized.row_cand[:n] = row_cand[start:start + n]
            scores.extend(factorized.run(n_imps, n).tolist())
        return scores, records

    def _score_with_model(self, pendings: Sequence[Pending], rows: int) -> list[float]:
        """Every row through ``model.onnx``, in chunks of ``max_batch``."""
        all_rows = pendings[0].rows if len(pendings) == 1 else [row for p in pendings for row in p.rows]
        scorer = self.scorer
        return (scorer.score(all_rows) if rows <= scorer.max_batch else scorer.predict(all_rows)).tolist()

    def _score_alone(self, pending: Pending) -> Outcome | Exception:
        rows = len(pending.candidates)
        try:
            scores, featurized = self._score_rows([pending], rows)
        except ValueError as exc:
            return Outcome(400, error_body(f"cannot featurize the request: {exc}"), "bad_request")
        self.metrics.batch_rows.observe(rows)
        self.metrics.batch_requests.observe(1)
        return self.price_all([pending], [scores], featurized)[0]

    # -- value, shade, encode ----------------------------------------------------------------------
    def price(self, pending: Pending, scores: Sequence[float]) -> Outcome:
        """Best bid per imp from the request's row scores (shaded in a first-price auction), encoded; or the no-bid."""
        outcome = self.price_all([pending], [scores])[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def price_all(self, pendings: Sequence[Pending], scores: Sequence[Sequence[float]],
                  featurized: list[dict] | None = None) -> list[Outcome | Exception]:
        """``price`` for requests scored together: their first-price imps are shaded in one call.

        ``featurized``: the imp records whose features the factorized graph's imp inputs hold, in their
        rows' order (``_score_rows``); shading reads them there instead of featurizing again.

        A bug met while pricing a request is returned instead of raised: it fails that request only.
        """
        valued: list[dict[int, PricedBid] | Exception] = []
        for pending, request_scores in zip(pendings, scores):
            try:
                valued.append(self.value(pending, request_scores))
            except Exception as exc:  # noqa: BLE001 - handed to this request's handler by the batcher
                valued.append(exc)
        try:
            unprofitable = self.shade(pendings, valued, featurized)
        except Exception as exc:  # noqa: BLE001 - the shading call failed: the requests it covered fail
            unprofitable = [_NO_IMPS] * len(pendings)
            valued = [exc if pending.request.at == FIRST_PRICE and not isinstance(best, Exception) else best
                      for pending, best in zip(pendings, valued)]
        outcomes: list[Outcome | Exception] = []
        for pending, best, dropped in zip(pendings, valued, unprofitable):
            if isinstance(best, Exception):
                outcomes.append(best)
                continue
            try:
                outcomes.append(self.encode(pending, best, dropped))
            except Exception as exc:  # noqa: BLE001
                outcomes.append(exc)
        return outcomes

    def value(self, pending: Pending, scores: Sequence[float]) -> dict[int, PricedBid]:
        """Per imp the best candidate at or above its floor, priced at its value (``bidder.pricing``)."""
        self.metrics.scored_rows.observe(len(scores))
        return best_per_imp(pending.owners, pending.candidates, scores, pending.floors, pending.offers)

    def shade(self, pendings: Sequence[Pending], valued: Sequence[dict[int, PricedBid] | Exception],
              featurized: list[dict] | None = None) -> list[set[int] | frozenset[int]]:
        """Lower first-price open-auction bids to the surplus-maximising bid, all imps in one call (``bidder.shading``).

        Changes the bids of ``valued`` in place; returns per request the imps left without a bid
        because no bid has a positive expected surplus. Deal bids keep their deal's terms; second-price
        imps, and first-price ones when the bundle has no win-price model, keep their value.
        """
        metrics = self.metrics
        market = self.market
        unprofitable: list[set[int] | frozenset[int]] = [_NO_IMPS] * len(pendings)
        todo: list[tuple[int, PricedBid]] = []  # (request position, its open-auction bid) per imp to shade
        records: list[dict] = []
        values: list[float] = []
        floors: list[float] = []
        for j, (pending, best) in enumerate(zip(pendings, valued)):
            if isinstance(best, Exception) or not best:
                continue
            if pending.request.at != FIRST_PRICE or market is None:
                observe = (metrics.shading_second if pending.request.at != FIRST_PRICE else metrics.shading_first).observe
                for _ in range(len(best)):
                    observe(1.0)
                continue
            imp_records = pending.imp_records()
            imp_floors = pending.floors
            for i, priced in best.items():
                if priced.deal is None:
                    todo.append((j, priced))
                    records.append(imp_records[i])
                    # the unrounded value: a value within a micro-dollar of the floor leaves no surplus
                    values.append(bid_cpm(priced.ctr, priced.candidate.value_per_click))
                    floors.append(imp_floors[i])
        if not todo:
            return unprofitable
        if featurized is None:
            bids, surplus = market.shade(self.scorer.featurizer, records, values, floors)
        else:  # the batch's imps are featurized already: the market graph reads their rows
            where = {id(record): k for k, record in enumerate(featurized)}
            rows = [where[id(record)] for record in records]
            bids, surplus = market.shade_rows(self.factorized.imp_inputs[SPARSE_INPUT], rows, values, floors)
        observe = metrics.shading_first.observe
        for (j, priced), bid, gain, value, floor in zip(todo, bids, surplus, values, floors):
            i = priced.imp_index
            if not gain > 0.0:
                del valued[j][i]
                if unprofitable[j] is _NO_IMPS:
                    unprofitable[j] = set()
                unprofitable[j].add(i)
                continue
            price = floored_price(bid, floor)
            valued[j][i] = PricedBid(i, priced.candidate, price, priced.ctr)
            observe(price / value)
        return unprofitable

    def encode(self, pending: Pending, best: dict[int, PricedBid], unprofitable: set[int] | frozenset[int] = _NO_IMPS
               ) -> Outcome:
        """The BidResponse of the imps in ``best``, or the no-bid (with each unbid imp's reason counted)."""
        request = pending.request
        metrics = self.metrics
        imp_reason = pending.imp_reason
        if len(best) < len(request.imp):
            for i in set(pending.owners).difference(best):
                imp_reason = self._count_imp(imp_reason, "no_surplus" if i in unprofitable else "below_floor")
        if not best:
            return self._no_bid(imp_reason or "below_floor")
        bids = []
        imps = request.imp
        for i in sorted(best):
            priced = best[i]
            imp, c = imps[i], priced.candidate
            bids.append(Bid(id=f"{request.id}-{imp.id}", impid=imp.id, price=priced.price, adid=c.creative_id,
                            crid=c.creative_id, adomain=c.adomain, w=c.w, h=c.h, nurl=c.nurl,
                            cid=c.campaign_id, adm=c.markup, dealid=priced.deal.dealid if priced.deal else None))
        metrics.bids.inc(len(bids))
        seatbid = (seat_bids(bids, [best[i].deal for i in sorted(best)]) if pending.offers
                   else [SeatBid(bid=bids)])
        return Outcome(200, encode_response(BidResponse(id=request.id, seatbid=seatbid)))

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

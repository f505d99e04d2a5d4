"""The bid path without HTTP: body bytes in, status and body bytes out.

decode → one record per imp → (candidate layer, imp record) rows → one scoring batch → price → encode.
"""
from __future__ import annotations

import re
import time
from typing import NamedTuple

import msgspec

from bidder.campaigns import Candidate, Catalog
from bidder.deals import DealOffer, deal_candidates, seat_bids
from bidder.metrics import NO_BID_REASONS, Metrics
from bidder.openrtb import (Bid, BidResponse, RequestError, SeatBid, decode_predict, decode_request, encode_response,
                            imp_fields, imp_sizes, request_fields)
from bidder.pricing import best_per_imp
from bidder.scorer import Scorer

__all__ = ["BidEngine", "Outcome", "NO_BID_REASONS"]


class Outcome(NamedTuple):  # a tuple: one is built per request, a frozen dataclass costs several times more
    status: int
    body: bytes = b""
    reason: str | None = None  # no-bid reason (204) or error kind (4xx)


class _PredictResponse(msgspec.Struct):
    ctr: list[float]
    model: str


_NOTHING_BLOCKED: frozenset[str] = frozenset()
_FEATURIZER_ERROR = re.compile(r"record (\d+): (?:field '([^']*)')?")
_encoder = msgspec.json.Encoder()


def error_body(message: str, path: str = "$") -> bytes:
    return _encoder.encode({"error": message, "path": path})


class BidEngine:
    """Scores and prices bid requests with one scorer and one catalog (swapped whole on reload)."""

    def __init__(self, scorer: Scorer, catalog: Catalog, metrics: Metrics, utc_offset_hours: float = 0.0,
                 now: float | None = None):
        self.scorer = scorer
        self.catalog = catalog
        self.metrics = metrics
        self.utc_offset_hours = utc_offset_hours
        self.now = now  # Unix seconds every request is taken to arrive at (examples, tests); None: the wall clock

    def bid(self, body: bytes, exchange: str | None = None, received: float | None = None) -> Outcome:
        received = time.perf_counter() if received is None else received
        try:
            request = decode_request(body)
        except RequestError as exc:
            return Outcome(400, error_body(exc.message, exc.path), "bad_request")
        if request.cur and "USD" not in request.cur:
            return self._no_bid("currency")
        shared = request_fields(request, exchange, now=self.now, utc_offset_hours=self.utc_offset_hours)
        domain = shared["domain"]
        blocked = frozenset(request.badv) if request.badv else _NOTHING_BLOCKED
        catalog = self.catalog
        rows: list[tuple[dict, dict]] = []
        owners: list[int] = []     # row -> index of its imp
        chosen: list[Candidate] = []  # row -> its candidate
        floors: list[float] = []
        offers: dict[int, DealOffer] = {}  # row -> the deal its candidate can bid through
        imp_reason: str | None = None
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
            record = None
            unmatched = False  # eligible candidates, none of which can buy the private auction's deals
            for w, h in sizes:
                eligible = catalog.eligible(w, h, domain, exchange, blocked)
                if eligible and imp.pmp is not None:
                    eligible, imp_offers = deal_candidates(eligible, imp, len(rows))
                    offers.update(imp_offers)
                    unmatched = unmatched or not eligible
                if not eligible:
                    continue
                if record is None:
                    record = imp_fields(shared, imp)
                rows.extend([(c.layer, record) for c in eligible])
                owners.extend([i] * len(eligible))
                chosen.extend(eligible)
            if record is None:
                imp_reason = self._count_imp(imp_reason, "no_matching_deal" if unmatched else "no_eligible_creative")
        if not rows:
            return self._no_bid(imp_reason or "no_eligible_creative")
        if request.tmax and (time.perf_counter() - received) * 1000.0 >= request.tmax:
            return self._no_bid("tmax")
        scorer = self.scorer
        ctr = scorer.score(rows) if len(rows) <= scorer.max_batch else scorer.predict(rows)
        self.metrics.scored_rows.observe(len(rows))
        best = best_per_imp(owners, chosen, ctr, floors, offers)
        if len(best) < len(request.imp):
            for i in set(owners).difference(best):
                imp_reason = self._count_imp(imp_reason, "below_floor")
        if not best:
            return self._no_bid(imp_reason or "below_floor")
        bids = []
        for i, priced in sorted(best.items()):
            imp, c = request.imp[i], priced.candidate
            bids.append(Bid(id=f"{request.id}-{imp.id}", impid=imp.id, price=priced.price, adid=c.creative_id,
                            crid=c.creative_id, adomain=list(c.adomain), w=c.w, h=c.h, nurl=c.nurl,
                            cid=c.campaign_id, adm=c.markup, dealid=priced.deal.dealid if priced.deal else None))
        self.metrics.bids.inc(len(bids))
        seatbid = seat_bids(bids, [p.deal for _, p in sorted(best.items())]) if offers else [SeatBid(bid=bids)]
        return Outcome(200, encode_response(BidResponse(id=request.id, seatbid=seatbid)))

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

"""Private marketplace deals: which candidates may bid on an imp's deals, at what floor, in which seat.

An imp's ``pmp`` lists deals (``id``, ``bidfloor``, ``at``, allowed buyer seats ``wseat`` and advertiser
domains ``wadomain``). A candidate can buy a deal when its campaign declares the deal id (the catalog's
``deals``, parsed in ``campaigns.py``), the seat it buys through (the campaign deal's ``seat``, else the
bidder's own) is in ``wseat`` when that is given, and one of its ``adomain`` is in ``wadomain`` when that is
given. A deal floored in another currency than USD is matched at its floor converted by the currency table
(``bidder.currencies``), and never when the table has no rate for it (or none is given); a deal
without ``bidfloor`` takes the imp's.

- ``pmp.private_auction = 1``: only candidates that can buy one of the deals are eligible, and they bid
  through it: the bid carries ``dealid``, sits in the deal's seat and meets the deal's floor. An imp left
  without such a candidate is a ``no_matching_deal`` no-bid.
- an open auction with deals: a candidate that can buy a deal bids through it when its value reaches the
  deal's floor and in the open market (imp floor, no ``dealid``) otherwise; other candidates bid as usual.
- a candidate that can buy several of the deals takes the one with the lowest floor (the first on ties).
- ``at = 3`` on a deal: its ``bidfloor`` is the agreed price, and a deal bid is made at exactly that price.
- the request's ``bseat``/``wseat`` (``bidder.conformance.Seats``) apply to deal seats too; when they block the
  bidder's own seat, every imp is bid as a private auction: only through a deal bought in an allowed seat.
"""
from __future__ import annotations

from typing import Sequence

from bidder.campaigns import Candidate
from bidder.conformance import Seats
from bidder.currencies import Currencies
from bidder.openrtb import DEFAULT_SEAT, Bid, Deal, Imp, SeatBid
from bidder.pricing import FIXED_PRICE, DealOffer

__all__ = ["DealOffer", "FIXED_PRICE", "deal_candidates", "match_deal", "seat_bids"]


def match_deal(candidate: Candidate, imp: Imp, seats: Seats | None = None, floor: float | None = None,
               currencies: Currencies | None = None) -> DealOffer | None:
    """The deal of ``imp.pmp`` that ``candidate`` can buy with the lowest floor (in a seat ``seats`` allows), or None;
    ``floor``: the imp's floor in USD (default its ``bidfloor``); ``currencies``: the table deal floors in other
    currencies are converted by (None: such deals are skipped)."""
    pmp = imp.pmp
    if pmp is None or not pmp.deals or not candidate.deals:
        return None
    private = bool(pmp.private_auction) or (seats is not None and not seats.allows(DEFAULT_SEAT))
    imp_floor = imp.bidfloor if floor is None else floor
    best: DealOffer | None = None
    for deal in pmp.deals:
        seat = _seat_for(candidate, deal)
        if seat is None or (seats is not None and not seats.allows(seat)):
            continue
        deal_floor = imp_floor if deal.bidfloor is None else deal.bidfloor
        if deal.bidfloorcur != "USD":
            rate = currencies.rate(deal.bidfloorcur) if currencies is not None else None
            if rate is None:
                continue
            if deal.bidfloor is not None:
                deal_floor = deal.bidfloor / rate
        if best is None or deal_floor < best.floor:
            best = DealOffer(deal.id, seat, deal_floor, deal.at == FIXED_PRICE, private)
    return best


def _seat_for(candidate: Candidate, deal: Deal) -> str | None:
    """The seat ``candidate`` buys ``deal`` through, or None when it cannot buy it."""
    if deal.wadomain and not any(d in deal.wadomain for d in candidate.adomain):
        return None
    for own in candidate.deals:
        if own.dealid == deal.id:
            seat = own.seat or DEFAULT_SEAT
            if not deal.wseat or seat in deal.wseat:
                return seat
    return None


def deal_candidates(candidates: Sequence[Candidate], imp: Imp, first_row: int, seats: Seats | None = None,
                    floor: float | None = None,
                    currencies: Currencies | None = None) -> tuple[Sequence[Candidate], dict[int, DealOffer]]:
    """The candidates that may bid on ``imp`` and the deal offers of those that can buy a deal.

    Offers are keyed by the row each candidate will have when the returned candidates are appended to a
    batch that already holds ``first_row`` rows. In a private auction the candidates without an offer are
    dropped; in an open one they stay and bid in the open market.
    """
    offers: dict[int, DealOffer] = {}
    private = bool(imp.pmp is not None and imp.pmp.private_auction) or (seats is not None
                                                                         and not seats.allows(DEFAULT_SEAT))
    kept: list[Candidate] = []
    for candidate in candidates:
        offer = match_deal(candidate, imp, seats, floor, currencies)
        if offer is None and private:
            continue
        if offer is not None:
            offers[first_row + len(kept)] = offer
        kept.append(candidate)
    return (kept if private else candidates), offers


def seat_bids(bids: list[Bid], deals: Sequence[DealOffer | None]) -> list[SeatBid]:
    """Bids grouped by buyer seat: a deal bid sits in the seat its deal was bought through."""
    seats: dict[str, list[Bid]] = {}
    for bid, deal in zip(bids, deals):
        seats.setdefault(deal.seat if deal is not None else DEFAULT_SEAT, []).append(bid)
    return [SeatBid(bid=group, seat=seat) for seat, group in seats.items()]

"""Pricing: a bid's worth is its expected value per thousand impressions.

CPM (USD) = pCTR × value per click × 1000. A bid below the imp's floor is no bid; of the rest the
best candidate per imp wins. Prices are rounded to micro-dollars, never below the floor. A row that can
bid through a deal (``bidder/deals.py``) is held to the deal's floor and priced by the deal's terms.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, NamedTuple, Sequence

from bidder.campaigns import Candidate

if TYPE_CHECKING:  # deals prices its bids with ``floored_price``
    from bidder.deals import DealOffer

__all__ = ["PricedBid", "bid_cpm", "best_per_imp", "floored_price"]


class PricedBid(NamedTuple):  # a tuple: one is built per bid on the hot path
    imp_index: int
    candidate: Candidate
    price: float  # USD CPM
    ctr: float
    deal: DealOffer | None = None  # the deal the bid is made through


def floored_price(price: float, floor: float) -> float:
    """``price`` rounded to micro-dollars, which must never take a bid under its floor."""
    return max(round(price, 6), floor)


def bid_cpm(ctr: float, value_per_click: float) -> float:
    return float(ctr) * value_per_click * 1000.0


def best_per_imp(owners: Sequence[int], candidates: Sequence[Candidate], ctr: Sequence[float],
                 floors: Sequence[float], offers: Mapping[int, DealOffer] | None = None) -> dict[int, PricedBid]:
    """Row ``r`` scored ``candidates[r]`` for imp ``owners[r]``: the best bid at or above floor per imp.

    ``offers`` maps a row to the deal its candidate can bid through (see ``bidder.deals``).
    """
    if hasattr(ctr, "tolist"):  # Python floats: indexing a numpy array makes a scalar object per row
        ctr = ctr.tolist()
    # imp -> (price, candidate, ctr, deal) of its best row so far
    best: dict[int, tuple[float, Candidate, float, DealOffer | None]] = {}
    for row, (imp_index, candidate, p) in enumerate(zip(owners, candidates, ctr)):
        price = p * candidate.value_per_click * 1000.0
        floor = floors[imp_index]
        offer = offers.get(row) if offers else None
        if offer is not None:
            terms = offer.floor_for(price, floor)
            if terms is None:
                continue
            floor, offer = terms
        if price >= floor:
            current = best.get(imp_index)
            # ties (creatives the model cannot tell apart: 8-bit tables give unseen ones one vector) go to the
            # candidate earlier in the catalog, whatever order the rows came in (retrieval's is by score)
            if current is None or price > current[0] or (price == current[0] and candidate.index < current[1].index):
                best[imp_index] = (price, candidate, p, offer)
    out = {}
    for imp_index, (price, candidate, p, deal) in best.items():
        price = deal.price(price) if deal else floored_price(price, floors[imp_index])
        out[imp_index] = PricedBid(imp_index, candidate, price, p, deal)
    return out

"""Pricing: a bid's worth is its expected value per thousand impressions.

CPM (USD) = pCTR × value per click × 1000. A bid below the imp's floor is no bid; of the rest the
best candidate per imp wins. Prices are rounded to micro-dollars, never below the floor. A row that can
bid through a deal (``bidder/deals.py``) is held to the deal's floor and priced by the deal's terms.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, NamedTuple, Sequence

from bidder._pricing import best_rows
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

    ``offers`` maps a row to the deal its candidate can bid through (see ``bidder.deals``). A row is worth
    ``bid_cpm``; ties (creatives the model cannot tell apart: 8-bit tables give unseen ones one vector) go
    to the candidate earlier in the catalog, whatever order the rows came in (retrieval's is by score).
    The scan over the rows is native (``bidder._pricing.best_rows``); the prices are set here.
    """
    # Python floats: indexing a numpy array makes a scalar object per row
    ctr = ctr.tolist() if hasattr(ctr, "tolist") else ctr if type(ctr) is list else list(ctr)
    out = {}
    for imp_index, row, price, deal in best_rows(owners if type(owners) is list else list(owners), candidates,
                                                 ctr, floors if type(floors) is list else list(floors),
                                                 dict(offers) if offers and type(offers) is not dict else offers):
        price = deal.price(price) if deal else floored_price(price, floors[imp_index])
        out[imp_index] = PricedBid(imp_index, candidates[row], price, ctr[row], deal)
    return out

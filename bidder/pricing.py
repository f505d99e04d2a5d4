"""Pricing: a bid's worth is its expected value per thousand impressions.

CPM (USD) = pCTR × value per click × 1000. A bid below the imp's floor is no bid; of the rest the
best candidate per imp wins. Prices are rounded to micro-dollars, never below the floor. A row that can
bid through a deal (``bidder/deals.py`` matches them) is held to the deal's floor and priced by the deal's
terms, a ``DealOffer``.

The scan over a batch's rows is native (``bidder._pricing.best_rows``) over arrays the engine lays out
before it: the rows' imps, candidates, floors and deal terms.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from bidder._pricing import best_rows
from bidder.campaigns import Candidate

__all__ = ["DealOffer", "FIXED_PRICE", "PricedBid", "bid_cpm", "best_per_imp", "best_rows", "floored_price"]

#: ``Deal.at`` value saying that ``bidfloor`` is the agreed deal price
FIXED_PRICE = 3


@dataclass(frozen=True)
class DealOffer:
    """The deal one candidate can bid through on one imp."""
    dealid: str
    seat: str
    floor: float        # USD CPM a deal bid must reach
    fixed_price: bool   # bid exactly ``floor`` (``at = 3``)
    private: bool       # a private auction: below ``floor`` there is no open-market bid to fall back on

    def price(self, value: float) -> float:
        """A deal bid's price: the agreed price of a fixed-price deal, else the value rounded (never under floor)."""
        return self.floor if self.fixed_price else floored_price(value, self.floor)


class PricedBid(NamedTuple):  # a tuple: one is built per bid on the hot path
    imp_index: int
    candidate: Candidate
    price: float  # USD CPM
    ctr: float
    deal: DealOffer | None = None  # the deal the bid is made through
    value: float = 0.0  # USD CPM before rounding and shading: pCTR × value per click × 1000


def floored_price(price: float, floor: float) -> float:
    """``price`` rounded to micro-dollars, which must never take a bid under its floor."""
    return max(round(price, 6), floor)


def bid_cpm(ctr: float, value_per_click: float) -> float:
    return float(ctr) * value_per_click * 1000.0


def best_per_imp(owners: Sequence[int], candidates: Sequence[Candidate], ctr: Sequence[float],
                 floors: Sequence[float], offers: Mapping[int, DealOffer] | None = None) -> dict[int, PricedBid]:
    """One request's rows priced on their own: row ``r`` scored ``candidates[r]`` for imp ``owners[r]``; the
    best bid at or above floor per imp, at its value (no shading).

    The batch path lays out the same arrays for all requests of a batch at once (``bidder.engine``); this is
    that scan for one list of rows. ``offers`` maps a row to the deal its candidate can bid through. Ties
    (creatives the model cannot tell apart: 8-bit tables give unseen ones one vector) go to the candidate
    earlier in the catalog, whatever order the rows came in (retrieval's is by score).
    """
    n, imps = len(owners), len(floors)
    if len(candidates) != n or len(ctr) != n:
        raise ValueError(f"{n} owners, {len(candidates)} candidates and {len(ctr)} scores")
    offers = offers or {}
    best_row = np.empty(imps, dtype=np.int64)
    best_value = np.empty(imps, dtype=np.float64)
    via_deal = np.zeros(imps, dtype=np.uint8)
    order = np.empty(imps, dtype=np.int64)
    found = best_rows(n, imps, np.array(owners, dtype=np.int64), np.array([c.index for c in candidates], dtype=np.int64),
              np.array(ctr, dtype=np.float64), np.array([c.value_per_click for c in candidates], dtype=np.float64),
              np.array([floors[i] if 0 <= i < imps else np.nan for i in owners], dtype=np.float64),
              np.array([offers[r].floor if r in offers else np.nan for r in range(n)], dtype=np.float64),
              np.array([r in offers and offers[r].private for r in range(n)], dtype=np.uint8),
              best_row, best_value, via_deal, order)
    out = {}
    for i in order[:found].tolist():
        row = int(best_row[i])
        value = float(best_value[i])
        deal = offers[row] if via_deal[i] else None
        price = deal.price(value) if deal else floored_price(value, floors[i])
        out[i] = PricedBid(i, candidates[row], price, float(ctr[row]), deal, value)
    return out

"""Pricing: a bid's worth is its expected value per thousand impressions.

CPM (USD) = pCTR × value per click × 1000. A bid below the imp's floor is no bid; of the rest the
best candidate per imp wins. Prices are rounded to micro-dollars, never below the floor.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

from bidder.campaigns import Candidate

__all__ = ["PricedBid", "bid_cpm", "best_per_imp"]


class PricedBid(NamedTuple):  # a tuple: one is built per bid on the hot path
    imp_index: int
    candidate: Candidate
    price: float  # USD CPM
    ctr: float


def bid_cpm(ctr: float, value_per_click: float) -> float:
    return float(ctr) * value_per_click * 1000.0


def best_per_imp(owners: Sequence[int], candidates: Sequence[Candidate], ctr: Sequence[float],
                 floors: Sequence[float]) -> dict[int, PricedBid]:
    """Row ``r`` scored ``candidates[r]`` for imp ``owners[r]``: the best bid at or above floor per imp."""
    if hasattr(ctr, "tolist"):  # Python floats: indexing a numpy array makes a scalar object per row
        ctr = ctr.tolist()
    best: dict[int, tuple[float, Candidate, float]] = {}  # imp -> (price, candidate, ctr) of its best row
    for imp_index, candidate, p in zip(owners, candidates, ctr):
        price = p * candidate.value_per_click * 1000.0
        if price >= floors[imp_index]:
            current = best.get(imp_index)
            if current is None or price > current[0]:  # ties: the first row wins
                best[imp_index] = (price, candidate, p)
    # rounding to micro-dollars must never take a bid under its floor
    return {i: PricedBid(i, c, max(round(price, 6), floors[i]), p) for i, (price, c, p) in best.items()}

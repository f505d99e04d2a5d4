"""Pricing: a bid's worth is its expected value per thousand impressions.

CPM (USD) = pCTR × value per click × 1000. A bid below the imp's floor is no bid; of the rest the
best candidate per imp wins.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from bidder.campaigns import Candidate

__all__ = ["PricedBid", "bid_cpm", "best_per_imp"]


@dataclass(frozen=True)
class PricedBid:
    imp_index: int
    candidate: Candidate
    price: float  # USD CPM
    ctr: float


def bid_cpm(ctr: float, value_per_click: float) -> float:
    return float(ctr) * value_per_click * 1000.0


def best_per_imp(owners: Sequence[int], candidates: Sequence[Candidate], ctr: Sequence[float],
                 floors: Sequence[float]) -> dict[int, PricedBid]:
    """Row ``r`` scored ``candidates[r]`` for imp ``owners[r]``: the best bid at or above floor per imp."""
    best: dict[int, tuple[float, int]] = {}  # imp -> (price, row); objects only for the winners
    for row, imp_index in enumerate(owners):
        price = float(ctr[row]) * candidates[row].value_per_click * 1000.0
        if price >= floors[imp_index] and price > best.get(imp_index, (-1.0, -1))[0]:
            best[imp_index] = (price, row)
    # rounded to micro-dollars; rounding must never take a bid under its floor
    return {i: PricedBid(i, candidates[row], max(round(price, 6), floors[i]), float(ctr[row]))
            for i, (price, row) in best.items()}

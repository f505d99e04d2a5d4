"""The auction of one imp: the bidders' bids against the floor and the planted competition.

Rules (the exchange's, applied the same way to every bidder):
    * a bid through a deal must name a deal the imp offers (else loss 4, invalid deal id) and meet the
      deal's floor (else 101); any other bid must meet the imp's floor (else 100);
    * the highest valid bid wins when it beats the competition (the market price, the highest bid of
      the rest of the market) strictly; a tie with it goes to the market, as in the synthetic bid log
      (``train/data/bidlog.py``); bids tied at the top are ordered by the request's own uniform draw,
      so the same request breaks the same tie the same way;
    * the winner pays its bid in a first-price auction (``at`` = 1), and in a second-price one the
      highest of the other valid bids, the market price and its floor, never more than its bid;
    * every loser is told why (``LOSS_*``, OpenRTB 2.6 loss reason codes) and the price that won
      (``min_to_win``); the winner's ``min_to_win`` is what it had to beat.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LOSS_BELOW_DEAL_FLOOR", "LOSS_BELOW_FLOOR", "LOSS_INVALID_DEAL", "LOSS_LOST_TO_HIGHER", "LOSS_WON",
           "Offer", "Outcome", "run_auction"]

LOSS_WON = 0
LOSS_INVALID_DEAL = 4
LOSS_BELOW_FLOOR = 100
LOSS_BELOW_DEAL_FLOOR = 101
LOSS_LOST_TO_HIGHER = 102


@dataclass(frozen=True)
class Offer:
    bidder: int          # index of the bidder that made it
    price: float         # USD CPM
    dealid: str | None = None


@dataclass(frozen=True)
class Outcome:
    winner: int | None         # index into the offers, None when no bid won
    price: float | None        # what the winner pays, USD CPM
    loss: tuple[int, ...]      # per offer: LOSS_WON for the winner, else the reason
    min_to_win: tuple[float, ...]  # per offer, USD CPM


def run_auction(offers: list[Offer], floor: float, market: float, first_price: bool,
                deals: dict[str, float] | None = None, tie_draw: float = 0.0) -> Outcome:
    """The outcome of one imp; ``deals`` maps the deal ids the imp offers to their floors."""
    deals = deals or {}
    loss = [LOSS_LOST_TO_HIGHER] * len(offers)
    valid = []
    for i, offer in enumerate(offers):
        if offer.dealid is not None:
            deal_floor = deals.get(offer.dealid)
            if deal_floor is None:
                loss[i] = LOSS_INVALID_DEAL
            elif offer.price < deal_floor:
                loss[i] = LOSS_BELOW_DEAL_FLOOR
            else:
                valid.append(i)
        elif offer.price < floor:
            loss[i] = LOSS_BELOW_FLOOR
        else:
            valid.append(i)
    if not valid:
        return Outcome(None, None, tuple(loss), tuple(max(market, floor) for _ in offers))
    top = max(offers[i].price for i in valid)
    tied = [i for i in valid if offers[i].price == top]
    best = tied[min(int(tie_draw * len(tied)), len(tied) - 1)]
    others = [offers[i].price for i in valid if i != best]
    own_floor = deals[offers[best].dealid] if offers[best].dealid is not None else floor
    to_beat = max([market, own_floor, *others])
    if not top > market:
        return Outcome(None, None, tuple(loss), tuple(max(market, floor) for _ in offers))
    price = top if first_price else min(top, to_beat)
    price = round(price, 6)
    loss[best] = LOSS_WON
    min_to_win = tuple(to_beat if i == best else price for i in range(len(offers)))
    return Outcome(best, price, tuple(loss), min_to_win)

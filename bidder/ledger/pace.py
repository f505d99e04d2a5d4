"""Even pacing on the ledger: the controller the refresher runs after each call to the banker (``Ledger.on_refresh``).

Per campaign with a daily budget and ``"pacing": "even"``, one ``bidder.pacing.Pacer`` reads the campaign's day so
far as the banker last told it (spend committed today plus what is reserved) and writes the probability that one
of its bids goes on to reserve, ``Ledger.pass_rate[slot]``, which the bid path's budget stage draws against.
Every worker runs its own controller on the same banker figures (the whole campaign's spend, not the worker's),
so the workers arrive at the same rate without talking to each other. ``asap`` campaigns keep rate 1.

The plan is flat over the campaign's day (its time zone's): the traffic each campaign saw on past days is not
counted on the bid path yet, so the plan that ``DailyPlan.from_counts`` would learn from it is not built here.
"""
from __future__ import annotations

from bidder.ledger.leases import NANOS_PER_USD
from bidder.pacing import DailyPlan, Pacer

__all__ = ["EvenPacing"]


class EvenPacing:
    """``Ledger.on_refresh`` for even pacing; keeps one Pacer and one plan per campaign."""

    def __init__(self) -> None:
        self.pacers: dict[str, Pacer] = {}
        self.plans: dict[str, DailyPlan] = {}

    def __call__(self, ledger, now: float) -> None:
        for slot, terms in enumerate(ledger.terms):
            if terms is None or terms.pacing != "even" or terms.daily_usd is None:
                ledger.pass_rate[slot] = 1.0
                continue
            grant = ledger.view[slot]
            if grant is None:  # the banker has not answered for it yet
                continue
            campaign = ledger.campaigns[slot]
            pacer = self.pacers.get(campaign)
            if pacer is None:
                pacer = self.pacers[campaign] = Pacer("even")
            plan = self.plans.get(campaign)
            if plan is None or plan.timezone != str(terms.timezone):
                plan = self.plans[campaign] = DailyPlan.flat(str(terms.timezone))
            spent = (grant.spent_day + grant.reserved_total) / NANOS_PER_USD
            ledger.pass_rate[slot] = pacer.update(now, spent, terms.daily_usd, plan).pass_rate

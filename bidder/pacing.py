"""Even pacing of a daily budget: the day's plan and the controller that follows it.

Pure arithmetic (numpy and the standard library only, no I/O): the ledger's background refresher calls
``Pacer.update`` once per refresh per campaign and publishes ``Pace.pass_rate`` into a per-campaign float
array; the hot path reads that float and lets a request through the throttle when a uniform draw is below it.

**Throttling, not a bid multiplier.** The controller's output is the probability that an eligible request is
bid on (smart pacing, Xu et al., KDD 2015). Spend is linear in that probability (half the requests, half the
spend, whatever the auction), so the controller's gain does not depend on the shape of the win-rate curve,
which differs by exchange, slot and hour and is exactly what a multiplier would have to invert: a multiplier
moves a bid along that curve, where a 10 % cut can lose 2 % or 60 % of the wins. A multiplier would also
undo the shading stage, which already bids argmax_b (value - b) P(win | b) for first-price auctions; a bid
scaled after it is no longer that optimum, and one scaled before it is a second, entangled price model. A
throttled request is bid on at its own best price or not at all, so every bid the campaign makes is one the
pricing stages chose, and the hot path pays one float read and one draw.

**The plan** (``DailyPlan``): 24 hourly shares of the day's budget in the campaign's time zone, shaped by
the eligible requests the campaign saw on past days (per-day shares, recent days weigh more, smoothed over
neighbouring hours, a tenth spread evenly so that no hour is zero); flat without history. Its cumulative fraction is
linear within each hour. Hours are wall-clock hours of the local day: on a daylight-saving day the skipped
hour's share falls due at once and the repeated hour is planned twice, which the controller absorbs because
it re-plans the remaining budget at every update.

**The rule** (``Pacer``, ``pacing="even"``): at local time ``h`` with ``R`` = budget - spent left and the
plan's cumulative fraction ``F``, the campaign should spend ``R`` between now and ``finish_hour`` in the
proportions of the plan, so the pass rate is

    pass = R / (C * (F(finish_hour) - F(h)))         clipped to [0, 1]

where ``C`` is the estimated unconstrained daily spend: what the campaign would spend over a whole day of
planned traffic if every request passed. ``C`` is a ratio of exponentially forgotten sums (memory
``memory_s``): the spend observed since the last update over (the pass rate in force x the plan fraction
that elapsed). Given the eligible-request counts it is split into spend per request let through x
eligible requests per unit of plan, so that a quiet hour is told apart from a cheap one; given the
requests that passed the throttle but found their worker's lease empty (``no_lease``, the ``no_budget``
no-bids), those are taken out of the requests let through, so that a lease that ran dry does not make the
market look smaller than it is. The win rate needs no input of its own: spend per request let through is
already the bid rate x the win rate x the clearing price. There is no integral term to wind up:
every update solves afresh for the remaining budget, so being behind (a late start, a quiet morning, a
budget raised at noon) raises the rate for the rest of the day, being ahead lowers it, and a budget lowered
below the spend stops the campaign at once. ``finish_hour`` (23.5 by default) plans the last of the budget
half an hour before midnight, a margin for the noise of the last hour; after it the pass rate is 1 until the
budget is gone. Before ``C`` is known (the first update, or a campaign that never spent) the pass rate is 1:
the lease (``Pace.lease``), which follows the planned spend rate, bounds what that probe can cost.

``spent`` is committed + reserved: a bid's reservation counts at once, so money in flight is never planned
twice; a released reservation shows as negative spend in the next interval.

``pacing="asap"``: pass rate 1 until the budget is gone, 0 after.
"""
from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np

__all__ = ["DailyPlan", "Pace", "Pacer", "PacingError", "PACING_MODES", "local_clock", "zone"]

HOURS_PER_DAY = 24
SECONDS_PER_HOUR = 3600.0
PLAN_VERSION = 1
PACING_MODES = ("even", "asap")


class PacingError(ValueError):
    """A plan or a controller input is invalid; the message names the field."""


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name`` (``"UTC"``, ``"America/New_York"``); PacingError naming it otherwise."""
    if not isinstance(name, str) or not name:
        raise PacingError(f"timezone: expected an IANA time zone name, got {name!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise PacingError(f"timezone: unknown time zone {name!r}") from None


def local_clock(now: float, timezone: str) -> tuple[dt.date, float]:
    """The campaign's day at Unix time ``now`` (seconds) and the wall-clock hours into it, in [0, 24)."""
    local = dt.datetime.fromtimestamp(now, zone(timezone))
    return local.date(), local.hour + local.minute / 60.0 + (local.second + local.microsecond / 1e6) / SECONDS_PER_HOUR


@dataclass(frozen=True)
class DailyPlan:
    """The planned share of a day's budget per local hour (24 shares summing to 1) in ``timezone``."""
    hourly: tuple[float, ...]
    timezone: str = "UTC"
    days: int = 0  # past days the shape was learned from; 0 = flat

    def __post_init__(self) -> None:
        zone(self.timezone)
        shares = np.asarray(self.hourly, dtype=np.float64)
        if shares.shape != (HOURS_PER_DAY,):
            raise PacingError(f"plan.hourly: expected {HOURS_PER_DAY} shares, got {shares.size}")
        if not np.all(np.isfinite(shares)) or np.any(shares <= 0):
            bad = int(np.flatnonzero(~np.isfinite(shares) | (shares <= 0))[0])
            raise PacingError(f"plan.hourly[{bad}]: expected a positive share, got {self.hourly[bad]!r}")
        if abs(shares.sum() - 1.0) > 1e-6:
            raise PacingError(f"plan.hourly: the shares must sum to 1, got {shares.sum():.9g}")
        if not isinstance(self.days, int) or isinstance(self.days, bool) or self.days < 0:
            raise PacingError(f"plan.days: expected an integer >= 0, got {self.days!r}")
        object.__setattr__(self, "hourly", tuple(float(s) for s in shares / shares.sum()))
        object.__setattr__(self, "_cumulative", np.concatenate(([0.0], np.cumsum(shares / shares.sum()))))

    @classmethod
    def flat(cls, timezone: str = "UTC") -> "DailyPlan":
        """The first day's plan: the budget spread evenly over the hours."""
        return cls(hourly=(1.0 / HOURS_PER_DAY,) * HOURS_PER_DAY, timezone=timezone, days=0)

    @classmethod
    def from_counts(cls, counts, timezone: str = "UTC", half_life_days: float = 7.0, floor: float = 0.1,
                    smoothing: float = 0.25) -> "DailyPlan":
        """The plan shaped by past traffic: ``counts[d][h]`` eligible requests in local hour ``h`` of past day
        ``d`` (oldest first). Each day counts by its shares (a busy day does not outweigh a quiet one),
        weighted ``0.5 ** (age / half_life_days)``; each hour then keeps ``1 - 2 * smoothing`` of its share
        and gives ``smoothing`` to each neighbour (23 h and 0 h are neighbours); last, ``floor`` of the budget
        is spread evenly, so that no hour gets less than ``floor`` x an even hour's share. Days without a
        request are skipped; none left gives the flat plan."""
        table = np.asarray(counts, dtype=np.float64)
        if table.ndim == 1 and table.size == HOURS_PER_DAY:
            table = table[None, :]
        if table.ndim != 2 or table.shape[1] != HOURS_PER_DAY:
            raise PacingError(f"counts: expected rows of {HOURS_PER_DAY} hourly counts, got shape {table.shape}")
        if not np.all(np.isfinite(table)) or np.any(table < 0):
            raise PacingError("counts: expected finite counts >= 0")
        if not half_life_days > 0:
            raise PacingError(f"half_life_days: expected > 0, got {half_life_days!r}")
        if not 0 <= floor <= 1:
            raise PacingError(f"floor: expected a fraction of an even hour's share in [0, 1], got {floor!r}")
        if not 0 <= smoothing <= 1 / 3:
            raise PacingError(f"smoothing: expected a share in [0, 1/3] given to each neighbour, got {smoothing!r}")
        totals = table.sum(axis=1)
        age = (len(table) - 1 - np.arange(len(table)))[totals > 0]
        days = table[totals > 0] / totals[totals > 0, None]
        if len(days) == 0:
            return cls.flat(timezone)
        weights = 0.5 ** (age / half_life_days)
        shares = weights @ days / weights.sum()
        shares = (1 - 2 * smoothing) * shares + smoothing * (np.roll(shares, 1) + np.roll(shares, -1))
        shares = (1 - floor) * shares + floor / HOURS_PER_DAY
        return cls(hourly=tuple(shares / shares.sum()), timezone=timezone, days=len(days))

    def fraction(self, hours: float) -> float:
        """The cumulative share of the budget planned by ``hours`` (local wall-clock hours into the day)."""
        h = min(max(float(hours), 0.0), float(HOURS_PER_DAY))
        whole = min(int(h), HOURS_PER_DAY - 1)
        return float(self._cumulative[whole] + self.hourly[whole] * (h - whole))

    def fraction_at(self, now: float) -> float:
        """The cumulative share of the day's budget planned by Unix time ``now``."""
        return self.fraction(local_clock(now, self.timezone)[1])

    def to_json(self) -> dict[str, Any]:
        return {"version": PLAN_VERSION, "timezone": self.timezone, "days": self.days, "hourly": list(self.hourly)}

    @classmethod
    def from_json(cls, document: Any) -> "DailyPlan":
        if not isinstance(document, dict):
            raise PacingError(f"plan: expected an object, got {type(document).__name__}")
        if document.get("version") != PLAN_VERSION:
            raise PacingError(f"plan.version: expected {PLAN_VERSION}, got {document.get('version')!r}")
        for key in ("timezone", "days", "hourly"):
            if key not in document:
                raise PacingError(f"plan.{key}: missing")
        hourly = document["hourly"]
        if not isinstance(hourly, list) or not all(isinstance(s, (int, float)) and not isinstance(s, bool)
                                                   for s in hourly):
            raise PacingError("plan.hourly: expected a list of numbers")
        return cls(hourly=tuple(hourly), timezone=document["timezone"], days=document["days"])


@dataclass(frozen=True)
class Pace:
    """What one update decided for the interval until the next."""
    pass_rate: float         # probability in [0, 1] that an eligible request is bid on
    spend_rate: float        # USD per second the pace plans to spend now (inf: as fast as the market allows)
    remaining: float         # USD: budget - spent, >= 0
    planned: float           # the plan's cumulative fraction of the day at this update
    estimate: float | None   # USD: the estimated unconstrained daily spend C (None until spend was observed)

    def lease(self, interval_s: float, headroom: float = 2.0, reserve_per_spend: float = 1.0,
              floor: float = 0.0) -> float:
        """USD a banker should have granted (across workers) to cover ``interval_s`` seconds at this pace:
        ``headroom`` x the planned spend x ``reserve_per_spend`` (USD a bid reserves per USD it ends up
        costing: bids over clearing prices, and losses, reserve more than they spend; the ledger measures it
        over recent notices), at least ``floor`` (a few of the campaign's largest bids, so that a slow
        campaign is not starved by a lease smaller than a bid), never more than what is left. The headroom
        keeps a lease from running dry before the throttle does the pacing; the lease in turn bounds what an
        estimate error can spend before the next update."""
        if not interval_s > 0 or not headroom >= 1 or not reserve_per_spend >= 1 or not floor >= 0:
            raise PacingError(f"lease: expected interval_s > 0, headroom >= 1, reserve_per_spend >= 1 and "
                              f"floor >= 0, got {interval_s!r}, {headroom!r}, {reserve_per_spend!r}, {floor!r}")
        if self.pass_rate <= 0:
            return 0.0
        return min(self.remaining, max(self.spend_rate * interval_s * headroom * reserve_per_spend, floor))


class Pacer:
    """The pace of one campaign. Call ``update`` at each refresh (every second or few) with the time, the
    day's spend so far and budget, and the day's plan; publish ``Pace.pass_rate`` to the bid path."""

    def __init__(self, pacing: str = "even", *, finish_hour: float = 23.5, memory_s: float = 1800.0,
                 estimate: float | None = None):
        if pacing not in PACING_MODES:
            raise PacingError(f"pacing: expected one of {', '.join(PACING_MODES)}, got {pacing!r}")
        if not 0 < finish_hour <= HOURS_PER_DAY:
            raise PacingError(f"finish_hour: expected a local hour in (0, 24], got {finish_hour!r}")
        if not memory_s > 0:
            raise PacingError(f"memory_s: expected > 0 seconds, got {memory_s!r}")
        if estimate is not None and not (math.isfinite(estimate) and estimate > 0):
            raise PacingError(f"estimate: expected a positive daily spend in USD, got {estimate!r}")
        self.pacing = pacing
        self.finish_hour = float(finish_hour)
        self.memory_s = float(memory_s)
        # exponentially forgotten sums: spend / (pass x plan fraction), or, with eligible counts,
        # spend / (pass x requests - requests without lease) and requests / plan fraction
        self._spend = self._exposure = 0.0
        self._requests = self._plan_elapsed = 0.0
        self._prior = estimate
        self._counted = False  # whether the split estimate (with eligible counts) is in use
        self._last: tuple[float, dt.date, float, float, float] | None = None  # now, day, F, spent, pass

    @property
    def estimate(self) -> float | None:
        """USD: the unconstrained daily spend C as now estimated (carry it into a new Pacer after a restart)."""
        if self._exposure <= 0:
            return self._prior
        per_exposure = self._spend / self._exposure
        if not self._counted:
            return max(per_exposure, 0.0)
        if self._plan_elapsed <= 0:
            return self._prior
        return max(per_exposure * self._requests / self._plan_elapsed, 0.0)

    def update(self, now: float, spent: float, budget: float, plan: DailyPlan, eligible: int | None = None,
               no_lease: int | None = None) -> Pace:
        """The pace from Unix time ``now`` on. ``spent``: USD of the campaign's current day, committed +
        reserved; ``budget``: its daily budget, USD (it may change between calls). Since the previous update,
        ``eligible``: requests the campaign was eligible for, throttled ones included; ``no_lease``: of
        those, requests that passed the throttle but found no lease. Each None when not counted; give them
        always or never, ``no_lease`` only with ``eligible``."""
        for name, value in (("now", now), ("spent", spent), ("budget", budget)):
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise PacingError(f"{name}: expected a finite number, got {value!r}")
        if budget < 0:
            raise PacingError(f"budget: expected >= 0 USD, got {budget!r}")
        for name, count in (("eligible", eligible), ("no_lease", no_lease)):
            if count is not None and (not isinstance(count, (int, np.integer)) or count < 0):
                raise PacingError(f"{name}: expected a count >= 0, got {count!r}")
        if no_lease is not None and (eligible is None or no_lease > eligible):
            raise PacingError(f"no_lease: expected a count of eligible requests (<= eligible), got {no_lease!r} "
                              f"with eligible {eligible!r}")
        day, hours = local_clock(now, plan.timezone)
        planned = plan.fraction(hours)
        self._learn(now, day, planned, spent, eligible, no_lease or 0)
        remaining = max(budget - spent, 0.0)
        estimate = self.estimate
        if self.pacing == "asap":
            pass_rate = 1.0 if remaining > 0 else 0.0
            rate = math.inf if estimate is None else estimate * plan.hourly[min(int(hours), 23)] / SECONDS_PER_HOUR
        else:
            end = self.finish_hour if hours < self.finish_hour else float(HOURS_PER_DAY)
            ahead = plan.fraction(end) - planned  # plan fraction left to spend the remaining budget over
            density = plan.hourly[min(int(hours), 23)] / SECONDS_PER_HOUR  # plan fraction per second now
            rate = remaining * density / ahead if ahead > 0 else math.inf
            if remaining <= 0:
                pass_rate = 0.0
            elif estimate is None or estimate <= 0 or ahead <= 0:
                pass_rate = 1.0
            else:
                pass_rate = min(1.0, remaining / (estimate * ahead))
        self._last = (float(now), day, planned, float(spent), pass_rate)
        return Pace(pass_rate=pass_rate, spend_rate=rate if remaining > 0 else 0.0, remaining=remaining,
                    planned=planned, estimate=estimate)

    def _learn(self, now: float, day: dt.date, planned: float, spent: float, eligible: int | None,
               no_lease: int) -> None:
        """Fold the interval since the last update into the estimate. A new day, a clock that went back or a
        first call only sets the starting point: the spend it saw belongs to no interval of this day."""
        last = self._last
        if last is None or last[1] != day or now <= last[0]:
            return
        last_now, _, last_planned, last_spent, last_pass = last
        keep = math.exp(-(now - last_now) / self.memory_s)
        elapsed = max(planned - last_planned, 0.0)
        self._spend = keep * self._spend + (spent - last_spent)
        if eligible is None:
            self._exposure = keep * self._exposure + last_pass * elapsed
        else:
            if not self._counted:  # switching to counted requests: the two sums measure different things
                self._spend, self._exposure, self._counted = spent - last_spent, 0.0, True
            self._exposure = keep * self._exposure + max(last_pass * eligible - no_lease, 0.0)
            self._requests = keep * self._requests + eligible
            self._plan_elapsed = keep * self._plan_elapsed + elapsed

"""``python -m bench pacing``: even pacing (``bidder.pacing``) over simulated days of the synthetic market.

The day: the eligible requests of one campaign of the shipped catalog (``--campaign``), drawn by the
exchange simulator's traffic (``bench.exchange.traffic``: its daily curve, its size mix by hour, its slots,
users and log-normal market prices), ``--rate`` requests per second across the whole exchange before the
campaign's sizes filter them. The campaign bids each request's value, the true click probability of its
creative of that size x its value per click x 1000, and the exchange's rule for a lone bidder decides
(``bench.exchange.auction``: win when the bid meets the floor and beats the market price; pay the bid at
first price, the market price or floor at second price). Throttling does not change a bid, so a day's
auctions are settled once and every pacing run picks among them.

The banker: every ``--update`` simulated seconds it settles the notices that arrived (``--notice-delay``
after each bid: the bill commits the clearing price, the rest of the reservation is released), asks the
campaign's ``Pacer`` for the pace given spend = committed + reserved, and tops each of ``--workers``
workers' leases up to their share of ``Pace.lease``. Between updates each request goes to one worker at
random, passes the throttle with the pace's probability, and reserves its bid from the worker's lease; a
worker whose next bid does not fit its lease stops bidding until the next top-up. Budgets are fractions of
the campaign's unconstrained spend of that day (every request bid on).

Per seed and budget fraction: ``even`` (the plan learned from ``--history-days`` past days of the same
market, eligible-request counts given to the controller), ``even-flat`` (a first day: flat plan) and
``asap``; plus the stress scenarios (late start, budget raised / lowered mid-day, a quiet morning).
Reported per run: budget use (committed / budget), the hour the spend reached 99 % of the budget
(``exhausted_h``, null when it never did), and the RMSE of the spent fraction against the plan's
cumulative fraction, sampled at every update, in percentage points of the budget.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.exchange.cli import DEFAULT_CAMPAIGNS, DEFAULT_START, DEFAULT_WORLD_ROWS, DEFAULT_WORLD_SEED, positive
from bench.exchange.terms import TermsError, read_terms
from bench.exchange.traffic import CHUNK, Market, Traffic
from bench.servers import BenchError
from bidder.clock import parse_time
from bidder.pacing import DailyPlan, Pacer
from train.data.bidlog import FIRST_PRICE_EXCHANGES

__all__ = ["Day", "DayRun", "PacingConfig", "campaign_day", "lone_bidder_pays", "main", "run_pacing", "simulate"]

SECONDS_PER_DAY = 86400.0
FRACTIONS = (0.2, 0.4, 0.6, 0.8)
MODES = ("even", "even-flat", "asap")
#: the spend, as a fraction of the budget, at which a budget counts as run out
EXHAUSTED = 0.99
#: a worker's lease holds at least this many of the campaign's large bids (a banker would take its max_cpm;
#: the synthetic campaign has none, its 99th percentile bid stands for it)
LEASE_FLOOR_BIDS = 2


@dataclasses.dataclass(frozen=True)
class PacingConfig:
    seeds: tuple[int, ...] = (0, 1, 2)
    fractions: tuple[float, ...] = FRACTIONS
    campaign: str = "c1458"
    campaigns: Path = DEFAULT_CAMPAIGNS
    start: float = parse_time(DEFAULT_START)   # the simulated day's local midnight (the campaign's zone: UTC)
    rate: float = 10.0                         # requests per second across the exchange, before the size filter
    history_days: int = 3
    update_s: float = 5.0
    workers: int = 2
    notice_delay_s: float = 2.0
    headroom: float = 2.0
    scenarios: bool = True
    world_seed: int = DEFAULT_WORLD_SEED
    world_rows: int = DEFAULT_WORLD_ROWS


@dataclasses.dataclass(frozen=True)
class Day:
    """A campaign's eligible requests of one day, time-ordered, with the auction each would have."""
    start: float          # Unix seconds of the day's midnight
    times: np.ndarray     # Unix seconds
    cost: np.ndarray      # USD reserved when bid on (the bid / 1000)
    paid: np.ndarray      # USD committed when bid on: the clearing price on a win, 0 on a loss

    def __len__(self) -> int:
        return len(self.times)

    def unconstrained(self) -> float:
        """USD the campaign spends bidding on every request."""
        return float(self.paid.sum())

    def hourly_counts(self) -> np.ndarray:
        hours = ((self.times - self.start) // 3600).astype(np.int64)
        return np.bincount(hours[(hours >= 0) & (hours < 24)], minlength=24)

    def thinned(self, keep: Callable[[np.ndarray], np.ndarray], seed: int) -> "Day":
        """This day with each request kept with probability ``keep(hours into the day)``."""
        kept = np.random.default_rng(seed).random(len(self)) < keep((self.times - self.start) / 3600.0)
        return Day(self.start, self.times[kept], self.cost[kept], self.paid[kept])


def campaign_day(market: Market, campaign: str, creatives: tuple[str, ...], value_per_click: float, seed: int,
                 start: float, rate: float) -> Day:
    """The campaign's requests of the day from ``start``: those whose size one of its creatives has."""
    world = market.world
    by_size: dict[int, int] = {}
    for creative in creatives:
        index = market.creative_index.get(creative)
        if index is not None:
            by_size.setdefault(int(world.cre_size[index]), index)
    if not by_size:
        raise BenchError(f"campaign {campaign}: none of its creatives is in the synthetic market")
    creative_of_size = np.full(len(world.sizes), -1, dtype=np.int64)
    creative_of_size[list(by_size)] = list(by_size.values())
    traffic = Traffic(market, seed, start, 24.0, rate, 1.0, None, 1, [])
    first_price = np.array(FIRST_PRICE_EXCHANGES)
    parts: list[tuple[np.ndarray, ...]] = []
    for k in range((len(traffic) + CHUNK - 1) // CHUNK):
        c = traffic.draw_chunk(k)
        cre = creative_of_size[c["size"]]
        rows = np.flatnonzero(cre >= 0)
        value = world.true_pctr(c["slot"][rows], c["user"][rows], c["ua"][rows], c["hour"][rows],
                                c["weekday"][rows], cre[rows]) * value_per_click * 1000.0
        floor = np.asarray(c["floor"])[rows]
        price = np.asarray(c["market"])[rows]
        first = np.isin(np.asarray(c["exchange"])[rows], first_price)
        parts.append((traffic.times[k * CHUNK:(k + 1) * CHUNK][rows], value / 1000.0,
                      lone_bidder_pays(value, floor, price, first) / 1000.0))
    times, cost, paid = (np.concatenate(column) for column in zip(*parts))
    return Day(start, times, cost, paid)


def lone_bidder_pays(bid: np.ndarray, floor: np.ndarray, market: np.ndarray, first_price: np.ndarray) -> np.ndarray:
    """What a lone bidder pays per auction (0 on a loss), all USD CPM: ``bench.exchange.auction``'s rule with
    one offer, vectorised (tests/test_pacing.py holds the two together)."""
    won = (bid >= floor) & (bid > market)
    return np.where(won, np.where(first_price, bid, np.minimum(np.maximum(market, floor), bid)), 0.0)


@dataclasses.dataclass(frozen=True)
class DayRun:
    hours: np.ndarray       # hours into the day of each update
    spent: np.ndarray       # (committed + reserved) / budget, at each update
    spent_usd: np.ndarray   # committed + reserved, at each update
    planned: np.ndarray     # the plan's cumulative fraction at each update
    pass_rate: np.ndarray
    committed: float        # USD at the end of the day, every notice settled
    budget: float           # USD at the end of the day

    def summary(self) -> dict[str, Any]:
        """Budget use, the hour spend reached 99 % of the budget, and the RMSE (percentage points of the budget)
        of the spent fraction against the plan; for a day that started late, against what was left of the
        plan at the start, stretched to the whole budget."""
        reached = np.flatnonzero(self.spent >= EXHAUSTED)
        first = self.planned[0]
        planned = (self.planned - first) / (1.0 - first) if first < 1 else self.planned
        return {"use": round(self.committed / self.budget, 5) if self.budget > 0 else None,
                "exhausted_h": round(float(self.hours[reached[0]]), 3) if len(reached) else None,
                "rmse_pp": round(float(np.sqrt(np.mean((self.spent - planned) ** 2))) * 100, 3),
                "spend_usd": round(self.committed, 4), "budget_usd": round(self.budget, 4)}


def simulate(day: Day, plan: DailyPlan, pacer: Pacer, budget: float | Callable[[float], float], *, update_s: float,
             workers: int, notice_delay_s: float, headroom: float, seed: int, from_hour: float = 0.0,
             count_eligible: bool = True) -> DayRun:
    """One day of ``pacer`` on ``day`` (see the module's docstring); ``budget`` may change with the hour."""
    budget_at = budget if callable(budget) else (lambda hours: budget)
    rng = np.random.default_rng([seed, 7])
    worker = rng.integers(0, workers, len(day))
    draw = rng.random(len(day))
    edges = day.start + np.arange(from_hour * 3600.0, SECONDS_PER_DAY + update_s / 2, update_s)
    edges[-1] = day.start + SECONDS_PER_DAY
    bounds = np.searchsorted(day.times, edges)
    committed = reserved = 0.0
    leases = np.zeros(workers)
    pending: deque[tuple[np.ndarray, np.ndarray, np.ndarray]] = deque()  # (due, cost, paid), in due order
    steps = len(edges) - 1
    hours, spent, spent_usd, planned, passes = (np.zeros(steps) for _ in range(5))
    eligible = no_lease = 0
    settled_cost = settled_paid = 0.0  # USD reserved and USD paid by the bids settled so far
    lease_floor = LEASE_FLOOR_BIDS * float(np.quantile(day.cost, 0.99)) if len(day) else 0.0  # per worker

    def settle(until: float) -> None:
        nonlocal committed, reserved, settled_cost, settled_paid
        while pending and pending[0][0][0] <= until:
            due, cost, paid = pending[0]
            n = int(np.searchsorted(due, until, side="right"))
            reserved -= float(cost[:n].sum())
            committed += float(paid[:n].sum())
            settled_cost += float(cost[:n].sum())
            settled_paid += float(paid[:n].sum())
            if n < len(due):
                pending[0] = (due[n:], cost[n:], paid[n:])
                break
            pending.popleft()

    for k in range(steps):
        now = float(edges[k])
        settle(now)
        target = budget_at((now - day.start) / 3600.0)
        counted = count_eligible and k > 0
        pace = pacer.update(now, committed + reserved, target, plan, eligible if counted else None,
                            no_lease if counted else None)
        hours[k] = (now - day.start) / 3600.0
        spent_usd[k] = committed + reserved
        spent[k] = spent_usd[k] / target if target > 0 else 1.0
        planned[k], passes[k] = pace.planned, pace.pass_rate
        available = target - committed - reserved - leases.sum()
        if available < 0:  # a lowered budget: the banker takes back what the leases hold beyond it
            leases *= max(0.0, 1.0 + available / leases.sum()) if leases.sum() > 0 else 0.0
            available = 0.0
        # what a ledger measures: USD reserved per USD spent, over the bids settled so far
        reserve_per_spend = max(settled_cost / settled_paid, 1.0) if settled_paid > 0 else 1.0
        share = pace.lease(update_s, headroom, reserve_per_spend, floor=lease_floor * workers) / workers
        for w in range(workers):
            top = min(max(share - leases[w], 0.0), available)
            leases[w] += top
            available -= top
        lo, hi = int(bounds[k]), int(bounds[k + 1])
        eligible = hi - lo
        passed = lo + np.flatnonzero(draw[lo:hi] < pace.pass_rate)
        no_lease = len(passed)
        taken = []
        for w in range(workers):
            mine = passed[worker[passed] == w]
            total = np.cumsum(day.cost[mine])
            n = int(np.searchsorted(total, leases[w], side="right"))
            if n:
                leases[w] -= float(total[n - 1])
                taken.append(mine[:n])
                no_lease -= n
        if taken:
            bids = np.sort(np.concatenate(taken))
            reserved += float(day.cost[bids].sum())
            pending.append((day.times[bids] + notice_delay_s, day.cost[bids], day.paid[bids]))
    settle(np.inf)
    return DayRun(hours, spent, spent_usd, planned, passes, committed, budget_at(24.0))


def _plan(market: Market, config: PacingConfig, creatives, vpc: float, seed: int) -> DailyPlan:
    counts = [campaign_day(market, config.campaign, creatives, vpc, seed * 1000 + back,
                           config.start - back * SECONDS_PER_DAY, config.rate).hourly_counts()
              for back in range(config.history_days, 0, -1)]
    return DailyPlan.from_counts(counts) if counts else DailyPlan.flat()


def run_pacing(config: PacingConfig, progress: bool = True) -> dict[str, Any]:
    terms = read_terms(config.campaigns)
    if config.campaign not in terms.campaigns:
        raise BenchError(f"--campaign {config.campaign}: not in {config.campaigns} "
                         f"(has {', '.join(sorted(terms.campaigns))})")
    campaign = terms.campaigns[config.campaign]
    started = time.perf_counter()
    market = Market(config.world_seed, config.world_rows)
    sim = dict(update_s=config.update_s, workers=config.workers, notice_delay_s=config.notice_delay_s,
               headroom=config.headroom)
    runs: list[dict[str, Any]] = []
    curves: dict[str, Any] = {}
    scenarios: list[dict[str, Any]] = []
    total = len(config.seeds) * (1 + len(config.fractions) * len(MODES) + (4 if config.scenarios else 0))
    bar = tqdm(total=total, desc="pacing", unit="day", disable=not progress)
    for seed in config.seeds:
        bar.set_postfix_str(f"seed {seed}: traffic")
        plan = _plan(market, config, campaign.creatives, campaign.value_per_click, seed)
        day = campaign_day(market, config.campaign, campaign.creatives, campaign.value_per_click, seed,
                           config.start, config.rate)
        unconstrained = day.unconstrained()
        bar.update()
        for fraction in config.fractions:
            for mode in MODES:
                bar.set_postfix_str(f"seed {seed}: {mode} {fraction}")
                run = simulate(day, DailyPlan.flat() if mode == "even-flat" else plan,
                               Pacer("asap" if mode == "asap" else "even"), fraction * unconstrained, seed=seed, **sim)
                runs.append({"seed": seed, "fraction": fraction, "mode": mode, **run.summary()})
                if seed == config.seeds[0]:
                    curves[f"{mode}/{fraction}"] = _curve(run)
                bar.update()
        if config.scenarios:
            for name, row, run in _scenarios(day, plan, seed, sim):
                scenarios.append({"seed": seed, "scenario": name, **row})
                if seed == config.seeds[0]:
                    curves[f"scenario/{name}"] = _curve(run)
                bar.update()
    bar.close()
    return {"config": {**dataclasses.asdict(config), "campaigns": str(config.campaigns)},
            "requests_per_day": len(day), "seconds": round(time.perf_counter() - started, 1),
            "runs": runs, "table": _table(runs), "scenarios": scenarios, "curves": curves}


def _scenarios(day: Day, plan: DailyPlan, seed: int, sim: dict[str, Any]):
    """The stress cases, each with a budget it can spend (a fraction of what that day's traffic allows)."""
    late = Day(day.start, *(a[day.times >= day.start + 12 * 3600] for a in (day.times, day.cost, day.paid)))
    quiet = day.thinned(lambda h: np.where((h >= 6) & (h < 15), 0.3, 1.0), seed)
    base = day.unconstrained()
    cases = [
        ("late start 12:00, 0.6", late, 0.6 * late.unconstrained(), 12.0),
        ("budget 0.4 raised to 0.7 at 13:00", day, lambda h: (0.4 if h < 13 else 0.7) * base, 0.0),
        ("budget 0.6 lowered to 0.3 at 13:00", day, lambda h: (0.6 if h < 13 else 0.3) * base, 0.0),
        ("quiet 06-15 (30 % of traffic), 0.6", quiet, 0.6 * quiet.unconstrained(), 0.0),
    ]
    for name, requests, budget, from_hour in cases:
        run = simulate(requests, plan, Pacer("even"), budget, seed=seed, from_hour=from_hour, **sim)
        yield name, run.summary(), run


def _curve(run: DayRun, points: int = 289) -> dict[str, list[float]]:
    pick = np.unique(np.linspace(0, len(run.hours) - 1, points).round().astype(np.int64))
    return {"hours": run.hours[pick].round(4).tolist(), "spent": run.spent[pick].round(5).tolist(),
            "planned": run.planned[pick].round(5).tolist(), "pass_rate": run.pass_rate[pick].round(4).tolist()}


def _table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per mode and fraction over the seeds: mean and worst use, earliest run-out, mean RMSE."""
    out = []
    for mode in MODES:
        for fraction in sorted({r["fraction"] for r in runs}):
            rows = [r for r in runs if r["mode"] == mode and r["fraction"] == fraction]
            if not rows:
                continue
            exhausted = [r["exhausted_h"] for r in rows if r["exhausted_h"] is not None]
            out.append({"mode": mode, "fraction": fraction, "seeds": len(rows),
                        "use_mean": round(float(np.mean([r["use"] for r in rows])), 5),
                        "use_min": min(r["use"] for r in rows),
                        "exhausted_h_min": min(exhausted) if exhausted else None,
                        "rmse_pp_mean": round(float(np.mean([r["rmse_pp"] for r in rows])), 3)})
    return out


def plot(report: dict[str, Any], path: Path) -> Path:
    """Cumulative spend against the plan per budget fraction (the first seed), the stress scenarios, and the
    pass rate even pacing chose through the day."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = report["config"]["fractions"]
    columns = 3
    rows = (len(fractions) + 2 + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.0 * rows), squeeze=False)
    axes = axes.ravel()
    colors = {"even": "tab:blue", "even-flat": "tab:green", "asap": "tab:red"}
    curves = report["curves"]
    for ax, fraction in zip(axes, fractions):
        for mode in MODES:
            curve = curves.get(f"{mode}/{fraction}")
            if curve:
                ax.plot(curve["hours"], curve["spent"], color=colors[mode], lw=1.3, label=mode)
        even = curves.get(f"even/{fraction}")
        if even:
            ax.plot(even["hours"], even["planned"], color="black", ls="--", lw=1, label="learned plan")
        ax.plot([0, 24], [0, 1], color="tab:green", ls=":", lw=0.8, label="flat plan (first day)")
        ax.set_title(f"budget = {fraction:g} x unconstrained spend", fontsize=10)
        ax.set_ylabel("spent / daily budget")
    scenarios = axes[len(fractions)]
    for name, curve in curves.items():
        if name.startswith("scenario/"):
            scenarios.plot(curve["hours"], curve["spent"], lw=1.2, label=name.split("/", 1)[1])
    scenarios.set_title("stress scenarios (even, learned plan)", fontsize=10)
    scenarios.set_ylabel("spent / daily budget at the time")
    rates = axes[len(fractions) + 1]
    for fraction in fractions:
        curve = curves.get(f"even/{fraction}")
        if curve:
            rates.plot(curve["hours"], curve["pass_rate"], lw=1.0, label=f"{fraction:g}")
    rates.set_title("pass rate of even pacing, by budget fraction", fontsize=10)
    rates.set_ylabel("pass rate")
    for ax in axes[:len(fractions) + 2]:
        ax.axvline(21.6, color="gray", ls=":", lw=1)
        ax.set_xlim(0, 24)
        ax.set_xticks(range(0, 25, 3))
        ax.set_xlabel("hour of the day (campaign's zone)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    for ax in axes[len(fractions) + 2:]:
        ax.set_visible(False)
    fig.suptitle(f"cumulative spend (committed + reserved) against plan, seed {report['config']['seeds'][0]}; "
                 f"dotted vertical: 90 % of the day", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def fraction_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions, got {text!r}") from None
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"fractions must be in (0, 1], got {text!r}")
    return values


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    defaults = PacingConfig()
    parser = argparse.ArgumentParser(prog="python -m bench pacing",
                                     description="Even pacing against asap over simulated days of the synthetic "
                                                 "market: budget use, run-out time, spend-vs-plan RMSE.")
    parser.add_argument("--out", type=Path, required=True, help="folder for pacing.json and pacing.png")
    parser.add_argument("--seeds", type=_seeds, default=defaults.seeds, help="traffic seeds (default: 0,1,2)")
    parser.add_argument("--fractions", type=fraction_list, default=defaults.fractions,
                        help="budgets as fractions of the unconstrained spend (default: 0.2,0.4,0.6,0.8)")
    parser.add_argument("--campaign", default=defaults.campaign, help="campaign id (default: %(default)s)")
    parser.add_argument("--campaigns", type=Path, default=defaults.campaigns, help="catalog (default: the bundle's)")
    parser.add_argument("--rate", type=positive(float), default=defaults.rate,
                        help="exchange requests per simulated second before the size filter (default: %(default)s)")
    parser.add_argument("--history-days", type=int, default=defaults.history_days,
                        help="past days the plan is learned from (default: %(default)s)")
    parser.add_argument("--update", type=positive(float), default=defaults.update_s,
                        help="simulated seconds between the banker's updates (default: %(default)s)")
    parser.add_argument("--workers", type=positive(int), default=defaults.workers, help="(default: %(default)s)")
    parser.add_argument("--notice-delay", type=float, default=defaults.notice_delay_s,
                        help="simulated seconds from a bid to its notice (default: %(default)s)")
    parser.add_argument("--headroom", type=float, default=defaults.headroom,
                        help="leases cover this many times the planned spend (default: %(default)s)")
    parser.add_argument("--no-scenarios", action="store_true", help="skip the stress scenarios")
    parser.add_argument("--world-rows", type=positive(int), default=defaults.world_rows,
                        help="size of the synthetic world (default: the shipped bundle's, %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.history_days < 0 or args.notice_delay < 0 or args.headroom < 1:
        parser.error("--history-days and --notice-delay must be >= 0, --headroom >= 1")
    config = PacingConfig(seeds=args.seeds, fractions=args.fractions, campaign=args.campaign,
                          campaigns=args.campaigns, rate=args.rate, history_days=args.history_days,
                          update_s=args.update, workers=args.workers, notice_delay_s=args.notice_delay,
                          headroom=args.headroom, scenarios=not args.no_scenarios, world_rows=args.world_rows)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: --out {args.out}: cannot create the folder: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        report = run_pacing(config, progress=not args.quiet)
    except (TermsError, BenchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    json_path = args.out / "pacing.json"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    png = plot(report, args.out / "pacing.png")
    print(json.dumps({"json": str(json_path), "png": str(png), "table": report["table"],
                      "scenarios": report["scenarios"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

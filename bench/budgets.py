"""`python -m bench budgets`: budgets, even pacing and the spend ledger on the simulated exchange.

    python -m bench budgets [--fractions 0.2,0.4,0.6,0.8] [--workers N] [--ledger URL] [--frequency-cap N/SECONDS]
                            [--speed X] [--out DIR]

1. **Unconstrained day**: the bidder on the shipped bundle and catalog (no budgets), notices on, against
   `bench exchange` with its default faults (lost, late, duplicated notices, unrendered wins, forgeries): what each
   campaign spends when nothing holds it back.
2. **One day per fraction**, the same traffic (same seed): every campaign given a daily budget of that fraction of
   its unconstrained spend and `"pacing": "even"`, a fresh ledger each day. Per campaign: budget use (the
   exchange's charges / budget), overspend, the simulated hour its day's spend reached 99 % of the budget (None:
   never), the RMSE of its cumulative spend (as a share of the budget) against the bidder's flat plan at each hour's
   end, and what the bidder's ledger says it spent (`/admin/campaigns`) beside what the exchange charged.

With `--frequency-cap N/SECONDS` every campaign, on every day, may show a user at most N billed impressions in any
SECONDS (simulated): the exchange's users are a Zipf population, so heavy users come back within the window, and
each day reports the impressions billed beyond a cap (by the exchange's count) over the capped impressions billed.
With `--ledger redis://...` the database is emptied before each budgeted day (a fresh ledger each day, as the
embedded banker's state directory is): give the run a Redis of its own.

Writes `DIR/budgets.json` and `DIR/budgets.png` (cumulative spend against the plan, per fraction).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.exchange.cli import DEFAULT_WORLD_ROWS, DEFAULT_WORLD_SEED
from bench.exchange.faults import Faults
from bench.exchange.traffic import Market
from bench.load import REPO, child_environment
from bench.loop import new_folder, serve_days
from bench.machine import machine_info
from bench.pacing import fraction_list
from bench.servers import BenchError
from bidder import DEFAULT_BUNDLE

DEFAULT_FRACTIONS = (0.2, 0.4, 0.6, 0.8)
EXHAUSTED = 0.99  # a budget counts as spent once this share of it is
NO_FAULTS = Faults(delay_s=2.0, late=0.0, lost=0.0, duplicate=0.0, unrendered=0.0, forged=0.0)


def capped_catalog(catalog: dict, cap: tuple[int, int] | None) -> dict:
    """``catalog`` (a copy) with every campaign capped at ``cap`` = (impressions, seconds) per user, if given."""
    out = json.loads(json.dumps(catalog))
    if cap is not None:
        for campaign in out["campaigns"]:
            campaign["frequency_cap"] = [{"count": cap[0], "seconds": cap[1], "scope": "campaign"}]
    return out


def budget_catalog(catalog: dict, spend: dict[str, float], fraction: float) -> dict:
    """``catalog`` with each campaign that spent something given ``fraction`` of that as an even-paced daily budget."""
    out = json.loads(json.dumps(catalog))
    for campaign in out["campaigns"]:
        spent = spend.get(campaign["id"], 0.0)
        if spent > 0:
            campaign["budget"] = {"daily": round(spent * fraction, 6), "timezone": "UTC"}
            campaign["pacing"] = "even"
    return out


def campaign_figures(entry: dict, budget: float, seen: dict | None) -> dict[str, Any]:
    """One campaign's day: use, overspend, when 99 % was spent, RMSE against the flat plan, the ledger's view."""
    hourly = [h["spend"] for h in entry["hourly"]]
    cumulative, total = [], 0.0
    for spend in hourly:
        total += spend
        cumulative.append(total / budget)
    hours = len(hourly)
    exhausted = next((h + 1 for h, share in enumerate(cumulative) if share >= EXHAUSTED), None)
    rmse = math.sqrt(sum((share - (h + 1) / hours) ** 2 for h, share in enumerate(cumulative)) / hours)
    out = {"budget": budget, "spend": entry["spend"], "use": round(entry["spend"] / budget, 6),
           "overspend": round(max(0.0, entry["spend"] - budget) / budget, 6), "exhausted_hour": exhausted,
           "rmse_vs_plan": round(rmse, 6), "cumulative": [round(c, 6) for c in cumulative],
           "bills": entry["bills"], "cap_violations": entry.get("cap_violations", 0)}
    if seen is not None:  # a fresh ledger each day: its total is the day's (its "today" has moved on meanwhile)
        out["ledger_spent"] = seen.get("spent_total")
        out["ledger_minus_exchange"] = (None if seen.get("spent_total") is None
                                        else round(seen["spent_total"] - entry["spend"], 6))
    return out


def score_day(day: dict, spend: dict[str, float], fraction: float, capped: bool) -> dict[str, Any]:
    """A budgeted day's figures, per campaign (``campaign_figures``) and together; ``capped``: every campaign has a
    frequency cap, so all its billed impressions are capped ones."""
    seen = (day.get("bidder") or {}).get("campaigns", day.get("bidder") or {})
    figures = {cid: campaign_figures(c, round(spend[cid] * fraction, 6), seen.get(cid))
               for cid, c in (day["campaigns"] or {}).items() if spend.get(cid, 0) > 0}
    budget, spent = sum(f["budget"] for f in figures.values()), sum(f["spend"] for f in figures.values())
    violations = sum(f["cap_violations"] for f in figures.values())
    impressions = sum(f["bills"] for f in figures.values()) if capped else 0
    gaps = [abs(f["ledger_minus_exchange"]) for f in figures.values() if f.get("ledger_minus_exchange") is not None]
    return {
        "fraction": fraction, "use": round(spent / budget, 6), "min_use": min(f["use"] for f in figures.values()),
        "max_overspend": max(f["overspend"] for f in figures.values()),
        "earliest_exhausted_hour": min((f["exhausted_hour"] for f in figures.values()
                                        if f["exhausted_hour"] is not None), default=None),
        "rmse_vs_plan": round(math.sqrt(sum(f["rmse_vs_plan"] ** 2 for f in figures.values()) / len(figures)), 6),
        # the campaigns' RMSE weighted by their budgets: the few-bid campaigns, whose spend moves in steps, weigh
        # what they spend
        "rmse_vs_plan_by_budget": round(sum(f["rmse_vs_plan"] * f["budget"] for f in figures.values()) / budget, 6),
        "cap_violations": violations, "capped_impressions": impressions,
        "cap_violation_rate": round(violations / impressions, 6) if impressions else None,
        "max_ledger_minus_exchange": round(max(gaps), 6) if gaps else None,
        "requests": day["requests"], "bids": day["bids"], "bills": day["bills"], "notices": day["notices"],
        # requests the bidder answered too late: a loaded machine's, which no budget can spend
        "timeouts": day.get("timeouts"), "campaigns": figures}


def _admin(base: str) -> dict | None:
    """The bidder's own view of its campaigns (loopback: this machine)."""
    time.sleep(1.0)  # the last notices' commits reach the banker at the next refresh
    try:
        with urllib.request.urlopen(base + "/admin/campaigns", timeout=10) as answer:
            return json.loads(answer.read())
    except (OSError, ValueError):
        return None


def fresh_ledger(url: str | None) -> None:
    """Empty the Redis database of ``--ledger`` (nothing to do for the embedded banker: a state directory per day)."""
    if url is not None:
        from bidder.ledger.redis_banker import connect

        client = connect(url)
        try:
            client.flushdb()
        finally:
            client.close()


def run_budgets(args: argparse.Namespace) -> dict[str, Any]:
    out = new_folder(args.out)
    catalog = capped_catalog(json.loads(args.campaigns.read_text()), args.frequency_cap)
    unconstrained = args.campaigns
    if args.frequency_cap is not None:
        unconstrained = out / "campaigns-unconstrained.json"
        unconstrained.write_text(json.dumps(catalog, indent=1) + "\n")
    print(f"building the market ({args.world_rows:,} rows, seed {args.world_seed})", file=sys.stderr, flush=True)
    market = Market(args.world_seed, args.world_rows)
    options = ("--ledger-refresh", str(args.ledger_refresh), *(("--ledger", args.ledger) if args.ledger else ()))
    free = serve_days("unconstrained", args.model, unconstrained, market, out, first_day=0, days=1, args=args,
                      workers=args.workers, faults=args.faults)
    spend = {cid: c["spend"] for cid, c in (free["campaigns"] or {}).items()}
    if not any(v > 0 for v in spend.values()):
        raise BenchError("no campaign spent anything on the unconstrained day: nothing to budget")
    days = {}
    for fraction in args.fractions:
        path = out / f"campaigns-{fraction:g}.json"
        path.write_text(json.dumps(budget_catalog(catalog, spend, fraction), indent=1) + "\n")
        fresh_ledger(args.ledger)
        day = serve_days(f"budget-{fraction:g}", args.model, path, market, out, first_day=0, days=1, args=args,
                         options=options, workers=args.workers, faults=args.faults, before_stop=_admin)
        days[f"{fraction:g}"] = score_day(day, spend, fraction, capped=args.frequency_cap is not None)
        print(f"fraction {fraction:g}: use {days[f'{fraction:g}']['use']:.4f}", file=sys.stderr, flush=True)
    command = (f"python -m bench budgets --fractions {','.join(f'{f:g}' for f in args.fractions)} --workers "
               f"{args.workers}{' --ledger ' + args.ledger if args.ledger else ''}{' --no-faults' if args.no_faults else ''}"
               f"{' --frequency-cap %d/%d' % args.frequency_cap if args.frequency_cap else ''}"
               f" --rate {args.rate:g} --speed {args.speed:g} --out {args.out}")
    report = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine_info(REPO, "not used"),
              "command": command,
              "config": {"fractions": list(args.fractions), "rate": args.rate, "speed": args.speed, "seed": args.seed,
                         "workers": args.workers, "ledger": args.ledger or "embedded",
                         "frequency_cap": (None if args.frequency_cap is None else
                                           {"count": args.frequency_cap[0], "seconds": args.frequency_cap[1],
                                            "scope": "campaign"}),
                         "faults": dataclasses.asdict(args.faults),
                         "ledger_refresh_s": args.ledger_refresh, "world_seed": args.world_seed,
                         "world_rows": args.world_rows},
              "unconstrained": {"spend": spend, "requests": free["requests"], "bills": free["bills"],
                                "timeouts": free.get("timeouts")},
              "days": days}
    (out / "budgets.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, out / "budgets.png")
    return report


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    days = report["days"]
    fig, axes = plt.subplots(1, len(days), figsize=(4 * len(days), 3.5), sharey=True, squeeze=False)
    for ax, (name, day) in zip(axes[0], days.items()):
        for cid, c in day["campaigns"].items():
            hours = range(1, len(c["cumulative"]) + 1)
            ax.plot(hours, c["cumulative"], lw=1, label=cid)
        n = max(len(c["cumulative"]) for c in day["campaigns"].values())
        ax.plot(range(1, n + 1), [(h + 1) / n for h in range(n)], "k--", lw=1, label="plan")
        ax.set_title(f"budget {name} of unconstrained: use {day['use']:.3f}")
        ax.set_xlabel("simulated hour")
    axes[0][0].set_ylabel("spend / daily budget")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(report: dict[str, Any], out: Path) -> str:
    lines = ["fraction  use      min use  max overspend  99 % spent at  RMSE vs plan  cap violations"]
    for name, d in report["days"].items():
        hour = "-" if d["earliest_exhausted_hour"] is None else f"{d['earliest_exhausted_hour']} h"
        capped = (f" of {d['capped_impressions']} capped ({d['cap_violation_rate']:.2%})"
                  if d.get("cap_violation_rate") is not None else "")
        lines.append(f"{name:8}  {d['use']:.4f}   {d['min_use']:.4f}   {d['max_overspend']:.4%}       {hour:>6}"
                     f"         {d['rmse_vs_plan']:.4f}        {d['cap_violations']}{capped}")
    lines += [f"results: {out / 'budgets.json'}", f"plot:    {out / 'budgets.png'}"]
    return "\n".join(lines)


def frequency_cap(text: str) -> tuple[int, int]:
    """``N/SECONDS``: N impressions per user in any SECONDS."""
    count, _, seconds = text.partition("/")
    try:
        cap = int(count), int(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected impressions/seconds such as 3/3600, got {text!r}") from None
    if min(cap) < 1:
        raise argparse.ArgumentTypeError(f"impressions and seconds must be positive, got {text!r}")
    return cap


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench budgets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fractions", type=fraction_list, default=DEFAULT_FRACTIONS,
                        help="daily budgets as fractions of each campaign's unconstrained spend (default: 0.2,0.4,0.6,0.8)")
    parser.add_argument("--workers", type=int, default=1, help="bidder workers (default: 1)")
    parser.add_argument("--ledger", default=None, metavar="URL",
                        help="the bidder's --ledger (redis://HOST:PORT/DB); default: the embedded banker")
    parser.add_argument("--frequency-cap", type=frequency_cap, default=None, metavar="N/SECONDS",
                        help="cap every campaign at N billed impressions per user in any SECONDS (simulated), every "
                             "day (default: the catalog's caps, none in the shipped one)")
    parser.add_argument("--ledger-refresh", type=float, default=0.1, metavar="SECONDS",
                        help="the bidder's --ledger-refresh (default: %(default)s)")
    parser.add_argument("--no-faults", action="store_true",
                        help="every notice arrives, on time, once, and every win renders (default: the exchange's "
                             "default faults: lost, late and duplicated notices, unrendered wins, forgeries)")
    parser.add_argument("--rate", type=float, default=1000.0, help="mean wall-clock requests/s (default: %(default)s)")
    parser.add_argument("--speed", type=float, default=720.0,
                        help="simulated seconds per wall second (default: %(default)s, a day in two minutes)")
    parser.add_argument("--seed", type=int, default=0, help="traffic seed, the same every day (default: 0)")
    parser.add_argument("--world-seed", type=int, default=DEFAULT_WORLD_SEED)
    parser.add_argument("--world-rows", type=int, default=DEFAULT_WORLD_ROWS)
    parser.add_argument("--model", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--campaigns", type=Path, default=DEFAULT_BUNDLE / "campaigns.json")
    parser.add_argument("--out", type=Path, default=Path("runs") / time.strftime("budgets-%Y%m%dT%H%M%SZ", time.gmtime()))
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    args.faults = NO_FAULTS if args.no_faults else Faults()
    child_environment()
    try:
        report = run_budgets(args)
    except (BenchError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary(report, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The run's PNG: cumulative spend against the even-pacing plan per campaign, and win rate per hour."""
from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_report"]


def plot_report(report: dict[str, Any], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (spend_ax, rate_ax) = plt.subplots(1, 2, figsize=(14, 5.5))
    several = len(report["bidders"]) > 1
    for b, (url, bidder) in enumerate(report["bidders"].items()):
        prefix = f"bidder {b + 1} " if several else ""
        for cid, campaign in bidder["campaigns"].items():
            hours = [h["hour"] + 1 for h in campaign["hourly"]]
            total, spent = 0.0, []
            for h in campaign["hourly"]:
                total += h["spend"]
                spent.append(total)
            line, = spend_ax.plot([0, *hours], [0.0, *spent], label=f"{prefix}{cid}")
            if campaign["hourly"] and campaign["hourly"][0]["plan"] is not None:
                total, plan = 0.0, []
                for h in campaign["hourly"]:
                    total += h["plan"]
                    plan.append(total)
                spend_ax.plot([0, *hours], [0.0, *plan], linestyle="--", color=line.get_color(), linewidth=1)
        hourly = bidder["hourly"]
        rate_ax.plot([h["hour"] for h in hourly], [h["win_rate"] if h["win_rate"] is not None else float("nan")
                                                   for h in hourly], marker="o", label=f"bidder {b + 1}: {url}")
    config = report["config"]
    spend_ax.set_title("cumulative spend charged (USD), dashed: even-pacing plan")
    spend_ax.set_xlabel(f"simulated hours from {config['start']}")
    spend_ax.set_ylabel("USD")
    if spend_ax.lines:
        spend_ax.legend(fontsize=7, ncol=2)
    rate_ax.set_title("win rate (wins / bids) per simulated hour")
    rate_ax.set_xlabel("simulated hour of the run")
    rate_ax.set_ylim(0, 1)
    rate_ax.legend(fontsize=7)
    fig.suptitle(f"simulated exchange: {config['hours']:g} h at speed {config['speed']:g}, seed {config['seed']}, "
                 f"{report['requests']:,} requests, {report['rate_rps']:,.0f} requests/s"
                 + (" (partial)" if report.get("partial") else ""), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

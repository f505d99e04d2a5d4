"""Latency-by-percentile plot of a load run: one panel per scenario, every server in each.

With `--repeat N` each server's curve is its median-throughput repetition of that scenario.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI; must precede pyplot's import
import matplotlib.pyplot as plt  # noqa: E402

from bench.report import SERVER_ORDER, Measurement  # noqa: E402

# The x axis counts "nines" (-log10 of the fraction above the percentile), so the tail, where
# the servers differ, gets as much room as the median.
TICKS = (50, 90, 99, 99.9, 99.99, 99.999)
STYLE = {"echo": dict(color="tab:gray", linestyle="--"), "bidder": dict(color="tab:blue"),
         "fastapi": dict(color="tab:orange", linestyle=":")}


def nines(percentile: float) -> float:
    return -math.log10(max(1.0 - percentile / 100.0, 1e-9))


def representatives(measurements: list[Measurement]) -> list[list[Measurement]]:
    """Per scenario (in the order first run), one run per server: its median-rps repetition."""
    scenarios: dict[tuple[int, int], dict[str, list[Measurement]]] = {}
    for m in measurements:
        scenarios.setdefault(m.scenario, {}).setdefault(m.server, []).append(m)
    rank = {name: i for i, name in enumerate(SERVER_ORDER)}
    out = []
    for by_server in scenarios.values():
        chosen = []
        for server in sorted(by_server, key=lambda name: rank.get(name, len(rank))):
            runs = sorted(by_server[server], key=lambda m: m.result.rps)
            chosen.append(runs[(len(runs) - 1) // 2])
        out.append(chosen)
    return out


def plot_latency(measurements: list[Measurement], path: Path, title: str) -> Path:
    panels = representatives(measurements)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, shown in zip(axes[0], panels):
        for m in shown:
            # P0 is the minimum: a cliff at the left edge that would squash the median's detail.
            points = [(nines(p), v / 1000) for p, v in m.result.percentiles_us if 0 < p < 100]
            ax.plot([x for x, _ in points], [y for _, y in points], marker=".", label=
                    f"{m.server} ({m.result.rps:,.0f} rps)", **STYLE.get(m.server, {}))
        workers, connections = shown[0].scenario
        ax.set_title(f"c={connections}, {workers} worker{'s' if workers > 1 else ''}")
        ax.set_xticks([nines(p) for p in TICKS], [f"{p:g}%" for p in TICKS], fontsize=8)
        ax.set_xlim(nines(10), nines(99.999))
        ax.set_yscale("log")
        ax.set_xlabel("percentile")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("latency (ms)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""What shading costs in process: ``BidEngine`` on the IAB simple-banner request at ``at`` = 2 (bid the value)
against ``at`` = 1 (shaded by the bundle's win-price model), taking turns in one process.

    python -m bench shading [--bundle DIR] [--rounds N] --out FILE.json

Three shapes: a lone request (``BidEngine.bid``: decode to encoded response), and batches of 8 and 32
requests (prepared first, then ``score_batch``: one scoring call and one shading call for the batch; the
figure is per request). The engine is built as ``bidder serve`` builds it (factorized scoring when the
bundle has it, the win-price model). Each round times every (shape, auction) once in CPU time of this
thread (``time.thread_time``: time the scheduler gives to other processes is not counted); the report gives
per-request medians over the rounds and the at=1 / at=2 ratio per shape, plus a PNG. ``search_us_per_call``
is the search alone for one imp (``WinModel.shade_rows``), natively over the bundle's terms against the graph
through ONNX Runtime, taking turns (absent without the terms).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import bidder
from bidder.campaigns import load_catalog
from bidder.engine import BidEngine
from bidder.factorized import FactorizedScorer
from bidder.metrics import Metrics
from bidder.scorer import BundleError, Scorer
from bidder.shading import WinModel

EXAMPLE = "bid-request-2.5/simple-banner.json"
NOW = 1_370_530_800.0  # a fixed clock: the same prices every round
SHAPES = {"lone": 1, "batch8": 8, "batch32": 32}


def build_engine(bundle: Path) -> BidEngine:
    scorer = Scorer(bundle)
    market = WinModel.for_scorer(scorer, max_imps=scorer.max_batch)
    if market is None:
        raise BundleError(f"{bundle}: has no win-price model (python -m train market --data DIR --bundle {bundle})")
    factorized = (FactorizedScorer.for_scorer(scorer, max_imps=scorer.max_batch, max_rows=scorer.max_batch)
                  if scorer.factorized_files() else None)
    campaigns = bundle / "campaigns.json" if (bundle / "campaigns.json").is_file() else bidder.DEFAULT_BUNDLE / "campaigns.json"
    return BidEngine(scorer, load_catalog(campaigns), Metrics(), now=NOW, factorized=factorized, market=market)


def bodies() -> dict[int, bytes]:
    request = json.loads((bidder.OPENRTB_EXAMPLES / EXAMPLE).read_bytes())
    return {at: json.dumps({**request, "at": at}).encode() for at in (2, 1)}


def time_shape(engine: BidEngine, body: bytes, size: int, repeats: int) -> float:
    """µs of CPU per request."""
    if size == 1:
        start = time.thread_time()
        for _ in range(repeats):
            engine.bid(body)
        return (time.thread_time() - start) / repeats * 1e6
    spent = 0.0
    for _ in range(repeats):
        batch = [engine.prepare(body, None, time.perf_counter()) for _ in range(size)]
        start = time.thread_time()
        engine.score_batch(batch)
        spent += time.thread_time() - start
    return spent / repeats / size * 1e6


def search_cost(market: WinModel, rounds: int, calls: int = 2000) -> dict[str, float] | None:
    """µs of CPU per ``shade_rows`` call for one imp: the native search against the graph through ORT, taking
    turns (medians over ``rounds``); None when the bundle has no terms for the native search."""
    if not market.native:
        return None
    sparse = market.inputs["sparse"]
    samples: dict[str, list[float]] = {"native": [], "graph": []}
    try:
        for _ in range(rounds + 1):  # the first round warms both paths
            for name in samples:
                market.native = name == "native"
                start = time.thread_time()
                for _ in range(calls):
                    market.shade_rows(sparse, [0], [5.0], [0.5])
                samples[name].append((time.thread_time() - start) / calls * 1e6)
    finally:
        market.native = True
    return {name: round(statistics.median(values[1:]), 2) for name, values in samples.items()}


def measure(bundle: Path, rounds: int) -> dict[str, Any]:
    engine = build_engine(bundle)
    requests = bodies()
    prices = {}
    for at, body in requests.items():
        outcome = engine.bid(body)
        if outcome.status != 200:
            raise BundleError(f"{bundle}: the example request at at={at} got no bid ({outcome.reason})")
        prices[f"at{at}"] = json.loads(outcome.body)["seatbid"][0]["bid"][0]["price"]
    repeats = {"lone": 300, "batch8": 40, "batch32": 10}
    for at, body in requests.items():  # warm: bindings for every batch size, caches
        for shape, size in SHAPES.items():
            time_shape(engine, body, size, max(1, repeats[shape] // 4))
    samples: dict[str, list[float]] = {}
    for _ in range(rounds):
        for shape, size in SHAPES.items():
            for at, body in requests.items():
                samples.setdefault(f"{shape}_at{at}", []).append(time_shape(engine, body, size, repeats[shape]))
    medians = {key: round(statistics.median(values), 1) for key, values in samples.items()}
    search = search_cost(engine.market, rounds)
    shown = bundle.resolve()
    shown = shown.relative_to(Path.cwd()) if shown.is_relative_to(Path.cwd()) else shown
    return {"bundle": str(shown), "request": EXAMPLE, "rounds": rounds, "clock": "thread CPU time",
            "us_per_request": medians, "search_us_per_call": search, "prices": prices,
            "ratio_at1_over_at2": {shape: round(medians[f"{shape}_at1"] / medians[f"{shape}_at2"], 3)
                                   for shape in SHAPES}}


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    width = 0.38
    us = result["us_per_request"]
    for k, (at, label) in enumerate(((2, "at=2 (value)"), (1, "at=1 (shaded)"))):
        ax.bar([x + (k - 0.5) * width for x in range(len(SHAPES))], [us[f"{s}_at{at}"] for s in SHAPES], width,
               label=label)
    ax.set_xticks(range(len(SHAPES)), [f"{s}\n×{result['ratio_at1_over_at2'][s]}" for s in SHAPES])
    ax.set_ylabel("µs of CPU per request (median)")
    ax.set_title("in-process bid, simple-banner: shaded vs value")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench shading", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=bidder.DEFAULT_BUNDLE,
                        help="bundle with market.onnx (default: the shipped bundle)")
    parser.add_argument("--rounds", type=int, default=9, help="rounds taking turns; medians over them (default 9)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write; the PNG goes beside it")
    args = parser.parse_args(argv)
    return report(args.rounds, args.out, lambda: measure(args.bundle, args.rounds), plot, "ratio_at1_over_at2")


def report(rounds: int, out: Path, run: Callable[[], dict[str, Any]],
           draw: Callable[[dict[str, Any], Path], Path], ratios: str) -> int:
    """An in-process benchmark's command: check ``--rounds`` and ``--out``, ``run`` it, write the JSON and
    the PNG ``draw`` makes beside it, print the medians and ``ratios``; exit status 2 with one line on an error."""
    if rounds < 1:
        print(f"error: --rounds must be >= 1, got {rounds}", file=sys.stderr)
        return 2
    if out.is_dir() or not out.parent.is_dir():
        print(f"error: --out {out}: expected a JSON file name in an existing folder", file=sys.stderr)
        return 2
    try:
        result = run()
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out.write_text(json.dumps(result, indent=2) + "\n")
    png = draw(result, out.with_suffix(".png"))
    print(json.dumps({"json": str(out), "png": str(png), "us_per_request": result["us_per_request"],
                      ratios: result[ratios]}, indent=2))
    return 0

"""What a bundle costs in process: ``BidEngine`` on the IAB simple-banner request, two or more bundles
taking turns in one process (the shipped float32 DeepFM against its compressed successor, say).

    python -m bench bundles --bundle A --bundle B [--rounds N] --out FILE.json

Each engine is built as ``bidder serve`` builds it (factorized scoring when the bundle has it, its
win-price model) and timed as ``python -m bench shading`` times one (``bench/shading.py``): a lone request
(``BidEngine.bid``: decode to encoded response) and batches of 8 and 32 requests (one ``score_batch``),
at ``at`` = 2 (bid the value) and ``at`` = 1 (shaded), in CPU time of this thread. Each round times every
(bundle, shape, auction) once; the report gives per-request medians and each bundle's ratio to the first.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from bench.shading import EXAMPLE, SHAPES, bodies, build_engine, report, time_shape
from bidder.scorer import BundleError

REPEATS = {"lone": 300, "batch8": 40, "batch32": 10}


def _shown(path: Path) -> str:
    resolved = path.resolve()
    return str(resolved.relative_to(Path.cwd()) if resolved.is_relative_to(Path.cwd()) else resolved)


def measure(bundles: list[Path], rounds: int) -> dict[str, Any]:
    engines = {_shown(b): build_engine(b) for b in bundles}
    requests = bodies()
    prices: dict[str, dict[str, float]] = {}
    for name, engine in engines.items():
        for at, body in requests.items():
            outcome = engine.bid(body)
            if outcome.status != 200:
                raise BundleError(f"{name}: the example request at at={at} got no bid ({outcome.reason})")
            prices.setdefault(name, {})[f"at{at}"] = json.loads(outcome.body)["seatbid"][0]["bid"][0]["price"]
        for body in requests.values():  # warm: bindings for every batch size, caches
            for shape, size in SHAPES.items():
                time_shape(engine, body, size, max(1, REPEATS[shape] // 4))
    samples: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for shape, size in SHAPES.items():
            for at, body in requests.items():
                for name, engine in engines.items():
                    samples.setdefault((name, f"{shape}_at{at}"), []).append(
                        time_shape(engine, body, size, REPEATS[shape]))
    medians = {name: {key: round(statistics.median(v), 1) for (n, key), v in samples.items() if n == name}
               for name in engines}
    first = next(iter(medians.values()))
    return {"request": EXAMPLE, "rounds": rounds, "clock": "thread CPU time", "us_per_request": medians,
            "ratio_to_first": {name: {key: round(us / first[key], 3) for key, us in figures.items()}
                               for name, figures in medians.items()},
            "prices": prices}


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(next(iter(result["us_per_request"].values())))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(result["us_per_request"])
    for k, (name, figures) in enumerate(result["us_per_request"].items()):
        ax.bar([x + (k - (len(result["us_per_request"]) - 1) / 2) * width for x in range(len(keys))],
               [figures[key] for key in keys], width, label=name)
    ax.set_xticks(range(len(keys)), [key.replace("_", "\n") for key in keys], fontsize=8)
    ax.set_ylabel("µs of CPU per request (median)")
    ax.set_title("in-process bid, simple-banner: bundles taking turns")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench bundles", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, action="append", required=True,
                        help="bundle with market.onnx (repeat: two or more; ratios are to the first)")
    parser.add_argument("--rounds", type=int, default=9, help="rounds taking turns; medians over them (default 9)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write; the PNG goes beside it")
    args = parser.parse_args(argv)
    if len(args.bundle) < 2:
        print("error: --bundle: give two or more bundles to compare", file=sys.stderr)
        return 2
    return report(args.rounds, args.out, lambda: measure(args.bundle, args.rounds), plot, "ratio_to_first")

if __name__ == "__main__":
    sys.exit(main())

"""Replay of a held-out synthetic bid log: how much surplus each bidding strategy would have made.

``python -m bench replay --data DIR --bundle DIR --out FILE.json`` reads ``DIR/bids.log.txt``
(``python -m train synth``), values every request as the bidder does (the bundle's calibrated pCTR of
the logged creative × the campaign's value per click × 1000, USD CPM) and replays its test split (the
latest 20 %, after everything the models were fitted on) against the true market prices:

    truthful   bid the value
    fixed      bid value × f, the single f that made the most surplus on the validation split
    model      the served shading (``bidder.shading.WinModel`` on the bundle's ``market.onnx``)
    oracle     the same search with the true market distribution (the log's truth columns)

A bid under the floor is no bid; a bid wins when it beats the market price. First price pays the bid,
second price max(market, floor). Per strategy: wins, spend (USD, Σ price / 1000), value won
(USD, Σ pctr_true × value per click) and surplus = value − spend. Second-price requests are replayed
with the same strategies to show that bidding the value stays best there. A PNG plots surplus
against spend for the first-price requests, with the fixed factors as a curve.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bidder.scorer import OUTPUT, BundleError, Scorer
from bidder.shading import GRID, WinModel, best_bids, bid_grid
from bidder.spec import SPARSE_INPUT

__all__ = ["main", "replay"]

FACTORS = np.round(np.arange(0.05, 1.0001, 0.01), 2)
CHUNK = 4096


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    erf = np.frompyfunc(math.erf, 1, 1)
    return 0.5 * (1.0 + erf(np.asarray(z) / math.sqrt(2.0)).astype(np.float64))


def predicted_values(scorer: Scorer, inputs: dict[str, np.ndarray], value_per_click: np.ndarray) -> np.ndarray:
    """The bidder's value (USD CPM) of each logged row: calibrated pCTR × value per click × 1000."""
    n = len(value_per_click)
    ctr = np.empty(n)
    for start in range(0, n, CHUNK):
        chunk = {name: np.ascontiguousarray(arr[start:start + CHUNK]) for name, arr in inputs.items()}
        ctr[start:start + CHUNK] = scorer.session.run([OUTPUT], chunk)[0].reshape(-1)
    return ctr * value_per_click * 1000.0


def outcome(bids: np.ndarray, log: Any, first_price: bool) -> dict[str, float]:
    """Wins, spend, value and surplus of ``bids`` (nan = no bid) against the log's true market."""
    bidding = np.isfinite(bids) & (bids >= log.floor - 1e-9)
    won = bidding & (bids > log.market_true)
    price = bids if first_price else np.maximum(log.market_true, log.floor)
    spend = float(price[won].sum() / 1000.0)
    value = float((log.pctr_true * log.value_per_click)[won].sum())
    return {"bids": int(bidding.sum()), "wins": int(won.sum()), "spend": round(spend, 4), "value": round(value, 4),
            "surplus": round(value - spend, 4)}


def oracle_bids(values: np.ndarray, log: Any) -> np.ndarray:
    """The shading search of ``bidder.shading`` over the same grid with the true P(win | b)."""
    grid = bid_grid(values, log.floor).astype(np.float32).astype(np.float64)
    win = _normal_cdf((np.log(np.maximum(grid, 1e-300)) - log.market_mu_true[:, None]) / log.market_sigma_true[:, None])
    bids, surplus = best_bids(values, grid, win)
    return np.where(surplus > 0, bids, np.nan)


def strategies(values: np.ndarray, log: Any, market: WinModel, factor: float, first_price: bool) -> dict[str, dict]:
    bids_ok = values >= log.floor  # no strategy bids above the value: an imp worth less than its floor is skipped
    truthful = np.where(bids_ok, values, np.nan)
    fixed = np.where(bids_ok, np.maximum(values * factor, log.floor), np.nan)
    shaded, surplus = (np.asarray(a) for a in market.shade_features(log.inputs[SPARSE_INPUT], values,
                                                                     np.minimum(log.floor, values)))
    model = np.where(bids_ok & (surplus > 0), shaded, np.nan)
    oracle = np.where(bids_ok, oracle_bids(values, log), np.nan)
    return {name: outcome(bids, log, first_price)
            for name, bids in (("truthful", truthful), ("fixed", fixed), ("model", model), ("oracle", oracle))}


def best_factor(values: np.ndarray, log: Any, first_price: bool) -> tuple[float, list[dict]]:
    """The factor of ``FACTORS`` with the highest surplus on ``log`` (ties: the larger factor)."""
    curve = []
    for f in FACTORS:
        bids = np.where(values >= log.floor, np.maximum(values * f, log.floor), np.nan)
        curve.append({"factor": float(f), **outcome(bids, log, first_price)})
    best = max(curve, key=lambda row: (row["surplus"], row["factor"]))
    return best["factor"], curve


def replay(data: Path, bundle: Path, progress: bool = True) -> dict[str, Any]:
    from train.data.bidlog import read_bid_log, split_bid_log  # the log reader lives with the writer

    scorer = Scorer(bundle)
    market = WinModel.for_scorer(scorer, max_imps=1024)
    if market is None:
        raise BundleError(f"{bundle}: has no win-price model (python -m train market --data DIR --bundle {bundle})")
    parts = split_bid_log(read_bid_log(data, scorer.spec, progress=progress))
    result: dict[str, Any] = {"data": str(data), "bundle": str(bundle), "model_id": scorer.model_id, "grid": GRID,
                              "created": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()}
    for auction, first in (("first_price", True), ("second_price", False)):
        val = parts["val"].take(parts["val"].first_price == first)
        test = parts["test"].take(parts["test"].first_price == first)
        val_values = predicted_values(scorer, val.inputs, val.value_per_click)
        test_values = predicted_values(scorer, test.inputs, test.value_per_click)
        factor, _ = best_factor(val_values, val, first)
        _, curve = best_factor(test_values, test, first)
        result[auction] = {"rows": {"val": len(val), "test": len(test)}, "fixed_factor": factor,
                           "strategies": strategies(test_values, test, market, factor, first), "fixed_curve": curve}
    fp = result["first_price"]["strategies"]
    result["strategies"] = fp
    result["ratios"] = {"model_over_fixed": _ratio(fp["model"]["surplus"], fp["fixed"]["surplus"]),
                        "model_over_oracle": _ratio(fp["model"]["surplus"], fp["oracle"]["surplus"]),
                        "model_over_truthful": _ratio(fp["model"]["surplus"], fp["truthful"]["surplus"])}
    sp = result["second_price"]["strategies"]
    result["second_price"]["truthful_is_best"] = all(sp["truthful"]["surplus"] >= sp[name]["surplus"]
                                                     for name in ("fixed", "model"))
    return result


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b > 0 else None


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, auction in zip(axes, ("first_price", "second_price")):
        part = result[auction]
        curve = part["fixed_curve"]
        ax.plot([r["spend"] for r in curve], [r["surplus"] for r in curve], color="tab:gray", lw=1,
                label="fixed factors 0.05-1.00 (test)")
        markers = {"truthful": "o", "fixed": "s", "model": "*", "oracle": "D"}
        for name, row in part["strategies"].items():
            ax.scatter([row["spend"]], [row["surplus"]], marker=markers[name], s=90 if name == "model" else 50,
                       label=f"{name}" + (f" (f={part['fixed_factor']:.2f}, tuned on val)" if name == "fixed" else ""),
                       zorder=3)
        ax.set_xlabel("spend (USD)")
        ax.set_ylabel("surplus = value won - spend (USD)")
        ax.set_title(f"{auction.replace('_', ' ')}: {part['rows']['test']} held-out requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench replay",
                                     description="Replay a held-out synthetic bid log: truthful, fixed, model, oracle.")
    parser.add_argument("--data", type=Path, required=True, help="folder with bids.log.txt (python -m train synth)")
    parser.add_argument("--bundle", type=Path, required=True, help="bundle with market.onnx (python -m train market)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write; the PNG goes beside it")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.out.is_dir() or not args.out.parent.is_dir():
        print(f"error: --out {args.out}: expected a JSON file name in an existing folder", file=sys.stderr)
        return 2
    from train.errors import DataError

    try:
        result = replay(args.data, args.bundle, progress=not args.quiet)
    except (BundleError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    png = plot(result, args.out.with_suffix(".png"))
    fp = result["strategies"]
    print(json.dumps({"json": str(args.out), "png": str(png), "fixed_factor": result["first_price"]["fixed_factor"],
                      "first_price": {k: v["surplus"] for k, v in fp.items()}, "ratios": result["ratios"],
                      "second_price": {k: v["surplus"] for k, v in result["second_price"]["strategies"].items()},
                      "second_price_truthful_is_best": result["second_price"]["truthful_is_best"]}, indent=2))
    return 0

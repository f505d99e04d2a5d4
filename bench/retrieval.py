"""Retrieval against exhaustive ranking: ``python -m bench retrieval --data DIR --bundle DIR --out FILE.json``.

For imps of the data's test log (their slot size, domain and exchange; no blocked advertisers), every
eligible creative of the catalog is scored by the bundle's ranker (factorized graphs) and valued at
pCTR × value per click × 1000 (CPM): the exhaustive answer. For each K (default 50, 200, 1000), exact and
approximate (HNSW) retrieval, it reports:

- ``top1_recall``: share of imps whose exhaustively best creative is among the K retrieved;
- ``top10_recall``: mean share of the exhaustive top 10 among the K (the ranker's top 10 within the K
  then overlaps the exhaustive top 10 exactly that much);
- ``value_lost``: mean of (best value − best value among the K), in CPM USD and relative to the best;
- ``retrieval_us``: per imp, the imp tower, the filters and the top K (median and P99 over the imps).

``bid_ms`` times ``BidEngine.bid`` in process on one imp per request (the IAB simple-banner request, its
site domain and size replaced by those of the test imps), retrieval with K = 200 against exhaustive
scoring, taking turns request by request: the in-process figure for the latency target (one core, one
request at a time). Writes the JSON and a PNG beside it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench.machine import cpu_model, git_commit, model_id, package_versions
from bidder import OPENRTB_EXAMPLES
from bidder.campaigns import CatalogError, load_catalog
from bidder.engine import BidEngine
from bidder.factorized import FactorizedScorer
from bidder.metrics import Metrics
from bidder.retrieval import AdIndex, Retriever, Towers, ann_available
from bidder.scorer import BundleError, Scorer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_KS = (50, 200, 1000)
BID_K = 200
BODY = OPENRTB_EXAMPLES / "bid-request-2.5" / "simple-banner.json"
NOW = 1_370_970_000.0  # a receive time inside the synthetic logs' days


class RetrievalBenchError(Exception):
    pass


def _test_imps(data: Path, n: int, seed: int) -> list[dict]:
    from train.data.ipinyou import LogReader

    path = data / "test.log.txt"
    if not path.is_file():
        raise RetrievalBenchError(f"{path}: no such file (python -m train synth --creatives C --out {data})")
    records = [r for chunk in LogReader(path) for r in chunk.records]
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(records), size=min(n, len(records)), replace=False)
    return [records[i] for i in sorted(chosen.tolist())]


def _exchange(record: dict) -> str | None:
    value = str(record.get("adexchange") or "")
    return None if value in ("", "null") else value


def measure(data: Path, bundle: Path, campaigns: Path, ks: tuple[int, ...], imps: int, seed: int,
            bid_requests: int, progress: bool = True) -> dict:
    scorer = Scorer(bundle, max_batch=256)
    catalog = load_catalog(campaigns)
    if not scorer.factorized_files():
        raise RetrievalBenchError(f"{bundle}: exhaustive scoring of the catalog needs factorized graphs "
                                  "(python -m train factorize)")
    towers = Towers(bundle, scorer.spec, scorer.featurizer)
    started = time.perf_counter()
    matrix = towers.ad_matrix(catalog.candidates)
    ad_matrix_s = time.perf_counter() - started
    exact = AdIndex(catalog, matrix)
    approximate = None
    ann_build_s = None
    if ann_available():
        started = time.perf_counter()
        approximate = AdIndex(catalog, matrix, ann=True)
        ann_build_s = time.perf_counter() - started
    rows_max = max(len(catalog.for_size(w, h)) for w, h in catalog.sizes)
    factorized = FactorizedScorer.for_scorer(scorer, max_imps=1, max_rows=rows_max, check=False)
    started = time.perf_counter()
    factorized.set_candidates([c.layer for c in catalog.candidates])
    candidate_parts_s = time.perf_counter() - started
    value = np.array([c.value_per_click for c in catalog.candidates]) * 1000.0

    modes = {"exact": exact} | ({"ann": approximate} if approximate is not None else {})
    hits = {(m, k): [] for m in modes for k in ks}
    tops = {(m, k): [] for m in modes for k in ks}
    lost = {(m, k): [] for m in modes for k in ks}
    lost_rel = {(m, k): [] for m in modes for k in ks}
    seconds = {(m, k): [] for m in modes for k in ks}
    eligible_counts, exhaustive_s = [], []
    for record in tqdm(_test_imps(data, imps, seed), desc="imps", disable=not progress, leave=False):
        w, h = int(record["slotwidth"]), int(record["slotheight"])
        domain, exchange = record.get("domain"), _exchange(record)
        started = time.perf_counter()
        eligible = np.array([c.index for c in catalog.eligible(w, h, domain, exchange, frozenset())], dtype=np.int64)
        if len(eligible) == 0:
            continue
        scorer.featurizer.transform_into(factorized.imp_inputs, [record])
        factorized.row_imp[:len(eligible)] = 0
        factorized.row_cand[:len(eligible)] = eligible
        ctr = factorized.run(1, len(eligible)).astype(np.float64)
        exhaustive_s.append(time.perf_counter() - started)
        values = ctr * value[eligible]
        order = np.argsort(-values, kind="stable")
        best, best_value = eligible[order[0]], values[order[0]]
        top10 = set(eligible[order[:10]].tolist())
        by_index = dict(zip(eligible.tolist(), values.tolist()))
        eligible_counts.append(len(eligible))
        for mode, index in modes.items():
            for k in ks:
                started = time.perf_counter()
                query = towers.imp_vectors([record])[0].copy()
                found = index.top_k(query, w, h, domain, exchange, frozenset(), k, approximate=mode == "ann")
                seconds[mode, k].append(time.perf_counter() - started)
                found_set = set(found.tolist())
                hits[mode, k].append(best in found_set)
                tops[mode, k].append(len(top10 & found_set) / len(top10))
                kept = max((by_index[i] for i in found_set), default=0.0)
                lost[mode, k].append(best_value - kept)
                lost_rel[mode, k].append((best_value - kept) / best_value if best_value > 0 else 0.0)
    if not eligible_counts:
        raise RetrievalBenchError("no test imp has an eligible creative in the catalog")
    results = []
    for mode in modes:
        for k in ks:
            t = np.array(seconds[mode, k]) * 1e6
            results.append({"mode": mode, "k": k, "imps": len(hits[mode, k]),
                            "top1_recall": round(float(np.mean(hits[mode, k])), 4),
                            "top10_recall": round(float(np.mean(tops[mode, k])), 4),
                            "value_lost_cpm": round(float(np.mean(lost[mode, k])), 6),
                            "value_lost_relative": round(float(np.mean(lost_rel[mode, k])), 6),
                            "retrieval_us": {"p50": round(float(np.median(t)), 1),
                                             "p99": round(float(np.percentile(t, 99)), 1)}})
    out = {
        "catalog": {"file": str(campaigns), "creatives": len(catalog), "sizes": len(catalog.sizes),
                    "eligible_per_imp": {"median": int(np.median(eligible_counts)), "max": int(max(eligible_counts))}},
        "load_seconds": {"ad_matrix": round(ad_matrix_s, 3), "candidate_parts": round(candidate_parts_s, 3),
                         "ann_index": None if ann_build_s is None else round(ann_build_s, 3)},
        "exhaustive_ms_per_imp": {"p50": round(float(np.median(exhaustive_s)) * 1e3, 3),
                                  "p99": round(float(np.percentile(exhaustive_s, 99)) * 1e3, 3)},
        "results": results,
    }
    if bid_requests:
        out["bid_ms"] = bid_latency(scorer, catalog, factorized, towers, matrix, _test_imps(data, bid_requests, seed + 1))
    return out


def bid_latency(scorer: Scorer, catalog, factorized: FactorizedScorer, towers: Towers, matrix: np.ndarray,
                records: list[dict]) -> dict:
    """``BidEngine.bid`` per request (one imp), retrieval (K = BID_K) and exhaustive taking turns; ms."""
    template = json.loads(BODY.read_text())
    bodies = []
    for record in records:
        request = json.loads(json.dumps(template))
        request["site"]["domain"] = record.get("domain")
        banner = request["imp"][0]["banner"]
        banner["w"], banner["h"] = int(record["slotwidth"]), int(record["slotheight"])
        banner.pop("format", None)
        request["imp"][0]["bidfloor"] = 0.0
        bodies.append(json.dumps(request).encode())
    metrics = Metrics(0)
    # the same scorer, candidate parts and ad matrix serve both engines: only the candidate sets differ
    factorized_small = FactorizedScorer.for_scorer(scorer, max_imps=scorer.max_batch, max_rows=scorer.max_batch,
                                                   check=False)
    retriever = Retriever(towers, catalog, BID_K, index=AdIndex(catalog, matrix))
    with_retrieval = BidEngine(scorer, catalog, metrics, now=NOW, factorized=factorized_small, retriever=retriever)
    exhaustive = BidEngine(scorer, catalog, metrics, now=NOW, factorized=factorized_small)
    times = {"retrieval": [], "exhaustive": []}
    statuses = {"retrieval": [], "exhaustive": []}
    for body in bodies[:5]:  # warm the bindings of both
        with_retrieval.bid(body)
        exhaustive.bid(body)
    for body in tqdm(bodies, desc="bid", disable=True):
        for name, engine in (("retrieval", with_retrieval), ("exhaustive", exhaustive)):
            started = time.perf_counter()
            outcome = engine.bid(body)
            times[name].append(time.perf_counter() - started)
            statuses[name].append(outcome.status)
    return {name: {"requests": len(t), "p50": round(float(np.median(t)) * 1e3, 3),
                   "p99": round(float(np.percentile(t, 99)) * 1e3, 3),
                   "bids": int(sum(s == 200 for s in statuses[name]))} for name, t in times.items()} | {"k": BID_K}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, style in (("exact", "-o"), ("ann", "--s")):
        rows = [r for r in report["results"] if r["mode"] == mode]
        if not rows:
            continue
        ks = [r["k"] for r in rows]
        left.plot(ks, [r["top1_recall"] for r in rows], style, label=f"top1 recall ({mode})")
        left.plot(ks, [r["top10_recall"] for r in rows], style, alpha=0.5, label=f"top10 recall ({mode})")
        right.plot(ks, [r["retrieval_us"]["p50"] for r in rows], style, label=f"{mode} P50")
    left.axhline(0.95, color="grey", lw=0.8, ls=":")
    left.set_xscale("log")
    left.set_xlabel("K (creatives the ranker scores)")
    left.set_ylabel("agreement with exhaustive ranking")
    left.legend(fontsize=8)
    right.set_xscale("log")
    right.set_xlabel("K")
    right.set_ylabel("retrieval per imp (µs)")
    right.legend(fontsize=8)
    fig.suptitle(f"Retrieval on {report['catalog']['creatives']:,} creatives "
                 f"(median {report['catalog']['eligible_per_imp']['median']:,} eligible per imp)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench retrieval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with test.log.txt and campaigns.json")
    parser.add_argument("--bundle", type=Path, required=True, help="ranker bundle with factorized and two-tower graphs")
    parser.add_argument("--campaigns", type=Path, help="catalog (default: DATA/campaigns.json)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write (the PNG goes beside it)")
    parser.add_argument("--k", default=",".join(map(str, DEFAULT_KS)), help="comma-separated K values (default: %(default)s)")
    parser.add_argument("--imps", type=int, default=300, help="test imps ranked exhaustively (default: %(default)s)")
    parser.add_argument("--bid-requests", type=int, default=300,
                        help="requests timed through BidEngine.bid each way (0: skip; default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        ks = tuple(int(k) for k in args.k.split(","))
    except ValueError:
        ks = ()
    if not ks or min(ks) < 1:
        print(f"error: --k: expected comma-separated positive integers, got {args.k!r}", file=sys.stderr)
        return 2
    if args.imps < 1 or args.bid_requests < 0:
        print("error: --imps must be >= 1 and --bid-requests >= 0", file=sys.stderr)
        return 2
    if not args.out.parent.is_dir() or args.out.is_dir():
        print(f"error: --out {args.out}: expected a JSON file name in an existing folder", file=sys.stderr)
        return 2
    campaigns = args.campaigns or args.data / "campaigns.json"
    try:
        report = measure(args.data, args.bundle, campaigns, ks, args.imps, args.seed, args.bid_requests,
                         progress=not args.quiet)
    except (RetrievalBenchError, BundleError, CatalogError) as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    report = {"measured_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "command": "python -m bench retrieval " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"cpu": cpu_model(), "commit": git_commit(ROOT), "model_id": model_id(args.bundle),
                          "versions": package_versions()},
              "note": "timings in process, one thread, on a machine shared with other jobs", **report}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    png = args.out.with_suffix(".png")
    plot(report, png)
    print(json.dumps({"json": str(args.out), "png": str(png), "results": report["results"],
                      "bid_ms": report.get("bid_ms")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

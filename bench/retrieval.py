"""Retrieval against exhaustive ranking: ``python -m bench retrieval --data DIR --bundle DIR --out FILE.json``.

For imps of the data's test log (their slot size, domain and exchange; no blocked advertisers), every
eligible creative of the catalog is scored by the bundle's ranker (factorized graphs) and valued at
pCTR × value per click × 1000 (CPM): the exhaustive answer. For each K (default 10, 50, 200, 1000), exact and
approximate (HNSW) retrieval, and two baselines without the imp tower (``ad_only``: the K best by the ad
tower's bias + log value, the same for every imp; ``value_only``: the K best by value per click), it reports:

- ``top1_recall``: share of imps whose exhaustively best creative is among the K retrieved;
- ``top10_recall``: mean share of the exhaustive top 10 among the K (the ranker's top 10 within the K
  then overlaps the exhaustive top 10 exactly that much);
- ``value_lost``: mean of (best value − best value among the K), in CPM USD and relative to the best;
- ``retrieval_us``: per imp, the imp tower, the filters and the top K (median and P99 over the imps; the
  value-only baseline's is not comparable: it starts from the eligible list);
- ``exact_rows_scored``: per K, the median share of an imp's size's rows the exact search multiplied;
- ``stages``: the imp tower for one imp against eight in one call, and the ranker for one request's 200 rows
  against several requests' rows in one call, hot and cold (what batching across requests buys each stage).

``bid_ms`` times ``BidEngine.bid`` in process on one imp per request (the IAB simple-banner request, its
site domain and size replaced by those of the test imps), retrieval with K = 50 and 200 against exhaustive
scoring, taking turns request by request: the in-process figure for the latency target (one core, one
request at a time); and batches of 8 such requests prepared and scored together, as 8 connections
make them. Writes the JSON and a PNG beside it.
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
DEFAULT_KS = (10, 50, 200, 1000)
#: what the imp tower is worth: the K best by the ad tower's bias + log(value) alone, or by value per click alone
BASELINES = ("ad_only", "value_only")
BID_KS = (50, 200)
BATCH = 8
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
            bid_requests: int, bid_ks: tuple[int, ...] = BID_KS, progress: bool = True) -> dict:
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
    modes |= {name: exact for name in BASELINES}
    no_imp = np.zeros(matrix.shape[1], dtype=np.float32)
    no_imp[-1] = 1.0  # scores every ad by its bias + log(value per click) alone
    hits = {(m, k): [] for m in modes for k in ks}
    tops = {(m, k): [] for m in modes for k in ks}
    lost = {(m, k): [] for m in modes for k in ks}
    lost_rel = {(m, k): [] for m in modes for k in ks}
    seconds = {(m, k): [] for m in modes for k in ks}
    scored = {k: [] for k in ks}  # exact: rows the bounded search multiplied, against the imp's size's rows
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
                if mode == "value_only":
                    found = eligible[np.argsort(-value[eligible], kind="stable")[:k]]
                else:
                    query = no_imp if mode == "ad_only" else towers.imp_vectors([record])[0].copy()
                    found = index.top_k(query, w, h, domain, exchange, frozenset(), k, approximate=mode == "ann")
                seconds[mode, k].append(time.perf_counter() - started)
                if mode == "exact":
                    part = exact.sizes[(w, h)]
                    scored[k].append(part.search(query, domain, exchange, frozenset(), k)[1] / len(part.positions))
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
    out["exact_rows_scored"] = {str(k): round(float(np.median(v)), 4) for k, v in scored.items()}
    out["stages"] = stage_timings(towers, scorer, catalog, _test_imps(data, 8, seed + 2))
    if bid_requests:
        out["bid_ms"] = bid_latency(scorer, catalog, towers, matrix, _test_imps(data, bid_requests, seed + 1), bid_ks)
    return out


def stage_timings(towers: Towers, scorer: Scorer, catalog, records: list[dict], rounds: int = 200) -> dict:
    """What batching buys, stage by stage (medians, taking turns): the imp tower for one imp against eight in one
    call, and the ranker (factorized graph) for one request's 200 rows against four and eight requests' rows in one
    call (the served engine makes one call per request when K rows fill ``--max-batch``); each call is timed hot
    (right after the same call) and cold (after 16 MB of other memory was written, as serving does between
    requests)."""
    rng = np.random.default_rng(0)
    tower = {"one_imp": [], "per_imp_of_8": []}
    batches = {1: "alone_200_rows", 4: "4_requests_in_one_call", 8: "8_requests_in_one_call"}
    ranker = {f"{name}_{state}": [] for name in batches.values() for state in ("hot", "cold")}
    other = np.ones(4 << 20, dtype=np.float32)
    wide = FactorizedScorer.for_scorer(scorer, max_imps=8, max_rows=8 * 200, check=False)
    wide.set_candidates([c.layer for c in catalog.candidates])
    scorer.featurizer.transform_into(wide.imp_inputs, records)
    for _ in range(rounds):
        for n, key in ((1, "one_imp"), (8, "per_imp_of_8")):
            started = time.perf_counter()
            towers.imp_vectors(records[:n])
            tower[key].append((time.perf_counter() - started) / len(records[:n]) * 1e6)
        for n, name in batches.items():
            wide.row_imp[:n * 200] = np.repeat(np.arange(n), 200)
            wide.row_cand[:n * 200] = rng.integers(0, len(catalog), n * 200)
            for state in ("hot", "cold"):
                if state == "hot":
                    wide.run(n, n * 200)
                else:
                    other += 1.0
                started = time.perf_counter()
                wide.run(n, n * 200)
                ranker[f"{name}_{state}"].append((time.perf_counter() - started) / n * 1e3)
    return {"imp_tower_us": {key: round(float(np.median(v)), 1) for key, v in tower.items()},
            "ranker_ms_per_request": {key: round(float(np.median(v)), 3) for key, v in ranker.items()}}


def bid_latency(scorer: Scorer, catalog, towers: Towers, matrix: np.ndarray, records: list[dict],
                ks: tuple[int, ...]) -> dict:
    """``BidEngine.bid`` per request (one imp) and per batch of ``BATCH``, retrieval at each K and exhaustive
    taking turns; ms."""
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
    # one scorer, factorized scorer and ad index serve every engine (each engine sets the same candidate
    # parts again): only the candidate sets differ
    factorized = FactorizedScorer.for_scorer(scorer, max_imps=scorer.max_batch, max_rows=scorer.max_batch,
                                             check=False)
    index = AdIndex(catalog, matrix)
    engines = {f"retrieval_k{k}": BidEngine(scorer, catalog, metrics, now=NOW, factorized=factorized,
                                            retriever=Retriever(towers, catalog, k, index=index)) for k in ks}
    engines["exhaustive"] = BidEngine(scorer, catalog, metrics, now=NOW, factorized=factorized)
    times: dict[str, list[float]] = {name: [] for name in engines}
    batches: dict[str, list[float]] = {name: [] for name in engines}
    bids = {name: 0 for name in engines}
    for body in bodies[:5]:  # warm the bindings of each
        for engine in engines.values():
            engine.bid(body)
    for body in bodies:
        for name, engine in engines.items():
            started = time.perf_counter()
            outcome = engine.bid(body)
            times[name].append(time.perf_counter() - started)
            bids[name] += outcome.status == 200
    # BATCH requests at once, as BATCH connections make them: each prepared, then one batch scored (the
    # latency the last of them sees, HTTP aside)
    for start in range(0, len(bodies) - BATCH + 1, BATCH):
        for name, engine in engines.items():
            started = time.perf_counter()
            engine.score_batch([engine.prepare(body, None, started) for body in bodies[start:start + BATCH]])
            batches[name].append(time.perf_counter() - started)

    def ms(values: list[float]) -> dict:
        return {"p50": round(float(np.median(values)) * 1e3, 3), "p99": round(float(np.percentile(values, 99)) * 1e3, 3)}

    return {name: {"requests": len(t), **ms(t), "bids": bids[name],
                   f"batch_of_{BATCH}": {"batches": len(batches[name]), **ms(batches[name])}}
            for name, t in times.items()}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, style in (("exact", "-o"), ("ann", "--s"), ("ad_only", ":^"), ("value_only", ":v")):
        rows = [r for r in report["results"] if r["mode"] == mode]
        if not rows:
            continue
        ks = [r["k"] for r in rows]
        left.plot(ks, [r["top1_recall"] for r in rows], style, label=f"top1 recall ({mode})")
        left.plot(ks, [r["top10_recall"] for r in rows], style, alpha=0.5, label=f"top10 recall ({mode})")
        if mode in ("exact", "ann"):
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


def _positive_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        return ()
    return values if values and min(values) >= 1 else ()


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
    parser.add_argument("--bid-k", default=",".join(map(str, BID_KS)),
                        help="K values of the BidEngine.bid timing (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    ks, bid_ks = _positive_list(args.k), _positive_list(args.bid_k)
    for option, values, text in (("--k", ks, args.k), ("--bid-k", bid_ks, args.bid_k)):
        if not values:
            print(f"error: {option}: expected comma-separated positive integers, got {text!r}", file=sys.stderr)
            return 2
    if args.imps < 1 or args.bid_requests < 0:
        print("error: --imps must be >= 1 and --bid-requests >= 0", file=sys.stderr)
        return 2
    if not args.out.parent.is_dir() or args.out.is_dir():
        print(f"error: --out {args.out}: expected a JSON file name in an existing folder", file=sys.stderr)
        return 2
    campaigns = args.campaigns or args.data / "campaigns.json"
    try:
        report = measure(args.data, args.bundle, campaigns, ks, args.imps, args.seed, args.bid_requests, bid_ks,
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

"""Row scoring vs factorized DeepFM scoring, per request and per row: ``python -m bench.factorized``.

A request is the IAB simple-banner bid request: one imp, scored against every catalog creative of its
size (9 with the default catalog). For batches of 1, 8 and 32 such requests (one call per batch,
as the batched hot path makes them) each way is timed with featurization included:

- canonical: ``Scorer.score`` on ``(candidate layer, imp record)`` rows, ``model.onnx``;
- graph: imps featurized into ``FactorizedScorer.imp_inputs``, row numbers written, ``run`` with
  ``factorized.onnx`` through ONNX Runtime (candidate parts computed once beforehand, as at catalog load);
- native: the same with the native row kernel (``bidder/rowkernel.py``), as ``bidder serve`` scores.

The three take turns call by call over a pool of distinct imp records (freshly decoded, so the
featurizer's per-object cache does not flatter any), and the median of each is reported. Pin it:
``taskset -c 0 python -m bench.factorized``; ``--evict-mb 16`` writes 16 MiB before each call, as the
server's other work does between two batches.

With ``--against OLD`` it compares instead the factorized graphs of two bundles of the same model (``OLD``, e.g.
the shipped bundle of an earlier commit, and ``--model``), taking turns call by call: the median µs of one
``run_with_iobinding`` of ``factorized.onnx`` per batch of 1, 9 and 32 one-imp requests (9 rows each; the new graph
also through ``bidder.scorer.run_binding``, as the bidder runs it), and of one
``BidEngine.run`` over a batch of that many prepared requests (featurize, layout, score, value, shade, encode; the
old graphs run by ONNX Runtime's own call, as before ``run_binding``, the new ones by ``run_binding``),
with the graphs' largest difference from each other and from ``model.onnx``, and the answers compared (bids'
prices, rounded to micro-dollars, move with any change in the last bits of a pCTR)::

    mkdir -p /tmp/old && git archive 35a6954 bidder/models/default | tar -x -C /tmp/old
    python -m bench.factorized --against /tmp/old/bidder/models/default
"""
from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

import bidder.factorized as served
from bench.machine import cpu_model, git_commit, model_id, package_versions
from bidder import DEFAULT_BUNDLE, OPENRTB_EXAMPLES
from bidder.batch import Batch, Outcome
from bidder.campaigns import load_catalog
from bidder.engine import BidEngine
from bidder.factorized import FactorizedScorer
from bidder.metrics import Metrics
from bidder.openrtb import decode_request, imp_fields, imp_sizes, request_fields
from bidder.scorer import Scorer, run_binding
from bidder.shading import WinModel

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BODY = OPENRTB_EXAMPLES / "bid-request-2.5" / "simple-banner.json"
DEFAULT_RESULTS = ROOT / "bench" / "results"
POOL = 512
NOW = 1_370_000_000.0  # the engines' fixed clock: the same records, hence the same answers, from both
SERVING_MAX_BATCH = 256  # bidder serve's --max-batch default: rows per ORT call in BidEngine.run


def imp_records(body: bytes, n: int) -> tuple[list[dict], tuple[int, int]]:
    """``n`` imp records of the request, each decoded afresh (no value object shared), and its size."""
    records = []
    for i in range(n):
        request = decode_request(body)
        record = imp_fields(request_fields(request, None, now=1_370_000_000.0 + 3600 * i), request.imp[0])
        records.append(record)
    return records, imp_sizes(decode_request(body).imp[0])[0]


def measure(bundle: Path, campaigns: Path, body: bytes, batches: list[int], calls: int,
            evict_bytes: int = 0) -> list[dict]:
    """Per batch size: median µs of scoring its requests three ways, taking turns call by call: ``model.onnx`` per
    row, ``factorized.onnx`` through ONNX Runtime, and the native row kernel (featurizing included in each).

    ``evict_bytes``: a scratch buffer that size is written before every timed call (the caches a worker's batch
    meets after the event loop's other work)."""
    rows_max = max(batches) * 64
    scorer = Scorer(bundle, max_batch=rows_max)
    sides = {"graph": FactorizedScorer.for_scorer(scorer, max_imps=max(batches), max_rows=rows_max, native=False),
             "native": FactorizedScorer.for_scorer(scorer, max_imps=max(batches), max_rows=rows_max)}
    if sides["native"].kernel is None:
        raise SystemExit(f"error: {bundle}: the native row kernel does not compute this graph: "
                         f"{sides['native'].kernel_unsupported}")
    catalog = load_catalog(campaigns)
    for factorized in sides.values():
        factorized.set_candidates([c.layer for c in catalog.candidates])
    records, (w, h) = imp_records(body, POOL)
    eligible = catalog.for_size(w, h)
    number = {id(c): i for i, c in enumerate(catalog.candidates)}
    k = len(eligible)
    candidates = np.array([number[id(c)] for c in eligible], dtype=np.int64)
    scratch = np.zeros(evict_bytes // 4, dtype=np.float32)
    results = []
    for batch in batches:
        rows = batch * k
        row_imp = np.repeat(np.arange(batch, dtype=np.int64), k)
        row_cand = np.tile(candidates, batch)
        times: dict[str, list[int]] = {"canonical": [], "graph": [], "native": []}
        worst = {"graph": 0.0, "native": 0.0}
        position = 0
        for call in range(calls):
            imps = records[position:position + batch]
            position = (position + batch) % (POOL - batch)
            pairs = [(c.layer, record) for record in imps for c in eligible]
            outputs = {}
            for way in itertools.islice(itertools.cycle(times), call % 3, call % 3 + 3):  # each way first as often
                scratch += 1.0
                start = time.perf_counter_ns()
                if way == "canonical":
                    outputs[way] = scorer.score(pairs)
                else:
                    factorized = sides[way]
                    factorized.featurizer.transform_into(factorized.imp_inputs, imps)
                    factorized.row_imp[:rows] = row_imp
                    factorized.row_cand[:rows] = row_cand
                    outputs[way] = factorized.run(batch, rows)
                times[way].append(time.perf_counter_ns() - start)
            if call < 50:
                for way in worst:
                    worst[way] = max(worst[way], float(np.max(np.abs(outputs[way] - outputs["canonical"]))))
        assert max(worst.values()) <= 1e-6, f"a factorized way differs from model.onnx: {worst}"
        us = {way: float(np.median(t)) / 1e3 for way, t in times.items()}
        results.append({
            "requests": batch, "imps": batch, "candidates_per_imp": k, "rows": rows, "calls": calls,
            **{f"{way}_us": round(v, 2) for way, v in us.items()},
            **{f"{way}_us_per_request": round(v / batch, 2) for way, v in us.items()},
            "graph_over_canonical": round(us["graph"] / us["canonical"], 3),
            "native_over_graph": round(us["native"] / us["graph"], 3),
            "max_abs_diff_vs_model_onnx": worst})
    return results


def _graphs(bundle: Path, catalog_path: Path, max_rows: int) -> tuple[Scorer, FactorizedScorer]:
    scorer = Scorer(bundle, max_batch=max_rows)
    factorized = FactorizedScorer.for_scorer(scorer, max_imps=64, max_rows=max_rows, native=False)  # the graphs, in ORT
    factorized.set_candidates([c.layer for c in load_catalog(catalog_path).candidates])
    return scorer, factorized


def _engine(bundle: Path, catalog_path: Path) -> BidEngine:
    """A bid engine as ``bidder serve --graph-rows`` builds one (the factorized graphs through ONNX Runtime: they are
    what ``--against`` compares; native shading), on a fixed clock."""
    scorer = Scorer(bundle, max_batch=SERVING_MAX_BATCH)
    factorized = FactorizedScorer.for_scorer(scorer, max_imps=SERVING_MAX_BATCH, max_rows=SERVING_MAX_BATCH,
                                             native=False)
    market = WinModel.for_scorer(scorer, max_imps=SERVING_MAX_BATCH)
    return BidEngine(scorer, load_catalog(catalog_path), Metrics(), now=NOW, factorized=factorized, market=market)


def _difference(old: Outcome, new: Outcome) -> tuple[bool, float]:
    """(whether two answers differ in anything but their bids' prices, the largest price difference)."""
    if old.status != new.status or old.status != 200:
        return old != new, 0.0
    answers = [json.loads(o.body) for o in (old, new)]
    bids = [[bid for seat in answer["seatbid"] for bid in seat["bid"]] for answer in answers]
    prices = [[bid.pop("price") for bid in side] for side in bids]
    if answers[0] != answers[1] or len(prices[0]) != len(prices[1]):
        return True, 0.0
    return False, max((abs(a - b) for a, b in zip(*prices)), default=0.0)


def _onnxruntime_call(session: Any, binding: Any) -> None:
    session.run_with_iobinding(binding)


def _ratio(new: list[int], old: list[int]) -> float:
    return round(float(np.median(new) / np.median(old)), 3)


def compare_graphs(old: Path, new: Path, campaigns: Path, body: bytes, batches: list[int], calls: int,
                   evict_bytes: int = 0) -> list[dict]:
    """Per batch size: median µs of a ``run_with_iobinding`` of each bundle's ``factorized.onnx`` and of a
    ``BidEngine.run`` by each, taking turns call by call; the graphs' differences and the answers compared.

    ``evict_bytes``: a scratch buffer that size is written before every timed call, so that each starts with
    the caches a lone request meets after the event loop's idle wait rather than the ones its twin left."""
    catalog = load_catalog(campaigns)
    records, (w, h) = imp_records(body, POOL)
    eligible = catalog.for_size(w, h)
    number = {id(c): i for i, c in enumerate(catalog.candidates)}
    k = len(eligible)
    candidates = np.array([number[id(c)] for c in eligible], dtype=np.int64)
    max_rows = max(batches) * k
    sides = {"old": _graphs(old, campaigns, max_rows), "new": _graphs(new, campaigns, max_rows)}
    engines = {"old": _engine(old, campaigns), "new": _engine(new, campaigns)}
    # requests prepared afresh for each call (the featurizer caches per record object), the same for both engines
    pools = {name: [engine.prepare(body, None, time.perf_counter()) for _ in range(POOL)]
             for name, engine in engines.items()}
    results = []
    for batch in batches:
        rows = batch * k
        imps = records[:batch]
        bindings, outputs = {}, {}
        for name, (scorer, factorized) in sides.items():
            factorized.featurizer.transform_into(factorized.imp_inputs, imps)
            factorized.row_imp[:rows] = np.repeat(np.arange(batch, dtype=np.int64), k)
            factorized.row_cand[:rows] = np.tile(candidates, batch)
            outputs[name] = factorized.run(batch, rows).copy()
            bindings[name] = factorized._bindings[(batch, rows)][0]
        expected = sides["new"][0].score([(c.layer, record) for record in imps for c in eligible]).copy()
        # ONNX Runtime's own call for both graphs; the new graph also through bidder.scorer.run_binding, as served
        runs = {"old": partial(sides["old"][1].session.run_with_iobinding, bindings["old"]),
                "new": partial(sides["new"][1].session.run_with_iobinding, bindings["new"]),
                "new_run_binding": partial(run_binding, sides["new"][1].session, bindings["new"])}
        run_us: dict[str, list[int]] = {name: [] for name in runs}
        orders = list(itertools.permutations(runs))
        engine_us: dict[str, list[int]] = {"old": [], "new": []}
        answers_differ, price_diff = 0, 0.0
        scratch = np.zeros(evict_bytes // 4, dtype=np.float32)
        position = 0
        for call in range(calls):
            for name in orders[call % len(orders)]:  # each after each other as often: no one follows its twin
                run = runs[name]
                scratch += 1.0
                start = time.perf_counter_ns()
                run()
                run_us[name].append(time.perf_counter_ns() - start)
            order = ("old", "new") if call % 2 == 0 else ("new", "old")
            outcomes = {}
            for name in order:
                engine = engines[name]
                pendings = pools[name][position:position + batch]
                # the old engine runs its graph as the bidder did before run_binding: ONNX Runtime's own call
                served.run_binding = _onnxruntime_call if name == "old" else run_binding
                scratch += 1.0
                start = time.perf_counter_ns()
                done = Batch(pendings, engine.catalog.candidates, engine.features)
                engine.run(done)
                engine_us[name].append(time.perf_counter_ns() - start)
                outcomes[name] = done.outcomes
            served.run_binding = run_binding
            for a, b in zip(outcomes["old"], outcomes["new"]):
                other, price = _difference(a, b)
                answers_differ += other
                price_diff = max(price_diff, price)
            position = (position + batch) % (POOL - batch)
        results.append({
            "requests": batch, "rows": rows, "calls": calls,
            "run_us": {name: round(float(np.median(t)) / 1e3, 2) for name, t in run_us.items()},
            "engine_run_us": {name: round(float(np.median(t)) / 1e3, 2) for name, t in engine_us.items()},
            # the tenth percentile: less moved than the median by other processes taking the core
            "run_us_p10": {name: round(float(np.percentile(t, 10)) / 1e3, 2) for name, t in run_us.items()},
            "engine_run_us_p10": {name: round(float(np.percentile(t, 10)) / 1e3, 2) for name, t in engine_us.items()},
            "new_over_old": {"run": _ratio(run_us["new"], run_us["old"]),
                             "run_binding": _ratio(run_us["new_run_binding"], run_us["old"]),
                             "engine_run": _ratio(engine_us["new"], engine_us["old"])},
            "max_abs_diff": {"new_vs_old": float(np.max(np.abs(outputs["new"] - outputs["old"]))),
                             "old_vs_model_onnx": float(np.max(np.abs(outputs["old"] - expected))),
                             "new_vs_model_onnx": float(np.max(np.abs(outputs["new"] - expected)))},
            "answers_differing_beyond_price": answers_differ, "max_abs_price_diff": price_diff})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.factorized", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_BUNDLE, help="DeepFM bundle with factorized graphs")
    parser.add_argument("--campaigns", type=Path, default=None, help="catalog (default: campaigns.json beside the bundle)")
    parser.add_argument("--body", type=Path, default=DEFAULT_BODY, help="OpenRTB request (default: IAB simple-banner)")
    parser.add_argument("--against", type=Path, default=None,
                        help="compare this bundle's factorized graphs (an earlier export of the same model) with "
                             "--model's, instead of row scoring with factorized scoring")
    parser.add_argument("--evict-mb", type=float, default=0.0,
                        help="write this many MiB before every timed call (cold caches, as a worker's batch meets "
                             "them after its other work; 2 × the L2 cache is enough) (default: %(default)s)")
    parser.add_argument("--batches", default=None,
                        help="requests per ORT call (default: 1,8,32; with --against 1,9,32)")
    parser.add_argument("--calls", type=int, default=3000, help="timed calls per way and batch (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here (default: print only)")
    args = parser.parse_args(argv)
    batches = [int(b) for b in (args.batches or ("1,9,32" if args.against else "1,8,32")).split(",")]
    campaigns = args.campaigns or args.model / "campaigns.json"
    loadavg = list(os.getloadavg())
    if args.against:
        results = compare_graphs(args.against, args.model, campaigns, args.body.read_bytes(), batches, args.calls,
                                 int(args.evict_mb * (1 << 20)))
    else:
        results = measure(args.model, campaigns, args.body.read_bytes(), batches, args.calls,
                          int(args.evict_mb * (1 << 20)))
    cpus = sorted(os.sched_getaffinity(0))
    pinned = f"taskset -c {cpus[0]} " if len(cpus) == 1 else ""
    report = {
        "command": pinned + " ".join(["python -m bench.factorized", *(argv if argv is not None else sys.argv[1:])]),
        "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "model_id": model_id(args.model), "against": str(args.against) if args.against else None,
        "cpu_model": cpu_model(), "cpus": cpus,
        "loadavg_before": loadavg, "loadavg_after": list(os.getloadavg()), "versions": package_versions(),
        "commit": git_commit(ROOT), "results": results}
    text = json.dumps(report, indent=2) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

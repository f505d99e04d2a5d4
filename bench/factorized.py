"""Row scoring vs factorized DeepFM scoring, per request and per row: ``python -m bench.factorized``.

A request is the IAB simple-banner bid request: one imp, scored against every catalog creative of its
size (9 with the default catalog). For batches of 1, 8 and 32 such requests (one ORT call per batch,
as the batched hot path makes them) each way is timed with featurization included:

- canonical: ``Scorer.score`` on ``(candidate layer, imp record)`` rows, ``model.onnx``;
- factorized: imps featurized into ``FactorizedScorer.imp_inputs``, row numbers written, ``run``
  (candidate parts computed once beforehand, as at catalog load).

The two take turns call by call over a pool of distinct imp records (freshly decoded, so the
featurizer's per-object cache does not flatter either), and the median of each is reported. Pin it:
``taskset -c 0 python -m bench.factorized``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from bench.machine import cpu_model, git_commit, model_id, package_versions
from bidder import DEFAULT_BUNDLE, OPENRTB_EXAMPLES
from bidder.campaigns import load_catalog
from bidder.factorized import FactorizedScorer
from bidder.openrtb import decode_request, imp_fields, imp_sizes, request_fields
from bidder.scorer import Scorer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BODY = OPENRTB_EXAMPLES / "bid-request-2.5" / "simple-banner.json"
DEFAULT_RESULTS = ROOT / "bench" / "results"
POOL = 512


def imp_records(body: bytes, n: int) -> tuple[list[dict], tuple[int, int]]:
    """``n`` imp records of the request, each decoded afresh (no value object shared), and its size."""
    records = []
    for i in range(n):
        request = decode_request(body)
        record = imp_fields(request_fields(request, None, now=1_370_000_000.0 + 3600 * i), request.imp[0])
        records.append(record)
    return records, imp_sizes(decode_request(body).imp[0])[0]


def measure(bundle: Path, campaigns: Path, body: bytes, batches: list[int], calls: int) -> list[dict]:
    rows_max = max(batches) * 64
    scorer = Scorer(bundle, max_batch=rows_max)
    factorized = FactorizedScorer.for_scorer(scorer, max_imps=max(batches), max_rows=rows_max)
    catalog = load_catalog(campaigns)
    factorized.set_candidates([c.layer for c in catalog.candidates])
    records, (w, h) = imp_records(body, POOL)
    eligible = catalog.for_size(w, h)
    number = {id(c): i for i, c in enumerate(catalog.candidates)}
    k = len(eligible)
    candidates = np.array([number[id(c)] for c in eligible], dtype=np.int64)
    results = []
    for batch in batches:
        rows = batch * k
        row_imp = np.repeat(np.arange(batch, dtype=np.int64), k)
        row_cand = np.tile(candidates, batch)
        canonical_t, factorized_t = [], []
        position = 0
        for call in range(calls):
            imps = records[position:position + batch]
            position = (position + batch) % (POOL - batch)
            pairs = [(c.layer, record) for record in imps for c in eligible]
            start = time.perf_counter_ns()
            expected = scorer.score(pairs)
            canonical_t.append(time.perf_counter_ns() - start)
            expected = expected.copy()
            start = time.perf_counter_ns()
            factorized.featurizer.transform_into(factorized.imp_inputs, imps)
            factorized.row_imp[:rows] = row_imp
            factorized.row_cand[:rows] = row_cand
            got = factorized.run(batch, rows)
            factorized_t.append(time.perf_counter_ns() - start)
            if call == 0:
                diff = float(np.max(np.abs(got - expected)))
                assert diff <= 1e-6, f"factorized differs from canonical by {diff}"
        c_us, f_us = np.median(canonical_t) / 1e3, np.median(factorized_t) / 1e3
        results.append({
            "requests": batch, "imps": batch, "candidates_per_imp": k, "rows": rows,
            "canonical_us": round(c_us, 2), "factorized_us": round(f_us, 2),
            "canonical_us_per_request": round(c_us / batch, 2), "factorized_us_per_request": round(f_us / batch, 2),
            "canonical_us_per_row": round(c_us / rows, 3), "factorized_us_per_row": round(f_us / rows, 3),
            "factorized_over_canonical": round(f_us / c_us, 3), "calls": calls})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.factorized", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_BUNDLE, help="DeepFM bundle with factorized graphs")
    parser.add_argument("--campaigns", type=Path, default=None, help="catalog (default: campaigns.json beside the bundle)")
    parser.add_argument("--body", type=Path, default=DEFAULT_BODY, help="OpenRTB request (default: IAB simple-banner)")
    parser.add_argument("--batches", default="1,8,32", help="requests per ORT call (default: %(default)s)")
    parser.add_argument("--calls", type=int, default=3000, help="timed calls per way and batch (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here (default: print only)")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    campaigns = args.campaigns or args.model / "campaigns.json"
    loadavg = list(os.getloadavg())
    results = measure(args.model, campaigns, args.body.read_bytes(), batches, args.calls)
    cpus = sorted(os.sched_getaffinity(0))
    pinned = f"taskset -c {cpus[0]} " if len(cpus) == 1 else ""
    report = {
        "command": pinned + " ".join(["python -m bench.factorized", *(argv if argv is not None else sys.argv[1:])]),
        "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "model_id": model_id(args.model), "cpu_model": cpu_model(), "cpus": cpus,
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

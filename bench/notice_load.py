"""The notice routes over HTTP beside bidding: ``python -m bench notices``.

One bidder worker (core 0) with this round's stages on (signed notices from a key file, the event log, a budget
and a frequency cap on every campaign, as ``bench load``'s ``bidder-all``) gets two paced wrk loads at once
(both on core 1): bids (the simple banner, POST) at ``--bid-rate`` and notices (GET, each a distinct first notice:
a win and a bill for two bids in three, a loss for the third, each with a valid token signed by the same key, so
every one is verified, deduplicated in the store, settled in the ledger and logged) at ``--rate``. wrk sends each
load on a schedule of its rate (``bench/wrk/paced.lua``'s ``rate=R``), whatever the server's latency: a slower
server is offered as many requests, not fewer; the report gives the rates asked for and reached. The figures: the notices' latency percentiles (wrk's histogram), the
bids' alongside, the rates reached, the server's CPU per request, and the bidder's own count of the notices by
result (every one should be ``ok``). First, unless ``--no-ceiling``, the same two loads go to the echo server
(``bench.echo``: a notice is answered 200 empty once its query is read): what wrk and the machine show at best, the
floor under the bidder's figures. Writes ``notices-load.json`` into ``--out``::

    python -m bench notices --rate 2000 --bid-rate 2000 --seconds 20 --out runs/notices
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.load import DEFAULT_BODY, DEFAULT_MODEL, REPO, child_environment, money_catalog
from bench.machine import machine_info, model_id
from bench.servers import BenchError, free_port, pinned, running, tree_cpu_seconds
from bench.wrk_driver import WrkResult, parse_output, wrk_path, wrk_version
from bidder.campaigns import load_catalog
from bidder.notices import Keyring, SigningKey, micros

SCRIPT = Path(__file__).resolve().parent / "wrk" / "paced.lua"
PAUSE_MS = 4  # the connections: as many as send the rate, each pausing this long (ms) between two answers
KEY = {"id": "bench-notices", "secret": "42" * 32, "created": "2026-01-01T00:00:00Z"}
BID_PRICE_USD = 2.5   # the bid price the notices' tokens carry (CPM)
CLEARING = "1.5"      # the clearing price the win and bill notices report
TARGET_P99_MS = 2.0


def connections_for(rate: float, pause_ms: int = PAUSE_MS) -> int:
    """Connections that, each pausing ``pause_ms`` then waiting about half a millisecond for its answer, send at
    least ``rate`` requests a second."""
    return max(1, math.ceil(rate * (pause_ms + 0.5) / 1000.0))


def notice_paths(n: int, campaign: str, creative: str, model: str, issued: float) -> list[str]:
    """``n`` distinct first notices (path and query), signed with ``KEY``: per bid a win and a bill, or (every
    third bid) a loss."""
    keyring = Keyring([SigningKey(KEY["id"], bytes.fromhex(KEY["secret"]), 0.0)])
    paths: list[str] = []
    bid = 0
    while len(paths) < n:
        request_id = f"notice-bench-{bid}"
        token = keyring.sign(issued, micros(BID_PRICE_USD), 600, request_id, "1", f"{request_id}-1", "bidder",
                             campaign, creative, "USD", "", model)
        if bid % 3 == 2:
            paths.append(f"/notice/loss?t={token}&loss=102")
        else:
            paths.append(f"/notice/win?t={token}&p={CLEARING}")
            paths.append(f"/notice/bill?t={token}&p={CLEARING}")
        bid += 1
    return paths[:n]


def paced_wrk(url: str, mode: str, data: Path, connections: int, seconds: int, cpus: str | None, rate: float,
              ) -> subprocess.Popen:
    """wrk (one thread) sending ``rate`` requests a second on a schedule over ``connections``."""
    command = pinned([wrk_path(), "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout=2s", "-s", str(SCRIPT),
                      url, "--", mode, str(data), f"rate={rate:g}"], cpus)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(process: subprocess.Popen, seconds: float) -> WrkResult:
    try:
        out, err = process.communicate(timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise BenchError("wrk did not finish in time") from None
    if process.returncode != 0:
        raise BenchError(f"wrk failed (status {process.returncode}): {(out + err).strip()[-2000:]}")
    return parse_output(out)


def notice_counts(metrics_url: str) -> dict[str, float]:
    """``bidder_notices_total`` by kind and result (those counted at all), from the worker's /metrics."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    counts = {}
    for line in text.splitlines():
        if line.startswith("bidder_notices_total{"):
            labels, _, value = line.rpartition(" ")
            if float(value):
                counts[labels[len("bidder_notices_total"):]] = float(value)
    return counts


def summary_of(result: WrkResult) -> dict:
    return {"requests": result.requests, "rate": result.rps, "statuses": result.statuses,
            "socket_errors": result.socket_errors,
            "latency_ms": {f"p{p:g}": result.percentile_us(p) / 1000 for p in (50, 90, 99, 99.9)}}


def run(args: argparse.Namespace) -> dict:
    wrk_path()
    child_environment()
    work = Path(tempfile.mkdtemp(prefix="bench-notices-"))
    keys = work / "keys.json"
    keys.write_text(json.dumps({"keys": [KEY]}))
    keys.chmod(0o600)
    catalog_path = money_catalog(args.model / "campaigns.json")
    candidate = load_catalog(catalog_path).candidates[0]
    seconds = args.seconds + args.warmup
    paths = notice_paths(math.ceil(args.rate * seconds * 1.2) + 100, candidate.campaign_id, candidate.creative_id,
                         model_id(args.model), time.time())
    (work / "paths.txt").write_text("\n".join(paths) + "\n")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = pinned([sys.executable, "-m", "bidder", "serve", "--model", str(args.model), "--campaigns",
                      str(catalog_path), "--port", str(port), "--notice-url", base, "--notice-keys", str(keys),
                      "--state-dir", str(work / "state"), "--events", str(work / "events")], args.server_cpus)
    notice_connections = connections_for(args.rate)
    bid_connections = connections_for(args.bid_rate)
    print(f"bidder on {base}; notices at {args.rate:g}/s ({notice_connections} connections), bids at "
          f"{args.bid_rate:g}/s ({bid_connections} connections), {args.warmup:g} + {args.seconds:g} s",
          file=sys.stderr, flush=True)
    ceiling = None
    if args.ceiling:  # the same two loads against the echo server: what this machine and wrk show at best
        echo_port = free_port()
        echo_base = f"http://127.0.0.1:{echo_port}"
        echo = pinned([sys.executable, "-m", "bench.echo", "--port", str(echo_port)], args.server_cpus)
        with running("echo", echo, echo_base, ready_path="/readyz", startup_timeout_s=60.0) as server:
            ceiling = paced_pair(args, echo_base, work / "paths.txt", bid_connections, notice_connections, server)
    with running("bidder-notices", command, base, ready_path="/readyz", startup_timeout_s=60.0) as server:
        notice_result, bid_result, cpu = paced_pair(args, base, work / "paths.txt", bid_connections,
                                                    notice_connections, server)
        counts = notice_counts(f"{base}/metrics")
    answered = notice_result.requests + bid_result.requests
    p99 = notice_result.percentile_us(99) / 1000
    report = {
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python -m bench notices " + " ".join(args.argv),
        "config": {"rate": args.rate, "bid_rate": args.bid_rate, "seconds": args.seconds, "warmup": args.warmup,
                   "pacing": "schedule", "notice_connections": notice_connections,
                   "bid_connections": bid_connections, "server_cpus": args.server_cpus,
                   "client_cpus": args.client_cpus, "body": str(args.body), "model": str(args.model)},
        "notices": summary_of(notice_result), "bids": summary_of(bid_result),
        "server_cpu_share": cpu / notice_result.duration_s,
        "server_cpu_us_per_request": cpu / answered * 1e6 if answered else None,
        "counted": counts,
        "target": {"criterion": f"notice P99 < {TARGET_P99_MS:g} ms at >= {args.rate:g} notices/s beside bidding",
                   "p99_ms": p99, "rate": notice_result.rps,
                   "met": p99 < TARGET_P99_MS and notice_result.rps >= args.rate},
        "machine": machine_info(REPO, wrk_version()),
    }
    if ceiling is not None:
        report["ceiling"] = {"server": "echo (python -m bench.echo)", "notices": summary_of(ceiling[0]),
                             "bids": summary_of(ceiling[1]), "server_cpu_share": ceiling[2] / ceiling[0].duration_s}
    return report


def paced_pair(args: argparse.Namespace, base: str, paths: Path, bid_connections: int, notice_connections: int,
               server) -> tuple[WrkResult, WrkResult, float]:
    """Bids only for ``--warmup`` seconds, then bids and notices together for ``--seconds``: the notices' and the
    bids' results and the server's CPU seconds meanwhile."""
    if args.warmup > 0:  # bids only: every notice of the measured run is a first one
        finished(paced_wrk(f"{base}/bid", "post", args.body, bid_connections, args.warmup, args.client_cpus,
                           args.bid_rate), args.warmup)
    cpu_before = tree_cpu_seconds(server.process.pid)
    bids = paced_wrk(f"{base}/bid", "post", args.body, bid_connections, args.seconds, args.client_cpus, args.bid_rate)
    notices = paced_wrk(base, "get", paths, notice_connections, args.seconds, args.client_cpus, args.rate)
    notice_result, bid_result = finished(notices, args.seconds), finished(bids, args.seconds)
    return notice_result, bid_result, tree_cpu_seconds(server.process.pid) - cpu_before


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench notices", description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=2000.0, help="notices a second (default: %(default)s)")
    parser.add_argument("--bid-rate", type=float, default=2000.0, help="bid requests a second (default: %(default)s)")
    parser.add_argument("--seconds", type=int, default=20, help="measured seconds (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of bids first (default: %(default)s)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="bundle (default: the shipped one)")
    parser.add_argument("--body", type=Path, default=DEFAULT_BODY, help="the bid request (default: simple banner)")
    parser.add_argument("--server-cpus", default="0", help="taskset list for the bidder (default: %(default)s)")
    parser.add_argument("--client-cpus", default="1", help="taskset list for both wrk (default: %(default)s)")
    parser.add_argument("--no-ceiling", dest="ceiling", action="store_false",
                        help="skip the same loads against the echo server first (the machine's and wrk's floor)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "notices",
                        help="folder of notices-load.json (default: runs/notices)")
    args = parser.parse_args(argv)
    args.argv = argv
    for name in ("rate", "bid_rate", "seconds"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    try:
        report = run(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "notices-load.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    notices, bids = report["notices"], report["bids"]
    if "ceiling" in report:
        ceiling = report["ceiling"]
        print(f"echo ceiling, same loads: notices {ceiling['notices']['rate']:,.0f}/s, P50 "
              f"{ceiling['notices']['latency_ms']['p50']:.3f} ms, P99 {ceiling['notices']['latency_ms']['p99']:.3f} "
              f"ms; bids P99 {ceiling['bids']['latency_ms']['p99']:.3f} ms")
    print(f"notices: {notices['rate']:,.0f}/s, P50 {notices['latency_ms']['p50']:.3f} ms, P99 "
          f"{notices['latency_ms']['p99']:.3f} ms; bids: {bids['rate']:,.0f}/s, P99 {bids['latency_ms']['p99']:.3f} "
          f"ms; server CPU {report['server_cpu_share']:.0%} of a core\ncounted: {report['counted']}\n"
          f"target: {report['target']['criterion']}: {'met' if report['target']['met'] else 'not met'}\n{path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

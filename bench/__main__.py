"""Command line: `python -m bench load|echo|baseline|retrieval|replay|shading|bundles|reload|history|exchange|events|loop|budgets|pacing [options]`."""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
from pathlib import Path

from bench.load import (DEFAULT_BODY, DEFAULT_MODEL, DEFAULT_RESULTS, ECHO_LAYERS, SERVERS, LoadConfig, default_servers,
                        run_load, summary)
from bench.servers import BenchError

QUICK_DURATION_S = 3.0
QUICK_WARMUP_S = 1.0


def connection_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("connection counts must be >= 1")
    return values


def worker_list(text: str) -> tuple[int, ...]:
    """``--workers 1,2,4``: the worker counts of a scaling curve (the 1-worker run is always measured)."""
    values = connection_list(text)
    return tuple(sorted(set(values)))


def server_list(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names or set(names) - set(SERVERS):
        raise argparse.ArgumentTypeError(f"choose from {', '.join(SERVERS)}, got {text!r}")
    return names


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--body", type=Path, default=DEFAULT_BODY, help="OpenRTB request to POST (default: %(default)s)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="model bundle of the bidder and the baseline (default: %(default)s)")
    parser.add_argument("--campaigns", type=Path, default=None,
                        help="campaign catalog of the bidder and the baseline "
                             "(default: campaigns.json beside the bundle, if any)")
    parser.add_argument("--route", default="/bid", help="POST path on every server (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement (default: %(default)s)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unrecorded seconds before each measurement")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_DURATION_S:g} s per measurement, {QUICK_WARMUP_S:g} s warm-up")
    parser.add_argument("--connections", type=connection_list, default=(1, 8, 32),
                        help="concurrency levels, the largest being saturation (default: 1,8,32)")
    parser.add_argument("--workers", type=worker_list, default=None, metavar="N[,N...]",
                        help="the scaling curve: for each N > 1 a run with N workers per server at N x the largest "
                             "concurrency, compared with the 1-worker run (e.g. 1,2 or 1,2,4,8,14)")
    parser.add_argument("--max-batch", type=int, default=None, help="passed to the bidder")
    parser.add_argument("--retrieve-k", type=positive_int, default=None, metavar="K",
                        help="passed to the bidder: creatives ranked per imp of a large catalog (bidder-exhaustive "
                             "serves the same catalog without retrieval, to compare)")
    parser.add_argument("--servers", type=server_list, default=None,
                        help=f"which servers to run, of {','.join(SERVERS)} (default: echo,bidder, plus fastapi "
                             f"when fastapi, uvicorn, orjson and mmh3 are installed); bidder-nobatch, bidder-rows "
                             f"and bidder-plain are the bidder with --no-batching, --no-factorized or both, "
                             f"bidder-graphrows with --graph-rows, bidder-exhaustive with --no-retrieval, to measure "
                             f"each lever in the same run")
    parser.add_argument("--echo-layer", choices=ECHO_LAYERS, default="app",
                        help="the echo ceiling's aiohttp layer: 'app' (Application + router, the bidder's today) "
                             "or 'server' (low-level web.Server, one handler) (default: %(default)s)")
    parser.add_argument("--repeat", type=positive_int, default=1, metavar="N",
                        help="run the whole alternating sequence N times and report medians (default: 1; "
                             "the throughput target wants >= 3)")
    parser.add_argument("--server-cpus", default="0", help="taskset CPU list for the servers (default: %(default)s)")
    parser.add_argument("--client-cpus", default="1", help="taskset CPU list for wrk (default: %(default)s)")
    parser.add_argument("--no-pin", action="store_true", help="run servers and wrk without taskset")
    parser.add_argument("--startup-timeout", type=float, default=60.0, help="seconds to wait for /readyz")
    parser.add_argument("--wrk-timeout", type=float, default=2.0, help="wrk's per-request timeout in seconds")
    parser.add_argument("--allow-no-bid", action="store_true",
                        help="measure even when the bidder answers 204 (no bid) to the body")
    parser.add_argument("--distinct-ids", action="store_true",
                        help="a new request id on every request (so every bid has its own bid id), for every server "
                             "alike; costs wrk a Lua call per request")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS, help="results folder (default: %(default)s)")


def load_config(args: argparse.Namespace) -> LoadConfig:
    return LoadConfig(
        body=args.body.resolve(), model=args.model.resolve(),
        campaigns=args.campaigns.resolve() if args.campaigns else None, route=args.route, host=args.host,
        duration_s=QUICK_DURATION_S if args.quick else args.duration,
        warmup_s=QUICK_WARMUP_S if args.quick else args.warmup,
        connections=args.connections, scaling_workers=args.workers, max_batch=args.max_batch,
        retrieve_k=args.retrieve_k,
        server_cpus=None if args.no_pin else args.server_cpus,
        client_cpus=None if args.no_pin else args.client_cpus, servers=args.servers or default_servers(),
        echo_layer=args.echo_layer, repeat=args.repeat,
        startup_timeout_s=args.startup_timeout, wrk_timeout_s=args.wrk_timeout,
        allow_no_bid=args.allow_no_bid, distinct_ids=args.distinct_ids, out_dir=args.out.resolve())


def _interrupt(signum, frame):
    raise KeyboardInterrupt


#: the commands other than load: the module whose ``main(argv)`` runs each (imported only when chosen), and its help
SUBCOMMANDS = {
    "echo": ("bench.echo", "run the echo server alone"),
    "baseline": ("bench.baseline", "run the FastAPI baseline alone"),
    "retrieval": ("bench.retrieval", "two-tower retrieval against exhaustive ranking"),
    "replay": ("bench.replay", "replay a held-out synthetic bid log: truthful, fixed, model and oracle shading"),
    "shading": ("bench.shading", "in-process cost of first-price shading: at=1 vs at=2"),
    "bundles": ("bench.bundles", "in-process cost of two or more bundles taking turns"),
    "reload": ("bench.reload", "requests served while the catalog reloads"),
    "history": ("bench.history", "the benchmark history page from bench/results/"),
    "exchange": ("bench.exchange.cli", "a simulated exchange: a day of auctions, notices and clicks against OpenRTB "
                                       "bidders"),
    "loop": ("bench.loop", "the learning loop on the simulated exchange: days of logs, train on them, serve the "
                           "result"),
    "events": ("bench.events", "the event log's cost per event and what a kill -9 loses"),
    "budgets": ("bench.budgets", "budgets, even pacing and the spend ledger on the simulated exchange: a day per "
                                 "budget fraction"),
    "pacing": ("bench.pacing", "even pacing against asap over simulated days of the synthetic market"),
    "notices": ("bench.notice_load", "the notice routes over HTTP beside bidding, both paced"),
    "stages": ("bench.stages", "in-process CPU of notices, events, budgets and caps all on against all off"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    commands = parser.add_subparsers(dest="command", required=True)
    load = commands.add_parser("load", help="wrk load test of the bidder against the echo ceiling")
    add_load_arguments(load)
    for name, (module, what) in SUBCOMMANDS.items():  # each parses its own arguments
        commands.add_parser(name, help=f"{what} (see python -m bench {name} -h)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[args.command][0]).main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    # SIGTERM's default action would skip the `finally` blocks that stop the servers and leave them
    # running in their own sessions; turned into an exception it unwinds like Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        report, json_path, png_path = run_load(load_config(args))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return 130
    print(summary(report, json_path, png_path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

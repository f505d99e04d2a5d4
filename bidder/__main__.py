"""``python -m bidder serve`` (or the installed ``bidder serve``): run the bid server.

Start-up problems (a bad option, an unreadable bundle or catalog, a busy port) end with one ``error: ...``
line on stderr and exit status 2, before any worker starts.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bidder import DEFAULT_BUNDLE
from bidder.app import DEFAULT_CAMPAIGNS, Config
from bidder.bundle import CAMPAIGNS_FILE, MODEL_FILE
from bidder.clock import Clock, parse_time


def parse_now(text: str) -> float:
    """``--now``, ``--clock-start``, ``--clock-anchor``: ``bidder.clock.parse_time`` for argparse."""
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def simulated_clock(args: argparse.Namespace) -> Clock | None:
    """The clock of --clock-start/--clock-speed/--clock-anchor, anchored now if no anchor is given; None
    without them. ValueError names the option at fault."""
    if args.clock_start is None and args.clock_speed is None:
        if args.clock_anchor is not None:
            raise ValueError("--clock-anchor needs --clock-start or --clock-speed")
        return None
    if args.now is not None:
        raise ValueError("--now fixes the clock; it cannot be combined with --clock-start or --clock-speed")
    speed = 1.0 if args.clock_speed is None else args.clock_speed
    if not speed > 0 or speed == float("inf"):
        raise ValueError(f"--clock-speed must be a positive number of simulated seconds per second, got {speed}")
    anchor = time.time() if args.clock_anchor is None else args.clock_anchor
    return Clock(start=anchor if args.clock_start is None else args.clock_start, speed=speed, anchor=anchor)


def notice_settings(args: argparse.Namespace):
    """Notices as --notice-* and --state-dir ask, or None without --notice-url; ValueError names the option or
    the key file's entry at fault."""
    from bidder.notices import Keyring, NoticeSettings, load_keyring

    if args.notice_url is None:
        if args.notice_keys is not None or args.state_dir is not None:
            raise ValueError("--notice-keys and --state-dir need --notice-url")
        return None
    if not args.notice_url.startswith(("http://", "https://")) or "?" in args.notice_url:
        raise ValueError(f"--notice-url must be an http(s) base URL without a query, got {args.notice_url!r}")
    if not 0 < args.notice_window <= args.notice_max_window:
        raise ValueError(f"--notice-window must be positive and at most --notice-max-window, got "
                         f"{args.notice_window} and {args.notice_max_window}")
    keyring = Keyring.generate() if args.notice_keys is None else load_keyring(args.notice_keys)
    state_dir = args.state_dir
    if state_dir is None:
        import tempfile
        state_dir = Path(tempfile.mkdtemp(prefix="bidder-state-"))
    import sqlite3

    from bidder.notice_store import SqliteNoticeStore
    try:  # the workers open it themselves: refuse an unusable directory here, in one line
        SqliteNoticeStore(state_dir, args.notice_max_window).close()
    except (OSError, sqlite3.Error) as exc:
        raise ValueError(f"--state-dir {state_dir}: cannot keep the notice store there: {exc}") from None
    return NoticeSettings(url=args.notice_url.rstrip("/"), keyring=keyring, state_dir=state_dir,
                          window_s=args.notice_window, max_window_s=args.notice_max_window)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bidder",
                                     description="Real-time CTR bidder: serve OpenRTB 2.5/2.6 bid requests over HTTP.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve /bid, /predict, /metrics on HTTP",
                           description="Serve /bid, /bid/EXCHANGE, /predict, /healthz, /readyz, /metrics and "
                                       "/admin/reload on HTTP. Start-up errors print one line and exit with status 2.")
    defaults = Config()
    serve.add_argument("--model", type=Path, default=defaults.model,
                       help="model bundle directory (default: the bundled model, %(default)s)")
    serve.add_argument("--campaigns", type=Path, default=None,
                       help="campaign catalog JSON (default: the bundle's campaigns.json, else the default catalog)")
    serve.add_argument("--host", default=defaults.host, help="(default: %(default)s)")
    serve.add_argument("--port", type=int, default=defaults.port, help="(default: %(default)s)")
    serve.add_argument("--workers", type=int, default=defaults.workers,
                       help="worker processes sharing the port (SO_REUSEPORT), worker i pinned to core i mod ncpu "
                            "(default: %(default)s)")
    serve.add_argument("--max-batch", type=int, default=defaults.max_batch,
                       help="rows per ONNX Runtime call; larger requests are scored in chunks (default: %(default)s)")
    serve.add_argument("--max-body", type=int, default=defaults.max_body, help="largest request body in bytes; larger ones get 413 (default: %(default)s)")
    serve.add_argument("--utc-offset", type=float, default=defaults.utc_offset_hours,
                       help="hours added to UTC to derive weekday/hour of a request")
    serve.add_argument("--now", type=parse_now, default=None, metavar="TIME",
                       help="fix the clock: every request is priced as if received at TIME (ISO 8601 such as "
                            "2026-11-25T14:00:00Z, or Unix seconds), for reproducible examples and tests; "
                            "--utc-offset still applies (default: the wall clock)")
    serve.add_argument("--clock-start", type=parse_now, default=None, metavar="TIME",
                       help="simulated clock: the time requests are priced at when the clock starts (at "
                            "--clock-anchor), running --clock-speed times faster than the wall clock from there, for "
                            "a simulated day (python -m bench exchange); ISO 8601 or Unix seconds (default: the "
                            "anchor itself)")
    serve.add_argument("--clock-speed", type=float, default=None, metavar="X",
                       help="simulated seconds per wall-clock second (for example 720: a day in two minutes); "
                            "setting it or --clock-start turns the simulated clock on (default: 1)")
    serve.add_argument("--clock-anchor", type=parse_now, default=None, metavar="TIME",
                       help="the wall-clock time at which the simulated clock reads --clock-start: give the exchange "
                            "simulator the same value (its --anchor) and both read the same simulated time whenever "
                            "each of them started (default: the moment the server starts)")
    serve.add_argument("--no-pin", action="store_true", help="do not pin workers to cores")
    serve.add_argument("--no-batching", action="store_true",
                       help="score each request in its own ONNX Runtime call instead of one call for all requests "
                            "ready in the same event-loop turn (for comparison)")
    serve.add_argument("--no-factorized", action="store_true",
                       help="score every row with model.onnx even when the bundle has factorized graphs "
                            "(for comparison)")
    serve.add_argument("--graph-shading", action="store_true",
                       help="search first-price bids with the bundle's market.onnx in one ONNX Runtime call per batch "
                            "instead of natively over its market-terms.npz (for comparison)")
    serve.add_argument("--retrieve-k", type=int, default=defaults.retrieve_k, metavar="K",
                       help="with a catalog of more than 1,000 creatives: per imp, the targeting filters and then the "
                            "K creatives with the best two-tower score (the bundle's imp and ad towers, python -m "
                            "train twotower) are scored by the ranker; smaller catalogs score every eligible "
                            "creative (default: %(default)s)")
    serve.add_argument("--ann", action="store_true",
                       help="approximate top K (an HNSW graph per creative size; needs faiss-cpu: pip install "
                            "'bidder[ann]') instead of the exact product over every eligible creative")
    serve.add_argument("--notice-url", default=None, metavar="URL",
                       help="turn notices on: every bid's nurl, burl and lurl (and its creative's click link) point "
                            "at this bidder's /notice/win, /notice/bill, /notice/loss and /click under URL, the "
                            "public base address exchanges reach it at, with a signed token (docs/notices.md); "
                            "without it a bid carries its creative's own nurl")
    serve.add_argument("--notice-keys", type=Path, default=None, metavar="FILE",
                       help="the signing keys (JSON, chmod 600; the newest signs, all verify); without it a key is "
                            "generated at start, and tokens die with the process: for trials only")
    serve.add_argument("--notice-window", type=int, default=600, metavar="SECONDS",
                       help="a bid's exp when the imp gives none: notices after it are accepted and counted as late "
                            "(default: %(default)s)")
    serve.add_argument("--notice-max-window", type=int, default=86_400, metavar="SECONDS",
                       help="the longest exp a bid carries; notices after it are refused as expired "
                            "(default: %(default)s)")
    serve.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                       help="where the workers of this machine record which notices were counted (a SQLite file); "
                            "default: a new temporary directory, forgotten at restart")
    serve.add_argument("--no-retrieval", action="store_true",
                       help="score every eligible creative of a large catalog, as for a small one (for comparison)")
    serve.add_argument("--events", type=Path, default=None, metavar="DIR",
                       help="log every bid (and the notices and clicks reported to the bidder) to zstd JSON lines "
                            "files in DIR, written off the bid path (docs/events.md); python -m train logs turns "
                            "them into training data (default: no event log)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    campaigns = args.campaigns
    if campaigns is None:
        campaigns = args.model / CAMPAIGNS_FILE
        if not campaigns.exists():
            campaigns = DEFAULT_CAMPAIGNS
    if args.workers < 1 or args.max_batch < 1 or args.max_body < 1:
        return _fail("--workers, --max-batch and --max-body must be positive")
    if args.retrieve_k < 1:
        return _fail(f"--retrieve-k must be a positive number of creatives per imp, got {args.retrieve_k}")
    if not 0 < args.port < 65536:
        return _fail(f"--port must be between 1 and 65535, got {args.port}")
    try:
        clock = simulated_clock(args)
    except ValueError as exc:
        return _fail(str(exc))
    try:
        notices = notice_settings(args)
    except ValueError as exc:
        return _fail(str(exc))
    config = Config(model=args.model, campaigns=campaigns, host=args.host, port=args.port, workers=args.workers,
                    max_batch=args.max_batch, max_body=args.max_body, utc_offset_hours=args.utc_offset,
                    now=args.now, clock=clock, pin=not args.no_pin, batching=not args.no_batching,
                    factorized=not args.no_factorized, native_shading=not args.graph_shading, retrieve_k=args.retrieve_k, retrieval=not args.no_retrieval,
                    ann=args.ann, notices=notices, events=args.events)
    # refuse a broken bundle or catalog and a busy address here, in one line, before any worker starts
    from bidder.app import preload
    from bidder.campaigns import CatalogError, load_catalog
    from bidder.events import EventLog, EventLogError, check_directory
    from bidder.retrieval import needs_retrieval, towers_for
    from bidder.scorer import BundleError, Scorer
    from bidder.workers import EXIT_STARTUP, StartupError, check_port, serve

    try:
        scorer = Scorer(config.model, max_batch=1)
        catalog = load_catalog(config.campaigns)
        if config.retrieval and needs_retrieval(catalog):
            towers_for(scorer, catalog, config.ann)
    except (BundleError, CatalogError) as exc:
        hint = ""
        if config.model.resolve() == DEFAULT_BUNDLE.resolve() and not (DEFAULT_BUNDLE / MODEL_FILE).exists():
            hint = " (the default bundle has no model yet: build it with `make default-model`)"
        return _fail(f"{exc}{hint}", EXIT_STARTUP)
    except OSError as exc:
        return _fail(f"{exc.filename or config.model}: cannot read: {exc.strerror or exc}", EXIT_STARTUP)
    try:
        check_port(config.host, config.port, reuse_port=config.workers > 1)
        if config.events is not None:
            check_directory(config.events)
            EventLog(config.events).salvage()  # what a killed server left, before its workers start
    except (StartupError, EventLogError) as exc:
        return _fail(str(exc), EXIT_STARTUP)
    preload(config.campaigns, catalog)  # served as checked, not read again
    del catalog  # the engine holds it from now on: a reload must be able to free it
    return serve(config)


def _fail(message: str, status: int = 2) -> int:
    print("error: " + " ".join(message.split()), file=sys.stderr)  # one line, whatever a library put in it
    return status


if __name__ == "__main__":
    sys.exit(main())

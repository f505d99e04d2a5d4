"""``python -m bidder serve`` (or the installed ``bidder serve``): run the bid server; ``bidder config --print``:
the configuration it would run with; ``bidder ready``: whether a server answers ``/readyz`` (a container's
health check).

Start-up problems (a bad option, an unreadable bundle or catalog, a busy port) end with one ``error: ...``
line on stderr and exit status 2, before any worker starts.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from bidder import DEFAULT_BUNDLE
from bidder.app import DEFAULT_CAMPAIGNS, Config
from bidder.bundle import CAMPAIGNS_FILE, MODEL_FILE
from bidder.clock import Clock, parse_time
from bidder.configfile import ConfigError, read_config, render_config
from bidder.cpus import available_cpus
from bidder.logs import FORMATS, LEVELS

#: the environment variable that may hold the notice signing keys (the key file's JSON) instead of --notice-keys
NOTICE_KEYS_ENV = "BIDDER_NOTICE_KEYS"


def parse_now(text: str) -> float:
    """``--now``, ``--clock-start``, ``--clock-anchor``: ``bidder.clock.parse_time`` for argparse."""
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def worker_count(text: str) -> int | str:
    """``--workers``: a positive number, or ``auto`` for the CPUs this process may use (``bidder.cpus``)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of workers or auto, got {text!r}") from None


def sample_rate(text: str) -> float:
    """``--access-log-sample``, ``--explore``: a fraction of requests or imps, 0 (off) to 1."""
    try:
        rate = float(text)
    except ValueError:
        rate = float("nan")
    if not 0 <= rate <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction from 0 to 1, got {text!r}")
    return rate


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
    from bidder.notices import Keyring, NoticeSettings, load_keyring, parse_keyring

    from_env = os.environ.get(NOTICE_KEYS_ENV)
    if args.notice_url is None:
        if args.notice_keys is not None or args.state_dir is not None or from_env is not None:
            raise ValueError(f"--notice-keys, {NOTICE_KEYS_ENV} and --state-dir need --notice-url")
        return None
    if args.notice_keys is not None and from_env is not None:
        raise ValueError(f"the notice keys come from --notice-keys or from {NOTICE_KEYS_ENV}, not both")
    if not args.notice_url.startswith(("http://", "https://")) or "?" in args.notice_url:
        raise ValueError(f"--notice-url must be an http(s) base URL without a query, got {args.notice_url!r}")
    if not 0 < args.notice_window <= args.notice_max_window:
        raise ValueError(f"--notice-window must be positive and at most --notice-max-window, got "
                         f"{args.notice_window} and {args.notice_max_window}")
    if from_env is not None:
        keyring = parse_keyring(from_env, NOTICE_KEYS_ENV)
    else:
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


def ledger_settings(args: argparse.Namespace, notices) -> None:
    """Refuse --ledger, --ledger-refresh and --lease-fraction values that cannot work (ValueError naming the
    option); a Redis banker must answer now."""
    if not args.ledger_refresh > 0 or args.ledger_refresh > 60:
        raise ValueError(f"--ledger-refresh must be a number of seconds in (0, 60], got {args.ledger_refresh}")
    if not 0 < args.lease_fraction <= 1:
        raise ValueError(f"--lease-fraction must be in (0, 1], got {args.lease_fraction}")
    if args.ledger is None:
        return
    if notices is None:
        raise ValueError("--ledger needs --notice-url: the billing notices are what commits the spend")
    from bidder.ledger.redis_banker import connect

    client = connect(args.ledger)
    try:
        client.ping()
    except Exception as exc:  # noqa: BLE001 - redis raises its own connection and authentication errors
        raise ValueError(f"--ledger {args.ledger}: cannot reach the Redis banker: {exc}") from None
    finally:
        client.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bidder",
                                     description="Real-time CTR bidder: serve OpenRTB 2.5/2.6 bid requests over HTTP.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve /bid, /predict, /metrics on HTTP",
                           description="Serve /bid, /bid/EXCHANGE, /predict, /healthz, /readyz, /metrics and "
                                       "/admin/reload on HTTP. Start-up errors print one line and exit with status 2.")
    defaults = Config()
    serve.add_argument("--config", type=Path, default=None, metavar="FILE",
                       help="a TOML file of these options, one key per option without its dashes (max-batch = 256, "
                            "no-pin = true); options on the command line override it; secrets are refused there "
                            "(docs/operations.md)")
    serve.add_argument("--model", type=Path, default=defaults.model,
                       help="model bundle directory (default: the bundled model, %(default)s)")
    serve.add_argument("--campaigns", type=Path, default=None,
                       help="campaign catalog JSON (default: the bundle's campaigns.json, else the default catalog)")
    serve.add_argument("--host", default=defaults.host, help="(default: %(default)s)")
    serve.add_argument("--port", type=int, default=defaults.port, help="(default: %(default)s)")
    serve.add_argument("--workers", type=worker_count, default=defaults.workers, metavar="N|auto",
                       help="worker processes sharing the port (SO_REUSEPORT), worker i pinned to core i mod ncpu; "
                            "auto: one per CPU this process may use, by its affinity and cgroup CPU quota, not the "
                            "host's core count (default: %(default)s)")
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
    serve.add_argument("--graph-rows", action="store_true",
                       help="run the factorized graph through ONNX Runtime instead of its native row kernel, which "
                            "computes the same arithmetic in C (for comparison)")
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
    serve.add_argument("--ledger", default=None, metavar="URL",
                       help="where the spend ledger of campaigns with budgets lives, and the notices' dedup with it: "
                            "redis://HOST:PORT/DB for a Redis shared by every machine (docs/budgets.md); default: "
                            "the embedded banker, a SQLite file in --state-dir shared by this machine's workers")
    serve.add_argument("--ledger-refresh", type=float, default=Config().ledger_refresh_s, metavar="SECONDS",
                       help="how often each worker reports its bids to the banker and has its leases topped up "
                            "(default: %(default)s)")
    serve.add_argument("--lease-fraction", type=float, default=Config().lease_fraction, metavar="F",
                       help="the most of a campaign's budget (daily, else total) one worker holds as its lease "
                            "(default: %(default)s)")
    serve.add_argument("--no-retrieval", action="store_true",
                       help="score every eligible creative of a large catalog, as for a small one (for comparison)")
    serve.add_argument("--events", type=Path, default=None, metavar="DIR",
                       help="log every bid (and the notices and clicks reported to the bidder) to zstd JSON lines "
                            "files in DIR, written off the bid path (docs/events.md); python -m train logs turns "
                            "them into training data (default: no event log)")
    serve.add_argument("--explore", type=sample_rate, default=defaults.explore, metavar="SHARE",
                       help="the share of imps bid with a creative drawn at random among those at or above the floor "
                            "instead of the best one, each bid's probability logged (--events) so training on the log "
                            "sees beyond the bidder's own choices (docs/events.md) (default: %(default)s, none)")
    serve.add_argument("--log-format", choices=FORMATS, default=defaults.log_format,
                       help="text lines, or one JSON object per line (ts, level, worker, pid, event, message and the "
                            "event's fields) (default: %(default)s)")
    serve.add_argument("--log-level", choices=LEVELS, default=defaults.log_level, help="(default: %(default)s)")
    serve.add_argument("--access-log-sample", type=sample_rate, default=defaults.access_log_sample, metavar="RATE",
                       help="log this fraction of requests (0 to 1) as access events; the bid path logs nothing "
                            "otherwise (default: %(default)s, off)")
    serve.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                       help="the supervisor serves /metrics on PORT with every worker's metrics, labelled by worker "
                            "(one scrape sees them all; also with one worker) (default: off: each worker's own "
                            "/metrics on the bid port)")
    serve.add_argument("--drain-timeout", type=float, default=defaults.shutdown_timeout, metavar="SECONDS",
                       help="on SIGTERM, how long in-flight requests may take to finish before the worker exits; "
                            "give a container's stop timeout more (default: %(default)s)")
    _with_serve_options(sub, serve, "config", help="print the configuration bidder serve would run with",
                        description="Print the effective configuration (the config file, then the options given "
                                    "here over it) as a config file bidder serve --config reads.")
    _with_serve_options(sub, serve, "ready", help="exit 0 if the server the options describe answers /readyz",
                        description="Ask the server these options describe (its host and port; 0.0.0.0 is asked "
                                    "on 127.0.0.1) whether it is ready: exit 0 if /readyz answers 200, else 1 with "
                                    "one line. A container's health check.")
    return parser


def _with_serve_options(sub, serve: argparse.ArgumentParser, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand that takes every option of ``serve``: called after the last of them is added."""
    command = sub.add_parser(name, parents=[serve], add_help=False, **kwargs)
    if name == "config":
        command.add_argument("--print", action="store_true", required=True,
                             help="print the effective configuration as TOML")
    return command


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise LookupError(command)


def parse(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """``bidder serve``'s parser (whose options are the config file's keys) and the command's arguments: the
    config file's values (``--config``) under the command line's. ConfigError names the file and key at fault."""
    parser = _parser()
    args = parser.parse_args(argv)
    serve = _command_parser(parser, "serve")
    if args.config is not None:
        _command_parser(parser, args.command).set_defaults(**read_config(args.config, serve))
        args = parser.parse_args(argv)
    return serve, args


def main(argv: list[str] | None = None) -> int:
    try:
        serve_parser, args = parse(argv)
    except ConfigError as exc:
        return _fail(str(exc))
    if args.command == "config":
        sys.stdout.write(render_config(serve_parser, args))
        return 0
    if args.command == "ready":
        return ready(args.host, args.port)
    if args.workers == "auto":
        args.workers = available_cpus()
    campaigns = args.campaigns
    if campaigns is None:
        campaigns = args.model / CAMPAIGNS_FILE
        if not campaigns.exists():
            campaigns = DEFAULT_CAMPAIGNS
    if args.workers < 1 or args.max_batch < 1 or args.max_body < 1:
        return _fail("--workers, --max-batch and --max-body must be positive")
    if not args.drain_timeout >= 0:
        return _fail(f"--drain-timeout must be a number of seconds, 0 or more, got {args.drain_timeout}")
    if args.metrics_port is not None and (not 0 < args.metrics_port < 65536 or args.metrics_port == args.port):
        return _fail(f"--metrics-port must be between 1 and 65535 and not --port, got {args.metrics_port}")
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
        ledger_settings(args, notices)
    except ValueError as exc:
        return _fail(str(exc))
    config = Config(model=args.model, campaigns=campaigns, host=args.host, port=args.port, workers=args.workers,
                    max_batch=args.max_batch, max_body=args.max_body, utc_offset_hours=args.utc_offset,
                    now=args.now, clock=clock, pin=not args.no_pin, batching=not args.no_batching,
                    factorized=not args.no_factorized, native_shading=not args.graph_shading,
                    native_rows=not args.graph_rows, retrieve_k=args.retrieve_k, retrieval=not args.no_retrieval,
                    ann=args.ann, notices=notices, events=args.events, explore=args.explore, ledger=args.ledger,
                    ledger_refresh_s=args.ledger_refresh, lease_fraction=args.lease_fraction,
                    shutdown_timeout=args.drain_timeout, log_format=args.log_format, log_level=args.log_level,
                    access_log_sample=args.access_log_sample, metrics_port=args.metrics_port)
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
        if notices is None and any(t.budgeted or t.frequency_caps for t in catalog.terms.values()):
            raise CatalogError(f"{config.campaigns}: campaigns with a budget or frequency caps need notices "
                               f"(--notice-url): the billing notices commit spend and count impressions")
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
        if config.metrics_port is not None:
            check_port(config.host, config.metrics_port)
        if config.events is not None:
            check_directory(config.events)
            EventLog(config.events).salvage()  # what a killed server left, before its workers start
    except (StartupError, EventLogError) as exc:
        return _fail(str(exc), EXIT_STARTUP)
    preload(config.campaigns, catalog)  # served as checked, not read again
    del catalog  # the engine holds it from now on: a reload must be able to free it
    return serve(config)


def ready(host: str, port: int, timeout: float = 3.0) -> int:
    """``bidder ready``: 0 if ``/readyz`` answers 200; else 1, with one line saying what it answered."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    url = f"http://[{host}]:{port}/readyz" if ":" in host else f"http://{host}:{port}/readyz"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an HTTP_PROXY
    try:
        with direct.open(url, timeout=timeout) as response:
            response.read()
            return 0
    except urllib.error.HTTPError as exc:
        return _fail(f"{url}: {exc.code} {exc.read().decode('utf-8', 'replace')}", 1)
    except (OSError, ValueError) as exc:
        return _fail(f"{url}: {getattr(exc, 'reason', None) or exc}", 1)


def _fail(message: str, status: int = 2) -> int:
    print("error: " + " ".join(message.split()), file=sys.stderr)  # one line, whatever a library put in it
    return status


if __name__ == "__main__":
    sys.exit(main())

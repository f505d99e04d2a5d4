"""``python -m bench exchange``: a simulated day of auctions against one or more OpenRTB bidders.

Errors in the options end with one ``error:`` line and status 2; Ctrl-C (or SIGTERM) stops sending,
drops what is still on its way and writes the partial report (``"partial": true``).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import gc
import json
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench.exchange.faults import Faults
from bench.exchange.notices import is_local
from bench.exchange.report import build_report
from bench.exchange.terms import TermsError, read_terms
from bench.exchange.traffic import Deal, Market, Traffic, hourly_share
from bidder import DEFAULT_BUNDLE
from bidder.clock import Clock, parse_time

__all__ = ["main", "run_exchange"]

DEFAULT_START = "2026-12-01T00:00:00Z"
DEFAULT_CAMPAIGNS = DEFAULT_BUNDLE / "campaigns.json"
DEFAULT_SPEED = 720.0
#: the shipped bundle was trained on ``python -m train synth --rows 1000000 --seed 2013`` (its meta.json)
DEFAULT_WORLD_SEED, DEFAULT_WORLD_ROWS = 2013, 1_000_000
#: how long after the simulator starts its clock starts, when no --anchor is given (the market is built first)
ANCHOR_LEAD_S = 1.0


@dataclasses.dataclass(frozen=True)
class ExchangeConfig:
    bidders: tuple[str, ...]
    campaigns: Path = DEFAULT_CAMPAIGNS
    start: float = parse_time(DEFAULT_START)
    speed: float = DEFAULT_SPEED
    anchor: float | None = None
    hours: float = 24.0
    requests: int | None = None
    rate: float = 1000.0
    connections: int = 32
    seed: int = 0
    world_seed: int = DEFAULT_WORLD_SEED
    world_rows: int = DEFAULT_WORLD_ROWS
    faults: Faults = Faults()

    def describe(self, anchor: float) -> dict[str, Any]:
        return {"seed": self.seed, "bidders": list(self.bidders), "campaigns": str(self.campaigns),
                "start": _iso(self.start), "speed": self.speed, "anchor": anchor, "hours": self.hours,
                "requests": self.requests, "rate": self.rate,
                "connections": self.connections, "world_seed": self.world_seed,
                "world_rows": self.world_rows, "faults": dataclasses.asdict(self.faults)}


def _iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_exchange(config: ExchangeConfig, progress: bool = False, record_sends: bool = False,
                 market: Market | None = None) -> tuple[dict[str, Any], list | None]:
    """Run the day (in a loop of its own) and return the report, and the (request id, simulated time at
    send) pairs when ``record_sends``. ``market`` reuses a market already built (tests)."""
    for url in config.bidders:
        if not is_local(url.replace("{exchange}", "1")) or not url.startswith("http://"):
            raise ValueError(f"--bidder must be an http:// URL on this machine (127.0.0.1, localhost, ::1), got {url!r}")
    terms = read_terms(config.campaigns)
    market = market or Market(config.world_seed, config.world_rows)
    # the market's hundreds of thousands of strings and lists live as long as the run: out of the collector's
    # way, its collections during the run scan only what the run allocates
    gc.collect()
    gc.freeze()
    traffic = Traffic(market, config.seed, config.start, config.hours, config.rate, config.speed, config.requests,
                      len(config.bidders), [Deal(deal, 0.0, seat) for deal, seat in terms.deals])
    hours = max(1, int(-(-config.hours // 1)))
    anchor = config.anchor if config.anchor is not None else time.time() + ANCHOR_LEAD_S
    late = time.time() - anchor
    if late > 1.0:
        raise ValueError(f"--anchor is {late:.1f} s in the past: the simulated day would have begun without its first "
                         f"requests; give a later anchor (the bidder's --clock-anchor must be the same)")
    clock = Clock(start=config.start, speed=config.speed, anchor=anchor)
    return _run_in_new_loop(_run(config, traffic, market, terms, clock, hours, progress, record_sends))


def _run_in_new_loop(coro):
    """``asyncio.run`` on uvloop when it is there (the bidder's loop too): a loop turn costs less."""
    try:
        import uvloop
        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        asyncio.set_event_loop(None)
        loop.close()


async def _run(config, traffic, market, terms, clock, hours, progress, record_sends):
    from bench.exchange.exchange import Exchange

    exchange = Exchange(traffic, market, terms, list(config.bidders), config.faults, clock, hours, config.connections,
                        record_sends)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, exchange.stop)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(traffic), unit="req", desc="exchange", smoothing=0.1)

    def show(sent: int, simulated: float) -> None:
        bar.n = sent
        bar.set_postfix_str(_iso(simulated), refresh=False)
        bar.refresh()

    cpu0 = _cpu_seconds()
    first_due = clock.wall(float(traffic.times[0])) if len(traffic) else time.time()
    try:
        await exchange.run(show if bar is not None else None)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.remove_signal_handler(signum)
            except (NotImplementedError, RuntimeError):
                pass
        if bar is not None:
            bar.n = exchange.sent
            bar.close()
    wall = max(time.time() - first_due, 1e-9)
    cpu = _cpu_seconds() - cpu0
    run = {
        "partial": exchange.stopping, "requests": exchange.sent, "wall_s": round(wall, 3),
        "rate_rps": round(exchange.sent / wall, 1), "cpu_s": round(cpu, 3),
        "rate_per_cpu_s": round(exchange.sent / cpu, 1) if cpu > 0 else None,
        "clock": {"start": _iso(clock.start), "speed": clock.speed, "anchor": clock.anchor,
                  "lag_max_s": round(exchange.lag_max, 3),
                  "lag_mean_s": round(exchange.lag_sum / exchange.sent, 3) if exchange.sent else None},
    }
    report = build_report(config.describe(clock.anchor), [b.stats for b in exchange.bidders],
                          hourly_share(config.start, hours), run)
    return report, exchange.sends


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- the command line ------------------------------------------------------------------------------------
def positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
        return value
    return parse


def _time(text: str) -> float:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench exchange",
        description="A simulated exchange: a day of OpenRTB 2.6 auctions against one or more bidders on this "
                    "machine, on a simulated clock the bidders can share; writes a JSON report and a PNG.")
    p.add_argument("--bidder", action="append", required=True, metavar="URL",
                   help="bid endpoint (repeatable: the bidders compete); {exchange} in the URL becomes the "
                        "request's exchange, e.g. http://127.0.0.1:8080/bid/{exchange}")
    p.add_argument("--campaigns", type=Path, default=DEFAULT_CAMPAIGNS,
                   help="the catalog the bidders serve: value per click, budgets, frequency caps, deals "
                        "(default: %(default)s)")
    p.add_argument("--start", type=_time, default=parse_time(DEFAULT_START), metavar="TIME",
                   help=f"simulated time at the anchor, ISO 8601 or Unix seconds (default: {DEFAULT_START})")
    p.add_argument("--speed", type=positive(float), default=DEFAULT_SPEED, metavar="X",
                   help="simulated seconds per wall-clock second (default: %(default)g, a day in two minutes)")
    p.add_argument("--anchor", type=_time, default=None, metavar="TIME",
                   help="wall-clock time at which the simulated clock reads --start; a bidder sharing the clock "
                        "gets the same value as --clock-anchor (default: one second after the market is built, "
                        "printed with the matching bidder options)")
    p.add_argument("--hours", type=positive(float), default=24.0, help="simulated hours (default: %(default)g)")
    p.add_argument("--requests", type=positive(int), default=None, metavar="N",
                   help="stop after N requests (default: the whole --hours)")
    p.add_argument("--rate", type=positive(float), default=ExchangeConfig.rate, metavar="RPS",
                   help="mean wall-clock requests per second over a day; the hour of day and the weekday shape "
                        "it (peak about 1.45 x) (default: %(default)g)")
    p.add_argument("--connections", type=positive(int), default=ExchangeConfig.connections, metavar="N",
                   help="bid requests in flight per bidder at most; a request finding N in flight is not sent to "
                        "that bidder and counts as throttled, as exchanges throttle a slow bidder (default: "
                        "%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="traffic and fault draws (default: %(default)s)")
    p.add_argument("--world-seed", type=int, default=DEFAULT_WORLD_SEED,
                   help="the synthetic market's seed (default: %(default)s, the shipped bundle's training data)")
    p.add_argument("--world-rows", type=positive(int), default=DEFAULT_WORLD_ROWS,
                   help="the synthetic market's size in rows, which sets its user population (default: %(default)s)")
    d = Faults()
    p.add_argument("--delay", type=_seconds, default=d.delay_s, metavar="S",
                   help="mean notice delay, simulated seconds (default: %(default)g)")
    p.add_argument("--late", type=_fraction, default=d.late, help="fraction of notices 1-10 simulated minutes late "
                                                                  "(default: %(default)g)")
    p.add_argument("--lost", type=_fraction, default=d.lost, help="fraction of notices never sent (default: %(default)g)")
    p.add_argument("--duplicate", type=_fraction, default=d.duplicate,
                   help="fraction of notices sent twice (default: %(default)g)")
    p.add_argument("--unrendered", type=_fraction, default=d.unrendered,
                   help="fraction of wins that never render: no billing notice, no charge (default: %(default)g)")
    p.add_argument("--forged", type=_fraction, default=d.forged,
                   help="fraction of wins followed by a forged notice (default: %(default)g)")
    p.add_argument("--retry-every", type=_seconds, default=d.retry_every_s, metavar="S",
                   help="billing notices not answered 2xx are retried every S simulated seconds ... "
                        "(default: %(default)g)")
    p.add_argument("--retry-for", type=_seconds, default=d.retry_for_s, metavar="S",
                   help="... for S simulated seconds; 0: no retries (default: %(default)g)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON report; the PNG goes beside it (default: runs/exchange-<UTC time>.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        faults = Faults(delay_s=args.delay, late=args.late, lost=args.lost, duplicate=args.duplicate,
                        unrendered=args.unrendered, forged=args.forged, retry_every_s=args.retry_every,
                        retry_for_s=args.retry_for)
    except ValueError as exc:
        return _fail(str(exc))
    config = ExchangeConfig(bidders=tuple(args.bidder), campaigns=args.campaigns, start=args.start, speed=args.speed,
                            anchor=args.anchor, hours=args.hours, requests=args.requests, rate=args.rate,
                            connections=args.connections,
                            seed=args.seed, world_seed=args.world_seed, world_rows=args.world_rows, faults=faults)
    out = args.out or Path("runs") / f"exchange-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}.json"
    if config.anchor is None:
        print(f"simulated clock: {_iso(config.start)} at speed {config.speed:g}; a bidder sharing it needs "
              f"--clock-start {_iso(config.start)} --clock-speed {config.speed:g} --clock-anchor TIME with the "
              f"--anchor TIME given here (without one, the clock starts when the market is built)", file=sys.stderr)
    try:
        report, _ = run_exchange(config, progress=not args.no_progress)
    except (TermsError, ValueError) as exc:
        return _fail(str(exc))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    try:
        from bench.exchange.plot import plot_report
        png = plot_report(report, out.with_suffix(".png"))
    except ImportError as exc:  # a runtime-only install: the report is written, the picture cannot be
        png = f"none ({exc.name} is not installed: pip install 'bidder[bench]')"
    print(summary(report, out, png))
    return 130 if report["partial"] else 0


def summary(report: dict[str, Any], out: Path, png: Path | str) -> str:
    lines = [f"{'partial ' if report['partial'] else ''}report: {out}  plot: {png}",
             f"{report['requests']:,} requests in {report['wall_s']:.1f} s: {report['rate_rps']:,.0f} requests/s "
             f"({report['rate_per_cpu_s'] or 0:,.0f} per CPU second); clock lag max "
             f"{report['clock']['lag_max_s']:.2f} simulated s"]
    for url, b in report["bidders"].items():
        n = b["notices"]
        lines.append(f"{url}: {b['bids']:,} bids, {b['wins']:,} wins, {b['bills']:,} bills, spend {b['spend']:.2f}, "
                     f"value {b['value']:.2f}, surplus {b['surplus']:.2f}, {b['clicks']} clicks, "
                     f"{b['timeouts']} timeouts; notices sent {n['sent']}, answered {n['answered']}, "
                     f"refused {n['refused']}, unreachable {n['unreachable']}, forged {n['forged_sent']} "
                     f"({n['forged_refused']} refused), replayed {n['replays_sent']} ({n['replays_answered']} "
                     f"answered as repeats)")
        latency = b["notice_latency_ms"]
        if latency["answered"]:
            lines.append(f"  notice latency P50 {latency['p50']:.3f} ms, P99 {latency['p99']:.3f} ms over "
                         f"{latency['answered']:,} answered ({latency['answered'] / report['wall_s']:,.0f}/s)")
    return "\n".join(lines)


def _fail(message: str) -> int:
    print("error: " + " ".join(message.split()), file=sys.stderr)
    return 2

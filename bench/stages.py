"""What this round's stages cost in process: the bid path with notices, the event log, budgets and frequency caps
all on against all off, taking turns in one process, the background threads included.

    python -m bench stages [--stages notices,events,budgets] [--seconds S] [--batch N] [--window S] --out FILE.json

Two engines are built as ``bidder serve`` builds them: a plain one, and one with ``--stages`` on (all three by
default): signed notices, the event log (its writer thread running), and a daily budget and a frequency cap on every
campaign (``bench load``'s ``bidder-all`` terms) with the worker's ledger on the embedded banker (its refresher
thread calling the banker as often as ``--ledger-refresh``'s default). Each takes blocks of 100 batches of
``--batch`` requests in turn (the IAB simple banner, every request a new id: a new bid for the banker), for
``--seconds`` each; a block is timed in CPU time of this thread
(``time.thread_time``: what the scheduler gives to other processes is not counted), the refresher's and the
writer's CPU time by their own clocks over the whole run. ``--window`` sets the bids' notice window, so that their
reservations expire (and are released by the banker) within the run; no notice comes.

The figures: per request, the bid path's CPU with the stages off and on (medians over the blocks), the background
threads' CPU per bid, their sum (what the stages add to a request's CPU), and where the bid path's part goes
(``budget``, signing the notice URLs, the bid's event, encoding the larger answer: the stages timed one by one in a
second pass, whose timers add a little of their own). ``implied_rps_ratio`` is what that extra CPU would make of
requests/s over HTTP on one core, against the bidder's CPU per request of the newest ``bench load`` result at 32
connections (``bench/results/load-*.json``): the figure ``bench load``'s ``bidder-all/bidder`` measures, without its
noise. A PNG of the breakdown goes beside the JSON.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import bidder
from bench.load import DEFAULT_BODY, REPO, money_catalog
from bench.machine import machine_info
from bidder.app import Config, State
from bidder.engine import BidEngine
from bidder.events import EventLog
from bidder.metrics import Metrics
from bidder.notices import Keyring, NoticeSettings
from bidder.scorer import BundleError

BLOCK = 100  # batches per timed block
#: what the breakdown pass times one by one: its name in the figures -> (the engine's, or its event log's,
#: method, the stage it belongs to); ``log_bid`` is ``EventLog.bids``, one call per batch for all its bids
STAGES = {"budget": ("engine", "budget", "budgets"), "sign": ("engine", "_sign", "notices"),
          "log_bid": ("events", "bids", "events")}
RESULTS = REPO / "bench" / "results"


#: the stages ``--stages`` can turn on; budgets (with frequency caps) need notices, as ``bidder serve`` does
STAGE_NAMES = ("notices", "events", "budgets")


def build(stages: frozenset[str], bundle: Path, window: int, work: Path) -> tuple[State, BidEngine]:
    """An engine as ``bidder serve`` builds it with ``stages`` on (their threads started)."""
    notices = None
    if "notices" in stages:
        notices = NoticeSettings(url="http://127.0.0.1:8080", keyring=Keyring.generate(), state_dir=work / "state",
                                 window_s=window)
    events = work / "events" if "events" in stages else None
    state = State(Config(notices=notices, events=events), Metrics())
    if events is not None:
        state.events = EventLog(events, 0).start()
    catalog = bundle / "campaigns.json"
    engine = state.load(bundle, money_catalog(catalog) if "budgets" in stages else catalog)  # the ledger started
    return state, engine


class Requests:
    """The simple-banner request, each time with a new id."""

    def __init__(self, body: bytes, count: int):
        request = json.loads(body)
        request["id"] = "ID" * 16
        template = json.dumps(request).encode()
        self.bodies = [template.replace(b"ID" * 16, f"{i:032x}".encode()) for i in range(count)]
        self.next = 0

    def take(self, n: int) -> list[bytes]:
        start = self.next
        self.next = (start + n) % (len(self.bodies) - n)
        return self.bodies[start:start + n]


def block(engine: BidEngine, requests: Requests, batch: int) -> float:
    """µs of this thread's CPU per request over ``BLOCK`` batches."""
    start = time.thread_time()
    for _ in range(BLOCK):
        pendings = [engine.prepare(body, None, time.perf_counter()) for body in requests.take(batch)]
        for outcome in engine.score_batch(pendings):
            if getattr(outcome, "status", None) != 200:
                raise RuntimeError(f"the benchmark request was not bid on: {outcome!r}")
    return (time.thread_time() - start) / (BLOCK * batch) * 1e6


def timed(owner: Any, method_name: str, name: str, spent: dict[str, int]) -> None:
    """Wrap ``owner``'s method ``method_name`` so that its calls add their CPU time (ns) to ``spent[name]``."""
    method = getattr(owner, method_name)

    def wrapper(*args, **kwargs):
        start = time.thread_time_ns()
        try:
            return method(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0) + time.thread_time_ns() - start

    setattr(owner, method_name, wrapper)


def http_cpu_us(results: Path = RESULTS) -> tuple[float, str] | None:
    """The bidder's CPU µs per request at 32 connections in the newest ``load-*.json`` of ``results`` (and its
    name), None without one."""
    for path in sorted(results.glob("load-*.json"), reverse=True):
        runs = [r for r in json.loads(path.read_text()).get("runs", [])
                if r.get("server") == "bidder" and r.get("connections") == 32 and r.get("cpu_us_per_request")]
        if runs:
            return statistics.median(r["cpu_us_per_request"] for r in runs), path.name
    return None


def measure(bundle: Path, seconds: float, batch: int, window: int, stages: frozenset[str],
            progress: Callable[[str], None]) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-stages-"))
    requests = Requests(DEFAULT_BODY.read_bytes(), 400_000)
    _, plain = build(frozenset(), bundle, window, work / "plain")
    state, all_on = build(stages, bundle, window, work)
    threads = [t for t in (state.ledger and state.ledger._thread, state.events and state.events._thread) if t]
    clocks = {t.name: time.pthread_getcpuclockid(t.ident) for t in threads}
    try:
        for _ in range(5):  # warm: ORT's shapes, caches, the first leases
            block(plain, requests, batch)
            block(all_on, requests, batch)
        samples: dict[str, list[float]] = {"plain": [], "all": []}
        background = {name: time.clock_gettime(clock) for name, clock in clocks.items()}
        bids, end = 0, time.monotonic() + 2 * seconds
        while time.monotonic() < end:
            samples["plain"].append(block(plain, requests, batch))
            samples["all"].append(block(all_on, requests, batch))
            bids += BLOCK * batch
            progress(f"{len(samples['plain'])} blocks each")
        time.sleep(1.0)  # the refresher's and the writer's last turns over this run's bids
        background = {name: (time.clock_gettime(clocks[name]) - before) / bids * 1e6
                      for name, before in background.items()}
        spent: dict[str, int] = {}
        timers = [name for name, (_, _, stage) in STAGES.items() if stage in stages]
        owners = {"engine": all_on, "events": all_on.events}
        for name in timers:
            owner, method, _ = STAGES[name]
            timed(owners[owner], method, name, spent)
        timed_requests, end = 0, time.monotonic() + seconds / 2
        while time.monotonic() < end:
            block(all_on, requests, batch)
            timed_requests += BLOCK * batch
    finally:
        if state.ledger is not None:
            state.ledger.close()
        if state.events is not None:
            state.events.close()
    us = {name: round(statistics.median(values), 2) for name, values in samples.items()}
    bid_path = round(us["all"] - us["plain"], 2)
    extra = round(bid_path + sum(background.values()), 2)
    result = {
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "bundle": str(bundle), "request": str(DEFAULT_BODY.relative_to(REPO)), "batch": batch, "window_s": window,
        "stages": sorted(stages), "blocks": len(samples["plain"]), "clock": "thread CPU time",
        "us_per_request": us,
        "background_us_per_bid": {name: round(v, 2) for name, v in background.items()},
        "bid_path_extra_us": bid_path,
        "extra_us_per_request": extra,
        "stages_us_per_request": {name: round(spent.get(name, 0) / timed_requests / 1000, 2)
                                  for name in timers},
    }
    http = http_cpu_us()
    if http is not None:
        result["implied_rps_ratio"] = {"bidder_cpu_us_per_request": round(http[0], 1), "from": http[1],
                                       "all_over_plain": round(http[0] / (http[0] + extra), 3)}
    return result


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = dict(result["stages_us_per_request"])
    parts["other (bid path)"] = max(0.0, result["bid_path_extra_us"] - sum(parts.values()))
    parts.update({f"{name} thread": v for name, v in result["background_us_per_bid"].items()})
    fig, ax = plt.subplots(figsize=(7, 3.6))
    left = 0.0
    for name, value in parts.items():
        ax.barh(["on"], [value], left=left, label=f"{name} {value:.1f}")
        left += value
    ax.set_xlabel(f"µs of CPU per request added to the plain {result['us_per_request']['plain']:.1f} (median)")
    ax.set_title(f"{' + '.join(result['stages'])} in process: +{result['extra_us_per_request']:.1f} µs per request")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench stages", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=bidder.DEFAULT_BUNDLE, help="bundle (default: the shipped one)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of blocks per engine (default 20)")
    parser.add_argument("--batch", type=int, default=12,
                        help="requests per batch (default 12: what bench load's bidder batches at 32 connections)")
    parser.add_argument("--window", type=int, default=2,
                        help="the bids' notice window in seconds: their reservations expire within the run (default 2)")
    parser.add_argument("--stages", default=",".join(STAGE_NAMES),
                        help=f"the stages on, comma-separated, of {', '.join(STAGE_NAMES)} (default: all; budgets "
                             f"need notices)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write; the PNG goes beside it")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.batch < 1 or args.window < 1:
        print("error: --seconds must be > 0, --batch and --window >= 1", file=sys.stderr)
        return 2
    stages = frozenset(name.strip() for name in args.stages.split(",") if name.strip())
    if not stages or stages - set(STAGE_NAMES) or ("budgets" in stages and "notices" not in stages):
        print(f"error: --stages {args.stages}: expected some of {', '.join(STAGE_NAMES)} (budgets with notices)",
              file=sys.stderr)
        return 2
    if args.out.is_dir() or not args.out.parent.is_dir():
        print(f"error: --out {args.out}: expected a JSON file name in an existing folder", file=sys.stderr)
        return 2
    from tqdm import tqdm

    with tqdm(total=None, desc="stages", unit="", bar_format="{desc}: {postfix}", disable=None) as bar:
        try:
            result = measure(args.bundle, args.seconds, args.batch, args.window, stages, bar.set_postfix_str)
        except BundleError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    result["command"] = "python -m bench stages " + " ".join(argv if argv is not None else sys.argv[1:])
    result["machine"] = machine_info(REPO, "not used")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    png = plot(result, args.out.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("us_per_request", "background_us_per_bid", "extra_us_per_request",
                                              "stages_us_per_request", "implied_rps_ratio") if k in result},
                     indent=2))
    print(f"{args.out}\n{png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

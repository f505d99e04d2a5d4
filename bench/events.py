"""`python -m bench events`: what the event log (`bidder serve --events DIR`) costs a bid and loses to a `kill -9`.

    python -m bench events [--model DIR] [--kills N] [--seconds S] [--out FILE.json]

In process: the cost of one `EventLog.bid`, `notice` and `click` call (the queue append the bid path pays), best of
three runs of a million calls, with no writer draining meanwhile. Then `--kills` times: `bidder serve --events`
in a child process, one client posting the IAB simple-banner request (floor 0.01) one after another for
`--seconds` (plus a random fraction of a second, so the kill lands anywhere in the writer's flush interval),
`kill -9`, the salvage a restart does (`EventLog.salvage`), and which answered bids are missing from the log: how
many, and how long before the kill the oldest of them was answered (the log promises at most a second).
"""
from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import time
import timeit
import urllib.request
from pathlib import Path
from typing import Any

from bench.load import DEFAULT_BODY, REPO, child_environment
from bench.machine import machine_info
from bench.servers import BenchError, free_port, running
from bidder import DEFAULT_BUNDLE
from bidder.events import FINAL_PREFIX, SUFFIX, EventLog, read_lines

CALLS = 1_000_000


def enqueue_costs() -> dict[str, float]:
    """Nanoseconds per event of each kind, queue append included: one call per event, and ``bids_of_12`` the bids of
    a batch of 12 in one call (``EventLog.bids``, as the engine logs them)."""
    record, layer = {"weekday": 3, "hour": 14}, {"creative": "c", "advertiser": 1458}
    bid = ("r-1", record, layer, "c1458", "c", "m", 0.001, 1.2, 1.1, 0.92, 0.2, 1, "2", "u")
    batch = [bid] * 12
    calls = {"bid": (lambda events: lambda: events.bid(*bid), 1),
             "bids_of_12": (lambda events: lambda: events.bids(batch), len(batch)),
             "notice": (lambda events: lambda: events.notice("win", "r-1", price=1.0), 1),
             "click": (lambda events: lambda: events.click("r-1"), 1)}
    out = {}
    for kind, (make, per_call) in calls.items():
        number = CALLS // per_call
        events = EventLog(tempfile.gettempdir(), queue_size=4 * number * per_call)  # a log per kind: never full
        out[kind] = round(min(timeit.repeat(make(events), number=number, repeat=3)) / (number * per_call) * 1e9, 1)
    return out


def kill_loss(model: Path, seconds: float, body: bytes) -> dict[str, Any]:
    """One kill: answered bids, logged bids, the lost ones and the age at the kill of the oldest lost one."""
    directory = Path(tempfile.mkdtemp(prefix="bench-events-")) / "events"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "bidder", "serve", "--model", str(model), "--events", str(directory),
               "--port", str(port), "--no-pin"]
    answered: list[tuple[float, str]] = []
    with running("bidder", command, url, ready_path="/readyz", startup_timeout_s=120) as server:
        end = time.monotonic() + seconds + random.random()
        request = json.loads(body)
        for imp in request["imp"]:  # a low floor: the example bids whatever the hour
            imp["bidfloor"] = 0.01
        while time.monotonic() < end:
            request["id"] = f"kill-{len(answered)}"
            post = urllib.request.Request(url + "/bid", data=json.dumps(request).encode(), method="POST")
            with urllib.request.urlopen(post, timeout=10) as response:
                if response.status == 200:
                    bid = json.loads(response.read())["seatbid"][0]["bid"][0]["id"]
                    answered.append((time.time(), bid))
        killed = time.time()
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
    if not answered:
        raise BenchError("the bidder answered no bid: nothing to measure")
    EventLog(directory).salvage()
    logged = set()
    for path in directory.glob(f"{FINAL_PREFIX}*{SUFFIX}"):
        logged.update(json.loads(line)["bid_id"] for line in read_lines(path))
    lost = [at for at, bid in answered if bid not in logged]
    return {"answered": len(answered), "logged": len(logged), "lost": len(lost),
            "oldest_lost_s_before_kill": round(killed - min(lost), 3) if lost else 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench events", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_BUNDLE, help="bundle to serve (default: the bundled)")
    parser.add_argument("--kills", type=int, default=5, help="kill -9 runs (default 5)")
    parser.add_argument("--seconds", type=float, default=3.0, help="bidding before each kill (default 3 s)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report to this JSON file")
    args = parser.parse_args(argv)
    if args.kills < 0 or not args.seconds > 0:
        parser.error("--kills must be 0 or more and --seconds positive")
    child_environment()
    body = Path(DEFAULT_BODY).read_bytes()
    try:
        kills = [kill_loss(args.model, args.seconds, body) for _ in range(args.kills)]
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report = {"machine": machine_info(REPO, "not used"), "enqueue_ns": enqueue_costs(), "kills": kills,
              "worst_oldest_lost_s": max((k["oldest_lost_s_before_kill"] for k in kills), default=None)}
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m bench reload`: what a catalog reload does to the requests served meanwhile.

    python -m bench reload --model DIR --campaigns FILE [--retrieve-k K] [--to FILE] --out FILE.json

The bidder runs pinned (core 0 by default) as `bidder serve` runs it; this process, on another core, keeps
`--connections` request loops posting the OpenRTB body one request after another, and `--at` seconds in
posts `/admin/reload` (to `--to`, by default the same catalog again). Every request's start, latency and
status is kept; the report gives per phase (before, during and after the reload) the count, P50, P99 and
maximum latency and the failures (non-2xx, timeouts, connection errors), the longest time no response
came back, and the reload's own time and answer. The PNG plots every request's latency over time with the
reload shaded. A reload must fail no request; how long it holds them up is what this measures.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.load import DEFAULT_BODY, REPO, child_environment
from bench.machine import machine_info
from bench.servers import BenchError, free_port, pinned, running
from bidder import DEFAULT_BUNDLE
from bidder.app import DEFAULT_CAMPAIGNS

PHASES = ("before", "during", "after")


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _drive(url: str, body: bytes, connections: int, duration_s: float, at_s: float, target: Path,
                 timeout_s: float) -> dict[str, Any]:
    import aiohttp

    records: list[tuple[float, float, str]] = []  # (start s, latency s, status or error kind)
    reload_info: dict[str, Any] = {}
    started = time.perf_counter()
    end = started + duration_s
    limit = aiohttp.ClientTimeout(total=timeout_s)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections + 1)) as session:
        async def loop() -> None:
            while time.perf_counter() < end:
                t = time.perf_counter()
                try:
                    async with session.post(url + "/bid", data=body, timeout=limit) as response:
                        await response.read()
                        outcome = str(response.status)
                except asyncio.TimeoutError:
                    outcome = "timeout"
                except aiohttp.ClientError as exc:
                    outcome = type(exc).__name__
                records.append((t - started, time.perf_counter() - t, outcome))

        async def reload() -> None:
            await asyncio.sleep(at_s)
            t = time.perf_counter()
            async with session.post(url + "/admin/reload", json={"campaigns": str(target)},
                                    timeout=aiohttp.ClientTimeout(total=600)) as response:
                text = await response.text()
                reload_info.update(status=response.status, answer=text[:300], start_s=round(t - started, 4),
                                   seconds=round(time.perf_counter() - t, 4))

        await asyncio.gather(reload(), *(loop() for _ in range(connections)))
    return {"records": records, "reload": reload_info}


def summarise(records: list[tuple[float, float, str]], reload_info: dict[str, Any]) -> dict[str, Any]:
    """Per phase (by each request's start) count, latency percentiles and failures; the longest silence."""
    start = reload_info["start_s"]
    stop = start + reload_info["seconds"]
    phases: dict[str, Any] = {}
    for phase in PHASES:
        chosen = [(t, lat, status) for t, lat, status in records
                  if (phase == "before" and t < start) or (phase == "during" and start <= t < stop)
                  or (phase == "after" and t >= stop)]
        ok = [lat * 1000.0 for _, lat, status in chosen if status.startswith("2")]
        failed: dict[str, int] = {}
        for _, _, status in chosen:
            if not status.startswith("2"):
                failed[status] = failed.get(status, 0) + 1
        phases[phase] = {"requests": len(chosen), "failed": failed,
                         "p50_ms": _round(_percentile(ok, 0.5)), "p99_ms": _round(_percentile(ok, 0.99)),
                         "max_ms": _round(max(ok) if ok else None),
                         "over_20ms": sum(v > 20.0 for v in ok), "over_100ms": sum(v > 100.0 for v in ok)}
    done = sorted(t + lat for t, lat, _ in records)
    silence = max((b - a for a, b in zip(done, done[1:])), default=0.0)
    return {"phases": phases, "failed_requests": sum(sum(p["failed"].values()) for p in phases.values()),
            "longest_silence_ms": round(silence * 1000.0, 3)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def plot(records: list[tuple[float, float, str]], reload_info: dict[str, Any], title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    ok = [(t, lat * 1000.0) for t, lat, status in records if status.startswith("2")]
    bad = [(t, lat * 1000.0) for t, lat, status in records if not status.startswith("2")]
    if ok:
        ax.scatter(*zip(*ok), s=2, alpha=0.5, label="answered")
    if bad:
        ax.scatter(*zip(*bad), s=12, color="red", marker="x", label="failed")
    start = reload_info["start_s"]
    ax.axvspan(start, start + reload_info["seconds"], color="orange", alpha=0.2,
               label=f"reload ({reload_info['seconds']:.2f} s)")
    ax.set_yscale("log")
    ax.set_xlabel("seconds since the first request")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench reload", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_BUNDLE, help="bundle (default: the shipped one)")
    parser.add_argument("--campaigns", type=Path, default=None, help="catalog served first (default: campaigns.json beside the bundle, else the "
                             "default catalog)")
    parser.add_argument("--to", type=Path, default=None, help="catalog to reload to (default: --campaigns again)")
    parser.add_argument("--retrieve-k", type=int, default=None, metavar="K", help="passed to the bidder")
    parser.add_argument("--body", type=Path, default=DEFAULT_BODY, help="OpenRTB request to post")
    parser.add_argument("--connections", type=int, default=1, help="request loops (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of requests (default: %(default)s)")
    parser.add_argument("--at", type=float, default=3.0, help="seconds in when the reload is posted")
    parser.add_argument("--timeout", type=float, default=2.0, help="a request's timeout in seconds (a failure)")
    parser.add_argument("--server-cpus", default="0", help="taskset CPU list for the bidder (default: %(default)s)")
    parser.add_argument("--client-cpus", default="1", help="CPUs of this process's request loops")
    parser.add_argument("--no-pin", action="store_true", help="pin neither the bidder nor the request loops")
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for /readyz")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write; the PNG goes beside it")
    args = parser.parse_args(argv)
    problems = [f"--{name} must be positive, got {value}" for name, value in
                (("connections", args.connections), ("duration", args.duration), ("timeout", args.timeout))
                if not value > 0]
    if not 0 <= args.at < args.duration:
        problems.append(f"--at must be within the run (0 <= at < duration), got {args.at}")
    if args.out.is_dir() or not args.out.parent.is_dir():
        problems.append(f"--out {args.out}: expected a JSON file name in an existing folder")
    for name in ("campaigns", "to"):
        value = getattr(args, name)
        if value is not None and not value.is_file():
            problems.append(f"--{name} {value}: no such file")
    if problems:
        print(f"error: {problems[0]}", file=sys.stderr)
        return 2
    beside = args.model / "campaigns.json"
    campaigns = (args.campaigns or (beside if beside.is_file() else DEFAULT_CAMPAIGNS)).resolve()
    target = (args.to or campaigns).resolve()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "bidder", "serve", "--model", str(args.model.resolve()), "--campaigns",
               str(campaigns), "--port", str(port)]
    if args.retrieve_k is not None:
        command += ["--retrieve-k", str(args.retrieve_k)]
    child_environment()
    try:
        with running("bidder", pinned(command, None if args.no_pin else args.server_cpus), base, ready_path="/readyz",
                     startup_timeout_s=args.startup_timeout, port=port):
            if not args.no_pin:
                os.sched_setaffinity(0, {int(c) for c in args.client_cpus.split(",")})
            run = asyncio.run(_drive(base, args.body.read_bytes(), args.connections, args.duration, args.at, target,
                                     args.timeout))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not run["reload"]:
        print("error: the reload did not finish within the run: raise --duration", file=sys.stderr)
        return 1
    result = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "config": {"model": str(args.model), "campaigns": str(campaigns), "to": str(target),
                         "retrieve_k": args.retrieve_k, "connections": args.connections, "duration_s": args.duration,
                         "at_s": args.at, "timeout_s": args.timeout,
                         "server_cpus": None if args.no_pin else args.server_cpus,
                         "client_cpus": None if args.no_pin else args.client_cpus},
              "machine": machine_info(REPO, "not used"), "reload": run["reload"],
              **summarise(run["records"], run["reload"])}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    png = plot(run["records"], run["reload"], f"requests while {target.name} reloads ({args.connections} loop(s))",
               args.out.with_suffix(".png"))
    print(json.dumps({"json": str(args.out), "png": str(png), "reload": run["reload"],
                      "failed_requests": result["failed_requests"], "longest_silence_ms": result["longest_silence_ms"],
                      "phases": result["phases"]}, indent=2))
    return 0 if run["reload"].get("status") == 200 else 1

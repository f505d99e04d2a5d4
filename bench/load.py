"""`python -m bench load`: the bidder against the framework ceiling, under wrk, from one run.

Both servers run on the same core (`taskset -c 0` by default) and wrk on another (`-c 1`), each
scenario warmed up and then measured, echo and bidder alternating so that drift in a shared machine's
load hits both alike.  Before anything is measured the bidder must answer 200 with a bid to the body:
a 204 would mean the benchmark times the no-bid path.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import servers
from bench.machine import machine_info, model_id
from bench.plot import plot_latency
from bench.report import Measurement, build_report, format_scaling, format_table, write_json
from bench.servers import BenchError
from bench.wrk_driver import run_wrk, wrk_path, wrk_version
from bidder import DEFAULT_BUNDLE, OPENRTB_EXAMPLES

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BODY = OPENRTB_EXAMPLES / "bid-request-2.5" / "simple-banner.json"
DEFAULT_MODEL = DEFAULT_BUNDLE
DEFAULT_RESULTS = REPO / "bench" / "results"
SERVERS = ("echo", "bidder")


@dataclass(frozen=True)
class LoadConfig:
    body: Path = DEFAULT_BODY
    model: Path = DEFAULT_MODEL
    campaigns: Path | None = None          # None: the catalog beside the bundle, if there is one
    route: str = "/bid"
    host: str = "127.0.0.1"
    duration_s: float = 10.0
    warmup_s: float = 2.0
    connections: tuple[int, ...] = (1, 8, 32)
    scaling_workers: int | None = None
    max_batch: int | None = None
    server_cpus: str | None = "0"          # None: no pinning
    client_cpus: str | None = "1"
    servers: tuple[str, ...] = SERVERS
    startup_timeout_s: float = 60.0
    wrk_timeout_s: float = 2.0
    allow_no_bid: bool = False
    out_dir: Path = DEFAULT_RESULTS
    notes: list[str] = field(default_factory=list)

    @property
    def campaigns_file(self) -> Path | None:
        if self.campaigns is not None:
            return self.campaigns
        beside = self.model / "campaigns.json"
        return beside if beside.is_file() else None

    def to_dict(self) -> dict:
        out = {key: (str(value) if isinstance(value, Path) else value) for key, value in asdict(self).items()}
        out["campaigns"] = str(self.campaigns_file) if self.campaigns_file else None
        out.pop("notes")
        return out


def parse_cpus(spec: str) -> set[int]:
    """CPU ids of a taskset-style list such as "0", "0,2" or "0-3"."""
    cpus: set[int] = set()
    try:
        for part in spec.split(","):
            low, _, high = part.strip().partition("-")
            cpus.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise BenchError(f"not a CPU list: {spec!r} (expected e.g. 0 or 0,1 or 0-3)") from None
    return cpus


def check_prerequisites(config: LoadConfig) -> None:
    wrk_path()
    if not config.body.is_file():
        raise BenchError(f"request body not found: {config.body} (pass --body FILE)")
    try:
        json.loads(config.body.read_bytes())
    except ValueError as exc:
        raise BenchError(f"request body {config.body} is not valid JSON: {exc}") from None
    unknown = set(config.servers) - set(SERVERS)
    if unknown or not config.servers:
        raise BenchError(f"unknown server(s) {sorted(unknown)}; choose from {', '.join(SERVERS)}")
    if "bidder" in config.servers and not config.model.is_dir():
        raise BenchError(f"model bundle not found: {config.model} (pass --model BUNDLE)")
    if config.server_cpus is not None or config.client_cpus is not None:
        if shutil.which("taskset") is None:
            raise BenchError("taskset not found: apt-get install -y util-linux (or pass --no-pin)")
        usable = os.sched_getaffinity(0)
        for spec in (config.server_cpus, config.client_cpus):
            if spec is not None and not parse_cpus(spec) <= usable:
                raise BenchError(f"CPU list {spec!r} is not within the usable CPUs {sorted(usable)}")


def server_command(name: str, config: LoadConfig, port: int, workers: int) -> list[str]:
    if name == "echo":
        return [sys.executable, "-m", "bench.echo", "--host", config.host, "--port", str(port),
                "--workers", str(workers)]
    command = [sys.executable, "-m", "bidder", "serve", "--model", str(config.model), "--host", config.host,
               "--port", str(port), "--workers", str(workers)]
    if config.campaigns_file is not None:
        command += ["--campaigns", str(config.campaigns_file)]
    if config.max_batch is not None:
        command += ["--max-batch", str(config.max_batch)]
    return command


def child_environment() -> None:
    """Make `python -m bidder` / `-m bench.echo` resolve to this checkout even when it is not installed."""
    paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))


def preflight(name: str, url: str, body: bytes, allow_no_bid: bool) -> dict:
    """POST the body once; the bidder must bid (200 with a seatbid), or the run measures the wrong path."""
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        raise BenchError(f"{name}: POST {url} failed: {exc}") from None
    check = {"status": status, "response_bytes": len(payload)}
    if status == 204 and name == "bidder":
        if not allow_no_bid:
            raise BenchError(f"bidder answered 204 (no bid) to the request body, so the run would time the "
                             f"no-bid path, not the bid path; use a body it bids on, or --allow-no-bid "
                             f"to measure it anyway ({url})")
        return check
    if status != 200:
        raise BenchError(f"{name}: POST {url} answered {status}, expected 200: {payload[:300]!r}")
    if name == "bidder":
        try:
            seatbids = json.loads(payload).get("seatbid") or []
        except (ValueError, AttributeError):
            raise BenchError(f"bidder answered 200 with a body that is not a JSON object: {payload[:300]!r}") from None
        bids = [bid for seat in seatbids for bid in seat.get("bid", [])]
        if not bids and not allow_no_bid:
            raise BenchError(f"bidder answered 200 without any bid: {payload[:300]!r}")
        check.update(bids=len(bids), prices=[bid.get("price") for bid in bids])
    return check


def measure(name: str, url: str, config: LoadConfig, *, workers: int, connections: int, threads: int,
            server_cpus: str | None, client_cpus: str | None) -> Measurement:
    common = dict(connections=connections, threads=threads, timeout_s=config.wrk_timeout_s, cpus=client_cpus)
    if config.warmup_s > 0:
        run_wrk(url, config.body, duration_s=config.warmup_s, **common)
    result = run_wrk(url, config.body, duration_s=config.duration_s, **common)
    m = Measurement(name, workers, connections, threads, server_cpus, client_cpus, result)
    trouble = f", {result.socket_errors} socket errors" if result.socket_errors else ""
    trouble += f", {result.non_2xx} non-2xx" if result.non_2xx else ""
    print(f"  {name:6} workers={workers} c={connections:<3} {result.rps:10,.0f} rps  "
          f"P50 {result.percentile_us(50) / 1000:.3f} ms  P99 {result.percentile_us(99) / 1000:.3f} ms{trouble}",
          file=sys.stderr, flush=True)
    return m


def run_phase(config: LoadConfig, *, workers: int, connections: tuple[int, ...], threads: int,
              server_cpus: str | None, client_cpus: str | None, preflights: dict) -> list[Measurement]:
    """Start every server with `workers` workers, check them, and measure each concurrency level."""
    body = config.body.read_bytes()
    measurements = []
    with contextlib.ExitStack() as stack:
        urls, started = {}, {}
        for name in config.servers:
            port = servers.free_port(config.host)
            base = f"http://{config.host}:{port}"
            command = servers.pinned(server_command(name, config, port, workers), server_cpus)
            print(f"starting {name} ({workers} worker{'s' if workers > 1 else ''}) on {base}"
                  + (f", cpus {server_cpus}" if server_cpus else ""), file=sys.stderr, flush=True)
            started[name] = stack.enter_context(servers.running(
                name, command, base, ready_path="/readyz", port=port, workers=workers,
                startup_timeout_s=config.startup_timeout_s))
            urls[name] = base + config.route
            preflights[f"{name}/workers={workers}"] = preflight(name, urls[name], body, config.allow_no_bid)
        for c in connections:
            for name in config.servers:
                measurements.append(measure(name, urls[name], config, workers=workers, connections=c,
                                            threads=threads, server_cpus=server_cpus, client_cpus=client_cpus))
                # A server that died under load leaves wrk counting connect errors, not a crash.
                if started[name].process.poll() is not None:
                    raise started[name].failure(f"exited with status {started[name].process.returncode} "
                                                f"during the c={c} run")
    return measurements


def scaling_cpus(workers: int, usable: list[int]) -> tuple[str, str, str | None]:
    """Server and client CPU lists for an N-worker run, and a note when wrk has to share cores."""
    server = sorted({usable[i % len(usable)] for i in range(workers)})
    client = [cpu for cpu in usable if cpu not in server]
    note = None
    if not client:
        client = list(usable)
        note = (f"scaling run: {workers} workers on {len(usable)} usable CPUs leave none for wrk, "
                f"so wrk shares the servers' cores and its figures understate what the workers can do")
    return ",".join(map(str, server)), ",".join(map(str, client)), note


def run_load(config: LoadConfig) -> tuple[dict, Path, Path]:
    """Measure, then write the JSON report and the plot; returns (report, json path, png path)."""
    check_prerequisites(config)
    child_environment()
    # Taken before our own servers and wrk add to it: what else was running on the machine.
    load_before = os.getloadavg()
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    stamp = created.replace("-", "").replace(":", "")
    notes = list(config.notes)
    if load_before[0] > 0.5:
        notes.append(f"load average {load_before[0]:.2f} before the run: other work (or a recent run) was "
                     f"using the CPUs, so the figures are noisy")
    preflights: dict = {}
    measurements = run_phase(config, workers=1, connections=config.connections, threads=1,
                             server_cpus=config.server_cpus, client_cpus=config.client_cpus, preflights=preflights)
    if config.scaling_workers and config.scaling_workers > 1:
        n = config.scaling_workers
        if config.server_cpus is not None or config.client_cpus is not None:
            server_cpus, client_cpus, note = scaling_cpus(n, sorted(os.sched_getaffinity(0)))
            threads = len(parse_cpus(client_cpus))
        else:
            server_cpus, client_cpus, note = None, None, None
            threads = os.cpu_count() or 1
        notes += [note] if note else []
        measurements += run_phase(config, workers=n, connections=(max(config.connections) * n,),
                                  threads=min(threads, n), server_cpus=server_cpus, client_cpus=client_cpus,
                                  preflights=preflights)
    machine = machine_info(REPO, wrk_version())
    machine["loadavg_before"] = list(load_before)
    machine["model_id"] = model_id(config.model)
    report = build_report(measurements, created=created, machine=machine, config=config.to_dict(),
                          preflight=preflights, notes=notes)
    report["table"] = format_table(measurements)
    json_path = write_json(report, config.out_dir / f"load-{stamp}.json")
    title = (f"{config.body.name}: bidder vs echo ceiling, {config.duration_s:g} s per point, {created}\n"
             f"{machine['cpu_model']}, {machine['nproc']} CPUs, Python {machine['python']}, {machine['wrk']}")
    png_path = plot_latency(measurements, config.out_dir / f"load-{stamp}.png", title)
    return report, json_path, png_path


def summary(report: dict, json_path: Path, png_path: Path) -> str:
    lines = [report["table"]]
    lines += [format_scaling(report["scaling"])] if report["scaling"] else []
    lines += [f"note: {note}" for note in report["notes"]]
    lines += [f"results: {json_path}", f"plot:    {png_path}"]
    return "\n".join(lines)

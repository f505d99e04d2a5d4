"""`python -m bench load`: the bidder against the framework ceiling, under wrk, from one run.

Every server runs on the same core (`taskset -c 0` by default) and wrk on another (`-c 1`), each
scenario warmed up and then measured, the servers alternating so that drift in a shared machine's
load hits all alike; `--repeat N` runs the whole alternating sequence N times.  The servers: `echo`
(the framework ceiling), `bidder`, and `fastapi` (`bench.baseline`, the day-one implementation; run
when selected, and by default when its packages are installed).  Before anything is measured the
bidder and the baseline must answer 200 with a bid to the body: a 204 would mean the benchmark times
the no-bid path.  Around each bidder measurement `/metrics` is scraped for the batch histograms.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import servers
from bench.machine import machine_info, model_id
from bench.plot import plot_latency
from bench.report import (BATCH_COLUMNS, SUBJECT, Measurement, build_report, format_medians, format_ratios,
                          format_scaling, format_table, format_target, write_json)
from bench.scrape import MetricsProbe, batch_delta
from bench.servers import BenchError
from bench.wrk_driver import distinct_ids_body, run_wrk, wrk_path, wrk_version
from bidder import DEFAULT_BUNDLE, OPENRTB_EXAMPLES
from bidder.currencies import CURRENCY_FILE

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BODY = OPENRTB_EXAMPLES / "bid-request-2.5" / "simple-banner.json"
DEFAULT_MODEL = DEFAULT_BUNDLE
DEFAULT_RESULTS = REPO / "runs" / "bench"  # git-ignored; committed runs go to bench/results by an explicit --out
#: The bidder with some of its levers switched off, to measure each lever alone in the same run.
BIDDER_VARIANTS = {"bidder": (), "bidder-nobatch": ("--no-batching",), "bidder-rows": ("--no-factorized",),
                   "bidder-plain": ("--no-batching", "--no-factorized"), "bidder-exhaustive": ("--no-retrieval",),
                   "bidder-graphshade": ("--graph-shading",), "bidder-graphrows": ("--graph-rows",),
                   # the bidder with its event log on: what logging every bid costs (reused, and salvaged, run to run)
                   "bidder-events": ("--events", str(Path(tempfile.gettempdir()) / "bench-bidder-events")),
                   # signed notices on every bid: what signing costs a bid
                   "bidder-notices": ("--notice-url", "http://127.0.0.1"),
                   # this round's stages all on: signed notices, the event log, and budgets with frequency caps
                   # on every campaign (bench.load.money_catalog: budgets no run spends, caps that count bills)
                   "bidder-all": ("--events", str(Path(tempfile.gettempdir()) / "bench-bidder-all-events"),
                                  "--notice-url", "http://127.0.0.1"),
                   # the bidder answering the body with the blocking rules and privacy signals of RULES added
                   # (none of which blocks its bid): what honouring them costs. Both rules bodies are sent to the
                   # bidder's own process when it runs too (``run_phase``)
                   "bidder-rules": (),
                   # the same bytes with every rule field renamed so nothing reads it (``unread_rules``): beside
                   # bidder-rules, what honouring the rules costs apart from receiving a longer request
                   "bidder-rules-unread": (),
                   # JSON log lines: the bid path logs nothing per request, so this should cost nothing
                   "bidder-jsonlog": ("--log-format", "json")}
#: what ``bidder-rules`` adds to the body: categories, advertisers and a seat blocked, and per banner imp attributes,
#: types and MIME types, under GDPR with a TCF v2 consent string granting purposes 1, 2, 3, 4, 7, 9 and 10 (the
#: user's data stays usable) and a CCPA string without opt-out, as exchanges send them
RULES = {"bcat": ["IAB25", "IAB26", "IAB7-39", "IAB8-18"], "cattax": 1,
         "badv": ["casino.example.com", "tobacco.example.com"], "bseat": ["some-other-dsp"],
         "regs": {"gdpr": 1, "us_privacy": "1YNN"}}
RULES_CONSENT = "CPk-ZYAPk-ZYAAHABBENCWEAAPLAAAAAAAYgAAAAAAAA"
RULES_BANNER = {"btype": [1, 4], "battr": [1, 3, 8, 9, 10, 14], "mimes": ["image/jpeg", "image/png", "image/gif"]}
#: the budget and caps every campaign of the bidder-all variant gets
MONEY_TERMS = {"budget": {"daily": 1e6, "total": 1e7, "timezone": "UTC"}, "pacing": "asap", "max_cpm": 1000.0,
               "frequency_cap": [{"count": 1000, "seconds": 3600, "scope": "campaign"}]}
SERVERS = ("echo", "bidder", "fastapi", *(name for name in BIDDER_VARIANTS if name != "bidder"))
BIDDING_SERVERS = (*BIDDER_VARIANTS, "fastapi")  # must answer the body with a bid before they are measured
ECHO_LAYERS = ("app", "server")
BASELINE_PACKAGES = ("fastapi", "uvicorn", "orjson", "mmh3")
BASELINE_HINT = "pip install -e '.[bench]'"


def missing_baseline_packages() -> list[str]:
    return [name for name in BASELINE_PACKAGES if importlib.util.find_spec(name) is None]


def default_servers() -> tuple[str, ...]:
    """echo and bidder, and the fastapi baseline when its packages are installed."""
    return ("echo", "bidder", "fastapi") if not missing_baseline_packages() else ("echo", "bidder")


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
    scaling_workers: tuple[int, ...] | None = None  # worker counts of the scaling curve (1 is always run)
    max_batch: int | None = None
    retrieve_k: int | None = None          # passed to the bidder (large catalogs: creatives ranked per imp)
    server_cpus: str | None = "0"          # None: no pinning
    client_cpus: str | None = "1"
    servers: tuple[str, ...] = field(default_factory=default_servers)
    echo_layer: str = "app"                # "app" (aiohttp Application, as the bidder) or "server" (web.Server)
    repeat: int = 1                        # passes over the whole alternating sequence
    startup_timeout_s: float = 60.0
    wrk_timeout_s: float = 2.0
    allow_no_bid: bool = False
    distinct_ids: bool = False             # every request its own id (post_ids.lua), for every server alike
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
    if set(BIDDING_SERVERS) & set(config.servers) and not config.model.is_dir():
        raise BenchError(f"model bundle not found: {config.model} (pass --model BUNDLE)")
    if "fastapi" in config.servers and missing_baseline_packages():
        raise BenchError(f"the fastapi baseline needs {', '.join(missing_baseline_packages())}: {BASELINE_HINT} "
                         f"(or leave fastapi out of --servers)")
    if config.echo_layer not in ECHO_LAYERS:
        raise BenchError(f"unknown echo layer {config.echo_layer!r}; choose from {', '.join(ECHO_LAYERS)}")
    if config.repeat < 1:
        raise BenchError("--repeat must be >= 1")
    if config.server_cpus is not None or config.client_cpus is not None:
        if shutil.which("taskset") is None:
            raise BenchError("taskset not found: apt-get install -y util-linux (or pass --no-pin)")
        usable = os.sched_getaffinity(0)
        for spec in (config.server_cpus, config.client_cpus):
            if spec is not None and not parse_cpus(spec) <= usable:
                raise BenchError(f"CPU list {spec!r} is not within the usable CPUs {sorted(usable)}")


def server_command(name: str, config: LoadConfig, port: int, workers: int, metrics_port: int | None = None
                   ) -> list[str]:
    if name == "echo":
        return [sys.executable, "-m", "bench.echo", "--host", config.host, "--port", str(port),
                "--workers", str(workers), "--layer", config.echo_layer]
    program = ["-m", "bench.baseline"] if name == "fastapi" else ["-m", "bidder", "serve", *BIDDER_VARIANTS[name]]
    command = [sys.executable, *program, "--model", str(config.model), "--host", config.host,
               "--port", str(port), "--workers", str(workers)]
    # Without --campaigns both fall back alike: campaigns.json beside the bundle, else the default catalog.
    if name == "bidder-all":
        command += ["--campaigns", str(money_catalog(config.campaigns_file or config.model / "campaigns.json")),
                    "--state-dir", tempfile.mkdtemp(prefix="bench-bidder-all-state-")]
    elif config.campaigns_file is not None:
        command += ["--campaigns", str(config.campaigns_file)]
    if config.max_batch is not None and name in BIDDER_VARIANTS:
        command += ["--max-batch", str(config.max_batch)]
    if config.retrieve_k is not None and name in BIDDER_VARIANTS:
        command += ["--retrieve-k", str(config.retrieve_k)]
    if metrics_port is not None and name in BIDDER_VARIANTS:  # one scrape of every worker's batch figures
        command += ["--metrics-port", str(metrics_port)]
    return command


def money_catalog(catalog: Path) -> Path:
    """A copy of ``catalog`` (beside its currency table, if it has one) whose every campaign has ``MONEY_TERMS``."""
    data = json.loads(Path(catalog).read_text())
    for campaign in data["campaigns"]:
        campaign.update(json.loads(json.dumps(MONEY_TERMS)))
    folder = Path(tempfile.mkdtemp(prefix="bench-money-catalog-"))
    (folder / "campaigns.json").write_text(json.dumps(data))
    currencies = Path(catalog).parent / CURRENCY_FILE
    if currencies.exists():
        shutil.copyfile(currencies, folder / CURRENCY_FILE)
    return folder / "campaigns.json"


def with_rules(body: bytes) -> bytes:
    """``body`` (a BidRequest) with ``RULES`` added: request-level fields, the consent, every banner's rules."""
    request = json.loads(body)
    request.update(json.loads(json.dumps(RULES)))
    request.setdefault("user", {})["consent"] = RULES_CONSENT
    for imp in request.get("imp", []):
        if isinstance(imp.get("banner"), dict):
            imp["banner"].update(RULES_BANNER)
    return json.dumps(request).encode()


def unread_rules(body: bytes) -> bytes:
    """``with_rules(body)`` with every rule field's name changed in its first letter (``bcat`` → ``xcat``): the same
    bytes, which the bidder skips as fields it does not know."""
    request = json.loads(with_rules(body))
    unread = {f"x{key[1:]}": value for key, value in request.items() if key in RULES}
    request = {key: value for key, value in request.items() if key not in RULES} | unread
    request["user"]["xonsent"] = request["user"].pop("consent")
    for imp in request.get("imp", []):
        banner = imp.get("banner")
        if isinstance(banner, dict):
            imp["banner"] = {(f"x{key[1:]}" if key in RULES_BANNER else key): value for key, value in banner.items()}
    return json.dumps(request).encode()


#: the body variants some servers are measured with, from ``config.body``
BODY_VARIANTS = {"bidder-rules": with_rules, "bidder-rules-unread": unread_rules}


def bodies(config: LoadConfig) -> dict[str, Path]:
    """The body file each server is measured with: ``config.body``, and for ``bidder-rules`` (and
    ``bidder-rules-unread``) a copy with the rules (renamed)."""
    out = {name: config.body for name in config.servers}
    for name, make in BODY_VARIANTS.items():
        if name in out:
            path = Path(tempfile.mkdtemp(prefix="bench-rules-body-")) / f"{name}-{config.body.name}"
            path.write_bytes(make(config.body.read_bytes()))
            out[name] = path
    if config.distinct_ids:
        folder = Path(tempfile.mkdtemp(prefix="bench-ids-body-"))
        out = {name: distinct_ids_body(path, folder / f"{name}-{path.name}") for name, path in out.items()}
    return out


def child_environment() -> None:
    """Make `python -m bidder` / `-m bench.echo` / `-m bench.baseline` resolve to this checkout, installed or not."""
    paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))


def preflight(name: str, url: str, body: bytes, allow_no_bid: bool) -> dict:
    """POST the body once; the bidder and the baseline must bid (200 with a seatbid), else the run times no-bids."""
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        raise BenchError(f"{name}: POST {url} failed: {exc}") from None
    check = {"status": status, "response_bytes": len(payload)}
    if status == 204 and name in BIDDING_SERVERS:
        if not allow_no_bid:
            raise BenchError(f"{name} answered 204 (no bid) to the request body, so the run would time the "
                             f"no-bid path, not the bid path; use a body it bids on, or --allow-no-bid "
                             f"to measure it anyway ({url})")
        return check
    if status != 200:
        raise BenchError(f"{name}: POST {url} answered {status}, expected 200: {payload[:300]!r}")
    if name in BIDDING_SERVERS:
        try:
            seatbids = json.loads(payload).get("seatbid") or []
        except (ValueError, AttributeError):
            raise BenchError(f"{name} answered 200 with a body that is not a JSON object: {payload[:300]!r}") from None
        bids = [bid for seat in seatbids for bid in seat.get("bid", [])]
        if not bids and not allow_no_bid:
            raise BenchError(f"{name} answered 200 without any bid: {payload[:300]!r}")
        check.update(bids=len(bids), prices=[bid.get("price") for bid in bids])
    return check


def price_agreement(preflights: dict) -> str | None:
    """A note when the baseline's (or a rules body's) preflight prices differ from the bidder's: then it does
    other work."""
    notes = []
    for key, check in preflights.items():
        name, _, workers = key.partition("/")
        bidder = preflights.get(f"bidder/{workers}")
        if name not in ("fastapi", *BODY_VARIANTS) or bidder is None or "prices" not in check or "prices" not in bidder:
            continue
        if check["prices"] != bidder["prices"]:
            who = "fastapi baseline" if name == "fastapi" else f"{name} (the body with the rules)"
            notes.append(f"{who} priced the body {check['prices']} where the bidder priced it "
                         f"{bidder['prices']} ({workers}): it is not doing the same work (or the hour changed "
                         f"between the two preflights)")
    return "; ".join(notes) or None


def measure(name: str, url: str, config: LoadConfig, *, workers: int, connections: int, threads: int,
            server_cpus: str | None, client_cpus: str | None, repetition: int = 1,
            probe: MetricsProbe | None = None, pid: int | None = None, body: Path | None = None) -> Measurement:
    """Warm up, then measure; with a probe, scrape /metrics just before and after the measured run; with the
    server's pid, the CPU time its processes used per answered request."""
    common = dict(connections=connections, threads=threads, timeout_s=config.wrk_timeout_s, cpus=client_cpus,
                  distinct_ids=config.distinct_ids)
    body = body or config.body
    if config.warmup_s > 0:
        run_wrk(url, body, duration_s=config.warmup_s, **common)
    before = probe.scrape() if probe is not None else None
    cpu_before = servers.tree_cpu_seconds(pid) if pid is not None else None
    result = run_wrk(url, body, duration_s=config.duration_s, **common)
    cpu_us = None
    if cpu_before is not None and result.requests:
        cpu_us = (servers.tree_cpu_seconds(pid) - cpu_before) / result.requests * 1e6
    batch = None
    if before is not None:
        after = probe.scrape(same_pid=before.pid)
        batch = batch_delta(before, after) if after is not None else None
    m = Measurement(name, workers, connections, threads, server_cpus, client_cpus, result, repetition, batch, cpu_us)
    trouble = f", {result.socket_errors} socket errors" if result.socket_errors else ""
    trouble += f", {result.non_2xx} non-2xx" if result.non_2xx else ""
    per_call = "".join(f"  {label} {m.batch_mean(histogram):.2f}" for label, histogram in BATCH_COLUMNS
                       if m.batch_mean(histogram) is not None)
    run = f" run {repetition}/{config.repeat}" if config.repeat > 1 else ""
    print(f"  {name:7} workers={workers} c={connections:<3}{run} {result.rps:10,.0f} rps  "
          f"P50 {result.percentile_us(50) / 1000:.3f} ms  P99 {result.percentile_us(99) / 1000:.3f} ms"
          + (f"  CPU {cpu_us:.1f} us/req" if cpu_us is not None else "")
          + f"{per_call}{trouble}", file=sys.stderr, flush=True)
    return m


def run_phase(config: LoadConfig, *, workers: int, connections: tuple[int, ...], threads: int,
              server_cpus: str | None, client_cpus: str | None, preflights: dict) -> list[Measurement]:
    """Start every server with `workers` workers, check them, and measure each concurrency level.

    The servers take turns at each level; with `repeat` > 1 the whole sequence runs again, so every
    (server, level) is measured `repeat` times, each time next to the others.
    """
    body_files = bodies(config)
    # a body variant is measured on the bidder's own process when it runs too: what differs is the body alone, not
    # also the process (each has its own memory layout and hash seed, a few % apart on this machine)
    aliases = {name: SUBJECT for name in BODY_VARIANTS if name in config.servers and SUBJECT in config.servers}
    measurements = []
    with contextlib.ExitStack() as stack:
        urls, started, probes = {}, {}, {}
        for name in config.servers:
            if name in aliases:
                continue
            port = servers.free_port(config.host)
            base = f"http://{config.host}:{port}"
            # several workers: the supervisor's metrics port sums them all (a scrape of the bid port sees one)
            metrics_port = servers.free_port(config.host) if workers > 1 and name in BIDDER_VARIANTS else None
            command = servers.pinned(server_command(name, config, port, workers, metrics_port), server_cpus)
            print(f"starting {name} ({workers} worker{'s' if workers > 1 else ''}) on {base}"
                  + (f", cpus {server_cpus}" if server_cpus else ""), file=sys.stderr, flush=True)
            started[name] = stack.enter_context(servers.running(
                name, command, base, ready_path="/readyz", port=port, workers=workers,
                startup_timeout_s=config.startup_timeout_s))
            urls[name] = base + config.route
            if name in BIDDER_VARIANTS:
                probes[name] = MetricsProbe(config.host, metrics_port or port)
                stack.callback(probes[name].close)
        for name, host in aliases.items():
            urls[name], started[name] = urls[host], started[host]
            if host in probes:
                probes[name] = probes[host]
        for name in config.servers:
            preflights[f"{name}/workers={workers}"] = preflight(name, urls[name], body_files[name].read_bytes(),
                                                                config.allow_no_bid)
        for repetition in range(1, config.repeat + 1):
            for c in connections:
                for name in config.servers:
                    measurements.append(measure(name, urls[name], config, workers=workers, connections=c,
                                                threads=threads, server_cpus=server_cpus, client_cpus=client_cpus,
                                                repetition=repetition, probe=probes.get(name),
                                                pid=started[name].process.pid, body=body_files[name]))
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
    if "fastapi" not in config.servers and missing_baseline_packages():
        notes.append(f"fastapi baseline not run: {', '.join(missing_baseline_packages())} not installed "
                     f"({BASELINE_HINT})")
    preflights: dict = {}
    measurements = run_phase(config, workers=1, connections=config.connections, threads=1,
                             server_cpus=config.server_cpus, client_cpus=config.client_cpus, preflights=preflights)
    for n in (n for n in config.scaling_workers or () if n > 1):
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
    notes += filter(None, [price_agreement(preflights)])
    machine = machine_info(REPO, wrk_version())
    machine["loadavg_before"] = list(load_before)
    machine["model_id"] = model_id(config.model)
    report = build_report(measurements, created=created, machine=machine, config=config.to_dict(),
                          preflight=preflights, notes=notes)
    report["table"] = format_table(measurements)
    json_path = write_json(report, config.out_dir / f"load-{stamp}.json")
    runs = f", each curve the median-rps run of {config.repeat}" if config.repeat > 1 else ""
    title = (f"{config.body.name}: {' vs '.join(config.servers)} (echo layer {config.echo_layer}), "
             f"{config.duration_s:g} s per point{runs}, {created}\n"
             f"{machine['cpu_model']}, {machine['nproc']} CPUs, Python {machine['python']}, {machine['wrk']}")
    png_path = plot_latency(measurements, config.out_dir / f"load-{stamp}.png", title)
    return report, json_path, png_path


def summary(report: dict, json_path: Path, png_path: Path) -> str:
    lines = [report["table"]]
    if report["config"].get("repeat", 1) > 1:
        lines += ["", f"medians over {report['config']['repeat']} repetitions:", format_medians(report["medians"])]
    lines += ["", format_ratios(report["pair_ratios"])] if report["pair_ratios"] else []
    lines += [format_target(report["target"])] if report["target"] else []
    lines += [format_scaling(report["scaling"])] if report["scaling"] else []
    lines += [f"note: {note}" for note in report["notes"]]
    lines += [f"results: {json_path}", f"plot:    {png_path}"]
    return "\n".join(lines)

"""Turn wrk measurements into the comparison table, the ratios, the medians and the JSON report.

Servers: `echo` (the framework ceiling), `bidder` (the subject) and `fastapi` (the day-one baseline).
A *group* is one repetition of one scenario (workers, connections): the servers measured back to back,
so a ratio within a group compares runs that shared the machine's state. With `--repeat N` every
scenario has N groups, and the figures of record are medians: per server of rps and latency, per
pair of servers of the within-group ratios.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from bench.wrk_driver import WrkResult

# The percentiles the table shows; the JSON keeps every one the wrk script printed.
TABLE_PERCENTILES = (50.0, 90.0, 99.0, 99.9)
CEILING = "echo"
SUBJECT = "bidder"
BASELINE = "fastapi"
SERVER_ORDER = (CEILING, SUBJECT, BASELINE)
# (numerator, denominator) of every ratio the JSON carries; the table shows the first two. The variants' ratios
# say what a stage costs: the rules honoured against the same bytes unread (and against the shorter plain body),
# and every stage of the round on.
RATIO_PAIRS = ((SUBJECT, CEILING), (SUBJECT, BASELINE), (BASELINE, CEILING), ("bidder-rules", "bidder-rules-unread"),
               ("bidder-rules", SUBJECT), ("bidder-all", SUBJECT))
TABLE_RATIOS = RATIO_PAIRS[:2]
# Batch histograms the bidder exports; the table shows their means per ORT call.
BATCH_COLUMNS = (("req/call", "bidder_batch_requests"), ("rows/call", "bidder_batch_rows"))

# The throughput issue's target, checked on the single-worker figures when they exist.
TARGET_RATIO, TARGET_RATIO_CONNECTIONS, TARGET_MIN_PAIRS = 0.5, 32, 3
TARGET_P99_MS, TARGET_P50_MS = 5.0, 0.3


@dataclass(frozen=True)
class Measurement:
    server: str            # "echo" (the framework ceiling), "bidder" or "fastapi" (the day-one baseline)
    workers: int
    connections: int
    threads: int
    server_cpus: str | None
    client_cpus: str | None
    result: WrkResult
    repetition: int = 1    # which pass of `--repeat N` (1-based)
    batch: dict | None = None  # bidder batch histograms over the run (bench.scrape.batch_delta), if exported
    cpu_us: float | None = None  # CPU time of the server's processes per answered request (µs), if known

    @property
    def scenario(self) -> tuple[int, int]:
        return self.workers, self.connections

    def batch_mean(self, histogram: str) -> float | None:
        return ((self.batch or {}).get(histogram) or {}).get("mean")

    def to_dict(self) -> dict:
        latency_ms = {percentile_key(p): self.result.percentile_us(p) / 1000 for p in TABLE_PERCENTILES}
        out = {"server": self.server, "workers": self.workers, "connections": self.connections,
               "repetition": self.repetition, "threads": self.threads, "server_cpus": self.server_cpus,
               "client_cpus": self.client_cpus, "rps": self.result.rps, "latency_ms": latency_ms,
               "wrk": self.result.to_dict()}
        if self.batch is not None:
            out["batch"] = self.batch
        if self.cpu_us is not None:
            out["cpu_us_per_request"] = self.cpu_us
        return out


def percentile_key(p: float) -> str:
    return f"p{p:g}"


def ratio_key(numerator: str, denominator: str) -> str:
    return f"{numerator}_over_{denominator}"


def _divide(a: float, b: float) -> float | None:
    return a / b if b else None


def ratios(subject: Measurement, ceiling: Measurement) -> dict[str, float | None]:
    """subject/ceiling for throughput and each table percentile (rps < 1 and latency > 1: slower)."""
    out = {"rps": _divide(subject.result.rps, ceiling.result.rps)}
    for p in TABLE_PERCENTILES:
        out[percentile_key(p)] = _divide(subject.result.percentile_us(p), ceiling.result.percentile_us(p))
    return out


def groups(measurements: list[Measurement]) -> list[dict[str, Measurement]]:
    """{server: measurement} per (scenario, repetition): scenarios in the order first run, then repetitions."""
    found: dict[tuple[int, int], dict[int, dict[str, Measurement]]] = {}
    for m in measurements:
        found.setdefault(m.scenario, {}).setdefault(m.repetition, {})[m.server] = m
    return [by_server for per_repetition in found.values() for _, by_server in sorted(per_repetition.items())]


def _ordered(group: dict[str, Measurement]) -> list[Measurement]:
    rank = {name: i for i, name in enumerate(SERVER_ORDER)}
    return sorted(group.values(), key=lambda m: rank.get(m.server, len(rank)))


def comparisons(measurements: list[Measurement]) -> list[dict]:
    """Per group, every ratio whose two servers ran in it (`bidder_over_echo`, `bidder_over_fastapi`, ...)."""
    out = []
    for group in groups(measurements):
        entry: dict = {}
        for numerator, denominator in RATIO_PAIRS:
            if numerator in group and denominator in group:
                entry[ratio_key(numerator, denominator)] = ratios(group[numerator], group[denominator])
        if entry:
            any_run = next(iter(group.values()))
            out.append({"workers": any_run.workers, "connections": any_run.connections,
                        "repetition": any_run.repetition, **entry})
    return out


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def medians(measurements: list[Measurement]) -> list[dict]:
    """Per (server, workers, connections): the median over repetitions of rps, each percentile, batch means."""
    by_key: dict[tuple[str, int, int], list[Measurement]] = {}
    for group in groups(measurements):
        for m in _ordered(group):
            by_key.setdefault((m.server, m.workers, m.connections), []).append(m)
    out = []
    for (server, workers, connections), runs in by_key.items():
        entry = {"server": server, "workers": workers, "connections": connections, "runs": len(runs),
                 "rps": _median([m.result.rps for m in runs]),
                 "latency_ms": {percentile_key(p): _median([m.result.percentile_us(p) / 1000 for m in runs])
                                for p in TABLE_PERCENTILES}}
        for _, histogram in BATCH_COLUMNS:
            means = [mean for m in runs if (mean := m.batch_mean(histogram)) is not None]
            if means:
                entry.setdefault("batch_mean", {})[histogram] = _median(means)
        cpu = [m.cpu_us for m in runs if m.cpu_us is not None]
        if cpu:
            entry["cpu_us_per_request"] = _median(cpu)
        out.append(entry)
    return out


def pair_ratios(measurements: list[Measurement]) -> list[dict]:
    """Per scenario and pair of servers: the rps and P99 ratio of each group, and their medians.

    The ratio is taken within a group (the two runs back to back), then the median over groups: drift
    of a shared machine between repetitions cancels in each ratio instead of landing in one server.
    """
    found: dict[tuple[int, int, str, str], list[tuple[float | None, float | None]]] = {}
    for group in groups(measurements):
        for numerator, denominator in RATIO_PAIRS:
            if numerator in group and denominator in group:
                r = ratios(group[numerator], group[denominator])
                workers, connections = group[numerator].scenario
                found.setdefault((workers, connections, numerator, denominator), []).append((r["rps"], r["p99"]))
    out = []
    for (workers, connections, numerator, denominator), values in found.items():
        rps = [v for v, _ in values if v is not None]
        p99 = [v for _, v in values if v is not None]
        out.append({"workers": workers, "connections": connections, "ratio": f"{numerator}/{denominator}",
                    "pairs": len(values), "rps": rps, "median_rps": _median(rps), "p99": p99,
                    "median_p99": _median(p99)})
    return out


def target_check(median_entries: list[dict], ratio_entries: list[dict]) -> list[dict]:
    """The throughput target, judged on single-worker medians; criteria without figures are left out."""
    out = []
    for r in ratio_entries:
        if (r["workers"], r["connections"], r["ratio"]) == (1, TARGET_RATIO_CONNECTIONS, f"{SUBJECT}/{CEILING}") \
                and r["median_rps"] is not None:
            enough = r["pairs"] >= TARGET_MIN_PAIRS
            out.append({"criterion": f"c={TARGET_RATIO_CONNECTIONS} bidder/echo rps >= {TARGET_RATIO:g} "
                                     f"(median of >= {TARGET_MIN_PAIRS} pairs)",
                        "value": r["median_rps"], "unit": "x", "pairs": r["pairs"],
                        "met": enough and r["median_rps"] >= TARGET_RATIO})
    for m in median_entries:
        if m["server"] != SUBJECT or m["workers"] != 1:
            continue
        if m["connections"] == TARGET_RATIO_CONNECTIONS:
            value = m["latency_ms"]["p99"]
            out.append({"criterion": f"c={TARGET_RATIO_CONNECTIONS} bidder P99 < {TARGET_P99_MS:g} ms",
                        "value": value, "unit": "ms", "runs": m["runs"], "met": value < TARGET_P99_MS})
        if m["connections"] == 1:
            value = m["latency_ms"]["p50"]
            out.append({"criterion": f"c=1 bidder P50 <= {TARGET_P50_MS:g} ms", "value": value, "unit": "ms",
                        "runs": m["runs"], "met": value <= TARGET_P50_MS})
    return out


def scaling(measurements: list[Measurement]) -> list[dict]:
    """Median throughput of each multi-worker scenario over the same server's single-worker median at saturation."""
    entries = medians(measurements)
    out = []
    for m in entries:
        if m["workers"] <= 1:
            continue
        single = [s for s in entries if s["server"] == m["server"] and s["workers"] == 1
                  and s["connections"] * m["workers"] == m["connections"]]
        if single and single[0]["rps"]:
            speedup = m["rps"] / single[0]["rps"]
            echo = [e for e in entries if e["server"] == "echo" != m["server"] and e["workers"] == m["workers"]
                    and e["connections"] == m["connections"] and e["rps"]]
            # the server CPU per request, alone and beside N - 1 other workers: where wrk has to share the servers'
            # cores (2 workers on 2 cores) requests/s understate what the workers can do, and this ratio says
            # whether the workers slow each other down (1.0: each request costs what it cost one worker alone)
            cpu, single_cpu = m.get("cpu_us_per_request"), single[0].get("cpu_us_per_request")
            out.append({"server": m["server"], "workers": m["workers"], "connections": m["connections"],
                        "rps": m["rps"], "single_worker_rps": single[0]["rps"], "speedup": speedup,
                        "efficiency": speedup / m["workers"],  # the target: >= 0.85 up to the cores available
                        "vs_echo": m["rps"] / echo[0]["rps"] if echo else None, "runs": m["runs"],
                        "cpu_us_per_request": cpu, "single_worker_cpu_us_per_request": single_cpu,
                        "cpu_efficiency": single_cpu / cpu if cpu and single_cpu else None})
    return out


def _status_mix(statuses: dict[str, int]) -> str:
    return " ".join(f"{status}:{count}" for status, count in sorted(statuses.items())) or "-"


def _ms(us: float) -> str:
    return f"{us / 1000:.3f}"


def _times(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def _per_call(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _layout(measurements: list[Measurement]) -> tuple[bool, bool]:
    """(show the repetition column, show the batch columns): only when some run needs them."""
    return (any(m.repetition > 1 for m in measurements),
            any(m.batch_mean(h) is not None for m in measurements for _, h in BATCH_COLUMNS))


def header(with_runs: bool = False, with_batch: bool = False) -> tuple[str, ...]:
    return ("server", "workers", "conns", *(("run",) if with_runs else ()), "rps", "P50 ms", "P90 ms", "P99 ms",
            "P99.9 ms", *((label for label, _ in BATCH_COLUMNS) if with_batch else ()), "non-2xx", "errors",
            "statuses")


def table_rows(measurements: list[Measurement]) -> list[tuple[str, ...]]:
    with_runs, with_batch = _layout(measurements)
    rows = []
    for group in groups(measurements):
        for m in _ordered(group):
            r = m.result
            rows.append((m.server, str(m.workers), str(m.connections),
                         *((str(m.repetition),) if with_runs else ()), f"{r.rps:,.0f}",
                         *(_ms(r.percentile_us(p)) for p in TABLE_PERCENTILES),
                         *((_per_call(m.batch_mean(h)) for _, h in BATCH_COLUMNS) if with_batch else ()),
                         str(r.non_2xx), str(r.socket_errors), _status_mix(r.statuses)))
        for numerator, denominator in TABLE_RATIOS:
            if numerator in group and denominator in group:
                ratio = ratios(group[numerator], group[denominator])
                rows.append((f"{numerator}/{denominator}", "", "", *(("",) if with_runs else ()),
                             _times(ratio["rps"]), *(_times(ratio[percentile_key(p)]) for p in TABLE_PERCENTILES),
                             *(("", "") if with_batch else ()), "", "", ""))
    return rows


def _format(head: tuple[str, ...], body: list[tuple[str, ...]], left: set[int]) -> str:
    rows = [head, *body]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for index, row in enumerate(rows):
        cells = [cell.ljust(widths[i]) if i in left else cell.rjust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_table(measurements: list[Measurement]) -> str:
    """Every run, grouped by scenario and repetition, each group followed by its ratio rows."""
    head = header(*_layout(measurements))
    # Text columns left-aligned, figures right-aligned, so the ratio rows line up under the figures.
    return _format(head, table_rows(measurements), {0, len(head) - 1})


def format_medians(median_entries: list[dict]) -> str:
    """Per (server, workers, connections): medians over the repetitions."""
    with_batch = any("batch_mean" in m for m in median_entries)
    with_cpu = any("cpu_us_per_request" in m for m in median_entries)
    head = ("server", "workers", "conns", "runs", "median rps", "P50 ms", "P99 ms",
            *(("CPU us/req",) if with_cpu else ()), *((label for label, _ in BATCH_COLUMNS) if with_batch else ()))
    body = []
    for m in median_entries:
        batch = m.get("batch_mean", {})
        cpu = m.get("cpu_us_per_request")
        body.append((m["server"], str(m["workers"]), str(m["connections"]), str(m["runs"]), f"{m['rps']:,.0f}",
                     f"{m['latency_ms']['p50']:.3f}", f"{m['latency_ms']['p99']:.3f}",
                     *(("-" if cpu is None else f"{cpu:.1f}",) if with_cpu else ()),
                     *((_per_call(batch.get(h)) for _, h in BATCH_COLUMNS) if with_batch else ())))
    return _format(head, body, {0})


def format_ratios(ratio_entries: list[dict]) -> str:
    """One line per scenario and ratio: the rps ratio (the median of the pairs, and each pair's)."""
    lines = []
    for r in ratio_entries:
        workers = f"{r['workers']} worker{'s' if r['workers'] > 1 else ''}"
        line = f"{r['ratio']} rps, {workers}, c={r['connections']}: {_times(r['median_rps'])}"
        if r["pairs"] > 1:
            line += f" (median of {r['pairs']} pairs: {' '.join(_times(v) for v in r['rps'])})"
        lines.append(line)
    return "\n".join(lines)


def format_target(entries: list[dict]) -> str:
    lines = []
    for t in entries:
        shown = f"{t['value']:.2f}x" if t["unit"] == "x" else f"{t['value']:.3f} ms"
        verdict = "met" if t["met"] else "not met"
        if "pairs" in t and t["pairs"] < TARGET_MIN_PAIRS:
            verdict += f" (only {t['pairs']} pair{'s' if t['pairs'] > 1 else ''}: use --repeat {TARGET_MIN_PAIRS})"
        lines.append(f"target: {t['criterion']}: {shown}, {verdict}")
    return "\n".join(lines)


def format_scaling(entries: list[dict]) -> str:
    """One line per entry of `scaling()`."""
    return "\n".join(f"scaling: {s['server']} {s['workers']} workers at c={s['connections']}: "
                     f"{s['rps']:,.0f} rps = {s['speedup']:.2f}x its 1-worker run "
                     f"({s['efficiency']:.2f} of {s['workers']}x)"
                     + ("" if s.get("vs_echo") is None else f", {s['vs_echo']:.2f}x echo at {s['workers']} workers")
                     + ("" if s.get("cpu_efficiency") is None else
                        f"; server CPU {s['cpu_us_per_request']:.1f} us/req against {s['single_worker_cpu_us_per_request']:.1f}"
                        f" with 1 worker ({s['cpu_efficiency']:.2f})")
                     for s in entries)


def build_report(measurements: list[Measurement], *, created: str, machine: dict, config: dict,
                 preflight: dict, notes: list[str]) -> dict:
    median_entries = medians(measurements)
    ratio_entries = pair_ratios(measurements)
    return {"created": created, "machine": machine, "config": config, "preflight": preflight,
            "notes": notes, "runs": [m.to_dict() for m in measurements],
            "comparison": comparisons(measurements), "medians": median_entries, "pair_ratios": ratio_entries,
            "target": target_check(median_entries, ratio_entries), "scaling": scaling(measurements)}


def write_json(report: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path

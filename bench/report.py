"""Turn wrk measurements into the comparison table, the bidder/echo ratios and the JSON report."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bench.wrk_driver import WrkResult

# The percentiles the table shows; the JSON keeps every one the wrk script printed.
TABLE_PERCENTILES = (50.0, 90.0, 99.0, 99.9)
CEILING = "echo"
SUBJECT = "bidder"


@dataclass(frozen=True)
class Measurement:
    server: str            # "echo" (the framework ceiling) or "bidder"
    workers: int
    connections: int
    threads: int
    server_cpus: str | None
    client_cpus: str | None
    result: WrkResult

    @property
    def scenario(self) -> tuple[int, int]:
        return self.workers, self.connections

    def to_dict(self) -> dict:
        latency_ms = {percentile_key(p): self.result.percentile_us(p) / 1000 for p in TABLE_PERCENTILES}
        return {"server": self.server, "workers": self.workers, "connections": self.connections,
                "threads": self.threads, "server_cpus": self.server_cpus, "client_cpus": self.client_cpus,
                "rps": self.result.rps, "latency_ms": latency_ms, "wrk": self.result.to_dict()}


def percentile_key(p: float) -> str:
    return f"p{p:g}"


def ratios(subject: Measurement, ceiling: Measurement) -> dict[str, float | None]:
    """subject/ceiling for throughput and each table percentile (rps < 1 and latency > 1: slower)."""
    def divide(a: float, b: float) -> float | None:
        return a / b if b else None

    out = {"rps": divide(subject.result.rps, ceiling.result.rps)}
    for p in TABLE_PERCENTILES:
        out[percentile_key(p)] = divide(subject.result.percentile_us(p), ceiling.result.percentile_us(p))
    return out


def paired(measurements: list[Measurement]) -> list[tuple[Measurement | None, Measurement | None]]:
    """(ceiling, subject) per scenario, in the order the scenarios were first run."""
    scenarios: dict[tuple[int, int], dict[str, Measurement]] = {}
    for m in measurements:
        scenarios.setdefault(m.scenario, {})[m.server] = m
    return [(found.get(CEILING), found.get(SUBJECT)) for found in scenarios.values()]


def comparisons(measurements: list[Measurement]) -> list[dict]:
    out = []
    for ceiling, subject in paired(measurements):
        if ceiling and subject:
            out.append({"workers": subject.workers, "connections": subject.connections,
                        "bidder_over_echo": ratios(subject, ceiling)})
    return out


def scaling(measurements: list[Measurement]) -> list[dict]:
    """Throughput of each multi-worker run over the same server's single-worker run at saturation."""
    out = []
    for m in measurements:
        if m.workers <= 1:
            continue
        single = [s for s in measurements
                  if s.server == m.server and s.workers == 1 and s.connections * m.workers == m.connections]
        if single and single[0].result.rps:
            out.append({"server": m.server, "workers": m.workers, "connections": m.connections,
                        "rps": m.result.rps, "single_worker_rps": single[0].result.rps,
                        "speedup": m.result.rps / single[0].result.rps})
    return out


def _status_mix(statuses: dict[str, int]) -> str:
    return " ".join(f"{status}:{count}" for status, count in sorted(statuses.items())) or "-"


def _ms(us: float) -> str:
    return f"{us / 1000:.3f}"


def _times(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


HEADER = ("server", "workers", "conns", "rps", "P50 ms", "P90 ms", "P99 ms", "P99.9 ms", "non-2xx", "errors",
          "statuses")


def table_rows(measurements: list[Measurement]) -> list[tuple[str, ...]]:
    rows = []
    for ceiling, subject in paired(measurements):
        for m in (ceiling, subject):
            if m is None:
                continue
            r = m.result
            rows.append((m.server, str(m.workers), str(m.connections), f"{r.rps:,.0f}",
                         *(_ms(r.percentile_us(p)) for p in TABLE_PERCENTILES),
                         str(r.non_2xx), str(r.socket_errors), _status_mix(r.statuses)))
        if ceiling and subject:
            ratio = ratios(subject, ceiling)
            rows.append(("bidder/echo", "", "", _times(ratio["rps"]),
                         *(_times(ratio[percentile_key(p)]) for p in TABLE_PERCENTILES), "", "", ""))
    return rows


def format_table(measurements: list[Measurement]) -> str:
    rows = [HEADER, *table_rows(measurements)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    # Text columns left-aligned, figures right-aligned, so the ratio rows line up under the figures.
    left = {0, len(HEADER) - 1}
    lines = []
    for index, row in enumerate(rows):
        cells = [cell.ljust(widths[i]) if i in left else cell.rjust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_scaling(entries: list[dict]) -> str:
    """One line per entry of `scaling()`."""
    return "\n".join(f"scaling: {s['server']} {s['workers']} workers at c={s['connections']}: "
                     f"{s['rps']:,.0f} rps = {s['speedup']:.2f}x its 1-worker run"
                     for s in entries)


def build_report(measurements: list[Measurement], *, created: str, machine: dict, config: dict,
                 preflight: dict, notes: list[str]) -> dict:
    return {"created": created, "machine": machine, "config": config, "preflight": preflight,
            "notes": notes, "runs": [m.to_dict() for m in measurements],
            "comparison": comparisons(measurements), "scaling": scaling(measurements)}


def write_json(report: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path

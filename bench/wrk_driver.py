"""Run wrk against one URL with the POST-JSON Lua script and turn its output into a `WrkResult`."""
from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from bench.servers import BenchError, pinned

SCRIPT = Path(__file__).resolve().parent / "wrk" / "post_json.lua"
IDS_SCRIPT = SCRIPT.with_name("post_ids.lua")
#: what `distinct_ids_body` puts in place of the request id, and post_ids.lua replaces on every request
ID_MARKER = "@wrk-request-id@"
MARKER = "WRK_JSON "
INSTALL_HINT = "wrk not found: apt-get install -y wrk"


@dataclass(frozen=True)
class WrkResult:
    duration_s: float
    requests: int
    bytes: int
    errors: dict[str, int]
    latency_us: dict[str, float]
    percentiles_us: list[tuple[float, float]]
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def socket_errors(self) -> int:
        return sum(count for kind, count in self.errors.items() if kind != "status")

    @property
    def non_2xx(self) -> int:
        # Counted from the statuses the script saw: wrk's own "status" error counts only codes > 399.
        return sum(count for status, count in self.statuses.items() if not 200 <= int(status) < 300)

    def percentile_us(self, p: float) -> float:
        for q, value in self.percentiles_us:
            if q == p:
                return value
        raise KeyError(f"P{p:g} is not among the percentiles the wrk script printed")

    def to_dict(self) -> dict:
        return {"duration_s": self.duration_s, "requests": self.requests, "bytes": self.bytes,
                "rps": self.rps, "errors": dict(self.errors), "socket_errors": self.socket_errors,
                "non_2xx": self.non_2xx, "statuses": dict(self.statuses),
                "latency_us": dict(self.latency_us),
                "percentiles_us": [[p, v] for p, v in self.percentiles_us]}


def parse_output(stdout: str) -> WrkResult:
    """The figures from the script's `WRK_JSON {...}` line; a clear error when it is missing."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(MARKER):
            data = json.loads(line[len(MARKER):])
            break
    else:
        raise BenchError("wrk printed no WRK_JSON line (did the Lua script fail?); its output was:\n"
                         + stdout.strip())
    return WrkResult(
        duration_s=data["duration_us"] / 1e6,
        requests=int(data["requests"]),
        bytes=int(data["bytes"]),
        errors={kind: int(count) for kind, count in data["errors"].items()},
        latency_us={key: float(value) for key, value in data["latency_us"].items() if value is not None},
        percentiles_us=[(float(p), float(v)) for p, v in data["percentiles_us"]],
        statuses={str(status): int(count) for status, count in data["statuses"].items()},
    )


def wrk_path() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise BenchError(INSTALL_HINT)
    return path


def wrk_version() -> str:
    """wrk's version line (`wrk -v` exits 1 after printing it, so the status is ignored)."""
    result = subprocess.run([wrk_path(), "-v"], capture_output=True, text=True)
    text = (result.stdout + result.stderr).strip()
    first = text.splitlines()[0] if text else "unknown"
    return first.split(" Copyright")[0].strip()


def distinct_ids_body(body: Path, out: Path) -> Path:
    """A copy of the OpenRTB request ``body`` at ``out`` whose top-level ``id`` is `ID_MARKER`, for post_ids.lua
    to replace with a new id on every request; a clear error when the body is not a JSON object."""
    try:
        request = json.loads(body.read_bytes())
    except (OSError, ValueError) as exc:
        raise BenchError(f"{body}: cannot read the request body ({exc})") from None
    if not isinstance(request, dict):
        raise BenchError(f"{body}: the request body is not a JSON object")
    request["id"] = ID_MARKER
    out.write_text(json.dumps(request, separators=(",", ":")))
    return out


def wrk_command(url: str, body: Path, *, connections: int, threads: int, duration_s: float,
                timeout_s: float, cpus: str | None, distinct_ids: bool = False) -> list[str]:
    """``distinct_ids``: ``body`` is a `distinct_ids_body` and every request gets its own id."""
    threads = max(1, min(threads, connections))  # wrk refuses more threads than connections
    script, args = (IDS_SCRIPT, [str(body), ID_MARKER]) if distinct_ids else (SCRIPT, [str(body)])
    command = [wrk_path(), f"-t{threads}", f"-c{connections}", f"-d{duration_s:g}s",
               f"--timeout={timeout_s:g}s", "-s", str(script), url, "--", *args]
    return pinned(command, cpus)


def run_wrk(url: str, body: Path, *, connections: int, threads: int, duration_s: float,
            timeout_s: float = 2.0, cpus: str | None = None, distinct_ids: bool = False) -> WrkResult:
    command = wrk_command(url, body, connections=connections, threads=threads, duration_s=duration_s,
                          timeout_s=timeout_s, cpus=cpus, distinct_ids=distinct_ids)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + 60)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish within {duration_s + 60:.0f} s: {' '.join(command)}") from None
    if result.returncode != 0:
        raise BenchError(f"wrk failed (status {result.returncode}): {' '.join(command)}\n"
                         f"{(result.stdout + result.stderr).strip()}")
    return parse_output(result.stdout)

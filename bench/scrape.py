"""Batch figures from the bidder's `GET /metrics`, scraped before and after a measurement.

The bidder exports two Prometheus histograms per ONNX Runtime call: `bidder_batch_rows` (rows scored)
and `bidder_batch_requests` (requests whose rows shared the call). The difference of two scrapes
gives what happened during the measurement: calls, mean per call, and calls per bucket.

With one worker both scrapes go to the bid port over one kept-alive connection (checked through
`bidder_worker_info{pid}`). With `--workers N` they go to the supervisor's `--metrics-port`, whose page holds
every worker's samples: the histograms are summed over workers.
"""
from __future__ import annotations

import http.client
import math
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

BATCH_HISTOGRAMS = ("bidder_batch_rows", "bidder_batch_requests")
WORKER_INFO = "bidder_worker_info"
RECONNECT_TRIES = 20


@dataclass(frozen=True)
class Histogram:
    count: float
    sum: float
    buckets: tuple[tuple[str, float], ...]  # (le as Prometheus prints it, cumulative count), in bound order


@dataclass(frozen=True)
class Scrape:
    pid: str | None
    histograms: dict[str, Histogram]


def _bound(le: str) -> float:
    return math.inf if le == "+Inf" else float(le)


def parse_metrics(text: str, names: tuple[str, ...] = BATCH_HISTOGRAMS) -> Scrape:
    """The histograms `names` found in a Prometheus text page (other labels summed), and the worker pid."""
    counts: dict[str, float] = {}
    sums: dict[str, float] = {}
    buckets: dict[str, dict[str, float]] = {}
    pid = None
    wanted = set(names)
    # Samples are matched by name rather than by family, so a page without TYPE lines parses the same.
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == WORKER_INFO:
                pid = sample.labels.get("pid", pid)
                continue
            base, _, suffix = sample.name.rpartition("_")
            if base not in wanted:
                continue
            if suffix == "bucket":
                le = sample.labels.get("le")
                if le is not None:
                    per_le = buckets.setdefault(base, {})
                    per_le[le] = per_le.get(le, 0.0) + sample.value
            elif suffix == "count":
                counts[base] = counts.get(base, 0.0) + sample.value
            elif suffix == "sum":
                sums[base] = sums.get(base, 0.0) + sample.value
    found = {}
    for name in names:
        if name in counts:
            ordered = tuple(sorted(buckets.get(name, {}).items(), key=lambda item: _bound(item[0])))
            found[name] = Histogram(counts[name], sums.get(name, 0.0), ordered)
    return Scrape(pid, found)


def histogram_delta(before: Histogram | None, after: Histogram) -> dict:
    """What was observed between two scrapes: calls, mean value per call, calls per bucket.

    `buckets` maps each upper bound to the calls whose value fell in (previous bound, bound], not
    Prometheus' cumulative counts, so the distribution reads directly.
    """
    old_buckets = dict(before.buckets) if before else {}
    calls = after.count - (before.count if before else 0.0)
    total = after.sum - (before.sum if before else 0.0)
    per_bucket, previous = {}, 0.0
    for le, cumulative in after.buckets:
        delta = cumulative - old_buckets.get(le, 0.0)
        per_bucket[le] = int(round(delta - previous))
        previous = delta
    return {"calls": int(round(calls)), "sum": total, "mean": total / calls if calls > 0 else None,
            "buckets": per_bucket}


def batch_delta(before: Scrape, after: Scrape) -> dict | None:
    """The batch figures of one measurement, or None when the bidder exports no batch histograms."""
    out: dict = {}
    for name in BATCH_HISTOGRAMS:
        if name in after.histograms:
            out[name] = histogram_delta(before.histograms.get(name), after.histograms[name])
    if not out:
        return None
    out["worker_pid"] = after.pid
    return out


class MetricsProbe:
    """Scrapes `GET /metrics` over one kept-alive connection, so before and after see the same worker."""

    def __init__(self, host: str, port: int, path: str = "/metrics", timeout_s: float = 5.0):
        self.host, self.port, self.path, self.timeout_s = host, port, path, timeout_s
        self.connection: http.client.HTTPConnection | None = None

    def _get(self) -> Scrape | None:
        if self.connection is None:
            self.connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        self.connection.request("GET", self.path)
        response = self.connection.getresponse()
        body = response.read()
        if response.status != 200:
            return None
        return parse_metrics(body.decode("utf-8", errors="replace"))

    def scrape(self, same_pid: str | None = None) -> Scrape | None:
        """One scrape; with `same_pid`, reconnect (a few times) until the page comes from that worker."""
        for _ in range(RECONNECT_TRIES if same_pid is not None else 1):
            try:
                found = self._get()
            except (OSError, http.client.HTTPException, ValueError):
                self.close()  # e.g. the server closed the kept-alive connection: try a new one
                continue
            if found is None or same_pid is None or found.pid == same_pid:
                return found
            self.close()  # another worker answered: a new connection may land on the right one
        return None

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

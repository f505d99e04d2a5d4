"""Prometheus metrics of one worker process (each worker exports its own; scrape each, or sum).

The bid path updates plain Python numbers: a worker is one thread on one event loop, so nothing
needs prometheus-client's per-value locks or its per-bucket loop in ``Histogram.observe`` (together
≈ 3 µs a request). A custom collector turns the numbers into standard metric families when
``/metrics`` is scraped, so the exposition format is prometheus-client's own.
"""
from __future__ import annotations

import os
from bisect import bisect_left
from typing import Iterator, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from bidder.privacy import PRIVACY_CASES

__all__ = ["CONTENT_TYPE_LATEST", "ERROR_KINDS", "Metrics", "NOTICE_KINDS", "NOTICE_ROUTES", "NO_BID_REASONS",
           "ROUTES"]

ROUTES = ("/bid", "/predict", "/healthz", "/readyz", "/metrics", "/admin/reload", "/admin/campaigns")
#: why a request (or one imp of it) got no bid
NO_BID_REASONS = ("currency", "unsupported_format", "no_eligible_creative", "floor_currency", "below_floor",
                  "tmax", "no_matching_deal", "no_surplus",
                  # the OpenRTB blocking rules (bidder/conformance.py)
                  "blocked_seat", "blocked_category", "unknown_cattax", "blocked_app", "requires_consent",
                  "blocked_attribute", "blocked_banner_type", "unsupported_mime", "unsupported_api",
                  # campaign money terms (bidder.ledger): outside its flight, no lease left, throttled by pacing,
                  # the user had as many impressions as a frequency cap allows
                  "flight", "no_budget", "pacing", "frequency_cap")
#: why a request was refused or failed
ERROR_KINDS = ("bad_request", "bad_record", "too_large", "forbidden", "reload_refused", "internal", "not_found",
               "method_not_allowed")
# sub-millisecond resolution where the bid path lives, seconds for the tail
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
REQUEST_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
AUCTIONS = ("first_price", "second_price")
#: routes that exist only with notices on (``Metrics.enable_notices``)
NOTICE_ROUTES = ("/notice", "/click")
NOTICE_KINDS = ("win", "bill", "loss", "click")
#: auction-to-notice delay on the engine's clock: seconds for the wire, minutes and hours for late notices
DELAY_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 600, 1800, 3600, 21600, 86400)


class Count:
    """One counter series: a number the event loop adds to."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class Distribution:
    """One histogram series: per-bucket counts (the last bucket is +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # Prometheus buckets are "less than or equal": the first bound >= value
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, count in zip((*map(_bound_text, self.bounds), "+Inf"), self.counts):
            total += count
            out.append((bound, total))
        return out


def _bound_text(bound: float) -> str:
    return repr(float(bound))


class Family:
    """A labelled metric: ``labels(*values)`` resolves (and creates once) the series."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), make=Count) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._make = make
        self.series: dict[tuple[str, ...], object] = {}

    def labels(self, *values: str):
        series = self.series.get(values)
        if series is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
            series = self.series[values] = self._make()
        return series

    def clear(self) -> None:
        self.series.clear()


class Metrics:
    def __init__(self, worker: int = 0) -> None:
        histogram = Distribution
        self.latency = Family("bidder_request_seconds", "Time from request read to response, per route", ["route"],
                              lambda: histogram(LATENCY_BUCKETS))
        self.responses = Family("bidder_responses", "Responses per route and HTTP status", ["route", "status"])
        self._bids = Family("bidder_bids", "Bids placed (one per imp bid on)")
        self.bids = self._bids.labels()
        self.nobids = Family("bidder_nobids", "Bid requests answered 204, by reason", ["reason"])
        self.nobid_imps = Family("bidder_nobid_imps", "Imps not bid on, by reason", ["reason"])
        self.errors = Family("bidder_errors", "Requests refused (bad input) or failed, by kind", ["kind"])
        self._scored_rows = Family("bidder_scored_rows", "Rows (imps x candidates) scored per request", (),
                                   lambda: histogram(ROW_BUCKETS))
        self.scored_rows = self._scored_rows.labels()
        self._batch_rows = Family("bidder_batch_rows", "Rows per ONNX Runtime call (all requests of a batch)", (),
                                  lambda: histogram(ROW_BUCKETS))
        self.batch_rows = self._batch_rows.labels()
        self._batch_requests = Family("bidder_batch_requests", "Bid requests scored per ONNX Runtime call", (),
                                      lambda: histogram(REQUEST_BUCKETS))
        self.batch_requests = self._batch_requests.labels()
        self._shading = Family("bidder_shading_ratio", "Bid / value of each bid, by auction type (1: not shaded)",
                               ["auction"], lambda: histogram(RATIO_BUCKETS))
        self.shading_first = self._shading.labels(AUCTIONS[0])
        self.shading_second = self._shading.labels(AUCTIONS[1])
        self.reloads = Family("bidder_reloads", "Model/catalog reloads, by result", ["result"])
        self.model = Family("bidder_model_info", "The model being served (value 1)", ["model_id", "architecture"])
        self.worker = Family("bidder_worker_info", "This worker (value 1)", ["worker", "pid"])
        self.worker.labels(str(worker), str(os.getpid())).inc()
        self.privacy = Family("bidder_privacy", "Bid requests by the privacy signal that decided whether their "
                              "personal data is used (docs/conformance.md)", ["case"])
        for case in PRIVACY_CASES:
            self.privacy.labels(case)
        self._counters = (self.responses, self._bids, self.nobids, self.nobid_imps, self.errors, self.reloads,
                          self.privacy)
        self._histograms = (self.latency, self._scored_rows, self._batch_rows, self._batch_requests, self._shading)
        self._gauges = (self.model, self.worker)
        self.route_latency = {route: self.latency.labels(route) for route in ROUTES}
        # every known reason exported from the start at 0, so rates and alerts see a series at once
        for reason in NO_BID_REASONS:
            self.nobids.labels(reason)
            self.nobid_imps.labels(reason)
        for kind in ERROR_KINDS:
            self.errors.labels(kind)
        self._responses: dict[tuple[str, int], Count] = {}
        self.events = None  # the worker's bidder.events.EventLog, when it logs events: its counters are exported
        self.ledger = None  # the worker's bidder.ledger.Ledger, when campaigns have budgets: their spend is exported
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def enable_notices(self, results: Sequence[str]) -> None:
        """Notices on: ``bidder_notices_total{kind,result}`` (every kind and result exported from the start),
        the auction-to-notice delay, and the notice routes' latency. Off, none of these series exists."""
        self.notices = Family("bidder_notices", "Win, billing, loss notices and clicks, by kind and result",
                              ["kind", "result"])
        for kind in NOTICE_KINDS:
            for result in results:
                self.notices.labels(kind, result)
        self.notice_delay = Family("bidder_notice_delay_seconds", "Auction (token issue) to notice, on the "
                                   "engine's clock, per kind; first notices only", ["kind"],
                                   lambda: Distribution(DELAY_BUCKETS))
        for kind in NOTICE_KINDS:
            self.notice_delay.labels(kind)
        self._counters += (self.notices,)
        self._histograms += (self.notice_delay,)
        for route in NOTICE_ROUTES:
            self.route_latency[route] = self.latency.labels(route)

    def response(self, route: str, status: int) -> Count:
        """The responses counter for ``route`` and ``status``, resolved once per pair."""
        child = self._responses.get((route, status))
        if child is None:
            child = self._responses[(route, status)] = self.responses.labels(route, str(status))
        return child

    def set_model(self, model_id: str, architecture: str) -> None:
        self.model.clear()
        self.model.labels(model_id, architecture).inc()

    def collect(self) -> Iterator[Metric]:
        """prometheus-client's collector protocol: the current values as standard families."""
        for family in self._counters:
            out = CounterMetricFamily(family.name, family.documentation, labels=family.labelnames)
            for values, series in list(family.series.items()):
                out.add_metric(values, series.value)
            yield out
        for family in self._histograms:
            out = HistogramMetricFamily(family.name, family.documentation, labels=family.labelnames)
            for values, series in list(family.series.items()):
                out.add_metric(values, series.cumulative(), series.sum)
            yield out
        for family in self._gauges:
            out = GaugeMetricFamily(family.name, family.documentation, labels=family.labelnames)
            for values, series in list(family.series.items()):
                out.add_metric(values, series.value)
            yield out
        if self.events is not None:
            yield from self._event_metrics()
        if self.ledger is not None:
            yield from self._ledger_metrics()

    def _event_metrics(self) -> Iterator[Metric]:
        events = self.events
        dropped = CounterMetricFamily("bidder_events_dropped", "Events not written to the event log, by reason "
                                      "(queue_full: the writer fell behind; write_error: a full disk or an I/O "
                                      "error)", labels=["reason"])
        for reason, count in events.dropped.items():
            dropped.add_metric((reason,), count)
        yield dropped
        yield CounterMetricFamily("bidder_events_written", "Events written to the event log's files",
                                  value=events.written)
        yield GaugeMetricFamily("bidder_events_queued", "Events waiting for the event log's writer",
                                value=events.queued)

    def _ledger_metrics(self) -> Iterator[Metric]:
        """The banker's figures as of this worker's last call to it: the same in every worker (take one, do not
        sum them)."""
        spend = CounterMetricFamily("bidder_spend_usd", "USD committed per budgeted campaign (all workers and "
                                    "machines sharing the banker)", labels=["campaign"])
        remaining = GaugeMetricFamily("bidder_budget_remaining_usd", "USD a budgeted campaign has left: the smaller "
                                      "of its total's and today's", labels=["campaign"])
        ledger = self.ledger
        for campaign, figures in ledger.report().items():
            spend.add_metric((campaign,), figures["spent_total"])
            left = ledger.remaining(ledger.slots[campaign])
            if left is not None:
                remaining.add_metric((campaign,), left)
        yield spend
        yield remaining

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Prometheus metrics of one worker process (each worker exports its own; scrape each, or sum)."""
from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "ERROR_KINDS", "Metrics", "NO_BID_REASONS", "ROUTES"]

ROUTES = ("/bid", "/predict", "/healthz", "/readyz", "/metrics", "/admin/reload")
#: why a request (or one imp of it) got no bid
NO_BID_REASONS = ("currency", "unsupported_format", "no_eligible_creative", "floor_currency", "below_floor",
                  "tmax", "no_matching_deal")
#: why a request was refused or failed
ERROR_KINDS = ("bad_request", "bad_record", "too_large", "forbidden", "reload_refused", "internal", "not_found",
               "method_not_allowed")
# sub-millisecond resolution where the bid path lives, seconds for the tail
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)


class Metrics:
    def __init__(self, worker: int = 0) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram("bidder_request_seconds", "Time from request read to response, per route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.responses = Counter("bidder_responses", "Responses per route and HTTP status", ["route", "status"],
                                 registry=r)
        self.bids = Counter("bidder_bids", "Bids placed (one per imp bid on)", registry=r)
        self.nobids = Counter("bidder_nobids", "Bid requests answered 204, by reason", ["reason"], registry=r)
        self.nobid_imps = Counter("bidder_nobid_imps", "Imps not bid on, by reason", ["reason"], registry=r)
        self.errors = Counter("bidder_errors", "Requests refused (bad input) or failed, by kind", ["kind"],
                              registry=r)
        self.scored_rows = Histogram("bidder_scored_rows", "Rows (imps x candidates) scored per request",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.reloads = Counter("bidder_reloads", "Model/catalog reloads, by result", ["result"], registry=r)
        self.model = Gauge("bidder_model_info", "The model being served (value 1)", ["model_id", "architecture"],
                           registry=r)
        self.worker = Gauge("bidder_worker_info", "This worker (value 1)", ["worker", "pid"], registry=r)
        self.worker.labels(str(worker), str(os.getpid())).set(1)
        # label children resolved once: labels() costs a dict lookup and a lock per call
        self.route_latency = {route: self.latency.labels(route) for route in ROUTES}
        # every known reason exported from the start at 0, so rates and alerts see a series at once
        for reason in NO_BID_REASONS:
            self.nobids.labels(reason)
            self.nobid_imps.labels(reason)
        for kind in ERROR_KINDS:
            self.errors.labels(kind)
        self._responses: dict[tuple[str, int], Counter] = {}

    def response(self, route: str, status: int) -> Counter:
        """The responses counter child for ``route`` and ``status``, resolved once per pair."""
        child = self._responses.get((route, status))
        if child is None:
            child = self._responses[(route, status)] = self.responses.labels(route, str(status))
        return child

    def set_model(self, model_id: str, architecture: str) -> None:
        self.model.clear()
        self.model.labels(model_id, architecture).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)

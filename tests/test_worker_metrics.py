"""The supervisor's one scrape: every worker's exposition merged into one that Prometheus' own parser reads, each
family once, each sample labelled with its worker. (A real two-worker server: tests/test_operations_process.py.)"""
from __future__ import annotations

from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from bidder.metrics import Metrics
from bidder.worker_metrics import MetricsServer, merge


def exposition(worker: int, bids: int, model: str) -> str:
    metrics = Metrics(worker)
    metrics.bids.inc(bids)
    metrics.nobids.labels("below_floor").inc(worker + 1)
    metrics.route_latency["/bid"].observe(0.002)
    metrics.set_model(model, "deepfm")
    return metrics.render().decode()


def test_one_exposition_with_every_workers_samples():
    merged = merge({0: exposition(0, 3, "m-1"), 1: exposition(1, 5, 'odd "model", {v2}')})
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    assert merged.count("# TYPE bidder_bids_total counter") == 1  # each family once
    bids = {s.labels["worker"]: s.value for s in families["bidder_bids"].samples}
    assert bids == {"0": 3, "1": 5}
    below = {s.labels["worker"]: s.value for s in families["bidder_nobids"].samples
             if s.labels["reason"] == "below_floor"}
    assert below == {"0": 1, "1": 2}
    models = {s.labels["worker"]: s.labels["model_id"] for s in families["bidder_model_info"].samples}
    assert models == {"0": "m-1", "1": 'odd "model", {v2}'}
    counts = [s for s in families["bidder_request_seconds"].samples
              if s.name.endswith("_count") and s.labels["route"] == "/bid"]
    assert sorted((s.labels["worker"], s.value) for s in counts) == [("0", 1), ("1", 1)]
    # the worker's own worker label is kept, not doubled
    info = families["bidder_worker_info"].samples
    assert sorted(s.labels["worker"] for s in info) == ["0", "1"]


def test_no_worker_answered():
    assert merge({}) == ""


def test_the_grafana_dashboard_loads_and_asks_only_for_metrics_the_bidder_exports():
    import json
    import re
    from pathlib import Path

    from bidder.app import NOTICE_RESULTS

    dashboard = json.loads((Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "bidder.json").read_text())
    assert dashboard["uid"] and dashboard["panels"]
    metrics = Metrics(0)
    metrics.enable_notices(NOTICE_RESULTS)  # as with --notice-url
    metrics.response("/bid", 200).inc()  # responses are series once one was answered
    metrics.events = SimpleNamespace(dropped={"queue_full": 0}, written=0, queued=0)  # as with --events
    supervisor = MetricsServer("127.0.0.1", 0, sockets=dict, restarts=lambda: {0: 1})
    try:
        text = merge({0: metrics.render().decode()}) + supervisor.render().decode()
    finally:
        supervisor.server.server_close()
    exported = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    asked = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            asked |= set(re.findall(r"\b(bidder_[a-z_]+)", target["expr"]))
    assert asked and asked <= exported, asked - exported

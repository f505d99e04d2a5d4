"""A real two-worker server as an operator runs it: JSON log lines (the supervisor's pid at start-up, each
worker's start, restart and drain as events, nothing per bid request), and one scrape of --metrics-port that
sees every worker."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from processes import Server, http, reserve_port

pytestmark = pytest.mark.slow
SIMPLE_BANNER = "bid-request-2.5/simple-banner.json"


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    status, body = http(port, "/metrics")
    assert status == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def value(samples, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


def events(server: Server, after: int = 0) -> list[dict]:
    return [json.loads(line) for line in server.lines[after:]]


def wait_for_event(server: Server, name: str, count: int = 1, after: int = 0) -> list[dict]:
    server.wait_for(rf'"event":"{name}"', count=count, after=after)
    return [e for e in events(server, after) if e["event"] == name]


def test_two_workers_log_json_and_one_scrape_sees_both(small_bundle, openrtb_examples):
    holder = reserve_port()
    metrics_port = holder.getsockname()[1]
    holder.close()  # the supervisor binds it in a moment
    with Server("--model", str(small_bundle), "--now", "2026-11-25T14:00:00Z", "--log-format", "json",
                "--metrics-port", str(metrics_port), workers=2) as server:
        pids = server.wait_ready(workers=2)
        (started,) = wait_for_event(server, "supervisor_started")
        assert started["pid"] == server.process.pid and started["worker"] == "supervisor"
        assert started["workers"] == 2 and started["metrics_port"] == metrics_port
        workers = wait_for_event(server, "worker_started", count=2)
        assert {(w["worker"], w["pid"]) for w in workers} == set(pids.items())
        for line in events(server):  # every line an object with the common keys
            assert {"ts", "level", "worker", "pid", "event", "message"} <= line.keys(), line

        quiet = server.mark()
        body = openrtb_examples[SIMPLE_BANNER]
        for _ in range(20):
            assert http(server.port, "/bid", body)[0] in (200, 204)
        deadline = time.monotonic() + 30
        while True:  # the workers answered; their counts reach the supervisor's scrape
            samples = scrape(metrics_port)
            answered = sum(v for (name, labels), v in samples.items()
                           if name == "bidder_responses_total" and ("route", "/bid") in labels)
            if answered == 20 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert answered == 20
        assert value(samples, "bidder_workers") == value(samples, "bidder_workers_scraped") == 2
        for worker, pid in pids.items():
            assert value(samples, "bidder_worker_info", worker=str(worker), pid=str(pid)) == 1
            assert ("bidder_bids_total", frozenset({("worker", str(worker))})) in samples
        assert server.lines[quiet:] == []  # nothing logged per bid request

        os.kill(pids[1], signal.SIGKILL)
        (exited,) = wait_for_event(server, "worker_exited", after=quiet)
        assert (exited["index"], exited["worker_pid"], exited["status"]) == (1, pids[1], -9)
        (restarted,) = wait_for_event(server, "worker_started", after=quiet)
        assert restarted["worker"] == 1 and restarted["pid"] != pids[1]
        deadline = time.monotonic() + 30
        while value(samples := scrape(metrics_port), "bidder_workers_scraped") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert value(samples, "bidder_worker_restarts_total", worker="1") == 1
        assert value(samples, "bidder_workers_scraped") == 2

        stopping = server.mark()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) == 0
        drained = wait_for_event(server, "drain_finished", count=2, after=stopping)
        assert sorted(d["worker"] for d in drained) == [0, 1] and all(d["abandoned"] == 0 for d in drained)
        assert wait_for_event(server, "supervisor_stopped", after=stopping)[0]["status"] == 0

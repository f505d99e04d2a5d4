"""The server as real processes: the command line and its exit codes, flags that reach the workers, SIGTERM
drains in-flight requests (and /readyz says so), dead workers come back, SIGHUP re-reads the bundle and the
campaigns file (the supervisor forwards it to every worker), refused reloads keep what was served.

Every wait is on something the server says (a log line, /readyz) and ports are reserved, not guessed."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import oracle
from bidder.__main__ import main
from bidder.app import DEFAULT_CAMPAIGNS
from processes import Server

pytestmark = pytest.mark.slow
SIMPLE_BANNER = "bid-request-2.5/simple-banner.json"


def model_id(bundle: Path) -> str:
    return json.loads((bundle / "meta.json").read_text())["model_id"]


def bid_and_check(server: Server, request: dict, catalog: Path, bundle: Path, exchange: str | None = None,
                  utc_offset_hours: float = 0.0) -> oracle.Expectation:
    before = time.time()
    status, body = server.post("/bid" if exchange is None else f"/bid/{exchange}", json.dumps(request).encode())
    after = time.time()
    assert status in (200, 204), (status, body)
    return oracle.check(request, oracle.raw_catalog(catalog), oracle.oracle_scorer(bundle), exchange, before, after,
                        status, json.loads(body) if status == 200 else None, utc_offset_hours)


# -- the command line ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--workers", "--max-batch", "--max-body"])
def test_non_positive_sizes_are_refused_with_exit_2(flag, capsys):
    assert main(["serve", flag, "0"]) == 2
    assert "must be positive" in capsys.readouterr().err


def test_a_broken_bundle_or_catalog_is_refused_before_serving(small_bundle, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(small_bundle, broken)
    (broken / "model.onnx").write_bytes(b"garbage")
    assert main(["serve", "--model", str(broken), "--campaigns", str(DEFAULT_CAMPAIGNS)]) == 2
    assert "model.onnx" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "missing"), "--campaigns", str(DEFAULT_CAMPAIGNS)]) == 2
    assert "missing" in capsys.readouterr().err
    catalog = tmp_path / "catalog.json"
    catalog.write_text('{"campaigns": [{"id": "c"}]}')
    assert main(["serve", "--model", str(small_bundle), "--campaigns", str(catalog)]) == 2
    assert "catalog.json" in capsys.readouterr().err


def test_the_exit_status_reaches_the_shell(tmp_path):
    """``python -m bidder`` exits with main()'s status; bad flags are argparse's usage errors (2)."""
    for args in (["serve", "--workers", "0"], ["serve", "--model", str(tmp_path / "missing")],
                 ["serve", "--port", "eighty"], []):
        done = subprocess.run([sys.executable, "-m", "bidder", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and done.stderr, (args, done.stdout, done.stderr)


def test_serving_flags_reach_the_worker(small_bundle, second_catalog, sample_records):
    """--max-batch 2 (every request here scores more rows: chunks), --max-body 3000, --utc-offset 12."""
    with Server("--model", str(small_bundle), "--campaigns", str(second_catalog), "--max-batch", "2",
                "--max-body", "3000", "--utc-offset", "12") as server:
        server.wait_ready()
        assert server.post("/bid", b"{" + b" " * 3000 + b"}")[0] == 413
        assert server.post("/bid", b"{" + b" " * 2990 + b"}")[0] == 400
        bids = 0
        for exchange, request in oracle.generate_requests(oracle.raw_catalog(second_catalog), 30, seed=40):
            if len(json.dumps(request)) < 3000:
                expectation = bid_and_check(server, request, second_catalog, small_bundle, exchange, 12)
                bids += expectation.status == 200
        assert bids >= 5
        status, body = server.post("/predict", json.dumps({"records": sample_records[:5]}).encode())
        assert status == 200
        assert json.loads(body)["ctr"] == oracle.oracle_scorer(small_bundle).predict(sample_records[:5]).tolist()
        assert server.stop() == 0


# -- draining ------------------------------------------------------------------------------------------------
def test_sigterm_drains_in_flight_requests_and_readyz_says_draining(small_bundle, openrtb_examples):
    body = openrtb_examples[SIMPLE_BANNER]
    with Server("--model", str(small_bundle), "--campaigns", str(DEFAULT_CAMPAIGNS)) as server:
        server.wait_ready()
        probe = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)  # a kept-alive connection
        probe.request("GET", "/readyz")
        first = probe.getresponse()
        assert first.status == 200 and json.loads(first.read())["ready"] is True
        conn = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        # Expect: 100-continue: the server answers "100 Continue" when the request reaches its handler, so once
        # it is read the request is in flight (headers read, body pending)
        conn.sendall(b"POST /bid HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
        interim = b""
        while b"\r\n\r\n" not in interim:
            interim += conn.recv(1024)
        assert interim.startswith(b"HTTP/1.1 100"), interim
        mark = server.mark()
        server.signal(signal.SIGTERM)
        server.wait_for(r"draining 1 in-flight request", after=mark)
        probe.request("GET", "/readyz")
        ready = probe.getresponse()
        assert ready.status == 503 and json.loads(ready.read()) == {"ready": False, "draining": True}
        probe.close()
        assert server.process.poll() is None, "the server must wait for the in-flight request"
        conn.sendall(body)
        response = b""
        while chunk := conn.recv(65536):
            response += chunk
        conn.close()
        assert response.startswith(b"HTTP/1.1 200"), response[:200]
        assert json.loads(response.split(b"\r\n\r\n", 1)[1])["seatbid"]
        assert server.process.wait(timeout=30) == 0


# -- workers ---------------------------------------------------------------------------------------------------
def test_workers_share_the_port_and_a_dead_worker_is_replaced(small_bundle, openrtb_examples):
    with Server("--model", str(small_bundle), "--campaigns", str(DEFAULT_CAMPAIGNS), workers=2) as server:
        pids = server.wait_ready(workers=2)
        assert sorted(pids) == [0, 1] and len(set(pids.values())) == 2
        mark = server.mark()
        victim = pids[0]
        os.kill(victim, signal.SIGKILL)
        server.wait_for(r"worker 0 exited with -9; restarting", after=mark)
        (restarted,) = server.wait_for(r"worker 0 \(pid (\d+)\) serving", after=mark)
        assert int(restarted.group(1)) not in (victim, pids[1])
        status, _ = server.post("/bid", openrtb_examples[SIMPLE_BANNER])
        assert status == 200
        mark = server.mark()
        server.signal(signal.SIGHUP)  # the supervisor forwards it: every worker reloads
        reloaded = server.wait_for(r"worker-(\d+) INFO reloaded: serving", count=2, after=mark)
        assert {m.group(1) for m in reloaded} == {"0", "1"}
        assert server.stop() == 0


# -- SIGHUP ----------------------------------------------------------------------------------------------------
def test_sighup_rereads_bundle_and_campaigns_and_a_refused_reload_keeps_both(small_bundle, logreg_bundle,
                                                                            second_catalog, tmp_path,
                                                                            openrtb_examples):
    bundle, campaigns = tmp_path / "bundle", tmp_path / "campaigns.json"
    shutil.copytree(small_bundle, bundle)
    shutil.copy(DEFAULT_CAMPAIGNS, campaigns)
    request = json.loads(openrtb_examples[SIMPLE_BANNER])  # www.foobar.com: the second catalog targets it

    def reload(expect: str) -> None:
        mark = server.mark()
        server.signal(signal.SIGHUP)
        server.wait_for(expect, after=mark)

    def serving(model: Path, catalog: Path) -> None:
        assert json.loads(server.get("/readyz")[1])["model"] == model_id(model)
        assert bid_and_check(server, request, catalog, model).status == 200

    with Server("--model", str(bundle), "--campaigns", str(campaigns)) as server:
        server.wait_ready()
        serving(small_bundle, DEFAULT_CAMPAIGNS)
        shutil.copy(second_catalog, campaigns)
        reload(r"reloaded: serving")
        serving(small_bundle, second_catalog)
        shutil.rmtree(bundle)
        shutil.copytree(logreg_bundle, bundle)
        reload(r"reloaded: serving " + model_id(logreg_bundle))
        serving(logreg_bundle, second_catalog)
        campaigns.write_text('{"campaigns": [{"id": "c"}]}')
        reload(r"reload refused, still serving " + model_id(logreg_bundle))
        serving(logreg_bundle, second_catalog)
        shutil.copy(DEFAULT_CAMPAIGNS, campaigns)  # a good catalog, but a broken bundle: neither is taken
        (bundle / "model.onnx").write_bytes(b"garbage")
        reload(r"reload refused, still serving " + model_id(logreg_bundle))
        serving(logreg_bundle, second_catalog)
        metrics = server.get("/metrics")[1]
        assert oracle.metric(metrics.decode(), "bidder_reloads_total", result="refused") == 2
        assert oracle.metric(metrics.decode(), "bidder_reloads_total", result="ok") == 2
        assert server.stop() == 0

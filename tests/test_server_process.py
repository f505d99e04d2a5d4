"""The server as real processes: SIGTERM drains in-flight requests, dead workers come back, SIGHUP reloads
(and the supervisor forwards it to every worker)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from bidder.server import DEFAULT_CAMPAIGNS

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def start(bundle: Path, port: int, workers: int = 1) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "bidder", "serve", "--model", str(bundle), "--campaigns", str(DEFAULT_CAMPAIGNS),
         "--port", str(port), "--workers", str(workers), "--no-pin"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if get(port, "/readyz")[0] == 200:
                return process
        except OSError:
            pass
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"server did not start:\n{process.stdout.read().decode()}")


def worker_pids(port: int, attempts: int = 40) -> set[int]:
    """Worker pids as the workers report them in /metrics (SO_REUSEPORT spreads connections)."""
    pids = set()
    for _ in range(attempts):
        _, text = get(port, "/metrics")
        for line in text.decode().splitlines():
            if line.startswith("bidder_worker_info{"):
                pids.add(int(line.split('pid="')[1].split('"')[0]))
    return pids


def test_sigterm_drains_in_flight_requests(small_bundle, openrtb_examples):
    port = free_port()
    server = start(small_bundle, port)
    body = openrtb_examples["bid-request-2.5/simple-banner.json"]
    try:
        conn = socket.create_connection(("127.0.0.1", port))
        conn.sendall(b"POST /bid HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body[:40])
        time.sleep(0.3)  # the request is in flight: headers read, body pending
        server.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert server.poll() is None, "the server must wait for the in-flight request"
        conn.sendall(body[40:])
        response = b""
        while chunk := conn.recv(65536):
            response += chunk
        conn.close()
        assert response.startswith(b"HTTP/1.1 200"), response[:200]
        assert json.loads(response.split(b"\r\n\r\n", 1)[1])["seatbid"]
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()


def test_workers_share_the_port_and_a_dead_worker_is_replaced(small_bundle, openrtb_examples):
    port = free_port()
    server = start(small_bundle, port, workers=2)
    try:
        deadline = time.monotonic() + 30
        pids = worker_pids(port)
        while len(pids) < 2 and time.monotonic() < deadline:
            pids |= worker_pids(port)
        assert len(pids) == 2, pids
        victim = sorted(pids)[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        seen: set[int] = set()
        while time.monotonic() < deadline:
            try:
                seen |= worker_pids(port, attempts=10)
            except OSError:
                pass
            if len(seen - {victim}) == 2:
                break
            time.sleep(0.2)
        assert victim not in seen and len(seen) == 2, (victim, seen)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/bid",
                                         data=openrtb_examples["bid-request-2.5/simple-banner.json"])
        with urllib.request.urlopen(request, timeout=5) as r:
            assert r.status == 200
        server.send_signal(signal.SIGHUP)  # the supervisor forwards it: every worker reloads
        reloaded: set[int] = set()
        while len(reloaded) < 2:
            assert time.monotonic() < deadline + 30, f"reloaded workers: {reloaded}"
            _, text = get(port, "/metrics")
            if b'bidder_reloads_total{result="ok"} 1.0' in text:
                reloaded.add(int(text.split(b'pid="')[1].split(b'"')[0]))
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=40) == 0
    finally:
        if server.poll() is None:
            server.kill()


def test_sighup_reloads_and_a_broken_bundle_keeps_the_old_model(small_bundle, tmp_path):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(small_bundle, bundle)
    port = free_port()
    server = start(bundle, port)
    try:
        model_before = json.loads(get(port, "/readyz")[1])["model"]
        (bundle / "model.onnx").write_bytes(b"garbage")
        server.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while b'bidder_reloads_total{result="refused"} 1.0' not in get(port, "/metrics")[1]:
            assert time.monotonic() < deadline, "the refused reload was not counted"
            time.sleep(0.1)
        assert json.loads(get(port, "/readyz")[1])["model"] == model_before
        shutil.copy(small_bundle / "model.onnx", bundle / "model.onnx")
        server.send_signal(signal.SIGHUP)
        while b'bidder_reloads_total{result="ok"} 1.0' not in get(port, "/metrics")[1]:
            assert time.monotonic() < deadline, "the good reload was not counted"
            time.sleep(0.1)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()

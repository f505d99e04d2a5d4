"""The load benchmark's parts that need no wrk: parsing, report arithmetic, echo app, process handling."""
from __future__ import annotations

import asyncio
import http.server
import json
import shutil
import socket
import sys
import threading
from pathlib import Path

import msgspec
import pytest

from bench import servers
from bench.__main__ import main as bench_main
from bench.echo import make_app
from bench.load import parse_cpus, preflight, scaling_cpus
from bench.report import Measurement, build_report, comparisons, format_table, ratios, scaling
from bench.servers import BenchError
from bench.wrk_driver import INSTALL_HINT, MARKER, SCRIPT, WrkResult, parse_output, wrk_path
from processes import reserve_port

BODY = (Path(__file__).resolve().parents[2] / "shared" / "openrtb" / "bid-request-2.5" / "simple-banner.json")

WRK_STDOUT = """Running 3s test @ http://127.0.0.1:8080/bid
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.26ms  257.13us  12.34ms   96.94%
  28342 requests in 2.00s, 5.54MB read
Requests/sec:  14165.02
WRK_JSON {"duration_us": 2000000, "requests": 28000, "bytes": 5810110, "errors": {"connect": 0, "read": 1, "write": 0, "status": 3, "timeout": 2}, "latency_us": {"min": 401, "max": 12343, "mean": 2255.98, "stdev": 257.13}, "percentiles_us": [[0, 401], [50, 2235], [90, 2297], [99, 3441], [99.9, 5259], [99.999, 12343]], "statuses": {"200": 27000, "204": 997, "503": 3}}
"""


def wrk_result(rps: float, p50_us: float, scale: float = 1.0, statuses=None) -> WrkResult:
    """A 2-second result with the given throughput and percentiles proportional to P50."""
    percentiles = [(50.0, p50_us), (90.0, p50_us * 1.5 * scale), (99.0, p50_us * 3 * scale),
                   (99.9, p50_us * 6 * scale)]
    return WrkResult(duration_s=2.0, requests=int(rps * 2), bytes=0, errors={"connect": 0, "read": 0, "write": 0,
                     "status": 0, "timeout": 0}, latency_us={"max": p50_us * 10}, percentiles_us=percentiles,
                     statuses=statuses or {"200": int(rps * 2)})


def measurement(server: str, connections: int, rps: float, p50_us: float, workers: int = 1) -> Measurement:
    return Measurement(server, workers, connections, 1, "0", "1", wrk_result(rps, p50_us))


# --- wrk output --------------------------------------------------------------------------------------

def test_parse_output_reads_the_marker_line():
    result = parse_output(WRK_STDOUT)
    assert result.duration_s == 2.0
    assert result.rps == 14000.0
    assert result.percentile_us(99.9) == 5259
    assert result.percentile_us(50) == 2235
    assert result.socket_errors == 3          # read + timeout; "status" is not a socket error
    assert result.non_2xx == 3                # 204 is a success status, 503 is not
    assert result.statuses == {"200": 27000, "204": 997, "503": 3}
    assert json.loads(json.dumps(result.to_dict()))["rps"] == 14000.0


def test_parse_output_without_marker_shows_wrk_output():
    with pytest.raises(BenchError, match="(?s)no WRK_JSON line.*unable to connect"):
        parse_output("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_missing_percentile_is_named():
    with pytest.raises(KeyError, match="P75"):
        parse_output(WRK_STDOUT).percentile_us(75)


def test_lua_script_prints_the_marker_and_every_table_percentile():
    text = SCRIPT.read_text()
    assert MARKER.strip() in text
    for p in ("50", "90", "99", "99.9"):
        assert f" {p}," in text


def test_missing_wrk_is_a_clear_message(monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(BenchError, match="^wrk not found: apt-get install -y wrk$"):
        wrk_path()
    assert bench_main(["load", "--quick"]) == 1
    assert capsys.readouterr().err.strip() == f"error: {INSTALL_HINT}"


# --- report ------------------------------------------------------------------------------------------

def test_ratios_are_bidder_over_echo():
    echo, bidder = measurement("echo", 32, 14000, 2000), measurement("bidder", 32, 7000, 5000)
    got = ratios(bidder, echo)
    assert got["rps"] == pytest.approx(0.5)
    assert got["p50"] == pytest.approx(2.5)
    assert got["p99.9"] == pytest.approx(2.5)


def test_ratio_of_an_empty_ceiling_is_none():
    echo = Measurement("echo", 1, 1, 1, None, None, wrk_result(0, 0))
    assert ratios(measurement("bidder", 1, 100, 100), echo)["rps"] is None


def test_table_pairs_each_scenario_and_adds_a_ratio_row():
    runs = [measurement("echo", 1, 9000, 100), measurement("bidder", 1, 3000, 300),
            measurement("echo", 32, 14000, 2000), measurement("bidder", 32, 7000, 4000)]
    lines = format_table(runs).splitlines()
    assert lines[0].split()[:4] == ["server", "workers", "conns", "rps"]
    body = [line.split() for line in lines[2:]]
    assert [row[0] for row in body] == ["echo", "bidder", "bidder/echo", "echo", "bidder", "bidder/echo"]
    assert body[1][3] == "3,000" and body[1][4] == "0.300"            # rps, P50 in ms
    assert body[2][1:6] == ["0.33x", "3.00x", "3.00x", "3.00x", "3.00x"]
    assert body[5][1] == "0.50x"
    assert [c["connections"] for c in comparisons(runs)] == [1, 32]


def test_table_without_bidder_has_no_ratio_row():
    lines = format_table([measurement("echo", 32, 14000, 2000)]).splitlines()
    assert len(lines) == 3 and "bidder/echo" not in lines[-1]


def test_scaling_compares_with_the_single_worker_saturation_run():
    runs = [measurement("bidder", 1, 1000, 300), measurement("bidder", 32, 4000, 4000),
            measurement("bidder", 64, 6000, 5000, workers=2)]
    [entry] = scaling(runs)
    assert entry["speedup"] == pytest.approx(1.5)
    assert entry["single_worker_rps"] == pytest.approx(4000)


def test_report_is_json():
    runs = [measurement("echo", 32, 14000, 2000), measurement("bidder", 32, 7000, 4000)]
    report = build_report(runs, created="2024-01-01T00:00:00Z", machine={"nproc": 2}, config={"duration_s": 3},
                          preflight={"bidder/workers=1": {"status": 200}}, notes=["noisy"])
    decoded = json.loads(json.dumps(report))
    assert decoded["runs"][1]["latency_ms"]["p50"] == 4.0
    assert decoded["comparison"][0]["bidder_over_echo"]["rps"] == 0.5


# --- echo server -------------------------------------------------------------------------------------

async def test_echo_decodes_the_body_and_answers_small_json(aiohttp_client):
    client = await aiohttp_client(make_app())
    response = await client.post("/bid", data=BODY.read_bytes(), headers={"Content-Type": "application/json"})
    assert response.status == 200
    assert msgspec.json.decode(await response.read()) == {"id": "80ce30c53c16e6ede735f123ef6e32361bfc7b22",
                                                           "echo": True}
    assert (await client.post("/bid/openx", data=b"[1]")).status == 200


async def test_echo_rejects_invalid_json_and_reports_ready(aiohttp_client):
    client = await aiohttp_client(make_app())
    assert (await client.post("/bid", data=b"{not json")).status == 400
    assert (await client.get("/readyz")).status == 200
    assert (await client.get("/healthz")).status == 200


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="needs wrk")
async def test_lua_script_output_parses_against_the_echo_app(aiohttp_server):
    server = await aiohttp_server(make_app())
    process = await asyncio.create_subprocess_exec(
        "wrk", "-t1", "-c2", "-d1s", "-s", str(SCRIPT), f"http://127.0.0.1:{server.port}/bid", "--", str(BODY),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    stdout, _ = await process.communicate()
    result = parse_output(stdout.decode())
    assert result.requests > 0 and result.statuses == {"200": result.requests}
    assert result.percentile_us(50) <= result.percentile_us(99.9)


# --- CPUs, preflight, processes ----------------------------------------------------------------------

def test_parse_cpus():
    assert parse_cpus("0") == {0}
    assert parse_cpus("0,2-4") == {0, 2, 3, 4}
    with pytest.raises(BenchError, match="not a CPU list"):
        parse_cpus("core0")


def test_scaling_cpus_keep_wrk_apart_when_cores_allow():
    assert scaling_cpus(2, [0, 1, 2, 3]) == ("0,1", "2,3", None)
    server, client, note = scaling_cpus(2, [0, 1])
    assert (server, client) == ("0,1", "0,1") and "shares" in note


class _Answer(http.server.BaseHTTPRequestHandler):
    status, payload = 200, b""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_bidder():
    """A local HTTP server answering POSTs with whatever status and payload the test sets."""
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _Answer)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}/bid"
    httpd.shutdown()
    httpd.server_close()


def test_preflight_refuses_a_no_bid(stub_bidder, monkeypatch):
    _, url = stub_bidder
    monkeypatch.setattr(_Answer, "status", 204)
    with pytest.raises(BenchError, match="204 \\(no bid\\)"):
        preflight("bidder", url, b"{}", allow_no_bid=False)
    assert preflight("bidder", url, b"{}", allow_no_bid=True)["status"] == 204


def test_preflight_counts_bids(stub_bidder, monkeypatch):
    _, url = stub_bidder
    payload = json.dumps({"id": "1", "seatbid": [{"bid": [{"price": 1.5}]}]}).encode()
    monkeypatch.setattr(_Answer, "payload", payload)
    assert preflight("bidder", url, b"{}", allow_no_bid=False) == {"status": 200, "response_bytes": len(payload),
                                                                   "bids": 1, "prices": [1.5]}
    monkeypatch.setattr(_Answer, "status", 500)
    with pytest.raises(BenchError, match="answered 500"):
        preflight("bidder", url, b"{}", allow_no_bid=False)


def test_a_server_that_dies_is_reported_with_its_log(tmp_path):
    command = [sys.executable, "-c", "import sys; print('model bundle missing'); sys.exit(3)"]
    with pytest.raises(BenchError, match="(?s)exited with status 3.*model bundle missing"):
        with servers.running("bidder", command, "http://127.0.0.1:1", ready_path="/readyz",
                             startup_timeout_s=10, log_dir=tmp_path):
            pass


def test_a_missing_program_is_reported(tmp_path):
    with pytest.raises(BenchError, match="not found"):
        with servers.running("x", ["/nonexistent/server"], "http://127.0.0.1:1", ready_path="/",
                             startup_timeout_s=1, log_dir=tmp_path):
            pass


def test_echo_server_process_starts_answers_and_is_torn_down(tmp_path):
    with reserve_port() as holder:  # bound until the test ends: no other process can take the port meanwhile
        port = holder.getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "bench.echo", "--port", str(port)]
        with servers.running("echo", command, base, ready_path="/readyz", startup_timeout_s=30, port=port,
                             log_dir=tmp_path) as server:
            assert preflight("echo", base + "/bid", BODY.read_bytes(), allow_no_bid=False)["status"] == 200
        assert server.process.returncode is not None
        assert servers.listening_sockets(port) == 0


def test_listening_sockets_counts_a_listener():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert servers.listening_sockets(sock.getsockname()[1]) == 1

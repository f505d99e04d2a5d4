"""The load benchmark's parts that need no wrk: parsing, report arithmetic, echo app, process handling."""
from __future__ import annotations

import argparse
import asyncio
import http.server
import json
import shutil
import socket
import sys
import threading

import msgspec
from aiohttp import web
import pytest
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest

from bench import load, servers
from bench.__main__ import add_load_arguments, load_config
from bench.__main__ import main as bench_main
from bench.echo import handle as echo_handle
from bench.echo import make_app
from bench.load import LoadConfig, parse_cpus, preflight, price_agreement, scaling_cpus, summary
from bench.report import (Measurement, build_report, comparisons, format_scaling, format_table, format_target, groups,
                          medians, pair_ratios, ratios, scaling, target_check)
from bench.scrape import MetricsProbe, batch_delta, parse_metrics
from bench.servers import BenchError
from bench.wrk_driver import (INSTALL_HINT, MARKER, SCRIPT, WrkResult, distinct_ids_body, parse_output, wrk_command,
                              wrk_path)
from bidder import OPENRTB_EXAMPLES
from processes import reserve_port

BODY = OPENRTB_EXAMPLES / "bid-request-2.5" / "simple-banner.json"

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


def measurement(server: str, connections: int, rps: float, p50_us: float, workers: int = 1,
                cpu_us: float | None = None) -> Measurement:
    return Measurement(server, workers, connections, 1, "0", "1", wrk_result(rps, p50_us), cpu_us=cpu_us)


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


def test_lua_scripts_print_the_marker_and_every_table_percentile():
    text = (SCRIPT.parent / "report.lua").read_text()  # what post_json.lua and paced.lua share
    assert MARKER.strip() in text
    for p in ("50", "90", "99", "99.9"):
        assert f" {p}," in text
    for script in (SCRIPT, SCRIPT.parent / "paced.lua"):
        assert '.. "report.lua")' in script.read_text()


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


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="needs wrk")
@pytest.mark.parametrize("pace, low, high", [("rate=100", 160, 240), ("20", 20, 80)])
async def test_a_paced_schedule_sends_its_rate_whatever_the_latency(aiohttp_server, tmp_path, pace, low, high):
    """``paced.lua rate=R`` offers R requests a second however long the answers take (30 ms here): 100/s for 2 s
    over 8 connections is about 200 requests. A pause between answers sends fewer as the server slows: 20 ms on one
    connection, 2 s / (20 + 30 ms), about 40."""
    async def slow(request):
        await asyncio.sleep(0.03)
        return web.Response(text="")

    app = web.Application()
    app.router.add_get("/{tail:.*}", slow)
    server = await aiohttp_server(app)
    paths = tmp_path / "paths.txt"
    paths.write_text("/a\n/b\n")
    connections = "-c8" if pace.startswith("rate=") else "-c1"
    process = await asyncio.create_subprocess_exec(
        "wrk", "-t1", connections, "-d2s", "-s", str(SCRIPT.parent / "paced.lua"), f"http://127.0.0.1:{server.port}",
        "--", "get", str(paths), pace, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    stdout, _ = await process.communicate()
    result = parse_output(stdout.decode())
    assert low <= result.requests <= high and result.statuses == {"200": result.requests}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="needs wrk")
async def test_distinct_ids_give_every_request_its_own_id_and_keep_the_rest(aiohttp_server, tmp_path):
    seen = []

    async def record(request):
        seen.append(msgspec.json.decode(await request.read()))
        return web.Response(body=b"{}", content_type="application/json")

    app = web.Application()
    app.router.add_post("/bid", record)
    server = await aiohttp_server(app)
    body = distinct_ids_body(BODY, tmp_path / "body.json")
    command = wrk_command(f"http://127.0.0.1:{server.port}/bid", body, connections=2, threads=2, duration_s=1,
                          timeout_s=2, cpus=None, distinct_ids=True)
    process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.STDOUT)
    stdout, _ = await process.communicate()
    result = parse_output(stdout.decode())
    ids = [request.pop("id") for request in seen]
    assert result.requests > 0 and len(ids) >= result.requests
    assert len(set(ids)) == len(ids)                     # no id twice, across both threads
    assert {i.split("-")[0] for i in ids} == {"0", "1"}
    original = msgspec.json.decode(BODY.read_bytes())
    original.pop("id")
    assert all(request == original for request in seen)  # nothing else of the body changed


def test_distinct_ids_body_refuses_what_is_not_a_json_object(tmp_path):
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(BenchError, match="not a JSON object"):
        distinct_ids_body(tmp_path / "list.json", tmp_path / "out.json")
    with pytest.raises(BenchError, match="cannot read the request body"):
        distinct_ids_body(tmp_path / "missing.json", tmp_path / "out.json")


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


# --- repetitions, medians, pair ratios, the target -----------------------------------------------------

def run(server: str, connections: int, rps: float, p50_us: float, repetition: int = 1, workers: int = 1,
        batch: dict | None = None) -> Measurement:
    return Measurement(server, workers, connections, 1, "0", "1", wrk_result(rps, p50_us), repetition, batch)


def repeated_runs() -> list[Measurement]:
    """Three passes over c=1 and c=32, in the order run_phase measures them (pass by pass)."""
    echo32, bidder32 = (10000, 20000, 12000), (6000, 6000, 9000)
    runs = []
    for i in range(3):
        runs += [run("echo", 1, 8000, 100, i + 1), run("bidder", 1, 4000, 250 + 10 * i, i + 1),
                 run("echo", 32, echo32[i], 2000, i + 1), run("bidder", 32, bidder32[i], 1000 * (i + 1), i + 1)]
    return runs


def test_groups_order_by_scenario_then_repetition():
    got = [(g["echo"].connections, g["echo"].repetition) for g in groups(repeated_runs())]
    assert got == [(1, 1), (1, 2), (1, 3), (32, 1), (32, 2), (32, 3)]


def test_medians_per_server_and_scenario():
    entries = {(m["server"], m["connections"]): m for m in medians(repeated_runs())}
    assert entries[("echo", 32)]["rps"] == pytest.approx(12000) and entries[("echo", 32)]["runs"] == 3
    assert entries[("bidder", 32)]["rps"] == pytest.approx(6000)
    assert entries[("bidder", 1)]["latency_ms"]["p50"] == pytest.approx(0.26)
    assert entries[("bidder", 32)]["latency_ms"]["p99"] == pytest.approx(6.0)   # P99 = 3 x P50 of 1, 2, 3 ms


def test_pair_ratio_is_the_median_of_each_pairs_ratio_not_the_ratio_of_medians():
    [c32] = [r for r in pair_ratios(repeated_runs()) if r["connections"] == 32 and r["ratio"] == "bidder/echo"]
    assert c32["pairs"] == 3
    assert c32["rps"] == pytest.approx([0.6, 0.3, 0.75])
    assert c32["median_rps"] == pytest.approx(0.6)          # the ratio of the medians would be 6000/12000 = 0.5


def test_target_needs_three_pairs_and_reports_each_criterion():
    runs = repeated_runs()
    report = build_report(runs, created="t", machine={}, config={"repeat": 3}, preflight={}, notes=[])
    target = {t["criterion"].split(" ")[0] + " " + t["criterion"].split(" ")[1]: t for t in report["target"]}
    assert target["c=32 bidder/echo"]["met"] and target["c=32 bidder/echo"]["value"] == pytest.approx(0.6)
    assert not target["c=32 bidder"]["met"]                  # median P99 6 ms
    assert target["c=1 bidder"]["met"]                       # median P50 0.26 ms
    two_passes = [m for m in runs if m.repetition < 3]
    [ratio] = [t for t in target_check(medians(two_passes), pair_ratios(two_passes)) if t["unit"] == "x"]
    assert ratio["pairs"] == 2 and not ratio["met"]
    assert "use --repeat 3" in format_target([ratio])


def test_table_with_repetitions_shows_the_run_and_summary_prints_medians_and_ratios(tmp_path):
    runs = repeated_runs()
    lines = format_table(runs).splitlines()
    assert lines[0].split()[:5] == ["server", "workers", "conns", "run", "rps"]
    assert [line.split()[:4] for line in lines[2:5]] == [["echo", "1", "1", "1"], ["bidder", "1", "1", "1"],
                                                          ["bidder/echo", "0.50x", "2.50x", "2.50x"]]
    report = build_report(runs, created="t", machine={}, config={"repeat": 3}, preflight={}, notes=[])
    report["table"] = format_table(runs)
    text = summary(report, tmp_path / "r.json", tmp_path / "r.png")
    assert "medians over 3 repetitions:" in text
    assert "bidder/echo rps, 1 worker, c=32: 0.60x (median of 3 pairs: 0.60x 0.30x 0.75x)" in text
    assert "bidder/echo rps, 1 worker, c=1: 0.50x" in text
    assert json.loads(json.dumps(report))["runs"][0]["repetition"] == 1


def test_single_pass_summary_prints_the_ratio_per_connection_level(tmp_path):
    runs = [run("echo", 1, 9000, 100), run("bidder", 1, 3000, 300), run("echo", 32, 14000, 2000),
            run("bidder", 32, 7000, 4000)]
    report = build_report(runs, created="t", machine={}, config={"repeat": 1}, preflight={}, notes=[])
    report["table"] = format_table(runs)
    text = summary(report, tmp_path / "r.json", tmp_path / "r.png")
    assert "medians" not in text and " run " not in text.splitlines()[0]
    assert "bidder/echo rps, 1 worker, c=1: 0.33x" in text and "bidder/echo rps, 1 worker, c=32: 0.50x" in text


def test_fastapi_baseline_gets_rows_and_ratios():
    runs = [run("echo", 32, 20000, 1000), run("bidder", 32, 8000, 3000), run("fastapi", 32, 2000, 12000)]
    body = [line.split() for line in format_table(runs).splitlines()[2:]]
    assert [row[0] for row in body] == ["echo", "bidder", "fastapi", "bidder/echo", "bidder/fastapi"]
    assert body[3][1] == "0.40x" and body[4][1] == "4.00x"
    [entry] = comparisons(runs)
    assert entry["bidder_over_echo"]["rps"] == pytest.approx(0.4)
    assert entry["bidder_over_fastapi"]["rps"] == pytest.approx(4.0)
    assert entry["fastapi_over_echo"]["rps"] == pytest.approx(0.1)
    assert {r["ratio"] for r in pair_ratios(runs)} == {"bidder/echo", "bidder/fastapi", "fastapi/echo"}


def test_scaling_uses_the_medians_of_repetitions():
    runs = [run("bidder", 32, rps, 4000, i + 1) for i, rps in enumerate((4000, 5000, 3000))]
    runs += [run("bidder", 64, rps, 5000, i + 1, workers=2) for i, rps in enumerate((9000, 7000, 8000))]
    [entry] = scaling(runs)
    assert entry["speedup"] == pytest.approx(2.0) and entry["runs"] == 3


# --- batch histograms from /metrics --------------------------------------------------------------------

def metrics_page(rows: list[int], requests: list[int], pid: str = "4242") -> str:
    registry = CollectorRegistry()
    rows_h = Histogram("bidder_batch_rows", "rows per ORT call", buckets=(1, 8, 16, 64), registry=registry)
    requests_h = Histogram("bidder_batch_requests", "requests per ORT call", buckets=(1, 2, 4), registry=registry)
    Gauge("bidder_worker_info", "this worker", ["worker", "pid"], registry=registry).labels("0", pid).set(1)
    for value in rows:
        rows_h.observe(value)
    for value in requests:
        requests_h.observe(value)
    return generate_latest(registry).decode()


def test_batch_delta_is_the_difference_of_two_scrapes():
    before = parse_metrics(metrics_page([9, 9], [1, 1]))
    after = parse_metrics(metrics_page([9, 9, 9, 18, 36, 36], [1, 1, 1, 2, 4, 4]))
    delta = batch_delta(before, after)
    assert delta["worker_pid"] == "4242"
    rows = delta["bidder_batch_rows"]
    assert rows["calls"] == 4 and rows["mean"] == pytest.approx((9 + 18 + 36 + 36) / 4)
    assert rows["buckets"] == {"1.0": 0, "8.0": 0, "16.0": 1, "64.0": 3, "+Inf": 0}   # per bucket, not cumulative
    assert delta["bidder_batch_requests"]["mean"] == pytest.approx(11 / 4)


def test_batch_delta_without_batch_histograms_is_none():
    page = parse_metrics("# TYPE bidder_scored_rows histogram\nbidder_scored_rows_count 3.0\n")
    assert page.histograms == {} and batch_delta(page, page) is None


def test_batch_columns_appear_only_when_a_run_has_them():
    batch = batch_delta(parse_metrics(metrics_page([], [])), parse_metrics(metrics_page([9, 27], [1, 3])))
    runs = [run("echo", 32, 20000, 1000), run("bidder", 32, 8000, 3000, batch=batch)]
    lines = format_table(runs).splitlines()
    assert "req/call" in lines[0] and "rows/call" in lines[0]
    bidder_row = lines[3].split()
    assert bidder_row[0] == "bidder" and bidder_row[8:10] == ["2.00", "18.00"]
    assert lines[2].split()[8:10] == ["-", "-"]             # the echo exports no batches
    assert "batch" not in runs[0].to_dict() and runs[1].to_dict()["batch"]["bidder_batch_rows"]["calls"] == 2
    assert "req/call" not in format_table(runs[:1])
    [bidder] = [m for m in medians(runs) if m["server"] == "bidder"]
    assert bidder["batch_mean"] == {"bidder_batch_requests": 2.0, "bidder_batch_rows": 18.0}


class _Metrics(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"                           # keep-alive, as the bidder's server
    rows: list[int] = []
    requests: list[int] = []
    status = 200

    def do_GET(self):
        payload = metrics_page(self.rows, self.requests).encode() if self.status == 200 else b"no"
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_metrics(monkeypatch):
    monkeypatch.setattr(_Metrics, "rows", [9])
    monkeypatch.setattr(_Metrics, "requests", [1])
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def test_measure_scrapes_the_bidder_around_the_measured_run(stub_metrics, monkeypatch, tmp_path):
    calls = []

    def fake_wrk(url, body, *, duration_s, **kwargs):
        calls.append(duration_s)
        if duration_s == 3:                                 # the measured run, not the warm-up: 3 more calls
            monkeypatch.setattr(_Metrics, "rows", [9, 9, 18, 27])
            monkeypatch.setattr(_Metrics, "requests", [1, 1, 2, 3])
        return wrk_result(5000, 1000)

    monkeypatch.setattr(load, "run_wrk", fake_wrk)
    config = LoadConfig(duration_s=3, warmup_s=1, out_dir=tmp_path)
    probe = MetricsProbe("127.0.0.1", stub_metrics)
    m = load.measure("bidder", "http://unused/bid", config, workers=1, connections=32, threads=1,
                     server_cpus="0", client_cpus="1", repetition=2, probe=probe)
    probe.close()
    assert calls == [1, 3] and m.repetition == 2
    assert m.batch["bidder_batch_rows"]["calls"] == 3 and m.batch_mean("bidder_batch_rows") == pytest.approx(18)
    assert m.batch_mean("bidder_batch_requests") == pytest.approx(2)


def test_probe_of_a_server_without_metrics_records_nothing(stub_metrics, monkeypatch):
    monkeypatch.setattr(_Metrics, "status", 404)
    assert MetricsProbe("127.0.0.1", stub_metrics).scrape() is None
    with reserve_port() as holder:  # bound, never listening: nothing can answer on it
        assert MetricsProbe("127.0.0.1", holder.getsockname()[1]).scrape(same_pid="1") is None


# --- configuration: servers, echo layer, repeat --------------------------------------------------------

def test_cli_options_reach_the_config(monkeypatch):
    monkeypatch.setattr(load, "missing_baseline_packages", lambda: ["fastapi"])
    parser = argparse.ArgumentParser()
    add_load_arguments(parser)
    config = load_config(parser.parse_args(["--echo-layer", "server", "--repeat", "3"]))
    assert (config.echo_layer, config.repeat, config.servers) == ("server", 3, ("echo", "bidder"))
    assert config.to_dict()["echo_layer"] == "server" and config.to_dict()["repeat"] == 3
    monkeypatch.setattr(load, "missing_baseline_packages", lambda: [])
    assert load_config(parser.parse_args([])).servers == ("echo", "bidder", "fastapi")
    assert load_config(parser.parse_args(["--servers", "echo,fastapi"])).servers == ("echo", "fastapi")
    with pytest.raises(SystemExit):
        parser.parse_args(["--repeat", "0"])


def test_server_commands(tmp_path):
    config = LoadConfig(echo_layer="server", max_batch=64, servers=("echo", "bidder", "fastapi"))
    echo = load.server_command("echo", config, 9000, 1)
    assert echo[1:3] == ["-m", "bench.echo"] and echo[-2:] == ["--layer", "server"]
    baseline = load.server_command("fastapi", config, 9001, 2)
    assert baseline[1:3] == ["-m", "bench.baseline"] and "--max-batch" not in baseline
    assert baseline[baseline.index("--workers") + 1] == "2"
    assert load.server_command("bidder", config, 9002, 1)[-2:] == ["--max-batch", "64"]
    large = LoadConfig(retrieve_k=300, servers=("bidder", "bidder-exhaustive", "fastapi"))
    assert load.server_command("bidder", large, 9003, 1)[-2:] == ["--retrieve-k", "300"]
    exhaustive = load.server_command("bidder-exhaustive", large, 9004, 1)
    assert "--no-retrieval" in exhaustive and exhaustive[-2:] == ["--retrieve-k", "300"]
    assert "--retrieve-k" not in load.server_command("fastapi", large, 9005, 1)


def test_the_rules_bodies_are_sent_to_the_bidder_s_own_process(monkeypatch, tmp_path):
    """With the bidder in the run, bidder-rules and bidder-rules-unread are its own process answering their bodies:
    what differs between the three is the body alone."""
    import contextlib
    from types import SimpleNamespace

    started, measured = [], []

    @contextlib.contextmanager
    def running(name, command, base, **kwargs):
        started.append(name)
        yield SimpleNamespace(process=SimpleNamespace(pid=42, poll=lambda: None))

    monkeypatch.setattr(servers, "running", running)
    monkeypatch.setattr(load, "preflight", lambda name, url, body, allow_no_bid: {"prices": [1.0]})
    monkeypatch.setattr(load, "MetricsProbe", lambda host, port: SimpleNamespace(close=lambda: None))
    monkeypatch.setattr(load, "measure", lambda name, url, config, **kw: measured.append((name, url, kw["body"])))
    config = LoadConfig(servers=("bidder", "bidder-rules", "bidder-rules-unread"), out_dir=tmp_path)
    preflights: dict = {}
    load.run_phase(config, workers=1, connections=(32,), threads=1, server_cpus=None, client_cpus=None,
                   preflights=preflights)
    assert started == ["bidder"] and len(preflights) == 3
    assert [name for name, _, _ in measured] == ["bidder", "bidder-rules", "bidder-rules-unread"]
    assert len({url for _, url, _ in measured}) == 1 and len({body for _, _, body in measured}) == 3
    started.clear(), measured.clear()
    load.run_phase(LoadConfig(servers=("echo", "bidder-rules"), out_dir=tmp_path), workers=1, connections=(32,),
                   threads=1, server_cpus=None, client_cpus=None, preflights={})
    assert started == ["echo", "bidder-rules"]  # without the bidder, a process of its own


def test_a_missing_baseline_is_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setattr(load, "wrk_path", lambda: "/usr/bin/wrk")
    monkeypatch.setattr(load, "missing_baseline_packages", lambda: ["fastapi", "uvicorn"])
    body = tmp_path / "body.json"
    body.write_text("{}")
    config = LoadConfig(body=body, servers=("echo", "fastapi"), server_cpus=None, client_cpus=None)
    with pytest.raises(BenchError, match=r"needs fastapi, uvicorn: pip install -e '\.\[bench\]'"):
        load.check_prerequisites(config)


def test_price_agreement_notes_a_baseline_that_prices_differently():
    same = {"bidder/workers=1": {"prices": [16.48]}, "fastapi/workers=1": {"prices": [16.48]}}
    assert price_agreement(same) is None
    differ = {"bidder/workers=1": {"prices": [16.48]}, "fastapi/workers=1": {"prices": [3.0]}}
    assert "not doing the same work" in price_agreement(differ)
    assert price_agreement({"echo/workers=1": {"status": 200}}) is None


# --- the echo on aiohttp's low-level server --------------------------------------------------------------

async def test_low_level_echo_answers_like_the_app(aiohttp_raw_server, aiohttp_client):
    client = await aiohttp_client(await aiohttp_raw_server(echo_handle))
    response = await client.post("/bid", data=BODY.read_bytes(), headers={"Content-Type": "application/json"})
    assert response.status == 200
    assert msgspec.json.decode(await response.read()) == {"id": "80ce30c53c16e6ede735f123ef6e32361bfc7b22",
                                                           "echo": True}
    assert (await client.post("/bid/openx", data=b"[1]")).status == 200
    assert (await client.post("/bid", data=b"{not json")).status == 400
    assert (await client.get("/readyz")).status == 200 and (await client.get("/healthz")).status == 200
    assert (await client.get("/bid")).status == 405
    assert (await client.get("/elsewhere")).status == 404


def test_low_level_echo_process_starts_and_answers(tmp_path):
    with reserve_port() as holder:  # bound until the test ends: no other process can take the port meanwhile
        port = holder.getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "bench.echo", "--port", str(port), "--layer", "server"]
        with servers.running("echo", command, base, ready_path="/readyz", startup_timeout_s=30, port=port,
                             log_dir=tmp_path):
            assert preflight("echo", base + "/bid", BODY.read_bytes(), allow_no_bid=False)["status"] == 200
        assert servers.listening_sockets(port) == 0


def test_bench_reload_serves_through_a_reload_and_reports_each_phase(small_bundle, tmp_path, capsys):
    """The bidder keeps answering while it reloads to another catalog; the report splits the requests by phase."""
    from bench.reload import summarise

    other = tmp_path / "campaigns.json"
    from bidder.app import DEFAULT_CAMPAIGNS

    catalog = json.loads(DEFAULT_CAMPAIGNS.read_text())
    catalog["campaigns"] = catalog["campaigns"][:-1]
    other.write_text(json.dumps(catalog))
    out = tmp_path / "reload.json"
    assert bench_main(["reload", "--model", str(small_bundle), "--to", str(other), "--duration", "2.5", "--at", "0.5",
                       "--no-pin", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["reload"]["status"] == 200 and report["failed_requests"] == 0
    assert report["config"]["to"] == str(other.resolve()) and out.with_suffix(".png").stat().st_size > 0
    assert set(report["phases"]) == {"before", "during", "after"}
    assert report["phases"]["before"]["requests"] > 0 and report["phases"]["after"]["requests"] > 0
    assert sum(p["requests"] for p in report["phases"].values()) > 10
    # the phases are cut by each request's start; failures are counted by kind
    split = summarise([(0.1, 0.002, "200"), (1.0, 0.5, "timeout"), (1.2, 0.004, "200"), (3.0, 0.003, "503")],
                      {"start_s": 0.9, "seconds": 1.0})
    assert split["phases"]["before"]["requests"] == 1 and split["phases"]["during"]["failed"] == {"timeout": 1}
    assert split["phases"]["after"]["failed"] == {"503": 1} and split["failed_requests"] == 2
    assert split["phases"]["during"]["max_ms"] == 4.0


@pytest.mark.parametrize("argv, message", [
    (["--duration", "0"], "error: --duration must be positive, got 0.0"),
    (["--at", "5", "--duration", "2"], "error: --at must be within the run"),
    (["--to", "/nonexistent/c.json"], "error: --to /nonexistent/c.json: no such file"),
])
def test_bench_reload_refuses_bad_options_in_one_line(tmp_path, capsys, argv, message):
    assert bench_main(["reload", *argv, "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_bench_factorized_against_compares_two_exports_of_the_graphs(tmp_path):
    """``python -m bench.factorized --against``: the shipped graphs against a copy of themselves."""
    from bench.factorized import DEFAULT_BODY, compare_graphs
    from bidder import DEFAULT_BUNDLE

    old = shutil.copytree(DEFAULT_BUNDLE, tmp_path / "old")
    results = compare_graphs(old, DEFAULT_BUNDLE, DEFAULT_BUNDLE / "campaigns.json", DEFAULT_BODY.read_bytes(),
                             [1, 3], calls=5, evict_bytes=1 << 16)
    assert [(r["requests"], r["rows"]) for r in results] == [(1, 9), (3, 27)]
    for r in results:  # the same graphs: the same probabilities and answers, prices to the micro-dollar
        assert r["max_abs_diff"]["new_vs_old"] == 0.0 and r["max_abs_diff"]["new_vs_model_onnx"] <= 1e-6
        assert r["answers_differing_beyond_price"] == 0 and r["max_abs_price_diff"] == 0.0
        assert set(r["run_us"]) == {"old", "new", "new_run_binding"} and all(t > 0 for t in r["run_us"].values())
        assert set(r["engine_run_us"]) == {"old", "new"} and all(t > 0 for t in r["engine_run_us"].values())


def test_bench_factorized_times_model_onnx_the_graph_and_the_native_kernel():
    """``python -m bench.factorized``: three ways of scoring the same requests, each checked against model.onnx."""
    from bench.factorized import DEFAULT_BODY, measure
    from bidder import DEFAULT_BUNDLE

    results = measure(DEFAULT_BUNDLE, DEFAULT_BUNDLE / "campaigns.json", DEFAULT_BODY.read_bytes(), [1, 3], calls=5,
                      evict_bytes=1 << 16)
    assert [(r["requests"], r["rows"]) for r in results] == [(1, 9), (3, 27)]
    for r in results:
        assert all(r[f"{way}_us"] > 0 for way in ("canonical", "graph", "native"))
        assert r["native_over_graph"] == pytest.approx(r["native_us"] / r["graph_us"], rel=0.01)
        assert set(r["max_abs_diff_vs_model_onnx"]) == {"graph", "native"}
        assert 0 < max(r["max_abs_diff_vs_model_onnx"].values()) <= 1e-6  # compared, and within the contract


def test_the_scaling_curve_reports_efficiency_and_the_echo_at_each_worker_count():
    runs = [measurement("echo", 32, 10000, 2000), measurement("bidder", 32, 4000, 4000),
            measurement("echo", 64, 18000, 2000, workers=2), measurement("bidder", 64, 7200, 5000, workers=2),
            measurement("bidder", 128, 12000, 6000, workers=4)]
    entries = {(e["server"], e["workers"]): e for e in scaling(runs)}
    two, four = entries[("bidder", 2)], entries[("bidder", 4)]
    assert (two["speedup"], two["efficiency"], two["vs_echo"]) == (pytest.approx(1.8), pytest.approx(0.9),
                                                                   pytest.approx(0.4))
    assert (four["efficiency"], four["vs_echo"]) == (pytest.approx(0.75), None)  # no echo run at 4 workers
    text = format_scaling(list(entries.values()))
    assert "0.90 of 2x" in text and "0.40x echo at 2 workers" in text and "0.75 of 4x" in text
    assert two["cpu_efficiency"] is None and "server CPU" not in text  # no CPU figures, none reported


def test_the_scaling_curve_compares_the_cpu_a_request_costs_alone_and_beside_other_workers():
    runs = [measurement("bidder", 32, 4000, 4000, cpu_us=100.0),
            measurement("bidder", 64, 6000, 5000, workers=2, cpu_us=125.0)]
    [entry] = scaling(runs)
    assert (entry["cpu_us_per_request"], entry["single_worker_cpu_us_per_request"]) == (125.0, 100.0)
    assert entry["cpu_efficiency"] == pytest.approx(0.8)
    assert "server CPU 125.0 us/req against 100.0 with 1 worker (0.80)" in format_scaling([entry])


def test_workers_take_a_list_and_each_count_above_one_is_a_run(monkeypatch, tmp_path):
    parser = argparse.ArgumentParser()
    add_load_arguments(parser)
    assert load_config(parser.parse_args(["--workers", "4,1,2,2"])).scaling_workers == (1, 2, 4)
    assert load_config(parser.parse_args(["--workers", "2"])).scaling_workers == (2,)
    with pytest.raises(SystemExit):
        parser.parse_args(["--workers", "0,2"])
    phases = []
    monkeypatch.setattr(load, "check_prerequisites", lambda config: None)
    monkeypatch.setattr(load, "run_phase", lambda config, **kw: phases.append((kw["workers"], kw["connections"]))
                        or [])
    monkeypatch.setattr(load, "machine_info", lambda *a: {"cpu_model": "cpu", "nproc": 2, "python": "3", "wrk": "w"})
    monkeypatch.setattr(load, "wrk_version", lambda: "wrk")
    monkeypatch.setattr(load, "model_id", lambda model: "m")
    monkeypatch.setattr(load, "plot_latency", lambda measurements, path, title: path)
    config = load_config(parser.parse_args(["--workers", "1,2,4", "--connections", "1,32", "--no-pin",
                                            "--out", str(tmp_path)]))
    load.run_load(config)
    assert phases == [(1, (1, 32)), (2, (64,)), (4, (128,))]


def test_the_echo_is_not_compared_with_itself():
    runs = [measurement("echo", 32, 10000, 2000), measurement("echo", 64, 18000, 2000, workers=2)]
    [entry] = scaling(runs)
    assert entry["vs_echo"] is None and "echo at" not in format_scaling([entry])


def test_several_bidder_workers_are_scraped_through_the_supervisors_metrics_port():
    config = LoadConfig(servers=("echo", "bidder"))
    assert load.server_command("bidder", config, 9000, 2, 9100)[-2:] == ["--metrics-port", "9100"]
    assert "--metrics-port" not in load.server_command("echo", config, 9001, 2, 9100)
    assert "--metrics-port" not in load.server_command("bidder", config, 9002, 1)


async def test_the_rules_body_carries_every_rule_and_leaves_the_bid_as_it_is(aiohttp_client):
    """bidder-rules measures what honouring the rules costs: its body must carry them, and the bidder must check
    them all and still bid as on the plain body (else the run would time other work)."""
    from bench.load import DEFAULT_BODY, RULES, RULES_BANNER, bodies, with_rules
    from bidder.app import Config, create_app
    from bidder.openrtb import decode_request
    from bidder.privacy import REQUIRED_PURPOSES, tcf_purposes

    plain = DEFAULT_BODY.read_bytes()
    ruled = json.loads(with_rules(plain))
    assert all(ruled[key] == value for key, value in RULES.items())
    assert all(imp["banner"][key] == value for imp in ruled["imp"] for key, value in RULES_BANNER.items())
    assert set(REQUIRED_PURPOSES) <= tcf_purposes(ruled["user"]["consent"])
    client = await aiohttp_client(create_app(Config(now=1_370_000_000.0)))
    answers = []
    for body in (plain, json.dumps(ruled).encode()):
        response = await client.post("/bid", data=body)
        assert response.status == 200
        answers.append(await response.json())
    assert answers[0] == answers[1]
    config = LoadConfig(servers=("bidder", "bidder-rules", "bidder-rules-unread"))
    files = bodies(config)
    assert files["bidder"] == DEFAULT_BODY and json.loads(files["bidder-rules"].read_bytes()) == ruled
    # the unread body: the same bytes, no rule under a name the bidder reads, and the same bid
    unread = files["bidder-rules-unread"].read_bytes()
    assert len(unread) == len(files["bidder-rules"].read_bytes())
    request = decode_request(unread)
    assert not (request.bcat or request.badv or request.bseat or request.regs or request.user.consent)
    assert not any(imp.banner.battr or imp.banner.btype or imp.banner.mimes for imp in request.imp)
    response = await client.post("/bid", data=unread)
    assert response.status == 200 and await response.json() == answers[0]
    assert "not doing the same work" in price_agreement({"bidder/workers=1": {"prices": [1.0]},
                                                        "bidder-rules/workers=1": {"prices": [2.0]}})


def test_notice_paths_are_distinct_first_notices_the_key_signs():
    from bench.notice_load import KEY, connections_for, notice_paths
    from bidder.notices import Keyring, SigningKey

    paths = notice_paths(10, "c1", "cr1", "m", 1.7e9)
    assert len(paths) == len(set(paths)) == 10
    assert [p.split("?")[0].rpartition("/")[2] for p in paths[:5]] == ["win", "bill", "win", "bill", "loss"]
    keyring = Keyring([SigningKey(KEY["id"], bytes.fromhex(KEY["secret"]), 0.0)])
    facts = [keyring.verify(p.split("t=")[1].split("&")[0]) for p in paths]
    assert all(f.campaign == "c1" and f.bid_id == f"{f.request_id}-1" for f in facts)
    assert connections_for(2000) == 9 and connections_for(1) == 1


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None or shutil.which("taskset") is None, reason="needs wrk and taskset")
def test_the_notice_benchmark_counts_every_notice_it_sends_once(tmp_path):
    from bench.notice_load import main as notices_main

    assert notices_main(["--rate", "100", "--bid-rate", "50", "--seconds", "1", "--warmup", "1",
                         "--server-cpus", "0", "--client-cpus", "0", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "notices-load.json").read_text())
    sent = report["notices"]["requests"]
    assert sent > 0 and report["notices"]["statuses"] == {"200": sent} and report["bids"]["requests"] > 0
    assert sum(report["counted"].values()) == sum(n for key, n in report["counted"].items() if 'result="ok"' in key)
    assert sum(report["counted"].values()) >= sent  # wrk counts a request once answered; all answered are counted
    assert report["command"].startswith("python -m bench notices") and "p99_ms" in report["target"]
    ceiling = report["ceiling"]  # the same loads against the echo server first: every notice answered 200
    sent = ceiling["notices"]["requests"]
    assert sent > 0 and ceiling["notices"]["statuses"] == {"200": sent}
    assert ceiling["bids"]["statuses"] == {"200": ceiling["bids"]["requests"]}


def test_bench_stages_times_both_engines_and_the_background_threads(tmp_path, capsys):
    """``python -m bench stages``: the plain and the all-on engine take turns; the refresher and the event writer
    do work for the all-on engine's bids (reservations that expire within the run are released by the banker)."""
    from bench import stages

    out = tmp_path / "stages.json"
    assert stages.main(["--seconds", "0.5", "--batch", "4", "--window", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["blocks"] >= 1 and report["batch"] == 4
    assert report["us_per_request"]["all"] > report["us_per_request"]["plain"] > 0
    assert set(report["background_us_per_bid"]) == {"ledger-refresher", "events-w0"}
    assert all(v > 0 for v in report["background_us_per_bid"].values())
    assert set(report["stages_us_per_request"]) == {"budget", "sign", "log_bid"}
    assert report["extra_us_per_request"] == pytest.approx(
        report["bid_path_extra_us"] + sum(report["background_us_per_bid"].values()), abs=0.02)
    assert out.with_suffix(".png").stat().st_size > 0
    assert str(out) in capsys.readouterr().out


def test_bench_stages_with_the_event_log_alone(tmp_path):
    from bench import stages

    out = tmp_path / "events.json"
    assert stages.main(["--stages", "events", "--seconds", "0.3", "--batch", "4", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["stages"] == ["events"] and set(report["background_us_per_bid"]) == {"events-w0"}
    assert set(report["stages_us_per_request"]) == {"log_bid"}


@pytest.mark.parametrize("argv, message", [(["--seconds", "0"], "--seconds must be > 0"),
                                           (["--batch", "0"], "--batch and --window >= 1"),
                                           (["--stages", "budgets"], "(budgets with notices)"),
                                           (["--stages", "events,ledger"], "expected some of")])
def test_bench_stages_refuses_bad_options_in_one_line(tmp_path, capsys, argv, message):
    from bench import stages

    assert stages.main([*argv, "--out", str(tmp_path / "s.json")]) == 2
    assert message in capsys.readouterr().err

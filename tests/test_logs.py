"""Structured logs: JSON lines parse and carry timestamp, level, worker, event and the event's fields; the text
format keeps its sentences; floods of one event are throttled; the access log samples."""
from __future__ import annotations

import datetime as dt
import functools
import io
import json
import logging
import random

import pytest

import bidder.logs
from bidder.logs import Throttled, access_log_options, configure, event, sampled_access_logger


@pytest.fixture
def captured(monkeypatch):
    """configure() writing into a string; the root logger's handlers and level restored afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    monkeypatch.setattr(bidder.logs, "configure", functools.partial(configure, stream=stream))
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_an_event_is_one_json_object_with_its_fields(captured):
    bidder.logs.configure("json", "info", 3)
    log = logging.getLogger("bidder")
    event(log, logging.INFO, "reloaded", "reloaded: serving %(model)s", model="m-1", seconds=0.25)
    (line,) = lines(captured)
    assert set(line) == {"ts", "level", "worker", "pid", "event", "message", "model", "seconds"}
    assert (line["level"], line["worker"], line["event"], line["model"], line["seconds"]) == (
        "info", 3, "reloaded", "m-1", 0.25)
    assert line["message"] == "reloaded: serving m-1"
    when = dt.datetime.fromisoformat(line["ts"].replace("Z", "+00:00"))
    assert abs((dt.datetime.now(dt.timezone.utc) - when).total_seconds()) < 60


def test_other_records_and_errors_are_json_too(captured):
    bidder.logs.configure("json", "info", "supervisor")
    logging.getLogger("aiohttp.server").warning("plain %s", "text")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("bidder").exception("internal error on %(method)s %(path)s",
                                              {"method": "POST", "path": "/bid"}, extra={"event": "internal_error"})
    plain, error = lines(captured)
    assert (plain["event"], plain["message"], plain["logger"], plain["worker"]) == (
        "log", "plain text", "aiohttp.server", "supervisor")
    assert (error["event"], error["level"], error["method"], error["path"]) == (
        "internal_error", "error", "POST", "/bid")
    assert error["exception"].startswith("Traceback") and "RuntimeError: boom" in error["exception"]


def test_the_text_format_keeps_the_sentence(captured):
    bidder.logs.configure("text", "info", 1)
    event(logging.getLogger("bidder"), logging.INFO, "drain_started", "worker %(index)d draining %(in_flight)d "
          "in-flight request(s)", index=1, in_flight=2)
    assert captured.getvalue().rstrip().endswith(" worker-1 INFO worker 1 draining 2 in-flight request(s)")


def test_the_level_filters(captured):
    bidder.logs.configure("json", "warning", 0)
    log = logging.getLogger("bidder")
    event(log, logging.INFO, "quiet", "not shown")
    event(log, logging.WARNING, "loud", "shown")
    assert [line["event"] for line in lines(captured)] == ["loud"]


def test_reserved_keys_cannot_be_fields():
    with pytest.raises(ValueError, match="reserved"):
        event(logging.getLogger("bidder"), logging.INFO, "x", "x", ts="now")


def test_a_flood_is_throttled_and_the_next_line_counts_what_was_left_out(captured, monkeypatch):
    bidder.logs.configure("json", "info", 0)
    now = [100.0]
    monkeypatch.setattr(bidder.logs.time, "monotonic", lambda: now[0])
    refused = Throttled(logging.getLogger("bidder"), logging.WARNING, "notice_refused", "%(reason)s", interval=1.0)
    for _ in range(5):
        refused("win/bad_mac", reason="bad_mac")
    refused("win/expired", reason="expired")  # another key has its own budget
    now[0] += 1.5
    refused("win/bad_mac", reason="bad_mac")
    assert [(line["reason"], line["suppressed"]) for line in lines(captured)] == [
        ("bad_mac", 0), ("expired", 0), ("bad_mac", 4)]


class _Request:
    method, path, remote = "POST", "/bid", "10.0.0.1"


class _Response:
    status = 204


def test_the_access_log_samples(captured):
    bidder.logs.configure("json", "info", 0)
    logger = logging.getLogger("bidder.access")
    sampled_access_logger(1.0)(logger, "").log(_Request(), _Response(), 0.0012)
    (line,) = lines(captured)
    assert (line["event"], line["method"], line["path"], line["status"], line["duration_ms"]) == (
        "access", "POST", "/bid", 204, 1.2)
    random.seed(7)
    tenth = sampled_access_logger(0.1)(logger, "")
    for _ in range(2000):
        tenth.log(_Request(), _Response(), 0.001)
    assert 120 < len(lines(captured)) - 1 < 290
    with pytest.raises(ValueError):
        sampled_access_logger(0)


async def test_a_served_request_is_an_access_event_only_when_sampling_is_on(captured):
    import aiohttp
    from aiohttp import web

    bidder.logs.configure("json", "info", 0)

    async def ok(request):
        return web.Response(status=204)

    for rate, expected in ((0.0, []), (1.0, [("access", "GET", "/x", 204)])):
        app = web.Application()
        app.router.add_get("/x", ok)
        runner = web.AppRunner(app, **access_log_options(rate))  # as a worker runs it (bidder/workers.py)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/x") as response:
                assert response.status == 204
        finally:
            await runner.cleanup()
        logged = lines(captured)
        assert [(e["event"], e["method"], e["path"], e["status"]) for e in logged] == expected, logged


def test_a_server_run_in_process_leaves_logging_as_it_found_it():
    root = logging.getLogger()
    before = root.handlers[:], root.level
    with bidder.logs.configured("json", "debug", 0):
        assert len(root.handlers) == 1 and isinstance(root.handlers[0].formatter, bidder.logs.JsonFormatter)
        assert root.level == logging.DEBUG
    assert (root.handlers, root.level) == before

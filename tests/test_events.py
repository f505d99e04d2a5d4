"""The event log (``bidder serve --events DIR``, ``bidder/events.py``) and training from it (``train logs``)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zstandard
from processes import Server

import bidder
from bidder import DEFAULT_BUNDLE, OPENRTB_EXAMPLES, Featurizer
from bidder.__main__ import main as bidder_main
from bidder.app import DEFAULT_CAMPAIGNS, Config, create_app
from bidder.campaigns import decode_catalog, load_catalog
from bidder.clock import Clock
from bidder.engine import BidEngine
from bidder.events import SCHEMA_VERSION, EventLog, EventLogError, complete_frames, events_hour, read_lines
from bidder.metrics import Metrics
from bidder.scorer import Scorer
from train.__main__ import main as train_main
from train.data.bidlog import read_bid_log
from train.data.dataset import featurize_log
from train.errors import DataError
from train.logs import write_training_data
from train.market import EXACT, LOST, observations

BID = ("r1-1", {"weekday": 3, "hour": 14, "usertag": ["10006"], "slotprice": 7}, {"creative": "cr", "advertiser": 1458,
       "slotwidth": 300, "slotheight": 250}, "c1458", "cr", "model", 0.002, 2.4, 2.0, 0.8333, 0.5, 1, "2", "u1")


def _records(directory: Path) -> list[dict]:
    out = []
    for path in sorted(directory.glob("events-*.jsonl.zst")):
        out.extend(json.loads(line) for line in read_lines(path))
    return out


def _banner(request_id: str = "r1") -> bytes:
    body = json.loads((OPENRTB_EXAMPLES / "bid-request-2.5" / "simple-banner.json").read_bytes())
    body["id"] = request_id
    body["imp"][0]["bidfloor"] = 0.01
    return json.dumps(body).encode()


# -- the log -----------------------------------------------------------------------------------------------
def test_a_full_queue_drops_and_counts_without_waiting(tmp_path):
    events = EventLog(tmp_path, queue_size=3)  # no writer: nothing drains the queue
    for _ in range(5):
        events.bid(*BID)
    events.notice("win", "r1-1", price=1.0)
    events.click("r1-1")
    assert len(events.queue) == 3
    assert events.dropped == {"queue_full": 4, "write_error": 0}
    metrics = Metrics()
    metrics.events = events
    text = metrics.render().decode()
    assert 'bidder_events_dropped_total{reason="queue_full"} 4.0' in text and "bidder_events_queued 3.0" in text


def test_files_rotate_by_the_hour_of_their_events_and_by_size(tmp_path):
    events = EventLog(tmp_path, flush_s=60, max_bytes=1)  # every flush past the size: a new file
    ten, eleven = 1_796_637_600.0, 1_796_641_200.0  # 2026-12-07 10:00 and 11:00 UTC
    times = iter([ten, ten + 1, eleven, eleven + 1])
    events.now = lambda: next(times)
    for bid_id in "abc":
        events.click(bid_id)
    events._drain()
    events.click("d")
    events._drain()
    events._finish()
    names = sorted(p.name.split("-p")[0] for p in tmp_path.glob("events-*"))
    assert names == ["events-20261207T10-w0", "events-20261207T11-w0", "events-20261207T11-w0"]
    assert [r["bid_id"] for r in _records(tmp_path)] == ["a", "b", "c", "d"]
    assert not list(tmp_path.glob(".tmp-*"))


def test_every_queued_event_is_written_on_close_with_its_schema(tmp_path):
    events = EventLog(tmp_path, flush_s=60).start()  # close, not the timer, must write them
    events.bid(*BID)
    events.notice("loss", "r1-1", loss=102, min_to_win=2.5)
    events.click("r1-1")
    events.close()
    assert not list(tmp_path.glob(".tmp-*")), "close renames the last file into place"
    bid, notice, click = _records(tmp_path)
    assert {r["schema"] for r in (bid, notice, click)} == {SCHEMA_VERSION}
    assert bid["record"] == {**BID[1], **BID[2]}  # the raw record the model scored: the imp's and the candidate's
    assert (bid["bid_id"], bid["campaign"], bid["price"], bid["auction"], bid["user"]) == \
        ("r1-1", "c1458", 2.0, 1, "u1")
    assert (notice["notice"], notice["loss"], notice["min_to_win"]) == ("loss", 102, 2.5)
    assert click["kind"] == "click" and click["bid_id"] == "r1-1"


def test_the_writer_is_woken_by_the_count_of_events_not_only_by_its_timer(tmp_path):
    """Short turns on the serving core: every ``flush_events`` events queued wake the writer (its timer here
    would wait a minute); fewer stay queued for the timer or close."""
    events = EventLog(tmp_path, flush_s=60, flush_events=4).start()
    try:
        for _ in range(3):
            events.bid(*BID)
        time.sleep(0.3)
        assert events.written == 0 and len(events.queue) == 3
        events.click("r1-1")  # the fourth event of any kind
        deadline = time.monotonic() + 10
        while events.written < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert events.written == 4 and not events.queue
    finally:
        events.close()
    assert [r["kind"] for r in _records(tmp_path)] == ["bid", "bid", "bid", "click"]


def test_a_full_disk_drops_and_counts_and_the_writer_carries_on(tmp_path, monkeypatch):
    events = EventLog(tmp_path, flush_s=0.01).start()
    opened = EventLog._open

    def full_disk(self, hour):  # every write fails as on a full disk: /dev/full answers ENOSPC
        self._seq += 1
        self._hour, self._tmp, self._bytes = hour, Path("/dev/full"), 0
        self._file = open("/dev/full", "wb")

    monkeypatch.setattr(EventLog, "_open", full_disk)
    for _ in range(10):
        events.bid(*BID)
    deadline = time.monotonic() + 10
    while events.dropped["write_error"] < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert events.dropped["write_error"] == 10 and events.written == 0
    monkeypatch.setattr(EventLog, "_open", opened)  # space again: the next events are written
    events.bid(*BID)
    events.close()
    assert len(_records(tmp_path)) == 1 and events.written == 1


def test_an_unwritable_directory_is_one_line_at_start(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(EventLogError, match=r"--events .*a-file/events: cannot write there"):
        EventLog(blocker / "events").start()
    status = bidder_main(["serve", "--events", str(blocker / "events"), "--port", "1"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and err.startswith("error: --events ") and "a-file" in err


def test_a_killed_writer_loses_only_its_torn_last_frame(tmp_path):
    """A process writing events is killed (SIGKILL); the next start renames what it flushed into place."""
    script = textwrap.dedent("""
        import sys, time
        from bidder.events import EventLog
        events = EventLog(sys.argv[1], flush_s=0.05).start()
        i = 0
        while True:
            events.click(f"b{i}")
            i += 1
            if i % 100 == 0:
                print(i, flush=True)
                time.sleep(0.001)
    """)
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    for _ in range(30):  # enough for several flushes
        child.stdout.readline()
    time.sleep(0.3)
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    left = list(tmp_path.glob(".tmp-*"))
    assert left, "the killed process left its file unfinished"
    assert EventLog(tmp_path).salvage(worker=1) == 0, "another worker's file is left to that worker"
    assert EventLog(tmp_path).salvage() == 1
    ids = [r["bid_id"] for r in _records(tmp_path)]
    assert ids and ids == [f"b{i}" for i in range(len(ids))], "a prefix of what was logged, in order, no torn line"
    assert not list(tmp_path.glob(".tmp-*"))


def test_complete_frames_drops_a_torn_tail():
    compress = zstandard.ZstdCompressor().compress
    whole = compress(b"a\n") + compress(b"b\n")
    assert complete_frames(whole) == (b"a\nb\n", False)
    assert complete_frames(whole + compress(b"c\n")[:-3]) == (b"a\nb\n", True)
    assert complete_frames(whole + b"not zstd") == (b"a\nb\n", True)


def test_a_file_of_many_frames_reads_as_one_stream_of_lines(tmp_path):
    compress = zstandard.ZstdCompressor().compress
    path = tmp_path / "events.jsonl.zst"
    path.write_bytes(compress(b"a\nb") + compress(b"c\n") + compress(b"d\n"))
    assert list(read_lines(path)) == [b"a", b"bc", b"d"]


# -- the bid path --------------------------------------------------------------------------------------------
def test_the_engine_logs_each_bid_and_answers_the_same_bytes(tmp_path):
    scorer, catalog = Scorer(DEFAULT_BUNDLE), load_catalog(DEFAULT_CAMPAIGNS)
    events = EventLog(tmp_path).start()
    plain = BidEngine(scorer, catalog, Metrics(), now=1.8e9).bid(_banner(), "2")
    logged = BidEngine(scorer, catalog, Metrics(), now=1.8e9, events=events).bid(_banner(), "2")
    events.close()
    assert plain.status == 200 and logged.body == plain.body
    bid = json.loads(plain.body)["seatbid"][0]["bid"][0]
    (event,) = _records(tmp_path)
    assert (event["bid_id"], event["price"], event["creative"], event["campaign"]) == (bid["id"], bid["price"],
                                                                                       bid["crid"], bid["cid"])
    assert event["model"] == scorer.model_id and event["exchange"] == "2" and event["floor"] == 0.01
    candidate = next(c for c in catalog.candidates if c.creative_id == bid["crid"])
    assert event["value"] == pytest.approx(event["pctr"] * candidate.value_per_click * 1000.0, rel=1e-5)
    # the logged record featurizes to what the model scored: the engine's own record and candidate layer
    featurizer = Featurizer(scorer.spec)
    again = featurizer.transform([event["record"]])
    pending = BidEngine(scorer, catalog, Metrics(), now=1.8e9).prepare(_banner(), "2", 0.0)
    scored = featurizer.transform([{**pending.records[0], **candidate.layer}])
    assert all(np.array_equal(again[k], scored[k]) for k in scored)


def test_a_batch_logs_the_bids_of_its_answered_requests_in_one_item_and_none_of_a_failed_one(tmp_path):
    """The bids of one batch are queued as one item (one stamp, one encoding call) and written one line each; a
    request whose pricing failed placed no bid, so none of it is logged."""
    scorer, catalog = Scorer(DEFAULT_BUNDLE), load_catalog(DEFAULT_CAMPAIGNS)
    events = EventLog(tmp_path, flush_s=60)  # no writer: the queue is looked at, then drained by hand
    engine = BidEngine(scorer, catalog, Metrics(), now=1.8e9, events=events)
    encode = engine.encode

    def encode_or_crash(batch, k, *rest):
        if batch.pendings[k].request.id == "r2":
            raise ZeroDivisionError("a pricing bug")
        return encode(batch, k, *rest)

    engine.encode = encode_or_crash
    outcomes = engine.score_batch([engine.prepare(_banner(f"r{i}"), "2", 0.0) for i in range(4)])
    assert isinstance(outcomes[2], ZeroDivisionError) and all(o.status == 200 for i, o in enumerate(outcomes) if i != 2)
    assert len(events.queue) == 1 and events.queued == 3
    events._drain()
    events._finish()
    logged = _records(tmp_path)
    assert [e["bid_id"] for e in logged] == ["r0-1", "r1-1", "r3-1"] and len({e["time"] for e in logged}) == 1
    assert events.written == 3 and events.queued == 0


async def test_a_simulated_clock_stamps_the_events_with_simulated_time(aiohttp_client, tmp_path):
    start = 1_796_083_200.0  # 2026-12-01T00:00:00Z
    clock = Clock(start=start, speed=3600.0, anchor=time.time())
    client = await aiohttp_client(create_app(Config(clock=clock, events=tmp_path)))
    assert (await client.post("/bid/2", data=_banner())).status == 200
    await client.close()  # closes the log: every queued event written
    (event,) = _records(tmp_path)
    assert start <= event["time"] <= clock.now()
    assert event["record"]["hour"] == time.gmtime(event["time"]).tm_hour  # the hour the model saw, and the file's
    assert [p.name[:18] for p in tmp_path.glob("events-*")] == [f"events-{events_hour(event['time'])}"]


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_writes_every_event_of_a_served_bid(tmp_path, workers):
    with Server("--events", str(tmp_path / "events"), workers=workers) as server:
        server.wait_ready(workers)
        answered = []
        for i in range(20):
            status, body = server.post("/bid/2", _banner(f"sigterm-{i}"))
            if status == 200:
                answered.extend(b["id"] for s in json.loads(body)["seatbid"] for b in s["bid"])
        assert answered
        assert server.stop() == 0
    assert sorted(r["bid_id"] for r in _records(tmp_path / "events")) == sorted(answered)
    assert not list((tmp_path / "events").glob(".tmp-*"))


def test_bench_load_can_measure_the_bidder_with_its_event_log():
    from bench import load

    command = load.server_command("bidder-events", load.LoadConfig(servers=("bidder", "bidder-events")), 9005, 1)
    assert command[command.index("--events") + 1].endswith("bench-bidder-events")
    assert "--events" not in load.server_command("bidder", load.LoadConfig(), 9005, 1)


# -- train logs ------------------------------------------------------------------------------------------------
def _write_log(directory: Path, records: list[dict], name: str = "events-20261207T10-w0-p1-000001.jsonl.zst") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(zstandard.ZstdCompressor().compress(
        b"".join(json.dumps(r).encode() + b"\n" for r in records)))


def _bid(bid_id: str, at: float, **fields) -> dict:
    record = {"weekday": 3, "hour": 14, "useragent": "Mozilla/5.0 (Windows NT 6.1)", "IP": "1.2.3.*",
              "region": "1", "city": "2", "adexchange": "2", "domain": "example.com", "url": None, "urlid": None,
              "usertag": ["10006", "13776"], "slotid": "s1", "slotvisibility": "Na", "slotformat": "0",
              "slotprice": 7, "creative": "cr", "advertiser": 1458, "slotwidth": 300, "slotheight": 250}
    return {"schema": 1, "kind": "bid", "time": at, "bid_id": bid_id, "record": record, "campaign": "c1458",
            "creative": "cr", "model": "m", "pctr": 0.002, "value": 2.4, "price": 2.0, "shading": 0.8333,
            "floor": 0.1, "auction": 2, "exchange": "2", "user": "u", **fields}


def _notice(kind: str, bid_id: str, at: float, **fields) -> dict:
    return {"schema": 1, "kind": "notice", "time": at, "bid_id": bid_id, "notice": kind, "price": None, "loss": None,
            "min_to_win": None, "delay": None, **fields}


def _click(bid_id: str, at: float) -> dict:
    return {"schema": 1, "kind": "click", "time": at, "bid_id": bid_id}


def _lines(path: Path) -> list[dict[str, str]]:
    header, *rows = path.read_text().splitlines()
    return [dict(zip(header.split("\t"), row.split("\t"))) for row in rows]


def test_train_logs_joins_bids_with_their_outcomes(tmp_path):
    t = 1_796_637_600.0  # 2026-12-07 10:00 UTC
    events = tmp_path / "events"
    _write_log(events, [
        _bid("a", t), _notice("win", "a", t + 1, price=1.5), _notice("bill", "a", t + 2, price=1.5),
        _click("a", t + 60),                                           # billed, clicked in time: label 1
        _bid("b", t + 1), _notice("bill", "b", t + 3, price=1.2), _click("b", t + 7200),  # clicked too late: 0
        _bid("c", t + 2), _notice("bill", "c", t + 4, price=1.1),      # billed, no click: 0
        _bid("d", t + 3), _notice("win", "d", t + 5, price=1.0), _click("d", t + 6),  # won, never billed
        _bid("e", t + 4), _notice("loss", "e", t + 5, loss=102, min_to_win=2.75),  # lost: exact market price
        _bid("f", t + 5), _notice("loss", "f", t + 6, loss=102),       # lost: market >= bid only
        _bid("g", t + 6),                                              # a bid with no outcome
        _notice("bill", "zz", t + 7, price=1.0), _click("yy", t + 8),  # outcomes with no bid
    ])
    # the events of one bid may be in another worker's file, and in any order
    _write_log(events, [_click("c", t + 30)], "events-20261207T11-w1-p2-000001.jsonl.zst")
    _write_log(events, [_bid("ignored", t)], ".tmp-events-20261207T11-w0-p3-000001.jsonl.zst")
    summary = write_training_data(events, tmp_path / "data", click_window=3600, progress=False)
    train = _lines(tmp_path / "data" / "train.log.txt")
    assert {(r["bidid"], r["click"]) for r in train} == {("a", "1"), ("b", "0"), ("c", "1")}
    assert train[0]["timestamp"] == "20261207100000000" and train[0]["usertag"] == "10006,13776"
    bids = {r["bidid"]: r for r in _lines(tmp_path / "data" / "bids.log.txt")}
    assert set(bids) == {"a", "b", "c", "d", "e", "f"}
    assert (bids["d"]["won"], bids["d"]["payprice"], bids["d"]["click"]) == ("1", "1.000000", "0")
    assert (bids["e"]["won"], bids["e"]["payprice"], bids["e"]["min_to_win"]) == ("0", "null", "2.750000")
    assert bids["f"]["min_to_win"] == "null" and bids["a"]["value_per_click"] == "1.200000"
    assert summary["bids_without_outcome"] == 1 and summary["outcomes_without_bid"] == {"notice": 1, "click": 1}
    assert summary["billed"] == 3 and summary["billed_join_rate"] == 0.75 and summary["clicks"] == 2
    # the layouts the trainers read: train fit's logs and train market's bid log
    spec = bidder.default_spec()
    split, stamps, _ = featurize_log(tmp_path / "data" / "train.log.txt", spec, progress=False)
    assert split.labels.tolist() == [1.0, 0.0, 1.0] and (stamps > 0).all()
    market = read_bid_log(tmp_path / "data", spec, progress=False)
    assert market.won.tolist() == [True, True, True, True, False, False] and not market.has_truth
    kind, threshold = observations(market)  # the loss with min-to-win is an exact price, the other a bound
    assert (kind[4], threshold[4], kind[5], threshold[5]) == (EXACT, 2.75, LOST, 2.0)


def test_train_logs_refuses_a_schema_version_it_does_not_know(tmp_path, capsys):
    events = tmp_path / "events"
    _write_log(events, [_bid("a", 1.8e9), {**_bid("b", 1.8e9), "schema": SCHEMA_VERSION + 1}])
    status = train_main(["logs", "--events", str(events), "--out", str(tmp_path / "data"), "--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert "events-20261207T10-w0-p1-000001.jsonl.zst:2: event schema version 2 is not known" in err
    with pytest.raises(DataError, match=r":1: not an event record"):
        _write_log(events, [{"kind": "bid"}])
        write_training_data(events, tmp_path / "data", progress=False)


def test_train_logs_weighs_rows_by_their_inverse_propensity_clipped(tmp_path, capsys):
    t = 1_796_637_600.0
    events = tmp_path / "events"
    # the best of 4 eligible rows at --explore 0.1 (0.1 / 4 + 0.9), another of the 4 (0.1 / 4), an imp of one row
    _write_log(events, [
        _bid("best", t, propensity=0.925), _notice("bill", "best", t + 1, price=1.0), _click("best", t + 5),
        _bid("explored", t + 1, propensity=0.025), _notice("bill", "explored", t + 2, price=1.0),
        _bid("alone", t + 2, propensity=1.0), _notice("bill", "alone", t + 3, price=1.0),
        _bid("lost", t + 3, propensity=0.025), _notice("loss", "lost", t + 4, loss=102),
        _bid("older", t + 4), _notice("bill", "older", t + 5, price=1.0),  # logged before bids had a propensity
    ])
    write_training_data(events, tmp_path / "plain", progress=False)  # no weights unless asked
    assert "weight" not in _lines(tmp_path / "plain" / "train.log.txt")[0]
    assert train_main(["logs", "--events", str(events), "--out", str(tmp_path / "ips"), "--ips-clip", "5",
                       "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["ips_clip"] == 5.0
    rows = _lines(tmp_path / "ips" / "train.log.txt")
    assert {r["bidid"]: r["weight"] for r in rows} == {"best": "1.08108", "explored": "5", "alone": "1", "older": "1"}
    split, _, _ = featurize_log(tmp_path / "ips" / "train.log.txt", bidder.default_spec(), progress=False)
    assert split.weights.tolist() == pytest.approx([1 / 0.925, 5.0, 1.0, 1.0], rel=1e-5)
    assert split.labels.tolist() == [1.0, 0.0, 0.0, 0.0]
    # a clip under 1 and a propensity that is no probability are refused, naming what is wrong
    assert train_main(["logs", "--events", str(events), "--out", str(tmp_path / "x"), "--ips-clip", "0.5"]) == 2
    assert "--ips-clip must be a number of at least 1" in capsys.readouterr().err
    _write_log(events, [_bid("zero", t + 9, propensity=0.0), _notice("bill", "zero", t + 10, price=1.0)],
               "events-20261207T10-w1-p2-000001.jsonl.zst")
    with pytest.raises(DataError, match="bid zero: propensity 0.0 is not a probability above 0"):
        write_training_data(events, tmp_path / "y", ips_clip=5, progress=False)


def test_a_weight_that_is_not_a_positive_number_names_its_line(tmp_path):
    log = tmp_path / "train.log.txt"
    t = 1_796_637_600.0
    _write_log(tmp_path / "events", [_bid("a", t, propensity=0.5), _notice("bill", "a", t + 1, price=1.0)])
    write_training_data(tmp_path / "events", tmp_path, ips_clip=5, progress=False)
    header, row = log.read_text().splitlines()
    log.write_text(f"{header}\n{row}\n{row.rsplit(chr(9), 1)[0]}\t-1\n")
    with pytest.raises(DataError, match=r"train.log.txt:3: column 'weight': expected a positive finite number, got '-1'"):
        featurize_log(log, bidder.default_spec(), progress=False)


# -- bench loop -------------------------------------------------------------------------------------------------
def test_bench_loop_draws_as_many_generator_rows_as_the_logs_hold_in_time_order(tmp_path):
    from bench.loop import reference_data
    from bench.servers import BenchError

    generator = tmp_path / "generator"
    generator.mkdir()
    (generator / "train.log.txt").write_text("click\ttimestamp\n" + "".join(f"0\t{i:05d}\n" for i in range(100)))
    (generator / "test.log.txt").write_text("click\ttimestamp\n1\t99999\n")
    reference_data(generator, 30, tmp_path / "data", seed=1)
    header, *rows = (tmp_path / "data" / "train.log.txt").read_text().splitlines()
    assert header == "click\ttimestamp" and len(rows) == len(set(rows)) == 30 and rows == sorted(rows)
    assert (tmp_path / "data" / "test.log.txt").read_text() == "click\ttimestamp\n1\t99999\n"
    with pytest.raises(BenchError, match="more than the generator's 100"):
        reference_data(generator, 101, tmp_path / "more", seed=1)


def test_bench_loop_refuses_a_folder_already_holding_results(tmp_path, capsys):
    from bench.loop import main as loop_main

    (tmp_path / "loop.json").write_text("{}")
    assert loop_main(["--out", str(tmp_path)]) == 1
    assert "is not empty" in capsys.readouterr().err


# -- exploration --------------------------------------------------------------------------------------------------
def test_exploring_bids_other_eligible_creatives_and_logs_the_probability_of_each(tmp_path):
    scorer, catalog = Scorer(DEFAULT_BUNDLE), load_catalog(DEFAULT_CAMPAIGNS)
    events = EventLog(tmp_path).start()
    best = BidEngine(scorer, catalog, Metrics(), now=1.8e9)
    always = BidEngine(scorer, catalog, Metrics(), now=1.8e9, events=events, explore=1.0)
    chosen = {json.loads(best.bid(_banner(), "2").body)["seatbid"][0]["bid"][0]["crid"]}
    explored = set()
    for i in range(60):
        bid = json.loads(always.bid(_banner(f"explore-{i}"), "2").body)["seatbid"][0]["bid"][0]
        explored.add(bid["crid"])
    events.close()
    eligible = {c.creative_id for c in catalog.eligible(300, 250, "www.foobar.com", "2", frozenset())}
    assert len(explored) > 2 and explored <= eligible and explored != chosen
    propensities = {round(r["propensity"], 9) for r in _records(tmp_path)}
    assert len(propensities) == 1 and 0 < propensities.pop() <= 1 / 3  # 1/k, k rows at or above the floor
    with pytest.raises(ValueError, match="explore must be a share"):
        BidEngine(scorer, catalog, Metrics(), explore=1.5)


def _creative(creative_id: str, w: int, h: int) -> dict:
    return {"id": creative_id, "w": w, "h": h, "adomain": [f"{creative_id}.example"],
            "nurl": "https://w.example/?p=${AUCTION_PRICE}"}


def test_exploring_draws_among_the_rows_at_or_above_the_floor_of_each_imp(tmp_path):
    """Per imp, k open-auction rows at or above its floor: 1/k each when always exploring (the best one too), and
    probability 1 for an imp with one such row; a drawn row is valued as any row is (pCTR × value per click)."""
    values = {"hi": 100.0, "lo": 0.01, "solo": 1.0}
    catalog = decode_catalog(json.dumps({"campaigns": [
        {"id": f"c-{name}", "advertiser": advertiser, "value_per_click": values[name],
         "creatives": [_creative(name, *size)],
        **({"deals": [{"dealid": "D-lo"}]} if name == "lo" else {})}
        for name, advertiser, size in (("hi", 1458, (300, 250)), ("lo", 3358, (300, 250)), ("solo", 3386, (728, 90)))
    ]}), "explore.json")
    events = EventLog(tmp_path).start()
    always = BidEngine(Scorer(DEFAULT_BUNDLE), catalog, Metrics(), now=1.8e9, events=events, explore=1.0)
    half = BidEngine(Scorer(DEFAULT_BUNDLE), catalog, Metrics(), now=1.8e9, events=events, explore=0.5)
    floor_between = 5.0  # over lo's value, under hi's (checked below against the logged pCTRs)
    lo_deal = {"private_auction": 0, "deals": [{"id": "D-lo", "bidfloor": 1e6}]}  # out of reach: lo bids openly

    def request(request_id: str, *imps: tuple[tuple[int, int], float], **imp_fields) -> bytes:
        return json.dumps({"id": request_id, "at": 2, "site": {"domain": "news.example"}, "imp": [
            {"id": str(n + 1), "bidfloor": floor, "banner": {"w": w, "h": h}, **imp_fields}
            for n, ((w, h), floor) in enumerate(imps)]}).encode()

    for i in range(40):
        assert always.bid(request(f"both-{i}", ((300, 250), 0.001))).status == 200
        assert always.bid(request(f"above-{i}", ((300, 250), floor_between))).status == 200
        assert always.bid(request(f"solo-{i}", ((728, 90), 0.001))).status == 200
        # the first imp has no row at or above its floor, or only one: the second is explored all the same
        assert always.bid(request(f"second-{i}", ((300, 250), 1e6), ((300, 250), 0.001))).status == 200
        assert always.bid(request(f"after-{i}", ((300, 250), floor_between), ((300, 250), 0.001))).status == 200
        assert always.bid(request(f"deal-{i}", ((300, 250), 0.001), pmp=lo_deal)).status == 200  # lo's row: a deal's
        assert half.bid(request(f"half-{i}", ((300, 250), 0.001))).status == 200
    events.close()
    logged = _records(tmp_path)
    assert len(logged) == 40 * 8
    for record in logged:
        kind = record["bid_id"].partition("-")[0]
        value_per_click = values[record["creative"]]
        assert record["value"] == pytest.approx(record["pctr"] * value_per_click * 1000.0, rel=1e-9), record
        if kind == "both":
            assert record["value"] > floor_between if record["creative"] == "hi" else record["value"] < floor_between
        if kind == "after" and record["bid_id"].endswith("-1"):
            kind = "above"
        expected = {"both": 0.5, "above": 1.0, "solo": 1.0, "second": 0.5, "after": 0.5, "deal": 1.0,
                    "half": 0.75 if record["creative"] == "hi" else 0.25}[kind]  # explore / k (+ 1 - explore: best)
        assert record["propensity"] == pytest.approx(expected), record
        if kind in ("above", "deal"):
            assert record["creative"] == "hi"
    assert {r["creative"] for r in logged if r["bid_id"].startswith("both-")} == {"hi", "lo"}


def test_a_bid_logs_its_auction_type_and_its_price_over_its_value(tmp_path):
    """A fixed-price deal bids its agreed price whatever the value: the log's shading is price / value, also for a
    value under 1 USD CPM."""
    catalog = decode_catalog(json.dumps({"campaigns": [
        {"id": "c-lo", "advertiser": 3358, "value_per_click": 0.01, "deals": [{"dealid": "D-fixed"}],
         "creatives": [_creative("lo", 300, 250)]}]}), "deal.json")
    events = EventLog(tmp_path).start()
    engine = BidEngine(Scorer(DEFAULT_BUNDLE), catalog, Metrics(), now=1.8e9, events=events)
    body = {"id": "r1", "at": 1, "site": {"domain": "news.example"}, "imp": [
        {"id": "1", "banner": {"w": 300, "h": 250},
         "pmp": {"private_auction": 1, "deals": [{"id": "D-fixed", "bidfloor": 0.001, "at": 3}]}}]}
    answer = json.loads(engine.bid(json.dumps(body).encode()).body)
    assert answer["seatbid"][0]["bid"][0]["price"] == 0.001
    events.close()
    (record,) = _records(tmp_path)
    assert record["auction"] == 1 and record["price"] == 0.001 and 0.001 < record["value"] < 1.0
    assert record["shading"] == pytest.approx(0.001 / record["value"], rel=1e-9)


def test_without_exploration_every_logged_bid_has_probability_one(tmp_path):
    events = EventLog(tmp_path).start()
    engine = BidEngine(Scorer(DEFAULT_BUNDLE), load_catalog(DEFAULT_CAMPAIGNS), Metrics(), now=1.8e9, events=events)
    assert engine.bid(_banner(), "2").status == 200
    events.close()
    assert [r["propensity"] for r in _records(tmp_path)] == [1.0]

"""The bidder's clocks: fixed (``--now``, ``Config.now``), weekday and hour, and so prices, stop following the wall
clock; simulated (``--clock-start/--clock-speed/--clock-anchor``, ``Config.clock``), they follow a faster clock."""
from __future__ import annotations

import calendar

import pytest

import bidder.__main__
from bidder.app import DEFAULT_CAMPAIGNS, STATE, Config, create_app
import bidder.openrtb
from bidder.__main__ import _parser, parse_now
from bidder.campaigns import load_catalog
from bidder.clock import Clock
from bidder.engine import BidEngine
from bidder.metrics import Metrics
from bidder.scorer import Scorer

WEDNESDAY_14H = calendar.timegm((2026, 11, 25, 14, 0, 0))


def capture_rows(engine: BidEngine) -> list:
    seen = []
    score = engine.scorer.score

    def spy(rows):
        seen.extend(rows)
        return score(rows)

    engine.scorer.score = spy
    return seen


def test_a_fixed_clock_ignores_the_wall_clock(small_bundle, openrtb_examples, monkeypatch):
    body = openrtb_examples["bid-request-2.5/simple-banner.json"]
    engine = BidEngine(Scorer(small_bundle), load_catalog(DEFAULT_CAMPAIGNS), Metrics(), now=WEDNESDAY_14H)
    rows = capture_rows(engine)
    answers = set()
    for hours in range(0, 168, 7):  # every weekday, many hours
        monkeypatch.setattr(bidder.openrtb.time, "time", lambda: WEDNESDAY_14H + hours * 3600 + 1234.5)
        answers.add(engine.bid(body).body)
    assert len(answers) == 1
    assert {(imp["weekday"], imp["hour"]) for _, imp in rows} == {(2, 14)}


def test_the_fixed_clock_is_the_clock_a_request_would_have_read(small_bundle, openrtb_examples, monkeypatch):
    body = openrtb_examples["bid-request-2.6/mobile.json"]
    fixed = BidEngine(Scorer(small_bundle), load_catalog(DEFAULT_CAMPAIGNS), Metrics(), utc_offset_hours=8,
                      now=WEDNESDAY_14H)
    wall = BidEngine(Scorer(small_bundle), load_catalog(DEFAULT_CAMPAIGNS), Metrics(), utc_offset_hours=8)
    rows = capture_rows(fixed)
    monkeypatch.setattr(bidder.openrtb.time, "time", lambda: WEDNESDAY_14H)
    assert fixed.bid(body) == wall.bid(body)
    assert (rows[0][1]["weekday"], rows[0][1]["hour"]) == (2, 22)  # --utc-offset still applies


async def test_config_now_reaches_the_engine(aiohttp_client, small_bundle):
    client = await aiohttp_client(create_app(Config(model=small_bundle, now=WEDNESDAY_14H)))
    assert client.server.app[STATE].engine.now == WEDNESDAY_14H


@pytest.mark.parametrize("text", ["2026-11-25T14:00:00Z", "2026-11-25T14:00:00", "2026-11-25T15:00:00+01:00",
                                  str(WEDNESDAY_14H), f"{WEDNESDAY_14H}.0"])
def test_now_option_reads_iso_8601_or_unix_seconds(text):
    assert parse_now(text) == WEDNESDAY_14H
    assert _parser().parse_args(["serve", "--now", text]).now == WEDNESDAY_14H


def test_a_bad_now_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(["serve", "--now", "yesterday"])
    assert exit_.value.code == 2 and "ISO 8601" in capsys.readouterr().err


# -- the simulated clock (--clock-start, --clock-speed, --clock-anchor) --------------------------------------
def test_a_simulated_clock_runs_speed_times_faster_from_its_anchor(monkeypatch):
    import bidder.clock

    clock = Clock(start=WEDNESDAY_14H, speed=720, anchor=1000.0)
    monkeypatch.setattr(bidder.clock.time, "time", lambda: 1005.0)
    assert clock.now() == clock() == WEDNESDAY_14H + 3600 == clock.at(1005.0)
    assert clock.wall(WEDNESDAY_14H + 7200) == 1010.0
    with pytest.raises(ValueError, match="speed"):
        Clock(start=0, speed=-1, anchor=0)


def test_the_engine_prices_each_request_at_the_simulated_hour(small_bundle, openrtb_examples, monkeypatch):
    import bidder.clock

    body = openrtb_examples["bid-request-2.5/simple-banner.json"]
    anchor = 1_000_000.0
    engine = BidEngine(Scorer(small_bundle), load_catalog(DEFAULT_CAMPAIGNS), Metrics(),
                       now=Clock(start=WEDNESDAY_14H, speed=3600, anchor=anchor))
    rows = capture_rows(engine)
    priced_at = []
    for wall_seconds in (0, 1, 2, 10, 11):  # one simulated hour per wall second
        monkeypatch.setattr(bidder.clock.time, "time", lambda: anchor + wall_seconds + 0.5)
        engine.bid(body)
        priced_at.append({(imp["weekday"], imp["hour"]) for _, imp in rows})
        rows.clear()
    assert priced_at == [{(2, 14)}, {(2, 15)}, {(2, 16)}, {(3, 0)}, {(3, 1)}]


def test_clock_options_build_the_clock_anchored_at_start_up(monkeypatch):
    from bidder.__main__ import simulated_clock

    args = _parser().parse_args(["serve", "--clock-start", "2026-11-25T14:00:00Z", "--clock-speed", "720",
                                 "--clock-anchor", "1000"])
    assert simulated_clock(args) == Clock(start=WEDNESDAY_14H, speed=720.0, anchor=1000.0)
    monkeypatch.setattr(bidder.__main__.time, "time", lambda: 5000.0)
    assert simulated_clock(_parser().parse_args(["serve", "--clock-speed", "2"])) == Clock(5000.0, 2.0, 5000.0)
    assert simulated_clock(_parser().parse_args(["serve"])) is None


@pytest.mark.parametrize("argv, message", [
    (["--clock-speed", "0"], "--clock-speed must be a positive"),
    (["--clock-start", "2026-11-25T14:00:00Z", "--now", "2026-11-25T14:00:00Z"], "--now fixes the clock"),
    (["--clock-anchor", "1000"], "--clock-anchor needs"),
])
def test_bad_clock_options_are_one_error_line(argv, message, capsys):
    from bidder.__main__ import main

    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


async def test_config_clock_reaches_the_engine(aiohttp_client, small_bundle):
    clock = Clock(start=WEDNESDAY_14H, speed=60, anchor=0.0)
    client = await aiohttp_client(create_app(Config(model=small_bundle, clock=clock, now=1.0)))
    assert client.server.app[STATE].engine.now is clock  # the simulated clock wins over a fixed one

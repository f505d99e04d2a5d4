"""A fixed clock (``--now``, ``Config.now``): weekday and hour, and so prices, stop following the wall clock."""
from __future__ import annotations

import calendar

import pytest

from bidder.app import DEFAULT_CAMPAIGNS, STATE, Config, create_app
import bidder.openrtb
from bidder.__main__ import _parser, parse_now
from bidder.campaigns import load_catalog
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

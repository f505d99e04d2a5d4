"""The README as a newcomer reads it: its example bid is reproducible with the documented clock."""
from __future__ import annotations

import json
import re
from pathlib import Path

from bidder import DEFAULT_BUNDLE, OPENRTB_EXAMPLES
from bidder.__main__ import parse_now
from bidder.campaigns import load_catalog
from bidder.engine import BidEngine
from bidder.metrics import Metrics
from bidder.scorer import Scorer

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_example_bid_is_what_the_default_model_answers_at_the_documented_time():
    intro = "A bid, for the IAB simple-banner request, served with `--now "
    start = README.index(intro) + len(intro)
    now = README[start:README.index("`", start)]
    block = re.search(r"```json\n(.*?)```", README[start:], re.S).group(1)
    documented = json.loads(block)
    assert "make serve NOW=" + now in README and "--now " + now in README
    engine = BidEngine(Scorer(DEFAULT_BUNDLE), load_catalog(DEFAULT_BUNDLE / "campaigns.json"), Metrics(),
                       now=parse_now(now))
    outcome = engine.bid((OPENRTB_EXAMPLES / "bid-request-2.5" / "simple-banner.json").read_bytes())
    assert outcome.status == 200
    assert json.loads(outcome.body) == documented


def test_the_readme_says_prices_follow_the_clock():
    assert "Prices depend on the weekday and hour" in README


def test_the_example_deal_bid_is_reproducible():
    price, dealid, seat = re.search(r'pmp-with-direct-deal\.json` is answered\s+`…"price":([\d.]+),…,"cid":"c3358",'
                                    r'"dealid":"([^"]+)"}\],"seat":"([^"]+)"}', README).groups()
    engine = BidEngine(Scorer(DEFAULT_BUNDLE), load_catalog(DEFAULT_BUNDLE / "campaigns.json"), Metrics(),
                       now=parse_now("2026-11-25T14:00:00Z"))
    answer = json.loads(engine.bid((OPENRTB_EXAMPLES / "bid-request-2.5" / "pmp-with-direct-deal.json").read_bytes()).body)
    (seatbid,) = answer["seatbid"]
    (bid,) = seatbid["bid"]
    assert (bid["price"], bid["dealid"], seatbid["seat"]) == (float(price), dealid, seat)

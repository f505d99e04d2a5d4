"""Micro-benchmarks of the spend ledger (`pytest --benchmark tests/test_bench_ledger.py`): a bid's reservation on
the bid path, one refresher call carrying 500 bid reports and 500 notices on each banker, and one carrying a quarter
of a second of a worker bidding 10,000 times a second (2,500 reports) on the embedded banker."""
import itertools

import pytest

from bidder.campaigns import CampaignTerms
from bidder.ledger import Ledger
from bidder.ledger.book import UNLIMITED, CampaignSync, Reservation, Settlement
from bidder.ledger.embedded import EmbeddedBanker
from bidder.ledger.redis_banker import RedisBanker

NOW = 1_796_126_400.0
CALL = 500


def test_reserve_on_the_bid_path(benchmark, tmp_path):
    benchmark.group = "ledger: one bid's reservation"
    ledger = Ledger(EmbeddedBanker(tmp_path, 3600.0), NOW, min_lease_usd=1e6)
    ledger.use_terms([CampaignTerms("c", total_usd=1e7)])
    ledger.refresh()
    ids = (f"b{i}" for i in itertools.count())
    assert benchmark(lambda: ledger.reserve(0, 1_000_000, next(ids), NOW, 600, "user", "cr"))


@pytest.mark.parametrize("kind", ["embedded", "redis"])
def test_one_refresher_call(benchmark, tmp_path, kind, request):
    benchmark.group = f"ledger: one call of {CALL} bid reports and {CALL} notices"
    if kind == "embedded":
        banker = EmbeddedBanker(tmp_path, 3600.0)
    else:
        banker = RedisBanker(request.getfixturevalue("redis_server").url, 3600.0)
    calls = itertools.count()

    def call():
        k = next(calls)
        reports = [Reservation(f"b{k}-{i}", "c", 1_000_000, NOW + 600) for i in range(CALL)]
        notices = [Settlement(f"b{k - 1}-{i}", "bill" if i % 10 == 0 else "loss", "c", 500_000, 1_000_000,
                              "2026-12-01", NOW + 600) for i in range(CALL)] if k else []
        return banker.sync("h", NOW, [CampaignSync("c", "2026-12-01", UNLIMITED, UNLIMITED, 0, 10 ** 12)], reports,
                           notices)

    assert benchmark.pedantic(call, rounds=20, iterations=1)["c"].delta >= 0
    banker.close()


def test_a_busy_worker_s_refresher_call(benchmark, tmp_path):
    """What one call takes the serving core for (the refresher runs beside the event loop): 2,500 reports."""
    benchmark.group = "ledger: one call of 2,500 bid reports (embedded)"
    banker = EmbeddedBanker(tmp_path, 3600.0)
    calls = itertools.count()

    def call():
        k = next(calls)
        reports = [Reservation(f"b{k}-{i}", "c", 1_000_000, NOW + 600) for i in range(2_500)]
        return banker.sync("h", NOW, [CampaignSync("c", "2026-12-01", UNLIMITED, UNLIMITED, 0, 10 ** 12)], reports, [])

    assert benchmark.pedantic(call, rounds=10, iterations=1)["c"].delta >= 0
    banker.close()

"""The spend ledger: budgets reserved at bid time, committed or released by notices (RTBkit's banker).

``leases.Ledger`` is a worker's side (the bid path reserves from local leases); ``book`` is the banker's
arithmetic; the banker itself is ``embedded.EmbeddedBanker`` (one machine, a SQLite file under the state
directory) or ``redis_banker.RedisBanker`` (many machines, one Redis). ``open_banker`` picks one from
``bidder serve --ledger``; ``open_notice_store`` puts the notices' dedup in the same place. docs/budgets.md
has the policy for notices that never come and the overspend bound.
"""
from __future__ import annotations

import os

from bidder.ledger.book import CampaignSync, Grant, Reservation, Settlement
from bidder.ledger.leases import NANOS_PER_USD, Banker, Ledger, campaign_day, nanos

__all__ = ["NANOS_PER_USD", "Banker", "CampaignSync", "Grant", "Ledger", "Reservation", "Settlement",
           "campaign_day", "nanos", "open_banker", "open_notice_store"]


def open_banker(url: str | None, state_dir: str | os.PathLike, retention_s: float) -> Banker:
    """The banker of ``--ledger URL``: None is the embedded one in ``state_dir``, ``redis://HOST:PORT/DB`` the Redis
    one. ``retention_s``: how long a settled bid is remembered (late bills within it are matched to their bid)."""
    if url is None:
        from bidder.ledger.embedded import EmbeddedBanker

        return EmbeddedBanker(state_dir, retention_s)
    from bidder.ledger.redis_banker import RedisBanker

    return RedisBanker(url, retention_s)


def open_notice_store(url: str | None, state_dir: str | os.PathLike, max_window_s: float):
    """The notices' dedup store beside the banker of ``--ledger URL`` (``bidder.notice_store.NoticeStore``)."""
    if url is None:
        from bidder.notice_store import SqliteNoticeStore

        return SqliteNoticeStore(state_dir, max_window_s)
    from bidder.ledger.redis_banker import RedisNoticeStore

    return RedisNoticeStore(url, max_window_s)

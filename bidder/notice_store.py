"""Which notices were counted already: one row per (bid id, notice kind), shared by every worker of a machine.

``NoticeStore.first_time`` is the whole interface (``first_times`` the same for several at once): True the first
time a (bid id, kind) is seen, False for every repeat (a duplicate, an exchange's retry), whichever worker process
answers it. ``SqliteNoticeStore``
keeps the rows in a SQLite file in write-ahead-log mode under the state directory: ``INSERT OR IGNORE`` on the
primary key is atomic across processes, and needs no service. Across machines the rows live where the spend
ledger lives: with ``bidder serve --ledger redis://...`` ``bidder.ledger.redis_banker.RedisNoticeStore`` keeps
them in that Redis (``bidder.ledger.open_notice_store`` picks the store).

Rows are kept as long as a notice can still be accepted: a token older than the longest window is refused as
expired before it reaches the store, so rows issued before that (plus a margin) are deleted now and then.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Protocol, Sequence

from bidder import walfile

__all__ = ["STORE_FILE", "NoticeStore", "SqliteNoticeStore"]

STORE_FILE = "notices.sqlite"
#: rows kept beyond the longest window (seconds): clocks of two machines and a notice in flight
RETENTION_MARGIN_S = 3600.0
#: inserts between two deletions of expired rows
PRUNE_EVERY = 10_000
#: seconds between two checkpoints of the log into the file (by the store's checkpoint thread)
CHECKPOINT_S = 1.0


class NoticeStore(Protocol):
    def first_time(self, bid_id: str, kind: str, issued: float, now: float) -> bool:
        """Record (bid id, kind); True when no worker recorded it before. ``issued`` is the token's issue time
        and ``now`` the engine's clock, both Unix seconds (they bound how long the row is kept)."""

    def first_times(self, notices: Sequence[tuple[str, str, float]], now: float) -> list[bool]:
        """``first_time`` of each (bid id, kind, issued), in order, in one round (one transaction, one round
        trip): the notice routes record the notices of one event-loop turn together."""


class SqliteNoticeStore:
    """The store of one machine: ``state_dir/notices.sqlite``, opened by each worker process."""

    def __init__(self, state_dir: str | os.PathLike, max_window_s: float):
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / STORE_FILE
        self.retention_s = max_window_s + RETENTION_MARGIN_S
        # autocommit: each insert is its own transaction; synchronous=NORMAL in WAL mode survives a crashed
        # process (not a power cut) without an fsync per notice
        self.db = walfile.connect(self.path, 10.0, "NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS notices (bid_id TEXT NOT NULL, kind TEXT NOT NULL, "
                        "issued REAL NOT NULL, seen REAL NOT NULL, PRIMARY KEY (bid_id, kind)) WITHOUT ROWID")
        self.db.execute("CREATE INDEX IF NOT EXISTS notices_issued ON notices (issued)")
        self._inserts = 0
        # The log is checkpointed into the file (which fsyncs both) by a thread of its own, never by a commit: a
        # commit that ran the checkpoint waited on the disk for milliseconds, and every notice behind it too.
        self.db.execute("PRAGMA wal_autocheckpoint=0")
        self._stop = threading.Event()
        self._checkpoints = threading.Thread(target=self._checkpoint, name="notice-store-checkpoint", daemon=True)
        self._checkpoints.start()

    def _checkpoint(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
        try:
            while not self._stop.wait(CHECKPOINT_S):
                try:  # PASSIVE: copies what no reader needs, waits for no writer; the log restarts when it can
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:  # busy now: the next turn
                    pass
        finally:
            db.close()

    def first_time(self, bid_id: str, kind: str, issued: float, now: float) -> bool:
        cursor = self.db.execute("INSERT OR IGNORE INTO notices VALUES (?, ?, ?, ?)",
                                 (bid_id, kind, issued, time.time()))
        first = cursor.rowcount == 1
        if first:
            self._inserts += 1
            if self._inserts % PRUNE_EVERY == 0:
                self.prune(now)
        return first

    def first_times(self, notices: Sequence[tuple[str, str, float]], now: float) -> list[bool]:
        # one transaction for all: a commit (locks, a WAL frame) costs several times an insert
        db, seen = self.db, time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            firsts = [db.execute("INSERT OR IGNORE INTO notices VALUES (?, ?, ?, ?)",
                                 (bid_id, kind, issued, seen)).rowcount == 1 for bid_id, kind, issued in notices]
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        before, self._inserts = self._inserts, self._inserts + sum(firsts)
        if before // PRUNE_EVERY != self._inserts // PRUNE_EVERY:
            self.prune(now)
        return firsts

    def prune(self, now: float) -> int:
        """Delete rows no notice can match any more; how many were deleted."""
        return self.db.execute("DELETE FROM notices WHERE issued < ?", (now - self.retention_s,)).rowcount

    def __len__(self) -> int:
        return self.db.execute("SELECT count(*) FROM notices").fetchone()[0]

    def close(self) -> None:
        self._stop.set()
        self._checkpoints.join()
        self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        self.db.close()

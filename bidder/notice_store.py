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

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Protocol, Sequence

from bidder import walfile
from bidder.walfile import json_keys, write_rows

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

    def try_first_times(self, notices: Sequence[tuple[str, str, float]], now: float) -> list[bool] | None:
        """``first_times`` when it can answer at once, without waiting on a lock, a disk or the network: the event
        loop asks it first; None sends the notices to ``first_times`` in the store's thread."""


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
        self._count_lock = threading.Lock()
        # The log is checkpointed into the file (which fsyncs both) by a thread of its own, never by a commit: a
        # commit that ran the checkpoint waited on the disk for milliseconds, and every notice behind it too.
        self.db.execute("PRAGMA wal_autocheckpoint=0")
        # the event loop's own connection (``try_first_times``): it never waits for another worker's write lock
        self._now_db = sqlite3.connect(self.path, isolation_level=None, timeout=0.0, check_same_thread=False)
        self._now_db.execute("PRAGMA synchronous=NORMAL")
        self._now_db.execute("PRAGMA wal_autocheckpoint=0")
        self._prune_at: float | None = None  # the checkpoint thread deletes the rows issued before this, once
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
                prune_at, self._prune_at = self._prune_at, None
                if prune_at is not None:  # here, not in the event loop: thousands of rows at a time
                    try:
                        db.execute("DELETE FROM notices WHERE issued < ?", (prune_at - self.retention_s,))
                    except sqlite3.Error:
                        self._prune_at = prune_at  # the next turn
        finally:
            db.close()

    def first_time(self, bid_id: str, kind: str, issued: float, now: float) -> bool:
        return self.first_times([(bid_id, kind, issued)], now)[0]

    def first_times(self, notices: Sequence[tuple[str, str, float]], now: float) -> list[bool]:
        return self._record(self.db, notices, now)

    def try_first_times(self, notices: Sequence[tuple[str, str, float]], now: float) -> list[bool] | None:
        # A commit here writes the log (no fsync: synchronous=NORMAL, checkpoints in their own thread): tens of
        # microseconds, less than handing the notices to a thread and back. Only another worker's transaction can
        # make it wait: then SQLite says busy at once (timeout 0) and the thread records them.
        try:
            return self._record(self._now_db, notices, now)
        except sqlite3.OperationalError as exc:
            if self._now_db.in_transaction:  # a commit refused: nothing of it was recorded
                self._now_db.execute("ROLLBACK")
            if "locked" in str(exc) or "busy" in str(exc):
                return None
            raise

    def _record(self, db: sqlite3.Connection, notices: Sequence[tuple[str, str, float]], now: float) -> list[bool]:
        # One transaction for all (a commit, its locks and a WAL frame, costs several times an insert), and a few
        # statements whatever their number: in a thread, ``sqlite3`` lets the GIL go at every statement's step and
        # waits to get it back, up to the switch interval beside a busy event loop. Which notices are known is read
        # in one step, then the new ones are inserted in one step.
        seen = time.time()
        keys = [(bid_id, kind) for bid_id, kind, _ in notices]
        db.execute("BEGIN IMMEDIATE")
        try:
            found = db.execute("SELECT json_group_array(json_array(n.bid_id, n.kind)) FROM json_each(?) AS w "
                               "CROSS JOIN notices AS n ON n.bid_id = w.value ->> 0 AND n.kind = w.value ->> 1",
                               (json_keys(keys),)).fetchone()[0]
            known = {tuple(key) for key in json.loads(found)}
            firsts = []
            for key in keys:  # a notice twice in one round: its first time is the first of them
                firsts.append(key not in known)
                known.add(key)
            new = [(*key, n[2], seen) for key, n, first in zip(keys, notices, firsts) if first]
            write_rows(db, "INSERT INTO notices", "(?, ?, ?, ?)", new)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        with self._count_lock:
            before, self._inserts = self._inserts, self._inserts + len(new)
        if before // PRUNE_EVERY != self._inserts // PRUNE_EVERY:
            self._prune_at = now
        return firsts

    def prune(self, now: float) -> int:
        """Delete rows no notice can match any more; how many were deleted."""
        return self.db.execute("DELETE FROM notices WHERE issued < ?", (now - self.retention_s,)).rowcount

    def __len__(self) -> int:
        return self.db.execute("SELECT count(*) FROM notices").fetchone()[0]

    def close(self) -> None:
        self._stop.set()
        self._checkpoints.join()
        self._now_db.close()
        self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        self.db.close()

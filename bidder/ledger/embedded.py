"""The embedded banker: one machine's accounts in a SQLite file under the state directory, no service to run.

Every worker process of the machine opens the same file (``ledger.sqlite``); each ``sync`` is one
``BEGIN IMMEDIATE`` transaction, so the workers' steps are serialized by SQLite's write lock and a step is
applied whole or not at all. The file is in write-ahead-log mode with ``synchronous=FULL``: SQLite fsyncs the
log at every commit, that is once per sync of each worker (a few times a second, off the bid path), so the
day's spend survives a crash of the process or of the machine; nothing else is fsync'd.
"""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Sequence

from bidder.ledger.book import FINAL, BidRow, Book, CampaignSync, Grant, Impression, Reservation, Settlement

__all__ = ["LEDGER_FILE", "EmbeddedBanker"]

LEDGER_FILE = "ledger.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (campaign TEXT NOT NULL, period TEXT NOT NULL, spent INTEGER NOT NULL DEFAULT 0,
    reserved INTEGER NOT NULL DEFAULT 0, leased INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (campaign, period))
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS holds (holder TEXT NOT NULL, campaign TEXT NOT NULL, lease INTEGER NOT NULL,
    day TEXT NOT NULL, PRIMARY KEY (holder, campaign)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bids (bid_id TEXT PRIMARY KEY, campaign TEXT NOT NULL, day TEXT NOT NULL,
    amount INTEGER NOT NULL, funded INTEGER NOT NULL, state TEXT NOT NULL, price INTEGER NOT NULL,
    expires REAL NOT NULL, user TEXT NOT NULL, creative TEXT NOT NULL, due REAL, keep_until REAL NOT NULL)
    WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS bids_due ON bids (due) WHERE due IS NOT NULL;
CREATE INDEX IF NOT EXISTS bids_keep ON bids (keep_until);
CREATE TABLE IF NOT EXISTS impressions (seq INTEGER PRIMARY KEY AUTOINCREMENT, campaign TEXT NOT NULL,
    creative TEXT NOT NULL, user TEXT NOT NULL, at REAL NOT NULL);
"""
_BID_COLUMNS = "bid_id, campaign, day, amount, funded, state, price, expires, user, creative"


def _bid_row(r) -> BidRow:
    return BidRow(r[0], r[1], r[2], r[3], bool(r[4]), *r[5:])


#: bid ids per query when the rows of a step's bids are read together (SQLite allows 32,766 parameters)
_READ_CHUNK = 500


class _SqliteStorage:
    """The rows in SQLite; the accounts' changes of one call are summed in memory and written once, at its end
    (``flush``): a call moves the same few accounts hundreds of times. The bids' rows of a call are read together
    (``prefetch``: one query per 500, not one per bid) and written together (one ``executemany`` at the end, or
    before a query that reads them): a call handles a quarter of a second of a worker's bids, thousands, and a
    statement per row made it take the serving core for tens of milliseconds. Nothing read or written is kept past
    the call: other workers' calls change the rows in between."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        self._changes: dict[tuple[str, str], list[int]] = {}
        self._rows: dict[str, BidRow | None] = {}  # bid id -> its row as this call last read or wrote it
        self._puts: dict[str, tuple] = {}  # bid id -> the values of its row to write

    def account(self, campaign: str, period: str) -> tuple[int, int, int]:
        row = self.db.execute("SELECT spent, reserved, leased FROM accounts WHERE campaign = ? AND period = ?",
                              (campaign, period)).fetchone()
        change = self._changes.get((campaign, period))
        if change is None:
            return (0, 0, 0) if row is None else row
        return tuple(c + (0 if row is None else r) for c, r in zip(change, row or (0, 0, 0)))

    def add(self, campaign: str, period: str, spent: int = 0, reserved: int = 0, leased: int = 0) -> None:
        change = self._changes.setdefault((campaign, period), [0, 0, 0])
        change[0] += spent
        change[1] += reserved
        change[2] += leased

    def flush(self) -> None:
        self._write_bids()
        self._rows.clear()
        self.db.executemany("INSERT INTO accounts VALUES (?, ?, ?, ?, ?) ON CONFLICT (campaign, period) DO UPDATE "
                            "SET spent = spent + excluded.spent, reserved = reserved + excluded.reserved, "
                            "leased = leased + excluded.leased",
                            [(*key, *change) for key, change in self._changes.items()])
        self._changes.clear()

    def discard(self) -> None:
        self._changes.clear()
        self._rows.clear()
        self._puts.clear()

    def hold(self, holder: str, campaign: str) -> tuple[int, str]:
        row = self.db.execute("SELECT lease, day FROM holds WHERE holder = ? AND campaign = ?",
                              (holder, campaign)).fetchone()
        return (0, "") if row is None else row

    def set_hold(self, holder: str, campaign: str, lease: int, day: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO holds VALUES (?, ?, ?, ?)", (holder, campaign, lease, day))

    def prefetch(self, bid_ids: Sequence[str]) -> None:
        wanted = [bid_id for bid_id in dict.fromkeys(bid_ids) if bid_id not in self._rows]
        for start in range(0, len(wanted), _READ_CHUNK):
            chunk = wanted[start:start + _READ_CHUNK]
            found = {r[0]: _bid_row(r) for r in self.db.execute(
                f"SELECT {_BID_COLUMNS} FROM bids WHERE bid_id IN ({', '.join('?' * len(chunk))})", chunk)}
            for bid_id in chunk:
                self._rows[bid_id] = found.get(bid_id)

    def bid(self, bid_id: str) -> BidRow | None:
        if bid_id in self._rows:
            return self._rows[bid_id]
        row = self.db.execute(f"SELECT {_BID_COLUMNS} FROM bids WHERE bid_id = ?", (bid_id,)).fetchone()
        row = self._rows[bid_id] = None if row is None else _bid_row(row)
        return row

    def put_bid(self, row: BidRow, keep_until: float) -> None:
        due = None if row.state in FINAL else row.expires
        self._rows[row.bid_id] = row
        self._puts[row.bid_id] = (*row[:4], int(row.funded), *row[5:], due, keep_until)

    def _write_bids(self) -> None:
        if self._puts:
            self.db.executemany("INSERT OR REPLACE INTO bids VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                self._puts.values())
            self._puts.clear()

    def due(self, now: float, limit: int) -> list[BidRow]:
        self._write_bids()
        rows = self.db.execute(f"SELECT {_BID_COLUMNS} FROM bids WHERE due IS NOT NULL AND due <= ? ORDER BY due "
                               f"LIMIT ?", (now, limit)).fetchall()
        return [_bid_row(r) for r in rows]

    def purge(self, now: float) -> None:
        self._write_bids()
        self.db.execute("DELETE FROM bids WHERE keep_until < ? AND due IS NULL", (now,))

    def log_impression(self, campaign: str, creative: str, user: str, at: float) -> None:
        self.db.execute("INSERT INTO impressions (campaign, creative, user, at) VALUES (?, ?, ?, ?)",
                        (campaign, creative, user, at))


class EmbeddedBanker:
    """The banker of one machine (``--ledger`` left out): ``state_dir/ledger.sqlite``, opened by each worker."""

    def __init__(self, state_dir: str | os.PathLike, retention_s: float):
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / LEDGER_FILE
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        self.book = Book(_SqliteStorage(self.db), retention_s)

    def __repr__(self) -> str:
        return f"EmbeddedBanker({str(self.path)!r})"

    def sync(self, holder: str, now: float, campaigns: Sequence[CampaignSync], reservations: Sequence[Reservation],
             settlements: Sequence[Settlement]) -> dict[str, Grant]:
        storage = self.book.storage
        self.db.execute("BEGIN IMMEDIATE")
        try:
            grants = self.book.sync(holder, now, campaigns, reservations, settlements)
            storage.flush()
        except BaseException:
            storage.discard()
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        return grants

    def impressions(self, after: int, horizon: float, limit: int = 10_000) -> list[Impression]:
        """The billed impressions of users logged after ``after`` (a ``seq``), oldest first; the log loses what is
        older than ``horizon`` (the engine's time minus the longest frequency cap window)."""
        self.db.execute("DELETE FROM impressions WHERE at < ?", (horizon,))
        rows = self.db.execute("SELECT seq, campaign, creative, user, at FROM impressions WHERE seq > ? ORDER BY seq "
                               "LIMIT ?", (after, limit)).fetchall()
        return [Impression(*r) for r in rows]

    def accounts(self, campaign: str, day: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """(spent, reserved, leased) of the campaign's total account and of its account for ``day``."""
        storage = self.book.storage
        return storage.account(campaign, "T"), storage.account(campaign, day)

    def close(self) -> None:
        self.db.close()

"""The embedded banker: one machine's accounts in a SQLite file under the state directory, no service to run.

Every worker process of the machine opens the same file (``ledger.sqlite``); each ``sync`` is one
``BEGIN IMMEDIATE`` transaction, so the workers' steps are serialized by SQLite's write lock and a step is
applied whole or not at all. The file is in write-ahead-log mode with ``synchronous=FULL``: SQLite fsyncs the
log at every commit, that is once per sync of each worker (a few times a second, off the bid path), so the
day's spend survives a crash of the process or of the machine; nothing else is fsync'd.
"""
from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Sequence

from bidder import walfile
from bidder.walfile import json_keys, write_rows
from bidder.ledger.book import (EXPIRED, FINAL, OPEN, BidRow, Book, CampaignSync, Grant, Impression,
                                Reservation, Settlement, add_change)

__all__ = ["LEDGER_FILE", "EmbeddedBanker"]

LEDGER_FILE = "ledger.sqlite"

#: ``PRAGMA user_version`` of the file's layout: 2 keeps the bids' rows in the order they fall due (one B-tree);
#: a file of layout 0 (a bids table keyed by bid id, with indexes on its due and keep-until times) is converted
SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (campaign TEXT NOT NULL, period TEXT NOT NULL, spent INTEGER NOT NULL DEFAULT 0,
    reserved INTEGER NOT NULL DEFAULT 0, leased INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (campaign, period))
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS holds (holder TEXT NOT NULL, campaign TEXT NOT NULL, lease INTEGER NOT NULL,
    day TEXT NOT NULL, PRIMARY KEY (holder, campaign)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bids (due_ms INTEGER NOT NULL, bid_id TEXT NOT NULL, campaign TEXT NOT NULL,
    day TEXT NOT NULL, amount INTEGER NOT NULL, funded INTEGER NOT NULL, state TEXT NOT NULL, price INTEGER NOT NULL,
    expires REAL NOT NULL, user TEXT NOT NULL, creative TEXT NOT NULL, PRIMARY KEY (due_ms, bid_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS swept (id INTEGER PRIMARY KEY CHECK (id = 0), due_ms INTEGER NOT NULL);
INSERT OR IGNORE INTO swept VALUES (0, -1);
CREATE TABLE IF NOT EXISTS impressions (seq INTEGER PRIMARY KEY AUTOINCREMENT, campaign TEXT NOT NULL,
    creative TEXT NOT NULL, user TEXT NOT NULL, at REAL NOT NULL);
"""
_BID_COLUMNS = "bid_id, campaign, day, amount, funded, state, price, expires, user, creative"
_SETTLED = tuple(sorted(FINAL))
#: a reported bid's new row: open (``OPEN``), funded, no charge yet
_INSERT_NEW = ("INSERT OR IGNORE INTO bids", f"(?, ?, ?, ?, ?, 1, '{OPEN}', 0, ?, ?, ?)")


def _bid_row(r) -> BidRow:
    return BidRow(r[0], r[1], r[2], r[3], bool(r[4]), *r[5:])


def _key(bid_id: str, expires: float) -> tuple[int, str]:
    """A bid's row's key: when it falls due (milliseconds), then its bid id."""
    return round(expires * 1000), bid_id


def _convert(db: sqlite3.Connection) -> None:
    """A file of layout 0 to layout 2: its bids' rows keyed by when they fall due (every unsettled row is swept
    from the start again, once)."""
    db.execute("BEGIN IMMEDIATE")  # the workers starting together convert it once: the others find it done
    try:
        if db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            db.execute("COMMIT")
            return
        columns = {r[1] for r in db.execute("PRAGMA table_info(bids)")}
        if "keep_until" in columns:
            db.execute("DROP INDEX IF EXISTS bids_due")
            db.execute("DROP INDEX IF EXISTS bids_keep")
            db.execute("ALTER TABLE bids RENAME TO bids_v0")
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        if "keep_until" in columns:
            db.execute(f"INSERT INTO bids SELECT CAST(round(expires * 1000) AS INTEGER), {_BID_COLUMNS} FROM bids_v0")
            db.execute("DROP TABLE bids_v0")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


#: a bid row's columns as one JSON array (its expiry as exact text: SQLite writes a REAL in JSON to 15 digits only)
_BID_JSON = ("json_array(b.due_ms, b.bid_id, b.campaign, b.day, b.amount, b.funded, b.state, b.price, "
             "printf('%!.17g', b.expires), b.user, b.creative)")


class _SqliteStorage:
    """The rows in SQLite, read and written a call's worth at a time: one statement for all the rows of a kind.

    The thread that calls the banker shares the GIL with the bid path, and Python's ``sqlite3`` lets the GIL go for
    every step of a statement (every row of an ``executemany``, every row a query returns): beside a busy bid path,
    each step waits for the GIL to come back, up to the switch interval (5 ms). A call of a thousand rows done row by
    row took seconds beside a busy event loop and starved the leases; here every bulk read or write is one step
    (multi-row statements for the rows going in, ``json_each`` for the keys of the rows read, ``json_group_array``
    for the rows coming out), so a call takes a few dozen steps however many bids it carries, and SQLite's work on
    them runs without the GIL, beside the bid path.

    The accounts' and the holds' rows a call reads are kept for the call and their changes written once, at its end
    (``flush``): a call moves the same few accounts hundreds of times. The bids' rows live in one table ordered by
    when they fall due (``(due_ms, bid_id)``, no other index): a call's new rows are appended near its end, the sweep
    of rows whose expiry passed reads the range after the last one swept (``swept``), and settled rows are purged as
    the range before the retention. The rows of a call's bids are read together (``prefetch``) and written together
    (at the end, or before a statement that reads them). Nothing read or written is kept past the call: other
    workers' calls change the rows in between."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        self._changes: dict[tuple[str, str], list[int]] = {}
        self._accounts: dict[tuple[str, str], tuple[int, int, int] | None] = {}  # as read in this call
        self._holds: dict[tuple[str, str], tuple[int, str]] = {}  # (holder, campaign) -> (lease, day) this call
        self._holders: set[str] = set()  # holders whose rows ``_holds`` has (all of them)
        self._hold_puts: dict[tuple[str, str], tuple[int, str]] = {}
        self._rows: dict[tuple[int, str], BidRow | None] = {}  # key -> the row as this call last read or wrote it
        self._puts: dict[tuple[int, str], tuple] = {}  # key -> the values of its row to write
        self._impressions: list[tuple[str, str, str, float]] = []
        self._swept: int | None = None  # rows due up to this (ms) were swept before this call (None: not read yet)
        self._late: list[tuple[int, str]] = []  # unsettled rows this call wrote behind the sweep: due now

    def prefetch_accounts(self, keys: Sequence[tuple[str, str]]) -> None:
        """Read the accounts ``keys`` (campaign, period) in one statement, for this call's ``account``."""
        wanted = [key for key in dict.fromkeys(keys) if key not in self._accounts]
        if not wanted:
            return
        for key in wanted:
            self._accounts[key] = None
        found = self.db.execute(
            "SELECT json_group_array(json_array(a.campaign, a.period, a.spent, a.reserved, a.leased)) FROM "
            "json_each(?) AS w CROSS JOIN accounts AS a ON a.campaign = w.value ->> 0 AND a.period = w.value ->> 1",
            (json_keys(wanted),)).fetchone()[0]
        for campaign, period, *values in json.loads(found):
            self._accounts[campaign, period] = tuple(values)

    def account(self, campaign: str, period: str) -> tuple[int, int, int]:
        key = (campaign, period)
        if key not in self._accounts:
            self.prefetch_accounts([key])
        row = self._accounts[key]
        change = self._changes.get(key)
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
        db = self.db
        write_rows(db, "INSERT INTO accounts", "(?, ?, ?, ?, ?)",
                    [(*key, *change) for key, change in self._changes.items()],
                    " ON CONFLICT (campaign, period) DO UPDATE SET spent = spent + excluded.spent, "
                    "reserved = reserved + excluded.reserved, leased = leased + excluded.leased")
        write_rows(db, "INSERT OR REPLACE INTO holds", "(?, ?, ?, ?)",
                    [(*key, *hold) for key, hold in self._hold_puts.items()])
        write_rows(db, "INSERT INTO impressions (campaign, creative, user, at)", "(?, ?, ?, ?)", self._impressions)
        self.discard()

    def discard(self) -> None:
        self._changes.clear()
        self._accounts.clear()
        self._holds.clear()
        self._holders.clear()
        self._hold_puts.clear()
        self._rows.clear()
        self._puts.clear()
        self._impressions.clear()
        self._late.clear()
        self._swept = None

    def hold(self, holder: str, campaign: str) -> tuple[int, str]:
        if holder not in self._holders:  # all of the holder's rows at once: a call asks for each of its campaigns
            self._holders.add(holder)
            found = self.db.execute("SELECT json_group_array(json_array(campaign, lease, day)) FROM holds "
                                    "WHERE holder = ?", (holder,)).fetchone()[0]
            for c, lease, day in json.loads(found):
                self._holds.setdefault((holder, c), (lease, day))
        return self._holds.get((holder, campaign), (0, ""))

    def set_hold(self, holder: str, campaign: str, lease: int, day: str) -> None:
        self.hold(holder, campaign)  # the holder's other rows read first: they are not all rewritten
        self._holds[holder, campaign] = self._hold_puts[holder, campaign] = (lease, day)

    def prefetch(self, keys: Sequence[tuple[str, float]]) -> None:
        rows = self._rows
        wanted = [key for key in dict.fromkeys(_key(bid_id, expires) for bid_id, expires in keys) if key not in rows]
        if not wanted:
            return
        # each key looked up by the primary key (a row value IN a list of pairs would scan the whole table)
        found = self.db.execute(
            f"SELECT json_group_array({_BID_JSON}) FROM json_each(?) AS w "
            f"CROSS JOIN bids AS b ON b.due_ms = w.value ->> 0 AND b.bid_id = w.value ->> 1",
            (json_keys(wanted),)).fetchone()[0]
        for due_ms, *r in json.loads(found):
            r[7] = float(r[7])
            rows[due_ms, r[0]] = _bid_row(r)
        for key in wanted:
            rows.setdefault(key, None)

    def bid(self, bid_id: str, expires: float) -> BidRow | None:
        key = _key(bid_id, expires)
        if key in self._rows:
            return self._rows[key]
        self.prefetch([(bid_id, expires)])
        return self._rows[key]

    def put_bid(self, row: BidRow) -> None:
        due = round(row.expires * 1000)
        key = (due, row.bid_id)
        self._rows[key] = row
        self._puts[key] = (due, *row[:4], int(row.funded), *row[5:])
        if row.state not in FINAL and due <= (self._swept if self._swept is not None else self.swept()):
            self._late.append(key)

    def insert_new(self, reservations: Sequence[Reservation], days: Sequence[str]) -> bool:
        if not reservations:
            return True
        self._write_bids()
        db = self.db
        # the values of new rows straight from the reports (a call has thousands: no BidRow for each); the state
        # columns, the same for all of them, in the statement
        values = [(round(r.expires * 1000), r.bid_id, r.campaign, day, r.amount, r.expires, r.user, r.creative)
                  for r, day in zip(reservations, days)]
        db.execute("SAVEPOINT new_bids")
        before = db.total_changes
        write_rows(db, *_INSERT_NEW, values)
        if db.total_changes - before == len(values):
            db.execute("RELEASE new_bids")
            swept = self.swept()
            if min(values)[0] > swept:
                return True
            for v, r in zip(values, reservations):  # reported after they fell due (the banker was out of reach): due
                if v[0] <= swept:                    # now
                    key = (v[0], r.bid_id)
                    self._rows[key] = BidRow(r.bid_id, r.campaign, v[3], r.amount, True, OPEN, 0, r.expires, r.user,
                                             r.creative)
                    self._late.append(key)
            return True
        db.execute("ROLLBACK TO new_bids")  # a bid had a row: the caller goes through them one by one
        db.execute("RELEASE new_bids")
        return False

    def swept(self) -> int:
        if self._swept is None:
            self._swept = self.db.execute("SELECT due_ms FROM swept").fetchone()[0]
        return self._swept

    def _write_bids(self) -> None:
        if self._puts:
            write_rows(self.db, "INSERT OR REPLACE INTO bids", "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        list(self._puts.values()))
            self._puts.clear()

    def expire_due(self, now: float, limit: int, moved: dict[tuple[str, str], list[int]]) -> list[BidRow]:
        """Settle by the policy the unsettled rows due by ``now`` after the last sweep, in two statements (at least
        ``limit`` of them when there are more: all those of the millisecond the limit falls in; the sweep goes on
        from there at the next call): ``Book.expire`` in SQL, a row's state set to expired and its price, the win's
        or 0, kept as the charge; the accounts' changes, summed by SQLite per (campaign, day), are added to
        ``moved``. Returns the unsettled rows due by ``now`` that this call wrote behind the sweep, for
        ``Book.expire``. A clock set back moves the sweep back with it (the rows it passed that are still unsettled
        then fall due again in order)."""
        self._write_bids()
        db, swept, now_ms = self.db, self.swept(), round(now * 1000)
        upto = now_ms
        unsettled = f"state NOT IN ({', '.join('?' * len(_SETTLED))})"
        if upto > swept:
            cut = db.execute(f"SELECT due_ms FROM bids WHERE due_ms > ? AND due_ms <= ? AND {unsettled} "
                             f"ORDER BY due_ms LIMIT 1 OFFSET ?", (swept, upto, *_SETTLED, limit)).fetchone()
            if cut is not None:
                upto = cut[0]
            # the win's price for a won row, 0 for an open one; its reservation released (Book.expire)
            changes = db.execute(
                f"SELECT json_group_array(json_array(campaign, day, spent, reserved)) FROM (SELECT campaign, day, "
                f"sum(price) AS spent, -sum(CASE WHEN funded THEN amount ELSE 0 END) AS reserved FROM bids "
                f"WHERE due_ms > ? AND due_ms <= ? AND {unsettled} GROUP BY campaign, day)",
                (swept, upto, *_SETTLED)).fetchone()[0]
            for campaign, day, spent, reserved in json.loads(changes):
                add_change(moved, campaign, day, spent, reserved)
            db.execute(f"UPDATE bids SET state = ? WHERE due_ms > ? AND due_ms <= ? AND {unsettled}",
                       (EXPIRED, swept, upto, *_SETTLED))
        if upto != swept:
            db.execute("UPDATE swept SET due_ms = ?", (upto,))
            self._swept = upto
        rows = []
        for key in dict.fromkeys(self._late):
            row = self._rows.get(key)
            if key[0] <= now_ms and row is not None and row.state not in FINAL:
                rows.append(row)
        self._late.clear()
        return rows

    def purge(self, before: float) -> None:
        self._write_bids()
        self.db.execute(f"DELETE FROM bids WHERE due_ms < ? AND state IN ({', '.join('?' * len(_SETTLED))})",
                        (round(before * 1000), *_SETTLED))

    def log_impression(self, campaign: str, creative: str, user: str, at: float) -> None:
        self._impressions.append((campaign, creative, user, at))  # written with the call's other changes (flush)


class EmbeddedBanker:
    """The banker of one machine (``--ledger`` left out): ``state_dir/ledger.sqlite``, opened by each worker."""

    def __init__(self, state_dir: str | os.PathLike, retention_s: float):
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / LEDGER_FILE
        self.db = walfile.connect(self.path, 30.0, "FULL")
        # the savepoint around a call's new rows (``insert_new``) keeps its pages' first images in a sub-journal: in
        # memory, not in a temporary file
        self.db.execute("PRAGMA temp_store=MEMORY")
        layout = self.db.execute("PRAGMA user_version").fetchone()[0]
        if layout > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"{self.path}: ledger layout {layout} is newer than this bidder's "
                                        f"({SCHEMA_VERSION}): a newer bidder wrote it")
        if layout != SCHEMA_VERSION:
            _convert(self.db)
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
        rows = self.db.execute(  # one step for all (see _SqliteStorage)
            "SELECT json_group_array(json_array(seq, campaign, creative, user, printf('%!.17g', at))) "
            "FROM (SELECT * FROM impressions WHERE seq > ? ORDER BY seq LIMIT ?)", (after, limit)).fetchone()[0]
        return sorted(Impression(seq, campaign, creative, user, float(at))
                      for seq, campaign, creative, user, at in json.loads(rows))

    def accounts(self, campaign: str, day: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """(spent, reserved, leased) of the campaign's total account and of its account for ``day``."""
        storage = self.book.storage
        try:
            return storage.account(campaign, "T"), storage.account(campaign, day)
        finally:
            storage.discard()  # read for this question only: a call reads the accounts anew

    def close(self) -> None:
        self.db.close()

"""SQLite files shared by the worker processes of a machine, in write-ahead-log mode (the notices' dedup store, the
embedded banker)."""
from __future__ import annotations

import functools
import json
import os
import sqlite3
import time
from typing import Sequence

__all__ = ["connect", "json_keys", "write_rows"]

#: rows per statement of a bulk write, then the smaller sizes the rest is written in (one statement each at most)
_CHUNKS = (256, 128, 64, 32, 16, 8, 4, 2, 1)


def connect(path: str | os.PathLike, timeout: float, synchronous: str) -> sqlite3.Connection:
    """A connection to ``path`` in WAL mode with ``synchronous`` (``NORMAL`` or ``FULL``), in autocommit.

    Switching a file to WAL takes a lock that SQLite does not wait for: a worker starting while another writes the
    file's schema, or starts too, is told "database is locked" at once. It is tried again until ``timeout``."""
    db = sqlite3.connect(path, isolation_level=None, timeout=timeout, check_same_thread=False)
    deadline, pause = time.monotonic() + timeout, 0.005
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                db.close()
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.2)
    db.execute(f"PRAGMA synchronous={synchronous}")
    return db


# Bulk reads and writes, one statement (one step) for many rows. Python's ``sqlite3`` lets the GIL go at every step
# of a statement (every row of an ``executemany``, every row a query returns) and waits to get it back, up to the
# switch interval (5 ms) while another thread runs Python: the stores' threads share the GIL with the event loop.

def json_keys(values) -> str:
    """Keys for a query that reads them with ``json_each`` (``value ->> 0``, ...)."""
    return json.dumps(values, ensure_ascii=False, separators=(",", ":"))


@functools.lru_cache(maxsize=64)
def _statement(head: str, row: str, size: int, tail: str) -> str:
    return f"{head} VALUES {', '.join([row] * size)}{tail}"


def write_rows(db: sqlite3.Connection, head: str, row: str, rows: Sequence[tuple], tail: str = "") -> None:
    """``head`` (an INSERT up to its VALUES) with ``rows``, ``row`` being one row's expressions (its ``?`` take a
    row's values in order), ``tail`` after the rows (an upsert clause): ``_CHUNKS[0]`` rows a statement and step,
    several times faster than ``executemany`` and than rows read from JSON by ``json_each``."""
    width = row.count("?")
    most = max(1, db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // width)
    i, n = 0, len(rows)
    for size in _CHUNKS:
        size = min(size, most)
        sql = _statement(head, row, size, tail)
        while n - i >= size:
            db.execute(sql, [value for r in rows[i:i + size] for value in r])
            i += size
        if i == n:
            return

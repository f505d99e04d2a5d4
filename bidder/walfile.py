"""SQLite files shared by the worker processes of a machine, in write-ahead-log mode (the notices' dedup store, the
embedded banker)."""
from __future__ import annotations

import os
import sqlite3
import time

__all__ = ["connect"]


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

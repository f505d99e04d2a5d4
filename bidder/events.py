"""The event log (``bidder serve --events DIR``): every bid, notice and click, keyed by bid id, for training on
the bidder's own traffic (``python -m train logs``).

The bid path encodes each event's JSON line and appends it to a bounded in-memory queue (``EventLog.bid``,
``notice``, ``click``); a writer thread drains it and writes zstd-compressed files. When the queue is full, or the disk is,
events are dropped and counted (``bidder_events_dropped_total{reason}``): bidding never waits for the log.

Files (``docs/events.md`` has the schema field by field):

* ``DIR/.tmp-events-<hour>-w<worker>-p<pid>-<seq>.jsonl.zst`` while being written: one complete zstd frame per
  flush (at least once a second), so the bytes written survive a ``kill -9`` as whole frames;
* renamed to ``DIR/events-<hour>-w<worker>-p<pid>-<seq>.jsonl.zst`` (``<hour>`` as ``YYYYMMDDTHH``, UTC of the
  events) when the hour of the events changes, the file passes ``max_bytes``, or the log closes; fsynced
  before the rename, so a reader that skips ``.tmp-`` files never sees a half-written file;
* a ``.tmp-`` file whose process is gone (a ``kill -9``) is salvaged at the next start (``bidder serve`` before
  its workers start, and a worker the supervisor restarts): its complete frames are renamed into place, a torn
  last frame (the last second at most) is dropped.

Why zstd JSON lines: one self-describing record per line that ``zstdcat | jq``, pandas, DuckDB, Spark and
BigQuery read directly; the records are nested (the raw record, its ``usertag`` list), which Parquet would
flatten into a schema to maintain. zstd (level 1) rather than gzip: on the bid events of simulated traffic it
takes about a quarter of zlib level 1's CPU per event and compresses better (7× against 4.6×); the CPU is the
serving core's, so it is the event log's largest cost after encoding.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterator

import msgspec
import zstandard

from bidder.logs import event as log_event

__all__ = ["DROP_REASONS", "EVENT_KINDS", "NOTICE_KINDS", "SCHEMA_VERSION", "EventLog", "EventLogError",
           "check_directory", "complete_frames", "events_hour", "read_lines"]

log = logging.getLogger("bidder")

#: the version every record carries (``schema``); readers refuse versions they do not know
SCHEMA_VERSION = 1
EVENT_KINDS = ("bid", "notice", "click")
NOTICE_KINDS = ("win", "bill", "loss")
#: why an event was not written
DROP_REASONS = ("queue_full", "write_error")
DEFAULT_QUEUE = 65536           # events held in memory at most (a few seconds of a busy worker)
DEFAULT_FLUSH_S = 0.5           # the writer flushes at least this often: a kill -9 loses at most ~1 s
#: the writer is woken as soon as this many events are queued: its work (joining the lines, compressing them) runs on
#: the serving core, and in short turns a request waits behind only a short one (a flush of 0.5 s of a busy
#: worker's events, thousands, took the core for milliseconds: the bid path's P99 at 32 connections)
DEFAULT_FLUSH_EVENTS = 256
DEFAULT_MAX_BYTES = 256 << 20   # a file is closed and renamed past this many compressed bytes
ZSTD_LEVEL = 1
FINAL_PREFIX, TMP_PREFIX, SUFFIX = "events-", ".tmp-events-", ".jsonl.zst"
_TMP_NAME = re.compile(r"^\.tmp-events-(\d{8}T\d{2})-w(\d+)-p(\d+)-(\d+)\.jsonl\.zst$")



class _BidEvent(msgspec.Struct):
    """A bid's record as written; the field order is the JSON key order (``docs/events.md``)."""
    schema: int
    kind: str
    time: float
    bid_id: str
    record: dict  # the raw record the model scored: the imp's fields and the candidate's
    campaign: str
    creative: str
    model: str
    pctr: float
    value: float
    price: float
    shading: float
    floor: float
    auction: int
    exchange: str | None
    user: str | None
    propensity: float  # the probability the creative bid with was chosen (1: no exploration, --explore)


class _NoticeEvent(msgspec.Struct):
    schema: int
    kind: str
    time: float
    bid_id: str
    notice: str
    price: float | None
    loss: int | None
    min_to_win: float | None
    delay: float | None


class _ClickEvent(msgspec.Struct):
    schema: int
    kind: str
    time: float
    bid_id: str


class EventLogError(Exception):
    """The event log cannot start (an unwritable directory): one line naming the directory and the cause."""


def events_hour(seconds: float) -> str:
    """The UTC hour of a Unix time as in the file names, ``YYYYMMDDTHH``."""
    return time.strftime("%Y%m%dT%H", time.gmtime(seconds))


def check_directory(directory: Path) -> None:
    """Create ``directory`` if needed and write (and fsync) a probe file there: EventLogError, one line naming
    the directory and the cause, when it cannot be written (not a directory, no permission, a full disk)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".probe-p{os.getpid()}-{threading.get_ident()}"
        try:
            with open(probe, "wb") as f:
                f.write(b"x" * 4096)
                f.flush()
                os.fsync(f.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as exc:
        raise EventLogError(f"--events {directory}: cannot write there: {exc.strerror or exc}") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def complete_frames(data: bytes) -> tuple[bytes, bool]:
    """The uncompressed bytes of the complete zstd frames at the start of ``data``, and whether a torn (or
    corrupt) frame followed them."""
    out = []
    while data:
        inflater = zstandard.ZstdDecompressor().decompressobj()
        try:
            chunk = inflater.decompress(data)
        except zstandard.ZstdError:
            return b"".join(out), True
        if not inflater.eof:
            return b"".join(out), True
        out.append(chunk)
        data = inflater.unused_data
    return b"".join(out), False


def read_lines(path: str | os.PathLike) -> Iterator[bytes]:
    """The lines of an event file (every frame of it), without their newlines; ``zstandard.ZstdError`` or
    ``OSError`` when it cannot be read."""
    with open(path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True) as reader:
        tail = b""
        while chunk := reader.read(1 << 20):
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            yield from lines
        if tail:
            yield tail


class EventLog:
    """One worker's event log in ``directory``; ``start()`` checks the directory and starts the writer.

    ``bid``, ``notice`` and ``click`` run on the bid path: they append to a bounded deque (a drop counted when it
    is full) and return; ``close()`` (on SIGTERM) drains everything queued and renames the last file.
    """

    def __init__(self, directory: str | Path, worker: int = 0, *, queue_size: int = DEFAULT_QUEUE,
                 flush_s: float = DEFAULT_FLUSH_S, flush_events: int = DEFAULT_FLUSH_EVENTS,
                 max_bytes: int = DEFAULT_MAX_BYTES,
                 clock: Callable[[], float] = time.time):
        self.directory = Path(directory)
        self.worker = worker
        self.queue_size = queue_size
        self.flush_s = flush_s
        self.flush_events = flush_events
        self.max_bytes = max_bytes
        self.queue: deque = deque()
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self.written = 0  # events in files (renamed or being written)
        self.files = 0    # files renamed into place
        self._seq = 0
        self._tmp: Path | None = None
        self._file = None
        self._bytes = 0
        self.now = clock  # the time each event is stamped with (Unix seconds): the engine's, simulated or not
        self.hours: deque[tuple[int, str]] = deque()
        self._hour_start = self._hour_end = 0.0  # the hour last put in ``hours``, [start, end)
        self._items = 0    # items ever queued (bid path): an item is the encoded lines of one call's events
        self._queued = 0   # events ever queued (bid path)
        self._woken = 0    # the events queued when the bid path last woke the writer
        self._popped_items = 0  # items ever taken from the queue (writer)
        self._popped = 0   # events ever taken from the queue (writer)
        self._hour: str | None = None  # the writer's: the hour of the file being written
        self._popped_hour: str | None = None  # the writer's: the hour of the next event it pops
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._encode_lines = msgspec.json.Encoder().encode_lines  # each line ends in its newline
        self._compress = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress  # one frame, its size in its header

    # -- the bid path: encode, append and return ---------------------------------------------------------
    # Each event is encoded to its JSON line here, on the bid path (about a microsecond), rather than by the writer:
    # the queue then holds bytes (no dicts kept alive for the collector to scan, no writer thread encoding under
    # the GIL while requests wait for it), and the writer only joins, compresses (zstd lets go of the GIL) and
    # writes. The bids of one batch are one item: one stamp, one encoding call, one append for all of them. ``hours``
    # holds (the number of items queued before it, the UTC hour) for each hour the items in the queue belong to:
    # each counter is written by one thread only (``_items`` and ``_queued`` by the bid path's, ``_popped_items``
    # and ``_popped`` by the writer), so none needs a lock.
    def bid(self, bid_id: str, record: dict, layer: dict, campaign: str, creative: str, model: str, pctr: float,
            value: float, price: float, shading: float, floor: float, auction: int, exchange: str | None,
            user: str | None, propensity: float = 1.0) -> None:
        """A bid placed: ``record`` the imp's raw record, ``layer`` the candidate's fields (together what the
        model scored), ``value`` pCTR × value per click in USD CPM, ``price`` the bid, ``shading`` price / value,
        ``propensity`` the probability that this creative was the one bid with (below 1 only when exploring)."""
        self.bids([(bid_id, record, layer, campaign, creative, model, pctr, value, price, shading, floor, auction,
                    exchange, user, propensity)])

    def bids(self, bids: list[tuple]) -> None:
        """Bids placed together (the bids of one batch), each the arguments of ``bid`` in their order: stamped
        with one time, encoded in one call, queued as one item (or dropped together when the queue is full)."""
        at = self._stamp(len(bids))
        if at is None:
            return
        self.queue.append(self._encode_lines([_BidEvent(SCHEMA_VERSION, "bid", at, b[0], {**b[1], **b[2]}, *b[3:])
                                              for b in bids]))

    def notice(self, kind: str, bid_id: str, price: float | None = None, loss: int | None = None,
               min_to_win: float | None = None, delay: float | None = None) -> None:
        """An exchange's notice for ``bid_id``: ``kind`` one of ``NOTICE_KINDS`` (win, bill, loss); ``price`` the
        clearing price (USD CPM, ``${AUCTION_PRICE}``), ``loss`` the loss code (``${AUCTION_LOSS}``),
        ``min_to_win`` ``${AUCTION_MIN_TO_WIN}`` when the exchange sends it, ``delay`` seconds since the bid when
        the caller knows it (``train logs`` otherwise works it out from the bid's time)."""
        at = self._stamp(1)
        if at is None:
            return
        self.queue.append(self._encode_lines([_NoticeEvent(SCHEMA_VERSION, "notice", at, bid_id, kind, price, loss,
                                                           min_to_win, delay)]))

    def click(self, bid_id: str) -> None:
        """A click on the ad of ``bid_id``."""
        at = self._stamp(1)
        if at is None:
            return
        self.queue.append(self._encode_lines([_ClickEvent(SCHEMA_VERSION, "click", at, bid_id)]))

    @property
    def queued(self) -> int:
        """Events waiting for the writer."""
        return self._queued - self._popped

    def _stamp(self, n: int) -> float | None:
        """The time of the ``n`` events about to be queued as one item, counted in its hour; None, and ``n`` drops
        counted, when the queue has no room for them."""
        if self._queued - self._popped + n > self.queue_size:
            self.dropped["queue_full"] += n
            return None
        at = self.now()
        if not self._hour_start <= at < self._hour_end:
            self._mark_hour(at)
        self._items += 1
        self._queued += n
        if self._queued - self._woken >= self.flush_events:
            self._woken = self._queued
            self._wake.set()
        return at

    def _mark_hour(self, at: float) -> None:
        """The events queued from now on belong to the UTC hour of ``at``."""
        self._hour_start = at - at % 3600.0  # UTC hours are whole multiples of 3600 s in Unix time
        self._hour_end = self._hour_start + 3600.0
        self.hours.append((self._items, events_hour(at)))

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> EventLog:
        """Check the directory can be written (EventLogError otherwise), salvage what a killed worker left,
        start the writer thread."""
        check_directory(self.directory)
        self.salvage(self.worker)  # a worker the supervisor restarts after a kill -9: what its predecessor left
        self._thread = threading.Thread(target=self._run, name=f"events-w{self.worker}", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Write every queued event and rename the last file into place (SIGTERM)."""
        if self._thread is None:
            return
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)
        self._thread = None

    def salvage(self, worker: int | None = None) -> int:
        """Rename into place what workers killed before they closed left in ``.tmp-`` files (of every worker, or of
        worker ``worker`` only: workers starting together must not salvage the same file): their complete zstd
        frames (a torn last one is dropped). Returns the number of files salvaged."""
        salvaged = 0
        for path in sorted(self.directory.glob(TMP_PREFIX + "*")):
            match = _TMP_NAME.match(path.name)
            if match is None or (worker is not None and int(match[2]) != worker) or _pid_alive(int(match[3])):
                continue
            try:
                data, torn = complete_frames(path.read_bytes())
                if data:
                    final = path.with_name(path.name[len(".tmp-"):])
                    if torn:  # rewrite the complete frames only: zstd readers fail on a torn tail
                        with open(path, "wb") as f:
                            f.write(zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data))
                            f.flush()
                            os.fsync(f.fileno())
                    os.replace(path, final)
                    salvaged += 1
                else:
                    path.unlink()
            except OSError as exc:
                log_event(log, logging.WARNING, "events_salvage_failed",
                          "events: cannot salvage %(path)s: %(error)s", path=str(path), error=exc.strerror or str(exc))
        if salvaged:
            self._sync_directory()
            log_event(log, logging.INFO, "events_salvaged", "events: salvaged %(files)d file(s) a killed worker "
                      "left in %(directory)s", files=salvaged, directory=str(self.directory))
        return salvaged

    # -- the writer thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_s)
            self._wake.clear()  # before reading _stop: close() sets both, in that order
            stopping = self._stop
            try:
                self._drain()
            except Exception:  # noqa: BLE001 - a bug here must not end the log, nor the worker
                log.exception("events: cannot write queued events", extra={"event": "events_write_failed"})
            if stopping:
                self._finish()
                return

    def _drain(self) -> None:
        """Write what is queued now, one zstd frame per hour of events."""
        queue, hours = self.queue, self.hours
        popleft = queue.popleft
        items: list[bytes] = []
        hour, popped = self._popped_hour, self._popped_items
        for _ in range(len(queue)):
            while hours and hours[0][0] == popped:  # the items from here on hold events of another hour
                if items:
                    self._write(hour, items)
                    items = []
                hour = hours.popleft()[1]
            items.append(popleft())
            popped += 1
        self._popped_hour, self._popped_items = hour, popped
        if items:
            self._write(hour, items)

    def _write(self, hour: str, items: list[bytes]) -> None:
        text = b"".join(items)
        events = text.count(b"\n")  # a line per event: JSON escapes the newlines inside strings
        self._popped += events
        payload = self._compress(text)  # lets go of the GIL while it compresses
        try:
            if self._file is not None and (hour != self._hour or self._bytes >= self.max_bytes):
                self._finish()
            if self._file is None:
                self._open(hour)
            self._file.write(payload)
            self._file.flush()  # to the kernel: a kill -9 of this process keeps it
        except OSError as exc:
            self.dropped["write_error"] += events
            log_event(log, logging.WARNING, "events_dropped", "events: %(dropped)d event(s) dropped: cannot write "
                      "%(path)s: %(error)s", dropped=events, path=str(self._tmp), error=exc.strerror or str(exc))
            self._abandon(exc)
            return
        self._bytes += len(payload)
        self.written += events

    def _open(self, hour: str) -> None:
        self._seq += 1
        self._hour = hour
        self._tmp = self.directory / f"{TMP_PREFIX}{hour}-w{self.worker}-p{os.getpid()}-{self._seq:06d}{SUFFIX}"
        self._file = open(self._tmp, "wb")
        self._bytes = 0

    def _finish(self) -> None:
        """fsync the file being written, rename it into place and fsync the directory."""
        if self._file is None:
            return
        try:
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp, self._tmp.with_name(self._tmp.name[len(".tmp-"):]))
            self._sync_directory()
            self.files += 1
        except OSError as exc:
            log_event(log, logging.WARNING, "events_close_failed", "events: cannot close %(path)s: %(error)s (left "
                      "for the next start to salvage)", path=str(self._tmp), error=exc.strerror or str(exc))
        self._file = None

    def _abandon(self, exc: OSError) -> None:
        """After a failed write the file may end in a torn frame: close it and leave it for salvage (the next
        start); a full disk is retried with a new file at the next flush."""
        try:
            if self._file is not None:
                self._file.close()
        except OSError:
            pass
        self._file = None
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            log_event(log, logging.ERROR, "events_write_failed", "events: writing to %(directory)s failed; "
                      "retrying with a new file", directory=str(self.directory), error=exc.strerror or str(exc))

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

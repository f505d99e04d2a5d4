"""Streaming reader for make-ipinyou-data logs (``train.log.txt`` / ``test.log.txt`` of any campaign).

The files are tab-separated with a header naming the columns; the full set is about 14 GB, so lines
are parsed into raw records (dicts keyed by ``RAW_FIELDS`` and ``timestamp``) one chunk at a time.
``null`` and empty values become ``None``; ``usertag`` becomes a list. A malformed line is a
``DataError`` naming ``file:line``, unless the reader was asked to skip bad lines, in which case it is
counted in ``BadLines`` and left out.

The synthetic generator writes the same layout plus ``pctr_true`` (the true click probability); when
that column is present the chunks carry it so training can report the oracle's metrics. A ``weight``
column (``train logs --ips-clip``: inverse propensity weights) gives each line its weight in the
training loss; without it every line weighs 1.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from bidder.spec import RAW_FIELDS, TIMESTAMP_KEY
from train.errors import DataError

__all__ = ["LABEL", "PCTR_TRUE", "REQUIRED_COLUMNS", "WEIGHT", "BadLines", "LogChunk", "LogReader"]

LABEL = "click"
PCTR_TRUE = "pctr_true"
WEIGHT = "weight"
REQUIRED_COLUMNS = (LABEL,) + RAW_FIELDS
MISSING = ("null", "")
CHUNK_ROWS = 65536
MAX_EXAMPLES = 5


@dataclass
class BadLines:
    """Malformed lines left out under ``skip_bad_lines``: how many, and the first few reasons."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, where: str, reason: str) -> None:
        self.count += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{where}: {reason}")

    def summary(self) -> str:
        shown = "; ".join(self.examples)
        more = "" if self.count <= len(self.examples) else f"; and {self.count - len(self.examples)} more"
        return f"skipped {self.count} malformed line(s): {shown}{more}"


@dataclass
class LogChunk:
    """Up to ``CHUNK_ROWS`` parsed lines of one file."""

    path: Path
    records: list[dict[str, Any]]
    labels: np.ndarray            # float32 0/1
    line_numbers: list[int]       # 1-based line of each record, for error messages
    timestamps: np.ndarray | None  # int64 yyyyMMddHHmmssSSS, -1 when the line has none
    pctr_true: np.ndarray | None   # float64, synthetic logs only
    weights: np.ndarray | None = None  # float32, a log with a weight column only

    def drop(self, row: int) -> None:
        """Remove one record (a line the featurizer rejected)."""
        del self.records[row]
        del self.line_numbers[row]
        self.labels = np.delete(self.labels, row)
        if self.timestamps is not None:
            self.timestamps = np.delete(self.timestamps, row)
        if self.pctr_true is not None:
            self.pctr_true = np.delete(self.pctr_true, row)
        if self.weights is not None:
            self.weights = np.delete(self.weights, row)


class LogReader:
    """Iterate a log file as ``LogChunk``s; the header is checked when the reader is created."""

    def __init__(self, path: str | Path, *, skip_bad_lines: bool = False, bad_lines: BadLines | None = None,
                 chunk_rows: int = CHUNK_ROWS) -> None:
        self.path = Path(path)
        self.skip_bad_lines = skip_bad_lines
        self.bad_lines = bad_lines if bad_lines is not None else BadLines()
        self.chunk_rows = chunk_rows
        self.sha256 = hashlib.sha256()
        self.bytes_read = 0
        self.size = self.path.stat().st_size if self.path.exists() else 0
        self.columns = self._read_header()
        index = {name: i for i, name in enumerate(self.columns)}
        self.has_timestamp = TIMESTAMP_KEY in index
        self.has_pctr_true = PCTR_TRUE in index
        self.has_weight = WEIGHT in index
        keys = RAW_FIELDS + ((TIMESTAMP_KEY,) if self.has_timestamp else ())
        self._fields = [(k, index[k]) for k in keys if k != "usertag"]
        self._label_col = index[LABEL]
        self._usertag_col = index["usertag"]
        self._timestamp_col = index.get(TIMESTAMP_KEY)
        self._pctr_col = index.get(PCTR_TRUE)
        self._weight_col = index.get(WEIGHT)

    def _read_header(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                raw = f.readline()
        except FileNotFoundError:
            raise DataError(f"{self.path}: no such file") from None
        except OSError as exc:
            raise DataError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
        if not raw:
            raise DataError(f"{self.path}: empty file, expected a header line")
        try:
            columns = raw.decode("utf-8").rstrip("\r\n").split("\t")
        except UnicodeDecodeError:
            raise DataError(f"{self.path}:1: header is not UTF-8 text") from None
        duplicates = sorted({c for c in columns if columns.count(c) > 1})
        if duplicates:
            raise DataError(f"{self.path}:1: duplicate column(s) {', '.join(duplicates)}")
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise DataError(f"{self.path}:1: missing column(s) {', '.join(missing)} "
                            f"(expected a make-ipinyou-data header)")
        return columns

    def reject(self, line_number: int, reason: str) -> None:
        """A malformed line: an error naming it, or counted and skipped under ``skip_bad_lines``."""
        where = f"{self.path}:{line_number}"
        if not self.skip_bad_lines:
            raise DataError(f"{where}: {reason}")
        self.bad_lines.add(where, reason)

    def __iter__(self) -> Iterator[LogChunk]:
        width = len(self.columns)
        chunk = self._new_chunk()
        labels: list[float] = []
        stamps: list[int] = []
        pctrs: list[float] = []
        weights: list[float] = []
        with open(self.path, "rb") as f:
            header = f.readline()
            self.sha256.update(header)
            self.bytes_read = len(header)
            for number, raw in enumerate(f, start=2):
                self.sha256.update(raw)
                self.bytes_read += len(raw)
                parsed = self._parse(raw, number, width)
                if parsed is None:
                    continue
                record, label, stamp, pctr, weight = parsed
                chunk.records.append(record)
                chunk.line_numbers.append(number)
                labels.append(label)
                stamps.append(stamp)
                pctrs.append(pctr)
                weights.append(weight)
                if len(chunk.records) == self.chunk_rows:
                    yield self._finish(chunk, labels, stamps, pctrs, weights)
                    chunk, labels, stamps, pctrs, weights = self._new_chunk(), [], [], [], []
        if chunk.records:
            yield self._finish(chunk, labels, stamps, pctrs, weights)

    def _new_chunk(self) -> LogChunk:
        return LogChunk(self.path, [], np.empty(0, np.float32), [], None, None)

    def _finish(self, chunk: LogChunk, labels: list, stamps: list, pctrs: list, weights: list) -> LogChunk:
        chunk.labels = np.asarray(labels, dtype=np.float32)
        chunk.timestamps = np.asarray(stamps, dtype=np.int64) if self.has_timestamp else None
        chunk.pctr_true = np.asarray(pctrs, dtype=np.float64) if self.has_pctr_true else None
        chunk.weights = np.asarray(weights, dtype=np.float32) if self.has_weight else None
        return chunk

    def _parse(self, raw: bytes, number: int, width: int) -> tuple[dict, float, int, float, float] | None:
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            self.reject(number, f"not UTF-8 text (byte {exc.start})")
            return None
        parts = line.split("\t")
        if len(parts) != width:
            self.reject(number, f"expected {width} tab-separated columns, got {len(parts)}")
            return None
        label = _label(parts[self._label_col])
        if label is None:
            self.reject(number, f"column {LABEL!r}: expected 0 or a click count, got {parts[self._label_col][:40]!r}")
            return None
        record = {k: (None if parts[i] in MISSING else parts[i]) for k, i in self._fields}
        tags = parts[self._usertag_col]
        record["usertag"] = None if tags in MISSING else [t for t in tags.split(",") if t]
        stamp = -1
        if self._timestamp_col is not None and record[TIMESTAMP_KEY] is not None:
            stamp = _sortable_timestamp(record[TIMESTAMP_KEY])
            if stamp is None:
                self.reject(number, f"column {TIMESTAMP_KEY!r}: cannot read {record[TIMESTAMP_KEY][:40]!r} "
                                    "(expected yyyyMMddHHmmss[SSS] or Unix seconds)")
                return None
        pctr = 0.0
        if self._pctr_col is not None:
            pctr = _probability(parts[self._pctr_col])
            if pctr is None:
                self.reject(number, f"column {PCTR_TRUE!r}: expected a probability, got {parts[self._pctr_col][:40]!r}")
                return None
        weight = 1.0
        if self._weight_col is not None:
            weight = _weight(parts[self._weight_col])
            if weight is None:
                self.reject(number, f"column {WEIGHT!r}: expected a positive finite number, got "
                                    f"{parts[self._weight_col][:40]!r}")
                return None
        return record, label, stamp, pctr, weight


def _label(text: str) -> float | None:
    if text == "0":
        return 0.0
    if text == "1":
        return 1.0
    if text.isascii() and text.isdigit():  # a few iPinYou joins count repeated clicks
        return 1.0 if int(text) > 0 else 0.0
    return None


def _probability(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0.0 <= value <= 1.0 else None


def _weight(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0.0 < value < math.inf else None


def _sortable_timestamp(text: str) -> int | None:
    """The instant as a yyyyMMddHHmmssSSS integer, so lines sort chronologically by it."""
    if not (text.isascii() and text.isdigit()):
        return None
    n = len(text)
    if n == 17:
        return int(text)
    if n == 14:
        return int(text) * 1000
    if n == 13 or n <= 12:  # Unix milliseconds or seconds
        millis = int(text) if n == 13 else int(text) * 1000
        try:
            moment = dt.datetime(1970, 1, 1) + dt.timedelta(milliseconds=millis)
        except OverflowError:
            return None
        return int(moment.strftime("%Y%m%d%H%M%S")) * 1000 + moment.microsecond // 1000
    return None

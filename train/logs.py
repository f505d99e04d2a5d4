"""Training data from the bidder's own event log (``bidder serve --events DIR``): ``python -m train logs``.

Reads the finished files (``events-*.jsonl.zst``; ``.tmp-`` files are still being written and are skipped),
joins every notice and click to its bid by bid id, and writes the layouts the trainers read:

* ``train.log.txt`` (``train fit``): one line per billed bid, the raw record the model scored, ``click`` = 1
  when a click on it arrived within ``click_window`` seconds of the bid, and with ``ips_clip`` a ``weight``
  column: the inverse of the bid's ``propensity`` (the chance that the exploring bidder chose this creative),
  at most ``ips_clip``, which ``train fit`` weighs the row's loss by (inverse propensity scoring);
* ``bids.log.txt`` (``train market``): one line per bid whose auction outcome is known (a win, a bill or a
  loss notice) with ``won``, ``payprice`` (the clearing price of a win) and ``min_to_win`` (a loss's
  ``${AUCTION_MIN_TO_WIN}``: the exact market price; null: the loss says only market >= bid), without the
  synthetic bid log's truth columns: no one knows the market's real distribution.

A bid without an outcome is left out of both (it may still be in flight, or its notices lost); a notice or
click without a bid (its bid event dropped, or in a file not read) is counted and left out.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import msgspec
import zstandard
from tqdm import tqdm

from bidder.events import FINAL_PREFIX, SCHEMA_VERSION, SUFFIX, read_lines
from bidder.spec import RAW_FIELDS, TIMESTAMP_KEY
from train.data.bidlog import BID_LOG, FEATURE_COLUMNS, LOG_COLUMNS, MIN_TO_WIN
from train.data.dataset import TRAIN_LOG
from train.data.ipinyou import WEIGHT
from train.errors import DataError

__all__ = ["DEFAULT_CLICK_WINDOW_S", "Joined", "check_ips_clip", "ips_weight", "join_events", "read_events",
           "write_training_data"]

DEFAULT_CLICK_WINDOW_S = 3600.0
TRAIN_COLUMNS = ("click", TIMESTAMP_KEY, "bidid") + RAW_FIELDS
BIDS_COLUMNS = FEATURE_COLUMNS + LOG_COLUMNS + (MIN_TO_WIN,)  # the bid log's, with no truth columns
WON_NOTICES = ("win", "bill")


class _Event(msgspec.Struct):
    """The fields every record has; the rest of a record is read by kind."""
    schema: int
    kind: str
    time: float
    bid_id: str


_decode_event = msgspec.json.Decoder(_Event).decode
_decode_any = msgspec.json.Decoder().decode


def event_files(directory: Path) -> list[Path]:
    """The finished files of an event log directory, in name order (hour, worker, process, sequence)."""
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory (expected the --events directory of bidder serve)")
    return sorted(p for p in directory.iterdir() if p.name.startswith(FINAL_PREFIX) and p.name.endswith(SUFFIX))


def read_events(directory: str | Path, *, progress: bool = True) -> Iterator[dict[str, Any]]:
    """Every record of the finished files; DataError naming the file and line for a record that cannot be
    read or has a schema version this reader does not know."""
    files = event_files(Path(directory))
    with tqdm(total=sum(p.stat().st_size for p in files), unit="B", unit_scale=True, desc="read events",
              disable=not progress, leave=False) as bar:
        for path in files:
            try:
                for number, line in enumerate(read_lines(path), start=1):
                    yield _parse(path, number, line)
            except (OSError, zstandard.ZstdError) as exc:
                raise DataError(f"{path}: cannot read: {exc}") from None
            bar.update(path.stat().st_size)


def _parse(path: Path, number: int, line: bytes) -> dict[str, Any]:
    try:
        head = _decode_event(line)
    except msgspec.DecodeError as exc:
        try:
            schema = _decode_any(line).get("schema")
        except (msgspec.DecodeError, AttributeError):
            raise DataError(f"{path}:{number}: not an event record: {exc}") from None
        if schema is not None and schema != SCHEMA_VERSION:
            raise _unknown_schema(path, number, schema) from None
        raise DataError(f"{path}:{number}: not an event record: {exc}") from None
    if head.schema != SCHEMA_VERSION:
        raise _unknown_schema(path, number, head.schema)
    return _decode_any(line)


def _unknown_schema(path: Path, number: int, schema: Any) -> DataError:
    return DataError(f"{path}:{number}: event schema version {schema!r} is not known to this version of "
                     f"train logs (it reads version {SCHEMA_VERSION})")


@dataclass
class Joined:
    """Bids with what the exchange told of them."""

    bids: dict[str, dict] = field(default_factory=dict)
    won: dict[str, dict] = field(default_factory=dict)    # bid id -> its win (or bill) notice
    billed: set[str] = field(default_factory=set)
    lost: dict[str, dict] = field(default_factory=dict)   # bid id -> its loss notice
    clicks: dict[str, float] = field(default_factory=dict)  # bid id -> time of its first click
    orphans: dict[str, int] = field(default_factory=lambda: {"notice": 0, "click": 0})
    bills: int = 0  # bill notices read (joined or not)

    def summary(self, window: float) -> dict[str, Any]:
        outcome = self.won.keys() | self.lost.keys()
        billed_joined = len(self.billed)
        return {"bids": len(self.bids), "billed": billed_joined, "won": len(self.won), "lost": len(self.lost),
                "clicks": sum(1 for b in self.billed if self.clicked(b, window)),
                "bids_without_outcome": sum(1 for b in self.bids if b not in outcome),
                "outcomes_without_bid": dict(self.orphans),
                "billed_join_rate": round(billed_joined / self.bills, 6) if self.bills else None}

    def clicked(self, bid_id: str, window: float) -> bool:
        """The label: a click on a billed impression within ``window`` seconds of the bid."""
        if bid_id not in self.billed:
            return False
        clicked = self.clicks.get(bid_id)
        return clicked is not None and clicked - self.bids[bid_id]["time"] <= window


def join_events(records: Iterator[dict[str, Any]]) -> Joined:
    """Every notice and click joined to its bid by bid id (whatever order the files hold them in)."""
    joined = Joined()
    notices: list[dict] = []
    clicks: list[dict] = []
    for record in records:
        kind = record["kind"]
        if kind == "bid":
            joined.bids[record["bid_id"]] = record
        elif kind == "notice":
            notices.append(record)
        elif kind == "click":
            clicks.append(record)
    for notice in notices:
        bid_id, what = notice["bid_id"], notice.get("notice")
        if what == "bill":
            joined.bills += 1
        if bid_id not in joined.bids:
            joined.orphans["notice"] += 1
            continue
        if what in WON_NOTICES:
            if what == "bill":
                joined.billed.add(bid_id)
            if bid_id not in joined.won or notice.get("price") is not None and joined.won[bid_id].get("price") is None:
                joined.won[bid_id] = notice
        elif what == "loss":
            joined.lost[bid_id] = notice
    for bid_id in list(joined.lost):  # a win outranks a loss notice for the same bid (a late or repeated notice)
        if bid_id in joined.won:
            del joined.lost[bid_id]
    for click in clicks:
        bid_id = click["bid_id"]
        if bid_id not in joined.bids:
            joined.orphans["click"] += 1
        elif bid_id not in joined.clicks or click["time"] < joined.clicks[bid_id]:
            joined.clicks[bid_id] = click["time"]
    return joined


def check_ips_clip(clip: float | None) -> None:
    """DataError unless ``clip`` is None (no weights) or a finite number of at least 1 (a weight below 1 for every
    row would weigh them all alike)."""
    if clip is not None and not 1.0 <= clip < math.inf:
        raise DataError(f"--ips-clip must be a number of at least 1 (the largest weight a row may get), got {clip}")


def ips_weight(propensity: float, clip: float) -> float:
    """A row's inverse propensity weight, 1 / ``propensity``, at most ``clip``: a creative bid with probability p
    stands for 1 / p such imps, and the clip bounds how much one rare row (and its click) can move the fit."""
    return min(1.0 / propensity, clip)


def write_training_data(events: str | Path, out: str | Path, *, click_window: float = DEFAULT_CLICK_WINDOW_S,
                        ips_clip: float | None = None, progress: bool = True) -> dict[str, Any]:
    """Join the event log in ``events`` and write ``train.log.txt`` and ``bids.log.txt`` into ``out``; with
    ``ips_clip``, ``train.log.txt`` has a ``weight`` column (``ips_weight``)."""
    if not click_window > 0:
        raise DataError(f"--click-window must be a positive number of seconds, got {click_window}")
    check_ips_clip(ips_clip)
    joined = join_events(read_events(events, progress=progress))
    if not joined.bids:
        raise DataError(f"{events}: no bid events in its finished files ({FINAL_PREFIX}*{SUFFIX})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    order = sorted(joined.bids.values(), key=lambda b: b["time"])
    columns = TRAIN_COLUMNS if ips_clip is None else TRAIN_COLUMNS + (WEIGHT,)
    with open(out / TRAIN_LOG, "w", encoding="utf-8") as f:
        f.write("\t".join(columns) + "\n")
        for bid in order:
            if bid["bid_id"] in joined.billed:
                values = {"click": int(joined.clicked(bid["bid_id"], click_window))}
                if ips_clip is not None:
                    values[WEIGHT] = f"{ips_weight(_propensity(bid), ips_clip):.6g}"
                f.write(_line(columns, bid, values))
    with open(out / BID_LOG, "w", encoding="utf-8") as f:
        f.write("\t".join(BIDS_COLUMNS) + "\n")
        for bid in order:
            bid_id = bid["bid_id"]
            win, loss = joined.won.get(bid_id), joined.lost.get(bid_id)
            if win is not None or loss is not None:
                f.write(_line(BIDS_COLUMNS, bid, _outcome(bid, win, loss, joined.clicked(bid_id, click_window))))
    summary = {"events": str(events), "out": str(out), "click_window_s": click_window}
    if ips_clip is not None:
        summary["ips_clip"] = ips_clip
    return {**summary, **joined.summary(click_window)}


def _propensity(bid: dict) -> float:
    """The bid's ``propensity``; DataError naming the bid when it is not a probability above 0."""
    # logs written before exploration existed have none: every bid then was the best creative's, with certainty
    value = bid.get("propensity", 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise DataError(f"bid {bid['bid_id']}: propensity {value!r} is not a probability above 0 "
                        "(bidder serve writes one with every bid)")
    return float(value)


def _outcome(bid: dict, win: dict | None, loss: dict | None, clicked: bool) -> dict[str, Any]:
    """The bid log's own columns of one bid (``train.data.bidlog``), and ``min_to_win``."""
    pctr = bid["pctr"]
    return {"click": int(clicked), "auction": bid["auction"], "bid": _usd(bid["price"]), "won": int(win is not None),
            "payprice": None if win is None else _usd(win.get("price")),
            "value_per_click": _usd(bid["value"] / (pctr * 1000.0)) if pctr > 0 else None,
            MIN_TO_WIN: None if loss is None else _usd(loss.get("min_to_win"))}


def _usd(value: float | None) -> str | None:
    return None if value is None else f"{value:.6f}"  # micro-dollars, the precision bids are made in


def _line(columns: tuple[str, ...], bid: dict, values: dict[str, Any]) -> str:
    """One tab-separated line: ``values`` first, then the bid's time and id, then its raw record."""
    record = bid["record"]
    out = []
    for name in columns:
        if name in values:
            value = values[name]
        elif name == TIMESTAMP_KEY:
            value = _timestamp(bid["time"])
        elif name == "bidid":
            value = bid["bid_id"]
        else:
            value = record.get(name)
        out.append(_text(value))
    return "\t".join(out) + "\n"


def _timestamp(seconds: float) -> str:
    """yyyyMMddHHmmssSSS (UTC), as in the iPinYou logs."""
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(seconds)) + f"{int(math.fmod(seconds, 1.0) * 1000):03d}"


def _text(value: Any) -> str:
    """A field as the logs write it: null for none, a list comma-joined, no tab or line break inside."""
    if value is None:
        return "null"
    if isinstance(value, list):
        return ",".join(map(str, value)) if value else "null"
    text = str(value)
    return text.translate(_NO_SEPARATORS) if ("\t" in text or "\n" in text or "\r" in text) else text


_NO_SEPARATORS = str.maketrans({"\t": " ", "\n": " ", "\r": " "})

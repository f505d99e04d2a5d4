"""Structured logs: ``--log-format text|json`` and ``--log-level``.

The standard library's ``logging`` with a JSON formatter, not structlog: the runtime install stays as small as
it is (the container image counts every package), every library's records (aiohttp's, onnxruntime's warnings
relayed by the bidder) go through the same handler with no bridge, and what the bidder logs is a few events
per process lifetime, never one per bid request (the event log, ``bidder/events.py``, is the record of bids).

An event is one ``logging`` call whose message is formatted from its fields (``event(log, INFO, "reloaded",
"reloaded: serving %(model)s", model=...)``): the text format prints the sentence as the bidder always has,
the JSON format prints one object per line: ``ts``, ``level``, ``worker`` (its index, or ``"supervisor"``),
``pid``, ``event``, ``message`` and the fields. Records of other code come out as ``event: "log"``.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
import random
import sys
import time
import traceback

import msgspec

__all__ = ["FORMATS", "LEVELS", "JsonFormatter", "Throttled", "access_log_options", "configure", "configured",
           "event", "sampled_access_logger"]

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")
#: the keys of a JSON line that are not an event's fields (``pid`` is the process's own: an event may repeat it
#: for its sentence, an event about another process names that one otherwise, ``worker_pid``)
RESERVED = frozenset({"ts", "level", "worker", "event", "message", "logger", "exception"})

_encode = msgspec.json.Encoder(enc_hook=str).encode  # a field of another type (a Path, an exception) as its text


def event(logger: logging.Logger, level: int, name: str, message: str, /, **fields) -> None:
    """Log the event ``name``; ``message`` is a %-format of the fields (``"worker %(worker)d draining"``)."""
    if RESERVED & fields.keys():
        raise ValueError(f"event {name}: fields {sorted(RESERVED & fields.keys())} are reserved")
    if logger.isEnabledFor(level):  # logging takes a lone mapping as the %-format's fields, an empty one not
        logger.log(level, message, *((fields,) if fields else ()), extra={"event": name})


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def __init__(self, worker: int | str):
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds")
                    .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "worker": self.worker,
            "pid": record.process,
            "event": getattr(record, "event", "log"),
            "message": record.getMessage(),
        }
        if record.name != "bidder":
            line["logger"] = record.name
        if isinstance(record.args, dict) and hasattr(record, "event"):
            line.update(record.args)
        if record.exc_info:
            line["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return _encode(line).decode("utf-8")


def configure(log_format: str = "text", level: str = "info", worker: int | str = 0, stream=None) -> None:
    """Send every record of this process to ``stream`` (stderr) in ``log_format``, from ``level`` up."""
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        who = worker if isinstance(worker, str) else f"worker-{worker}"
        handler.setFormatter(logging.Formatter(f"%(asctime)s {who} %(levelname)s %(message)s"))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


@contextlib.contextmanager
def configured(log_format: str = "text", level: str = "info", worker: int | str = 0):
    """``configure`` for as long as a server runs, then the logging set-up it found (a server run in a process
    that goes on, a test's, must not leave a handler bound to a stream that closes)."""
    root = logging.getLogger()
    handlers, root_level = root.handlers[:], root.level
    configure(log_format, level, worker)
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(root_level)


class Throttled:
    """An event that may come in floods (refused notices under an attack): at most one line per key per
    ``interval`` seconds; the next line says how many were left out (``suppressed``)."""

    def __init__(self, logger: logging.Logger, level: int, name: str, message: str, interval: float = 1.0):
        self.logger, self.level, self.name, self.message, self.interval = logger, level, name, message, interval
        self._last: dict[object, tuple[float, int]] = {}

    def __call__(self, key: object, **fields) -> None:
        now = time.monotonic()
        last, suppressed = self._last.get(key, (-float("inf"), 0))
        if now - last < self.interval:
            self._last[key] = (last, suppressed + 1)
            return
        self._last[key] = (now, 0)
        event(self.logger, self.level, self.name, self.message, suppressed=suppressed, **fields)


def access_log_options(rate: float) -> dict:
    """aiohttp runner options for an access log of a ``rate`` fraction of requests; none at all at rate 0, so that
    requests pay nothing for it."""
    if rate <= 0:
        return {"access_log": None}
    return {"access_log": logging.getLogger("bidder.access"), "access_log_class": sampled_access_logger(rate)}


def sampled_access_logger(rate: float) -> type:
    """aiohttp's access log class that logs a ``rate`` fraction of requests (0 < rate <= 1) as ``access``
    events. With sampling off the runner gets no access logger at all, so requests pay nothing."""
    from aiohttp.abc import AbstractAccessLogger  # here: the scorer and the training code log without aiohttp

    if not 0 < rate <= 1:
        raise ValueError(f"access log sample rate must be in (0, 1], got {rate}")

    class SampledAccessLogger(AbstractAccessLogger):
        def log(self, request, response, time: float) -> None:  # noqa: A002 (aiohttp's signature)
            if random.random() >= rate:
                return
            event(self.logger, logging.INFO, "access", "%(method)s %(path)s %(status)d %(duration_ms).3f ms",
                  method=request.method, path=request.path, status=response.status,
                  duration_ms=round(time * 1000, 3), remote=request.remote)

    return SampledAccessLogger

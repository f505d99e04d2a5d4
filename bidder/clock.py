"""The time a bidder prices a request at: the wall clock, a fixed instant, or a simulated clock.

A simulated clock runs ``speed`` times faster than the wall clock from a shared origin: it reads ``start``
at wall time ``anchor`` (Unix seconds), so ``now() = start + (time.time() - anchor) * speed``. Two processes
on one machine that are given the same three numbers read the same simulated time, whenever each of them
started: that is how ``bidder serve --clock-start S --clock-speed X --clock-anchor A`` and
``python -m bench exchange --start S --speed X --anchor A`` agree on the hour of every request. Speed 0 is
a fixed clock (``--now``).
"""
from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Callable

__all__ = ["Clock", "millis", "parse_time", "read_clock"]


def read_clock(source: float | Callable[[], float] | None) -> float:
    """Unix seconds from what a bidder is given to tell the time by: a fixed instant (``--now``), a clock to call
    (``Clock``), or None for the wall clock."""
    if source is None:
        return time.time()
    return source() if callable(source) else source


def millis(seconds: float) -> int:
    """Unix seconds as the whole milliseconds a notice token carries them in (its issue time): a bid's report to the
    banker and its notices derive its expiry from this same integer."""
    return int(seconds * 1000)


def parse_time(text: str) -> float:
    """An ISO 8601 time (UTC unless it carries an offset) or Unix seconds → Unix seconds; ValueError
    saying what is expected otherwise."""
    try:
        if text.replace(".", "", 1).isdigit():
            return float(text)
        iso = text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text  # fromisoformat reads "Z" from 3.11 only
        when = dt.datetime.fromisoformat(iso)
    except (ValueError, IndexError):
        raise ValueError(f"expected an ISO 8601 time such as 2026-11-25T14:00:00Z or Unix seconds, "
                         f"got {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


@dataclass(frozen=True)
class Clock:
    start: float   # simulated Unix seconds at the anchor
    speed: float   # simulated seconds per wall second (0: a fixed clock)
    anchor: float  # wall-clock Unix seconds at which the simulated clock reads ``start``

    def __post_init__(self) -> None:
        if not self.speed >= 0:  # also refuses NaN
            raise ValueError(f"clock speed must be >= 0, got {self.speed}")

    def now(self) -> float:
        """Simulated Unix seconds now."""
        return self.start + (time.time() - self.anchor) * self.speed

    __call__ = now

    def at(self, wall: float) -> float:
        """Simulated Unix seconds at wall-clock time ``wall``."""
        return self.start + (wall - self.anchor) * self.speed

    def wall(self, simulated: float) -> float:
        """The wall-clock time at which the clock reads ``simulated`` (speed > 0)."""
        return self.anchor + (simulated - self.start) / self.speed

"""Faults of notice delivery, as real exchanges show them, each with a flag and a default.

Per notice (win, billing, loss) and per the request's own uniform draws (``traffic.UNIFORMS``), so the
same seed and the same bids give the same faults:
    * a delay in simulated seconds: exponential with mean ``delay_s``, or, for a fraction ``late``, one to
      ten minutes;
    * ``lost``: the notice is never sent;
    * ``duplicate``: it is sent twice, the copy a few simulated seconds after the first;
    * billing notices not answered 2xx are retried every ``retry_every_s`` for ``retry_for_s`` (the IAB's
      rule for ``burl``), each retry counted;
    * ``unrendered``: a fraction of wins never renders, so no billing notice, no charge, no click;
    * ``forged``: for a fraction of wins a forged notice is sent besides the genuine one (a wrong price, a
      bid id of nobody's, or an earlier auction's notice replayed), to count what the bidder refuses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

__all__ = ["Faults", "NoticeFaults", "U"]


class U:
    """Positions in a request's row of uniforms (per bidder)."""
    TIE, RENDER, CLICK, FORGE, FORGE_KIND, CLICK_DELAY = 0, 1, 2, 3, 4, 5
    WIN, BILL, LOSS = 6, 9, 12  # three each: lost, duplicate, delay


@dataclass(frozen=True)
class Faults:
    delay_s: float = 2.0         # mean delay of a notice, simulated seconds
    late: float = 0.02           # fraction of notices delayed 1 to 10 simulated minutes
    lost: float = 0.01           # fraction never sent
    duplicate: float = 0.02      # fraction sent twice
    unrendered: float = 0.05     # fraction of wins never rendered (no billing notice)
    forged: float = 0.01         # fraction of wins followed by a forged notice
    retry_every_s: float = 10.0  # billing retries (IAB): every 10 simulated seconds ...
    retry_for_s: float = 60.0    # ... for one minute

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("late", "lost", "duplicate", "unrendered", "forged") and not 0.0 <= value <= 1.0:
                raise ValueError(f"fault rate {f.name} must be between 0 and 1, got {value}")
            if not value >= 0.0 or math.isinf(value):
                raise ValueError(f"{f.name} must be a finite number >= 0, got {value}")
        if self.retry_every_s == 0 and self.retry_for_s > 0:
            raise ValueError("retry_every_s must be positive when billing notices are retried")

    def notice(self, u_lost: float, u_duplicate: float, u_delay: float) -> "NoticeFaults":
        return NoticeFaults(lost=u_lost < self.lost, duplicate=u_duplicate < self.duplicate,
                            delay_s=self.delay(u_delay))

    def delay(self, u: float) -> float:
        """Simulated seconds a notice waits: by inversion of the delay distribution at ``u``."""
        if u < self.late:
            return 60.0 + 540.0 * (u / self.late)
        rest = (u - self.late) / (1.0 - self.late)
        return -self.delay_s * math.log1p(-min(rest, 1.0 - 1e-12))

    def retries(self) -> int:
        return int(self.retry_for_s // self.retry_every_s) if self.retry_every_s > 0 else 0


@dataclass(frozen=True)
class NoticeFaults:
    lost: bool
    duplicate: bool
    delay_s: float

"""What a run counted, per bidder and per campaign, and the JSON report built from it.

``spend`` is always what the exchange charged: the clearing price of billed impressions (an impression
is charged when it renders, the moment its billing notice is due, whether or not the notice reaches the
bidder). ``value`` is the expected value of what was billed: Σ pctr_true × value per click, with the
truth of the creative the bidder chose; ``clicks`` are the clicks drawn from that truth.
"""
from __future__ import annotations

import math
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from bench.exchange.terms import Campaign

__all__ = ["BidderStats", "CampaignStats", "NoticeStats", "build_report"]


@dataclass
class NoticeStats:
    sent: int = 0             # notice requests made: genuine, duplicates, retries and forgeries
    answered: int = 0         # genuine notices (duplicates and retries included) answered 2xx
    refused: int = 0          # genuine notices answered otherwise
    failed: int = 0           # no answer: connection refused or closed, or no answer within the deadline
    unreachable: int = 0      # not sent: the URL's host is not on this machine
    lost: int = 0             # not sent: dropped by the fault injector
    duplicates_sent: int = 0
    retries_sent: int = 0     # billing notices sent again after an answer other than 2xx
    forged_sent: int = 0      # notices whose price or bid id was altered
    forged_refused: int = 0   # forgeries answered other than 2xx (what a careful bidder does)
    forged_accepted: int = 0  # forgeries answered 2xx
    replays_sent: int = 0     # another auction's genuine notice sent again, token and all
    replays_answered: int = 0  # replays answered 2xx (a repeat of a counted notice: not counted again)
    by_kind: dict[str, int] = field(default_factory=lambda: {"win": 0, "bill": 0, "loss": 0})  # genuine, first sends


@dataclass
class CampaignStats:
    campaign: Campaign | None
    hours: int
    bids: int = 0
    wins: int = 0
    bills: int = 0
    spend: float = 0.0
    value: float = 0.0
    clicks: int = 0
    cap_violations: int = 0
    hourly_spend: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.hourly_spend = [0.0] * self.hours


@dataclass
class BidderStats:
    url: str
    hours: int
    requests: int = 0
    bids: int = 0
    no_bids: int = 0
    errors: int = 0           # answers other than 200 with a bid or 204, and connections that failed
    invalid: int = 0          # 200 answers that are not a usable bid for the imp (id, impid, price, currency)
    timeouts: int = 0         # answers later than the request's tmax, or none: no bid
    throttled: int = 0        # requests not sent: the bidder had --connections requests in flight already
    wins: int = 0
    bills: int = 0
    unrendered: int = 0
    spend: float = 0.0
    value: float = 0.0
    clicks: int = 0
    unknown_creatives: int = 0  # billed creatives the market does not know (no truth: value 0, no click)
    creative: dict[str, int] = field(default_factory=lambda: {"adm": 0, "win_notice": 0, "unchecked": 0, "missing": 0})
    notices: NoticeStats = field(default_factory=NoticeStats)
    clicks_sent: int = 0      # clicks fired at the markup's click URL (when it is on this machine)
    latency_ms: list[float] = field(default_factory=list)
    notice_latency_ms: list[float] = field(default_factory=list)  # every notice, click and copy answered
    hourly_bids: list[int] = field(default_factory=list)
    hourly_wins: list[int] = field(default_factory=list)
    campaigns: dict[str, CampaignStats] = field(default_factory=dict)
    # (campaign id, user) -> recent billed (simulated time, creative id), for the frequency caps
    _seen: dict[tuple[str, int], deque] = field(default_factory=lambda: defaultdict(deque))

    def __post_init__(self) -> None:
        self.hourly_bids = [0] * self.hours
        self.hourly_wins = [0] * self.hours

    def campaign(self, key: str, terms_campaign: Campaign | None) -> CampaignStats:
        stats = self.campaigns.get(key)
        if stats is None:
            stats = self.campaigns[key] = CampaignStats(terms_campaign, self.hours)
        return stats

    def count_cap_violation(self, stats: CampaignStats, user: int, time: float, crid: str) -> None:
        """A billed impression beyond one of the campaign's frequency caps for this user counts once."""
        campaign = stats.campaign
        if campaign is None or not campaign.caps:
            return
        seen = self._seen[(campaign.id, user)]
        longest = max(cap.seconds for cap in campaign.caps)
        while seen and seen[0][0] <= time - longest:
            seen.popleft()
        for cap in campaign.caps:
            shown = sum(1 for t, c in seen if t > time - cap.seconds and (cap.scope == "campaign" or c == crid))
            if shown >= cap.count:
                stats.cap_violations += 1
                break
        seen.append((time, crid))


def _ratio(a: float, b: float, digits: int = 6) -> float | None:
    return round(a / b, digits) if b else None


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(math.ceil(q * len(ordered))) - 1)], 3)


def build_report(config: dict[str, Any], bidders: list[BidderStats], plan_share: list[float],
                 run: dict[str, Any]) -> dict[str, Any]:
    """The JSON report: ``config``, the run's own figures (``rate_rps``, ``clock``, ...) and ``bidders``."""
    out: dict[str, Any] = {"config": config, **run, "bidders": {}}
    for b in bidders:
        notices = b.notices
        entry: dict[str, Any] = {
            "requests": b.requests, "bids": b.bids, "no_bids": b.no_bids, "errors": b.errors, "invalid": b.invalid,
            "timeouts": b.timeouts, "throttled": b.throttled, "wins": b.wins, "bills": b.bills, "unrendered": b.unrendered,
            "spend": round(b.spend, 6), "value": round(b.value, 6), "surplus": round(b.value - b.spend, 6),
            "clicks": b.clicks, "cpc": _ratio(b.spend, b.clicks), "ecpm": _ratio(b.spend * 1000, b.bills),
            "win_rate": _ratio(b.wins, b.bids, 4), "bid_rate": _ratio(b.bids, b.requests, 4),
            "latency_ms": {"p50": _percentile(b.latency_ms, 0.5), "p99": _percentile(b.latency_ms, 0.99)},
            "notice_latency_ms": {"p50": _percentile(b.notice_latency_ms, 0.5),
                                  "p99": _percentile(b.notice_latency_ms, 0.99), "answered": len(b.notice_latency_ms)},
            "unknown_creatives": b.unknown_creatives, "creative": dict(b.creative), "clicks_sent": b.clicks_sent,
            "notices": {k: v for k, v in vars(notices).items()},
            "hourly": [{"hour": h, "bids": b.hourly_bids[h], "wins": b.hourly_wins[h],
                        "win_rate": _ratio(b.hourly_wins[h], b.hourly_bids[h], 4)} for h in range(b.hours)],
            "campaigns": {},
        }
        for cid in sorted(b.campaigns):
            c = b.campaigns[cid]
            budget = c.campaign.budget if c.campaign is not None else None
            daily = budget.get("daily") if budget else None
            daily = float(daily) if isinstance(daily, (int, float)) and not isinstance(daily, bool) else None
            entry["campaigns"][cid] = {
                "bids": c.bids, "wins": c.wins, "bills": c.bills, "spend": round(c.spend, 6),
                "value": round(c.value, 6), "surplus": round(c.value - c.spend, 6), "clicks": c.clicks,
                "cpc": _ratio(c.spend, c.clicks), "ecpm": _ratio(c.spend * 1000, c.bills),
                "win_rate": _ratio(c.wins, c.bids, 4), "budget": budget, "cap_violations": c.cap_violations,
                "hourly": [{"hour": h, "spend": round(c.hourly_spend[h], 6),
                            "plan": round(daily * plan_share[h], 6) if daily is not None else None}
                           for h in range(c.hours)],
            }
        out["bidders"][b.url] = entry
    return out

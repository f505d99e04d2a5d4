"""The advertisers' terms, read from the catalog the bidders serve (``--campaigns``).

The exchange needs only what a real one would be told by its advertisers: each campaign's value per
click (to report value and surplus), its budget (``budget: {daily, total, timezone}``, when the catalog
has one: the even-pacing plan), its frequency caps (``frequency_cap: [{count, seconds, scope}]``, scope
``campaign`` or ``creative``: to count violations), which creative belongs to which campaign, and the deal
ids campaigns buy (to offer those deals in private marketplaces). It reads the JSON itself and ignores
every other key, so it knows nothing of any bidder's parser.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Campaign", "Cap", "Terms", "TermsError", "read_terms"]


class TermsError(ValueError):
    """The catalog cannot be read for its terms; the message names the file and the field."""


@dataclass(frozen=True)
class Cap:
    count: int
    seconds: float
    scope: str  # "campaign" or "creative"


@dataclass(frozen=True)
class Campaign:
    id: str
    value_per_click: float
    budget: dict[str, Any] | None
    caps: tuple[Cap, ...]
    creatives: tuple[str, ...]


@dataclass(frozen=True)
class Terms:
    campaigns: dict[str, Campaign]
    creative_campaign: dict[str, str]  # creative id -> campaign id
    deals: tuple[tuple[str, str | None], ...]  # (deal id, buyer seat) the catalog's campaigns buy

    def campaign_of(self, cid: str | None, crid: str | None) -> Campaign | None:
        """The campaign of a bid: its ``cid`` if the catalog has it, else the campaign of its creative."""
        if cid is not None and cid in self.campaigns:
            return self.campaigns[cid]
        owner = self.creative_campaign.get(crid) if crid is not None else None
        return self.campaigns[owner] if owner is not None else None


def read_terms(path: Path) -> Terms:
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise TermsError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise TermsError(f"{path}: not JSON: {exc}") from None
    entries = document.get("campaigns") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise TermsError(f"{path}: expected an object with a 'campaigns' list")
    campaigns: dict[str, Campaign] = {}
    owners: dict[str, str] = {}
    deals: dict[str, str | None] = {}
    for i, entry in enumerate(entries):
        where = f"{path}: campaigns[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            raise TermsError(f"{where}: a campaign needs a string 'id'")
        value = entry.get("value_per_click")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise TermsError(f"{where}.value_per_click: expected a number >= 0, got {value!r}")
        budget = entry.get("budget")
        if budget is not None and not isinstance(budget, dict):
            raise TermsError(f"{where}.budget: expected an object {{daily, total, timezone}}, got {budget!r}")
        caps = tuple(_cap(c, f"{where}.frequency_cap[{j}]") for j, c in enumerate(entry.get("frequency_cap") or ()))
        creatives = tuple(str(c.get("id")) for c in entry.get("creatives") or () if isinstance(c, dict))
        for crid in creatives:
            owners.setdefault(crid, entry["id"])
        for deal in entry.get("deals") or ():
            if isinstance(deal, dict) and isinstance(deal.get("dealid"), str):
                deals.setdefault(deal["dealid"], deal.get("seat"))
        campaigns[entry["id"]] = Campaign(entry["id"], float(value), budget, caps, creatives)
    return Terms(campaigns, owners, tuple(deals.items()))


def _cap(entry: Any, where: str) -> Cap:
    if not isinstance(entry, dict):
        raise TermsError(f"{where}: expected an object {{count, seconds, scope}}, got {entry!r}")
    count, seconds, scope = entry.get("count"), entry.get("seconds"), entry.get("scope", "campaign")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise TermsError(f"{where}.count: expected a positive integer, got {count!r}")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
        raise TermsError(f"{where}.seconds: expected a positive number, got {seconds!r}")
    if scope not in ("campaign", "creative"):
        raise TermsError(f"{where}.scope: expected 'campaign' or 'creative', got {scope!r}")
    return Cap(count, float(seconds), scope)

"""The campaign catalog: which ads we can show, what a click is worth, where each may run.

The file is JSON::

    {"campaigns": [{"id": "c1458", "advertiser": 1458, "name": "...", "value_per_click": 1.2,  # USD
                    "enabled": true,
                    "targeting": {"sizes": [[300, 250]], "domains": ["..."], "exchanges": ["2"]},
                    "deals": [{"dealid": "AB-Agency1-0001", "seat": "Agency1"}],
                    "creatives": [{"id": "...", "w": 300, "h": 250, "adomain": ["brand.example"],
                                   "nurl": "https://...price=${AUCTION_PRICE}", "markup": "<a ...>"}]}]}

``name``, ``enabled`` (default true), ``targeting`` and each of its keys, and ``deals`` are optional; a
creative needs a ``nurl`` or a ``markup`` (or both). Unknown keys are errors, so a misspelt option cannot
pass silently. ``deals`` lists the private-marketplace deals the campaign may buy: the deal id an exchange
sends in ``imp.pmp.deals[].id`` and, optionally, the buyer seat the deal was set up for (without one the
bid goes in the bidder's own seat); ``bidder/deals.py`` matches them against a request.

Each enabled creative becomes one *candidate*. Its ``layer`` dict holds the candidate-level raw
fields (``CANDIDATE_FIELDS``: creative, advertiser and the creative's size); a scored row is the pair
(layer, imp record), so no dict is built per row on the hot path. Model fields read from these keys
are the candidate side of factorized scoring (``bidder/factorized.py``); every other field is the imp's.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

__all__ = ["AUCTION_PRICE_MACRO", "CANDIDATE_FIELDS", "CampaignDeal", "Candidate", "Catalog", "CatalogError",
           "load_catalog",
           "parse_catalog"]

AUCTION_PRICE_MACRO = "${AUCTION_PRICE}"
#: The raw record keys a candidate (not the imp) supplies, in the order of its ``layer`` dict.
CANDIDATE_FIELDS = ("creative", "advertiser", "slotwidth", "slotheight")


class CatalogError(ValueError):
    """A catalog file that cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class CampaignDeal:
    """A deal a campaign may buy: the exchange's deal id and the buyer seat it was set up for, if any."""
    dealid: str
    seat: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    # Slots, and the two fields every scored row reads first: with a large catalog each row's candidate is
    # a cold object, and these then share the cache line of its header (which building the row touches).
    index: int = field(default=-1, compare=False, repr=False)  # position in its catalog (factorized scoring)
    value_per_click: float          # USD
    campaign_id: str
    advertiser: int
    creative_id: str
    w: int
    h: int
    adomain: tuple[str, ...]
    nurl: str | None                # win notice carrying ${AUCTION_PRICE}
    markup: str | None              # ad markup returned inline as ``adm``
    domains: frozenset[str] | None  # targeting; None = anywhere
    exchanges: frozenset[str] | None
    layer: dict[str, Any] = field(compare=False, repr=False)
    deals: tuple[CampaignDeal, ...] = ()  # the campaign's deals

    def runs_on(self, domain: str | None, exchange: str | None, blocked: frozenset[str]) -> bool:
        if self.domains is not None and domain not in self.domains:
            return False
        if self.exchanges is not None and exchange not in self.exchanges:
            return False
        return not (blocked and any(d in blocked for d in self.adomain))


class Catalog:
    """Enabled candidates indexed by creative size."""

    def __init__(self, candidates: Iterable[Candidate], source: str = "catalog"):
        # a candidate knows its position: factorized scoring addresses its precomputed part by it
        self.candidates = tuple(c if c.index == i else replace(c, index=i) for i, c in enumerate(candidates))
        self.source = source
        by_size: dict[tuple[int, int], list[Candidate]] = {}
        for c in self.candidates:
            by_size.setdefault((c.w, c.h), []).append(c)
        self._by_size = {size: tuple(cs) for size, cs in by_size.items()}
        # (size, deal id) -> the candidates whose campaign buys that deal: retrieval never cuts a deal's buyers
        by_deal: dict[tuple[int, int, str], list[Candidate]] = {}
        for c in self.candidates:
            for deal in c.deals:
                by_deal.setdefault((c.w, c.h, deal.dealid), []).append(c)
        self._by_deal = {key: tuple(cs) for key, cs in by_deal.items()}
        # without domain or exchange targeting a size's candidates are all eligible: the common case
        # then hands out the precomputed tuple instead of filtering it per request
        self.targeted = any(c.domains is not None or c.exchanges is not None for c in self.candidates)

    def __len__(self) -> int:
        return len(self.candidates)

    @property
    def sizes(self) -> frozenset[tuple[int, int]]:
        return frozenset(self._by_size)

    def for_size(self, w: int, h: int) -> tuple[Candidate, ...]:
        return self._by_size.get((w, h), ())

    def deal_buyers(self, w: int, h: int, dealids: Iterable[str], domain: str | None, exchange: str | None,
                    blocked: frozenset[str]) -> list[Candidate]:
        """Candidates of size ``w``x``h`` whose campaign buys one of ``dealids`` and that may run here."""
        found: dict[int, Candidate] = {}
        for dealid in dealids:
            for c in self._by_deal.get((w, h, dealid), ()):
                if c.runs_on(domain, exchange, blocked):
                    found.setdefault(c.index, c)
        return list(found.values())

    def eligible(self, w: int, h: int, domain: str | None, exchange: str | None,
                 blocked: frozenset[str]) -> tuple[Candidate, ...]:
        """Candidates of size ``w``x``h`` that may run on ``domain`` via ``exchange``, minus blocked advertisers."""
        candidates = self._by_size.get((w, h), ())
        if not self.targeted and not blocked:
            return candidates
        return tuple(c for c in candidates if c.runs_on(domain, exchange, blocked))


_CAMPAIGN_KEYS = frozenset({"id", "advertiser", "name", "value_per_click", "enabled", "targeting", "deals",
                            "creatives"})
_DEAL_KEYS = frozenset({"dealid", "seat"})
_TARGETING_KEYS = frozenset({"sizes", "domains", "exchanges"})
_CREATIVE_KEYS = frozenset({"id", "w", "h", "adomain", "nurl", "markup"})


#: above this many characters a catalog is decoded one campaign at a time (``_decode``)
CHUNKED_DECODE_CHARS = 1 << 20
_HEAD = re.compile(r'[ \t\n\r]*\{[ \t\n\r]*"campaigns"[ \t\n\r]*:[ \t\n\r]*\[[ \t\n\r]*')
_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace


def _decode(text: str) -> Any:
    """``json.loads(text)``, for a large catalog one campaign per call.

    A reload builds the new catalog in a thread while the event loop serves: one ``json.loads`` of a
    100,000-creative file holds the GIL for most of a second, whereas the eval loop can hand the GIL
    over between two campaigns. Anything but the plain ``{"campaigns": [...]}`` shape (another key, a
    syntax error) goes to ``json.loads`` whole, for the same result or the same error.
    """
    head = _HEAD.match(text) if len(text) > CHUNKED_DECODE_CHARS else None
    if head is None:
        return json.loads(text)
    decoder = json.JSONDecoder()
    campaigns: list[Any] = []
    at = head.end()
    try:
        if text.startswith("]", at):
            at += 1
        else:
            while True:
                entry, at = decoder.raw_decode(text, at)
                campaigns.append(entry)
                at = _SPACE.match(text, at).end()
                if text.startswith(",", at):
                    at = _SPACE.match(text, at + 1).end()
                    continue
                if not text.startswith("]", at):
                    return json.loads(text)
                at += 1
                break
    except json.JSONDecodeError:
        return json.loads(text)  # raises the error json.loads reports for the whole file
    at = _SPACE.match(text, at).end()
    if not text.startswith("}", at) or _SPACE.match(text, at + 1).end() != len(text):
        return json.loads(text)
    return {"campaigns": campaigns}


def load_catalog(path: str | os.PathLike) -> Catalog:
    path = Path(path)
    try:
        data = _decode(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CatalogError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogError(f"{path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise CatalogError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    return parse_catalog(data, str(path))


def parse_catalog(data: Any, origin: str = "catalog") -> Catalog:
    if not isinstance(data, dict) or not isinstance(data.get("campaigns"), list):
        raise CatalogError(f"{origin}: expected an object with a 'campaigns' list")
    unknown = set(data) - {"campaigns"}
    if unknown:
        raise CatalogError(f"{origin}: unknown keys {sorted(unknown)}")
    candidates: list[Candidate] = []
    seen: set[str] = set()
    seen_creatives: dict[str, str] = {}
    for i, entry in enumerate(data["campaigns"]):
        where = f"{origin}: campaigns[{i}]"
        _known_keys(entry, _CAMPAIGN_KEYS, where)
        campaign_id = _text(entry.get("id"), f"{where}.id")
        if campaign_id in seen:
            raise CatalogError(f"{where}.id: duplicate campaign id {campaign_id!r}")
        seen.add(campaign_id)
        advertiser = entry.get("advertiser")
        if not isinstance(advertiser, int) or isinstance(advertiser, bool) or advertiser < 0:
            raise CatalogError(f"{where}.advertiser: expected a non-negative integer, got {advertiser!r}")
        value = entry.get("value_per_click")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1e6:
            raise CatalogError(f"{where}.value_per_click: expected a positive number of USD, got {value!r}")
        enabled = entry.get("enabled", True)
        if not isinstance(enabled, bool):
            raise CatalogError(f"{where}.enabled: expected true or false, got {enabled!r}")
        targeting = entry.get("targeting") or {}
        _known_keys(targeting, _TARGETING_KEYS, f"{where}.targeting")
        domains = _string_set(targeting.get("domains"), f"{where}.targeting.domains")
        exchanges = _string_set(targeting.get("exchanges"), f"{where}.targeting.exchanges")
        sizes = targeting.get("sizes")
        if sizes is not None and (not isinstance(sizes, list) or not all(_is_size(s) for s in sizes)):
            raise CatalogError(f"{where}.targeting.sizes: expected a list of [w, h] pairs")
        allowed_sizes = None if sizes is None else {tuple(s) for s in sizes}
        deals = _deals(entry.get("deals"), f"{where}.deals")
        creatives = entry.get("creatives")
        if not isinstance(creatives, list) or not creatives:
            raise CatalogError(f"{where}.creatives: expected a non-empty list")
        for j, cr in enumerate(creatives):
            cw = f"{where}.creatives[{j}]"
            _known_keys(cr, _CREATIVE_KEYS, cw)
            creative_id = _text(cr.get("id"), f"{cw}.id")
            if creative_id in seen_creatives:  # crid must name one ad in win notices and reports
                raise CatalogError(f"{cw}.id: creative {creative_id!r} is also in {seen_creatives[creative_id]}")
            seen_creatives[creative_id] = cw.partition(": ")[2]
            w, h = cr.get("w"), cr.get("h")
            if not _is_size([w, h]):
                raise CatalogError(f"{cw}: w and h must be positive integers, got {w!r} x {h!r}")
            adomain = cr.get("adomain")
            if not isinstance(adomain, list) or not adomain or not all(isinstance(d, str) and d for d in adomain):
                raise CatalogError(f"{cw}.adomain: expected a non-empty list of domains")
            nurl, markup = cr.get("nurl"), cr.get("markup")
            if nurl is None and markup is None:
                raise CatalogError(f"{cw}: needs a nurl (win notice) or markup (served inline as adm)")
            if nurl is not None:
                nurl = _text(nurl, f"{cw}.nurl")
                if AUCTION_PRICE_MACRO not in nurl:
                    raise CatalogError(f"{cw}.nurl: must carry {AUCTION_PRICE_MACRO} for the clearing price")
            if markup is not None:
                markup = _text(markup, f"{cw}.markup")
            if not enabled or (allowed_sizes is not None and (w, h) not in allowed_sizes):
                continue
            layer = dict(zip(CANDIDATE_FIELDS, (creative_id, advertiser, w, h)))
            candidates.append(Candidate(
                campaign_id=campaign_id, advertiser=advertiser, creative_id=creative_id, w=w, h=h,
                adomain=tuple(adomain), nurl=nurl, markup=markup, value_per_click=float(value),
                domains=domains, exchanges=exchanges, layer=layer, deals=deals, index=len(candidates)))
    return Catalog(candidates, origin)


def _known_keys(entry: Any, allowed: frozenset[str], where: str) -> None:
    """``entry`` must be an object of ``allowed`` keys only."""
    if not isinstance(entry, dict):
        raise CatalogError(f"{where}: expected an object")
    # a misspelt optional key ("enabeld", "targetting") would otherwise be silently ignored
    unknown = set(entry) - allowed
    if unknown:
        raise CatalogError(f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(allowed)})")


def _deals(value: Any, where: str) -> tuple[CampaignDeal, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise CatalogError(f"{where}: expected a list of {{\"dealid\": ..., \"seat\": ...}} objects")
    deals: dict[str, CampaignDeal] = {}
    for k, deal in enumerate(value):
        dw = f"{where}[{k}]"
        _known_keys(deal, _DEAL_KEYS, dw)
        dealid = _text(deal.get("dealid"), f"{dw}.dealid")
        if dealid in deals:
            raise CatalogError(f"{dw}.dealid: duplicate deal {dealid!r}")
        seat = deal.get("seat")
        deals[dealid] = CampaignDeal(dealid, None if seat is None else _text(seat, f"{dw}.seat"))
    return tuple(deals.values())


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise CatalogError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _string_set(value: Any, where: str) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CatalogError(f"{where}: expected a list of strings")
    return frozenset(value)


def _is_size(pair: Any) -> bool:
    return (isinstance(pair, (list, tuple)) and len(pair) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in pair))

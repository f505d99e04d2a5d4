"""The campaign catalog: which ads we can show, what a click is worth, where each may run.

The file is JSON::

    {"campaigns": [{"id": "c1458", "advertiser": 1458, "name": "...", "value_per_click": 1.2,  # USD
                    "enabled": true,
                    "targeting": {"sizes": [[300, 250]], "domains": ["..."], "exchanges": ["2"]},
                    "deals": [{"dealid": "AB-Agency1-0001", "seat": "Agency1"}],
                    "creatives": [{"id": "...", "w": 300, "h": 250, "adomain": ["brand.example"],
                                   "nurl": "https://...price=${AUCTION_PRICE}", "markup": "<a ...>"}]}]}

``name``, ``enabled`` (default true), ``targeting`` and each of its keys, and ``deals`` are optional; a
creative needs a ``nurl`` or a ``markup`` (or both); its optional ``click_url`` (the landing page) must
appear in its markup, whose link to it the bidder routes through ``/click`` when notices are on. Unknown keys
are errors, so a misspelt option cannot pass silently. A campaign's money terms (``budget``, ``flight``,
``pacing``, ``max_cpm``, ``frequency_cap``: docs/catalog.md) become its ``CampaignTerms`` in ``Catalog.terms``. ``deals`` lists the private-marketplace deals the campaign may buy: the deal id an exchange
sends in ``imp.pmp.deals[].id`` and, optionally, the buyer seat the deal was set up for (without one the
bid goes in the bidder's own seat); ``bidder/deals.py`` matches them against a request.

A creative may declare what it is (``cat`` with ``cattax``, ``attr``, ``btype``, ``mimes``, ``api``, ``bundle``) and
a campaign that it needs consent to personal data (``requires_consent``): checked here, against the shipped IAB
taxonomy and the OpenRTB lists, and honoured by ``bidder/conformance.py``. The currency table beside the file
(``bidder/currencies.py``) is read with it.

Each enabled creative becomes one *candidate*. Its ``layer`` dict holds the candidate-level raw
fields (``CANDIDATE_FIELDS``: creative, advertiser and the creative's size); a scored row is the pair
(layer, imp record), so no dict is built per row on the hot path. Model fields read from these keys
are the candidate side of factorized scoring (``bidder/factorized.py``); every other field is the imp's.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from msgspec import Meta, Struct

from bidder.clock import parse_time
from bidder.conformance import (API_FRAMEWORKS, ATTRIBUTES, BANNER_TYPES, CONTENT_TAXONOMY_1, IAB_CONTENT_1, NO_META,
                                BlockingIndex, CreativeMeta)
from bidder.currencies import Currencies, CurrencyError, currencies_beside, default_currencies, load_currencies

__all__ = ["AUCTION_PRICE_MACRO", "CANDIDATE_FIELDS", "CampaignDeal", "CampaignTerms", "Candidate", "Catalog",
           "CatalogError", "FrequencyCap", "decode_catalog", "load_catalog"]

AUCTION_PRICE_MACRO = "${AUCTION_PRICE}"
#: The raw record keys a candidate (not the imp) supplies, in the order of its ``layer`` dict.
CANDIDATE_FIELDS = ("creative", "advertiser", "slotwidth", "slotheight")
_REMEMBERED_BADV = 4096  # sizes x blocked-advertiser lists whose eligible candidates are kept


class CatalogError(ValueError):
    """A catalog file that cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class CampaignDeal:
    """A deal a campaign may buy: the exchange's deal id and the buyer seat it was set up for, if any."""
    dealid: str
    seat: str | None = None


# -- campaign money terms: budget, flight, pacing, bid cap, frequency caps ------------------------------------
@dataclass(frozen=True)
class FrequencyCap:
    """At most ``count`` billed impressions per user in any ``seconds``, of the campaign or of each creative."""
    count: int
    seconds: int
    scope: str  # "campaign" | "creative"


@dataclass(frozen=True)
class CampaignTerms:
    """What a campaign may spend and when (``bidder.ledger`` enforces it); amounts in USD, times Unix seconds."""
    campaign_id: str
    total_usd: float | None = None    # over the whole flight; None: no total budget
    daily_usd: float | None = None    # per day of ``timezone``; None: no daily budget
    timezone: ZoneInfo = ZoneInfo("UTC")  # where the campaign's day begins and ends
    start: float | None = None        # flight: no bid before ``start``, nor at or after ``end``
    end: float | None = None
    pacing: str = "asap"              # "even": spread the daily budget over the day; "asap": as the market allows
    max_cpm: float | None = None      # the highest bid price (CPM, USD)
    frequency_caps: tuple[FrequencyCap, ...] = ()
    #: a total or a daily budget is set (worked out once: the bid path reads it for every bid)
    budgeted: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "budgeted", self.total_usd is not None or self.daily_usd is not None)

    def in_flight(self, now: float) -> bool:
        return (self.start is None or now >= self.start) and (self.end is None or now < self.end)


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
    click_url: str | None = None    # landing page the markup links to (notices on: routed through /click)
    # -- creative metadata (bidder/conformance.py): categories, attributes, type, MIME types, APIs, app bundle
    meta: CreativeMeta = field(default=NO_META, compare=False, repr=False)

    def runs_on(self, domain: str | None, exchange: str | None, blocked: frozenset[str]) -> bool:
        if self.domains is not None and domain not in self.domains:
            return False
        if self.exchanges is not None and exchange not in self.exchanges:
            return False
        return not (blocked and any(d in blocked for d in self.adomain))


class Catalog:
    """Enabled candidates indexed by creative size."""

    def __init__(self, candidates: Iterable[Candidate], source: str = "catalog", currencies: Currencies | None = None,
                 terms: Iterable[CampaignTerms] = ()):
        # a candidate knows its position: factorized scoring addresses its precomputed part by it
        self.candidates = tuple(c if c.index == i else replace(c, index=i) for i, c in enumerate(candidates))
        self.source = source
        # campaign id -> its money terms, for the campaigns that declare any (bidder.ledger reads them)
        self.terms: dict[str, CampaignTerms] = {t.campaign_id: t for t in terms}
        by_size: dict[tuple[int, int], list[Candidate]] = {}
        for c in self.candidates:
            by_size.setdefault((c.w, c.h), []).append(c)
        self._by_size = {size: tuple(cs) for size, cs in by_size.items()}
        # per size the advertiser domains of its candidates: a request's badv that names none of them (the common
        # case: exchanges block by publisher settings, whatever the bidder's catalog) removes nothing
        self._adomains = {size: frozenset(d for c in cs for d in c.adomain) for size, cs in self._by_size.items()}
        self._unblocked: dict[tuple, tuple[Candidate, ...]] = {}  # (size, badv) -> what that badv leaves
        # (size, deal id) -> the candidates whose campaign buys that deal: retrieval never cuts a deal's buyers
        by_deal: dict[tuple[int, int, str], list[Candidate]] = {}
        for c in self.candidates:
            for deal in c.deals:
                by_deal.setdefault((c.w, c.h, deal.dealid), []).append(c)
        self._by_deal = {key: tuple(cs) for key, cs in by_deal.items()}
        # without domain or exchange targeting a size's candidates are all eligible: the common case
        # then hands out the precomputed tuple instead of filtering it per request
        self.targeted = any(c.domains is not None or c.exchanges is not None for c in self.candidates)
        # -- conformance: the blocking rules' per-value candidate sets, the sizes flexible formats choose from, and
        # the currency table read with the catalog
        self.blocking = BlockingIndex(self.candidates)
        self.size_list = tuple(self._by_size)
        self.currencies = currencies if currencies is not None else default_currencies()

    def __len__(self) -> int:
        return len(self.candidates)

    def creative(self, creative_id: str) -> Candidate | None:
        """The candidate of a creative id (a click's landing page), or None when the catalog has none."""
        by_id = self.__dict__.get("_by_creative")
        if by_id is None:
            by_id = self._by_creative = {c.creative_id: c for c in self.candidates}
        return by_id.get(creative_id)

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
        if self.targeted:
            return tuple(c for c in candidates if c.runs_on(domain, exchange, blocked))
        if not blocked or blocked.isdisjoint(self._adomains.get((w, h), ())):
            return candidates
        key = (w, h, blocked)
        found = self._unblocked.get(key)
        if found is None:  # the same publishers' lists come back again and again
            if len(self._unblocked) >= _REMEMBERED_BADV:
                self._unblocked.clear()
            found = self._unblocked[key] = tuple(c for c in candidates if c.runs_on(domain, exchange, blocked))
        return found


# -- the file's schema: msgspec checks types, required and unknown keys; errors are translated below -------
_NonEmptyText = Annotated[str, Meta(min_length=1)]
_Positive = Annotated[int, Meta(gt=0)]


class _Deal(Struct, forbid_unknown_fields=True):
    dealid: _NonEmptyText
    seat: _NonEmptyText | None = None


class _Targeting(Struct, forbid_unknown_fields=True):
    sizes: list[tuple[_Positive, _Positive]] | None = None
    domains: list[str] | None = None
    exchanges: list[str] | None = None


class _Creative(Struct, forbid_unknown_fields=True):
    id: _NonEmptyText
    w: _Positive
    h: _Positive
    adomain: Annotated[list[_NonEmptyText], Meta(min_length=1)]
    nurl: _NonEmptyText | None = None
    markup: _NonEmptyText | None = None
    click_url: _NonEmptyText | None = None
    # -- creative metadata (bidder/conformance.py; values checked in _creative_meta)
    cat: list[_NonEmptyText] | None = None
    cattax: int = CONTENT_TAXONOMY_1
    attr: list[int] | None = None
    btype: int | None = None
    mimes: list[_NonEmptyText] | None = None
    api: list[int] | None = None
    bundle: _NonEmptyText | None = None


# campaign money terms
_Usd = Annotated[float, Meta(gt=0, lt=1e9)]


class _Budget(Struct, forbid_unknown_fields=True):
    total: _Usd | None = None
    daily: _Usd | None = None
    timezone: _NonEmptyText = "UTC"


class _Flight(Struct, forbid_unknown_fields=True):
    start: _NonEmptyText | None = None
    end: _NonEmptyText | None = None


class _FrequencyCap(Struct, forbid_unknown_fields=True):
    count: _Positive
    seconds: _Positive
    scope: Literal["campaign", "creative"] = "campaign"


class _Campaign(Struct, forbid_unknown_fields=True):
    id: _NonEmptyText
    advertiser: Annotated[int, Meta(ge=0)]
    value_per_click: Annotated[float, Meta(gt=0, lt=1e6)]
    creatives: Annotated[list[_Creative], Meta(min_length=1)]
    name: str | None = None
    enabled: bool = True
    targeting: _Targeting | None = None
    deals: list[_Deal] | None = None
    # -- conformance: the campaign bids only where the user consented to personal data (bidder/privacy.py)
    requires_consent: bool = False
    # campaign money terms
    budget: _Budget | None = None
    flight: _Flight | None = None
    pacing: Literal["even", "asap"] | None = None
    max_cpm: _Usd | None = None
    frequency_cap: list[_FrequencyCap] | None = None


class _CatalogText(Struct, forbid_unknown_fields=True):
    """A catalog file with each campaign left undecoded: ``load_catalog`` decodes them one per call."""
    campaigns: list[msgspec.Raw]


_text_decoder = msgspec.json.Decoder(_CatalogText)
_campaign_decoder = msgspec.json.Decoder(_Campaign)

# What an entry that breaks the schema is told, by where it is (list positions as []). An error below one of
# these places (an element of ``adomain``, a pair of ``sizes``) is reported at it.
_NON_EMPTY_TEXT = "expected a non-empty string, got {value!r}"
_MESSAGES = {
    "": "expected an object with a 'campaigns' list",
    "campaigns": "expected an object with a 'campaigns' list",
    "campaigns[]": "expected an object",
    "campaigns[].id": _NON_EMPTY_TEXT,
    "campaigns[].advertiser": "expected a non-negative integer, got {value!r}",
    "campaigns[].value_per_click": "expected a positive number of USD, got {value!r}",
    "campaigns[].name": "expected a string, got {value!r}",
    "campaigns[].enabled": "expected true or false, got {value!r}",
    "campaigns[].targeting": "expected an object",
    "campaigns[].targeting.sizes": "expected a list of [w, h] pairs",
    "campaigns[].targeting.domains": "expected a list of strings",
    "campaigns[].targeting.exchanges": "expected a list of strings",
    "campaigns[].deals": 'expected a list of {{"dealid": ..., "seat": ...}} objects',
    "campaigns[].deals[]": "expected an object",
    "campaigns[].deals[].dealid": _NON_EMPTY_TEXT,
    "campaigns[].deals[].seat": _NON_EMPTY_TEXT,
    "campaigns[].creatives": "expected a non-empty list",
    "campaigns[].creatives[]": "expected an object",
    "campaigns[].creatives[].id": _NON_EMPTY_TEXT,
    "campaigns[].creatives[].w": "w and h must be positive integers, got {w!r} x {h!r}",
    "campaigns[].creatives[].h": "w and h must be positive integers, got {w!r} x {h!r}",
    "campaigns[].creatives[].adomain": "expected a non-empty list of domains",
    "campaigns[].creatives[].nurl": _NON_EMPTY_TEXT,
    "campaigns[].creatives[].markup": _NON_EMPTY_TEXT,
    "campaigns[].creatives[].click_url": _NON_EMPTY_TEXT,
    # -- creative metadata
    "campaigns[].requires_consent": "expected true or false, got {value!r}",
    "campaigns[].creatives[].cat": "expected a list of category ids (strings), got {value!r}",
    "campaigns[].creatives[].cattax": "expected a category taxonomy id (integer), got {value!r}",
    "campaigns[].creatives[].attr": "expected a list of creative attribute ids (integers), got {value!r}",
    "campaigns[].creatives[].btype": "expected a banner type id (integer), got {value!r}",
    "campaigns[].creatives[].mimes": "expected a list of MIME types (strings), got {value!r}",
    "campaigns[].creatives[].api": "expected a list of API framework ids (integers), got {value!r}",
    "campaigns[].creatives[].bundle": _NON_EMPTY_TEXT,
    # campaign money terms
    "campaigns[].budget": 'expected an object such as {{"daily": 250.0, "total": 5000.0, "timezone": "UTC"}}',
    "campaigns[].budget.total": "expected a positive number of USD (below 10^9), got {value!r}",
    "campaigns[].budget.daily": "expected a positive number of USD (below 10^9), got {value!r}",
    "campaigns[].budget.timezone": "expected an IANA time zone name such as America/New_York, got {value!r}",
    "campaigns[].flight": 'expected an object such as {{"start": "2026-12-01T00:00:00Z", "end": ...}}',
    "campaigns[].flight.start": "expected an ISO 8601 time such as 2026-12-01T00:00:00Z, got {value!r}",
    "campaigns[].flight.end": "expected an ISO 8601 time such as 2026-12-31T00:00:00Z, got {value!r}",
    "campaigns[].pacing": "expected 'even' or 'asap', got {value!r}",
    "campaigns[].max_cpm": "expected a positive bid price (CPM, USD), got {value!r}",
    "campaigns[].frequency_cap": 'expected a list of {{"count": ..., "seconds": ..., "scope": ...}} objects',
    "campaigns[].frequency_cap[]": "expected an object",
    "campaigns[].frequency_cap[].count": "expected a positive integer of impressions, got {value!r}",
    "campaigns[].frequency_cap[].seconds": "expected a positive integer of seconds, got {value!r}",
    "campaigns[].frequency_cap[].scope": "expected 'campaign' or 'creative', got {value!r}",
}
#: places whose message is about their object as a whole (named by the object's path)
_REPORTED_ON_THE_OBJECT = frozenset({"campaigns", "campaigns[].creatives[].w", "campaigns[].creatives[].h"})
_OBJECTS = {"": _CatalogText, "campaigns[]": _Campaign, "campaigns[].targeting": _Targeting,
            "campaigns[].deals[]": _Deal, "campaigns[].creatives[]": _Creative,
            # campaign money terms
            "campaigns[].budget": _Budget, "campaigns[].flight": _Flight,
            "campaigns[].frequency_cap[]": _FrequencyCap}
_ERROR = re.compile(r"(?P<message>.*?)(?: - at `\$(?P<path>.*)`)?")
_STEP = re.compile(r"\.(\w+)|\[(\d+)\]")
_FIELD = re.compile(r"Object (?P<kind>missing required|contains unknown) field `(?P<field>\w+)`")
_BYTE = re.compile(r" \(byte (\d+)\)$")


def load_catalog(path: str | os.PathLike) -> Catalog:
    """The catalog of a file, with the currency table beside it (``bidder.currencies.currencies_beside``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CatalogError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogError(f"{path}: cannot read: {exc}") from None
    try:
        currencies = load_currencies(currencies_beside(path))
    except CurrencyError as exc:
        raise CatalogError(str(exc)) from None
    return decode_catalog(text, str(path), currencies)


def decode_catalog(text: str, origin: str = "catalog", currencies: Currencies | None = None) -> Catalog:
    """The catalog a file's ``text`` describes (``currencies``: the shipped table when None); error messages begin
    with ``origin``."""
    try:
        campaigns = _text_decoder.decode(text).campaigns
    except msgspec.ValidationError as exc:  # reported as such if the text is JSON at all
        raise _schema_error(exc, _json(text, origin), origin) from None
    except msgspec.DecodeError as exc:
        raise _syntax_error(exc, text, origin) from None
    # One campaign per call: a reload builds the new catalog in a thread while the event loop serves, and
    # decoding a 100,000-creative file in one call would hold the GIL throughout (50 ms of CPU); between two
    # campaigns the interpreter can hand it to the serving thread.
    return _catalog((_decode_campaign(raw, i, origin) for i, raw in enumerate(campaigns)), origin, currencies)


def _decode_campaign(raw: msgspec.Raw, index: int, origin: str) -> _Campaign:
    try:
        return _campaign_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        # the campaign's value where the whole file's would hold it, for the message's "got ..."
        raise _schema_error(exc, {"campaigns": {index: msgspec.json.decode(raw)}}, origin,
                            f".campaigns[{index}]") from None


def _catalog(campaigns: Iterable[_Campaign], origin: str, currencies: Currencies | None = None) -> Catalog:
    """The candidates of schema-checked ``campaigns``, after the rules a schema cannot say."""
    candidates: list[Candidate] = []
    terms: list[CampaignTerms] = []
    seen: set[str] = set()
    seen_creatives: dict[str, str] = {}
    for i, campaign in enumerate(campaigns):
        where = f"campaigns[{i}]"
        if campaign.id in seen:
            raise CatalogError(f"{origin}: {where}.id: duplicate campaign id {campaign.id!r}")
        seen.add(campaign.id)
        campaign_terms = _terms(campaign, f"{origin}: {where}")
        if campaign_terms is not None:
            terms.append(campaign_terms)
        targeting = campaign.targeting or _Targeting()
        domains = None if targeting.domains is None else frozenset(targeting.domains)
        exchanges = None if targeting.exchanges is None else frozenset(targeting.exchanges)
        allowed_sizes = None if targeting.sizes is None else set(targeting.sizes)
        deals = _deals(campaign.deals or (), f"{origin}: {where}.deals")
        for j, creative in enumerate(campaign.creatives):
            cw = f"{where}.creatives[{j}]"
            creative_id = creative.id
            if creative_id in seen_creatives:  # crid must name one ad in win notices and reports
                raise CatalogError(f"{origin}: {cw}.id: creative {creative_id!r} is also in "
                                   f"{seen_creatives[creative_id]}")
            seen_creatives[creative_id] = cw
            nurl, markup = creative.nurl, creative.markup
            if nurl is None and markup is None:
                raise CatalogError(f"{origin}: {cw}: needs a nurl (win notice) or markup (served inline as adm)")
            if nurl is not None and AUCTION_PRICE_MACRO not in nurl:
                raise CatalogError(f"{origin}: {cw}.nurl: must carry {AUCTION_PRICE_MACRO} for the clearing price")
            click_url = creative.click_url
            if click_url is not None and (markup is None or click_url not in markup):
                raise CatalogError(f"{origin}: {cw}.click_url: the markup must link to it (with notices on, the "
                                   f"bidder routes that link through /click)")
            meta = _creative_meta(creative, campaign.requires_consent, f"{origin}: {cw}")
            w, h = creative.w, creative.h
            if not campaign.enabled or (allowed_sizes is not None and (w, h) not in allowed_sizes):
                continue
            layer = dict(zip(CANDIDATE_FIELDS, (creative_id, campaign.advertiser, w, h)))
            candidates.append(Candidate(
                campaign_id=campaign.id, advertiser=campaign.advertiser, creative_id=creative_id, w=w, h=h,
                adomain=tuple(creative.adomain), nurl=nurl, markup=markup, value_per_click=campaign.value_per_click,
                domains=domains, exchanges=exchanges, layer=layer, deals=deals, index=len(candidates),
                click_url=click_url, meta=meta))
    return Catalog(candidates, origin, currencies, terms)


# -- creative metadata: the values a schema cannot check, each error naming its path ------------------------
def _creative_meta(creative: _Creative, requires_consent: bool, where: str) -> CreativeMeta:
    if creative.cattax != CONTENT_TAXONOMY_1:
        raise CatalogError(f"{where}.cattax: taxonomy {creative.cattax} is not known: the catalog's categories are "
                           f"IAB Content Category Taxonomy 1.0 (cattax {CONTENT_TAXONOMY_1})")
    for k, category in enumerate(creative.cat or ()):
        if category not in IAB_CONTENT_1:
            raise CatalogError(f"{where}.cat[{k}]: unknown IAB content category {category!r} (cattax 1: "
                               f"IAB1 .. IAB26, subcategories such as IAB7-39)")
    _known(creative.attr, ATTRIBUTES, f"{where}.attr", "creative attribute")
    _known(creative.api, API_FRAMEWORKS, f"{where}.api", "API framework")
    if creative.btype is not None and creative.btype not in BANNER_TYPES:
        raise CatalogError(f"{where}.btype: unknown banner type {creative.btype} (expected "
                           f"{BANNER_TYPES.start}-{BANNER_TYPES.stop - 1})")
    for k, mime in enumerate(creative.mimes or ()):
        kind, slash, subtype = mime.partition("/")
        if not (kind and slash and subtype) or " " in mime:
            raise CatalogError(f"{where}.mimes[{k}]: expected a MIME type such as image/png, got {mime!r}")
    return CreativeMeta.of(creative.cat, creative.cattax, creative.attr, creative.btype, creative.mimes, creative.api,
                           creative.bundle, requires_consent)


def _known(values: list[int] | None, known: range, where: str, what: str) -> None:
    for k, value in enumerate(values or ()):
        if value not in known:
            raise CatalogError(f"{where}[{k}]: unknown {what} {value} (expected {known.start}-{known.stop - 1})")



# -- campaign money terms: the rules a schema cannot say ---------------------------------------------------------
def _terms(campaign: _Campaign, where: str) -> CampaignTerms | None:
    """The campaign's money terms, or None when it declares none."""
    budget, flight = campaign.budget, campaign.flight
    if (budget is None and flight is None and campaign.pacing is None and campaign.max_cpm is None
            and not campaign.frequency_cap):
        return None
    total = daily = None
    zone = ZoneInfo("UTC")
    if budget is not None:
        if budget.total is None and budget.daily is None:
            raise CatalogError(f"{where}.budget: needs a total or a daily amount (USD), or both")
        total, daily = budget.total, budget.daily
        try:
            zone = ZoneInfo(budget.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise CatalogError(f"{where}.budget.timezone: unknown time zone {budget.timezone!r} (an IANA name such "
                               f"as America/New_York)") from None
    start = end = None
    if flight is not None:
        start, end = (_flight_time(text, f"{where}.flight.{key}") for key, text in
                      (("start", flight.start), ("end", flight.end)))
        if start is not None and end is not None and end <= start:
            raise CatalogError(f"{where}.flight: ends ({flight.end}) before it starts ({flight.start})")
    pacing = campaign.pacing or "asap"
    if pacing == "even" and daily is None:
        raise CatalogError(f"{where}.pacing: 'even' spreads a daily budget over the day: set budget.daily")
    caps = tuple(FrequencyCap(cap.count, cap.seconds, cap.scope) for cap in campaign.frequency_cap or ())
    return CampaignTerms(campaign.id, total_usd=total, daily_usd=daily, timezone=zone, start=start, end=end,
                         pacing=pacing, max_cpm=campaign.max_cpm, frequency_caps=caps)


def _flight_time(text: str | None, where: str) -> float | None:
    if text is None:
        return None
    try:
        return parse_time(text)
    except ValueError as exc:
        raise CatalogError(f"{where}: {exc}") from None


def _deals(entries: Iterable[_Deal], where: str) -> tuple[CampaignDeal, ...]:
    deals: dict[str, CampaignDeal] = {}
    for k, deal in enumerate(entries):
        if deal.dealid in deals:
            raise CatalogError(f"{where}[{k}].dealid: duplicate deal {deal.dealid!r}")
        deals[deal.dealid] = CampaignDeal(deal.dealid, deal.seat)
    return tuple(deals.values())


def _schema_error(exc: msgspec.ValidationError, data: Any, origin: str, prefix: str = "") -> CatalogError:
    """msgspec's ``exc`` (``Expected `int`, got `str` - at `$.campaigns[0].advertiser```) in the catalog's words,
    naming the entry as ``campaigns[0].advertiser``, with the offending value read from ``data``."""
    found = _ERROR.fullmatch(str(exc))
    steps: list[str | int] = [name or int(index) for name, index in _STEP.findall(prefix + (found["path"] or ""))]
    field = _FIELD.match(found["message"])
    if field and field["kind"] == "contains unknown":  # named by the object that has it
        place = _place(steps)
        allowed = set(_OBJECTS[place].__struct_fields__)
        unknown = sorted(set(_value(data, steps)) - allowed)
        return CatalogError(f"{_where(origin, steps)}: unknown keys {unknown} (allowed: {sorted(allowed)})")
    if field:  # a required key is missing: it is reported as its value, None
        steps.append(field["field"])
    while _place(steps) not in _MESSAGES:  # inside a list or pair that has one message for all of it
        steps.pop()
    place = _place(steps)
    value = _value(data, steps)
    if place in _REPORTED_ON_THE_OBJECT:
        steps.pop()
    message = _MESSAGES[place].format(value=value, w=_value(data, [*steps, "w"]), h=_value(data, [*steps, "h"]))
    return CatalogError(f"{_where(origin, steps)}: {message}")


def _place(steps: list[str | int]) -> str:
    return "".join("[]" if isinstance(s, int) else f".{s}" for s in steps).lstrip(".")


def _where(origin: str, steps: list[str | int]) -> str:
    path = "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in steps).lstrip(".")
    return f"{origin}: {path}" if path else origin


def _value(data: Any, steps: list[str | int]) -> Any:
    """What ``data`` holds at ``steps``; None where it holds nothing."""
    for step in steps:
        try:
            data = data[step]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _json(text: str, origin: str) -> Any:
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise _syntax_error(exc, text, origin) from None


def _syntax_error(exc: msgspec.DecodeError, text: str, origin: str) -> CatalogError:
    """``exc`` (``JSON is malformed: ... (byte 17)``) as the line and column of ``text`` it happened at."""
    message = str(exc).removeprefix("JSON is malformed: ")
    at = _BYTE.search(message)
    encoded = text.encode("utf-8")
    offset = int(at[1]) if at else len(encoded)  # without a position: the text ended too early
    before = encoded[:offset].decode("utf-8", errors="replace")
    line = before.count("\n") + 1
    column = len(before) - (before.rfind("\n") + 1) + 1
    message = message[:at.start()] if at else message
    return CatalogError(f"{origin}: invalid JSON at line {line} column {column}: {message}")

"""OpenRTB blocking rules against the catalog's creative metadata: which candidates a request excludes, and why.

A creative declares what it is (``cat`` under ``cattax``, ``attr``, banner type ``btype``, ``mimes``, the ``api``
frameworks it needs, the app ``bundle`` it installs) and its campaign whether it needs consent to personal data
(``requires_consent``); ``bidder/campaigns.py`` validates them at load. Here, once per catalog, each value becomes
the set of candidate positions that carry it (``BlockingIndex``), so a request's rules cost a few set unions
over the values it names (remembered, as exchanges repeat their lists), never a pass over the creatives:

==================  ======================================================================  =======================
request field       excluded candidates                                                      no-bid reason
==================  ======================================================================  =======================
``bseat``/``wseat`` the bidder's own seat blocked: only deal bids through an allowed seat    ``blocked_seat``
``bcat``            a category (or its tier-1 parent) listed, under ``cattax`` 1              ``blocked_category``
``bcat`` + other    every categorised creative: its categories cannot be compared            ``unknown_cattax``
``bapp``            an app-install creative of a listed bundle                               ``blocked_app``
no consent          a campaign with ``requires_consent`` (``bidder/privacy.py``)             ``requires_consent``
``banner.battr``    a creative with a listed attribute                                       ``blocked_attribute``
``banner.btype``    a creative of a listed banner type                                       ``blocked_banner_type``
``banner.mimes``    a creative with a MIME type the slot does not list                       ``unsupported_mime``
``banner.api``      a creative needing an API the slot does not list (absent: none)          ``unsupported_api``
==================  ======================================================================  =======================

An imp left without candidates by these rules is counted under the rule that removed the last of them (in the
order of the table). ``badv`` stays with the targeting (``Candidate.runs_on``), as before.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

__all__ = ["API_FRAMEWORKS", "ATTRIBUTES", "BANNER_TYPES", "CONTENT_TAXONOMY_1", "IAB_CONTENT_1", "NOTHING_EXCLUDED",
           "NO_META", "NO_RULES", "REMEMBERED", "TAXONOMY_FILE", "BlockingIndex", "CreativeMeta", "Exclusion",
           "RequestRules", "Seats", "content_categories", "exclude"]

#: ``cattax`` 1: the IAB Content Category Taxonomy 1.0 (OpenRTB 2.5 list 5.1), the one taxonomy shipped
CONTENT_TAXONOMY_1 = 1
TAXONOMY_FILE = Path(__file__).parent / "taxonomy" / "iab-content-1.0.tsv"
#: OpenRTB 2.5 list 5.3 (Creative Attributes), 5.2 (Banner Ad Types), 5.6 (API Frameworks, 2.6: 1-8)
ATTRIBUTES = range(1, 18)
BANNER_TYPES = range(1, 5)
API_FRAMEWORKS = range(1, 9)


def content_categories(path: Path = TAXONOMY_FILE) -> dict[str, str]:
    """The taxonomy's ids and names (a tab-separated file; ``#`` lines are comments)."""
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            category, _, name = line.partition("\t")
            out[category] = name
    return out


IAB_CONTENT_1 = frozenset(content_categories())


def tier1(category: str) -> str:
    """``IAB7-39`` → ``IAB7``: a block of the tier-1 category covers its subcategories."""
    return category.partition("-")[0]


@dataclass(frozen=True, slots=True)
class CreativeMeta:
    """What a creative is, as the blocking rules and the bid read it (validated by the catalog)."""
    cat: tuple[str, ...] = ()
    cattax: int = CONTENT_TAXONOMY_1
    attr: tuple[int, ...] = ()
    btype: int | None = None
    mimes: frozenset[str] = frozenset()
    api: frozenset[int] = frozenset()
    bundle: str | None = None
    requires_consent: bool = False
    # the bid's fields, built once (msgspec encodes them as they are; nothing mutates them)
    bid_cat: list[str] | None = field(default=None, compare=False)
    bid_attr: list[int] | None = field(default=None, compare=False)

    @classmethod
    def of(cls, cat: Sequence[str] | None, cattax: int, attr: Sequence[int] | None, btype: int | None,
           mimes: Sequence[str] | None, api: Sequence[int] | None, bundle: str | None,
           requires_consent: bool) -> CreativeMeta:
        cat_t = tuple(dict.fromkeys(cat or ()))
        attr_t = tuple(dict.fromkeys(attr or ()))
        return cls(cat_t, cattax, attr_t, btype, frozenset(mimes or ()), frozenset(api or ()), bundle,
                   requires_consent, list(cat_t) or None, list(attr_t) or None)


NO_META = CreativeMeta()


class Seats(NamedTuple):
    """A request's ``bseat``/``wseat``: which buyer seats may bid."""
    bseat: frozenset[str]
    wseat: frozenset[str] | None

    def allows(self, seat: str) -> bool:
        return seat not in self.bseat and (self.wseat is None or seat in self.wseat)

    @classmethod
    def of(cls, bseat: Iterable[str] | None, wseat: Iterable[str] | None) -> Seats:
        return cls(frozenset(bseat or ()), None if wseat is None else frozenset(wseat))


class Exclusion:
    """The candidates a request (and imp) exclude: ``rules`` as (reason, candidate positions), ``excluded`` their
    union. ``kept`` remembers what is left of each tuple of candidates it met: the same few rule sets (remembered by
    ``BlockingIndex``) meet the same few tuples (a size's candidates, handed out as they are without targeting)."""

    __slots__ = ("rules", "excluded", "_kept")

    def __init__(self, rules: tuple[tuple[str, frozenset[int]], ...], excluded: frozenset[int]):
        self.rules = rules
        self.excluded = excluded
        self._kept: dict[int, tuple[Sequence, Sequence]] = {}  # id of a candidate tuple -> (it, what is kept)

    def __repr__(self) -> str:
        return f"Exclusion(rules={self.rules!r}, excluded={self.excluded!r})"

    def extended(self, more: Sequence[tuple[str, frozenset[int]]]) -> Exclusion:
        if not more:
            return self
        excluded = self.excluded.union(*(positions for _, positions in more))
        return Exclusion(self.rules + tuple(more), excluded)

    def kept(self, candidates: Sequence) -> Sequence:
        """``exclude(candidates, self.excluded)``, remembered (the tuple is held with its id, so the id is not
        reused while remembered)."""
        found = self._kept.get(id(candidates))
        if found is not None and found[0] is candidates:
            return found[1]
        kept = exclude(candidates, self.excluded)
        if len(self._kept) >= KEPT_REMEMBERED:
            self._kept.clear()
        self._kept[id(candidates)] = (candidates, kept)
        return kept

    def reason(self, candidates: Sequence) -> str:
        """The rule that removed the last of ``candidates`` (all of which this excludes)."""
        left = list(candidates)
        for reason, positions in self.rules:
            left = [c for c in left if c.index not in positions]
            if not left:
                return reason
        raise AssertionError("the candidates are not all excluded")


#: candidate tuples an exclusion remembers what it keeps of (a catalog's sizes; targeting builds new ones)
KEPT_REMEMBERED = 256
NOTHING_EXCLUDED = Exclusion((), frozenset())


class RequestRules(NamedTuple):
    """What a request's own fields decide for every imp of it (``BlockingIndex.request``)."""
    seats: Seats | None       # its ``bseat``/``wseat``, when it has either
    seat_ok: bool             # the bidder's own seat may bid (else only deal bids through an allowed seat)
    exclusion: Exclusion      # the request-level rules (``bcat``, ``bapp``, no consent)
    blocked: frozenset[str]   # ``badv``: advertisers blocked (the targeting reads it, ``Catalog.eligible``)


NO_RULES = RequestRules(None, True, NOTHING_EXCLUDED, frozenset())


def exclude(candidates: Sequence, excluded: frozenset[int]) -> Sequence:
    """``candidates`` without the excluded positions (the same tuple when none of them is)."""
    kept = tuple(c for c in candidates if c.index not in excluded)
    return candidates if len(kept) == len(candidates) else kept


def _index(pairs: Iterable[tuple[object, int]]) -> dict:
    out: dict[object, set[int]] = {}
    for key, position in pairs:
        out.setdefault(key, set()).add(position)
    return {key: frozenset(positions) for key, positions in out.items()}


_EMPTY: frozenset[int] = frozenset()


class BlockingIndex:
    """Per value of the creatives' metadata, the positions of the candidates that carry it (built at load)."""

    def __init__(self, candidates: Sequence):
        metas = [(c.index, c.meta) for c in candidates]
        self.by_category = _index((category, i) for i, m in metas if m.cattax == CONTENT_TAXONOMY_1
                                  for category in {*m.cat, *map(tier1, m.cat)})
        self.categorised = frozenset(i for i, m in metas if m.cat)
        self.by_bundle = _index((m.bundle, i) for i, m in metas if m.bundle is not None)
        self.consent_required = frozenset(i for i, m in metas if m.requires_consent)
        self.by_attribute = _index((a, i) for i, m in metas for a in m.attr)
        self.by_btype = _index((m.btype, i) for i, m in metas if m.btype is not None)
        self.by_mime = _index((mime, i) for i, m in metas for mime in m.mimes)
        self.by_api = _index((api, i) for i, m in metas for api in m.api)
        self.needs_api = bool(self.by_api)  # some creative needs an API framework: every slot is checked for it
        self._requests: dict[tuple, RequestRules] = {}  # the rules' answers, by the lists that asked
        self._imps: dict[tuple, Exclusion] = {}

    def _any(self, index: dict, values: Iterable) -> frozenset[int]:
        found = [index[v] for v in values if v in index]
        return found[0] if len(found) == 1 else _EMPTY.union(*found)

    def request(self, request, personal_ok: bool, own_seat: str) -> RequestRules:
        """What ``request``'s seats and request-level rules decide for the bidder's ``own_seat``, with its personal
        data usable or not (``NO_RULES`` when it has no such field and ``personal_ok``). An exchange sends the same
        lists again and again (a publisher's settings), so the answer is remembered by them."""
        if (personal_ok and request.bcat is None and request.bapp is None and request.bseat is None
                and request.wseat is None and request.badv is None):
            return NO_RULES
        key = (request.bcat, request.cattax, request.bapp, request.bseat, request.wseat, request.badv, personal_ok,
               own_seat)
        found = self._requests.get(key)
        if found is None:
            found = _remember(self._requests, key, self._request(request, personal_ok, own_seat))
        return found

    def _request(self, request, personal_ok: bool, own_seat: str) -> RequestRules:
        seats = Seats.of(request.bseat, request.wseat) if request.bseat or request.wseat else None
        return RequestRules(seats, seats is None or seats.allows(own_seat),
                            self._request_rules(request.bcat, request.cattax, request.bapp, personal_ok),
                            frozenset(request.badv or ()))

    def imp_rules(self, exclusion: Exclusion, banner) -> Exclusion:
        """``exclusion`` extended by the rules of one banner (``battr``, ``btype``, ``mimes``, ``api``); remembered as
        the request's rules are."""
        key = (exclusion, banner.battr, banner.btype, banner.mimes, banner.api)  # an exclusion hashes by identity
        found = self._imps.get(key)
        if found is None:
            found = _remember(self._imps, key, exclusion.extended(self._banner_rules(banner)))
        return found

    def _request_rules(self, bcat: Sequence[str] | None, cattax: int, bapp: Sequence[str] | None,
                       personal_ok: bool) -> Exclusion:
        rules = []
        if bcat:
            if cattax == CONTENT_TAXONOMY_1:
                rules.append(("blocked_category", self._any(self.by_category, bcat)))
            else:  # categories of a taxonomy the catalog does not use cannot be compared: brand safety first
                rules.append(("unknown_cattax", self.categorised))
        if bapp:
            rules.append(("blocked_app", self._any(self.by_bundle, bapp)))
        if not personal_ok and self.consent_required:
            rules.append(("requires_consent", self.consent_required))
        rules = [rule for rule in rules if rule[1]]
        return NOTHING_EXCLUDED.extended(rules) if rules else NOTHING_EXCLUDED

    def _banner_rules(self, banner) -> list[tuple[str, frozenset[int]]]:
        rules = []
        if banner.battr:
            rules.append(("blocked_attribute", self._any(self.by_attribute, banner.battr)))
        if banner.btype:
            rules.append(("blocked_banner_type", self._any(self.by_btype, banner.btype)))
        if banner.mimes:
            supported = set(banner.mimes)
            rules.append(("unsupported_mime", self._any(self.by_mime, [m for m in self.by_mime if m not in supported])))
        if self.by_api:  # a slot without ``api`` supports none (OpenRTB: unlisted means unsupported)
            supported = set(banner.api or ())
            rules.append(("unsupported_api", self._any(self.by_api, [a for a in self.by_api if a not in supported])))
        return [rule for rule in rules if rule[1]]


#: distinct rule lists remembered per catalog; past it the memory starts again (a flood of distinct lists costs
#: the unions it would cost anyway, never memory)
REMEMBERED = 4096


def _remember(cache: dict, key: tuple, value):
    if len(cache) >= REMEMBERED:
        cache.clear()
    cache[key] = value
    return value

"""OpenRTB 2.5 / 2.6 and ``/predict`` records at the edge: typed decoding, mapping to raw records, encoding.

Only the OpenRTB fields the bidder reads are declared; everything else is ignored (as both versions
require of bidders). ``/predict`` records are strict: the raw iPinYou columns and ``timestamp`` only.
Errors name the cause (invalid JSON, a schema error, bytes that are not UTF-8) and the JSON path of the
offending value (``$.imp[0].banner.w``, ``$.records[3].hour``). The structs are ``gc=False``: they hold
strings, numbers and other structs, never a cycle, so the cyclic collector need not track the dozen
objects every request decodes into.
"""
from __future__ import annotations

import json
import re
import time
from typing import Annotated, Any, Iterable

import msgspec

__all__ = [
    "BANNER", "BidRequest", "BidResponse", "Bid", "DEFAULT_SEAT", "FIRST_PRICE", "SECOND_PRICE", "Deal", "Imp", "Pmp", "SeatBid", "RequestError", "USD_TO_CNY",
    "PredictRecord", "decode_json", "decode_predict", "decode_request", "encode_response", "imp_sizes",
    "request_fields", "imp_fields", "user_key",
    "slotprice_from_usd_cpm", "MAX_SLOTPRICE_FEN",
]

#: iPinYou prices (``slotprice``) are CNY fen (0.01 yuan) per thousand impressions; OpenRTB floors are
#: CPM in ``bidfloorcur``, converted to USD and then to CNY by the currency table (bidder/currencies.py). This
#: is the rate of the shipped table and the one training converts logged floors with.
USD_TO_CNY = 7.2
#: Floors above this many fen all land in the top price bucket; the cap keeps absurd floors (1e308)
#: from overflowing the integer conversion.
MAX_SLOTPRICE_FEN = 10**12

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class Format(msgspec.Struct, gc=False):
    w: int | None = None
    h: int | None = None
    # a flexible size (2.5+): any creative of aspect ratio ``wratio``:``hratio`` at least ``wmin`` wide
    wratio: int | None = None
    hratio: int | None = None
    wmin: int | None = None


class Banner(msgspec.Struct, gc=False):
    w: int | None = None
    h: int | None = None
    format: list[Format] | None = None
    pos: int | None = None
    # -- conformance (bidder/conformance.py): what the slot refuses or supports
    btype: tuple[int, ...] | None = None  # blocked banner types (list: Banner Ad Types)
    battr: tuple[int, ...] | None = None  # blocked creative attributes (list: Creative Attributes)
    mimes: tuple[str, ...] | None = None  # content MIME types supported
    api: tuple[int, ...] | None = None    # API frameworks supported (list: API Frameworks); absent: none
    wmin: int | None = None          # a size range instead of w/h (2.5, deprecated in 2.6 for format)
    wmax: int | None = None
    hmin: int | None = None
    hmax: int | None = None


class Present(msgspec.Struct, gc=False):
    """An object whose presence matters, not its content (video, native, audio: we bid banners only)."""


class Deal(msgspec.Struct, gc=False):
    """One deal of a private marketplace (``imp.pmp.deals[]``)."""
    id: NonEmpty
    bidfloor: Annotated[float, msgspec.Meta(ge=0)] | None = None  # None: the imp's floor applies
    bidfloorcur: str = "USD"
    at: int | None = None              # 3: ``bidfloor`` is the agreed (fixed) deal price
    wseat: list[str] | None = None     # buyer seats allowed to bid on the deal
    wadomain: list[str] | None = None  # advertiser domains allowed on the deal


class Pmp(msgspec.Struct, gc=False):
    private_auction: int = 0  # 1: only bids for one of ``deals`` are allowed
    deals: list[Deal] | None = None


class Imp(msgspec.Struct, gc=False):
    id: NonEmpty
    banner: Banner | None = None
    video: Present | None = None
    native: Present | None = None
    audio: Present | None = None
    tagid: str | None = None
    instl: int = 0
    bidfloor: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    bidfloorcur: str = "USD"
    pmp: Pmp | None = None
    exp: int | None = None  # seconds the exchange allows between auction and impression (notice window)


class Geo(msgspec.Struct, gc=False):
    region: str | None = None
    city: str | None = None


class Device(msgspec.Struct, gc=False):
    ua: str | None = None
    ifa: Any = None  # the advertising id: a user key of the event log (any JSON: a strange one is no 400)
    ip: str | None = None
    ipv6: str | None = None
    geo: Geo | None = None


class Site(msgspec.Struct, gc=False):
    domain: str | None = None
    page: str | None = None


class App(msgspec.Struct, gc=False):
    bundle: str | None = None
    domain: str | None = None


class Segment(msgspec.Struct, gc=False):
    id: str | None = None


class Data(msgspec.Struct, gc=False):
    segment: list[Segment] | None = None


class UserExt(msgspec.Struct, gc=False):
    consent: Any = None  # 2.5 and Prebid: the TCF consent string (2.6: ``user.consent``)


class User(msgspec.Struct, gc=False):
    id: Any = None        # the exchange's user id and ours (buyeruid): user keys of the event log (any JSON,
    buyeruid: Any = None  # as before they were read: a strange one is no 400)
    data: list[Data] | None = None
    consent: Any = None   # TCF v2 consent string (bidder/privacy.py; any JSON: one that is no string is no consent)
    ext: UserExt | None = None


class RegsExt(msgspec.Struct, frozen=True, gc=False):
    """2.5 and Prebid carry the privacy signals in ``regs.ext`` (2.6 moved them into ``regs``)."""
    gdpr: Any = None
    us_privacy: Any = None


class Regs(msgspec.Struct, frozen=True, gc=False):
    coppa: Any = None       # 1: the audience is children (COPPA)
    gdpr: Any = None        # 1: GDPR applies
    us_privacy: Any = None  # the IAB CCPA string ("1YNN")
    gpp: Any = None         # the IAB Global Privacy Platform string
    gpp_sid: Any = None     # the GPP sections in force
    ext: RegsExt | None = None


FIRST_PRICE, SECOND_PRICE = 1, 2
#: ``bid.mtype`` of a banner
BANNER = 1


class BidRequest(msgspec.Struct, gc=False):
    id: NonEmpty
    imp: list[Imp]
    site: Site | None = None
    app: App | None = None
    device: Device | None = None
    user: User | None = None
    tmax: Annotated[int, msgspec.Meta(ge=0)] | None = None
    cur: list[str] | None = None
    badv: tuple[str, ...] | None = None
    test: int = 0
    at: int = SECOND_PRICE  # auction type: 1 first price, 2 second price plus (the OpenRTB default)
    # -- conformance (bidder/conformance.py, bidder/privacy.py): blocking rules and privacy signals
    # tuples, not lists: the rules are remembered by these lists (bidder.conformance.BlockingIndex), as they are
    bcat: tuple[str, ...] | None = None  # blocked content categories, of taxonomy ``cattax``
    cattax: int = 1                 # 1: IAB Content Category Taxonomy 1.0 (the OpenRTB 2.6 default)
    bapp: tuple[str, ...] | None = None  # blocked app bundles (an app-install creative's ``bundle``)
    bseat: tuple[str, ...] | None = None  # buyer seats that may not bid
    wseat: tuple[str, ...] | None = None  # the only buyer seats that may bid
    regs: Regs | None = None


class Bid(msgspec.Struct, omit_defaults=True, gc=False):
    id: str
    impid: str
    price: float
    adid: str
    crid: str
    adomain: list[str]
    w: int
    h: int
    mtype: int  # markup type (OpenRTB 2.6): BANNER, the only kind bid
    nurl: str | None = None
    cid: str | None = None
    adm: str | None = None
    dealid: str | None = None
    burl: str | None = None  # billing notice (notices on: bidder/notices.py)
    lurl: str | None = None  # loss notice
    exp: int | None = None   # seconds the bid's notices are on time
    # -- conformance: what the creative is, so the exchange can check its own rules (OpenRTB 2.6)
    cat: list[str] | None = None
    cattax: int | None = None
    attr: list[int] | None = None


#: the buyer seat of bids that name no other (a deal may be bought through a campaign's own seat)
DEFAULT_SEAT = "bidder"


class SeatBid(msgspec.Struct, gc=False):
    bid: list[Bid]
    seat: str = DEFAULT_SEAT


class BidResponse(msgspec.Struct, gc=False):
    id: str
    seatbid: list[SeatBid]
    cur: str = "USD"


class RequestError(ValueError):
    """A request we refuse with HTTP 400: ``path`` is the JSON path of the offending value."""

    def __init__(self, message: str, path: str = "$"):
        super().__init__(message)
        self.message = message
        self.path = path


_decoder = msgspec.json.Decoder(BidRequest)
_encoder = msgspec.json.Encoder()


_AT = " - at `"
_FIELD_IN_MESSAGE = re.compile(r"^Object (?:missing required|contains unknown) field `(.*)`$")


def split_msgspec_error(exc: msgspec.MsgspecError) -> RequestError:
    """msgspec says ``Expected `int`, got `str` - at `$.imp[0].banner.w```: split message and path.

    A schema error (valid JSON of the wrong shape) keeps msgspec's message, its path extended by the
    missing or unknown field's name; a syntax error is ``invalid JSON: ...`` at ``$``.
    """
    text = str(exc)
    message, sep, where = text.rpartition(_AT)
    if sep and where.endswith("`"):
        path = where[:-1]
    else:
        message, path = text, "$"
    if isinstance(exc, msgspec.ValidationError):  # a subclass of DecodeError: test it first
        field = _FIELD_IN_MESSAGE.match(message)
        if field:
            path = f"{path}.{field.group(1)}"
        return RequestError(message, path)
    if isinstance(exc, msgspec.DecodeError):
        return RequestError(f"invalid JSON: {text}")
    return RequestError(text, path)


def decode_json(decoder: msgspec.json.Decoder, body: bytes) -> Any:
    """Typed decode; every way a body can be wrong becomes a RequestError naming the cause and the path."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise split_msgspec_error(exc) from None
    except msgspec.DecodeError as exc:  # a syntax error, unless bytes that are not UTF-8 came first
        raise utf8_error(body) or split_msgspec_error(exc) from None
    except UnicodeDecodeError:  # msgspec reports the offset within the string, not within the body
        raise utf8_error(body) or RequestError("request body is not valid UTF-8") from None


def utf8_error(body: bytes) -> RequestError | None:
    """The first byte of ``body`` that is not UTF-8, by body offset and the JSON path of the string holding it."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = exc.start
    else:
        return None
    path, in_key = _path_of_bad_string(body)
    where = "" if path is None else f" in {'a key of the object' if in_key else 'the string'} at {path}"
    return RequestError(f"request body is not valid UTF-8: byte 0x{body[offset]:02x} at offset {offset}{where}",
                        path or "$")


def _path_of_bad_string(body: bytes) -> tuple[str | None, bool]:
    """Where the first undecodable byte sits: surrogateescape keeps such bytes as U+DC80..U+DCFF."""
    try:
        document = json.loads(body.decode("utf-8", "surrogateescape"))
    except (ValueError, RecursionError):
        return None, False

    def bad(text: str) -> bool:
        return any("\udc80" <= ch <= "\udcff" for ch in text)

    def walk(node: Any, path: str) -> tuple[str, bool] | None:
        if isinstance(node, str):
            return (path, False) if bad(node) else None
        if isinstance(node, dict):
            for key, value in node.items():
                if bad(key):
                    return path, True
                found = walk(value, f"{path}.{key}")
                if found:
                    return found
        elif isinstance(node, list):
            for i, value in enumerate(node):
                found = walk(value, f"{path}[{i}]")
                if found:
                    return found
        return None

    found = walk(document, "$")
    return found if found else (None, False)


def decode_request(body: bytes) -> BidRequest:
    if not body:  # said plainly: msgspec would call it truncated JSON
        raise RequestError("empty request body")
    request = decode_json(_decoder, body)
    if request.at != SECOND_PRICE and request.at != FIRST_PRICE:
        raise RequestError(f"auction type {request.at} is not supported: expected 1 (first price) or 2 (second price)",
                           "$.at")
    if not request.imp:
        raise RequestError("a bid request needs at least one imp", "$.imp")
    if len(request.imp) > 1:  # bid ids and win notices are per imp id: two imps must not share one
        seen: dict[str, int] = {}
        for i, imp in enumerate(request.imp):
            first = seen.setdefault(imp.id, i)
            if first != i:
                raise RequestError(f"duplicate imp id {imp.id!r} (also $.imp[{first}].id)", f"$.imp[{i}].id")
    return request


# -- /predict ---------------------------------------------------------------------------------------------
# What a record may hold: what an iPinYou log line gives (strings) and what a mapper builds (ints, lists);
# null, an absent key and "" all mean missing. Anything else is refused with its path.
_OR_EMPTY = "|)$"
_Weekday = Annotated[int, msgspec.Meta(ge=0, le=6)] | Annotated[str, msgspec.Meta(pattern=r"^([0-6]" + _OR_EMPTY)]
_Hour = (Annotated[int, msgspec.Meta(ge=0, le=23)]
         | Annotated[str, msgspec.Meta(pattern=r"^([01]?[0-9]|2[0-3]" + _OR_EMPTY)])
_Number = int | float | Annotated[str, msgspec.Meta(
    pattern=r"^([+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?" + _OR_EMPTY)]
# yyyyMMddHHmmss[SSS], Unix seconds (a fraction allowed) or Unix milliseconds
_Timestamp = (Annotated[int, msgspec.Meta(ge=0)] | Annotated[float, msgspec.Meta(ge=0)]
              | Annotated[str, msgspec.Meta(pattern=r"^([0-9]+(\.[0-9]*)?" + _OR_EMPTY)])
_Id = int | str  # ids that logs write as digits and mappers as strings ("CA") or ints


class PredictRecord(msgspec.Struct, forbid_unknown_fields=True):
    """One ``/predict`` record: the raw iPinYou columns (``bidder.spec.RAW_FIELDS``) and ``timestamp``.

    ``timestamp`` gives weekday and hour when those are missing. Unknown keys are refused, so a misspelt
    field cannot silently score as missing.
    """
    weekday: _Weekday | None = None
    hour: _Hour | None = None
    timestamp: _Timestamp | None = None
    useragent: str | None = None
    IP: str | None = None
    region: _Id | None = None
    city: _Id | None = None
    adexchange: _Id | None = None
    domain: str | None = None
    url: str | None = None
    urlid: str | None = None
    slotid: _Id | None = None
    slotwidth: _Id | None = None
    slotheight: _Id | None = None
    slotvisibility: _Id | None = None
    slotformat: _Id | None = None
    slotprice: _Number | None = None  # CNY fen CPM
    creative: str | None = None
    advertiser: _Id | None = None
    usertag: list[_Id] | str | None = None  # a list, or the log's comma-separated string


class _PredictRequest(msgspec.Struct, forbid_unknown_fields=True):
    records: list[PredictRecord]


_predict_decoder = msgspec.json.Decoder(_PredictRequest)
# plain words for the constrained fields' errors (msgspec would quote the regular expression)
_EXPECTED = {
    "weekday": "expected a weekday 0-6 (Monday = 0), a number or a string of digits",
    "hour": "expected an hour 0-23, a number or a string of digits",
    "timestamp": "expected yyyyMMddHHmmss[SSS], Unix seconds or Unix milliseconds (a number or a string of digits)",
    "slotprice": "expected a number (CNY fen CPM) or a string holding one",
}


def decode_predict(body: bytes) -> list[dict[str, Any]]:
    """A ``/predict`` body's records as raw-record dicts (missing fields are None)."""
    try:
        request = decode_json(_predict_decoder, body)
    except RequestError as exc:
        field = exc.path.rpartition(".")[2]
        if exc.path.startswith("$.records[") and field in _EXPECTED and exc.message.startswith("Expected"):
            constrained = "matching regex" in exc.message or "=" in exc.message  # a pattern or a bound
            message = _EXPECTED[field] if constrained else f"{_EXPECTED[field]}: {exc.message}"
            raise RequestError(message, exc.path) from None
        raise
    return [msgspec.structs.asdict(record) for record in request.records]


def encode_response(response: BidResponse) -> bytes:
    return _encoder.encode(response)


def slotprice_from_usd_cpm(bidfloor: float, cny_per_usd: float = USD_TO_CNY) -> int:
    """OpenRTB floor (USD CPM) → iPinYou ``slotprice`` (CNY fen CPM) at the currency table's rate, rounded to
    whole fen."""
    fen = bidfloor * cny_per_usd * 100
    return MAX_SLOTPRICE_FEN if fen >= MAX_SLOTPRICE_FEN else int(round(fen))


# banner.pos (OpenRTB list 5.4 / 2.6 list: Ad Position) → iPinYou slotvisibility
_VISIBILITY = {1: "FirstView", 4: "FirstView", 7: "FirstView", 3: "SecondView", 2: "OtherView",
               5: "OtherView", 6: "OtherView"}


def user_key(request) -> str | None:
    """Who a request is for, as frequency caps and the event log count people: ``user.id``, else
    ``user.buyeruid``, else ``device.ifa``; None without any."""
    user, device = request.user, request.device
    key = (user.id or user.buyeruid) if user is not None else None
    if key is None and device is not None:
        key = device.ifa
    if key is not None and key.__class__ is not str:
        key = str(key)
    return key


def weekday_hour(seconds: float) -> tuple[int, int]:
    """``time.gmtime(seconds)``'s ``tm_wday`` (Monday 0) and ``tm_hour``, by integer arithmetic on whole hours
    since the epoch (a Thursday): a third of ``gmtime``'s cost, and no struct built per request."""
    hours = int(seconds // 3600)
    return (hours // 24 + 3) % 7, hours % 24


def request_fields(request: BidRequest, exchange: str | None, now: float | None = None,
                   utc_offset_hours: float = 0.0) -> dict[str, Any]:
    """The raw fields every imp of ``request`` shares."""
    weekday, hour = weekday_hour((time.time() if now is None else now) + utc_offset_hours * 3600)
    device = request.device
    geo = device.geo if device is not None else None
    site, app = request.site, request.app
    tags: list[str] = []
    if request.user is not None and request.user.data:
        for data in request.user.data:
            for segment in data.segment or ():
                if segment.id:
                    tags.append(segment.id)
    return {
        "weekday": weekday,
        "hour": hour,
        "useragent": device.ua if device is not None else None,
        "IP": (device.ip or device.ipv6) if device is not None else None,
        "region": geo.region if geo is not None else None,
        "city": geo.city if geo is not None else None,
        "adexchange": exchange,
        "domain": site.domain if site is not None else (app.bundle or app.domain if app is not None else None),
        "url": site.page if site is not None else None,
        "urlid": None,
        "usertag": tags,
    }


def imp_fields(shared: dict[str, Any], imp: Imp, floor_usd: float | None = None,
               cny_per_usd: float = USD_TO_CNY) -> dict[str, Any]:
    """One imp's record: the shared fields plus the slot's own (size comes from each candidate); ``floor_usd`` is
    the imp's floor in USD (``bidfloor`` converted from ``bidfloorcur``; None: ``bidfloor`` is USD)."""
    banner = imp.banner
    record = dict(shared)
    record["slotid"] = imp.tagid
    record["slotvisibility"] = _VISIBILITY.get(banner.pos, "Na") if banner is not None and banner.pos else "Na"
    record["slotformat"] = "1" if imp.instl else "0"
    record["slotprice"] = slotprice_from_usd_cpm(imp.bidfloor if floor_usd is None else floor_usd, cny_per_usd)
    return record


def imp_sizes(imp: Imp, available: Iterable[tuple[int, int]] = ()) -> list[tuple[int, int]]:
    """Sizes a banner imp accepts: ``format`` (2.5+) or else ``w``/``h``; zero sizes are none. A flexible format
    (``wratio``:``hratio``, at least ``wmin`` wide) and a banner's ``wmin``..``wmax`` x ``hmin``..``hmax`` range
    accept each of the ``available`` sizes (the catalog's) that fits them."""
    banner = imp.banner
    if banner is None:
        return []
    if not banner.format:
        if banner.w and banner.h:
            return [(banner.w, banner.h)]
        if banner.wmax or banner.hmax or banner.wmin or banner.hmin:
            return sorted(size for size in available if _in_range(banner, size))
        return []
    sizes = [(f.w, f.h) for f in banner.format if f.w and f.h]
    if len(sizes) < len(banner.format):  # some format has no fixed size: a flexible one, or an empty one
        sizes = []
        for f in banner.format:
            if f.w and f.h:
                sizes.append((f.w, f.h))
            elif f.wratio and f.hratio and f.wratio > 0 and f.hratio > 0:
                wmin = f.wmin or 0
                sizes.extend(sorted((w, h) for w, h in available if w * f.hratio == h * f.wratio and w >= wmin))
    if not sizes and banner.w and banner.h:
        sizes = [(banner.w, banner.h)]
    return list(dict.fromkeys(sizes))


def _in_range(banner: Banner, size: tuple[int, int]) -> bool:
    w, h = size
    return ((banner.wmin or 0) <= w <= (banner.wmax or w) and (banner.hmin or 0) <= h <= (banner.hmax or h))

"""OpenRTB 2.5 / 2.6 at the edge: typed decoding, mapping to raw records, response encoding.

Only the fields the bidder reads are declared; everything else is ignored (as both versions
require of bidders). Errors name the JSON path of the offending value (``$.imp[0].banner.w``).
"""
from __future__ import annotations

import time
from typing import Annotated, Any

import msgspec

__all__ = [
    "BidRequest", "BidResponse", "Bid", "DEFAULT_SEAT", "Deal", "Imp", "Pmp", "SeatBid", "RequestError", "USD_TO_CNY",
    "decode_json", "decode_request", "encode_response", "imp_sizes", "request_fields", "imp_fields",
    "slotprice_from_usd_cpm", "MAX_SLOTPRICE_FEN",
]

#: iPinYou prices (``slotprice``) are CNY fen (0.01 yuan) per thousand impressions; OpenRTB floors are
#: CPM in ``bidfloorcur`` (only USD is bid on). A fixed, documented rate keeps the feature on the scale
#: the model was trained on; FX drift only moves a floor within its coarse price bucket.
USD_TO_CNY = 7.2
#: Floors above this many fen all land in the top price bucket; the cap keeps absurd floors (1e308)
#: from overflowing the integer conversion.
MAX_SLOTPRICE_FEN = 10**12

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class Format(msgspec.Struct):
    w: int | None = None
    h: int | None = None


class Banner(msgspec.Struct):
    w: int | None = None
    h: int | None = None
    format: list[Format] | None = None
    pos: int | None = None


class Present(msgspec.Struct):
    """An object whose presence matters, not its content (video, native, audio: we bid banners only)."""


class Deal(msgspec.Struct):
    """One deal of a private marketplace (``imp.pmp.deals[]``)."""
    id: NonEmpty
    bidfloor: Annotated[float, msgspec.Meta(ge=0)] | None = None  # None: the imp's floor applies
    bidfloorcur: str = "USD"
    at: int | None = None              # 3: ``bidfloor`` is the agreed (fixed) deal price
    wseat: list[str] | None = None     # buyer seats allowed to bid on the deal
    wadomain: list[str] | None = None  # advertiser domains allowed on the deal


class Pmp(msgspec.Struct):
    private_auction: int = 0  # 1: only bids for one of ``deals`` are allowed
    deals: list[Deal] | None = None


class Imp(msgspec.Struct):
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


class Geo(msgspec.Struct):
    region: str | None = None
    city: str | None = None


class Device(msgspec.Struct):
    ua: str | None = None
    ip: str | None = None
    ipv6: str | None = None
    geo: Geo | None = None


class Site(msgspec.Struct):
    domain: str | None = None
    page: str | None = None


class App(msgspec.Struct):
    bundle: str | None = None
    domain: str | None = None


class Segment(msgspec.Struct):
    id: str | None = None


class Data(msgspec.Struct):
    segment: list[Segment] | None = None


class User(msgspec.Struct):
    data: list[Data] | None = None


class BidRequest(msgspec.Struct):
    id: NonEmpty
    imp: list[Imp]
    site: Site | None = None
    app: App | None = None
    device: Device | None = None
    user: User | None = None
    tmax: Annotated[int, msgspec.Meta(ge=0)] | None = None
    cur: list[str] | None = None
    badv: list[str] | None = None
    test: int = 0


class Bid(msgspec.Struct, omit_defaults=True):
    id: str
    impid: str
    price: float
    adid: str
    crid: str
    adomain: list[str]
    w: int
    h: int
    nurl: str | None = None
    cid: str | None = None
    adm: str | None = None
    dealid: str | None = None


#: the buyer seat of bids that name no other (a deal may be bought through a campaign's own seat)
DEFAULT_SEAT = "bidder"


class SeatBid(msgspec.Struct):
    bid: list[Bid]
    seat: str = DEFAULT_SEAT


class BidResponse(msgspec.Struct):
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


def split_msgspec_error(exc: msgspec.MsgspecError) -> RequestError:
    """msgspec says ``Expected `int`, got `str` - at `$.imp[0].banner.w```: split message and path."""
    text = str(exc)
    message, sep, where = text.rpartition(" - at `")
    if sep and where.endswith("`"):
        return RequestError(message, where[:-1])
    if isinstance(exc, msgspec.DecodeError):
        return RequestError(f"invalid JSON: {text}")
    return RequestError(text)


def decode_json(decoder: msgspec.json.Decoder, body: bytes) -> Any:
    """Typed decode; every way a body can be wrong becomes a RequestError naming the path."""
    try:
        return decoder.decode(body)
    except msgspec.MsgspecError as exc:
        raise split_msgspec_error(exc) from None
    except UnicodeDecodeError as exc:
        raise RequestError(f"request body is not valid UTF-8 (byte {exc.start})") from None


def decode_request(body: bytes) -> BidRequest:
    request = decode_json(_decoder, body)
    if not request.imp:
        raise RequestError("a bid request needs at least one imp", "$.imp")
    return request


def encode_response(response: BidResponse) -> bytes:
    return _encoder.encode(response)


def slotprice_from_usd_cpm(bidfloor: float) -> int:
    """OpenRTB floor (USD CPM) → iPinYou ``slotprice`` (CNY fen CPM), rounded to whole fen."""
    fen = bidfloor * USD_TO_CNY * 100
    return MAX_SLOTPRICE_FEN if fen >= MAX_SLOTPRICE_FEN else int(round(fen))


# banner.pos (OpenRTB list 5.4 / 2.6 list: Ad Position) → iPinYou slotvisibility
_VISIBILITY = {1: "FirstView", 4: "FirstView", 7: "FirstView", 3: "SecondView", 2: "OtherView",
               5: "OtherView", 6: "OtherView"}


def request_fields(request: BidRequest, exchange: str | None, now: float | None = None,
                   utc_offset_hours: float = 0.0) -> dict[str, Any]:
    """The raw fields every imp of ``request`` shares."""
    stamp = time.gmtime((time.time() if now is None else now) + utc_offset_hours * 3600)
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
        "weekday": stamp.tm_wday,
        "hour": stamp.tm_hour,
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


def imp_fields(shared: dict[str, Any], imp: Imp) -> dict[str, Any]:
    """One imp's record: the shared fields plus the slot's own (size comes from each candidate)."""
    banner = imp.banner
    record = dict(shared)
    record["slotid"] = imp.tagid
    record["slotvisibility"] = _VISIBILITY.get(banner.pos, "Na") if banner is not None and banner.pos else "Na"
    record["slotformat"] = "1" if imp.instl else "0"
    record["slotprice"] = slotprice_from_usd_cpm(imp.bidfloor)
    return record


def imp_sizes(imp: Imp) -> list[tuple[int, int]]:
    """Sizes a banner imp accepts: ``format`` (2.5+) or else ``w``/``h``; zero sizes are none."""
    banner = imp.banner
    if banner is None:
        return []
    if not banner.format:
        return [(banner.w, banner.h)] if banner.w and banner.h else []
    sizes = [(f.w, f.h) for f in banner.format if f.w and f.h]
    if not sizes and banner.w and banner.h:
        sizes = [(banner.w, banner.h)]
    return list(dict.fromkeys(sizes))

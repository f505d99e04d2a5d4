"""Notice tokens: what a bid's win, billing and loss notice URLs (and its click link) carry, and their checks.

A token holds the bid's facts itself, so checking one needs no server state: a version byte, the issue time
(milliseconds, on the engine's clock), the bid price in micro-units of its currency, the window the bid's
``exp`` announced (seconds), the signing key's id, then request id, imp id, bid id, seat, campaign, creative,
currency, exchange and model id (each UTF-8, prefixed by its length, two bytes), and last 16 bytes of
HMAC-SHA256 over everything before them with the key's secret. The URL carries it as base64url without padding.
Version 2 is version 1 without the bid id, for a bid whose id is ``<request id>-<imp id>`` (the bidder's own):
its four URLs (win, bill, loss, click) are then 55 characters shorter each. Both versions verify.

Keys come from a JSON file (``load_keyring``)::

    {"keys": [{"id": "2026-12", "secret": "<64 hex digits>", "created": "2026-12-01T00:00:00Z"}, ...]}

The newest key (by ``created``) signs; every key listed verifies, so a key is rotated by adding the new one,
restarting or reloading, and removing the old one once the longest window has passed. ``Keyring.verify``
answers the facts or the reason for refusing (``REFUSALS``); the HTTP routes live in ``bidder/app.py``.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import os
import secrets
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, NamedTuple

from bidder import _tokens
from bidder.clock import millis, parse_time

__all__ = ["NOTICE_QUERIES", "REFUSALS", "KeyFileError", "Keyring", "NoticeFacts", "NoticeSettings", "Notices",
           "Refusal", "SigningKey", "bid_id_of", "load_keyring", "micros", "parse_keyring"]

VERSION = 1          # every field
DERIVED_VERSION = 2  # without the bid id: it is "<request id>-<imp id>"
MAC_BYTES = 16
_HEAD = struct.Struct(">BQQI")  # version, issued (ms), price (micro-units), window (s)
_LENGTH = struct.Struct(">H")
#: the text fields a token binds, in their order in it
TEXT_FIELDS = ("request_id", "imp_id", "bid_id", "seat", "campaign", "creative", "currency", "exchange", "model_id")
#: why a notice is refused (403), as counted in ``bidder_notices_total{result="refused_<reason>"}``
REFUSALS = ("bad_signature", "unknown_key", "altered", "price_above_bid", "expired")
MIN_SECRET_BYTES = 16
_SHA256_BLOCK = 64
_IPAD = bytes(x ^ 0x36 for x in range(256))  # byte translations: a key XOR the HMAC pads
_OPAD = bytes(x ^ 0x5C for x in range(256))
_MAX_TAILS = 65_536


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names the file and the entry."""


class NoticeFacts(NamedTuple):
    issued: float      # Unix seconds on the engine's clock
    price_micros: int  # the bid price, micro-units of ``currency`` (CPM)
    window: int        # seconds the bid's ``exp`` announced
    key_id: str
    request_id: str
    imp_id: str
    bid_id: str
    seat: str
    campaign: str
    creative: str
    currency: str
    exchange: str
    model_id: str


class Refusal(NamedTuple):
    status: int   # 403: refused (``reason`` one of REFUSALS); 400: not a notice URL at all
    reason: str   # a REFUSALS entry, or "bad_request"
    message: str  # what the JSON answer says, naming the cause
    where: str = "t"  # the URL parameter at fault


@dataclass(frozen=True)
class SigningKey:
    id: str
    secret: bytes
    created: float  # Unix seconds


def bid_id_of(request_id: str, imp_id: str) -> str:
    """The id of the bid for an imp of a request; a version-2 token carries no bid id and is read back with this."""
    return f"{request_id}-{imp_id}"


def is_bid_id_of(bid_id: str, request_id: str, imp_id: str) -> bool:
    """``bid_id == bid_id_of(request_id, imp_id)``, without building the string (signing asks it for every bid)."""
    n = len(request_id)
    return (len(bid_id) == n + len(imp_id) + 1 and bid_id[n] == "-" and bid_id.startswith(request_id)
            and bid_id.endswith(imp_id))


def micros(price: float) -> int:
    """A price (currency units) in micro-units, as tokens carry it."""
    return round(price * 1_000_000)


class Keyring:
    """Keys by id; the newest signs, all verify."""

    def __init__(self, keys: list[SigningKey], origin: str = "keys"):
        if not keys:
            raise KeyFileError(f"{origin}: no keys")
        self.origin = origin
        self.keys = {k.id: k for k in keys}
        self.signing = max(keys, key=lambda k: k.created)
        self._id = _text(self.signing.id.encode("utf-8"))
        self._macs = {k.id.encode("utf-8"): _HmacSha256(k.secret) for k in keys}
        self._sign_mac = self._macs[self.signing.id.encode("utf-8")]
        # the encoded fields after bid_id (seat, campaign, creative, currency, exchange, model id) by their values:
        # a few per creative, so a bid's token encodes only its request id, imp id and bid id
        self._tails: dict[tuple[str, ...], bytes] = {}

    def __reduce__(self):  # to worker processes: hash states do not pickle, the keys do
        return Keyring, (list(self.keys.values()), self.origin)

    @classmethod
    def generate(cls) -> Keyring:
        """One random key, for trials: tokens it signs die with the process (see docs/notices.md)."""
        return cls([SigningKey("trial-" + secrets.token_hex(4), secrets.token_bytes(32), time.time())], "trial key")

    def sign(self, issued: float, price_micros: int, window: int, request_id: str, imp_id: str, bid_id: str,
             *rest: str) -> str:
        """The token of a bid: the arguments after ``window`` are the values of ``TEXT_FIELDS`` in that order."""
        tail = self._tails.get(rest)
        if tail is None:
            if len(self._tails) >= _MAX_TAILS:  # bounded: model ids change with every reload
                self._tails.clear()
            tail = self._tails[rest] = b"".join([_text(text.encode("utf-8")) for text in rest])
        derived = is_bid_id_of(bid_id, request_id, imp_id)
        return _tokens.sign(self._sign_mac, DERIVED_VERSION if derived else VERSION, millis(issued), price_micros,
                            window, self._id, request_id, imp_id, None if derived else bid_id, tail)

    def verify(self, token: str) -> NoticeFacts | str:
        """The facts a token carries, or the reason (one of ``REFUSALS``) it is refused: a token that does not
        decode is a bad signature, as is one signed by another secret."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            return "bad_signature"
        if len(raw) < _HEAD.size + MAC_BYTES:
            return "bad_signature"
        payload, tag = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
        try:
            version, issued, price, window = _HEAD.unpack_from(payload)
            texts, at = [], _HEAD.size
            for _ in range(len(TEXT_FIELDS) + (version != DERIVED_VERSION)):
                (n,) = _LENGTH.unpack_from(payload, at)
                at += 2
                if at + n > len(payload):
                    return "bad_signature"
                texts.append(payload[at:at + n])
                at += n
        except struct.error:
            return "bad_signature"
        if version not in (VERSION, DERIVED_VERSION) or at != len(payload):
            return "bad_signature"
        base = self._macs.get(texts[0])
        if base is None:
            return "unknown_key"
        if not hmac.compare_digest(base.digest(payload), tag):
            return "bad_signature"
        try:
            words = [t.decode("utf-8") for t in texts]
        except UnicodeDecodeError:
            return "bad_signature"
        if version == DERIVED_VERSION:
            words.insert(3, bid_id_of(words[1], words[2]))  # after key id, request id, imp id
        return NoticeFacts(issued / 1000.0, price, window, *words)


class _HmacSha256:
    """HMAC-SHA256 (RFC 2104) of one key, truncated to ``MAC_BYTES``: the key's inner and outer hash states are
    computed once and copied per message, about half the cost of copying an ``hmac.HMAC`` object."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, secret: bytes):
        if len(secret) > _SHA256_BLOCK:
            secret = hashlib.sha256(secret).digest()
        secret = secret.ljust(_SHA256_BLOCK, b"\0")
        self._inner = hashlib.sha256(secret.translate(_IPAD))
        self._outer = hashlib.sha256(secret.translate(_OPAD))

    def digest(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()[:MAC_BYTES]


def _text(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError(f"a token field of {len(data)} bytes (at most 65535)")
    return _LENGTH.pack(len(data)) + data


def load_keyring(path: str | os.PathLike) -> Keyring:
    """The keys of a key file; ``KeyFileError`` names the file and the entry at fault (a file readable by group or
    others is refused: its secrets sign what the bidder is paid for)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: cannot read: {exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"{path}: readable by group or others (mode {stat.S_IMODE(mode):o}): chmod 600 it")
    return parse_keyring(text, str(path))


def parse_keyring(text: str, origin: str) -> Keyring:
    """The keys of a key file's JSON text, read from ``origin`` (a file, an environment variable), which
    ``KeyFileError`` names with the entry at fault."""
    path = origin
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KeyFileError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise KeyFileError(f'{path}: expected {{"keys": [{{"id": ..., "secret": ..., "created": ...}}, ...]}}')
    keys: list[SigningKey] = []
    for i, entry in enumerate(entries):
        where = f"{path}: keys[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"id", "secret", "created"}:
            raise KeyFileError(f"{where}: expected an object with exactly id, secret and created")
        key_id, secret, created = entry["id"], entry["secret"], entry["created"]
        if not isinstance(key_id, str) or not key_id or len(key_id.encode("utf-8")) > 255:
            raise KeyFileError(f"{where}.id: expected a non-empty string of at most 255 bytes, got {key_id!r}")
        if any(k.id == key_id for k in keys):
            raise KeyFileError(f"{where}.id: duplicate key id {key_id!r}")
        try:
            raw = bytes.fromhex(secret) if isinstance(secret, str) else None
        except ValueError:
            raw = None
        if raw is None or len(raw) < MIN_SECRET_BYTES:
            raise KeyFileError(f"{where}.secret: expected at least {MIN_SECRET_BYTES} bytes as hex digits "
                            f"(python -c 'import secrets; print(secrets.token_hex(32))')")
        try:
            when = parse_time(created) if isinstance(created, str) else None
        except ValueError:
            when = None
        if when is None:
            raise KeyFileError(f"{where}.created: expected an ISO 8601 time such as 2026-12-01T00:00:00Z, "
                            f"got {created!r}")
        keys.append(SigningKey(key_id, raw, when))
    return Keyring(keys, origin)


@dataclass(frozen=True)
class NoticeSettings:
    """Notices turned on: the public base URL of the bidder's routes, the keys, the windows and the state."""
    url: str                 # e.g. https://bidder.example.com (no trailing slash)
    keyring: Keyring
    state_dir: Path          # where the dedup store lives (bidder/notice_store.py)
    window_s: int = 600      # a bid's exp when the imp gives none; a notice after it is late (accepted)
    max_window_s: int = 86_400  # the longest exp; a notice after it is expired (refused)


#: the query each notice URL carries after its token: the exchange substitutes the macros (OpenRTB 2.6)
_CHECKED = "&a=${AUCTION_ID}&bid=${AUCTION_BID_ID}"
NOTICE_QUERIES = {"win": _CHECKED + "&p=${AUCTION_PRICE}", "bill": _CHECKED + "&p=${AUCTION_PRICE}",
                  "loss": _CHECKED + "&loss=${AUCTION_LOSS}&mtw=${AUCTION_MIN_TO_WIN}"}
_WIN_QUERY, _BILL_QUERY, _LOSS_QUERY = NOTICE_QUERIES["win"], NOTICE_QUERIES["bill"], NOTICE_QUERIES["loss"]
_MAX_MARKUPS = 65_536


class Notices:
    """Signs each bid and points its notices (and its creative's click link) at the bidder's own routes."""

    def __init__(self, settings: NoticeSettings):
        self.settings = settings
        self.keyring = settings.keyring
        base = settings.url.rstrip("/")
        self._urls = tuple(f"{base}/notice/{kind}?t=" for kind in ("win", "bill", "loss"))
        self._click = f"{base}/click?t="
        # each creative's markup cut at its links to its landing page, which a bid's markup points at /click
        self._around_click: dict[tuple[str, str], list[str]] = {}

    def check(self, query: Mapping[str, str], now: float) -> NoticeFacts | Refusal:
        """A notice URL's parameters (``now``: the engine's clock): the facts of its token, or why it is refused.
        The token must be ours; the URL's request id (``a``) and bid id (``bid``), when the exchange substituted
        them, must be the token's; the clearing price (``p``) may not exceed the bid price; the token may not be
        older than the longest window. Whether a notice is late or a repeat is the caller's to tell."""
        token = query.get("t")
        if not token:
            return Refusal(400, "bad_request", "no token: a notice URL carries t=TOKEN")
        facts = self.keyring.verify(token)
        if facts.__class__ is str:
            return Refusal(403, facts, "the token is not one this bidder signed" if facts == "bad_signature"
                           else "the token's key is not among this bidder's keys")
        for name, value in (("a", facts.request_id), ("bid", facts.bid_id)):
            seen = query.get(name)
            if seen is not None and not seen.startswith("${") and seen != value:
                return Refusal(403, "altered", f"{name}={seen!r} is not the bid the token was signed for", name)
        price = query.get("p")
        if price and not price.startswith("${"):
            try:
                cleared = float(price)
            except ValueError:
                cleared = math.nan
            if not (cleared >= 0 and math.isfinite(cleared)):
                return Refusal(400, "bad_request", f"expected the clearing price (CPM), got {price!r}", "p")
            if micros(cleared) > facts.price_micros:
                return Refusal(403, "price_above_bid", f"clearing price {price} above the bid price "
                                                       f"{facts.price_micros / 1e6:.6f}", "p")
        age = now - facts.issued
        if age > self.settings.max_window_s:
            return Refusal(403, "expired", f"issued {age:.0f} s ago, past the longest window "
                                           f"({self.settings.max_window_s} s)")
        return facts

    def window(self, exp: int | None) -> int:
        """A bid's ``exp``: the imp's when it gives one (capped at the longest window), else the default."""
        settings = self.settings
        if exp is None or exp <= 0:
            return settings.window_s
        return min(exp, settings.max_window_s)

    def dress(self, bid, request_id: str, exp: int | None, seat: str, candidate, exchange: str | None,
              model_id: str, issued: float, currency: str = "USD") -> None:
        """Set ``bid``'s ``nurl``, ``burl``, ``lurl`` and ``exp``, and route its markup's click link (the
        creative's ``click_url``) through ``/click``; all of them carry one token."""
        window = self.window(exp)
        token = self.keyring.sign(issued, micros(bid.price), window, request_id, bid.impid, bid.id, seat,
                                  candidate.campaign_id, candidate.creative_id, currency, exchange or "",
                                  model_id)
        win, bill, loss = self._urls
        bid.nurl = win + token + _WIN_QUERY
        bid.burl = bill + token + _BILL_QUERY
        bid.lurl = loss + token + _LOSS_QUERY
        bid.exp = window
        markup, click_url = bid.adm, candidate.click_url
        if click_url is not None and markup is not None:
            pieces = self._around_click.get((markup, click_url))
            if pieces is None:
                if len(self._around_click) >= _MAX_MARKUPS:  # bounded: catalogs are reloaded
                    self._around_click.clear()
                pieces = self._around_click[markup, click_url] = markup.split(click_url)
            bid.adm = (self._click + token).join(pieces)

"""Notice URLs: OpenRTB 2.6 macro substitution, which URLs may be fetched, and forged variants.

A bid's ``nurl`` (win), ``burl`` (billing) and ``lurl`` (loss) may carry the auction macros below; the
exchange substitutes every one it knows and leaves any other ``${...}`` as it is, as the specification asks.
Prices are USD CPM with six decimals. ``${AUCTION_BID_ID}`` is the response's ``bidid`` (OpenRTB), or the
bid's ``id`` when the response has none.
"""
from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

__all__ = ["MACROS", "forge", "is_local", "money", "substitute"]

MACROS = ("AUCTION_ID", "AUCTION_BID_ID", "AUCTION_IMP_ID", "AUCTION_SEAT_ID", "AUCTION_AD_ID", "AUCTION_PRICE",
          "AUCTION_CURRENCY", "AUCTION_MBR", "AUCTION_LOSS", "AUCTION_MIN_TO_WIN")
_MACRO = re.compile(r"\$\{([A-Z_]+)\}")


def money(value: float) -> str:
    return f"{value:.6f}"


def substitute(url: str, values: dict[str, str]) -> str:
    """``url`` with ``${NAME}`` replaced by ``values[NAME]`` for the names given; others are left alone."""
    if "${" not in url:
        return url
    return _MACRO.sub(lambda m: values.get(m.group(1), m.group(0)), url)


def is_local(url: str) -> bool:
    """Whether ``url`` is http(s) to an address on this machine: the only notices the simulator sends.
    Names other than ``localhost`` are not resolved (no lookup leaves the machine)."""
    origin = url.split("/", 3)[:3]  # "scheme:", "", "host:port": notice URLs differ, their origins repeat
    key = "/".join(origin)
    found = _local_origins.get(key)
    if found is None:
        found = _is_local_origin(key)
        if len(_local_origins) < 10_000:
            _local_origins[key] = found
    return found


_local_origins: dict[str, bool] = {}


def _is_local_origin(origin: str) -> bool:
    try:
        parts = urlsplit(origin)
        hostname = parts.hostname
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not hostname:
        return False
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


#: ways to alter a genuine notice (``forge``), in the order a draw picks them
FORGERIES = ("price", "bid_id", "replay")


def forge(template: str, values: dict[str, str], kind: str, foreign_id: str, replayed: str | None) -> str | None:
    """A forged notice built from a genuine one: ``price`` reports ten times the price charged, ``bid_id``
    names a bid id and auction id of nobody's, ``replay`` re-sends an earlier auction's genuine notice.
    When the template lacks the macro a kind alters, the next kind is tried; None when none applies."""
    start = FORGERIES.index(kind)
    genuine = substitute(template, values)
    for k in FORGERIES[start:] + FORGERIES[:start]:
        if k == "price" and "${AUCTION_PRICE}" in template:
            wrong = dict(values, AUCTION_PRICE=money(float(values["AUCTION_PRICE"]) * 10 + 0.01))
            return substitute(template, wrong)
        if k == "bid_id" and ("${AUCTION_BID_ID}" in template or "${AUCTION_ID}" in template):
            return substitute(template, dict(values, AUCTION_BID_ID=foreign_id, AUCTION_ID=foreign_id))
        if k == "replay" and replayed is not None and replayed != genuine:
            return replayed
    return None

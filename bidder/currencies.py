"""The currency table: what one US dollar is worth in each currency the bidder may trade in, on a date.

The file is JSON, configured by the operator beside the catalog (``currencies.json`` in the catalog's directory,
else the table shipped in ``bidder/models/default/``) and read again whenever the catalog is::

    {"date": "2026-12-01", "base": "USD", "rates": {"USD": 1.0, "EUR": 0.9467, "CNY": 7.2, ...}}

``rates[X]`` is the amount of ``X`` one ``base`` buys; the table must list USD (campaign values are USD) and CNY
(iPinYou's ``slotprice`` is CNY fen, the scale the model was trained on). Codes are ISO 4217 (three capitals).
What a request's ``cur`` and ``bidfloorcur`` do with it is in ``docs/conformance.md``.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

__all__ = [
    "CURRENCY_FILE",
    "DEFAULT_CURRENCIES",
    "Currencies",
    "CurrencyError",
    "currencies_beside",
    "default_currencies",
    "load_currencies",
    "parse_currencies",
]

CURRENCY_FILE = "currencies.json"
DEFAULT_CURRENCIES = Path(__file__).parent / "models" / "default" / CURRENCY_FILE
_CODE = re.compile(r"^[A-Z]{3}$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class CurrencyError(ValueError):
    """A currency table that cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class Currencies:
    date: str
    per_usd: dict[str, float]  # units of each currency one USD buys
    source: str = "currencies"
    cny_per_usd: float = field(init=False)  # every imp's price feature reads it

    def __post_init__(self) -> None:
        object.__setattr__(self, "cny_per_usd", self.per_usd["CNY"])

    def rate(self, currency: str) -> float | None:
        """Units of ``currency`` per USD, or None when the table has no rate for it."""
        return self.per_usd.get(currency)


def currencies_beside(catalog: Path) -> Path:
    """The table that goes with a catalog file: its directory's ``currencies.json``, else the shipped one."""
    own = Path(catalog).parent / CURRENCY_FILE
    return own if own.exists() else DEFAULT_CURRENCIES


@lru_cache(maxsize=1)
def default_currencies() -> Currencies:
    """The shipped table, read once per process (catalogs built in code use it)."""
    return load_currencies(DEFAULT_CURRENCIES)


def load_currencies(path: str | Path = DEFAULT_CURRENCIES) -> Currencies:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CurrencyError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CurrencyError(f"{path}: cannot read: {exc}") from None
    return parse_currencies(data, str(path))


def parse_currencies(data: object, origin: str = "currencies") -> Currencies:
    if not isinstance(data, dict) or set(data) != {"date", "base", "rates"}:
        raise CurrencyError(f'{origin}: expected exactly {{"date": "YYYY-MM-DD", "base": "USD", "rates": {{...}}}}')
    date, base, rates = data["date"], data["base"], data["rates"]
    if not isinstance(date, str) or not _DATE.match(date):
        raise CurrencyError(f"{origin}: date: expected YYYY-MM-DD, got {date!r}")
    if not isinstance(rates, dict) or not rates:
        raise CurrencyError(f"{origin}: rates: expected an object of currency codes to positive numbers")
    for code, rate in rates.items():
        if not _CODE.match(code):
            raise CurrencyError(f"{origin}: rates.{code}: expected an ISO 4217 code (three capitals)")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
            raise CurrencyError(f"{origin}: rates.{code}: expected a positive number, got {rate!r}")
    if base not in rates:
        raise CurrencyError(f"{origin}: base: {base!r} has no rate in rates")
    for needed in ("USD", "CNY"):
        if needed not in rates:
            raise CurrencyError(f"{origin}: rates.{needed}: missing (USD: campaign values; CNY: the model's "
                                f"price feature)")
    usd = rates["USD"] / rates[base]
    return Currencies(date, {code: (rate / rates[base]) / usd for code, rate in rates.items()}, origin)

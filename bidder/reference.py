"""The featurization written plainly: the parity oracle for the Cython kernel, not a fallback.

Every rule here is the specification; ``bidder/_features.pyx`` must agree with it bit for bit.

Canonical value strings (what gets hashed):
    None, "", NaN          missing (index 0)
    bool                   "1" / "0"
    int                    decimal
    float                  integral and finite: decimal of the integer; ±inf: "inf" / "-inf";
                           otherwise ``repr`` (shortest round-trip form)
    str                    itself (its UTF-8 bytes are hashed)
A record is a mapping of raw columns, or a tuple of mappings (layers: the first that has a key wins).
"""
from __future__ import annotations

import math
import re
from datetime import date
from typing import Any, Iterable, Mapping

import numpy as np

from bidder.spec import BROWSER_KEYWORDS, OS_KEYWORDS, SPARSE_INPUT, TIMESTAMP_KEY, FeatureSpec, FieldSpec

__all__ = ["hash_value", "canonical", "featurize", "os_browser", "ip_prefix", "field_index"]

_MISSING = object()
_NUMBER_RE = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_HEX = frozenset("0123456789abcdefABCDEF")


def hash_value(value: str, seed: int) -> int:
    """MurmurHash3 x86_32 of the UTF-8 bytes of ``value``, unsigned."""
    return _murmur3_32(value.encode("utf-8"), seed)


def _murmur3_32(data: bytes, seed: int) -> int:
    c1, c2, mask = 0xCC9E2D51, 0x1B873593, 0xFFFFFFFF
    h = seed & mask
    n = len(data)
    tail_start = n - (n % 4)
    for i in range(0, tail_start, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * c1) & mask
        k = ((k << 15) | (k >> 17)) & mask
        k = (k * c2) & mask
        h ^= k
        h = ((h << 13) | (h >> 19)) & mask
        h = (h * 5 + 0xE6546B64) & mask
    k = 0
    tail = data[tail_start:]
    if len(tail) >= 3:
        k ^= tail[2] << 16
    if len(tail) >= 2:
        k ^= tail[1] << 8
    if len(tail) >= 1:
        k ^= tail[0]
        k = (k * c1) & mask
        k = ((k << 15) | (k >> 17)) & mask
        k = (k * c2) & mask
        h ^= k
    h ^= n
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & mask
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & mask
    h ^= h >> 16
    return h


def canonical(value: Any, key: str) -> str | None:
    """The canonical string of a scalar value, or None when it is missing."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return int.__repr__(value)  # the number, also for int subclasses such as IntEnum
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value.is_integer():
            return str(int(value))
        return float.__repr__(value)
    if isinstance(value, str):
        if not value:
            return None
        _check_utf8(value, key)
        return value
    raise ValueError(f"field {key!r}: expected a string, number, boolean or null, got {type(value).__name__}")


def _check_utf8(value: str, key: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"field {key!r}: value cannot be encoded as UTF-8 (lone surrogate)") from None


def os_browser(useragent: str) -> str:
    """``<os>_<browser>``: the first keyword of each list found in the ASCII-lower-cased agent."""
    text = useragent.encode("utf-8").lower()  # bytes.lower() folds ASCII only, like the kernel
    os_name = next((k for k in OS_KEYWORDS if k.encode() in text), "other")
    browser = next((k for k in BROWSER_KEYWORDS if k.encode() in text), "other")
    return f"{os_name}_{browser}"


def ip_prefix(ip: str) -> str:
    """IPv4 → first three octets + ``.*``; IPv6 → first four groups + ``:*``; anything else unchanged.

    An address with a dot is read as IPv4 after its last colon (so ``::ffff:1.2.3.4`` → ``1.2.3.*``).
    """
    if "." in ip:
        v4 = ip[ip.rfind(":") + 1:]
        parts = v4.split(".")
        if len(parts) < 4:
            return ip
        return ".".join(parts[:3]) + ".*"
    if ":" in ip:
        groups = _ipv6_groups(ip)
        if groups is None:
            return ip
        return ":".join(f"{g:x}" for g in groups[:4]) + ":*"
    return ip


def _ipv6_groups(ip: str) -> list[int] | None:
    if ip.count("::") > 1:
        return None
    if "::" in ip:
        head, tail = ip.split("::", 1)
        left = head.split(":") if head else []
        right = tail.split(":") if tail else []
        if len(left) + len(right) > 7:
            return None
        parts = left + ["0"] * (8 - len(left) - len(right)) + right
    else:
        parts = ip.split(":")
        if len(parts) != 8:
            return None
    if not all(1 <= len(p) <= 4 and set(p) <= _HEX for p in parts):
        return None
    return [int(p, 16) for p in parts]


def timestamp_parts(value: Any, key: str) -> tuple[int, int]:
    """(weekday Monday=0, hour) of an iPinYou ``yyyyMMddHHmmss[SSS]`` stamp or Unix seconds (UTC).

    Accepted: 14 or 17 digits (calendar), 13 digits (Unix milliseconds), up to 12 digits with an
    optional fraction (Unix seconds). Anything else is a ValueError naming the field.
    """
    text = canonical(value, key)
    if text is None:
        raise ValueError(f"field {key!r}: missing timestamp")  # callers check for missing first
    digits, dot, frac = text.partition(".")
    if digits.isascii() and digits.isdigit() and (not dot or frac == "" or (frac.isascii() and frac.isdigit())):
        n = len(digits)
        if not dot and n in (14, 17):
            y, m, d, hh = int(digits[0:4]), int(digits[4:6]), int(digits[6:8]), int(digits[8:10])
            try:
                day = date(y, m, d)
            except ValueError:
                day = None
            if day is not None and hh < 24:
                return day.weekday(), hh
        elif not dot and n == 13:
            return _unix_parts(int(digits) // 1000)
        elif n <= 12:
            return _unix_parts(int(digits))
    raise ValueError(f"field {key!r}: cannot read timestamp {text[:40]!r} "
                     "(expected yyyyMMddHHmmss[SSS], Unix seconds or Unix milliseconds)")


def _unix_parts(seconds: int) -> tuple[int, int]:
    days, rest = divmod(seconds, 86400)
    return (days + 3) % 7, rest // 3600  # 1970-01-01 was a Thursday (weekday 3)


def _as_number(value: Any, key: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, str):
        if not value:
            return None
        if not _NUMBER_RE.fullmatch(value):
            _check_utf8(value, key)
            raise ValueError(f"field {key!r}: expected a number, got {value[:40]!r}")
        return float(value)
    raise ValueError(f"field {key!r}: expected a number or null, got {type(value).__name__}")


def _lookup(record: Any, key: str) -> Any:
    if isinstance(record, tuple):
        for layer in record:
            if not hasattr(layer, "get"):
                raise ValueError(f"expected a mapping layer, got {type(layer).__name__}")
            value = layer.get(key, _MISSING)
            if value is not _MISSING:
                return value
        return None
    return record.get(key)


def _hashed(text: str | None, f: FieldSpec, seed: int) -> int:
    if text is None:
        return 0
    return 1 + hash_value(text, seed) % (f.buckets - 1)


def field_index(f: FieldSpec, record: Any, seed: int) -> int:
    """Index of a single-valued field for one record."""
    value = _lookup(record, f.source)
    if f.kind == "categorical":
        return _hashed(canonical(value, f.source), f, seed)
    if f.kind == "bucketized":
        number = _as_number(value, f.source)
        if number is None:
            return 0
        return 1 + sum(1 for b in f.boundaries if number > b)  # type: ignore[union-attr]
    # derived
    if f.transform in ("weekday", "hour"):
        text = canonical(value, f.source)
        if text is None:
            stamp = _lookup(record, TIMESTAMP_KEY)
            if canonical(stamp, TIMESTAMP_KEY) is None:
                return 0
            weekday, hour = timestamp_parts(stamp, TIMESTAMP_KEY)
            text = str(weekday if f.transform == "weekday" else hour)
        return _hashed(text, f, seed)
    text = canonical(value, f.source)
    if text is None:
        return 0
    derived = os_browser(text) if f.transform == "os_browser" else ip_prefix(text)
    return _hashed(derived, f, seed)


def multi_indices(f: FieldSpec, record: Any, seed: int) -> list[int]:
    """Indices of a multi-valued field for one record: missing elements skipped, cut at max_len."""
    value = _lookup(record, f.source)
    if value is None:
        items: Iterable[Any] = ()
    elif isinstance(value, (list, tuple)):
        items = value
    elif isinstance(value, str):
        _check_utf8(value, f.source)
        items = value.split(",")
    else:
        items = (value,)
    out: list[int] = []
    for item in items:
        if len(out) == f.max_len:
            break
        text = canonical(item, f.source)
        if text is not None:
            out.append(_hashed(text, f, seed))
    return out


def featurize(spec: FeatureSpec, records: Iterable[Mapping[str, Any] | tuple]) -> dict[str, np.ndarray]:
    """The ONNX input feed for ``records``: ``{input name: int64 array [rows, width]}``."""
    records = list(records)
    out = spec.allocate(len(records))
    singles = spec.single_fields
    for row, record in enumerate(records):
        try:
            if not isinstance(record, tuple) and not hasattr(record, "get"):
                raise ValueError(f"expected a mapping or a tuple of mappings, got {type(record).__name__}")
            for col, f in enumerate(singles):
                out[SPARSE_INPUT][row, col] = field_index(f, record, spec.seed)
            for f in spec.multi_fields:
                idx = multi_indices(f, record, spec.seed)
                out[f.name][row, :len(idx)] = idx
        except ValueError as exc:
            raise ValueError(f"record {row}: {exc}") from None
    return out

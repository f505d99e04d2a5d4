"""The feature spec: the one contract between training (`train/`) and serving (`bidder/`).

A spec lists the model's fields in order. Each field reads one key of a raw record (the iPinYou log
columns) and maps its value to an int64 index in ``[0, buckets)``; index 0 means missing / padding.

Kinds:
    categorical  canonical value string, hashed: ``1 + murmur3_32(utf8, seed) % (buckets - 1)``
    derived      a transform of the value (``os_browser``, ``ip_prefix``, ``weekday``, ``hour``),
                 then hashed like a categorical
    bucketized   a number placed by ``boundaries`` (right-closed): ``1 + #{b : value > b}``
    multi        a list of values (or a comma-separated string), each hashed, padded to ``max_len``

Model inputs: the single-valued fields together form one ``[batch, n_single]`` matrix named
``sparse`` (columns in spec order); each multi field is a ``[batch, max_len]`` matrix named after it.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = [
    "SCHEMA_VERSION",
    "RAW_FIELDS",
    "SPARSE_INPUT",
    "TIMESTAMP_KEY",
    "KINDS",
    "TRANSFORMS",
    "OS_KEYWORDS",
    "BROWSER_KEYWORDS",
    "SpecError",
    "FieldSpec",
    "FeatureSpec",
    "default_spec",
    "load_spec",
]

SCHEMA_VERSION = 1
SPEC_FILENAME = "spec.json"
SPARSE_INPUT = "sparse"
# The record key from which the weekday/hour transforms derive a value when the record lacks one.
TIMESTAMP_KEY = "timestamp"

#: The raw schema every record is mapped to (iPinYou log columns); ``usertag`` is a list.
RAW_FIELDS = (
    "weekday", "hour", "useragent", "IP", "region", "city", "adexchange", "domain", "url", "urlid",
    "slotid", "slotwidth", "slotheight", "slotvisibility", "slotformat", "slotprice", "creative",
    "advertiser", "usertag",
)

KINDS = ("categorical", "derived", "bucketized", "multi")
TRANSFORMS = ("os_browser", "ip_prefix", "weekday", "hour")

# User-agent families: the first keyword found in the ASCII-lower-cased user agent wins, in this order.
OS_KEYWORDS = ("windows", "ios", "mac", "android", "linux")
BROWSER_KEYWORDS = ("chrome", "sogou", "maxthon", "safari", "firefox", "theworld", "opera", "ie")

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MAX_BUCKETS = 1 << 31
_MAX_LEN_LIMIT = 1024
_ENTRY_KEYS = {
    "categorical": {"name", "kind", "source", "buckets"},
    "derived": {"name", "kind", "source", "buckets", "transform"},
    "bucketized": {"name", "kind", "source", "buckets", "boundaries"},
    "multi": {"name", "kind", "source", "buckets", "max_len"},
}


class SpecError(ValueError):
    """A feature spec that cannot be used; the message names the file and the bad entry."""


@dataclass(frozen=True)
class FieldSpec:
    name: str
    kind: str
    source: str
    buckets: int
    transform: str | None = None
    boundaries: tuple[float, ...] | None = None
    max_len: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "source": self.source}
        if self.transform is not None:
            out["transform"] = self.transform
        if self.boundaries is not None:
            out["boundaries"] = [_plain_number(b) for b in self.boundaries]
        if self.max_len is not None:
            out["max_len"] = self.max_len
        out["buckets"] = self.buckets
        return out


@dataclass(frozen=True)
class FeatureSpec:
    fields: tuple[FieldSpec, ...]
    seed: int = 0
    schema_version: int = SCHEMA_VERSION
    _by_name: dict[str, FieldSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {f.name: f for f in self.fields})

    # -- layout -----------------------------------------------------------------------------
    @property
    def single_fields(self) -> tuple[FieldSpec, ...]:
        return tuple(f for f in self.fields if f.kind != "multi")

    @property
    def multi_fields(self) -> tuple[FieldSpec, ...]:
        return tuple(f for f in self.fields if f.kind == "multi")

    @property
    def input_names(self) -> tuple[str, ...]:
        names = [SPARSE_INPUT] if self.single_fields else []
        return tuple(names + [f.name for f in self.multi_fields])

    def input_width(self, name: str) -> int:
        """Columns of model input ``name`` (its shape is ``[batch, width]``)."""
        if name == SPARSE_INPUT:
            return len(self.single_fields)
        f = self._by_name.get(name)
        if f is None or f.kind != "multi":
            raise KeyError(f"no model input named {name!r}")
        return int(f.max_len)  # type: ignore[arg-type]

    def allocate(self, rows: int) -> dict[str, np.ndarray]:
        """Zeroed int64 buffers for ``rows`` records, keyed by model input name."""
        return {n: np.zeros((rows, self.input_width(n)), dtype=np.int64) for n in self.input_names}

    def field(self, name: str) -> FieldSpec:
        return self._by_name[name]

    @property
    def sparse_offsets(self) -> np.ndarray:
        """Start of each single-valued field in one table holding all of them end to end."""
        sizes = [f.buckets for f in self.single_fields]
        return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if sizes else np.zeros(0, np.int64)

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f.source for f in self.fields))

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "hash": "murmur3_x86_32",
            "seed": self.seed,
            "fields": [f.to_dict() for f in self.fields],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @property
    def digest(self) -> str:
        """sha256 of the canonical JSON: equal digests mean identical featurization."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / SPEC_FILENAME
        path.write_text(self.to_json())
        return path


def _plain_number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


# -- validation -------------------------------------------------------------------------------
def _parse_spec(data: Any, origin: str) -> FeatureSpec:
    def fail(msg: str) -> SpecError:
        return SpecError(f"{origin}: {msg}")

    if not isinstance(data, Mapping):
        raise fail(f"expected a JSON object, got {type(data).__name__}")
    unknown = set(data) - {"schema_version", "hash", "seed", "fields"}
    if unknown:
        raise fail(f"unknown key(s) {sorted(unknown)}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise fail(f"schema_version must be {SCHEMA_VERSION}, got {version!r}")
    hash_name = data.get("hash", "murmur3_x86_32")
    if hash_name != "murmur3_x86_32":
        raise fail(f"hash must be 'murmur3_x86_32', got {hash_name!r}")
    seed = data.get("seed", 0)
    if not _is_int(seed) or not 0 <= seed < 2**32:
        raise fail(f"seed must be an integer in [0, 2**32), got {seed!r}")
    entries = data.get("fields")
    if not isinstance(entries, list) or not entries:
        raise fail("fields must be a non-empty list")

    fields = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        label = f"fields[{i}]"
        if isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
            label += f" ({entry['name']!r})"
        f = _parse_field(entry, lambda msg, label=label: fail(f"{label}: {msg}"))
        if f.name in seen:
            raise fail(f"{label}: duplicate field name {f.name!r}")
        seen.add(f.name)
        fields.append(f)
    if any(f.kind == "multi" and f.name == SPARSE_INPUT for f in fields):
        raise fail(f"a multi field may not be named {SPARSE_INPUT!r} (reserved for the single-valued input)")
    return FeatureSpec(fields=tuple(fields), seed=int(seed), schema_version=SCHEMA_VERSION)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_field(entry: Any, fail) -> FieldSpec:
    if not isinstance(entry, Mapping):
        raise fail(f"expected an object, got {type(entry).__name__}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise fail(f"name must be an identifier, got {name!r}")
    kind = entry.get("kind")
    if kind not in KINDS:
        raise fail(f"kind must be one of {list(KINDS)}, got {kind!r}")
    unknown = set(entry) - _ENTRY_KEYS[kind]
    if unknown:
        raise fail(f"unknown key(s) {sorted(unknown)} for kind {kind!r}")
    source = entry.get("source", name)
    if not isinstance(source, str) or not source:
        raise fail(f"source must be a non-empty string, got {source!r}")

    transform = boundaries = max_len = None
    if kind == "derived":
        transform = entry.get("transform")
        if transform not in TRANSFORMS:
            raise fail(f"transform must be one of {list(TRANSFORMS)}, got {transform!r}")
    if kind == "bucketized":
        raw = entry.get("boundaries")
        if not isinstance(raw, list) or not raw:
            raise fail("boundaries must be a non-empty list of numbers")
        if not all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in raw):
            raise fail(f"boundaries must be finite numbers, got {raw!r}")
        if any(b >= c for b, c in zip(raw, raw[1:])):
            raise fail(f"boundaries must be strictly increasing, got {raw!r}")
        boundaries = tuple(float(b) for b in raw)
    if kind == "multi":
        max_len = entry.get("max_len")
        if not _is_int(max_len) or not 1 <= max_len <= _MAX_LEN_LIMIT:
            raise fail(f"max_len must be an integer in [1, {_MAX_LEN_LIMIT}], got {max_len!r}")

    buckets = entry.get("buckets")
    if kind == "bucketized":
        expected = len(boundaries) + 2  # type: ignore[arg-type]
        if buckets is None:
            buckets = expected
        if buckets != expected:
            raise fail(f"buckets must be len(boundaries) + 2 = {expected} (0 = missing), got {buckets!r}")
    if not _is_int(buckets) or not 2 <= buckets <= _MAX_BUCKETS:
        raise fail(f"buckets must be an integer in [2, 2**31], got {buckets!r}")
    return FieldSpec(name=name, kind=kind, source=source, buckets=buckets, transform=transform,
                     boundaries=boundaries, max_len=max_len)


# -- entry points -----------------------------------------------------------------------------
def load_spec(path: str | Path) -> FeatureSpec:
    """Read and validate a spec from a bundle directory or a ``spec.json`` path."""
    path = Path(path)
    if path.is_dir():
        path = path / SPEC_FILENAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    return _parse_spec(data, str(path))


def default_spec(seed: int = 20130606) -> FeatureSpec:
    """The iPinYou spec: 18 single-valued fields and the multi-valued ``usertag``.

    Bucket counts follow iPinYou cardinalities with head-room against collisions; small fields get
    tables much larger than their value count because collisions there would merge whole groups.
    """
    fields: list[dict[str, Any]] = [
        {"name": "weekday", "kind": "derived", "transform": "weekday", "source": "weekday", "buckets": 1024},
        {"name": "hour", "kind": "derived", "transform": "hour", "source": "hour", "buckets": 4096},
        {"name": "os_browser", "kind": "derived", "transform": "os_browser", "source": "useragent",
         "buckets": 4096},
        {"name": "ip_prefix", "kind": "derived", "transform": "ip_prefix", "source": "IP", "buckets": 1 << 14},
        {"name": "region", "kind": "categorical", "buckets": 1024},
        {"name": "city", "kind": "categorical", "buckets": 4096},
        {"name": "adexchange", "kind": "categorical", "buckets": 1024},
        {"name": "domain", "kind": "categorical", "buckets": 1 << 15},
        {"name": "url", "kind": "categorical", "buckets": 1 << 14},
        {"name": "urlid", "kind": "categorical", "buckets": 1024},
        {"name": "slotid", "kind": "categorical", "buckets": 1 << 15},
        {"name": "slotwidth", "kind": "categorical", "buckets": 1024},
        {"name": "slotheight", "kind": "categorical", "buckets": 1024},
        {"name": "slotvisibility", "kind": "categorical", "buckets": 1024},
        {"name": "slotformat", "kind": "categorical", "buckets": 1024},
        {"name": "slotprice", "kind": "bucketized", "boundaries": [0, 10, 50, 100]},
        {"name": "creative", "kind": "categorical", "buckets": 4096},
        {"name": "advertiser", "kind": "categorical", "buckets": 1024},
        {"name": "usertag", "kind": "multi", "max_len": 16, "buckets": 1 << 12},
    ]
    return _parse_spec({"schema_version": SCHEMA_VERSION, "seed": seed, "fields": fields}, "default spec")

"""Changing a bundle's files behind its meta.json's back, for the tests of what the bidder checks after the digests."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


def restamp(bundle: Path) -> None:
    """Record the bundle's files' present digests in its meta.json (format 2), as if it had been written so: a
    graph changed on purpose then reaches the checks that come after the digests' (signatures, parity)."""
    meta = json.loads((bundle / "meta.json").read_text())
    meta["files"] = {name: hashlib.sha256((bundle / name).read_bytes()).hexdigest() for name in meta["files"]}
    (bundle / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def rewrite_meta(bundle: Path, change) -> None:
    """Apply ``change`` to the bundle's meta.json (a dict, changed in place)."""
    meta = json.loads((bundle / "meta.json").read_text())
    change(meta)
    (bundle / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def as_format1(meta: dict) -> None:
    """``meta`` as a bundle written before the format version was recorded: no version, no ``files`` digests."""
    meta.pop("format_version")
    meta.pop("files")

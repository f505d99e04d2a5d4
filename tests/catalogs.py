"""Catalogs a test writes as Python data, read through the catalog file's own decoder."""
from __future__ import annotations

import json
from typing import Any

from bidder.campaigns import Catalog, decode_catalog


def parse_catalog(data: Any, origin: str = "catalog") -> Catalog:
    """The catalog a file holding ``json.dumps(data)`` describes."""
    return decode_catalog(json.dumps(data), origin)

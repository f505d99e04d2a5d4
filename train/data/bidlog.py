"""A censored bid log: what a bidder learns about the market from its own bids.

``python -m train synth`` writes ``bids.log.txt`` beside the impression logs: one line per request the
simulated bidder answered (the same impressions, in time order), with

    auction         1 = first price, 2 = second price (a property of the exchange: ``FIRST_PRICE_EXCHANGES``)
    bid             our bid, USD CPM, from the logging policy below (never under the floor)
    won             1 when the bid beat the market price (the highest competing bid), else 0
    payprice        USD CPM paid on a win (first price: the bid; second price: max(market, floor)); null on a loss
    click           1 when the won impression was clicked; 0 otherwise (a lost request showed nothing)
    value_per_click the campaign's value per click (USD), from the shipped catalog

and, on synthetic logs only, the truth, which no model may read: ``market_true`` (the market price drawn), ``market_mu_true``
and ``market_sigma_true`` (its log-normal distribution: ln market ~ N(mu, sigma)) and ``pctr_true``.
The feature columns are the impression log's, so the bidder's featurizer reads them unchanged
(``slotprice``, the floor, stays in CNY fen as in iPinYou).

A bid log made from the bidder's own event log (``python -m train logs``) has no truth columns (nobody knows the
market's real distribution: they read as NaN) and one more, ``min_to_win``: on a loss, the exchange's
``${AUCTION_MIN_TO_WIN}`` (the price that would have won, so the exact market price), or null.

What is observed is censored: a first-price win says only market < bid, a loss market >= bid; a
second-price win reveals the market price (or, when it paid the floor, that market <= floor).

The logging policy bids the impression's true value times a log-normal factor (median
``LOGGING_MEDIAN``, log spread ``LOGGING_SPREAD``): varied enough to see the market on both sides
of every bid a shading policy would consider. The market price is the generator's log-normal draw
(``train.data.synthetic``) in USD at ``MARKET_USD_PER_FEN``: chosen so that bidding the true value
wins about half of the requests, where shading matters most.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bidder import DEFAULT_BUNDLE
from bidder.bundle import CAMPAIGNS_FILE
from bidder.openrtb import USD_TO_CNY
from bidder.spec import FeatureSpec
from train.data.dataset import Split, featurize_log
from train.errors import DataError

__all__ = ["BID_LOG", "BidLog", "FIRST_PRICE_EXCHANGES", "read_bid_log", "split_bid_log", "write_bid_log"]

BID_LOG = "bids.log.txt"
#: exchanges (``adexchange``) that run first-price auctions; the others run second price
FIRST_PRICE_EXCHANGES = ("1", "3")
MARKET_USD_PER_FEN = 0.08
LOGGING_MEDIAN, LOGGING_SPREAD = 0.8, 0.7
FEATURE_COLUMNS = (
    "click", "weekday", "hour", "bidid", "timestamp", "useragent", "IP", "region", "city", "adexchange", "domain",
    "url", "urlid", "slotid", "slotwidth", "slotheight", "slotvisibility", "slotformat", "slotprice", "creative",
    "advertiser", "usertag",
)
LOG_COLUMNS = ("auction", "bid", "won", "payprice", "value_per_click")
MIN_TO_WIN = "min_to_win"  # optional: a loss's exact market price, from the exchange's loss notice
TRUTH_COLUMNS = ("market_true", "market_mu_true", "market_sigma_true", "pctr_true")
COLUMNS = FEATURE_COLUMNS + LOG_COLUMNS + TRUTH_COLUMNS
TEST_FRACTION, VAL_FRACTION = 0.2, 0.1  # the latest 20 % held out (the impression logs' test days), then 10 %


def catalog_values(path: Path = DEFAULT_BUNDLE / CAMPAIGNS_FILE) -> dict[int, float]:
    """advertiser id -> value per click (USD) in the shipped campaign catalog."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return {int(c["advertiser"]): float(c["value_per_click"]) for c in data["campaigns"]}


def floor_usd(slotprice_fen: np.ndarray) -> np.ndarray:
    """iPinYou floors (CNY fen CPM) in USD CPM, at the bidder's fixed rate (``bidder.openrtb``)."""
    return np.asarray(slotprice_fen, dtype=np.float64) / (100.0 * USD_TO_CNY)


def write_bid_log(path: Path, table: dict[str, np.ndarray], pctr: np.ndarray, market_mu_fen: np.ndarray,
                  market_fen: np.ndarray, market_sigma: float, seed: int) -> dict[str, Any]:
    """Simulate our bids on the impressions of ``table`` (byte columns) and write the log; returns a summary.

    A generator of its own (seeded from ``seed``) draws the policy's noise and the clicks, so the
    impression logs are the same bytes with or without the bid log.
    """
    rng = np.random.default_rng([seed, 0xB1D])
    n = len(pctr)
    values = catalog_values()
    advertiser = table["advertiser"].astype(np.int64)
    vpc = np.array([values[a] for a in advertiser.tolist()])
    first = np.isin(table["adexchange"], np.array(FIRST_PRICE_EXCHANGES, dtype=bytes))
    floor = floor_usd(table["slotprice"].astype(np.int64))
    shift = np.log(MARKET_USD_PER_FEN)
    market = market_fen * MARKET_USD_PER_FEN
    value = pctr * vpc * 1000.0
    bid = np.maximum(np.round(value * LOGGING_MEDIAN * np.exp(rng.normal(0.0, LOGGING_SPREAD, n)), 6), floor)
    bid = np.maximum(bid, 1e-6)
    won = bid > market
    paid = np.where(first, bid, np.maximum(market, floor))
    clicks = won & (rng.random(n) < pctr)
    columns = {name: table[name] for name in FEATURE_COLUMNS if name != "click"}
    columns.update({
        "click": _ints(clicks), "auction": np.where(first, b"1", b"2"), "bid": _decimal(bid), "won": _ints(won),
        "payprice": np.where(won, _decimal(paid), b"null"), "value_per_click": _decimal(vpc),
        "market_true": _decimal(market), "market_mu_true": _decimal(market_mu_fen + shift),
        "market_sigma_true": _decimal(np.full(n, market_sigma)), "pctr_true": table["pctr_true"],
    })
    with open(path, "wb") as f:
        f.write(("\t".join(COLUMNS) + "\n").encode())
        for lo in range(0, n, 100_000):
            hi = min(n, lo + 100_000)
            lines = [b"\t".join(row) for row in zip(*(columns[c][lo:hi].tolist() for c in COLUMNS))]
            f.write(b"\n".join(lines) + b"\n")
    return {"rows": n, "first_price_share": round(float(first.mean()), 4), "win_rate": round(float(won.mean()), 4),
            "truthful_win_rate": round(float((value > market).mean()), 4)}


def _ints(values: np.ndarray) -> np.ndarray:
    return np.asarray(values).astype(np.int64).astype(bytes)


def _decimal(values: np.ndarray) -> np.ndarray:
    """Six decimals (micro-dollars), the precision bids are made in."""
    return np.char.encode(np.char.mod("%.6f", np.asarray(values, dtype=np.float64)), "ascii")


# -- reading ----------------------------------------------------------------------------------------------
@dataclass
class BidLog:
    """A bid log's rows: model inputs and the logged numbers (truth arrays are for evaluation only)."""

    inputs: dict[str, np.ndarray]
    first_price: np.ndarray   # bool
    bid: np.ndarray           # USD CPM
    won: np.ndarray           # bool
    paid: np.ndarray          # USD CPM, nan on a loss
    floor: np.ndarray         # USD CPM
    clicks: np.ndarray        # 0/1
    value_per_click: np.ndarray
    market_true: np.ndarray
    market_mu_true: np.ndarray
    market_sigma_true: np.ndarray
    pctr_true: np.ndarray
    min_to_win: np.ndarray    # USD CPM on a loss whose exchange said what would have won, else nan

    @property
    def has_truth(self) -> bool:
        """Whether the log carries the market's truth (synthetic logs), for evaluation."""
        return bool(np.isfinite(self.market_mu_true).all())

    def __len__(self) -> int:
        return len(self.bid)

    def take(self, index: np.ndarray | slice) -> "BidLog":
        return BidLog(**{k: ({n: a[index] for n, a in v.items()} if isinstance(v, dict) else v[index])
                         for k, v in self.__dict__.items()})

    @property
    def split(self) -> Split:
        """The rows as a training ``Split`` (labels: won)."""
        return Split(self.inputs, self.won.astype(np.float32), self.pctr_true)


def read_bid_log(path: str | Path, spec: FeatureSpec, *, progress: bool = True) -> BidLog:
    """Featurize ``bids.log.txt`` with the bidder's featurizer and read its logged and truth columns."""
    path = Path(path)
    if path.is_dir():
        path = path / BID_LOG
    if not path.is_file():
        raise DataError(f"{path}: no such file (python -m train synth writes {BID_LOG})")
    with open(path, "rb") as f:
        header = f.readline().decode("utf-8", "replace").rstrip("\r\n").split("\t")
        missing = [c for c in LOG_COLUMNS + ("slotprice",) if c not in header]
        if missing:
            raise DataError(f"{path}:1: missing column(s) {', '.join(missing)} (expected a bid log)")
        names = LOG_COLUMNS + ("slotprice",) + tuple(c for c in TRUTH_COLUMNS + (MIN_TO_WIN,) if c in header)
        wanted = [header.index(c) for c in names]
        rows = []
        for number, raw in enumerate(f, start=2):
            parts = raw.rstrip(b"\r\n").split(b"\t")
            if len(parts) != len(header):
                raise DataError(f"{path}:{number}: expected {len(header)} tab-separated columns, got {len(parts)}")
            rows.append([parts[i] for i in wanted])
    table = {name: [r[i] for r in rows] for i, name in enumerate(names)}

    def numbers(name: str, allow_null: bool = False) -> np.ndarray:
        if name not in table:  # a truth column of a log that has none, or a log without min_to_win
            return np.full(len(rows), np.nan)
        try:
            return np.array([np.nan if (allow_null and v == b"null") else float(v) for v in table[name]])
        except ValueError as exc:
            raise DataError(f"{path}: column {name!r}: {exc}") from None

    split, _, _ = featurize_log(path, spec, progress=progress)
    if len(split) != len(rows):
        raise DataError(f"{path}: {len(rows)} lines but {len(split)} featurized")
    auction = numbers("auction")
    if not np.isin(auction, (1, 2)).all():
        raise DataError(f"{path}: column 'auction': expected 1 (first price) or 2 (second price)")
    won = numbers("won")
    return BidLog(inputs=split.inputs, first_price=auction == 1, bid=numbers("bid"), won=won == 1,
                  paid=numbers("payprice", allow_null=True), floor=floor_usd(numbers("slotprice")),
                  clicks=split.labels.astype(np.int64), value_per_click=numbers("value_per_click"),
                  market_true=numbers("market_true"), market_mu_true=numbers("market_mu_true"),
                  market_sigma_true=numbers("market_sigma_true"), pctr_true=numbers("pctr_true"),
                  min_to_win=numbers(MIN_TO_WIN, allow_null=True))


def split_bid_log(log: BidLog) -> dict[str, BidLog]:
    """Train / val / test by time (the log is in time order): the latest 20 % is test, the 10 % before val."""
    n = len(log)
    n_test = max(1, int(round(n * TEST_FRACTION)))
    n_val = max(1, int(round((n - n_test) * VAL_FRACTION)))
    return {"train": log.take(slice(0, n - n_test - n_val)), "val": log.take(slice(n - n_test - n_val, n - n_test)),
            "test": log.take(slice(n - n_test, n))}

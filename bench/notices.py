"""What a notice costs the bidder, without HTTP: signing a bid's token, checking one, recording it in the dedup
store (first and repeated), and the whole check a notice route runs (``bidder.app.count_notice``).

``python -m bench.notices [--n 20000] [--state-dir DIR]``: microseconds per call (the best of five rounds; the
store's rounds run once each, on distinct bid ids, as notices do).
"""
from __future__ import annotations

import argparse
import tempfile
import time
import timeit
from pathlib import Path

from bidder.app import Config, State, count_notice
from bidder.metrics import Metrics
from bidder.notice_store import SqliteNoticeStore
from bidder.notices import Keyring, NoticeSettings, SigningKey, micros

#: ids of typical lengths: a UUID request id, a 32-hex creative id, a model id with its time stamp
FIELDS = ("3f1c9a2e-7b1d-4c2a-9e55-0a1b2c3d4e5f", "1", "3f1c9a2e-7b1d-4c2a-9e55-0a1b2c3d4e5f-1", "bidder", "c1458",
          "5fe99fbdedaf0bec3680fd778c323983", "USD", "2", "deepfm-20261207T104121Z-abcdef")
ISSUED = 1.7e9


def measure(n: int, state_dir: Path) -> dict[str, float]:
    keys = Keyring([SigningKey("k1", b"\x11" * 32, 0)])
    token = keys.sign(ISSUED, micros(2.5), 600, *FIELDS)
    out = {"token_chars": float(len(token))}
    sign = timeit.repeat(lambda: keys.sign(ISSUED, 2_500_000, 600, *FIELDS), number=n, repeat=5)
    out["sign_us"] = min(sign) / n * 1e6
    out["verify_us"] = min(timeit.repeat(lambda: keys.verify(token), number=n, repeat=5)) / n * 1e6
    store = SqliteNoticeStore(state_dir / "store", 86_400)
    ids = [f"bid-{i}" for i in range(n)]
    started = time.perf_counter()
    for bid_id in ids:
        store.first_time(bid_id, "bill", ISSUED, ISSUED)
    out["store_first_us"] = (time.perf_counter() - started) / n * 1e6
    started = time.perf_counter()
    for bid_id in ids:
        store.first_time(bid_id, "bill", ISSUED, ISSUED)
    out["store_duplicate_us"] = (time.perf_counter() - started) / n * 1e6
    store.close()
    # the route's whole check (token, URL fields, price, window, store, metrics) on n distinct bids
    settings = NoticeSettings(url="https://bidder.example", keyring=keys, state_dir=state_dir / "route")
    state = State(Config(now=ISSUED, notices=settings), Metrics())
    queries = []
    for i in range(n):
        fields = (f"r{i}", "1", f"r{i}-1", *FIELDS[3:])
        queries.append({"t": keys.sign(ISSUED, 2_500_000, 600, *fields), "a": f"r{i}", "bid": f"r{i}-1", "p": "1.5"})
    started = time.perf_counter()
    for query in queries:
        count_notice(state, query, "bill")
    out["route_check_us"] = (time.perf_counter() - started) / n * 1e6
    state.store.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.notices", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="calls per measurement (default: %(default)s)")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="where the stores are made (default: a temporary directory)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        figures = measure(args.n, args.state_dir or Path(tmp))
    for name, value in figures.items():
        print(f"{name:20s} {value:10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

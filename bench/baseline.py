"""What a team would write in a day: the bid endpoint on FastAPI + uvicorn, plainly.

Same bundle, same catalog file, same OpenRTB mapping and feature rules as the bidder, none of its
machinery: the body is decoded with orjson into dicts, each (imp, candidate) row is a merged dict,
features are hashed in Python with `mmh3` following the bundle's spec, the model runs through one plain
`InferenceSession.run()` per request (one intra- and one inter-op thread), and pricing is a loop.
`python -m bench load` serves it as the third server, `fastapi`, so the report shows how far the
bidder is ahead of the obvious implementation; tests hold its bids equal to the bidder's on open-market
requests (it knows no private-marketplace deals).

    python -m bench.baseline --host 127.0.0.1 --port 8082 [--model BUNDLE] [--campaigns FILE] [--workers N]

Needs the `bench` extra (fastapi, uvicorn, httptools, orjson; mmh3 comes with `dev`).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import mmh3
import numpy as np
import onnxruntime as ort
import orjson
import uvicorn
from fastapi import FastAPI, Request, Response

from bench.workers import run_workers
from bidder import DEFAULT_BUNDLE
from bidder.openrtb import slotprice_from_usd_cpm
from bidder.reference import ip_prefix, os_browser
from bidder.spec import FeatureSpec, FieldSpec, load_spec

# banner.pos (OpenRTB Ad Position) → iPinYou slotvisibility, as the bidder maps it
VISIBILITY = {1: "FirstView", 4: "FirstView", 7: "FirstView", 3: "SecondView", 2: "OtherView",
              5: "OtherView", 6: "OtherView"}


# -- catalog ---------------------------------------------------------------------------------------
def load_candidates(path: Path) -> dict[tuple[int, int], list[dict[str, Any]]]:
    """Enabled creatives of the catalog file, by size. The bidder has validated the same file."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    by_size: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for campaign in data["campaigns"]:
        if not campaign.get("enabled", True):
            continue
        targeting = campaign.get("targeting") or {}
        sizes = targeting.get("sizes")
        domains, exchanges = targeting.get("domains"), targeting.get("exchanges")
        for creative in campaign["creatives"]:
            size = (creative["w"], creative["h"])
            if sizes is not None and list(size) not in sizes:
                continue
            by_size.setdefault(size, []).append({
                "campaign": campaign["id"], "advertiser": campaign["advertiser"],
                "value_per_click": float(campaign["value_per_click"]),
                "domains": set(domains) if domains is not None else None,
                "exchanges": set(exchanges) if exchanges is not None else None,
                "creative": creative["id"], "w": creative["w"], "h": creative["h"],
                "adomain": creative["adomain"], "nurl": creative.get("nurl"), "markup": creative.get("markup")})
    return by_size


def eligible(candidate: dict, domain: str | None, exchange: str | None, blocked: set[str]) -> bool:
    if candidate["domains"] is not None and domain not in candidate["domains"]:
        return False
    if candidate["exchanges"] is not None and exchange not in candidate["exchanges"]:
        return False
    return not any(d in blocked for d in candidate["adomain"])


# -- OpenRTB → iPinYou records -----------------------------------------------------------------------
def request_record(req: dict, exchange: str | None, utc_offset_hours: float) -> dict[str, Any]:
    stamp = time.gmtime(time.time() + utc_offset_hours * 3600)
    device = req.get("device") or {}
    geo = device.get("geo") or {}
    site, app = req.get("site"), req.get("app")
    if site is not None:
        domain = site.get("domain")
    elif app is not None:
        domain = app.get("bundle") or app.get("domain")
    else:
        domain = None
    tags = [segment["id"] for data in (req.get("user") or {}).get("data") or ()
            for segment in data.get("segment") or () if segment.get("id")]
    return {"weekday": stamp.tm_wday, "hour": stamp.tm_hour, "useragent": device.get("ua"),
            "IP": device.get("ip") or device.get("ipv6"), "region": geo.get("region"), "city": geo.get("city"),
            "adexchange": exchange, "domain": domain, "url": site.get("page") if site is not None else None,
            "urlid": None, "usertag": tags}


def imp_record(shared: dict[str, Any], imp: dict) -> dict[str, Any]:
    banner = imp.get("banner") or {}
    return {**shared, "slotid": imp.get("tagid"), "slotvisibility": VISIBILITY.get(banner.get("pos"), "Na"),
            "slotformat": "1" if imp.get("instl") else "0",
            "slotprice": slotprice_from_usd_cpm(imp.get("bidfloor", 0.0))}


def imp_sizes(imp: dict) -> list[tuple[int, int]]:
    """`banner.format` sizes, else `banner.w`/`h`; no banner, no sizes."""
    banner = imp.get("banner")
    if banner is None:
        return []
    sizes = [(f.get("w"), f.get("h")) for f in banner.get("format") or () if f.get("w") and f.get("h")]
    if not sizes and banner.get("w") and banner.get("h"):
        sizes = [(banner["w"], banner["h"])]
    return list(dict.fromkeys(sizes))


# -- features (the spec's rules, hashed with mmh3) -----------------------------------------------------
def canonical(value: Any) -> str | None:
    """The spec's value string: None and "" are missing, bools "1"/"0", integral floats as ints."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        if value != value:
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def hashed(text: str | None, buckets: int, seed: int) -> int:
    return 0 if text is None else 1 + mmh3.hash(text, seed, signed=False) % (buckets - 1)


def field_index(f: FieldSpec, value: Any, seed: int) -> int:
    if f.kind == "bucketized":
        return 0 if value is None else 1 + sum(1 for b in f.boundaries if float(value) > b)
    text = canonical(value)
    # weekday/hour are always present in records built here, so the spec's timestamp fallback never applies
    if text is not None and f.transform == "os_browser":
        text = os_browser(text)
    elif text is not None and f.transform == "ip_prefix":
        text = ip_prefix(text)
    return hashed(text, f.buckets, seed)


def featurize(spec: FeatureSpec, rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """The model's input feed: `sparse` [rows, single fields] and one [rows, max_len] matrix per multi field."""
    singles, multis, seed = spec.single_fields, spec.multi_fields, spec.seed
    feeds = spec.allocate(len(rows))
    for r, row in enumerate(rows):
        feeds["sparse"][r] = [field_index(f, row.get(f.source), seed) for f in singles]
        for f in multis:
            texts = [canonical(v) for v in row.get(f.source) or ()]
            indices = [hashed(t, f.buckets, seed) for t in texts if t is not None][:f.max_len]
            feeds[f.name][r, :len(indices)] = indices
    return feeds


# -- the app -----------------------------------------------------------------------------------------
def default_campaigns(model: Path) -> Path:
    beside = model / "campaigns.json"
    return beside if beside.is_file() else DEFAULT_BUNDLE / "campaigns.json"


def _json(payload: Any, status: int = 200) -> Response:
    return Response(content=orjson.dumps(payload), status_code=status, media_type="application/json")


def create_app(model: Path = DEFAULT_BUNDLE, campaigns: Path | None = None,
               utc_offset_hours: float = 0.0) -> FastAPI:
    model = Path(model)
    spec = load_spec(model)
    candidates = load_candidates(campaigns or default_campaigns(model))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model / "model.onnx"), options, providers=["CPUExecutionProvider"])
    meta = json.loads((model / "meta.json").read_text())
    model_id = meta.get("model_id", model.name)
    market_entry = (meta.get("graphs") or {}).get("market")  # first-price shading, as the bidder does
    market = (None if market_entry is None else
              ort.InferenceSession(str(model / market_entry["files"][0]), options, providers=["CPUExecutionProvider"]))
    app = FastAPI()

    @app.post("/bid")
    @app.post("/bid/{exchange}")
    async def bid(request: Request, exchange: str | None = None) -> Response:
        started = time.perf_counter()
        try:
            req = orjson.loads(await request.body())
            request_id, imps = req["id"], req["imp"]
            if not request_id or not imps or not all(imp["id"] for imp in imps):
                raise ValueError("id and imp[].id are required")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            return _json({"error": f"bad request: {exc}"}, 400)
        if req.get("cur") and "USD" not in req["cur"]:
            return Response(status_code=204)
        shared = request_record(req, exchange, utc_offset_hours)
        blocked = set(req.get("badv") or ())
        rows, owners, floors = [], [], []
        for i, imp in enumerate(imps):
            floors.append(imp.get("bidfloor", 0.0))
            if imp.get("bidfloorcur", "USD") != "USD":
                continue
            record = imp_record(shared, imp)
            for w, h in imp_sizes(imp):
                for candidate in candidates.get((w, h), ()):
                    if eligible(candidate, shared["domain"], exchange, blocked):
                        rows.append({**record, "creative": candidate["creative"],
                                     "advertiser": candidate["advertiser"], "slotwidth": w, "slotheight": h})
                        owners.append((i, candidate))
        if not rows:
            return Response(status_code=204)
        if req.get("tmax") and (time.perf_counter() - started) * 1000.0 >= req["tmax"]:
            return Response(status_code=204)
        ctr = session.run(["ctr"], featurize(spec, rows))[0][:, 0].tolist()
        best: dict[int, tuple[float, dict]] = {}
        for r, (i, candidate) in enumerate(owners):
            price = ctr[r] * candidate["value_per_click"] * 1000.0
            if price >= floors[i] and price > best.get(i, (-1.0, None))[0]:
                best[i] = (price, candidate, r)
        if market is not None and req.get("at", 2) == 1 and best:  # first price: the market graph's best bid
            shaded = sorted(best)
            bid, surplus = market.run(["bid", "surplus"], {
                "sparse": featurize(spec, [rows[best[i][2]] for i in shaded])["sparse"],
                "value": np.array([[max(round(best[i][0], 6), floors[i])] for i in shaded], dtype=np.float32),
                "floor": np.array([[floors[i]] for i in shaded], dtype=np.float32)})
            for k, i in enumerate(shaded):
                if surplus[k, 0] > 0.0:
                    best[i] = (float(bid[k, 0]), best[i][1], best[i][2])
                else:
                    del best[i]
        if not best:
            return Response(status_code=204)
        bids = []
        for i, (price, c, _) in sorted(best.items()):
            imp = imps[i]
            one = {"id": f"{request_id}-{imp['id']}", "impid": imp["id"], "price": max(round(price, 6), floors[i]),
                   "adid": c["creative"], "crid": c["creative"], "adomain": c["adomain"], "w": c["w"], "h": c["h"]}
            for key, value in (("nurl", c["nurl"]), ("cid", c["campaign"]), ("adm", c["markup"])):
                if value is not None:
                    one[key] = value
            bids.append(one)
        return _json({"id": request_id, "seatbid": [{"bid": bids, "seat": "bidder"}], "cur": "USD"})

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        return _json({"ready": True, "model": model_id})

    return app


# -- processes ---------------------------------------------------------------------------------------
def run_worker(args: argparse.Namespace, reuse_port: bool, cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    app = create_app(args.model, args.campaigns, args.utc_offset)
    # uvicorn's defaults pick uvloop and httptools when they are installed, as `pip install uvicorn[standard]` has it
    config = uvicorn.Config(app, host=args.host, port=args.port, access_log=False, log_level="warning",
                            lifespan="off")
    server = uvicorn.Server(config)
    print(f"fastapi baseline (pid {os.getpid()}) on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    if not reuse_port:
        server.run()
        return
    # One listening socket per worker, as the bidder and the echo have, so the kernel spreads connections.
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((args.host, args.port))
    server.run(sockets=[sock])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8082)
    parser.add_argument("--model", type=Path, default=DEFAULT_BUNDLE, help="model bundle (default: %(default)s)")
    parser.add_argument("--campaigns", type=Path, default=None,
                        help="catalog (default: campaigns.json beside the bundle, else the default catalog)")
    parser.add_argument("--utc-offset", type=float, default=0.0, help="hours added to UTC for weekday/hour")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes sharing the port through SO_REUSEPORT, worker i on allowed core i mod n")
    args = parser.parse_args(argv)
    if args.workers <= 1:
        run_worker(args, reuse_port=False, cpu=None)
        return 0
    return run_workers(args.workers, run_worker, lambda cpu: (args, True, cpu))


if __name__ == "__main__":
    raise SystemExit(main())

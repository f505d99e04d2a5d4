"""The OpenRTB 2.6 rules a BidResponse must keep, restated over plain JSON (never run on the bid path).

``violations(request, answer)`` lists every rule an answer breaks (empty: valid). The rules are the bid object's
(OpenRTB 2.6 §4.3.3) and the request's constraints a bid must honour (§3.2.1, §3.2.6, §3.2.11): ids, ``impid`` of
an imp in the request, ``price`` > 0 and at or above the imp's floor in the response currency, ``cur`` one the
request accepts, seats allowed by ``bseat``/``wseat``, ``adomain`` present and not blocked when the request set
``badv``, ``crid``, sizes the imp accepts (``format``, ``w``/``h``, a flexible ratio or range), ``mtype`` of the
imp's kind, ``cat``/``cattax``/``attr`` clear of ``bcat``/``battr``, ``dealid`` of one of the imp's deals (and
present in a private auction). ``tests/oracle.py`` runs it over every answer it checks.
"""
from __future__ import annotations

import json
from pathlib import Path

_TABLE = json.loads((Path(__file__).parent.parent / "bidder" / "models" / "default" / "currencies.json").read_text())
RATES = {code: rate / _TABLE["rates"][_TABLE["base"]] for code, rate in _TABLE["rates"].items()}
MTYPES = {"banner": 1, "video": 2, "audio": 3, "native": 4}


def accepts_size(imp: dict, w: int, h: int) -> bool:
    banner = imp.get("banner") or {}
    formats = banner.get("format") or []
    for f in formats:
        if f.get("w") and f.get("h"):
            if (f["w"], f["h"]) == (w, h):
                return True
        elif f.get("wratio") and f.get("hratio") and w * f["hratio"] == h * f["wratio"] and w >= (f.get("wmin") or 0):
            return True
    if banner.get("w") and banner.get("h") and (banner["w"], banner["h"]) == (w, h):
        return not any(f.get("w") and f.get("h") for f in formats)
    if not formats and not (banner.get("w") and banner.get("h")) and any(
            banner.get(k) for k in ("wmin", "wmax", "hmin", "hmax")):
        return ((banner.get("wmin") or 0) <= w <= (banner.get("wmax") or w)
                and (banner.get("hmin") or 0) <= h <= (banner.get("hmax") or h))
    return False


def violations(request: dict, answer: dict) -> list[str]:
    out: list[str] = []
    if answer.get("id") != request.get("id"):
        out.append(f"response id {answer.get('id')!r} is not the request's {request.get('id')!r}")
    cur = answer.get("cur", "USD")
    if request.get("cur") and cur not in request["cur"]:
        out.append(f"cur {cur!r} is not one of the request's {request['cur']}")
    seatbids = answer.get("seatbid")
    if not isinstance(seatbids, list) or not seatbids:
        return out + ["a 200 response needs a non-empty seatbid"]
    imps = {imp["id"]: imp for imp in request["imp"]}
    bid_ids: set = set()
    bid_imps: set = set()
    bcat = set(request.get("bcat") or [])
    badv = set(request.get("badv") or [])
    for s, seatbid in enumerate(seatbids):
        seat = seatbid.get("seat")
        if seat in (request.get("bseat") or []) or (request.get("wseat") and seat not in request["wseat"]):
            out.append(f"seatbid[{s}]: seat {seat!r} is blocked by bseat/wseat")
        if not seatbid.get("bid"):
            out.append(f"seatbid[{s}]: no bid")
        for b, bid in enumerate(seatbid.get("bid") or []):
            where = f"seatbid[{s}].bid[{b}]"
            out += [f"{where}: {problem}" for problem in _bid_violations(request, imps, bid, cur, bcat, badv)]
            if bid.get("id") in bid_ids:
                out.append(f"{where}: duplicate bid id {bid.get('id')!r}")
            if bid.get("impid") in bid_imps:
                out.append(f"{where}: a second bid for imp {bid.get('impid')!r}")
            bid_ids.add(bid.get("id"))
            bid_imps.add(bid.get("impid"))
    return out


def _bid_violations(request: dict, imps: dict, bid: dict, cur: str, bcat: set, badv: set) -> list[str]:
    out = []
    for field in ("id", "impid", "crid"):
        if not isinstance(bid.get(field), str) or not bid[field]:
            out.append(f"{field} must be a non-empty string, got {bid.get(field)!r}")
    imp = imps.get(bid.get("impid"))
    if imp is None:
        return out + [f"impid {bid.get('impid')!r} is no imp of the request"]
    price = bid.get("price")
    if not isinstance(price, (int, float)) or isinstance(price, bool) or price <= 0:
        out.append(f"price must be a positive number, got {price!r}")
    else:
        floor_cur = imp.get("bidfloorcur", "USD")
        floor = imp.get("bidfloor", 0.0)
        if floor_cur != cur:
            floor = floor / RATES[floor_cur] * RATES[cur]
        deal = next((d for d in (imp.get("pmp") or {}).get("deals") or [] if d.get("id") == bid.get("dealid")), None)
        if deal is not None and deal.get("bidfloor") is not None:
            floor = deal["bidfloor"] / RATES[deal.get("bidfloorcur", "USD")] * RATES[cur]
        if price < floor * (1 - 1e-9):
            out.append(f"price {price} is under the floor {floor} {cur}")
    if badv:
        if not bid.get("adomain"):
            out.append("adomain is required when the request sets badv")
        elif set(bid["adomain"]) & badv:
            out.append(f"adomain {bid['adomain']} is blocked by badv")
    w, h = bid.get("w"), bid.get("h")
    if not isinstance(w, int) or not isinstance(h, int) or not accepts_size(imp, w, h):
        out.append(f"size {bid.get('w')}x{bid.get('h')} is not one the imp accepts")
    kinds = [MTYPES[kind] for kind in MTYPES if imp.get(kind) is not None]
    if bid.get("mtype") not in kinds:
        out.append(f"mtype {bid.get('mtype')!r} is not the imp's kind ({kinds})")
    cats = set(bid.get("cat") or [])
    if cats and bid.get("cattax") is None:
        out.append("cat without cattax")
    if bcat and (cats | {c.split('-')[0] for c in cats}) & bcat and request.get("cattax", 1) == bid.get("cattax", 1):
        out.append(f"cat {sorted(cats)} is blocked by bcat")
    battr = set((imp.get("banner") or {}).get("battr") or [])
    if set(bid.get("attr") or []) & battr:
        out.append(f"attr {bid.get('attr')} is blocked by battr")
    pmp = imp.get("pmp") or {}
    dealids = {d.get("id") for d in pmp.get("deals") or []}
    if bid.get("dealid") is not None and bid["dealid"] not in dealids:
        out.append(f"dealid {bid['dealid']!r} is no deal of the imp")
    if pmp.get("private_auction") == 1 and bid.get("dealid") is None:
        out.append("a private auction's bid needs a dealid")
    if bid.get("exp") is not None and (not isinstance(bid["exp"], int) or bid["exp"] <= 0):
        out.append(f"exp must be a positive integer, got {bid['exp']!r}")
    return out

"""What the bidder should answer, stated plainly and independently of ``bidder.engine``.

The rules are the documented ones (README, docs/serving.md, docs/catalog.md, docs/first-price.md), written out
again over plain JSON: the OpenRTB → iPinYou mapping, catalog eligibility (size, domain and exchange targeting,
``badv``, disabled campaigns), one scored row per (imp, eligible creative), CPM = pCTR × value per click × 1000, a
bid only at or above the imp's floor, the best bid per imp; in a first-price auction (``at`` = 1) with a bundle
that has a win-price model, that bid lowered to the grid bid of highest expected surplus (``shade``: 64 bids from
the floor up to the value, searched by brute force over P(win) from plain ONNX Runtime on ``market.onnx``). Only
the models are shared with the bidder: pCTRs come from ``Scorer.predict`` over full records, the public scoring
API, and P(win) from the market graph's ``win`` output.

The receive time sets weekday and hour, so callers give the time window the request was in flight
(``before``, ``after``) and accept the answer if it is right for one of the (weekday, hour) in force then.
Below: helpers that ask a bidder app through the aiohttp test client and check each answer this way,
a second catalog, and a generator of varied bid requests.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from prometheus_client.parser import text_string_to_metric_families

from bidder.scorer import Scorer
from response_rules import violations

#: the shipped currency table (docs/conformance.md): units per USD; floors in USD become CNY fen at its CNY rate
_TABLE = json.loads((Path(__file__).parent.parent / "bidder" / "models" / "default" / "currencies.json").read_text())
RATES = {code: rate / _TABLE["rates"]["USD"] for code, rate in _TABLE["rates"].items()}
#: iPinYou ``slotprice`` is CNY fen CPM; OpenRTB floors are USD CPM (converted from ``bidfloorcur``).
FEN_PER_USD = RATES["CNY"] * 100
SLOTPRICE_CAP = 10**12
#: OpenRTB ``banner.pos`` → iPinYou ``slotvisibility`` (docs/serving.md): 1, 4, 7 FirstView; 3 SecondView;
#: 2, 5, 6 OtherView.
VISIBILITY = {1: "FirstView", 4: "FirstView", 7: "FirstView", 3: "SecondView",
              2: "OtherView", 5: "OtherView", 6: "OtherView"}
#: The parity contract (DESIGN): a served probability may differ from the canonical graph's by 1e-6. A price
#: may therefore differ by value_per_click × 1000 × 1e-6, and creatives whose prices are that close are ties.
CTR_TOLERANCE = 1e-6


@dataclass
class ImpOutcome:
    imp_id: str
    reason: str | None = None                 # why no bid; None when a bid is expected
    price: float = 0.0                        # USD CPM of the best bid, as bid (micro-dollars, >= floor)
    value: float = 0.0                        # pCTR × value per click × 1000 of the best, unrounded
    values: list[float] = field(default_factory=list)  # every candidate's, best first
    winners: dict[str, dict] = field(default_factory=dict)  # creative id → its bid fields; several on near-ties
    tolerance: float = 0.0
    uncertain: bool = False                   # the best is within the tolerance of the floor: no bid is right too


@dataclass
class Expectation:
    status: int                               # 200 or 204
    reason: str | None = None                 # the request's no-bid reason when every imp shares it
    imps: list[ImpOutcome] = field(default_factory=list)
    weekday: int = -1
    hour: int = -1
    currency: str = "USD"                     # the response's: the first of ``cur`` with a rate (USD if listed)

    @property
    def imp_reasons(self) -> list[str]:
        return [imp.reason for imp in self.imps if imp.reason is not None]


def clock(now: float, utc_offset_hours: float) -> tuple[int, int]:
    stamp = time.gmtime(now + utc_offset_hours * 3600)
    return stamp.tm_wday, stamp.tm_hour


def sizes_of(imp: dict) -> list[tuple[int, int]]:
    """Banner sizes an imp accepts: ``format`` when it names any, else ``w``/``h``; 0 is no size."""
    banner = imp.get("banner")
    if banner is None:
        return []
    sizes = []
    for f in banner.get("format") or []:
        size = (f.get("w"), f.get("h"))
        if size[0] and size[1] and size not in sizes:
            sizes.append(size)
    if not sizes and banner.get("w") and banner.get("h"):
        sizes.append((banner["w"], banner["h"]))
    return sizes


def eligible_creatives(catalog: dict, size: tuple[int, int], domain: str | None, exchange: str | None,
                       badv: list[str]) -> list[tuple[dict, dict]]:
    """(campaign, creative) pairs of the raw catalog that may fill ``size`` here."""
    out = []
    for campaign in catalog["campaigns"]:
        if campaign.get("enabled", True) is False:
            continue
        targeting = campaign.get("targeting") or {}
        if targeting.get("domains") is not None and domain not in targeting["domains"]:
            continue
        if targeting.get("exchanges") is not None and exchange not in targeting["exchanges"]:
            continue
        for creative in campaign["creatives"]:
            if (creative["w"], creative["h"]) != size:
                continue
            if targeting.get("sizes") is not None and [creative["w"], creative["h"]] not in targeting["sizes"]:
                continue
            if any(d in badv for d in creative["adomain"]):
                continue
            out.append((campaign, creative))
    return out


# -- conformance (docs/conformance.md), restated over the raw request and catalog --------------------------------
def personal_ok(request: dict) -> bool:
    """Whether the request's personal data may be used: no COPPA, a TCF v2 consent to purposes 1, 3 and 4 where
    GDPR applies, no CCPA opt-out, no GPP section other than 2 and 6."""
    regs = request.get("regs")
    if regs is None:
        return True
    ext = regs.get("ext") or {}
    sections = [s for s in regs.get("gpp_sid") or [] if isinstance(s, int) and not isinstance(s, bool)]
    if regs.get("coppa") in (1, "1"):
        return False
    if regs.get("gdpr") in (1, "1") or ext.get("gdpr") in (1, "1") or 2 in sections:
        user = request.get("user") or {}
        consent = user.get("consent", (user.get("ext") or {}).get("consent"))
        if not {1, 3, 4} <= tcf_consented_purposes(consent):
            return False
    us_privacy = regs.get("us_privacy", ext.get("us_privacy"))
    if us_privacy is not None or 6 in sections:
        if not (isinstance(us_privacy, str) and len(us_privacy) == 4 and us_privacy[0] == "1"
                and us_privacy[2] in "N-"):
            return False
    return not any(s > 0 and s not in (2, 6) for s in sections)


def tcf_consented_purposes(consent) -> set[int]:
    """Purposes a TCF v2 string consents to, read as a string of bits (empty when it is none)."""
    import base64
    if not isinstance(consent, str) or not consent:
        return set()
    core = consent.split(".")[0]
    try:
        raw = base64.urlsafe_b64decode(core + "=" * (-len(core) % 4))
    except ValueError:
        return set()
    bits = "".join(f"{byte:08b}" for byte in raw)
    if len(bits) < 176 or int(bits[:6], 2) != 2:
        return set()
    return {k + 1 for k, bit in enumerate(bits[152:176]) if bit == "1"}


def excluded_by(request: dict, imp: dict, campaign: dict, creative: dict, personal: bool) -> str | None:
    """The first conformance rule that keeps ``creative`` off ``imp`` (docs/conformance.md's order), or None."""
    cats = set(creative.get("cat") or [])
    cats |= {c.split("-")[0] for c in cats}
    bcat = request.get("bcat") or []
    if bcat and cats:
        if request.get("cattax", 1) != 1:
            return "unknown_cattax"
        if cats & set(bcat):
            return "blocked_category"
    if creative.get("bundle") is not None and creative["bundle"] in (request.get("bapp") or []):
        return "blocked_app"
    if campaign.get("requires_consent") and not personal:
        return "requires_consent"
    banner = imp.get("banner") or {}
    if set(creative.get("attr") or []) & set(banner.get("battr") or []):
        return "blocked_attribute"
    if creative.get("btype") is not None and creative["btype"] in (banner.get("btype") or []):
        return "blocked_banner_type"
    if banner.get("mimes") and not set(creative.get("mimes") or []) <= set(banner["mimes"]):
        return "unsupported_mime"
    if not set(creative.get("api") or []) <= set(banner.get("api") or []):
        return "unsupported_api"
    return None


def seat_allowed(request: dict, seat: str) -> bool:
    return seat not in (request.get("bseat") or []) and (not request.get("wseat") or seat in request["wseat"])


def flexible_sizes(imp: dict, catalog: dict) -> list[tuple[int, int]]:
    """The catalog's sizes a flexible format (wratio:hratio, wmin) or a banner's w/h range accepts."""
    banner = imp.get("banner") or {}
    sizes = sorted({(c["w"], c["h"]) for campaign in catalog["campaigns"] for c in campaign["creatives"]})
    out = []
    for f in banner.get("format") or []:
        if not (f.get("w") and f.get("h")) and f.get("wratio") and f.get("hratio"):
            out += [(w, h) for w, h in sizes if w * f["hratio"] == h * f["wratio"] and w >= (f.get("wmin") or 0)]
    if not banner.get("format") and not (banner.get("w") and banner.get("h")) and any(
            banner.get(k) for k in ("wmin", "wmax", "hmin", "hmax")):
        out += [(w, h) for w, h in sizes if (banner.get("wmin") or 0) <= w <= (banner.get("wmax") or w)
                and (banner.get("hmin") or 0) <= h <= (banner.get("hmax") or h)]
    return out


def shared_fields(request: dict, exchange: str | None, weekday: int, hour: int) -> dict[str, Any]:
    device = request.get("device") or {}
    geo = device.get("geo") or {}
    site, app = request.get("site"), request.get("app")
    if site is not None:
        domain, url = site.get("domain"), site.get("page")
    elif app is not None:
        domain, url = app.get("bundle") or app.get("domain"), None
    else:
        domain, url = None, None
    tags = [segment["id"] for data in (request.get("user") or {}).get("data") or []
            for segment in data.get("segment") or [] if segment.get("id")]
    out = {"weekday": weekday, "hour": hour, "useragent": device.get("ua"),
           "IP": device.get("ip") or device.get("ipv6"), "region": geo.get("region"), "city": geo.get("city"),
           "adexchange": exchange, "domain": domain, "url": url, "urlid": None, "usertag": tags}
    if not personal_ok(request):  # the personal fields are blanked; the region stays
        out.update(IP=None, city=None, usertag=[])
    return out


def floor_usd(imp: dict) -> float | None:
    """The imp's floor in USD, or None when its currency has no rate."""
    rate = RATES.get(imp.get("bidfloorcur", "USD"))
    return None if rate is None else imp.get("bidfloor", 0.0) / rate


def slot_fields(imp: dict) -> dict[str, Any]:
    banner = imp.get("banner") or {}
    fen = floor_usd(imp) * FEN_PER_USD
    return {"slotid": imp.get("tagid"), "slotvisibility": VISIBILITY.get(banner.get("pos"), "Na"),
            "slotformat": "1" if imp.get("instl") else "0",
            "slotprice": SLOTPRICE_CAP if fen >= SLOTPRICE_CAP else int(round(fen))}


def expect(request: dict, catalog: dict, scorer, exchange: str | None, now: float,
           utc_offset_hours: float = 0.0) -> Expectation:
    """The answer to ``request`` received at ``now`` (tmax aside: the caller keeps it generous or absent)."""
    weekday, hour = clock(now, utc_offset_hours)
    if request.get("cur") and "USD" not in request["cur"] and not any(c in RATES for c in request["cur"]):
        return Expectation(204, "currency", [], weekday, hour)
    if not seat_allowed(request, "bidder") and not any(imp.get("pmp") for imp in request["imp"]):
        return Expectation(204, "blocked_seat", [], weekday, hour)
    shared = shared_fields(request, exchange, weekday, hour)
    personal = personal_ok(request)
    cur = request.get("cur") or ["USD"]
    currency = "USD" if "USD" in cur else next(c for c in cur if c in RATES)
    badv = request.get("badv") or []
    outcomes: list[ImpOutcome] = []
    records: list[dict] = []
    rows: list[tuple[int, dict, dict]] = []  # (imp position, campaign, creative) per record
    for position, imp in enumerate(request["imp"]):
        outcome = ImpOutcome(imp["id"])
        outcomes.append(outcome)
        if floor_usd(imp) is None:
            outcome.reason = "floor_currency"
            continue
        if imp.get("banner") is None:
            outcome.reason = "unsupported_format"
            continue
        sizes = list(dict.fromkeys(sizes_of(imp) + flexible_sizes(imp, catalog)))
        candidates = [pair for size in sizes
                      for pair in eligible_creatives(catalog, size, shared["domain"], exchange, badv)]
        if not sizes or not candidates:
            outcome.reason = "no_eligible_creative"
            continue
        if not seat_allowed(request, "bidder"):
            outcome.reason = "blocked_seat"
            continue
        rules = [excluded_by(request, imp, campaign, creative, personal) for campaign, creative in candidates]
        if all(rules):  # counted under the rule, in the documented order, that removed the last of them
            order = ("blocked_category", "unknown_cattax", "blocked_app", "requires_consent", "blocked_attribute",
                     "blocked_banner_type", "unsupported_mime", "unsupported_api")
            outcome.reason = max(rules, key=order.index)
            continue
        candidates = [pair for pair, rule in zip(candidates, rules) if rule is None]
        for campaign, creative in candidates:
            records.append({**shared, **slot_fields(imp), "creative": creative["id"],
                            "advertiser": campaign["advertiser"], "slotwidth": creative["w"],
                            "slotheight": creative["h"]})
            rows.append((position, campaign, creative))
    ctr = scorer.predict(records).tolist() if records else []
    offers: dict[int, list[tuple[float, float, dict, dict]]] = {}
    for p, (position, campaign, creative) in zip(ctr, rows):
        value = campaign["value_per_click"]
        offers.setdefault(position, []).append((p * value * 1000.0, value * 1000.0 * CTR_TOLERANCE,
                                                campaign, creative))
    first_price = request.get("at", 2) == 1 and market_session(scorer) is not None
    for position, offered in offers.items():
        outcome = outcomes[position]
        floor = floor_usd(request["imp"][position])
        outcome.values = sorted((price for price, *_ in offered), reverse=True)
        best = outcome.values[0]
        # a creative within twice the tolerance of the best may win instead, at its own price
        outcome.tolerance = 2 * max(tol for _, tol, *_ in offered)
        if best < floor - outcome.tolerance:
            outcome.reason = "below_floor"
            continue
        outcome.uncertain = best < floor + outcome.tolerance  # at the floor, within the tolerance: bid or not
        outcome.value = best
        outcome.price = max(round(best, 6), floor)  # micro-dollars, never under the floor
        if first_price and not outcome.uncertain:
            record = records[next(r for r, row in enumerate(rows) if row[0] == position)]
            shaded = shade(scorer, record, outcome.price, floor, outcome.tolerance)  # the value as bid at 2
            if shaded is None:
                outcome.reason = "no_surplus"
                continue
            outcome.price, outcome.tolerance = shaded
        for price, _, campaign, creative in offered:
            if price >= floor - outcome.tolerance and price >= best - outcome.tolerance:
                outcome.winners[creative["id"]] = bid_fields(request, request["imp"][position], campaign, creative)
    if any(outcome.reason is None for outcome in outcomes):
        return Expectation(200, None, outcomes, weekday, hour, currency)
    reasons = {outcome.reason for outcome in outcomes}
    return Expectation(204, reasons.pop() if len(reasons) == 1 else None, outcomes, weekday, hour, currency)


GRID = 64  # docs/first-price.md: the first-price search tries floor + (value − floor)·k/64, k = 0..63
_markets: dict[Path, ort.InferenceSession | None] = {}


def market_session(scorer) -> ort.InferenceSession | None:
    """Plain ONNX Runtime on the bundle's win-price graph (meta.json ``graphs.market``); None without one."""
    if scorer.bundle not in _markets:
        entry = (scorer.meta.get("graphs") or {}).get("market")
        _markets[scorer.bundle] = (None if entry is None else
                                   ort.InferenceSession(str(scorer.bundle / entry["files"][0]),
                                                        providers=["CPUExecutionProvider"]))
    return _markets[scorer.bundle]


def shade(scorer, record: dict, value: float, floor: float, tolerance: float) -> tuple[float, float] | None:
    """(first-price bid, its tolerance) for an imp worth ``value``, or None when no bid has a positive
    expected surplus: brute force over the grid with P(win) from the market graph.

    The value is known to ``tolerance``; the bid is the one at ``value``, its tolerance the farthest bid of
    highest surplus (to a relative 1e-5, the graph's float32 arithmetic) for any value within the tolerance.
    """
    session = market_session(scorer)
    inputs = scorer.spec.allocate(1)
    scorer.featurizer.transform_into(inputs, [record])
    results = []
    for v in (value, value - tolerance, value + tolerance):
        grid = [floor + (v - floor) * k / GRID for k in range(GRID)]
        (win,) = session.run(["win"], {"sparse": inputs["sparse"], "value": np.array([[v]], dtype=np.float32),
                                       "floor": np.array([[floor]], dtype=np.float32)})
        surplus = [(v - b) * float(p) for b, p in zip(grid, win[0])]
        top = max(surplus)
        results.append((top, [round(b, 6) for b, gain in zip(grid, surplus) if gain >= top - 1e-5 * abs(top)],
                        grid[surplus.index(top)]))
    top, _, bid = results[0]
    if top <= 0.0:
        return None
    price = max(round(bid, 6), floor)
    spread = max(abs(max(b, floor) - price) for _, near, _ in results for b in near)
    return price, spread + 1e-6


def bid_fields(request: dict, imp: dict, campaign: dict, creative: dict) -> dict[str, Any]:
    """The fields of the bid for ``creative`` on ``imp`` (price aside), as the README's example shows them: with
    the creative's categories (and their taxonomy), attributes and the markup type (1: banner)."""
    out = {"id": f"{request['id']}-{imp['id']}", "impid": imp["id"], "adid": creative["id"], "crid": creative["id"],
           "adomain": creative["adomain"], "w": creative["w"], "h": creative["h"], "cid": campaign["id"], "mtype": 1}
    if "nurl" in creative:
        out["nurl"] = creative["nurl"]
    if "markup" in creative:
        out["adm"] = creative["markup"]
    if creative.get("cat"):
        out["cat"] = list(dict.fromkeys(creative["cat"]))
        out["cattax"] = creative.get("cattax", 1)
    if creative.get("attr"):
        out["attr"] = list(dict.fromkeys(creative["attr"]))
    return out


def mismatch(expectation: Expectation, status: int, answer: dict | None, request: dict) -> str | None:
    """Why the answer is not the expected one; None when it is (then ``expectation`` is settled: an uncertain
    imp not bid on becomes a below-floor no-bid, and the status is the answer's)."""
    certain = any(imp.reason is None and not imp.uncertain for imp in expectation.imps)
    possible = any(imp.reason is None for imp in expectation.imps)
    if status == 204 and certain or status == 200 and not possible or status not in (200, 204):
        return f"status {status}, expected {expectation.status} ({[(i.imp_id, i.reason) for i in expectation.imps]})"
    if status == 204:
        settle(expectation, {})
        return None
    if answer.get("id") != request["id"] or answer.get("cur") != expectation.currency:
        return f"response id/cur {answer.get('id')!r}/{answer.get('cur')!r}"
    bids = [bid for seat in answer.get("seatbid", []) for bid in seat.get("bid", [])]
    if any(seat.get("seat") != "bidder" for seat in answer.get("seatbid", [])):
        return "seat is not 'bidder'"
    by_imp: dict[str, dict] = {}
    for bid in bids:
        if bid.get("impid") in by_imp:
            return f"two bids for imp {bid.get('impid')!r}"
        by_imp[bid.get("impid")] = bid
    for outcome in expectation.imps:
        bid = by_imp.pop(outcome.imp_id, None)
        if outcome.reason is not None:
            if bid is not None:
                return f"imp {outcome.imp_id!r}: bid {bid} where no bid is expected ({outcome.reason})"
            continue
        if bid is None:
            if outcome.uncertain:
                continue
            return f"imp {outcome.imp_id!r}: no bid, expected {outcome.price} for one of {sorted(outcome.winners)}"
        expected = outcome.winners.get(bid.get("crid"))
        if expected is None:
            return (f"imp {outcome.imp_id!r}: creative {bid.get('crid')!r} at {bid.get('price')}, expected one of "
                    f"{sorted(outcome.winners)} at {outcome.price}")
        fields = {k: v for k, v in bid.items() if k != "price"}
        if fields != expected:
            return f"imp {outcome.imp_id!r}: bid fields {fields}, expected {expected}"
        imp = next(imp for imp in request["imp"] if imp["id"] == outcome.imp_id)
        rate = RATES[expectation.currency]  # prices are worked out in USD, bid in the response's currency
        floor = (imp.get("bidfloor", 0.0) if imp.get("bidfloorcur", "USD") == expectation.currency
                 else floor_usd(imp) * rate)
        price = max(round(outcome.price * rate, 6), floor) if rate != 1.0 else outcome.price
        if not isinstance(bid.get("price"), float) or bid["price"] < floor:
            return f"imp {outcome.imp_id!r}: price {bid.get('price')!r} under the floor {floor}"
        if not math.isclose(bid["price"], price, rel_tol=0.0, abs_tol=(outcome.tolerance + 1e-6) * rate):
            return f"imp {outcome.imp_id!r}: price {bid['price']}, expected {price} (±{outcome.tolerance})"
        if round(bid["price"], 6) != bid["price"] and bid["price"] != floor:  # a bid at the floor is the floor
            return f"imp {outcome.imp_id!r}: price {bid['price']} is not in micro-dollars"
    if by_imp:
        return f"bids for imps not in the request: {sorted(by_imp)}"
    settle(expectation, {bid.get("impid") for bid in bids})
    return None


def settle(expectation: Expectation, bid_imps) -> None:
    if not any(imp.uncertain for imp in expectation.imps):
        return
    for imp in expectation.imps:
        if imp.uncertain and imp.imp_id not in bid_imps:
            imp.reason = "below_floor"
    if all(imp.reason is not None for imp in expectation.imps):
        reasons = {imp.reason for imp in expectation.imps}
        expectation.status, expectation.reason = 204, reasons.pop() if len(reasons) == 1 else None
    else:
        expectation.status = 200


def check(request: dict, catalog: dict, scorer, exchange: str | None, before: float, after: float,
          status: int, answer: dict | None, utc_offset_hours: float = 0.0) -> Expectation:
    """Asserts the answer is right for the clock at ``before`` or at ``after``; returns the expectation met."""
    expectations = [expect(request, catalog, scorer, exchange, before, utc_offset_hours)]
    if clock(after, utc_offset_hours) != clock(before, utc_offset_hours):  # an hour turned while in flight
        expectations.append(expect(request, catalog, scorer, exchange, after, utc_offset_hours))
    problems = []
    for expectation in expectations:
        problem = mismatch(expectation, status, answer, request)
        if problem is None:
            return expectation
        problems.append(f"at weekday {expectation.weekday} hour {expectation.hour}: {problem}")
    raise AssertionError(f"request {request['id']} via exchange {exchange!r}: " + "; ".join(problems)
                         + f"\nrequest: {json.dumps(request)[:600]}\nanswer: {json.dumps(answer)[:600]}")


# -- asking the bidder (aiohttp test client) ------------------------------------------------------------
def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


_scorers: dict[Path, Scorer] = {}


def oracle_scorer(bundle: Path) -> Scorer:
    if bundle not in _scorers:
        _scorers[bundle] = Scorer(bundle)
    return _scorers[bundle]


def raw_catalog(path: Path) -> dict:
    return json.loads(Path(path).read_text())


async def post_bid(client, request: dict | bytes, exchange: str | None = None, **kwargs):
    """(status, answer or None, time sent, time answered); every bid is held to the OpenRTB 2.6 bid rules
    (tests/response_rules.py)."""
    body = request if isinstance(request, bytes) else json.dumps(request).encode()
    before = time.time()
    response = await client.post("/bid" if exchange is None else f"/bid/{exchange}", data=body, **kwargs)
    answer = await response.json() if response.status == 200 else None
    after = time.time()
    if response.status not in (200, 204):
        raise AssertionError(f"{response.status}: {await response.text()}")
    if answer is not None:
        problems = violations(json.loads(body), answer)
        assert not problems, f"the response breaks OpenRTB's bid rules: {problems}\nanswer: {answer}"
    return response.status, answer, before, after


async def bid_and_check(client, request: dict, catalog: dict, bundle: Path, exchange: str | None = None,
                        utc_offset_hours: float = 0.0) -> tuple[Expectation, dict | None]:
    status, answer, before, after = await post_bid(client, request, exchange)
    expectation = check(request, catalog, oracle_scorer(bundle), exchange, before, after, status, answer,
                               utc_offset_hours)
    return expectation, answer


# -- a second catalog: targeting, a disabled campaign, size filters, markup-only, other values per click --
def second_catalog() -> dict:
    def creative(cid: str, w: int, h: int, domain: str, markup: bool = False) -> dict:
        out = {"id": cid, "w": w, "h": h, "adomain": [domain]}
        if markup:
            out["markup"] = f"<a href='https://{domain}/'><img src='https://cdn.example/{cid}.png'></a>"
        else:
            out["nurl"] = f"https://win.second.example/w?crid={cid}&p=${{AUCTION_PRICE}}"
        return out

    return {"campaigns": [
        {"id": "k-books", "advertiser": 3358, "value_per_click": 2.4, "creatives": [
            creative("k-books-300", 300, 250, "books.example"), creative("k-books-728", 728, 90, "books.example"),
            creative("k-books-320", 320, 50, "books.example")]},
        {"id": "k-shoes", "advertiser": 2821, "value_per_click": 0.35, "creatives": [
            creative("k-shoes-300", 300, 250, "shoes.example"), creative("k-shoes-160", 160, 600, "shoes.example")]},
        {"id": "k-news-only", "advertiser": 1458, "value_per_click": 3.1,
         "targeting": {"domains": ["news.example", "www.foobar.com"]}, "creatives": [
            creative("k-news-300", 300, 250, "travel.example", markup=True),
            creative("k-news-728", 728, 90, "travel.example", markup=True)]},
        {"id": "k-exchange-3", "advertiser": 2259, "value_per_click": 1.9, "targeting": {"exchanges": ["3"]},
         "creatives": [creative("k-ex3-300", 300, 250, "milk.example"), creative("k-ex3-320", 320, 50, "milk.example")]},
        {"id": "k-sized", "advertiser": 3427, "value_per_click": 1.2, "targeting": {"sizes": [[728, 90]]},
         "creatives": [creative("k-sized-300", 300, 250, "oil.example"), creative("k-sized-728", 728, 90, "oil.example")]},
        {"id": "k-paused", "advertiser": 3476, "value_per_click": 50.0, "enabled": False,
         "creatives": [creative("k-paused-300", 300, 250, "tire.example")]},
    ]}


# -- generated requests ---------------------------------------------------------------------------------
USER_AGENTS = [
    "Mozilla/5.0 (Windows NT 6.1; WOW64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/27.0.1453.94 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 6_1_4 like Mac OS X) AppleWebKit/536.26 (KHTML, like Gecko) Mobile/10B350",
    "Mozilla/4.0 (compatible; MSIE 8.0; Windows NT 5.1; Trident/4.0)",
    None,
]
DOMAINS = ["news.example", "www.foobar.com", "trqRTuT-GNTYJNKbuKz", "blog.example", None]
SEGMENTS = ["10006", "10024", "10031", "10048", "10057", "13042", "10063", "16706"]
EXCHANGES = [None, "1", "2", "3"]


def generate_requests(catalog: dict, count: int, seed: int) -> list[tuple[str | None, dict]]:
    """(exchange route, BidRequest) pairs: several imps, sizes, floors, badv, site or app, tmax."""
    rng = random.Random(seed)
    sizes = sorted({(c["w"], c["h"]) for campaign in catalog["campaigns"] for c in campaign["creatives"]})
    adomains = sorted({d for campaign in catalog["campaigns"] for c in campaign["creatives"] for d in c["adomain"]})
    out = []
    for n in range(count):
        imps = []
        for j in range(rng.choice([1, 1, 2, 2, 3, 4])):
            imp: dict[str, Any] = {"id": rng.choice([str(j + 1), f"imp-{n}-{j}"])}
            kind = rng.random()
            if kind < 0.06:
                imp["video"] = {"mimes": ["video/mp4"], "w": 640, "h": 480}
            elif kind < 0.55:
                w, h = rng.choice(sizes + [(1, 1)])
                imp["banner"] = {"w": w, "h": h}
            else:
                formats = [{"w": w, "h": h} for w, h in rng.sample(sizes, k=min(len(sizes), rng.randint(1, 3)))]
                if rng.random() < 0.2:
                    formats.append({"w": 0, "h": 0})
                imp["banner"] = {"format": formats}
                if rng.random() < 0.3:
                    imp["banner"].update(w=300, h=250)  # format wins over w/h
            if "banner" in imp and rng.random() < 0.7:
                imp["banner"]["pos"] = rng.randint(0, 7)
            floor = rng.choice([None, 0.0, 0.01, 0.5, rng.uniform(0, 30), rng.uniform(0, 8)])
            if floor is not None:
                imp["bidfloor"] = round(floor, rng.choice([2, 4, 6]))
            if rng.random() < 0.05:
                imp["bidfloorcur"] = "XTS"
            elif rng.random() < 0.3:
                imp["bidfloorcur"] = "USD"
            if rng.random() < 0.8:
                imp["tagid"] = f"slot-{rng.randint(0, 40)}"
            if rng.random() < 0.15:
                imp["instl"] = 1
            imps.append(imp)
        request: dict[str, Any] = {"id": f"gen-{seed}-{n}", "imp": imps}
        domain = rng.choice(DOMAINS)
        if rng.random() < 0.75:
            request["site"] = {"domain": domain, "page": f"https://{domain}/p/{rng.randint(0, 99)}"} if domain \
                else {"page": "https://nowhere.example/"}
        else:
            request["app"] = {"bundle": domain or "com.example.app"}
        if rng.random() < 0.85:
            device: dict[str, Any] = {"ua": rng.choice(USER_AGENTS)}
            if rng.random() < 0.8:
                device["ip"] = f"{rng.randint(1, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
            else:
                device["ipv6"] = "2001:db8::%x" % rng.randint(1, 0xffff)
            if rng.random() < 0.7:
                device["geo"] = {"region": str(rng.randint(0, 400)), "city": str(rng.randint(0, 400))}
            request["device"] = device
        if rng.random() < 0.7:
            request["user"] = {"data": [{"segment": [{"id": s} for s in rng.sample(SEGMENTS, rng.randint(0, 5))]}]}
        if rng.random() < 0.3:
            request["badv"] = rng.sample(adomains, rng.randint(1, 3))
        roll = rng.random()
        if roll < 0.05:
            request["cur"] = ["XTS"]
        elif roll < 0.4:
            request["cur"] = rng.choice([["USD"], ["EUR", "USD"]])
        if rng.random() < 0.4:
            request["tmax"] = rng.choice([120, 200, 500])
        out.append((rng.choice(EXCHANGES), request))
    auctions = random.Random(seed + 1)  # its own stream: the requests above stay what they were
    for _, request in out:
        roll = auctions.random()
        if roll < 0.4:
            request["at"] = 1  # first price: shaded when the bundle has a win-price model
        elif roll < 0.6:
            request["at"] = 2
    return out

"""Traffic: OpenRTB 2.6 bid requests drawn from the synthetic market, with their truth.

The market is the world ``train.data.synthetic`` draws its logs from (``market_world``): its domains and
slots (each on one exchange, with a size, a position and a floor), its users (a Zipf population, so the
same users come back and frequency caps matter; each with a browser, a region, an IP prefix and interest
segments) and its truth: the true click probability of any creative in any slot for any user at any
hour (``true_pctr``) and the log-normal market price of a slot (``market_mu``), which stands for the
highest competing bid. With the world seed and size of the shipped bundle's training data, the bidder
prices the very market it was trained on.

When requests arrive: the day's traffic curve (``_TRAFFIC_BY_HOUR``: quiet nights, a lunch bump, an
evening peak) scaled to a mean rate, weekends quieter; what arrives: by hour, phones (320x50 app traffic)
weigh more in the evening and at weekends. Everything random about request ``n`` (its slot, user, market
price, and the uniforms the auction, the faults and the clicks use) comes from the stream of its chunk,
``numpy.random.default_rng([seed, n // CHUNK])``, drawn in one vectorised pass per chunk: the same seed
gives the same requests and the same draws whatever the timing of a run.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import msgspec
import numpy as np

from train.data.bidlog import FIRST_PRICE_EXCHANGES, MARKET_USD_PER_FEN, floor_usd
from train.data.synthetic import (_EXCHANGES, _REGIONS, _TRAFFIC_BY_HOUR, _VISIBILITY, MARKET_SIGMA, PAGES_PER_DOMAIN,
                                  _hex32, _zipf, market_world)

__all__ = ["CHUNK", "Deal", "Imp", "Market", "Traffic", "UNIFORMS", "arrival_times", "hourly_share"]

#: requests per vectorised draw (and per random stream)
CHUNK = 4096
#: uniforms per request and bidder: the auction's tie-break, the notices' faults, the render and the click
UNIFORMS = 16
#: the exchanges' ``tmax`` (ms) on the wire, by exchange name
TMAX_MS = {"1": 100, "2": 120, "3": 80, "4": 150, "null": 100}
#: weekday (Monday = 0) -> the day's traffic relative to a Tuesday
WEEKDAY_TRAFFIC = (1.0, 1.0, 1.0, 1.0, 0.95, 0.8, 0.75)
MOBILE_SIZE = (320, 50)
# banner.pos (OpenRTB) for the world's slot visibilities; the bidder maps positions back (bidder/openrtb.py)
_POSITION = {"FirstView": 1, "SecondView": 3, "OtherView": 2}
SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class Deal:
    id: str
    floor: float  # USD CPM
    seat: str | None


@dataclass
class Imp:
    """What the exchange knows of request ``n`` beyond its JSON: the truth and this request's draws."""
    n: int
    id: str
    time: float          # simulated Unix seconds of the request
    exchange: str
    at: int              # 1 first price, 2 second price
    tmax_ms: int
    floor: float         # USD CPM
    market: float        # USD CPM: the highest competing bid, the generator's market price
    deal: Deal | None
    slot: int
    user: int
    ua: int
    hour: int
    weekday: int
    uniforms: np.ndarray  # [bidders, UNIFORMS]
    body: bytes


class Market:
    """The world, its traffic curve and its request templates; ``true_pctr`` of a bid's creative."""

    def __init__(self, world_seed: int, world_rows: int):
        self.world = w = market_world(world_seed, world_rows)
        self.sizes = [tuple(map(int, s)) for s in w.sizes.tolist()]
        self.slot_cdf = [np.cumsum(_zipf(len(m), 1.1)) for m in w.slots_of_size]
        self.user_cdf = np.cumsum(w.user_p)
        self.mobile_cdf = np.cumsum(w.mobile_ua_p)
        self.page_cdf = np.cumsum(_zipf(PAGES_PER_DOMAIN, 1.2))
        self.creative_index = {c.decode(): i for i, c in enumerate(w.cre_ids.tolist())}
        self.mobile = np.array([s == MOBILE_SIZE for s in self.sizes])
        self.domain_names = [d.decode() for d in w.dom_names.tolist()]
        self.slot_names = [s.decode() for s in w.slot_names.tolist()]
        self.user_ids = [u.decode() for u in w.user_ids.tolist()]
        self.ua_names = [u.decode() for u in w.ua_names.tolist()]
        self.tags = [t.decode().split(",") if t != b"null" else [] for t in w.user_tag_text.tolist()]
        self.user_ip = [p.decode()[:-1] for p in w.user_ip.tolist()]  # "a.b.c." : the host part is per user
        self.regions = [str(r) for r in _REGIONS]

    def true_pctr(self, imp: Imp, creative_id: str) -> float | None:
        """The truth for the creative a bidder chose; None for a creative the market does not know."""
        cre = self.creative_index.get(creative_id)
        if cre is None:
            return None
        return float(self.world.true_pctr(imp.slot, imp.user, imp.ua, imp.hour, imp.weekday, cre))

    def size_weights(self, hour: int, weekday: int) -> np.ndarray:
        """The mix of sizes at an hour: the generator's size shares, phones up in the evening and at weekends."""
        boost = 1.0 + 0.8 * np.cos(2 * np.pi * (hour - 21) / 24) + (0.4 if weekday >= 5 else 0.0)
        p = self.world.size_share * np.where(self.mobile, boost, 1.0)
        return p / p.sum()


class Traffic:
    """Request ``n`` of a run: arrival times for the whole run, the requests themselves chunk by chunk."""

    def __init__(self, market: Market, seed: int, start: float, hours: float, rate: float, speed: float,
                 requests: int | None, bidders: int, deals: list[Deal]):
        self.market = market
        self.seed = seed
        self.start = start
        self.bidders = bidders
        self.deals = deals
        self.times = arrival_times(seed, start, hours, rate / speed, requests)
        self._chunk_index = -1
        self._chunk: dict | None = None
        self._encode = msgspec.json.Encoder().encode

    def __len__(self) -> int:
        return len(self.times)

    def hourly_requests(self) -> np.ndarray:
        """Requests per simulated hour of the run (what even pacing spreads a daily budget by)."""
        hours = ((self.times - self.start) // SECONDS_PER_HOUR).astype(np.int64)
        return np.bincount(hours, minlength=int(hours.max()) + 1 if len(hours) else 0)

    def imp(self, n: int) -> Imp:
        k, i = divmod(n, CHUNK)
        if k != self._chunk_index:
            self._chunk = self.draw_chunk(k)
            self._chunk_index = k
        c = self._chunk
        slot, user, exchange = int(c["slot"][i]), int(c["user"][i]), c["exchange"][i]
        floor = c["floor"][i]
        deal = None
        if c["deal"][i] >= 0:
            offered = self.deals[c["deal"][i]]
            deal = Deal(offered.id, round(max(floor, 0.01) * 1.5 if offered.floor <= 0 else offered.floor, 6),
                        offered.seat)
        imp = Imp(n=n, id=f"{self.seed}-{n}", time=float(self.times[n]), exchange=exchange,
                  at=1 if exchange in FIRST_PRICE_EXCHANGES else 2, tmax_ms=TMAX_MS[exchange], floor=floor,
                  market=c["market"][i], deal=deal, slot=slot, user=user, ua=int(c["ua"][i]), hour=int(c["hour"][i]),
                  weekday=int(c["weekday"][i]), uniforms=c["uniforms"][i], body=b"")
        imp.body = self._encode(self._request(imp, c, i))
        return imp

    def draw_chunk(self, k: int) -> dict:
        """The vectorised draws of chunk ``k`` (requests ``k * CHUNK`` on): columns by name."""
        m, w = self.market, self.market.world
        rng = np.random.default_rng([self.seed, k])
        times = self.times[k * CHUNK:(k + 1) * CHUNK]
        n = len(times)
        hour = ((times // SECONDS_PER_HOUR) % 24).astype(np.int64)
        weekday = ((times // 86400 + 3) % 7).astype(np.int64)  # 1970-01-01 was a Thursday (3)
        size = np.empty(n, dtype=np.int64)
        u = rng.random(n)
        for h, d in set(zip(hour.tolist(), weekday.tolist())):
            rows = np.flatnonzero((hour == h) & (weekday == d))
            cdf = np.cumsum(m.size_weights(h, d))
            size[rows] = np.minimum(np.searchsorted(cdf, u[rows] * cdf[-1], side="right"), len(cdf) - 1)
        slot = np.empty(n, dtype=np.int64)
        u = rng.random(n)
        for s, members in enumerate(w.slots_of_size):
            rows = np.flatnonzero(size == s)
            cdf = m.slot_cdf[s]
            slot[rows] = members[np.minimum(np.searchsorted(cdf, u[rows] * cdf[-1], side="right"), len(members) - 1)]
        user = np.minimum(np.searchsorted(m.user_cdf, rng.random(n) * m.user_cdf[-1], side="right"), w.n_users - 1)
        ua = w.user_ua[user].copy()
        phones = np.flatnonzero(m.mobile[size])
        pick = np.searchsorted(m.mobile_cdf, rng.random(len(phones)) * m.mobile_cdf[-1], side="right")
        ua[phones] = w.mobile_ua[np.minimum(pick, len(w.mobile_ua) - 1)]
        page = np.minimum(np.searchsorted(m.page_cdf, rng.random(n) * m.page_cdf[-1], side="right"),
                          PAGES_PER_DOMAIN - 1)
        market_fen = np.exp(w.market_mu(slot) + rng.normal(0.0, MARKET_SIGMA, n))
        deal_draw = rng.random(n)
        deal = np.full(n, -1, dtype=np.int64)
        if self.deals:  # about 5 % of imps are offered one of the deals
            offered = deal_draw < 0.05
            deal[offered] = (deal_draw[offered] / 0.05 * len(self.deals)).astype(np.int64) % len(self.deals)
        host = rng.integers(1, 255, n)
        domain = w.slot_domain[slot]
        return {
            "slot": slot, "user": user, "ua": ua, "hour": hour, "weekday": weekday, "size": size,
            "domain": domain, "host": host.tolist(),
            # the generator's url token: the value the bundled model learnt the url field from
            "page": [t.decode() for t in _hex32(domain.astype(np.uint64) * np.uint64(PAGES_PER_DOMAIN)
                                                 + page.astype(np.uint64), salt=w.url_salt).tolist()],
            "exchange": [_EXCHANGES[e] for e in w.dom_exchange[domain].tolist()],
            "floor": floor_usd(w.slot_floor[slot]).round(6).tolist(),
            "market": np.round(market_fen * MARKET_USD_PER_FEN, 6).tolist(),
            "deal": deal.tolist(),
            "uniforms": rng.random((n, self.bidders, UNIFORMS)),
        }

    def _request(self, imp: Imp, c: dict, i: int) -> dict:
        m, w = self.market, self.market.world
        width, height = m.sizes[int(c["size"][i])]
        slot, user, domain = imp.slot, imp.user, int(c["domain"][i])
        visibility = _VISIBILITY[int(w.slot_visibility[slot])]
        banner: dict = {"w": width, "h": height, "format": [{"w": width, "h": height}]}
        if visibility in _POSITION:
            banner["pos"] = _POSITION[visibility]
        imp_json: dict = {"id": "1", "tagid": m.slot_names[slot], "banner": banner, "bidfloor": imp.floor,
                          "bidfloorcur": "USD", "instl": 1 if int(w.slot_format[slot]) == 2 else 0}
        if imp.deal is not None:
            deal: dict = {"id": imp.deal.id, "bidfloor": imp.deal.floor, "bidfloorcur": "USD"}
            if imp.deal.seat:
                deal["wseat"] = [imp.deal.seat]
            imp_json["pmp"] = {"private_auction": 0, "deals": [deal]}
        user_id = m.user_ids[user]
        device = {"ua": m.ua_names[imp.ua], "ip": f"{m.user_ip[user]}{c['host'][i]}",
                  "geo": {"country": "CHN", "region": m.regions[int(w.user_region[user])],
                          "city": str(int(w.user_city[user]))}}
        request: dict = {"id": imp.id, "at": imp.at, "tmax": imp.tmax_ms, "cur": ["USD"], "imp": [imp_json]}
        name = m.domain_names[domain]
        page = c["page"][i]
        if (width, height) == MOBILE_SIZE:  # phone traffic comes from apps, with an advertising id
            request["app"] = {"id": name, "bundle": name}
            device["ifa"] = str(_uuid(user_id))
            device["devicetype"] = 4
        else:
            request["site"] = {"id": name, "domain": name, "page": page}
            device["devicetype"] = 2
        request["device"] = device
        user_json: dict = {"id": user_id, "buyeruid": hashlib.md5(user_id.encode()).hexdigest()[:16]}
        if m.tags[user]:
            user_json["data"] = [{"id": "ipinyou", "segment": [{"id": t} for t in m.tags[user]]}]
        request["user"] = user_json
        return request


def _uuid(text: str) -> str:
    h = hashlib.md5(("ifa/" + text).encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def arrival_times(seed: int, start: float, hours: float, per_second: float, requests: int | None) -> np.ndarray:
    """Sorted simulated arrival times over ``hours`` from ``start``: each hour of the run draws a Poisson
    count around ``per_second`` x 3600 x the traffic curve of its hour of day (mean 1 over a day) x its
    weekday's factor, spread uniformly within the hour; cut to the first ``requests``."""
    rng = np.random.default_rng([seed, 1 << 40])  # a stream of its own, apart from the chunks'
    curve = _TRAFFIC_BY_HOUR / _TRAFFIC_BY_HOUR.mean()
    out = []
    first_hour = int(start // SECONDS_PER_HOUR)
    end = start + hours * SECONDS_PER_HOUR
    h = first_hour
    while h * SECONDS_PER_HOUR < end:
        lo, hi = max(start, h * SECONDS_PER_HOUR), min(end, (h + 1) * SECONDS_PER_HOUR)
        weekday = int((h // 24 + 3) % 7)
        mean = per_second * (hi - lo) * curve[h % 24] * WEEKDAY_TRAFFIC[weekday]
        out.append(np.sort(rng.uniform(lo, hi, rng.poisson(mean))))
        h += 1
        if requests is not None and sum(map(len, out)) >= requests:
            break
    times = np.concatenate(out) if out else np.zeros(0)
    return times[:requests] if requests is not None else times


def hourly_share(start: float, hours: int) -> list[float]:
    """Per hour of a run from ``start``: the share of a day's traffic its hour of day carries, by the curve
    the traffic is drawn from: the even-pacing plan spends a daily budget in these proportions."""
    share = _TRAFFIC_BY_HOUR / _TRAFFIC_BY_HOUR.sum()
    first = int(start // SECONDS_PER_HOUR)
    return [float(share[(first + h) % 24]) for h in range(hours)]

"""Synthetic iPinYou-style impression logs whose true click probability is known.

``generate(out_dir, rows, seed)`` writes ``train.log.txt`` and ``test.log.txt`` in the make-ipinyou-data
layout plus a trailing ``pctr_true`` column, and the censored bid log ``bids.log.txt`` of the same
impressions (``train/data/bidlog.py``). The same seed gives the same bytes.

What makes the data useful rather than random:
    * values are Zipf-distributed over iPinYou-like cardinalities (about 10^4 domains, 6*10^4 slot ids,
      1.5*10^5 IP prefixes, 0-8 of 70 user tags), so most traffic sits on a learnable head and the
      hashed tables see a long tail, as they do on the real logs;
    * rows are built the way impressions happen: the advertiser picks a creative, the creative's size
      picks a slot, the slot belongs to a domain on one exchange, a user (with a fixed agent, region,
      IP prefix and tag set) sees it at a time drawn from a daily traffic curve;
    * the true logit has field effects and pairwise interactions (advertiser x domain, creative x slot,
      hour x region, usertag x advertiser), so interaction-aware models have something to find;
    * ``payprice`` comes from a log-normal market price that depends on the slot, the domain, the
      exchange and the floor, as a bid-shading study needs.

Writing is vectorised end to end: every column is a fixed-width byte matrix, the matrices are laid
side by side and the NUL padding is squeezed out, so a million rows take seconds, not minutes.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from bidder.reference import os_browser
from bidder.spec import default_spec
from train.data.bidlog import BID_LOG, write_bid_log

__all__ = ["ADVERTISERS", "ADVERTISER_CATEGORIES", "COLUMNS", "USER_AGENTS", "generate", "market_world"]

#: The make-ipinyou-data header, then the generator's own column.
COLUMNS = (
    "click", "weekday", "hour", "bidid", "timestamp", "logtype", "ipinyouid", "useragent", "IP", "region",
    "city", "adexchange", "domain", "url", "urlid", "slotid", "slotwidth", "slotheight", "slotvisibility",
    "slotformat", "slotprice", "creative", "bidprice", "payprice", "keypage", "advertiser", "usertag",
    "pctr_true",
)

ADVERTISER_CATEGORIES = {
    1458: "local e-commerce", 2259: "milk powder", 2261: "telecom", 2821: "footwear",
    2997: "mobile e-commerce app", 3358: "software", 3386: "international e-commerce", 3427: "oil",
    3476: "tire",
}

# advertiser: (share of impressions, bid price in CPM fen, creative sizes). Shares follow the
# impression counts of the iPinYou season 2/3 training logs; 2997 buys mobile inventory only.
_CAMPAIGNS: dict[int, tuple[float, int, tuple[tuple[int, int], ...]]] = {
    1458: (3.08, 300, ((300, 250), (728, 90), (160, 600), (336, 280), (950, 90))),
    2259: (0.84, 277, ((300, 250), (728, 90), (1000, 90))),
    2261: (0.69, 277, ((300, 250), (728, 90), (160, 600))),
    2821: (1.32, 238, ((300, 250), (728, 90), (250, 250), (468, 60))),
    2997: (0.31, 277, ((320, 50), (300, 250))),
    3358: (1.74, 300, ((300, 250), (728, 90), (336, 280), (200, 200))),
    3386: (2.85, 294, ((300, 250), (728, 90), (160, 600), (120, 600), (960, 90))),
    3427: (2.59, 294, ((300, 250), (728, 90), (336, 280), (1000, 90))),
    3476: (1.97, 300, ((300, 250), (728, 90), (160, 600), (250, 250))),
}


def _creative_id(advertiser: int, k: int, w: int, h: int) -> str:
    return hashlib.md5(f"ipinyou-creative/{advertiser}/{k}/{w}x{h}".encode()).hexdigest()


#: advertiser id -> its creatives ``[{"id", "w", "h"}]``; the campaign catalog must use the same ids
#: and sizes, or the served model sees creatives it never trained on.
ADVERTISERS: dict[int, list[dict[str, Any]]] = {
    adv: [{"id": _creative_id(adv, k, w, h), "w": w, "h": h} for k, (w, h) in enumerate(sizes)]
    for adv, (_, _, sizes) in _CAMPAIGNS.items()
}

#: (user agent, weight, mobile). 2013-era Chinese desktop traffic is mostly IE and IE-shelled
#: browsers; the families differ in click behaviour, so ``os_browser`` carries signal.
USER_AGENTS: tuple[tuple[str, float, bool], ...] = (
    ("Mozilla/4.0 (compatible; MSIE 6.0; Windows NT 5.1; SV1)", 9.0, False),
    ("Mozilla/4.0 (compatible; MSIE 7.0; Windows NT 5.1; Trident/4.0; .NET CLR 2.0.50727)", 7.0, False),
    ("Mozilla/4.0 (compatible; MSIE 8.0; Windows NT 6.1; Trident/4.0; SLCC2; .NET CLR 2.0.50727)", 12.0, False),
    ("Mozilla/5.0 (compatible; MSIE 9.0; Windows NT 6.1; WOW64; Trident/5.0)", 10.0, False),
    ("Mozilla/5.0 (compatible; MSIE 10.0; Windows NT 6.2; WOW64; Trident/6.0)", 3.0, False),
    ("Mozilla/5.0 (Windows NT 6.1; WOW64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/27.0.1453.94 "
     "Safari/537.36", 9.0, False),
    ("Mozilla/5.0 (Windows NT 5.1) AppleWebKit/537.1 (KHTML, like Gecko) Chrome/21.0.1180.89 Safari/537.1",
     4.0, False),
    ("Mozilla/4.0 (compatible; MSIE 7.0; Windows NT 5.1; Trident/4.0; SE 2.X MetaSr 1.0; SE 2.X MetaSr 1.0)",
     5.0, False),
    ("Mozilla/5.0 (Windows NT 6.1) AppleWebKit/535.1 (KHTML, like Gecko) Chrome/14.0.835.163 Safari/535.1 "
     "SE 2.X MetaSr 1.0", 3.0, False),
    ("Mozilla/4.0 (compatible; MSIE 7.0; Windows NT 6.1; Trident/5.0; Maxthon 2.0)", 3.0, False),
    ("Mozilla/5.0 (Windows NT 6.1) AppleWebKit/534.34 (KHTML, like Gecko) Maxthon/3.0.24.1000 Chrome/26.0 "
     "Safari/534.34", 2.0, False),
    ("Mozilla/4.0 (compatible; MSIE 8.0; Windows NT 5.1; Trident/4.0; TheWorld)", 2.5, False),
    ("Mozilla/5.0 (Windows NT 6.1; rv:21.0) Gecko/20100101 Firefox/21.0", 3.0, False),
    ("Opera/9.80 (Windows NT 6.1; U; zh-cn) Presto/2.10.229 Version/11.62", 0.8, False),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_8_3) AppleWebKit/536.29.13 (KHTML, like Gecko) "
     "Version/6.0.4 Safari/536.29.13", 2.0, False),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_8_4) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/28.0.1500.71 Safari/537.36", 1.0, False),
    ("Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:21.0) Gecko/20100101 Firefox/21.0", 0.7, False),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 6_1_3 like Mac OS X) AppleWebKit/536.26 (KHTML, like Gecko) "
     "Version/6.0 Mobile/10B329 Safari/8536.25", 3.0, True),
    ("Mozilla/5.0 (iPad; CPU OS 6_1 like Mac OS X) AppleWebKit/536.26 (KHTML, like Gecko) Version/6.0 "
     "Mobile/10B141 Safari/8536.25", 1.0, True),
    ("Mozilla/5.0 (Linux; U; Android 4.0.4; zh-cn; MI 1S Build/IMM76D) AppleWebKit/534.30 (KHTML, like "
     "Gecko) Version/4.0 Mobile Safari/534.30", 3.0, True),
    ("Mozilla/5.0 (Linux; Android 4.1.2; GT-I9300 Build/JZO54K) AppleWebKit/535.19 (KHTML, like Gecko) "
     "Chrome/18.0.1025.166 Mobile Safari/535.19", 1.5, True),
    ("Mozilla/5.0 (Linux; U; Android 2.3.6; zh-cn; HUAWEI C8812 Build/HuaweiC8812) AppleWebKit/533.1 "
     "(KHTML, like Gecko) Version/4.0 Mobile Safari/533.1 UCBrowser/9.0", 1.2, True),
)

# iPinYou province ids (region) and the user-tag vocabulary of the logs.
_REGIONS = (0, 1, 2, 3, 15, 27, 40, 55, 65, 79, 80, 94, 106, 124, 134, 146, 164, 183, 201, 216, 238, 253,
            275, 276, 298, 308, 325, 333, 344, 359, 368, 374, 393, 394, 395)
_USER_TAGS = (
    10006, 10024, 10031, 10048, 10052, 10057, 10059, 10063, 10067, 10074, 10075, 10076, 10077, 10079,
    10083, 10093, 10102, 10110, 10111, 10684, 11092, 11278, 11379, 11423, 11512, 11576, 11632, 11680,
    11724, 11944, 13042, 13403, 13496, 13678, 13776, 13800, 13866, 13874, 14273, 16593, 16617, 16661,
    16706, 10027, 10029, 10033, 10035, 10038, 10041, 10044, 10046, 10050, 10054, 10061, 10065, 10069,
    10071, 10081, 10086, 10089, 10096, 10099, 10105, 10107, 10113, 10115, 10118, 10121, 10124, 10127,
)
_VISIBILITY = ("FirstView", "SecondView", "ThirdView", "OtherView", "Na", "0", "1", "2", "255")
_FORMATS = ("Na", "0", "1", "5")
_FLOORS = (0, 5, 10, 20, 30, 50, 70, 100, 150)
_EXCHANGES = ("1", "2", "3", "4", "null")
# per exchange (rows of _EXCHANGES): how its slots spread over _VISIBILITY, _FORMATS and _FLOORS
_VISIBILITY_BY_EXCHANGE = np.array([
    [.45, .25, .05, .25, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, .45, .35, .20, 0],
    [0, 0, 0, 0, .2, .4, .2, 0, .2],
    [0, 0, 0, 0, 1., 0, 0, 0, 0],
    [0, 0, 0, 0, 1., 0, 0, 0, 0],
])
_FORMAT_BY_EXCHANGE = np.array([[.7, .3, 0, 0], [0, .6, .3, .1], [0, .5, .4, .1], [1., 0, 0, 0], [1., 0, 0, 0]])
_FLOOR_BY_EXCHANGE = np.array([
    [.30, .20, .10, .10, .10, .10, .05, .05, 0],
    [.05, .10, .10, .15, .15, .20, .15, .05, .05],
    [.10, .10, .20, .20, .10, .10, .10, .05, .05],
    [.50, .20, .10, .10, .10, 0, 0, 0, 0],
    [.50, .20, .10, .10, .10, 0, 0, 0, 0],
])
_EXCHANGE_SHARE = (.36, .38, .20, .05, .01)

N_DOMAINS = 12_000
N_SLOTS = 60_000
N_IP_PREFIXES = 150_000
PAGES_PER_DOMAIN = 16
MAX_USERS = 200_000
TEST_FRACTION = 0.2
DAYS = 10
START_DAY = dt.date(2013, 6, 6)  # iPinYou season 2 starts here
BASE_LOGIT = -5.15  # puts the mean CTR near 0.9 %
MARKET_SIGMA = 0.45  # spread of the log market price around its mean
TRAIN_FILE, TEST_FILE = "train.log.txt", "test.log.txt"
_WRITE_CHUNK = 100_000
#: the slotprice buckets the feature spec puts floors in; the floor's effect is one value per band
_FLOOR_BANDS = np.array(default_spec().field("slotprice").boundaries)

# hourly share of impressions: quiet nights, a lunch bump and an evening peak
_TRAFFIC_BY_HOUR = np.array([2.2, 1.4, 0.9, 0.6, 0.5, 0.6, 1.2, 2.4, 3.8, 4.8, 5.2, 5.3, 5.0, 5.2, 5.3,
                             5.2, 5.0, 4.8, 4.9, 5.5, 6.1, 6.3, 5.3, 3.6])


def generate(out_dir: str | Path, rows: int, seed: int) -> dict[str, Any]:
    """Write ``rows`` impressions (the latest 20 % as ``test.log.txt``) to ``out_dir``; return a summary."""
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 10:
        raise ValueError(f"rows must be an integer >= 10, got {rows!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    return write_logs(out, _World(rng, rows), rows, seed, started)


def market_world(seed: int, rows: int) -> "_World":
    """The world ``generate(out_dir, rows, seed)`` draws its impressions from (domains, slots, users and the
    truth: ``true_pctr``, ``market_mu``), for drawing more traffic from the same market."""
    return _World(np.random.default_rng(seed), rows)


def write_logs(out: Path, world: "_World", rows: int, seed: int, started: float,
               bid_log: bool = True) -> dict[str, Any]:
    """Draw ``rows`` impressions from ``world``, write them (the latest 20 % as the test log) and, with
    ``bid_log``, the bid log of a simulated bidder valuing them by the shipped catalog; the summary."""
    table, pctr, clicks, market_mu, market = world.impressions(rows)
    n_test = max(1, int(round(rows * TEST_FRACTION)))
    n_train = rows - n_test
    _write_log(out / TRAIN_FILE, table, 0, n_train)
    _write_log(out / TEST_FILE, table, n_train, rows)
    bids = write_bid_log(out / BID_LOG, table, pctr, market_mu, market, MARKET_SIGMA, seed) if bid_log else None
    return {
        "out": str(out),
        "rows": {"train": n_train, "test": n_test},
        "seed": seed,
        "ctr": {"train": float(clicks[:n_train].mean()), "test": float(clicks[n_train:].mean())},
        "clicks": int(clicks.sum()),
        "mean_pctr_true": float(pctr.mean()),
        "bid_log": bids,
        "seconds": round(time.perf_counter() - started, 2),
    }


# -- the simulated market ---------------------------------------------------------------------------
class _World:
    """Vocabularies, entity attributes and effect tables drawn once per seed."""

    def __init__(self, rng: np.random.Generator, rows: int) -> None:
        self.rng = rng
        self._campaigns()
        self._domains()
        self._slots()
        self._users(min(MAX_USERS, max(2_000, rows // 4)))
        self._effects()

    # entities ------------------------------------------------------------------------------------
    def _campaigns(self) -> None:
        ids = list(ADVERTISERS)
        self.adv_ids = np.array(ids)
        share = np.array([_CAMPAIGNS[a][0] for a in ids])
        self.adv_p = share / share.sum()
        self.adv_bid = np.array([_CAMPAIGNS[a][1] for a in ids])
        creatives = [(i, c) for i, a in enumerate(ids) for c in ADVERTISERS[a]]
        self.cre_adv = np.array([i for i, _ in creatives])
        self.cre_ids = _bytes_array([c["id"] for _, c in creatives])
        sizes = sorted({(c["w"], c["h"]) for _, c in creatives})
        self.sizes = np.array(sizes)
        self.cre_size = np.array([sizes.index((c["w"], c["h"])) for _, c in creatives])
        self.mobile_size = np.array([s == (320, 50) for s in sizes])
        # within an advertiser, earlier creatives run more often (the main banner and its variants)
        self.cre_p_in_adv = [_zipf(len(ADVERTISERS[a]), 1.0) for a in ids]
        self.keypage = _bytes_array([
            "null" if a in (2997, 3386) else hashlib.md5(f"keypage/{a}".encode()).hexdigest() for a in ids])
        size_share = np.zeros(len(sizes))
        for i, a in enumerate(ids):
            start = int(np.flatnonzero(self.cre_adv == i)[0])
            size_share[self.cre_size[start:start + len(ADVERTISERS[a])]] += self.adv_p[i] * self.cre_p_in_adv[i]
        self.size_share = size_share

    def _domains(self) -> None:
        rng = self.rng
        self.dom_names = _tokens(np.arange(N_DOMAINS), salt=rng.integers(1 << 62), length=19)
        self.dom_exchange = rng.choice(len(_EXCHANGES), size=N_DOMAINS, p=_EXCHANGE_SHARE)
        self.dom_rank = np.arange(N_DOMAINS)  # domains are numbered in popularity order

    def _slots(self) -> None:
        rng = self.rng
        # every size gets slots in proportion to the traffic that needs them, at least a few hundred
        per_size = np.maximum(300, np.round(self.size_share * N_SLOTS)).astype(int)
        self.slot_size = np.repeat(np.arange(len(per_size)), per_size)
        n = len(self.slot_size)
        self.slot_rank = np.concatenate([np.arange(k) for k in per_size])  # popularity rank within its size
        self.slots_of_size = [np.flatnonzero(self.slot_size == s) for s in range(len(per_size))]
        self.slot_domain = rng.choice(N_DOMAINS, size=n, p=_zipf(N_DOMAINS, 1.0))
        exchange = self.dom_exchange[self.slot_domain]
        self.slot_visibility = _choice_by_row(rng, _VISIBILITY_BY_EXCHANGE[exchange])
        self.slot_format = _choice_by_row(rng, _FORMAT_BY_EXCHANGE[exchange])
        self.slot_floor = np.array(_FLOORS)[_choice_by_row(rng, _FLOOR_BY_EXCHANGE[exchange])]
        self.slot_names = _slot_names(rng, exchange, self.slot_domain, self.sizes[self.slot_size])
        self.url_salt = int(rng.integers(1 << 62))

    def _users(self, n_users: int) -> None:
        rng = self.rng
        self.n_users = n_users
        self.user_p = _zipf(n_users, 0.75)
        self.user_ids = _tokens(np.arange(n_users), salt=rng.integers(1 << 62), length=15)
        desktop = np.array([not m for _, _, m in USER_AGENTS])
        ua_w = np.array([w for _, w, _ in USER_AGENTS])
        self.ua_names = _bytes_array([u for u, _, _ in USER_AGENTS])
        self.user_ua = rng.choice(len(USER_AGENTS), size=n_users, p=ua_w / ua_w.sum())
        self.mobile_ua = np.flatnonzero(~desktop)
        self.mobile_ua_p = ua_w[~desktop] / ua_w[~desktop].sum()
        region_p = _zipf(len(_REGIONS), 0.9)
        self.user_region = rng.permutation(len(_REGIONS))[rng.choice(len(_REGIONS), size=n_users, p=region_p)]
        self.user_city = _cities(rng, self.user_region)
        prefix = rng.choice(N_IP_PREFIXES, size=n_users, p=_zipf(N_IP_PREFIXES, 0.6))
        self.user_ip = _ip_prefixes(prefix, salt=int(rng.integers(1 << 62)))
        # 0-8 tags per user, popular tags more often, none repeated (Gumbel top-k)
        counts = rng.choice(9, size=n_users, p=[.22, .08, .09, .11, .12, .11, .10, .09, .08])
        keys = np.log(_zipf(len(_USER_TAGS), 0.7)).astype(np.float32) + rng.gumbel(size=(n_users, len(_USER_TAGS))).astype(np.float32)
        order = np.argsort(-keys, axis=1)
        self.user_tags = np.zeros((n_users, len(_USER_TAGS)), dtype=bool)
        rank_ok = np.arange(len(_USER_TAGS))[None, :] < counts[:, None]
        np.put_along_axis(self.user_tags, order, rank_ok, axis=1)
        self.user_tag_text = _tag_strings(self.user_tags)

    # the truth -----------------------------------------------------------------------------------
    def _effects(self) -> None:
        """Effect tables of the true logit.

        Effects concentrate on values with enough traffic to be learnt from a million rows: a domain's
        or slot's effect fades with its popularity rank, so the long tail is diverse but individually
        bland (which is also what real logs look like after hashing). Interactions are low-rank, as
        factorisation models assume, each scaled to move the logit by about 0.2-0.3.
        """
        rng = self.rng
        n_adv, n_cre = len(self.adv_ids), len(self.cre_adv)
        dom_head = _fade(self.dom_rank, 6)
        self.e_adv = rng.normal(0, 0.5, n_adv)
        self.e_cre = rng.normal(0, 0.35, n_cre)
        self.e_dom = rng.normal(0, 0.6, N_DOMAINS) * dom_head
        self.e_slot = rng.normal(0, 0.30, len(self.slot_size)) * _fade(self.slot_rank, 2)
        self.e_visibility = np.array([0.5, 0.15, -0.1, -0.3, 0.0, 0.25, 0.0, -0.2, -0.15])
        self.e_format = rng.normal(0, 0.1, len(_FORMATS))
        self.e_exchange = rng.normal(0, 0.15, len(_EXCHANGES))
        self.e_hour = 0.35 * np.cos(2 * np.pi * (np.arange(24) - 21) / 24)
        self.e_weekday = rng.normal(0, 0.06, 7)
        # browsers matter as families (what the model's os_browser field sees), phones click more
        families = sorted({os_browser(ua) for ua, _, _ in USER_AGENTS})
        e_family = rng.normal(0, 0.35, len(families))
        self.e_ua = np.array([e_family[families.index(os_browser(ua))] + (0.2 if mobile else 0.0)
                              for ua, _, mobile in USER_AGENTS])
        self.e_region = rng.normal(0, 0.18, len(_REGIONS))
        self.e_floor_band = np.array([0.0, -0.05, -0.12, -0.2, -0.3])  # floors 0, <=10, <=50, <=100, more
        self.user_main = self.user_tags @ rng.normal(0, 0.16, len(_USER_TAGS))
        # advertiser x domain: each advertiser suits some sites (rank 4)
        self.adv_vec = rng.normal(0, 0.6, (n_adv, 4))
        self.dom_vec = rng.normal(0, 0.6, (N_DOMAINS, 4)) * dom_head[:, None]
        # creative x slot: a creative's design works better in some placements (rank 2)
        self.cre_vec = rng.normal(0, 0.6, (n_cre, 2))
        self.placement_vec = rng.normal(0, 0.45, (len(_VISIBILITY), 2))
        # hour x region: regional daily rhythms (rank 2)
        phase = rng.uniform(0, 2 * np.pi, 2)
        self.hour_vec = np.cos(2 * np.pi * np.arange(24)[:, None] / 24 + phase[None, :])
        self.region_vec = rng.normal(0, 0.35, (len(_REGIONS), 2))
        # usertag x advertiser: tags load on three interests, advertisers appeal to interests
        tag_interest = rng.normal(0, 1, (len(_USER_TAGS), 3)) * (rng.random((len(_USER_TAGS), 3)) < 0.3)
        adv_interest = rng.normal(0, 1, (n_adv, 3))
        self.user_adv = self.user_tags @ (0.2 * tag_interest @ adv_interest.T)  # [users, advertisers]
        # market price (log CPM fen)
        self.m_slot = rng.normal(0, 0.3, len(self.slot_size))
        self.m_dom = rng.normal(0, 0.25, N_DOMAINS)
        self.m_exchange = np.array([0.1, 0.0, -0.1, -0.25, -0.25])

    # the truth of an impression --------------------------------------------------------------------
    def true_pctr(self, slot: np.ndarray, user: np.ndarray, ua: np.ndarray, hour: np.ndarray, weekday: np.ndarray,
                  cre: np.ndarray) -> np.ndarray:
        """The true click probability of creative ``cre`` shown in ``slot`` to ``user`` (browsing with user
        agent ``ua``) at ``hour`` on ``weekday`` (Monday = 0): indices into the world's tables, broadcast
        together. Defined for every pair, whichever creative the logs or a bidder put in the slot."""
        adv = self.cre_adv[cre]
        domain = self.slot_domain[slot]
        exchange = self.dom_exchange[domain]
        visibility = self.slot_visibility[slot]
        floor_band = np.searchsorted(_FLOOR_BANDS, self.slot_floor[slot], side="left")  # right-closed, as served
        region = self.user_region[user]
        logit = (BASE_LOGIT + self.e_adv[adv] + self.e_cre[cre] + self.e_dom[domain] + self.e_slot[slot]
                 + self.e_visibility[visibility] + self.e_format[self.slot_format[slot]] + self.e_exchange[exchange]
                 + self.e_hour[hour] + self.e_weekday[weekday] + self.e_ua[ua] + self.e_region[region]
                 + self.e_floor_band[floor_band] + self.user_main[user]
                 + np.einsum("...j,...j->...", self.adv_vec[adv], self.dom_vec[domain])
                 + np.einsum("...j,...j->...", self.cre_vec[cre], self.placement_vec[visibility])
                 + np.einsum("...j,...j->...", self.hour_vec[hour], self.region_vec[region])
                 + self.user_adv[user, adv])
        return 1.0 / (1.0 + np.exp(-logit))

    def market_mu(self, slot: np.ndarray) -> np.ndarray:
        """The mean log market price (CNY fen CPM) of ``slot``: the market price is log-normal around it,
        with spread ``MARKET_SIGMA``."""
        domain = self.slot_domain[slot]
        return (4.1 + self.m_slot[slot] + self.m_dom[domain] + self.m_exchange[self.dom_exchange[domain]]
                + 0.15 * np.log1p(self.slot_floor[slot]))

    # rows ------------------------------------------------------------------------------------------
    def impressions(self, n: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Byte-string columns for ``n`` time-ordered impressions, their true CTR, the clicks, and the
        market price (CNY fen CPM): the mean of its logarithm and the price drawn."""
        rng = self.rng
        day, hour, stamp = _timestamps(rng, n)
        weekday = np.array([(START_DAY + dt.timedelta(days=d)).weekday() for d in range(DAYS)])[day]

        adv = rng.choice(len(self.adv_ids), size=n, p=self.adv_p)
        cre = np.empty(n, dtype=np.int64)
        for a in range(len(self.adv_ids)):
            rows = np.flatnonzero(adv == a)
            first = int(np.flatnonzero(self.cre_adv == a)[0])
            cre[rows] = first + rng.choice(len(self.cre_p_in_adv[a]), size=len(rows), p=self.cre_p_in_adv[a])
        size = self.cre_size[cre]
        slot = np.empty(n, dtype=np.int64)
        for s, members in enumerate(self.slots_of_size):
            rows = np.flatnonzero(size == s)
            slot[rows] = members[rng.choice(len(members), size=len(rows), p=_zipf(len(members), 1.1))]
        domain = self.slot_domain[slot]
        exchange = self.dom_exchange[domain]
        visibility = self.slot_visibility[slot]
        page = rng.choice(PAGES_PER_DOMAIN, size=n, p=_zipf(PAGES_PER_DOMAIN, 1.2))

        user = rng.choice(self.n_users, size=n, p=self.user_p)
        ua = self.user_ua[user].copy()
        mobile_rows = np.flatnonzero(self.mobile_size[size])  # a 320x50 slot is seen on a phone
        ua[mobile_rows] = self.mobile_ua[rng.choice(len(self.mobile_ua), size=len(mobile_rows), p=self.mobile_ua_p)]
        pctr = self.true_pctr(slot, user, ua, hour, weekday, cre)
        clicks = (rng.random(n) < pctr).astype(np.int64)

        market_mu = self.market_mu(slot)
        market = np.exp(market_mu + rng.normal(0, MARKET_SIGMA, n))
        bid = self.adv_bid[adv]
        payprice = np.minimum(np.maximum(np.round(market), self.slot_floor[slot]), bid).astype(np.int64)

        url_key = domain.astype(np.uint64) * np.uint64(PAGES_PER_DOMAIN) + page.astype(np.uint64)
        table = {
            "click": _ints(clicks),
            "weekday": _ints(weekday),
            "hour": _ints(hour),
            "bidid": _hex32(np.arange(n, dtype=np.uint64), salt=int(rng.integers(1 << 62))),
            "timestamp": _ints(stamp),
            "logtype": np.full(n, b"1"),
            "ipinyouid": self.user_ids[user],
            "useragent": self.ua_names[ua],
            "IP": self.user_ip[user],
            "region": _ints(np.array(_REGIONS)[self.user_region[user]]),
            "city": _ints(self.user_city[user]),
            "adexchange": _bytes_array(_EXCHANGES)[exchange],
            "domain": self.dom_names[domain],
            "url": _hex32(url_key, salt=self.url_salt),
            "urlid": np.full(n, b"null"),
            "slotid": self.slot_names[slot],
            "slotwidth": _ints(self.sizes[size, 0]),
            "slotheight": _ints(self.sizes[size, 1]),
            "slotvisibility": _bytes_array(_VISIBILITY)[visibility],
            "slotformat": _bytes_array(_FORMATS)[self.slot_format[slot]],
            "slotprice": _ints(self.slot_floor[slot]),
            "creative": self.cre_ids[cre],
            "bidprice": _ints(bid),
            "payprice": _ints(payprice),
            "keypage": self.keypage[adv],
            "advertiser": _ints(self.adv_ids[adv]),
            "usertag": self.user_tag_text[user],
            "pctr_true": _probabilities(pctr),
        }
        return table, pctr, clicks, market_mu, market


# -- sampling helpers ---------------------------------------------------------------------------------
def _zipf(k: int, a: float) -> np.ndarray:
    p = 1.0 / np.arange(1, k + 1, dtype=float) ** a
    return p / p.sum()


def _fade(rank: np.ndarray, scale: float) -> np.ndarray:
    """1 for the most popular value, fading exponentially with popularity rank (``scale`` = 1/e)."""
    return np.exp(-rank / scale)


def _choice_by_row(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One draw per row of ``probs`` (rows sum to 1), vectorised by inverting the row CDFs."""
    cdf = np.cumsum(probs, axis=1)
    u = rng.random(len(probs))[:, None] * cdf[:, -1:]
    return np.minimum((u >= cdf).sum(axis=1), probs.shape[1] - 1)


def _timestamps(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted impression times over DAYS days: (day index, hour, yyyyMMddHHmmssSSS as int64)."""
    day = rng.integers(0, DAYS, n)
    hour = rng.choice(24, size=n, p=_TRAFFIC_BY_HOUR / _TRAFFIC_BY_HOUR.sum())
    millis = rng.integers(0, 3_600_000, n)
    order = np.lexsort((millis, hour, day))
    day, hour, millis = day[order], hour[order], millis[order]
    ymd = np.array([int((START_DAY + dt.timedelta(days=d)).strftime("%Y%m%d")) for d in range(DAYS)], dtype=np.int64)
    minute, rest = np.divmod(millis, 60_000)
    stamp = ymd[day] * 10**9 + hour * 10**7 + minute * 10**5 + rest  # rest = seconds * 1000 + millis
    return day, hour, stamp


def _cities(rng: np.random.Generator, region: np.ndarray) -> np.ndarray:
    """iPinYou numbers a province's cities right after the province id; pick one, big cities first."""
    ids = np.array(_REGIONS)
    span = np.diff(np.append(ids, 400)) - 1  # city ids available between this region and the next
    out = ids[region].copy()
    for r in range(len(ids)):
        rows = np.flatnonzero(region == r)
        if span[r] > 0 and len(rows):
            out[rows] += 1 + rng.choice(span[r], size=len(rows), p=_zipf(span[r], 1.2))
    return out


# -- byte-string columns --------------------------------------------------------------------------------
def _bytes_array(values) -> np.ndarray:
    return np.array([v.encode() if isinstance(v, str) else v for v in values], dtype=bytes)


def _ints(values: np.ndarray) -> np.ndarray:
    return np.asarray(values).astype(np.int64).astype(bytes)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective scramble of uint64 (wrap-around arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hex32(keys: np.ndarray, salt: int) -> np.ndarray:
    """32 hex digits per key (like iPinYou's md5 ids), distinct keys giving distinct ids."""
    k = keys.astype(np.uint64)
    with np.errstate(over="ignore"):
        hi = _mix64(k ^ np.uint64(salt))
        lo = _mix64(hi + np.uint64(0x9E3779B97F4A7C15))
    raw = np.stack([hi, lo], axis=1).astype(">u8").tobytes()
    return np.frombuffer(raw.hex().encode(), dtype="S32")


_TOKEN_ALPHABET = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", dtype=np.uint8)


def _tokens(keys: np.ndarray, salt: int, length: int) -> np.ndarray:
    """Obfuscated-looking tokens (iPinYou domains and user ids) of ``length`` URL-safe characters."""
    words = []
    state = keys.astype(np.uint64) ^ np.uint64(salt)
    with np.errstate(over="ignore"):
        for _ in range((length + 9) // 10):  # 10 six-bit characters per 64-bit word
            state = _mix64(state + np.uint64(0x9E3779B97F4A7C15))
            words.append(state)
    chars = np.empty((len(keys), length), dtype=np.uint8)
    for i in range(length):
        word = words[i // 10]
        chars[:, i] = _TOKEN_ALPHABET[((word >> np.uint64(6 * (i % 10))) & np.uint64(63)).astype(np.intp)]
    return chars.view(f"S{length}").reshape(-1)


def _ip_prefixes(prefix: np.ndarray, salt: int) -> np.ndarray:
    """iPinYou truncates IPs to ``a.b.c.*``; map prefix numbers to distinct-looking public ranges."""
    with np.errstate(over="ignore"):
        x = _mix64(prefix.astype(np.uint64) ^ np.uint64(salt))
    a = (x % np.uint64(222)).astype(np.int64) + 1
    a[a == 10] = 11  # keep clear of the private 10/8 and loopback blocks
    a[a == 127] = 128
    b = ((x >> np.uint64(16)) % np.uint64(256)).astype(np.int64)
    c = ((x >> np.uint64(32)) % np.uint64(256)).astype(np.int64)
    unique, inverse = np.unique(np.stack([a, b, c], axis=1), axis=0, return_inverse=True)
    names = _bytes_array([f"{p}.{q}.{r}.*" for p, q, r in unique.tolist()])
    return names[inverse.reshape(-1)]


def _slot_names(rng: np.random.Generator, exchange: np.ndarray, domain: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Slot ids in each exchange's own style (Tanx ``mm_…``, numeric ids, channel names, ``Ad_…``)."""
    n = len(exchange)
    a, b, c = rng.integers(10**7, 10**8, n), rng.integers(10**5, 10**6, n), rng.integers(10**7, 10**8, n)
    channels = ("Astro", "Auto", "Edu", "Ent", "Fashion", "Finance", "Game", "Health", "House", "News",
                "Sports", "Tech", "Travel", "Video")
    names = []
    for i, (ex, dom, (w, h)) in enumerate(zip(exchange.tolist(), domain.tolist(), size.tolist())):
        if ex == 0:
            names.append(f"mm_{a[i]}_{b[i]}_{c[i]}")
        elif ex == 1:
            names.append(f"{a[i] * 100 + b[i] % 100}")
        elif ex == 2:
            names.append(f"{channels[dom % len(channels)]}_F_{w}x{h}_{b[i] % 1000}")
        else:
            names.append(f"Ad_{a[i]:x}_{w}x{h}")
    return _bytes_array(names)


def _tag_strings(tags: np.ndarray) -> np.ndarray:
    """Comma-joined tag ids per user in ascending order, ``null`` for a user without tags."""
    ids = np.array(_USER_TAGS)
    order = np.argsort(ids)
    sorted_ids = ids[order].astype(str).tolist()
    ordered = tags[:, order]
    return _bytes_array([",".join(sorted_ids[j] for j in np.flatnonzero(row)) or "null" for row in ordered])


def _probabilities(p: np.ndarray) -> np.ndarray:
    """``0.dddddddddd`` (ten decimals) without a per-value formatting call."""
    q = np.minimum(np.round(p * 1e10), 1e10 - 1).astype(np.int64) + 10**10
    digits = q.astype("S11").view(np.uint8).reshape(-1, 11)
    out = np.empty((len(p), 12), dtype=np.uint8)
    out[:, 0], out[:, 1] = ord("0"), ord(".")
    out[:, 2:] = digits[:, 1:]
    return out.view("S12").reshape(-1)


# -- writing ------------------------------------------------------------------------------------------------
def _write_log(path: Path, table: dict[str, np.ndarray], start: int, stop: int) -> None:
    """Tab-separated lines with a header, built as one byte matrix per chunk with the padding removed."""
    tab, newline = np.full((1, 1), ord("\t"), np.uint8), np.full((1, 1), ord("\n"), np.uint8)
    with open(path, "wb") as f:
        f.write(("\t".join(COLUMNS) + "\n").encode())
        for lo in range(start, stop, _WRITE_CHUNK):
            hi = min(lo + _WRITE_CHUNK, stop)
            parts = []
            for i, name in enumerate(COLUMNS):
                col = np.ascontiguousarray(table[name][lo:hi])
                parts.append(col.view(np.uint8).reshape(hi - lo, col.dtype.itemsize))
                sep = newline if i == len(COLUMNS) - 1 else tab
                parts.append(np.broadcast_to(sep, (hi - lo, 1)))
            matrix = np.concatenate(parts, axis=1).reshape(-1)
            f.write(matrix[matrix != 0].tobytes())  # NUL is only ever fixed-width padding

"""A large synthetic market: thousands of campaigns, up to hundreds of thousands of creatives.

``generate_market(out_dir, rows, seed, creatives)`` writes the logs of ``train/data/synthetic.py`` (same
columns, the true pCTR in ``pctr_true``) for a market of ``creatives`` creatives, and the matching
``campaigns.json`` in the catalog format ``bidder/campaigns.py`` reads. The same arguments give the same
bytes. ``python -m train synth --creatives C`` calls it; without ``--creatives`` the default 9-advertiser
market is generated exactly as before.

The market:
    * one advertiser per two campaigns (at least 1,000 campaigns at 100,000 creatives: a campaign holds
      50 creatives on average, between 1 and a few hundred, Dirichlet-spread);
    * a campaign buys a few of the default market's 13 banner sizes (300x250 and 728x90 most often);
      each of its creatives has one of them;
    * targeting: 60 % of campaigns run everywhere, 20 % on one or two exchanges, 20 % on a list of 20 to
      300 domains drawn from the market's own domains (popular ones more often);
    * value per click: log-normal around 1 USD (a factor of about 1.6 either way), per campaign.

The logs are drawn as in the default market (an advertiser, one of its creatives, then a slot of the
creative's size), over every (imp, creative) pair: the click model is defined everywhere, and targeting
is the catalog's business, applied by the bidder before it scores.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from bidder.bundle import CAMPAIGNS_FILE
from train.data.synthetic import _CAMPAIGNS, _EXCHANGES, N_DOMAINS, _bytes_array, _World, _zipf, write_logs

__all__ = ["CAMPAIGNS_FILE", "MAX_CREATIVES", "MIN_CREATIVES", "generate_market"]

MIN_CREATIVES, MAX_CREATIVES = 100, 1_000_000
CREATIVES_PER_CAMPAIGN = 50
CAMPAIGNS_PER_ADVERTISER = 2
FIRST_ADVERTISER = 100_000  # clear of the iPinYou advertiser ids of the default market
#: how often a size is bought, by the default market's sizes (300x250 and 728x90 are everywhere)
_SIZES = tuple(sorted({size for _, _, sizes in _CAMPAIGNS.values() for size in sizes}))
_SIZE_WEIGHT = np.array([{(300, 250): 8.0, (728, 90): 5.0}.get(s, 1.0) for s in _SIZES])
_TARGETED_EXCHANGES = _EXCHANGES[:4]  # "null" is what a log says when it does not know; nobody targets it


def generate_market(out_dir: str | Path, rows: int, seed: int, creatives: int) -> dict[str, Any]:
    """Write the logs (latest 20 % as ``test.log.txt``) and ``campaigns.json`` to ``out_dir``; return a summary."""
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 10:
        raise ValueError(f"rows must be an integer >= 10, got {rows!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if (not isinstance(creatives, int) or isinstance(creatives, bool)
            or not MIN_CREATIVES <= creatives <= MAX_CREATIVES):
        raise ValueError(f"creatives must be an integer from {MIN_CREATIVES} to {MAX_CREATIVES:,}, got {creatives!r}")
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    world = _MarketWorld(rng, rows, creatives)
    # no bid log: the simulated bidder values impressions by the shipped catalog, not by this one
    summary = write_logs(out, world, rows, seed, started, bid_log=False)
    catalog = world.catalog()
    (out / CAMPAIGNS_FILE).write_text(json.dumps(catalog, separators=(",", ":")) + "\n", encoding="utf-8")
    campaigns = catalog["campaigns"]
    summary["catalog"] = {"file": str(out / CAMPAIGNS_FILE), "creatives": creatives, "campaigns": len(campaigns),
                          "advertisers": len(world.adv_ids),
                          "targeted": {"exchanges": sum("exchanges" in c["targeting"] for c in campaigns),
                                       "domains": sum("domains" in c["targeting"] for c in campaigns)}}
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return summary


class _MarketWorld(_World):
    """The default market's world (domains, slots, users, click model) with a large campaign catalog."""

    def __init__(self, rng: np.random.Generator, rows: int, creatives: int) -> None:
        self.n_creatives = creatives
        super().__init__(rng, rows)

    def _campaigns(self) -> None:  # replaces the 9 iPinYou advertisers (called first by _World.__init__)
        rng = self.rng
        n = self.n_creatives
        n_campaigns = max(1, n // CREATIVES_PER_CAMPAIGN)
        n_adv = max(1, n_campaigns // CAMPAIGNS_PER_ADVERTISER)
        # creatives per campaign: at least one each, the rest spread unevenly
        counts = 1 + rng.multinomial(n - n_campaigns, rng.dirichlet(np.full(n_campaigns, 1.5)))
        campaign_adv = np.sort(rng.integers(0, n_adv, n_campaigns))
        campaign_adv[:n_adv] = np.arange(n_adv)  # every advertiser runs at least one campaign
        campaign_adv.sort()
        self.campaign_adv = campaign_adv
        self.campaign_value = np.round(np.exp(rng.normal(0.0, 0.5, n_campaigns)), 4)
        # sizes: each campaign buys 1-4 of them
        size_p = _SIZE_WEIGHT / _SIZE_WEIGHT.sum()
        campaign_sizes = [np.sort(rng.choice(len(_SIZES), size=int(rng.integers(1, 5)), replace=False, p=size_p))
                          for _ in range(n_campaigns)]
        cre_campaign = np.repeat(np.arange(n_campaigns), counts)
        cre_size = np.empty(n, dtype=np.int64)
        start = 0
        for c, k in enumerate(counts.tolist()):
            cre_size[start:start + k] = campaign_sizes[c][rng.integers(0, len(campaign_sizes[c]), k)]
            start += k
        self.cre_campaign = cre_campaign
        self.campaign_sizes = campaign_sizes
        self.cre_adv = campaign_adv[cre_campaign]  # sorted: an advertiser's creatives are contiguous
        self.adv_ids = FIRST_ADVERTISER + np.arange(n_adv)
        self.adv_p = _zipf(n_adv, 0.8)[rng.permutation(n_adv)]
        self.adv_bid = rng.integers(200, 320, n_adv)
        ids = [hashlib.md5(f"market-creative/{c}/{j}".encode()).hexdigest()
               for c, k in enumerate(counts.tolist()) for j in range(k)]
        self.cre_text = ids
        self.cre_ids = _bytes_array(ids)
        self.sizes = np.array(_SIZES)
        self.cre_size = cre_size
        self.mobile_size = np.array([s == (320, 50) for s in _SIZES])
        per_adv = np.bincount(self.cre_adv, minlength=n_adv)
        self.cre_p_in_adv = [_zipf(int(k), 1.0) for k in per_adv]
        self.keypage = _bytes_array([hashlib.md5(f"keypage/{a}".encode()).hexdigest() for a in self.adv_ids.tolist()])
        within = np.concatenate(self.cre_p_in_adv)
        self.size_share = np.bincount(cre_size, weights=self.adv_p[self.cre_adv] * within, minlength=len(_SIZES))

    def catalog(self) -> dict[str, Any]:
        """The campaigns as ``bidder/campaigns.py`` reads them, with targeting drawn from the world's domains."""
        rng = np.random.default_rng(int(self.rng.integers(1 << 62)))
        domain_p = _zipf(N_DOMAINS, 0.6)
        campaigns = []
        start = 0
        counts = np.bincount(self.cre_campaign, minlength=len(self.campaign_adv))
        for c, k in enumerate(counts.tolist()):
            advertiser = int(self.adv_ids[self.campaign_adv[c]])
            sizes = [list(map(int, _SIZES[s])) for s in self.campaign_sizes[c].tolist()]
            targeting: dict[str, Any] = {"sizes": sizes}
            kind = rng.random()
            if kind < 0.2:
                chosen = rng.choice(len(_TARGETED_EXCHANGES), size=int(rng.integers(1, 3)), replace=False)
                targeting["exchanges"] = [_TARGETED_EXCHANGES[e] for e in sorted(chosen.tolist())]
            elif kind < 0.4:
                chosen = rng.choice(N_DOMAINS, size=int(rng.integers(20, 301)), replace=False, p=domain_p)
                targeting["domains"] = [self.dom_names[d].decode() for d in sorted(chosen.tolist())]
            adomain = [f"brand{advertiser}.example"]
            creatives = []
            for i in range(start, start + k):
                w, h = _SIZES[int(self.cre_size[i])]
                crid = self.cre_text[i]
                creatives.append({"id": crid, "w": int(w), "h": int(h), "adomain": adomain,
                                  "nurl": f"https://dsp.example/win?crid={crid}&price=${{AUCTION_PRICE}}"})
            start += k
            campaigns.append({"id": f"m{c}", "advertiser": advertiser, "value_per_click": float(self.campaign_value[c]),
                              "targeting": targeting, "creatives": creatives})
        return {"campaigns": campaigns}

"""The exchange: requests sent on the simulated clock, auctions, notices, charges and clicks.

Request ``n`` is due at the wall-clock time at which the shared clock reads its simulated arrival time
(``Clock.wall``); it goes to every bidder at once, an answer later than its ``tmax`` is no bid, and the
auction (``auction.run_auction``) runs on the bids that came in time. Then, for the winner: the win
notice (which must bring the markup when the bid has no ``adm``), the render (most wins, not all), the
charge and the billing notice (retried by the IAB's rule), the click drawn from the truth of the chosen
creative; for the losers: loss notices with their reason. Notices wait their delays on the simulated
clock and go only to addresses on this machine.
"""
from __future__ import annotations

import asyncio
import math
import re
import time
from dataclasses import dataclass
from typing import Callable

import msgspec

from bench.exchange.auction import LOSS_WON, Offer, run_auction
from bench.exchange.faults import Faults, NoticeFaults, U
from bench.exchange.http import Client
from bench.exchange.notices import FORGERIES, forge, is_local, money, substitute
from bench.exchange.report import BidderStats
from bench.exchange.terms import Terms
from bench.exchange.traffic import SECONDS_PER_HOUR, Imp, Market, Traffic
from bidder.clock import Clock

__all__ = ["Exchange"]

#: auctions and notices under way before the exchange waits (it then falls behind the clock, which the report
#: shows as lag): a bound on memory, not a limit a healthy run meets
MAX_IN_FLIGHT = 50_000
#: a bid request is abandoned (and its connection closed) this long after it was sent; it counted as a
#: timeout at its tmax already
HARD_DEADLINE_S = 10.0
NOTICE_TIMEOUT_S = 5.0
_HREF = re.compile(r"""href\s*=\s*["']([^"']+)["']""", re.IGNORECASE)


class _Bid(msgspec.Struct, gc=False):
    id: str = ""
    impid: str = ""
    price: float = 0.0
    adid: str | None = None
    crid: str | None = None
    cid: str | None = None
    nurl: str | None = None
    burl: str | None = None
    lurl: str | None = None
    adm: str | None = None
    dealid: str | None = None


class _SeatBid(msgspec.Struct, gc=False):
    bid: list[_Bid] = []
    seat: str | None = None


class _Response(msgspec.Struct, gc=False):
    id: str = ""
    seatbid: list[_SeatBid] = []
    bidid: str | None = None
    cur: str = "USD"


_decode_response = msgspec.json.Decoder(_Response).decode


@dataclass
class _Bidder:
    index: int
    url: str  # may hold {exchange}
    stats: BidderStats
    urls: dict[str, str]  # by exchange name
    connections: int      # bid requests in flight at most; beyond, a request is not sent to it (throttled)
    in_flight: int = 0
    last_notice: str | None = None  # an earlier genuine notice, for replayed forgeries


class Exchange:
    def __init__(self, traffic: Traffic, market: Market, terms: Terms, bidders: list[str], faults: Faults,
                 clock: Clock, hours: int, connections: int, record_sends: bool = False):
        self.traffic, self.market, self.terms, self.faults, self.clock = traffic, market, terms, faults, clock
        self.bidders = [_Bidder(i, url, BidderStats(url, hours), {}, connections) for i, url in enumerate(bidders)]
        self.hours = hours
        self.client = Client()
        self.sent = 0
        self.done = 0
        self.stopping = False
        self.lag_max = 0.0   # simulated seconds a request went out after its arrival time
        self.lag_sum = 0.0
        self.sends: list[tuple[str, float]] | None = [] if record_sends else None
        self._tasks: set[asyncio.Task] = set()
        self._room = asyncio.Event()

    # -- the clock ---------------------------------------------------------------------------------------
    async def run(self, progress: Callable[[int, float], None] | None = None) -> None:
        """Send every request when due, then wait for the answers and the notices still on their way."""
        clock, traffic = self.clock, self.traffic
        try:
            for n in range(len(traffic)):
                if self.stopping:
                    break
                imp = traffic.imp(n)
                wait = clock.wall(imp.time) - time.time()
                if wait > 0.0005:
                    await asyncio.sleep(wait)
                elif n % 32 == 0:
                    await asyncio.sleep(0)  # let answers in when behind
                while len(self._tasks) >= MAX_IN_FLIGHT and not self.stopping:
                    self._room.clear()
                    await self._room.wait()
                lag = max(0.0, clock.now() - imp.time)
                self.lag_sum += lag
                if lag > self.lag_max:
                    self.lag_max = lag
                self._spawn(self._auction(imp))
                self.sent += 1
                if progress is not None and (n % 256 == 0 or wait > 0.05):
                    progress(self.sent, imp.time)
            while self._tasks and not self.stopping:  # stopped: what is still on its way is dropped
                await asyncio.wait(set(self._tasks), timeout=0.25)
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=5)
            self.client.close()

    def stop(self) -> None:
        self.stopping = True
        self._room.set()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if len(self._tasks) < MAX_IN_FLIGHT:
            self._room.set()

    async def _sleep_simulated(self, seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds / self.clock.speed)

    # -- one auction -------------------------------------------------------------------------------------
    async def _auction(self, imp: Imp) -> None:
        if self.sends is not None:
            self.sends.append((imp.id, self.clock.now()))
        if len(self.bidders) == 1:
            answers = [await self._ask(self.bidders[0], imp)]
        else:
            answers = await asyncio.gather(*(self._ask(b, imp) for b in self.bidders))
        hour = min(int((imp.time - self.traffic.start) // SECONDS_PER_HOUR), self.hours - 1)
        offers, placed = [], []
        for bidder, answer in zip(self.bidders, answers):
            if answer is None:
                continue
            response, bid = answer
            offers.append(Offer(bidder.index, bid.price, bid.dealid))
            placed.append((bidder, response, bid))
            bidder.stats.bids += 1
            bidder.stats.hourly_bids[hour] += 1
            self._campaign_stats(bidder, bid).bids += 1
        self.done += 1
        if not offers:
            return
        deals = {imp.deal.id: imp.deal.floor} if imp.deal is not None else None
        outcome = run_auction(offers, imp.floor, imp.market, imp.at == 1, deals, float(imp.uniforms[0][U.TIE]))
        for k, (bidder, response, bid) in enumerate(placed):
            values = {"AUCTION_ID": imp.id, "AUCTION_BID_ID": response.bidid or bid.id, "AUCTION_IMP_ID": bid.impid,
                      "AUCTION_SEAT_ID": self._seat(response, bid), "AUCTION_AD_ID": bid.adid or "",
                      "AUCTION_CURRENCY": "USD", "AUCTION_LOSS": str(outcome.loss[k]),
                      "AUCTION_MIN_TO_WIN": money(outcome.min_to_win[k]), "AUCTION_PRICE": "", "AUCTION_MBR": ""}
            if outcome.loss[k] == LOSS_WON:
                values["AUCTION_PRICE"] = money(outcome.price)
                values["AUCTION_MBR"] = f"{outcome.price / bid.price:.6f}" if bid.price > 0 else ""
                bidder.stats.wins += 1
                bidder.stats.hourly_wins[hour] += 1
                self._campaign_stats(bidder, bid).wins += 1
                await self._won(bidder, imp, bid, outcome.price, values, hour)
            elif bid.lurl:
                u = imp.uniforms[bidder.index]
                faults = self.faults.notice(u[U.LOSS], u[U.LOSS + 1], u[U.LOSS + 2])
                self._spawn(self._notice(bidder, "loss", substitute(bid.lurl, values), faults,
                                         u[U.LOSS + 1], retry=False))

    async def _ask(self, bidder: _Bidder, imp: Imp) -> tuple[_Response, _Bid] | None:
        """The bidder's best bid for the imp, or None (no bid, late, an error, or not a usable bid)."""
        stats = bidder.stats
        stats.requests += 1
        if bidder.in_flight >= bidder.connections:  # as an exchange does with a bidder that cannot keep up
            stats.throttled += 1
            return None
        url = bidder.urls.get(imp.exchange)
        if url is None:
            url = bidder.urls[imp.exchange] = bidder.url.replace("{exchange}", imp.exchange)
        tmax = imp.tmax_ms / 1000.0
        started = time.perf_counter()
        bidder.in_flight += 1
        try:
            status, body = await self.client.request(url, imp.body, timeout=HARD_DEADLINE_S)
        except (TimeoutError, asyncio.TimeoutError):
            stats.timeouts += 1
            return None
        except (ConnectionError, OSError):
            stats.errors += 1
            return None
        finally:
            bidder.in_flight -= 1
        elapsed = time.perf_counter() - started
        stats.latency_ms.append(elapsed * 1000.0)
        if elapsed > tmax:
            stats.timeouts += 1
            return None
        if status == 204:
            stats.no_bids += 1
            return None
        if status != 200:
            stats.errors += 1
            return None
        try:
            response = _decode_response(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            stats.invalid += 1
            return None
        best = None
        for seat in response.seatbid:
            for bid in seat.bid:
                if bid.impid == "1" and (best is None or bid.price > best.price):
                    best = bid
        if (response.id != imp.id or response.cur != "USD" or best is None
                or not (best.price > 0 and math.isfinite(best.price))):
            if not response.seatbid:
                stats.no_bids += 1
            else:
                stats.invalid += 1
            return None
        return response, best

    @staticmethod
    def _seat(response: _Response, bid: _Bid) -> str:
        for seat in response.seatbid:
            if bid in seat.bid:
                return seat.seat or ""
        return ""

    def _campaign_stats(self, bidder: _Bidder, bid: _Bid):
        campaign = self.terms.campaign_of(bid.cid, bid.crid)
        key = campaign.id if campaign is not None else (bid.cid or "(unknown)")
        return bidder.stats.campaign(key, campaign)

    # -- after the auction -------------------------------------------------------------------------------
    async def _won(self, bidder: _Bidder, imp: Imp, bid: _Bid, price: float, values: dict[str, str],
                   hour: int) -> None:
        stats, u, faults = bidder.stats, imp.uniforms[bidder.index], self.faults
        markup, source = (bid.adm, "adm") if bid.adm else (None, None)
        if bid.nurl:
            url = substitute(bid.nurl, values)
            answer = await self._notice(bidder, "win", url, faults.notice(u[U.WIN], u[U.WIN + 1], u[U.WIN + 2]),
                                        u[U.WIN + 1], retry=False)
            if markup is None and answer is not None and 200 <= answer[0] < 300 and answer[1].strip():
                markup, source = answer[1].decode("utf-8", "replace"), "win_notice"
            if markup is None and not is_local(bid.nurl):
                source = "unchecked"  # the markup would come from a win notice we may not send
        if u[U.FORGE] < faults.forged:
            self._spawn(self._forgery(bidder, bid, values, u[U.FORGE_KIND]))
        if source is None:
            stats.creative["missing"] += 1
            return
        stats.creative[source] += 1
        if u[U.RENDER] < faults.unrendered:
            stats.unrendered += 1
            return
        self._charge(bidder, imp, bid, price, hour, u, markup)
        if bid.burl:
            url = substitute(bid.burl, values)
            await self._notice(bidder, "bill", url, faults.notice(u[U.BILL], u[U.BILL + 1], u[U.BILL + 2]),
                               u[U.BILL + 1], retry=True)

    def _charge(self, bidder: _Bidder, imp: Imp, bid: _Bid, price: float, hour: int, u, markup: str | None) -> None:
        stats = bidder.stats
        campaign_stats = self._campaign_stats(bidder, bid)
        campaign = campaign_stats.campaign
        cost = price / 1000.0
        stats.bills += 1
        stats.spend += cost
        campaign_stats.bills += 1
        campaign_stats.spend += cost
        campaign_stats.hourly_spend[hour] += cost
        bidder.stats.count_cap_violation(campaign_stats, imp.user, imp.time, bid.crid or "")
        pctr = self.market.true_pctr(imp, bid.crid) if bid.crid else None
        if pctr is None:
            stats.unknown_creatives += 1
            return
        value = pctr * (campaign.value_per_click if campaign is not None else 0.0)
        stats.value += value
        campaign_stats.value += value
        if u[U.CLICK] < pctr:
            stats.clicks += 1
            campaign_stats.clicks += 1
            found = _HREF.search(markup) if markup else None
            if found and is_local(found.group(1)):
                self._spawn(self._click(bidder, found.group(1), 1.0 + 29.0 * float(u[U.CLICK_DELAY])))

    async def _click(self, bidder: _Bidder, url: str, delay_s: float) -> None:
        await self._sleep_simulated(delay_s)
        bidder.stats.clicks_sent += 1
        try:
            await self.client.request(url, timeout=NOTICE_TIMEOUT_S)
        except (TimeoutError, asyncio.TimeoutError, ConnectionError, OSError):
            pass

    async def _notice(self, bidder: _Bidder, kind: str, url: str, faults: NoticeFaults, u_duplicate: float,
                      retry: bool) -> tuple[int, bytes] | None:
        """Send one genuine notice with its faults; the first answer, or None when none came."""
        notices = bidder.stats.notices
        if not is_local(url):
            notices.unreachable += 1
            return None
        if faults.lost:
            notices.lost += 1
            return None
        await self._sleep_simulated(faults.delay_s)
        notices.by_kind[kind] += 1
        bidder.last_notice = url
        answer = await self._fetch(bidder, url)
        if faults.duplicate:
            # the copy follows 1 to 5 simulated seconds later (u_duplicate is uniform below the rate)
            later = 1.0 + 4.0 * (u_duplicate / self.faults.duplicate)
            self._spawn(self._duplicate(bidder, url, later))
        if retry:
            for _ in range(self.faults.retries()):
                if answer is not None and 200 <= answer[0] < 300:
                    break
                await self._sleep_simulated(self.faults.retry_every_s)
                notices.retries_sent += 1
                answer = await self._fetch(bidder, url)
        return answer

    async def _duplicate(self, bidder: _Bidder, url: str, delay_s: float) -> None:
        await self._sleep_simulated(delay_s)
        bidder.stats.notices.duplicates_sent += 1
        await self._fetch(bidder, url)

    async def _fetch(self, bidder: _Bidder, url: str) -> tuple[int, bytes] | None:
        notices = bidder.stats.notices
        notices.sent += 1
        started = time.perf_counter()
        try:
            answer = await self.client.request(url, timeout=NOTICE_TIMEOUT_S)
        except (TimeoutError, asyncio.TimeoutError, ConnectionError, OSError, ValueError):
            notices.failed += 1
            return None
        bidder.stats.notice_latency_ms.append((time.perf_counter() - started) * 1000.0)
        if 200 <= answer[0] < 300:
            notices.answered += 1
        else:
            notices.refused += 1
        return answer

    async def _forgery(self, bidder: _Bidder, bid: _Bid, values: dict[str, str], u_kind: float) -> None:
        template = bid.burl or bid.nurl
        if template is None or not values.get("AUCTION_PRICE"):
            return
        kind = FORGERIES[min(int(u_kind * len(FORGERIES)), len(FORGERIES) - 1)]
        replayed = bidder.last_notice
        url = forge(template, values, kind, foreign_id=f"forged-{values['AUCTION_ID']}", replayed=replayed)
        if url is None:
            return
        notices = bidder.stats.notices
        if not is_local(url):
            notices.unreachable += 1
            return
        # a replay re-sends another auction's genuine notice, token and all: to the bidder it is a repeat of that
        # auction's notice (an exchange's retry looks the same), answered 2xx and not counted again; it is kept
        # apart from the forgeries that alter a token's facts, which a careful bidder refuses
        replay = url == replayed
        await self._sleep_simulated(self.faults.delay_s)
        notices.sent += 1
        if replay:
            notices.replays_sent += 1
        else:
            notices.forged_sent += 1
        try:
            status, _ = await self.client.request(url, timeout=NOTICE_TIMEOUT_S)
        except (TimeoutError, asyncio.TimeoutError, ConnectionError, OSError, ValueError):
            notices.failed += 1
            return
        if replay:
            notices.replays_answered += 200 <= status < 300
        elif 200 <= status < 300:
            notices.forged_accepted += 1
        else:
            notices.forged_refused += 1

"""Notices: signed tokens and every refusal, key files and rotation, the dedup store across processes, the
routes end to end over HTTP (win, billing, loss, click), and the simulated exchange against a bidder with
notices on."""
from __future__ import annotations

import base64
import copy
import json
import logging
import multiprocessing
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bidder.__main__ import main
from bidder.app import DEFAULT_CAMPAIGNS, Config, create_app
from bidder.campaigns import CatalogError, load_catalog
from bidder.events import read_lines
from bidder.notice_store import SqliteNoticeStore
from bidder.notices import (KeyFileError, Keyring, NoticeSettings, Notices, SigningKey, bid_id_of, is_bid_id_of,
                            load_keyring, micros)
from oracle import metric

NOW = 1_764_590_400.0  # 2025-12-01T12:00:00Z: the fixed clock of the app below
FIELDS = ("r1", "1", "r1-1", "bidder", "c1458", "cr1", "USD", "2", "deepfm-abc")
SECRET_A, SECRET_B = "11" * 32, "22" * 32


def keyring(*keys: tuple[str, str, float]) -> Keyring:
    return Keyring([SigningKey(i, bytes.fromhex(s), t) for i, s, t in keys])


def write_keys(path: Path, keys: list[dict], mode: int = 0o600) -> Path:
    path.write_text(json.dumps({"keys": keys}))
    path.chmod(mode)
    return path


# -- tokens ------------------------------------------------------------------------------------------------------
def test_a_token_carries_the_bids_facts_and_any_change_breaks_its_signature():
    keys = keyring(("a", SECRET_A, 0))
    token = keys.sign(NOW, micros(2.5), 600, *FIELDS)
    facts = keys.verify(token)
    assert (facts.issued, facts.price_micros, facts.window, facts.key_id) == (NOW, 2_500_000, 600, "a")
    assert (facts.request_id, facts.imp_id, facts.bid_id, facts.seat, facts.campaign, facts.creative,
            facts.currency, facts.exchange, facts.model_id) == FIELDS
    assert len(token) < 150 and token.isascii() and "=" not in token
    raw = bytearray(token.encode())
    for at in range(0, len(raw), 3):  # any one character changed: refused
        altered = raw.copy()
        altered[at] = ord("A") if altered[at] != ord("A") else ord("B")
        assert keys.verify(altered.decode()) in ("bad_signature", "unknown_key"), at
    for forged in ("", "x", "!!!!", token[:-4], token + "AAAA", "A" * 200):
        assert keys.verify(forged) == "bad_signature", forged
    other = keyring(("a", SECRET_B, 0))  # the same key id, another secret: a forgery
    assert other.verify(token) == "bad_signature"
    assert keyring(("b", SECRET_A, 0)).verify(token) == "unknown_key"


def test_the_newest_key_signs_and_every_key_verifies(tmp_path):
    old = write_keys(tmp_path / "old.json", [{"id": "2026-11", "secret": SECRET_A, "created": "2026-11-01T00:00:00Z"}])
    before = load_keyring(old).sign(NOW, 1, 600, *FIELDS)
    both = load_keyring(write_keys(tmp_path / "both.json", [
        {"id": "2026-11", "secret": SECRET_A, "created": "2026-11-01T00:00:00Z"},
        {"id": "2026-12", "secret": SECRET_B, "created": "2026-12-01T00:00:00Z"}]))
    assert both.signing.id == "2026-12"
    assert both.verify(before).key_id == "2026-11"  # issued before the rotation, still good
    after = both.sign(NOW, 1, 600, *FIELDS)
    assert both.verify(after).key_id == "2026-12" and load_keyring(old).verify(after) == "unknown_key"
    # the worker processes get the keys by pickling the configuration
    import pickle
    assert pickle.loads(pickle.dumps(both)).verify(after).key_id == "2026-12"


@pytest.mark.parametrize("content, mode, message", [
    ({"keys": [{"id": "k", "secret": SECRET_A, "created": "2026-12-01T00:00:00Z"}]}, 0o644, "chmod 600"),
    ({"keys": []}, 0o600, 'expected {"keys"'),
    ({"keys": [{"id": "k", "secret": "abcd", "created": "2026-12-01T00:00:00Z"}]}, 0o600, "keys[0].secret"),
    ({"keys": [{"id": "k", "secret": "zz" * 32, "created": "2026-12-01T00:00:00Z"}]}, 0o600, "keys[0].secret"),
    ({"keys": [{"id": "k", "secret": SECRET_A, "created": "yesterday"}]}, 0o600, "keys[0].created"),
    ({"keys": [{"id": "k", "secret": SECRET_A, "created": "2026-12-01T00:00:00Z"},
               {"id": "k", "secret": SECRET_B, "created": "2026-12-02T00:00:00Z"}]}, 0o600, "keys[1].id: duplicate"),
    ({"keys": [{"id": "k", "secret": SECRET_A}]}, 0o600, "exactly id, secret and created"),
])
def test_a_bad_key_file_is_one_error_line(tmp_path, capsys, content, mode, message):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(content))
    path.chmod(mode)
    with pytest.raises(KeyFileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_keyring(path)
    assert main(["serve", "--notice-url", "http://127.0.0.1:1", "--notice-keys", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


@pytest.mark.parametrize("argv, message", [
    (["--notice-keys", "k.json"], "need --notice-url"),
    (["--notice-url", "ftp://x"], "http(s) base URL"),
    (["--notice-url", "http://x", "--notice-window", "100", "--notice-max-window", "50"], "--notice-window"),
])
def test_bad_notice_options_are_one_error_line(capsys, argv, message):
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


# -- the dedup store -----------------------------------------------------------------------------------------------
def _record_all(state_dir: str, own: list[str], every: list[str], barrier, out) -> None:
    """Its own half of the bids, then (once the other process has recorded its half) every bid."""
    store = SqliteNoticeStore(state_dir, 3600)
    firsts = sum(store.first_time(i, "bill", NOW, NOW) for i in own)
    barrier.wait(timeout=60)
    out.put((firsts, sum(store.first_time(i, "bill", NOW, NOW) for i in every)))


def _record_batches(state_dir: str, ids: list[str], barrier, out) -> None:
    store = SqliteNoticeStore(state_dir, 3600)
    barrier.wait(timeout=60)
    out.put(sum(sum(store.first_times([(i, "bill", NOW) for i in ids[at:at + 50]], NOW)) for at in range(0, len(ids), 50)))


def test_notices_recorded_in_batches_by_two_processes_count_once(tmp_path):
    """The routes record a loop turn's notices in one transaction: two processes racing batches of the same bids
    (in opposite orders) still count each once, and a repeat within one batch is a repeat."""
    ids = [f"bid-{i}" for i in range(1000)]
    context = multiprocessing.get_context("spawn")
    out, barrier = context.Queue(), context.Barrier(2)
    workers = [context.Process(target=_record_batches, args=(str(tmp_path), ids[::1 - 2 * k], barrier, out))
               for k in (0, 1)]
    for w in workers:
        w.start()
    counts = [out.get(timeout=300) for _ in workers]
    for w in workers:
        w.join(timeout=30)
    assert sum(counts) == len(ids)
    store = SqliteNoticeStore(tmp_path, 3600)
    assert store.first_times([("x", "bill", NOW), ("x", "bill", NOW), ("x", "win", NOW), ("bid-3", "bill", NOW)],
                             NOW) == [True, False, True, False]
    assert store.first_times([], NOW) == [] and len(store) == len(ids) + 2


def test_two_processes_count_each_notice_once(tmp_path):
    ids = [f"bid-{i}" for i in range(600)]
    fresh = [f"new-{i}" for i in range(600)]  # recorded by both at once, in opposite orders: they race
    context = multiprocessing.get_context("spawn")
    out, barrier = context.Queue(), context.Barrier(2)
    workers = [context.Process(target=_record_all, args=(str(tmp_path), ids[k::2], (ids + fresh)[::1 - 2 * k],
                                                         barrier, out)) for k in (0, 1)]
    for w in workers:
        w.start()
    counts = [out.get(timeout=300) for _ in workers]  # a busy host: lock waits back off
    for w in workers:
        w.join(timeout=30)
    # each process counted its own half, none of the other's, and the bids both recorded at once exactly once
    assert [own for own, _ in counts] == [300, 300] and sum(later for _, later in counts) == len(fresh)
    store = SqliteNoticeStore(tmp_path, 3600)
    assert len(store) == len(ids) + len(fresh) and not store.first_time("bid-7", "bill", NOW, NOW)
    assert store.first_time("bid-7", "win", NOW, NOW)  # another kind of the same bid is another notice
    # rows no token can match any more (past the longest window and the margin) are deleted
    assert store.prune(NOW + 3600 + 3600 + 1) == len(ids) + len(fresh) + 1 and len(store) == 0


# -- the routes, over HTTP ---------------------------------------------------------------------------------------------
LANDING = "https://brand.example/landing?from=ad"


@pytest.fixture(scope="module")
def clicking_catalog(tmp_path_factory) -> Path:
    """The default catalog, its creatives with markup linking to a landing page (``click_url``)."""
    catalog = json.loads(DEFAULT_CAMPAIGNS.read_text())
    for campaign in catalog["campaigns"]:
        for creative in campaign["creatives"]:
            creative["markup"] = f'<a href="{LANDING}"><img src="https://cdn.example/{creative["id"]}.png"></a>'
            creative["click_url"] = LANDING
    path = tmp_path_factory.mktemp("notices") / "campaigns.json"
    path.write_text(json.dumps(catalog))
    return path


def test_a_click_url_must_be_in_the_markup(tmp_path, clicking_catalog):
    catalog = json.loads(clicking_catalog.read_text())
    catalog["campaigns"][0]["creatives"][0]["click_url"] = "https://elsewhere.example/"
    path = tmp_path / "c.json"
    path.write_text(json.dumps(catalog))
    with pytest.raises(CatalogError, match=r"campaigns\[0\].creatives\[0\].click_url: the markup must link to it"):
        load_catalog(path)
    assert load_catalog(clicking_catalog).candidates[0].click_url == LANDING


KEYS = keyring(("k1", SECRET_A, 0))
SETTINGS = dict(url="https://bidder.example/", keyring=KEYS, window_s=600, max_window_s=3600)


@pytest.fixture
async def client(aiohttp_client, small_bundle, clicking_catalog, tmp_path):
    settings = NoticeSettings(**SETTINGS, state_dir=tmp_path / "state")
    app = create_app(Config(model=small_bundle, campaigns=clicking_catalog, now=NOW, notices=settings))
    return await aiohttp_client(app)


REQUEST = {"id": "req-1", "imp": [{"id": "1", "banner": {"w": 300, "h": 250}, "exp": 120}],
           "site": {"domain": "news.example"}, "device": {"ua": "Mozilla/5.0"}}


def local(url: str, **macros: str) -> str:
    """A notice URL as the exchange sends it to the test client: path and query, its macros substituted."""
    for name, value in macros.items():
        url = url.replace("${" + name + "}", value)
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


async def notices_of(client, kind: str, result: str) -> float:
    return metric(await (await client.get("/metrics")).text(), "bidder_notices_total", kind=kind, result=result)


async def test_a_bids_notice_urls_and_click_link_carry_one_valid_token(client):
    response = await client.post("/bid/2", data=json.dumps(REQUEST))
    assert response.status == 200, await response.text()
    bid = (await response.json())["seatbid"][0]["bid"][0]
    assert bid["exp"] == 120  # the imp's exp (under the longest window)
    for key, kind in (("nurl", "win"), ("burl", "bill"), ("lurl", "loss")):
        assert bid[key].startswith(f"https://bidder.example/notice/{kind}?t=")
    assert "p=${AUCTION_PRICE}" in bid["nurl"] and "loss=${AUCTION_LOSS}" in bid["lurl"]
    token = parse_qs(urlsplit(bid["nurl"]).query)["t"][0]
    facts = KEYS.verify(token)
    assert (facts.request_id, facts.imp_id, facts.bid_id, facts.seat, facts.exchange) == ("req-1", "1", bid["id"],
                                                                                        "bidder", "2")
    assert (facts.creative, facts.campaign, facts.price_micros, facts.issued) == (bid["crid"], bid["cid"],
                                                                                  micros(bid["price"]), NOW)
    assert LANDING not in bid["adm"] and f'href="https://bidder.example/click?t={token}"' in bid["adm"]

    macros = dict(AUCTION_ID="req-1", AUCTION_BID_ID=bid["id"], AUCTION_PRICE=f"{bid['price'] * 0.8:.6f}")
    win = local(bid["nurl"], **macros)
    first = await client.get(win)
    assert first.status == 200 and await first.read() == b""
    assert (await client.post(win)).status == 200  # the same notice again (POST too): a duplicate
    assert (await client.get(local(bid["burl"], **macros))).status == 200
    assert (await client.get(local(bid["burl"], **macros))).status == 200
    assert await notices_of(client, "win", "ok") == 1 and await notices_of(client, "win", "duplicate") == 1
    assert await notices_of(client, "bill", "ok") == 1 and await notices_of(client, "bill", "duplicate") == 1

    clicked = await client.get(f"/click?t={token}", allow_redirects=False)
    assert clicked.status == 302 and clicked.headers["Location"] == LANDING
    assert (await client.get(f"/click?t={token}", allow_redirects=False)).status == 302
    assert await notices_of(client, "click", "ok") == 1 and await notices_of(client, "click", "duplicate") == 1
    text = await (await client.get("/metrics")).text()
    assert metric(text, "bidder_notice_delay_seconds_count", kind="win") == 1


async def test_notices_arriving_together_are_each_counted_once(client):
    """Notices of one loop turn are recorded in the store together: a repeat among them is still a duplicate."""
    import asyncio

    bids = []
    for n in range(3):
        response = await client.post("/bid", data=json.dumps({**REQUEST, "id": f"together-{n}"}))
        bids.append((await response.json())["seatbid"][0]["bid"][0])
    urls = [local(bid[key]) for bid in bids for key in ("nurl", "burl")] + [local(bids[0]["burl"])]
    answers = await asyncio.gather(*(client.get(url) for url in urls))
    assert [a.status for a in answers] == [200] * len(urls)
    assert await notices_of(client, "win", "ok") == 3 and await notices_of(client, "bill", "ok") == 3
    assert await notices_of(client, "bill", "duplicate") == 1 and await notices_of(client, "win", "duplicate") == 0


async def test_a_token_carries_the_deals_seat_and_the_response_currency(aiohttp_client, small_bundle,
                                                                        clicking_catalog, tmp_path):
    catalog = json.loads(clicking_catalog.read_text())
    for campaign in catalog["campaigns"]:
        campaign["deals"] = [{"dealid": "D-1", "seat": "agency-1"}]
    path = tmp_path / "campaigns.json"
    path.write_text(json.dumps(catalog))
    settings = NoticeSettings(**SETTINGS, state_dir=tmp_path / "state")
    client = await aiohttp_client(create_app(Config(model=small_bundle, campaigns=path, now=NOW, notices=settings)))
    request = copy.deepcopy(REQUEST)
    request["cur"] = ["EUR"]
    request["imp"][0]["pmp"] = {"private_auction": 1, "deals": [{"id": "D-1", "bidfloor": 0.01}]}
    answer = await (await client.post("/bid", data=json.dumps(request))).json()
    bid = answer["seatbid"][0]["bid"][0]
    facts = KEYS.verify(parse_qs(urlsplit(bid["nurl"]).query)["t"][0])
    assert (answer["cur"], answer["seatbid"][0]["seat"], bid["dealid"]) == ("EUR", "agency-1", "D-1")
    assert (facts.seat, facts.currency, facts.price_micros) == ("agency-1", "EUR", micros(bid["price"]))


async def test_every_refusal_is_a_403_naming_its_reason_and_counted(client):
    bid = (await (await client.post("/bid", data=json.dumps(REQUEST))).json())["seatbid"][0]["bid"][0]
    macros = dict(AUCTION_ID="req-1", AUCTION_BID_ID=bid["id"], AUCTION_PRICE=f"{bid['price']:.6f}")
    token = parse_qs(urlsplit(bid["burl"]).query)["t"][0]
    facts = KEYS.verify(token)
    stranger = keyring(("k1", SECRET_B, 0)).sign(NOW, 1, 600, *FIELDS)
    unknown = keyring(("k9", SECRET_A, 0)).sign(NOW, 1, 600, *FIELDS)
    other_bid = KEYS.sign(NOW, facts.price_micros, 600, "req-2", "1", "req-2-1", "bidder", facts.campaign,
                          facts.creative, "USD", "", facts.model_id)
    expired = KEYS.sign(NOW - 3601, facts.price_micros, 600, *facts[4:])
    cases = {
        "bad_signature": f"/notice/bill?t={stranger}",
        "unknown_key": f"/notice/bill?t={unknown}",
        "altered": local(bid["burl"], **dict(macros, AUCTION_BID_ID="someone-else")),
        "price_above_bid": local(bid["burl"], **dict(macros, AUCTION_PRICE=f"{bid['price'] + 0.000002:.6f}")),
        "expired": f"/notice/bill?t={expired}&p=0.1",
    }
    for reason, url in cases.items():
        response = await client.get(url)
        body = await response.json()
        assert response.status == 403 and body["reason"] == reason and reason in body["error"], (reason, body)
        assert await notices_of(client, "bill", f"refused_{reason}") == 1, reason
    # a genuine token of another bid under this bid's id: altered; with its own ids it is that bid's notice
    assert (await client.get(f"/notice/bill?t={other_bid}&a=req-1&bid={bid['id']}&p=0.1")).status == 403
    assert await notices_of(client, "bill", "refused_altered") == 2
    assert await notices_of(client, "bill", "ok") == 0
    for url, status in ((f"/notice/bill?t={token}&p=cheap", 400), ("/notice/bill?p=1", 400),
                        (f"/notice/bill?t={token}&p=-1", 400), (f"/notice/click?t={token}", 404),
                        (f"/click?t={stranger}", 403)):
        response = await client.get(url)
        assert response.status == status and "error" in await response.json(), url
    assert (await client.get(local(bid["burl"], **macros))).status == 200  # the genuine notice still counts
    assert await notices_of(client, "bill", "ok") == 1


async def test_a_late_notice_is_accepted_and_counted_as_late(client):
    bid = (await (await client.post("/bid", data=json.dumps(REQUEST))).json())["seatbid"][0]["bid"][0]
    facts = KEYS.verify(parse_qs(urlsplit(bid["nurl"]).query)["t"][0])
    late = KEYS.sign(NOW - 121, facts.price_micros, 120, *facts[4:])  # the bid's exp was 120 s
    assert (await client.get(f"/notice/loss?t={late}&loss=102&mtw=1.5")).status == 200
    assert await notices_of(client, "loss", "late") == 1 and await notices_of(client, "loss", "ok") == 0
    on_time = KEYS.sign(NOW - 119, facts.price_micros, 120, *facts[4:])
    assert (await client.get(f"/notice/win?t={on_time}")).status == 200
    assert await notices_of(client, "win", "ok") == 1
    text = await (await client.get("/metrics")).text()
    assert metric(text, "bidder_notice_delay_seconds_sum", kind="loss") == pytest.approx(121, abs=0.01)


async def test_without_a_notice_url_nothing_changes(aiohttp_client, small_bundle, clicking_catalog):
    client = await aiohttp_client(create_app(Config(model=small_bundle, campaigns=clicking_catalog, now=NOW)))
    bid = (await (await client.post("/bid", data=json.dumps(REQUEST))).json())["seatbid"][0]["bid"][0]
    assert "burl" not in bid and "lurl" not in bid and "exp" not in bid
    assert bid["nurl"].startswith("https://win.bidder.example.com/")  # the creative's own
    assert LANDING in bid["adm"]
    assert (await client.get("/notice/win?t=x")).status == 404 and (await client.get("/click?t=x")).status == 404
    assert "bidder_notices" not in await (await client.get("/metrics")).text()


def test_a_tokens_tag_is_hmac_sha256_of_what_it_carries():
    """The tag is the first 16 bytes of the standard HMAC-SHA256, secrets longer than SHA-256's block included."""
    import base64
    import hashlib
    import hmac
    for secret in (bytes.fromhex(SECRET_A), bytes(range(100))):
        keys = Keyring([SigningKey("k", secret, 0)])
        for fields in (FIELDS, ("r" * 300, "2", "r-2", "seat-9", "c", "cr", "EUR", "x", "m")):
            raw = base64.urlsafe_b64decode(keys.sign(NOW, 1, 60, *fields) + "==")
            assert raw[-16:] == hmac.new(secret, raw[:-16], hashlib.sha256).digest()[:16]
            assert keys.verify(keys.sign(NOW, 1, 60, *fields))[4:] == fields


def test_dressing_routes_every_link_to_the_landing_page_through_click():
    notices = Notices(NoticeSettings(**SETTINGS, state_dir=Path("unused")))

    class Bid:  # the fields dress reads and writes
        def __init__(self, adm):
            self.id, self.impid, self.price, self.adm = "r-1", "1", 2.5, adm

    class Creative:
        def __init__(self, click_url):
            self.campaign_id, self.creative_id, self.click_url = "c", "cr", click_url

    markup = '<a href="https://a.example/">x</a><a href="https://a.example/">y</a><i src="https://b.example/">'
    for landing, routed in (("https://a.example/", 2), ("https://b.example/", 1), ("https://a.example/", 2)):
        bid = Bid(markup)
        notices.dress(bid, "r", None, "bidder", Creative(landing), None, "m", NOW)
        token = parse_qs(urlsplit(bid.nurl).query)["t"][0]
        assert bid.adm.count(f"/click?t={token}") == routed and landing not in bid.adm
        assert bid.adm.replace(f"{SETTINGS['url'].rstrip('/')}/click?t={token}", landing) == markup


def test_notices_dress_a_bid_within_the_windows():
    notices = Notices(NoticeSettings(**SETTINGS, state_dir=Path("unused")))
    assert [notices.window(e) for e in (None, 0, 30, 3600, 10 ** 9)] == [600, 600, 30, 3600, 3600]


# -- the simulated exchange --------------------------------------------------------------------------------------------
def test_the_exchange_against_a_bidder_with_notices(tmp_path, clicking_catalog):
    """Every genuine first notice is counted once; duplicates and replays are answered 200 and counted as
    duplicates; every other forgery (an altered bid id, a price above the bid) is refused."""
    from bench.exchange.cli import ExchangeConfig, run_exchange
    from bench.exchange.faults import Faults
    from bench.exchange.traffic import Market
    from bidder.clock import parse_time
    from tests.processes import Server

    anchor = time.time() + 8.0
    start = "2026-12-01T09:00:00Z"
    keys = write_keys(tmp_path / "keys.json", [{"id": "k", "secret": SECRET_A, "created": "2026-12-01T00:00:00Z"}])
    with Server("--campaigns", str(clicking_catalog), "--notice-url", "http://127.0.0.1:{port}", "--notice-keys",
                str(keys), "--state-dir", str(tmp_path / "state"), "--clock-start", start, "--clock-speed", "720",
                "--clock-anchor", str(anchor)) as server:
        server.wait_ready()
        url = f"http://127.0.0.1:{server.port}/bid/{{exchange}}"
        faults = Faults(delay_s=1.0, late=0.0, lost=0.0, duplicate=0.5, unrendered=0.0, forged=1.0)
        config = ExchangeConfig(bidders=(url,), campaigns=clicking_catalog, start=parse_time(start), speed=720.0,
                                hours=1.0, requests=250, rate=300.0, seed=4, world_seed=5, world_rows=8_000,
                                faults=faults, anchor=anchor)
        report, _ = run_exchange(config, market=Market(world_seed=5, world_rows=8_000))
        _, text = server.get("/metrics")
        server.stop()
    n = report["bidders"][url]["notices"]
    text = text.decode()

    def counted(result: str, kind: str | None = None) -> float:
        return metric(text, "bidder_notices_total", result=result, **({"kind": kind} if kind else {}))

    assert report["bidders"][url]["wins"] > 20 and n["forged_sent"] > 20 and n["replays_sent"] > 0
    assert n["refused"] == n["failed"] == n["unreachable"] == 0  # every genuine notice answered 2xx
    for kind in ("win", "bill", "loss"):
        assert counted("ok", kind) + counted("late", kind) == n["by_kind"][kind], kind
    refused = sum(counted(f"refused_{r}") for r in ("bad_signature", "unknown_key", "altered", "price_above_bid",
                                                     "expired"))
    assert refused == n["forged_refused"] > 0
    # a replay of a genuine notice is answered as what it is, a duplicate, and never counted again
    assert n["replays_answered"] == n["replays_sent"] and n["forged_accepted"] == 0
    assert counted("duplicate") - counted("duplicate", "click") == (n["duplicates_sent"] + n["retries_sent"]
                                                                    + n["replays_sent"])


def test_the_cost_benchmark_measures_every_step(tmp_path):
    from bench.notices import measure

    figures = measure(50, tmp_path)
    assert set(figures) == {"token_chars", "sign_us", "verify_us", "store_first_us", "store_duplicate_us",
                            "route_check_us"}
    assert all(value > 0 for value in figures.values())


def test_two_workers_count_a_notice_once_whichever_answers_it(tmp_path):
    """``bidder serve --workers 2``: the same notice sent over new connections (spread over both workers by
    SO_REUSEPORT) is counted once, every copy answered 200; each worker's counters, summed, say so."""
    import re
    import sqlite3

    from bidder.openrtb import DEFAULT_SEAT
    from tests.processes import Server

    with Server("--notice-url", "http://127.0.0.1:{port}", "--state-dir", str(tmp_path), "--now", str(NOW),
                workers=2) as server:
        server.wait_ready(workers=2)
        status, body = server.post("/bid/2", json.dumps(REQUEST).encode())
        assert status == 200, body
        bid = json.loads(body)["seatbid"][0]["bid"][0]
        assert json.loads(body)["seatbid"][0]["seat"] == DEFAULT_SEAT
        win = local(bid["nurl"], AUCTION_ID="req-1", AUCTION_BID_ID=bid["id"], AUCTION_PRICE="0.5")
        assert [server.get(win)[0] for _ in range(30)] == [200] * 30
        per_worker: dict[str, str] = {}  # pid -> its latest /metrics
        for _ in range(60):
            text = server.get("/metrics")[1].decode()
            per_worker[re.search(r'bidder_worker_info\{pid="(\d+)"', text).group(1)] = text
            if len(per_worker) == 2:
                break
        server.stop()
    assert len(per_worker) == 2
    ok = [metric(t, "bidder_notices_total", kind="win", result="ok") for t in per_worker.values()]
    duplicates = [metric(t, "bidder_notices_total", kind="win", result="duplicate") for t in per_worker.values()]
    assert sum(ok) == 1 and sum(duplicates) == 29 and all(o + d > 0 for o, d in zip(ok, duplicates))
    rows = sqlite3.connect(tmp_path / "notices.sqlite").execute("SELECT bid_id, kind FROM notices").fetchall()
    assert rows == [(bid["id"], "win")]


async def test_with_an_event_log_each_counted_notice_and_click_is_logged_once(aiohttp_client, small_bundle,
                                                                            clicking_catalog, tmp_path):
    settings = NoticeSettings(**SETTINGS, state_dir=tmp_path / "state")
    client = await aiohttp_client(create_app(Config(model=small_bundle, campaigns=clicking_catalog, now=NOW,
                                                    notices=settings, events=tmp_path / "events")))
    bid = (await (await client.post("/bid/2", data=json.dumps(REQUEST))).json())["seatbid"][0]["bid"][0]
    macros = dict(AUCTION_ID="req-1", AUCTION_BID_ID=bid["id"], AUCTION_PRICE="1.234567", AUCTION_LOSS="102")
    for url in (bid["nurl"], bid["nurl"], bid["burl"], bid["lurl"]):  # the win twice: logged once
        assert (await client.get(local(url, **macros))).status == 200
    token = parse_qs(urlsplit(bid["nurl"]).query)["t"][0]
    assert (await client.get(f"/click?t={token}", allow_redirects=False)).status == 302
    assert (await client.get("/notice/win?t=forged&p=1")).status in (400, 403)  # refused: not logged
    await client.close()  # the app's cleanup closes the log: every queued event written
    records = []
    for path in sorted((tmp_path / "events").glob("events-*.jsonl.zst")):
        records += [json.loads(line) for line in read_lines(path)]
    assert [r["kind"] for r in records].count("bid") == 1
    notices = {r["notice"]: r for r in records if r["kind"] == "notice"}
    assert sorted(notices) == ["bill", "loss", "win"] and len([r for r in records if r["kind"] == "notice"]) == 3
    assert all(r["bid_id"] == bid["id"] for r in records if r["kind"] != "bid")
    assert notices["win"]["price"] == 1.234567 and notices["loss"]["loss"] == 102
    assert notices["loss"]["min_to_win"] is None  # ${AUCTION_MIN_TO_WIN} left unsubstituted
    assert [r["kind"] for r in records].count("click") == 1


async def test_refused_notices_are_logged_as_events_at_most_once_a_second_per_reason(client, caplog):
    stranger = keyring(("k1", SECRET_B, 0)).sign(NOW, 1, 600, *FIELDS)
    unknown = keyring(("k9", SECRET_A, 0)).sign(NOW, 1, 600, *FIELDS)
    with caplog.at_level(logging.INFO, logger="bidder"):
        for _ in range(3):
            assert (await client.get(f"/notice/win?t={stranger}")).status == 403
        assert (await client.get(f"/notice/win?t={unknown}")).status == 403
    refused = [r for r in caplog.records if getattr(r, "event", None) == "notice_refused"]
    assert [(r.args["kind"], r.args["reason"], r.args["status"], r.args["suppressed"]) for r in refused] == [
        ("win", "bad_signature", 403, 0), ("win", "unknown_key", 403, 0)]
    assert all(r.levelname == "WARNING" and r.args["where"] == "t" for r in refused)


def test_a_bid_id_made_of_request_and_imp_ids_is_not_repeated_in_the_token():
    """The bidder's own bid ids are ``<request id>-<imp id>``: their tokens (version 2) leave the bid id out and the
    check puts it back; any other bid id is carried whole (version 1). Both verify to the same facts."""
    keyring = Keyring.generate()
    rest = ("bidder", "c1", "cr1", "USD", "adx", "model-1")
    derived = keyring.sign(1_370_000_000.5, 2_500_000, 600, "req-7", "3", "req-7-3", *rest)
    whole = keyring.sign(1_370_000_000.5, 2_500_000, 600, "req-7", "3", "req-7-03", *rest)
    raw_derived, raw_whole = (base64.urlsafe_b64decode(t + "=" * (-len(t) % 4)) for t in (derived, whole))
    assert len(raw_whole) - len(raw_derived) == 10  # "req-7-03" and its two length bytes
    assert (raw_derived[0], raw_whole[0]) == (2, 1)
    facts, other = keyring.verify(derived), keyring.verify(whole)
    assert (facts.bid_id, other.bid_id) == ("req-7-3", "req-7-03")
    assert facts._replace(bid_id="") == other._replace(bid_id="")
    assert Keyring([keyring.signing]).verify(derived[:-1] + ("A" if derived[-1] != "A" else "B")) == "bad_signature"


def _reference_token(keyring, version, issued_ms, price, window, texts):
    """The token layout of docs/notices.md, in plain Python: what ``bidder._tokens.sign`` must produce."""
    import struct

    payload = struct.pack(">BQQI", version, issued_ms, price, window) + b"".join(
        struct.pack(">H", len(t)) + t for t in [keyring.signing.id.encode()] + [t.encode() for t in texts])
    raw = payload + keyring._sign_mac.digest(payload)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


_field_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=200, deadline=None)
@given(issued_ms=st.integers(0, 2**63 - 1), price=st.integers(0, 2**64 - 1), window=st.integers(0, 2**32 - 1),
       request_id=_field_text, imp_id=_field_text, bid_id=_field_text,
       rest=st.lists(_field_text, min_size=6, max_size=6))
def test_native_token_matches_the_documented_layout(issued_ms, price, window, request_id, imp_id, bid_id, rest):
    keyring = _REFERENCE_KEYRING
    token = keyring.sign(issued_ms / 1000, price, window, request_id, imp_id, bid_id, *rest)
    derived = bid_id == f"{request_id}-{imp_id}"
    texts = [request_id, imp_id] + ([] if derived else [bid_id]) + rest
    assert token == _reference_token(keyring, 2 if derived else 1, int(issued_ms / 1000 * 1000), price, window, texts)
    facts = keyring.verify(token)
    assert (facts.request_id, facts.imp_id, facts.bid_id, facts.price_micros, facts.window) == (
        request_id, imp_id, bid_id, price, window)
    assert [facts.seat, facts.campaign, facts.creative, facts.currency, facts.exchange, facts.model_id] == rest


_REFERENCE_KEYRING = Keyring.generate()


def test_a_token_field_longer_than_its_length_prefix_is_refused():
    with pytest.raises(ValueError, match="at most 65535"):
        _REFERENCE_KEYRING.sign(1.0, 1, 1, "r" * 70_000, "1", "b", "s", "c", "cr", "USD", "", "m")


def test_the_store_s_log_is_checkpointed_by_its_own_thread_not_by_a_commit(tmp_path, monkeypatch):
    """A commit never runs the checkpoint (it waited on the disk with every notice behind it): the store's thread
    copies the log into the file every ``CHECKPOINT_S``, and the log restarts from its start."""
    import sqlite3

    import bidder.notice_store as notice_store

    monkeypatch.setattr(notice_store, "CHECKPOINT_S", 0.05)
    store = SqliteNoticeStore(tmp_path, 3600)
    assert store.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    for i in range(300):
        store.first_times([(f"bid-{i}", "win", 1.0e9)], 1.0e9)
    wal = tmp_path / "notices.sqlite-wal"
    time.sleep(0.3)  # a few checkpoints
    other = sqlite3.connect(tmp_path / "notices.sqlite")
    assert other.execute("SELECT count(*) FROM notices").fetchone()[0] == 300
    size = wal.stat().st_size
    for i in range(300, 600):  # the log is written again from its start, not grown
        store.first_times([(f"bid-{i}", "win", 1.0e9)], 1.0e9)
    assert wal.stat().st_size < 1.5 * size  # 300 more commits: as many frames again had it grown
    for _ in range(50):  # busy while the store's thread checkpoints at the same moment (every 50 ms here)
        busy, log_frames, checkpointed = other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if not busy:
            break
        time.sleep(0.01)
    assert busy == 0 and checkpointed == log_frames
    other.close()
    store.close()
    assert not store._checkpoints.is_alive()


def test_a_wal_file_opened_while_another_process_holds_its_lock_waits_for_it(tmp_path):
    """Workers start together: switching the file to WAL while another connection holds the write lock is told
    "database is locked" at once by SQLite; ``walfile.connect`` tries again until its timeout."""
    import sqlite3
    import threading

    from bidder import walfile

    path = tmp_path / "shared.sqlite"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    threading.Timer(0.3, lambda: holder.execute("COMMIT")).start()
    started = time.monotonic()
    db = walfile.connect(path, 10.0, "NORMAL")
    assert time.monotonic() - started >= 0.25
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    db.close()
    holder.close()
    other = tmp_path / "other.sqlite"  # a lock held past the timeout: the error, not a hang
    holder = sqlite3.connect(other, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        walfile.connect(other, 0.2, "NORMAL")
    holder.execute("COMMIT")
    holder.close()


_ids = st.text(alphabet="ab-1", max_size=4)


@given(bid_id=_ids, request_id=_ids, imp_id=_ids)
def test_is_bid_id_of_answers_as_the_rule_itself(bid_id, request_id, imp_id):
    """Signing's check that a bid id is derived (so its token leaves it out) agrees with ``bid_id_of``, dashes in
    the ids included; and a derived id always is."""
    assert is_bid_id_of(bid_id, request_id, imp_id) == (bid_id == bid_id_of(request_id, imp_id))
    assert is_bid_id_of(bid_id_of(request_id, imp_id), request_id, imp_id)


def test_the_event_loop_s_recording_never_waits_for_another_worker_s_lock(tmp_path):
    """``try_first_times`` (the routes ask it at the end of a loop turn) answers at once, or None while another
    worker holds the store's write lock: then the store's thread records them (``first_times`` waits its turn)."""
    import sqlite3

    store = SqliteNoticeStore(tmp_path, 3600)
    assert store.try_first_times([("a", "win", NOW), ("a", "win", NOW)], NOW) == [True, False]
    other = sqlite3.connect(tmp_path / "notices.sqlite", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    assert store.try_first_times([("b", "win", NOW)], NOW) is None
    assert time.monotonic() - started < 1.0  # no busy wait (the store's own connection would wait up to 10 s)
    other.execute("ROLLBACK")
    assert store.try_first_times([("b", "win", NOW), ("a", "win", NOW)], NOW) == [True, False]
    assert store.first_times([("b", "win", NOW)], NOW) == [False]
    other.close()
    store.close()


def test_the_checkpoint_thread_deletes_expired_rows_every_so_many_inserts(tmp_path, monkeypatch):
    """Pruning thousands of rows is left to the store's thread, never done in the turn that crossed the count."""
    import bidder.notice_store as notice_store

    monkeypatch.setattr(notice_store, "CHECKPOINT_S", 0.05)
    monkeypatch.setattr(notice_store, "PRUNE_EVERY", 10)
    store = SqliteNoticeStore(tmp_path, 3600)
    old = NOW - 3600 - notice_store.RETENTION_MARGIN_S - 1  # issued before the longest window and the margin
    store.try_first_times([(f"old-{i}", "win", old) for i in range(8)], NOW)
    store.try_first_times([("new", "win", NOW)], NOW)
    assert len(store) == 9  # 9 inserts: no pruning asked for yet
    store.try_first_times([("newer", "win", NOW)], NOW)  # the 10th: the thread prunes at its next turn
    deadline = time.monotonic() + 10
    while len(store) != 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(store) == 2 and store.first_times([("old-1", "win", NOW), ("new", "win", NOW)], NOW) == [True, False]
    store.close()

"""A bidder that bids a constant price, with notice URLs back to itself: the exchange's own load test.

Every imp gets a bid of ``--price`` (never under its floor) for one creative of the default catalog, with
``nurl``, ``burl`` and ``lurl`` on this server and markup whose click URL is this server too; every notice and
click is answered 200. It costs a fraction of a real bidder per request, so it measures how many requests
(notices and clicks included) the exchange sustains from one core:

    taskset -c 0 python -m bench.exchange.constant --port 8090 &
    taskset -c 1 python -m bench exchange --bidder 'http://127.0.0.1:8090/bid/{exchange}' --rate 6000 ...
"""
from __future__ import annotations

import argparse
import asyncio

import msgspec
from aiohttp import web

__all__ = ["create_app", "main"]

#: a creative of the default catalog (campaign c1458), so the exchange has its truth
CREATIVE, CAMPAIGN = "5fe99fbdedaf0bec3680fd778c323983", "c1458"
_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


def create_app(price: float, port: int) -> web.Application:
    base = f"http://127.0.0.1:{port}"
    query = "id=${AUCTION_ID}&bid=${AUCTION_BID_ID}&price=${AUCTION_PRICE}"
    template = {"impid": "1", "adid": CREATIVE, "crid": CREATIVE, "cid": CAMPAIGN, "w": 300, "h": 250,
                "nurl": f"{base}/win?{query}", "burl": f"{base}/bill?{query}",
                "lurl": f"{base}/loss?id=${{AUCTION_ID}}&loss=${{AUCTION_LOSS}}",
                "adm": f'<a href="{base}/click?crid={CREATIVE}"><img src="ad.png"></a>'}

    async def bid(request: web.Request) -> web.Response:
        body = _decode(await request.read())
        imp = body["imp"][0]
        answer = {"id": body["id"], "cur": "USD", "seatbid": [{"seat": "constant", "bid": [
            dict(template, id=f"b{body['id']}", impid=imp["id"], price=max(price, imp.get("bidfloor", 0.0)))]}]}
        return web.Response(body=_encode(answer), content_type="application/json")

    async def notice(request: web.Request) -> web.Response:
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/bid", bid)
    app.router.add_post("/bid/{exchange}", bid)
    for path in ("/win", "/bill", "/loss", "/click", "/readyz", "/healthz"):
        app.router.add_get(path, notice)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.exchange.constant", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--price", type=float, default=5.0, help="USD CPM (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    web.run_app(create_app(args.price, args.port), host=args.host, port=args.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A bidder that bids a constant price, with notice URLs back to itself: the exchange's own load test.

Every imp gets a bid of ``--price`` (never under its floor) for one creative of the default catalog, with
``nurl``, ``burl`` and ``lurl`` on this server and markup whose click URL is this server too; every notice and
click is answered 200. It speaks just enough HTTP/1.1 on a bare asyncio protocol (keep-alive, ``Content-Length``
bodies) to cost a small fraction of a real bidder per request, so that it measures how many requests, notices
and clicks included, the exchange sustains from one core:

    taskset -c 0 python -m bench.exchange.constant --port 8090 &
    taskset -c 1 python -m bench exchange --bidder 'http://127.0.0.1:8090/bid/{exchange}' --rate 6000 ...
"""
from __future__ import annotations

import argparse
import asyncio

import msgspec

__all__ = ["ConstantBidder", "main", "serve"]

#: a creative of the default catalog (campaign c1458), so the exchange has its truth
CREATIVE, CAMPAIGN = "5fe99fbdedaf0bec3680fd778c323983", "c1458"
_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode
_EMPTY = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
_BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class ConstantBidder(asyncio.Protocol):
    """One connection: requests answered in order, as they complete in the buffer."""

    def __init__(self, price: float, port: int):
        self.price = price
        base = f"http://127.0.0.1:{port}"
        query = "id=${AUCTION_ID}&bid=${AUCTION_BID_ID}&price=${AUCTION_PRICE}"
        self.template = {"impid": "1", "adid": CREATIVE, "crid": CREATIVE, "cid": CAMPAIGN, "w": 300, "h": 250,
                         "nurl": f"{base}/win?{query}", "burl": f"{base}/bill?{query}",
                         "lurl": f"{base}/loss?id=${{AUCTION_ID}}&loss=${{AUCTION_LOSS}}",
                         "adm": f'<a href="{base}/click?crid={CREATIVE}"><img src="ad.png"></a>'}
        self.buffer = bytearray()
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end])
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            length = 0
            if at >= 0:
                stop = lower.find(b"\r\n", at + 2)
                length = int(lower[at + 17:stop if stop >= 0 else len(lower)])
            if len(buf) < end + 4 + length:
                return
            body = bytes(buf[end + 4:end + 4 + length])
            del buf[:end + 4 + length]
            self.transport.write(self._answer(head, body))

    def _answer(self, head: bytes, body: bytes) -> bytes:
        method, _, rest = head.partition(b" ")
        path = rest.split(b" ", 1)[0]
        if method == b"GET":
            return _EMPTY
        if method != b"POST" or not path.startswith(b"/bid"):
            return _NOT_FOUND
        try:
            request = _decode(body)
            imp = request["imp"][0]
            bid = dict(self.template, id=f"b{request['id']}", impid=imp["id"],
                       price=max(self.price, imp.get("bidfloor", 0.0)))
            answer = _encode({"id": request["id"], "cur": "USD", "seatbid": [{"seat": "constant", "bid": [bid]}]})
        except (msgspec.DecodeError, KeyError, IndexError, TypeError):
            return _BAD
        return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(answer)
                + answer)


async def serve(host: str, port: int, price: float) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: ConstantBidder(price, port), host, port, reuse_address=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.exchange.constant", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--price", type=float, default=5.0, help="USD CPM (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        import uvloop
        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    server = loop.run_until_complete(serve(args.host, args.port, args.price))
    try:
        loop.run_until_complete(server.serve_forever())
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        loop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A small HTTP/1.1 client for the exchange: keep-alive connections per origin, one request at a time on
each (no pipelining), a hard deadline per request.

It is what lets one core send thousands of bid requests and notices a second: a protocol object per
connection parses just the status line, ``Content-Length`` or chunked framing, and ``Connection: close``;
no header dictionary, cookie jar or redirect logic. A request that misses its deadline closes its
connection (an answer may still be on the way, and would be read as the next request's) and raises
``TimeoutError``; a connection that fails raises ``ConnectionError``. Only plain ``http`` is spoken.
"""
from __future__ import annotations

import asyncio
from collections import deque
from urllib.parse import urlsplit

__all__ = ["Client", "HttpError"]


class HttpError(ConnectionError):
    """The peer answered something that is not HTTP/1.1 we can read, or closed the connection mid-answer."""


class _Connection(asyncio.Protocol):
    __slots__ = ("transport", "buffer", "waiter", "closed", "keep_alive")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future | None = None
        self.closed = False
        self.keep_alive = True

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is not None and not self.waiter.done():
            try:
                answer = self._parse()
            except (HttpError, ValueError) as exc:
                self.waiter.set_exception(HttpError(str(exc)))
                self.closed = True
                self.transport.close()
                return
            if answer is not None:
                self.waiter.set_result(answer)

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            try:
                answer = self._parse(eof=True)
            except (HttpError, ValueError):
                answer = None
            if answer is not None:
                self.waiter.set_result(answer)
            else:
                self.waiter.set_exception(HttpError(f"connection closed before the answer ({exc or 'eof'})"))

    def _parse(self, eof: bool = False) -> tuple[int, bytes] | None:
        buf = self.buffer
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(buf[:end]).lower()
        try:
            status = int(head[9:12])
        except ValueError:
            raise HttpError(f"not an HTTP answer: {bytes(buf[:40])!r}") from None
        if b"\r\nconnection: close" in head:
            self.keep_alive = False
        start = end + 4
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17:stop if stop >= 0 else len(head)])
            if len(buf) - start < length:
                return None
            body = bytes(buf[start:start + length])
            del buf[:start + length]
            return status, body
        if status == 204 or status == 304 or 100 <= status < 200:
            del buf[:start]
            return status, b""
        if b"\r\ntransfer-encoding: chunked" in head:
            body, used = _dechunk(buf, start)
            if body is None:
                return None
            del buf[:used]
            return status, body
        # neither length nor chunks: the body runs to the end of the connection
        self.keep_alive = False
        if not eof:
            return None
        body = bytes(buf[start:])
        buf.clear()
        return status, body


def _dechunk(buf: bytearray, pos: int) -> tuple[bytes | None, int]:
    parts = []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None, 0
        size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
        if size == 0:
            trailer = buf.find(b"\r\n\r\n", eol)
            if trailer < 0:
                return None, 0
            return b"".join(parts), trailer + 4
        if len(buf) < eol + 2 + size + 2:
            return None, 0
        parts.append(bytes(buf[eol + 2:eol + 2 + size]))
        pos = eol + 2 + size + 2


class _Origin:
    """Idle keep-alive connections to one host:port."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.idle: deque[_Connection] = deque()
        self.host_header = f"{host}:{port}".encode()


class Client:
    """``request(url, body)``: POST when a body is given, else GET; returns (status, body)."""

    def __init__(self) -> None:
        self._origins: dict[tuple[str, int], _Origin] = {}
        self._by_netloc: dict[str, _Origin] = {}  # URLs differ per notice; their host:port repeat

    def _target(self, url: str) -> tuple[_Origin, bytes]:
        scheme, _, rest = url.partition("://")
        netloc, slash, path = rest.partition("/")
        if "?" in netloc:  # http://host:port?query
            netloc, _, query = netloc.partition("?")
            slash, path = "/", "?" + query
        origin = self._by_netloc.get(netloc) if scheme == "http" else None
        if origin is None:
            parts = urlsplit(url)
            if parts.scheme != "http" or not parts.hostname:
                raise ValueError(f"only http:// URLs can be fetched, got {url!r}")
            key = (parts.hostname, parts.port or 80)
            origin = self._origins.get(key)
            if origin is None:
                origin = self._origins[key] = _Origin(*key)
            self._by_netloc[netloc] = origin
        target = slash + path.partition("#")[0]
        return origin, (target if target.startswith("/") else "/" + target).encode()

    async def request(self, url: str, body: bytes | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
        origin, path = self._target(url)
        loop = asyncio.get_running_loop()
        conn = None
        while origin.idle:
            candidate = origin.idle.pop()
            if not candidate.closed:
                conn = candidate
                break
        if conn is None:
            _, conn = await asyncio.wait_for(loop.create_connection(_Connection, origin.host, origin.port), timeout)
        if body is None:
            head = b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path, origin.host_header)
        else:
            head = (b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                    % (path, origin.host_header, len(body)))
        waiter = conn.waiter = loop.create_future()
        conn.transport.write(head + body if body is not None else head)
        timer = loop.call_later(timeout, _expire, conn, waiter)
        try:
            answer = await waiter
        finally:
            timer.cancel()
            conn.waiter = None
        if conn.keep_alive and not conn.closed and not conn.buffer:
            origin.idle.append(conn)
        else:
            conn.transport.close()
        return answer

    def close(self) -> None:
        for origin in self._origins.values():
            while origin.idle:
                origin.idle.pop().transport.close()


def _expire(conn: _Connection, waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("no answer in time"))
        conn.closed = True
        conn.transport.close()

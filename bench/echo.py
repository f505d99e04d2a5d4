"""The framework ceiling: a JSON echo server on the bidder's stack (aiohttp.web + uvloop + msgspec).

It reads and decodes the request body exactly as the bid path's first stage does and answers a small
JSON, so the gap between it and the bidder under the same load is the cost of featurize + score +
price + encode.  No access log, as on the bidder's hot path. ``GET /notice/{kind}`` reads the query's token and
answers 200 empty: the ceiling of the notice routes (``python -m bench notices``).

Two HTTP layers, so the ceiling can match whichever the bidder serves on:
  app     aiohttp's Application: router, middleware support, AppRunner (the bidder's layer today)
  server  aiohttp's low-level `web.Server` with one plain handler function: no Application, no router,
          no middleware; the path is matched by hand

    python -m bench.echo --host 127.0.0.1 --port 8081 [--workers N] [--layer app|server]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal

import msgspec
import uvloop
from aiohttp import web

from bench.workers import run_workers

ROUTE = "/bid"
LAYERS = ("app", "server")

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode
_READY = _encode({"status": "ok"})


async def echo(request: web.BaseRequest) -> web.Response:
    try:
        decoded = _decode(await request.read())
    except msgspec.DecodeError as exc:
        return web.Response(status=400, body=_encode({"error": str(exc)}), content_type="application/json")
    request_id = decoded.get("id") if isinstance(decoded, dict) else None
    return web.Response(body=_encode({"id": request_id, "echo": True}), content_type="application/json")


async def notice(request: web.BaseRequest) -> web.Response:
    """The ceiling of the bidder's notice routes (``python -m bench notices``): the token read, 200 empty."""
    request.query.get("t")
    return web.Response()


async def ready(request: web.BaseRequest) -> web.Response:
    return web.Response(body=_READY, content_type="application/json")


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_post(ROUTE, echo)
    app.router.add_post(ROUTE + "/{exchange}", echo)
    app.router.add_get("/notice/{kind}", notice, allow_head=False)
    app.router.add_get("/healthz", ready)
    app.router.add_get("/readyz", ready)
    return app


async def handle(request: web.BaseRequest) -> web.Response:
    """The whole server on the low-level layer: the routes of `make_app`, matched without a router."""
    path, method = request.path, request.method
    if path == ROUTE or path.startswith(ROUTE + "/"):
        if method == "POST":
            return await echo(request)
    elif path.startswith("/notice/"):
        if method == "GET":
            return await notice(request)
    elif path in ("/healthz", "/readyz"):
        if method in ("GET", "HEAD"):
            return await ready(request)
    else:
        return web.Response(status=404)
    return web.Response(status=405)


def make_runner(layer: str) -> web.BaseRunner:
    """A runner for `layer`; call it inside the running loop (`web.Server` binds to it)."""
    if layer == "app":
        return web.AppRunner(make_app(), access_log=None, handle_signals=False)
    if layer == "server":
        return web.ServerRunner(web.Server(handle, access_log=None), handle_signals=False)
    raise ValueError(f"unknown layer {layer!r}; choose from {', '.join(LAYERS)}")


async def serve(host: str, port: int, reuse_port: bool, layer: str = "app") -> None:
    runner = make_runner(layer)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await web.TCPSite(runner, host, port, reuse_port=reuse_port).start()
        await stop.wait()
    finally:
        await runner.cleanup()


def run_worker(host: str, port: int, reuse_port: bool, cpu: int | None, layer: str = "app") -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    uvloop.run(serve(host, port, reuse_port, layer))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--workers", type=int, default=1,
                        help="processes sharing the port through SO_REUSEPORT, worker i on allowed core i mod n")
    parser.add_argument("--layer", choices=LAYERS, default="app",
                        help="aiohttp layer: 'app' (Application + router, as the bidder) or 'server' "
                             "(low-level web.Server, one handler function) (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.workers <= 1:
        run_worker(args.host, args.port, reuse_port=False, cpu=None, layer=args.layer)
        return 0
    return run_workers(args.workers, run_worker,
                       lambda cpu: (args.host, args.port, True, cpu, args.layer))


if __name__ == "__main__":
    raise SystemExit(main())

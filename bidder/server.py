"""HTTP service: aiohttp on uvloop, one pinned single-thread scorer per worker process.

``create_app(config)`` builds the application without a socket (tests drive it with aiohttp's test
client); ``serve(config)`` runs one worker in this process or, with ``workers > 1``, supervises N
worker processes that share the port through SO_REUSEPORT.
"""
from __future__ import annotations

import asyncio
import functools
import gc
import ipaddress
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import msgspec
import numpy as np
from aiohttp import web
from threadpoolctl import threadpool_limits

from bidder import DEFAULT_BUNDLE
from bidder.campaigns import Catalog, CatalogError, load_catalog
from bidder.clock import Clock
from bidder.engine import BidEngine, Outcome, error_body
from bidder.factorized import FactorizedScorer
from bidder.metrics import CONTENT_TYPE_LATEST, Metrics
from bidder.openrtb import RequestError, decode_json
from bidder.retrieval import DEFAULT_K, retriever_for
from bidder.scorer import BundleError, Scorer, pin_to_core
from bidder.shading import WinModel

__all__ = ["Config", "ENGINE", "EXIT_STARTUP", "StartupError", "check_port", "create_app", "serve"]

log = logging.getLogger("bidder")

DEFAULT_CAMPAIGNS = DEFAULT_BUNDLE / "campaigns.json"
#: the route label of requests no route matched (404, 405): one label, whatever the path, bounds the series
UNMATCHED_ROUTE = "unmatched"
#: exit status of a server (or worker) that could not start: bad option, bundle, catalog or address
EXIT_STARTUP = 2
#: consecutive start-up failures of one worker after which the supervisor stops restarting it
MAX_STARTUP_FAILURES = 3


#: catalogs loaded already by the command line's check (``preload``), taken by the first load of their file
_PRELOADED: dict[Path, Catalog] = {}


def preload(campaigns: Path, catalog: Catalog) -> None:
    """Hand ``campaigns``, already loaded, to the first engine this process builds from that file: the command
    line checks the catalog before serving, and reading 100,000 creatives again would take seconds more."""
    _PRELOADED[Path(campaigns)] = catalog


class StartupError(Exception):
    """A worker could not start serving; the message is one line naming the cause."""


@dataclass(frozen=True)
class Config:
    model: Path = DEFAULT_BUNDLE
    campaigns: Path = DEFAULT_CAMPAIGNS
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_batch: int = 256
    max_body: int = 64 * 1024
    utc_offset_hours: float = 0.0
    now: float | None = None  # a fixed receive time (Unix seconds) for weekday/hour; None: the wall clock
    clock: Clock | None = None  # a simulated clock for weekday/hour (--clock-start/--clock-speed); overrides now
    shutdown_timeout: float = 30.0
    pin: bool = True
    batching: bool = True    # score the requests of one loop turn together (off: each on its own, to compare)
    factorized: bool = True  # use the bundle's factorized graphs when it has them (off: model.onnx per row)
    native_shading: bool = True  # search first-price bids over the market model's terms (off: market.onnx, to compare)
    retrieve_k: int = DEFAULT_K  # large catalogs: creatives the ranker scores per imp, chosen by the two towers
    retrieval: bool = True   # off: a large catalog's every eligible creative is scored (for comparison)
    ann: bool = False        # approximate top K (HNSW, faiss-cpu) instead of the exact BLAS product


#: the interpreter's GIL switch interval while an engine is built (``State.load``)
BUILD_SWITCH_INTERVAL_S = 0.0005


class State:
    """What a worker serves; ``engine`` is replaced whole on reload, so a request sees one version."""

    def __init__(self, config: Config, metrics: Metrics):
        self.config = config
        self.metrics = metrics
        self.engine: BidEngine | None = None
        self.draining = False
        self.in_flight = 0
        self.reload_lock = asyncio.Lock()

    def load(self, model: Path, campaigns: Path) -> BidEngine:
        """Build a complete engine (runs in a thread during reloads) and warm it.

        A one-imp request scores all candidates of one size: binding and running those batch sizes
        now keeps the first such requests from paying for ORT's first run at a new shape.
        """
        # A large catalog makes millions of objects: the cyclic collector would scan them all, more than once,
        # each time in one call that holds the GIL for a tenth of a second or more, stalling the requests the
        # event loop serves meanwhile (reloads run in a thread). What was built lives as long as the engine:
        # it is frozen before the collector comes back, which would otherwise scan it all at once (and again
        # on every collection of the bid path's short-lived objects).
        # The thread building it holds the GIL until the interpreter asks it to switch: every 5 ms by default,
        # each time the serving thread waits for it (a request waits several times). A shorter interval
        # while building keeps those waits short, at some cost to the build.
        collecting, interval = gc.isenabled(), sys.getswitchinterval()
        gc.disable()
        sys.setswitchinterval(min(interval, BUILD_SWITCH_INTERVAL_S))
        try:
            engine = self._build(model, campaigns)
            gc.freeze()
            return engine
        finally:
            sys.setswitchinterval(interval)
            if collecting:
                gc.enable()

    def _build(self, model: Path, campaigns: Path) -> BidEngine:
        scorer = Scorer(model, max_batch=self.config.max_batch)
        catalog = _PRELOADED.pop(Path(campaigns), None)
        if catalog is None:
            catalog = load_catalog(campaigns)
        factorized = None
        if self.config.factorized and scorer.factorized_files():
            # checked against model.onnx here (BundleError above 1e-6): a bad graph is refused at load
            factorized = FactorizedScorer.for_scorer(scorer, max_imps=scorer.max_batch, max_rows=scorer.max_batch)
        # the win-price model for first-price shading, if the bundle has one (checked, BundleError otherwise)
        market = WinModel.for_scorer(scorer, max_imps=scorer.max_batch, native=self.config.native_shading)
        retriever = retriever_for(scorer, catalog, self.config.retrieve_k, self.config.ann, self.config.retrieval)
        engine = BidEngine(scorer, catalog, self.metrics, self.config.utc_offset_hours,
                           self.config.clock or self.config.now, factorized, market, retriever)
        layers = [c.layer for c in catalog.candidates[: scorer.max_batch]]
        limit = len(catalog) if retriever is None else retriever.k  # rows per imp and size
        per_size = sorted({min(limit, len(catalog.for_size(w, h))) for w, h in catalog.sizes} | {len(layers)})
        for rows in per_size:
            scorer.score(layers[:min(rows, len(layers))])
        if factorized is not None and len(catalog):
            # the shapes of batches of one-imp requests of one size: n imps x k candidates
            for k in per_size:
                for n in range(1, min(32, scorer.max_batch // max(k, 1)) + 1):
                    factorized.row_imp[:n * k] = np.repeat(np.arange(n), k)
                    factorized.row_cand[:n * k] = 0
                    factorized.run(n, n * k)
        return engine

    def install(self, engine: BidEngine, model: Path, campaigns: Path) -> None:
        self.engine = engine
        self.config = replace(self.config, model=model, campaigns=campaigns)
        self.metrics.set_model(engine.scorer.model_id, str(engine.scorer.meta.get("architecture", "unknown")))


STATE = web.AppKey("state", State)
ENGINE = STATE  # the app key tests and benchmarks use to reach the engine: app[ENGINE].engine


def _json(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/json")


def _respond(state: State, route: str, outcome: Outcome, started: float) -> web.Response:
    metrics = state.metrics
    if outcome.status >= 400:
        metrics.errors.labels(outcome.reason or "bad_request").inc()
    metrics.response(route, outcome.status).inc()
    metrics.route_latency[route].observe(time.perf_counter() - started)
    if outcome.status == 204:
        return web.Response(status=204)
    return _json(outcome.status, outcome.body)


async def _read_body(request: web.Request, state: State) -> bytes | Outcome:
    limit = state.config.max_body
    if request.content_length is not None and request.content_length > limit:
        return Outcome(413, error_body(f"request body over {limit} bytes"), "too_large")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        return Outcome(413, error_body(f"request body over {limit} bytes"), "too_large")


def _internal_error(state: State, request: web.Request) -> web.Response:
    log.exception("internal error on %s %s", request.method, request.path)
    state.metrics.errors.labels("internal").inc()
    return _json(500, error_body("internal error"))


def guarded(handler):
    """Counts requests in flight (for draining); a bug still answers JSON and the worker serves on.

    A wrapper per handler instead of an aiohttp middleware: a middleware costs every request a
    cached-chain lookup, a partial and two more coroutine frames.
    """
    @functools.wraps(handler)
    async def guard(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE]
        state.in_flight += 1
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception:
            return _internal_error(state, request)
        finally:
            state.in_flight -= 1

    return guard


@guarded
async def bid(request: web.Request) -> web.Response:
    """``POST /bid`` and ``POST /bid/{exchange}`` (the exchange becomes the ``adexchange`` feature)."""
    started = time.perf_counter()
    state = request.app[STATE]
    body = await _read_body(request, state)
    if body.__class__ is not bytes:
        return _respond(state, "/bid", body, started)
    engine = state.engine
    outcome = engine.prepare(body, request.match_info.get("exchange"), started)
    if outcome.__class__ is not Outcome:  # rows to score: join this loop turn's batch
        outcome = await engine.submit(outcome) if state.config.batching else engine.bid_prepared(outcome)
    return _respond(state, "/bid", outcome, started)


@guarded
async def predict(request: web.Request) -> web.Response:
    started = time.perf_counter()
    state = request.app[STATE]
    body = await _read_body(request, state)
    if isinstance(body, Outcome):
        return _respond(state, "/predict", body, started)
    return _respond(state, "/predict", state.engine.predict(body), started)


@guarded
async def healthz(request: web.Request) -> web.Response:
    return _json(200, b'{"status":"ok"}')


@guarded
async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.engine is None or state.draining:
        return _json(503, msgspec.json.encode({"ready": False, "draining": state.draining}))
    return _json(200, msgspec.json.encode({"ready": True, "model": state.engine.scorer.model_id}))


@guarded
async def metrics(request: web.Request) -> web.Response:
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class _ReloadRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Relative paths are read from the server's working directory."""
    model: str | None = None
    campaigns: str | None = None


_reload_decoder = msgspec.json.Decoder(_ReloadRequest)


async def reload(state: State, model: Path | None = None, campaigns: Path | None = None) -> tuple[bool, str]:
    """Load a bundle and catalog beside the ones serving, then switch; on failure keep serving the old."""
    model = Path(model or state.config.model)
    campaigns = Path(campaigns or state.config.campaigns)
    async with state.reload_lock:
        loop = asyncio.get_running_loop()
        try:
            engine = await loop.run_in_executor(None, state.load, model, campaigns)
        except (BundleError, CatalogError, OSError, ValueError) as exc:
            state.metrics.reloads.labels("refused").inc()
            log.error("reload refused, still serving %s: %s", state.engine.scorer.model_id, exc)
            return False, str(exc)
        except Exception as exc:  # whatever a broken bundle makes a library raise, the old model serves on
            state.metrics.reloads.labels("refused").inc()
            log.exception("reload failed, still serving %s", state.engine.scorer.model_id)
            return False, f"{type(exc).__name__}: {exc}"
        state.install(engine, model, campaigns)
        state.metrics.reloads.labels("ok").inc()
        log.info("reloaded: serving %s", engine.scorer.model_id)
        return True, engine.scorer.model_id


@guarded
async def admin_reload(request: web.Request) -> web.Response:
    started = time.perf_counter()
    state = request.app[STATE]
    try:
        loopback = ipaddress.ip_address((request.remote or "").split("%")[0]).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        return _respond(state, "/admin/reload", Outcome(403, error_body("reload is allowed from loopback only"),
                                                       "forbidden"), started)
    body = await _read_body(request, state)
    if isinstance(body, Outcome):
        return _respond(state, "/admin/reload", body, started)
    try:
        options = decode_json(_reload_decoder, body or b"{}")
    except RequestError as exc:
        return _respond(state, "/admin/reload", Outcome(400, error_body(f"invalid reload request: {exc.message}",
                                                                        exc.path), "bad_request"), started)
    ok, detail = await reload(state, options.model and Path(options.model),
                              options.campaigns and Path(options.campaigns))
    outcome = (Outcome(200, msgspec.json.encode({"model": detail})) if ok
               else Outcome(422, error_body(f"reload refused, old model still serving: {detail}"), "reload_refused"))
    return _respond(state, "/admin/reload", outcome, started)


async def no_route(request: web.Request) -> web.Response:
    """404 and 405 answer JSON like every other error and are counted (under one route label: unmatched).

    A catch-all route, registered last, instead of a middleware: a middleware would cost every bid
    request a cached-chain lookup, a partial and two coroutine frames to serve the rare miss.
    """
    state = request.app[STATE]
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            match, methods = await resource.resolve(request)
            if match is None:
                allowed |= methods
    status = 405 if allowed else 404
    kind = "not_found" if status == 404 else "method_not_allowed"
    state.metrics.errors.labels(kind).inc()
    state.metrics.response(UNMATCHED_ROUTE, status).inc()
    message = (f"no route {request.path}" if status == 404
               else f"{request.method} is not allowed on {request.path} (allowed: {', '.join(sorted(allowed))})")
    headers = {"Allow": ",".join(sorted(allowed))} if allowed else None
    return web.Response(status=status, body=msgspec.json.encode({"error": message}),
                        content_type="application/json", headers=headers)


def create_app(config: Config = Config(), worker: int = 0) -> web.Application:
    # aiohttp enforces client_max_size while reading; one byte more so _read_body answers 413 itself
    app = web.Application(client_max_size=config.max_body + 1)
    metrics_ = Metrics(worker)
    state = State(config, metrics_)
    app[STATE] = state

    async def resources(app: web.Application):
        state.install(state.load(config.model, config.campaigns), config.model, config.campaigns)
        yield
        state.engine = None

    app.cleanup_ctx.append(resources)
    app.router.add_post("/bid", bid)
    app.router.add_post("/bid/{exchange}", bid)
    app.router.add_post("/predict", predict)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/admin/reload", admin_reload)
    app.router.add_route("*", "/{path:.*}", no_route)  # last: only what no route above takes
    return app


# -- processes ------------------------------------------------------------------------------------
def listen_error(host: str, port: int, exc: OSError) -> str:
    if isinstance(exc, socket.gaierror) or not exc.errno:
        reason = exc.strerror or str(exc)
    else:  # asyncio wraps the errno in a sentence that repeats the address
        reason = os.strerror(exc.errno)
    return f"cannot listen on {host}:{port}: {reason}"


def check_port(host: str, port: int, reuse_port: bool = False) -> None:
    """Bind (and release) ``host:port`` as the server will, so a busy or bad address fails before any start-up.

    Raises StartupError. The options are asyncio's (SO_REUSEADDR, IPv6-only for IPv6) plus SO_REUSEPORT when
    workers share the port, so the probe fails exactly when the server's own bind would.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in infos:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
    except OSError as exc:
        raise StartupError(listen_error(host, port, exc)) from None


async def _run_worker(config: Config, worker: int, ready=None) -> None:
    app = create_app(config, worker)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=config.shutdown_timeout)
    try:
        await runner.setup()  # loads the bundle and the catalog
    except (BundleError, CatalogError, OSError) as exc:
        raise StartupError(f"cannot load the model or the catalog: {exc}") from None
    site = web.TCPSite(runner, config.host, config.port, reuse_port=config.workers > 1, backlog=4096)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(listen_error(config.host, config.port, exc)) from None
    if ready is not None:
        ready.set()
    state = app[STATE]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    reloads: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks

    def reload_on_signal() -> None:
        task = asyncio.ensure_future(reload(state))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload_on_signal)
    log.info("worker %d (pid %d) serving %s on http://%s:%d", worker, os.getpid(), state.engine.scorer.model_id,
             config.host, config.port)
    await stop.wait()
    state.draining = True
    log.info("worker %d draining %d in-flight request(s)", worker, state.in_flight)
    await site.stop()  # no new connections; requests already started run to completion
    deadline = loop.time() + config.shutdown_timeout
    while state.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.01)
    await runner.cleanup()


def run_worker(config: Config, worker: int, ready=None) -> int:
    """Serve until SIGTERM/SIGINT; 0, or EXIT_STARTUP after printing one line when it cannot start.

    ``ready`` (an event) is set once the worker listens: the supervisor tells start-up failures by it.
    """
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker-{worker} %(levelname)s %(message)s")
    if config.pin:
        core = pin_to_core(worker)
        log.info("worker %d pinned to core %d", worker, core)
    # numpy's BLAS started a thread per core at import, unpinned: a worker owns one core, and a product handed
    # to a thread on another worker's core waits for it (retrieval's products are large enough to be split)
    threadpool_limits(limits=1, user_api="blas")
    try:
        import uvloop
    except ImportError:  # uvloop is a dependency on every platform that has it
        run = asyncio.run
    else:
        run = uvloop.run
    try:
        run(_run_worker(config, worker, ready))
    except StartupError as exc:
        who = f"worker {worker}: " if config.workers > 1 else ""
        print(f"error: {who}" + " ".join(str(exc).split()), file=sys.stderr, flush=True)  # one line
        return EXIT_STARTUP
    return 0


def _worker_process(config: Config, worker: int, ready) -> None:
    sys.exit(run_worker(config, worker, ready))


def serve(config: Config) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status."""
    if config.workers <= 1:
        return run_worker(config, 0)
    _PRELOADED.clear()  # the worker processes load their own
    return _Supervisor(config).run()


class _Supervisor:
    """Starts N workers, restarts any that dies, forwards SIGTERM/SIGINT/SIGHUP to all.

    A worker that dies before it listens failed at start-up; after MAX_STARTUP_FAILURES such failures in a
    row the supervisor stops every worker and exits with EXIT_STARTUP instead of restarting it forever.
    """

    def __init__(self, config: Config):
        self.config = config
        self.context = multiprocessing.get_context("spawn")
        self.workers: dict[int, multiprocessing.process.BaseProcess] = {}
        self.ready: dict[int, object] = {}
        self.started: dict[int, float] = {}
        self.startup_failures: dict[int, int] = {}
        self.stopping = False

    def _start(self, index: int) -> None:
        ready = self.context.Event()
        process = self.context.Process(target=_worker_process, args=(self.config, index, ready),
                                       name=f"bidder-worker-{index}")
        process.start()
        self.workers[index] = process
        self.ready[index] = ready
        self.started[index] = time.monotonic()

    def _forward(self, signum: int) -> None:
        for process in self.workers.values():
            if process.is_alive() and process.pid:
                os.kill(process.pid, signum)

    def run(self) -> int:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s supervisor %(levelname)s %(message)s")

        def on_stop(signum, _frame):
            self.stopping = True
            self._forward(signal.SIGTERM)

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, lambda signum, _frame: self._forward(signal.SIGHUP))
        for index in range(self.config.workers):
            self._start(index)
        log.info("supervising %d workers on http://%s:%d", self.config.workers, self.config.host, self.config.port)
        status = 0
        while not self.stopping:
            time.sleep(0.2)
            for index, process in list(self.workers.items()):
                if process.is_alive() or self.stopping:
                    continue
                if self.ready[index].is_set():
                    self.startup_failures[index] = 0
                    log.warning("worker %d exited with %s; restarting", index, process.exitcode)
                else:
                    failures = self.startup_failures[index] = self.startup_failures.get(index, 0) + 1
                    if failures >= MAX_STARTUP_FAILURES:
                        log.error("worker %d failed at start-up %d times in a row (exit status %s); giving up",
                                  index, failures, process.exitcode)
                        self.stopping = True
                        self._forward(signal.SIGTERM)
                        status = EXIT_STARTUP
                        break
                    log.warning("worker %d failed at start-up (exit status %s); retrying", index, process.exitcode)
                if time.monotonic() - self.started[index] < 2.0:
                    time.sleep(1.0)  # a worker that dies at start-up would otherwise spin
                self._start(index)
        deadline = time.monotonic() + self.config.shutdown_timeout + 5
        for process in self.workers.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
        return status

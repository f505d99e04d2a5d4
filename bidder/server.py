"""HTTP service: aiohttp on uvloop, one pinned single-thread scorer per worker process.

``create_app(config)`` builds the application without a socket (tests drive it with aiohttp's test
client); ``serve(config)`` runs one worker in this process or, with ``workers > 1``, supervises N
worker processes that share the port through SO_REUSEPORT.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path

import msgspec
from aiohttp import web

from bidder import DEFAULT_BUNDLE
from bidder.campaigns import CatalogError, load_catalog
from bidder.engine import BidEngine, Outcome, error_body
from bidder.metrics import CONTENT_TYPE_LATEST, Metrics
from bidder.scorer import BundleError, Scorer, pin_to_core

__all__ = ["Config", "ENGINE", "create_app", "serve"]

log = logging.getLogger("bidder")

DEFAULT_CAMPAIGNS = DEFAULT_BUNDLE / "campaigns.json"


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
    shutdown_timeout: float = 30.0
    pin: bool = True


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
        scorer = Scorer(model, max_batch=self.config.max_batch)
        catalog = load_catalog(campaigns)
        engine = BidEngine(scorer, catalog, self.metrics, self.config.utc_offset_hours, self.config.now)
        layers = [c.layer for c in catalog.candidates[: scorer.max_batch]]
        for rows in sorted({len(catalog.for_size(w, h)) for w, h in catalog.sizes} | {len(layers)}):
            scorer.score(layers[:min(rows, len(layers))])
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


async def _bid(request: web.Request, exchange: str | None) -> web.Response:
    started = time.perf_counter()
    state = request.app[STATE]
    body = await _read_body(request, state)
    if isinstance(body, Outcome):
        return _respond(state, "/bid", body, started)
    return _respond(state, "/bid", state.engine.bid(body, exchange, started), started)


async def bid(request: web.Request) -> web.Response:
    return await _bid(request, None)


async def bid_on_exchange(request: web.Request) -> web.Response:
    return await _bid(request, request.match_info["exchange"])


async def predict(request: web.Request) -> web.Response:
    started = time.perf_counter()
    state = request.app[STATE]
    body = await _read_body(request, state)
    if isinstance(body, Outcome):
        return _respond(state, "/predict", body, started)
    return _respond(state, "/predict", state.engine.predict(body), started)


async def healthz(request: web.Request) -> web.Response:
    return _json(200, b'{"status":"ok"}')


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.engine is None or state.draining:
        return _json(503, msgspec.json.encode({"ready": False, "draining": state.draining}))
    return _json(200, msgspec.json.encode({"ready": True, "model": state.engine.scorer.model_id}))


async def metrics(request: web.Request) -> web.Response:
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class _ReloadRequest(msgspec.Struct):
    model: str | None = None
    campaigns: str | None = None


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
        options = msgspec.json.decode(body or b"{}", type=_ReloadRequest)
    except msgspec.MsgspecError as exc:
        return _respond(state, "/admin/reload", Outcome(400, error_body(f"invalid reload request: {exc}"),
                                                       "bad_request"), started)
    ok, detail = await reload(state, options.model and Path(options.model),
                              options.campaigns and Path(options.campaigns))
    outcome = (Outcome(200, msgspec.json.encode({"model": detail})) if ok
               else Outcome(422, error_body(f"reload refused, old model still serving: {detail}"), "reload_refused"))
    return _respond(state, "/admin/reload", outcome, started)


@web.middleware
async def last_resort(request: web.Request, handler) -> web.StreamResponse:
    """Counts requests in flight (for draining); a bug still answers JSON and the worker serves on."""
    state = request.app[STATE]
    state.in_flight += 1
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        state.metrics.errors.labels("internal").inc()
        return _json(500, error_body("internal error"))
    finally:
        state.in_flight -= 1


def create_app(config: Config = Config(), worker: int = 0) -> web.Application:
    # aiohttp enforces client_max_size while reading; one byte more so _read_body answers 413 itself
    app = web.Application(client_max_size=config.max_body + 1, middlewares=[last_resort])
    metrics_ = Metrics(worker)
    state = State(config, metrics_)
    app[STATE] = state

    async def resources(app: web.Application):
        state.install(state.load(config.model, config.campaigns), config.model, config.campaigns)
        yield
        state.engine = None

    app.cleanup_ctx.append(resources)
    app.router.add_post("/bid", bid)
    app.router.add_post("/bid/{exchange}", bid_on_exchange)
    app.router.add_post("/predict", predict)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/admin/reload", admin_reload)
    return app


# -- processes ------------------------------------------------------------------------------------
async def _run_worker(config: Config, worker: int) -> None:
    app = create_app(config, worker)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=config.shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, reuse_port=config.workers > 1, backlog=4096)
    await site.start()
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


def run_worker(config: Config, worker: int) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker-{worker} %(levelname)s %(message)s")
    if config.pin:
        core = pin_to_core(worker)
        log.info("worker %d pinned to core %d", worker, core)
    try:
        import uvloop
    except ImportError:  # uvloop is a dependency on every platform that has it
        asyncio.run(_run_worker(config, worker))
    else:
        uvloop.run(_run_worker(config, worker))


def serve(config: Config) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status."""
    if config.workers <= 1:
        run_worker(config, 0)
        return 0
    return _Supervisor(config).run()


class _Supervisor:
    """Starts N workers, restarts any that dies, forwards SIGTERM/SIGINT/SIGHUP to all."""

    def __init__(self, config: Config):
        self.config = config
        self.context = multiprocessing.get_context("spawn")
        self.workers: dict[int, multiprocessing.process.BaseProcess] = {}
        self.started: dict[int, float] = {}
        self.stopping = False

    def _start(self, index: int) -> None:
        process = self.context.Process(target=run_worker, args=(self.config, index), name=f"bidder-worker-{index}")
        process.start()
        self.workers[index] = process
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
        while not self.stopping:
            time.sleep(0.2)
            for index, process in list(self.workers.items()):
                if process.is_alive() or self.stopping:
                    continue
                log.warning("worker %d exited with %s; restarting", index, process.exitcode)
                if time.monotonic() - self.started[index] < 2.0:
                    time.sleep(1.0)  # a worker that dies at start-up would otherwise spin
                self._start(index)
        deadline = time.monotonic() + self.config.shutdown_timeout + 5
        for process in self.workers.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
        return 0

"""The HTTP application: configuration, what a worker serves (``State``), the handlers and reload.

``create_app(config)`` builds the application without a socket (tests drive it with aiohttp's test
client); ``bidder/workers.py`` runs it in worker processes.
"""
from __future__ import annotations

import asyncio
import functools
import gc
import ipaddress
import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import msgspec
from aiohttp import web

from bidder import DEFAULT_BUNDLE
from bidder.batching import EagerBatcher, ThreadBatcher
from bidder.campaigns import Catalog, CatalogError, load_catalog
from bidder.clock import Clock, read_clock
from bidder.engine import BidEngine, Outcome, error_body
from bidder.events import EventLog
from bidder.factorized import FactorizedScorer
from bidder.ledger import Ledger, open_banker, open_notice_store
from bidder.ledger.pace import EvenPacing
from bidder.logs import Throttled, event
from bidder.metrics import CONTENT_TYPE_LATEST, Metrics
from bidder.notice_store import RETENTION_MARGIN_S, NoticeStore
from bidder.notices import REFUSALS, NoticeFacts, Notices, NoticeSettings, Refusal, micros
from bidder.openrtb import RequestError, decode_json
from bidder.retrieval import DEFAULT_K, retriever_for
from bidder.scorer import BundleError, Scorer
from bidder.shading import WinModel

__all__ = ["Config", "DEFAULT_CAMPAIGNS", "STATE", "State", "campaigns_report", "count_notice", "create_app",
           "forget_preloaded", "preload", "reload"]

log = logging.getLogger("bidder")

DEFAULT_CAMPAIGNS = DEFAULT_BUNDLE / "campaigns.json"
#: the route label of requests no route matched (404, 405): one label, whatever the path, bounds the series
UNMATCHED_ROUTE = "unmatched"


#: catalogs loaded already by the command line's check (``preload``), taken by the first load of their file
_PRELOADED: dict[Path, Catalog] = {}


def preload(campaigns: Path, catalog: Catalog) -> None:
    """Hand ``campaigns``, already loaded, to the first engine this process builds from that file: the command
    line checks the catalog before serving, and reading 100,000 creatives again would take seconds more."""
    _PRELOADED[Path(campaigns)] = catalog


def forget_preloaded() -> None:
    """Drop what ``preload`` handed over: worker processes of their own load their catalog themselves."""
    _PRELOADED.clear()



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
    native_rows: bool = True  # the factorized graph's arithmetic in C (bidder.rowkernel; off: ONNX Runtime, to compare)
    retrieve_k: int = DEFAULT_K  # large catalogs: creatives the ranker scores per imp, chosen by the two towers
    retrieval: bool = True   # off: a large catalog's every eligible creative is scored (for comparison)
    ann: bool = False        # approximate top K (HNSW, faiss-cpu) instead of the exact BLAS product
    notices: NoticeSettings | None = None  # signed win/billing/loss notices and clicks (--notice-url); None: off
    events: Path | None = None  # the event log's directory (bidder.events); None: no event log
    explore: float = 0.0  # the share of imps bid with a random eligible creative (BidEngine.explore_rows)
    # the spend ledger (campaigns with budgets; needs notices): the banker's Redis URL, None for the embedded one
    # in the notices' state directory; how often a worker calls it; a worker's lease as a share of a budget
    ledger: str | None = None
    ledger_refresh_s: float = 0.1
    lease_fraction: float = 0.002
    log_format: str = "text"  # bidder.logs: text or json, one object per line
    log_level: str = "info"
    access_log_sample: float = 0.0  # the fraction of requests logged as access events; 0: no access log
    metrics_port: int | None = None  # the supervisor's /metrics of every worker (bidder.worker_metrics)
    metrics_sockets: str | None = None  # set by the supervisor: the directory of the workers' scrape sockets


#: the interpreter's GIL switch interval while an engine is built (``State.load``)
BUILD_SWITCH_INTERVAL_S = 0.0005


class State:
    """What a worker serves; ``engine`` is replaced whole on reload, so a request sees one version."""

    def __init__(self, config: Config, metrics: Metrics):
        self.config = config
        self.metrics = metrics
        self.engine: BidEngine | None = None
        self.events: EventLog | None = None  # started by the worker (bidder.workers) when config.events is set
        self.draining = False
        self.in_flight = 0
        self.reload_lock = asyncio.Lock()
        self.notices: Notices | None = None
        # refusals come in floods when someone replays or forges notices: a line per kind and reason a second
        self.log_refusal = Throttled(log, logging.WARNING, "notice_refused",
                                     "%(kind)s notice refused (%(reason)s): %(detail)s")
        self.store: NoticeStore | None = None
        # the spend ledger, made by the first engine whose catalog has budgets (bidder.ledger)
        self.ledger: Ledger | None = None
        self.recorder: EagerBatcher | None = None
        if config.notices is not None:
            # the notices of a loop turn are recorded together at its end when the store can answer at once (the
            # SQLite store's commit, no lock to wait for); otherwise (another worker's transaction, Redis) in the
            # store's own thread, where those that arrive meanwhile wait to go together next: the event loop never
            # waits for another worker's lock, an fsync or the network
            self.recorder = EagerBatcher(lambda notices: self.store.try_first_times(notices, self.now()),
                                         ThreadBatcher(lambda notices: self.store.first_times(notices, self.now()),
                                                       "notice-store"))
            self.notices = Notices(config.notices)
            self.store = open_notice_store(config.ledger, config.notices.state_dir, config.notices.max_window_s)
            metrics.enable_notices(NOTICE_RESULTS)

    def now(self) -> float:
        """The engine's time (Unix seconds): the fixed --now, the simulated clock, else the wall clock."""
        return read_clock(self.config.clock or self.config.now)

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
            factorized = FactorizedScorer.for_scorer(scorer, max_imps=scorer.max_batch, max_rows=scorer.max_batch,
                                                     native=self.config.native_rows)
            if self.config.native_rows and factorized.kernel is None:
                log.warning("factorized.onnx runs through ONNX Runtime: the native row kernel does not compute "
                            "%(why)s", {"why": factorized.kernel_unsupported}, extra={"event": "row_kernel_unsupported"})
        # the win-price model for first-price shading, if the bundle has one (checked, BundleError otherwise)
        market = WinModel.for_scorer(scorer, max_imps=scorer.max_batch, native=self.config.native_shading)
        retriever = retriever_for(scorer, catalog, self.config.retrieve_k, self.config.ann, self.config.retrieval)
        engine = BidEngine(scorer, catalog, self.metrics, self.config.utc_offset_hours,
                           self.config.clock or self.config.now, factorized, market, retriever,
                           notices=self.notices, events=self.events, ledger=self._ledger_for(catalog),
                           explore=self.config.explore)
        layers = [c.layer for c in catalog.candidates[: scorer.max_batch]]
        limit = len(catalog) if retriever is None else retriever.k  # rows per imp and size
        per_size = sorted({min(limit, len(catalog.for_size(w, h))) for w, h in catalog.sizes} | {len(layers)})
        for rows in per_size:
            scorer.score(layers[:min(rows, len(layers))])
        if factorized is not None and len(catalog):
            # the shapes of batches of one-imp requests of one size: n imps x k candidates
            for k in per_size:
                for n in range(1, min(32, scorer.max_batch // max(k, 1)) + 1):
                    factorized.warm(n, k)
        return engine

    def _ledger_for(self, catalog: Catalog) -> Ledger | None:
        """The worker's ledger, started the first time a catalog has budgets; CatalogError without notices (the
        billing notices are what commits spend)."""
        if self.ledger is not None or not any(t.budgeted or t.frequency_caps for t in catalog.terms.values()):
            return self.ledger
        config = self.config
        if config.notices is None:
            raise CatalogError(f"{catalog.source}: campaigns with a budget or frequency caps need notices (bidder "
                               f"serve --notice-url): the billing notices commit spend and count impressions")
        banker = open_banker(config.ledger, config.notices.state_dir,
                             config.notices.max_window_s + RETENTION_MARGIN_S)
        ledger = Ledger(banker, config.clock or config.now, refresh_s=config.ledger_refresh_s,
                        lease_fraction=config.lease_fraction)
        ledger.use_terms(catalog.terms.values())  # leases from the first call on
        ledger.on_refresh = EvenPacing()  # "even" campaigns' pass rates, from the banker's figures after each call
        self.ledger = self.metrics.ledger = ledger.start()
        return ledger

    def install(self, engine: BidEngine, model: Path, campaigns: Path) -> None:
        self.engine = engine
        self.config = replace(self.config, model=model, campaigns=campaigns)
        self.metrics.set_model(engine.scorer.model_id, str(engine.scorer.meta.get("architecture", "unknown")))


STATE = web.AppKey("state", State)


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
    log.exception("internal error on %(method)s %(path)s", {"method": request.method, "path": request.path},
                  extra={"event": "internal_error"})
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
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            engine = await loop.run_in_executor(None, state.load, model, campaigns)
        except (BundleError, CatalogError, OSError, ValueError) as exc:
            state.metrics.reloads.labels("refused").inc()
            event(log, logging.ERROR, "reload_refused", "reload refused, still serving %(model)s: %(error)s",
                  model=state.engine.scorer.model_id, error=str(exc), bundle=str(model), campaigns=str(campaigns))
            return False, str(exc)
        except Exception as exc:  # whatever a broken bundle makes a library raise, the old model serves on
            state.metrics.reloads.labels("refused").inc()
            log.exception("reload failed, still serving %(model)s", {"model": state.engine.scorer.model_id},
                          extra={"event": "reload_failed"})
            return False, f"{type(exc).__name__}: {exc}"
        state.install(engine, model, campaigns)
        state.metrics.reloads.labels("ok").inc()
        event(log, logging.INFO, "reloaded", "reloaded: serving %(model)s", model=engine.scorer.model_id,
              bundle=str(model), campaigns=str(campaigns), seconds=round(time.perf_counter() - started, 3))
        return True, engine.scorer.model_id


def _loopback(request: web.Request) -> bool:
    try:
        return ipaddress.ip_address((request.remote or "").split("%")[0]).is_loopback
    except ValueError:
        return False


@guarded
async def admin_reload(request: web.Request) -> web.Response:
    started = time.perf_counter()
    state = request.app[STATE]
    if not _loopback(request):
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


def campaigns_report(state: State) -> dict[str, dict]:
    """Per campaign with money terms: the terms, and for a budgeted one the ledger's figures (USD) as of this
    worker's last call to the banker."""
    engine = state.engine
    figures = state.ledger.report() if state.ledger is not None else {}
    out = {}
    for campaign, terms in engine.catalog.terms.items():
        out[campaign] = {"budget_total": terms.total_usd, "budget_daily": terms.daily_usd,
                         "timezone": str(terms.timezone), "pacing": terms.pacing, "max_cpm": terms.max_cpm,
                         "flight": {"start": terms.start, "end": terms.end},
                         "frequency_cap": [{"count": c.count, "seconds": c.seconds, "scope": c.scope}
                                           for c in terms.frequency_caps],
                         **figures.get(campaign, {})}
    return out


@guarded
async def admin_campaigns(request: web.Request) -> web.Response:
    """``GET /admin/campaigns`` (loopback only): ``campaigns_report`` as JSON, with whether the banker answered
    this worker's last call."""
    started = time.perf_counter()
    state = request.app[STATE]
    if not _loopback(request):
        return _respond(state, "/admin/campaigns", Outcome(403, error_body("the operator view is allowed from "
                                                                           "loopback only"), "forbidden"), started)
    ledger = state.ledger
    body = msgspec.json.encode({"campaigns": campaigns_report(state),
                                "banker": None if ledger is None else {"name": repr(ledger.banker),
                                                                       "connected": ledger.connected,
                                                                       "failures": ledger.failures}})
    return _respond(state, "/admin/campaigns", Outcome(200, body), started)


#: what ``bidder_notices_total`` counts per kind: ``result`` label values
NOTICE_RESULTS = ("ok", "duplicate", "late", *(f"refused_{reason}" for reason in REFUSALS))


def _answer(state: State, route: str, started: float, response: web.Response, error: str | None = None):
    if error is not None:
        state.metrics.errors.labels(error).inc()
    state.metrics.response(route, response.status).inc()
    state.metrics.route_latency[route].observe(time.perf_counter() - started)
    return response


def count_notice(state: State, query, kind: str) -> NoticeFacts | Refusal:
    """Check a notice (``Notices.check``) and count it: the first of its kind for its bid as ok (late after the
    bid's exp), any other as a duplicate, a refusal under its reason. The routes do the same, recording the
    notices of a loop turn in the store together (``record_notice``)."""
    now = state.now()
    checked = check_notice(state, query, kind, now)
    if checked.__class__ is not Refusal:
        counted(state, query, kind, checked, state.store.first_time(checked.bid_id, kind, checked.issued, now), now)
    return checked


async def record_notice(state: State, query, kind: str) -> NoticeFacts | Refusal:
    """``count_notice`` for the routes: the store records a loop turn's notices together at the turn's end, or, when
    it cannot at once, in its own thread with those that arrive meanwhile (``EagerBatcher``)."""
    now = state.now()
    checked = check_notice(state, query, kind, now)
    if checked.__class__ is not Refusal:
        counted(state, query, kind, checked, await state.recorder.submit((checked.bid_id, kind, checked.issued)), now)
    return checked


def check_notice(state: State, query, kind: str, now: float) -> NoticeFacts | Refusal:
    """The facts of a notice, or its refusal (counted and logged)."""
    checked = state.notices.check(query, now)
    if checked.__class__ is Refusal:
        if checked.status == 403:
            state.metrics.notices.labels(kind, f"refused_{checked.reason}").inc()
        state.log_refusal((kind, checked.reason), kind=kind, reason=checked.reason, status=checked.status,
                          where=checked.where, detail=checked.message)
    return checked


def counted(state: State, query, kind: str, checked: NoticeFacts, first: bool, now: float) -> None:
    """Count a checked notice: ``first`` (the store's answer) as ok or late, settled in the ledger and logged;
    otherwise as a duplicate."""
    metrics = state.metrics
    if not first:
        metrics.notices.labels(kind, "duplicate").inc()
        return
    age = now - checked.issued
    metrics.notices.labels(kind, "late" if age > checked.window else "ok").inc()
    metrics.notice_delay.labels(kind).observe(max(age, 0.0))
    if state.ledger is not None and kind != "click":  # the spend: committed by a bill, released by a loss
        price = _number(query.get("p")) if kind != "loss" else None
        bid_micros = checked.price_micros
        if checked.currency != "USD":  # the ledger counts USD: a bid priced in the request's currency converts
            rate = state.engine.catalog.currencies.rate(checked.currency) if state.engine is not None else None
            if rate:
                price = None if price is None else price / rate
                bid_micros = round(bid_micros / rate)
        state.ledger.settle(kind, checked.bid_id, checked.campaign, None if price is None else micros(price),
                            bid_micros, checked.issued, checked.window)
    if state.events is not None:  # logged once, as counted
        _log_notice(state.events, kind, checked.bid_id, query, max(age, 0.0))


def _number(text: str | None, kind=float):
    """A notice parameter as a number, None when absent or left as the exchange's unsubstituted macro."""
    try:
        return kind(text) if text is not None else None
    except ValueError:
        return None


def _log_notice(events, kind: str, bid_id: str, query, delay: float) -> None:
    if kind == "click":
        events.click(bid_id)
        return
    events.notice(kind, bid_id, price=_number(query.get("p")), loss=_number(query.get("loss"), int),
                  min_to_win=_number(query.get("mtw")), delay=delay)


def _refused(state: State, route: str, started: float, refusal: Refusal) -> web.Response:
    if refusal.status == 403:
        body = msgspec.json.encode({"error": f"notice refused ({refusal.reason}): {refusal.message}",
                                    "reason": refusal.reason, "path": refusal.where})
        return _answer(state, route, started, _json(403, body), "forbidden")
    return _answer(state, route, started, _json(refusal.status, error_body(refusal.message, refusal.where)),
                   "bad_request")


@guarded
async def notice(request: web.Request) -> web.Response:
    """``GET|POST /notice/{win,bill,loss}?t=TOKEN&...``: 200 with an empty body once the token checks out (a
    repeat too: it is counted as a duplicate); 403 (refused) or 400 with a JSON body naming the cause."""
    started = time.perf_counter()
    state = request.app[STATE]
    if request.method == "POST":  # the parameters are the URL's; a body, if any, is read and ignored
        body = await _read_body(request, state)
        if body.__class__ is not bytes:
            return _answer(state, "/notice", started, _json(body.status, body.body), body.reason)
    checked = await record_notice(state, request.query, request.match_info["kind"])
    if checked.__class__ is Refusal:
        return _refused(state, "/notice", started, checked)
    return _answer(state, "/notice", started, web.Response(status=200))


@guarded
async def click(request: web.Request) -> web.Response:
    """``GET /click?t=TOKEN``: 302 to the creative's landing page (``click_url`` in the catalog serving),
    counted once per bid."""
    started = time.perf_counter()
    state = request.app[STATE]
    checked = await record_notice(state, request.query, "click")
    if checked.__class__ is Refusal:
        return _refused(state, "/click", started, checked)
    candidate = state.engine.catalog.creative(checked.creative)
    if candidate is None or candidate.click_url is None:
        body = error_body(f"creative {checked.creative!r} has no click_url in the catalog serving", "t")
        return _answer(state, "/click", started, _json(404, body), "not_found")
    return _answer(state, "/click", started, web.Response(status=302, headers={"Location": candidate.click_url}))


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
        if config.events is not None:  # before the engine: it logs every bid from its first
            # stamped on the engine's clock, as the notices' delays are: a simulated day logs simulated hours
            clock = config.clock.now if config.clock is not None else time.time
            state.events = metrics_.events = EventLog(config.events, worker, clock=clock).start()
        try:
            state.install(state.load(config.model, config.campaigns), config.model, config.campaigns)
            yield
        finally:
            state.engine = None
            if state.ledger is not None:  # what is queued reported, the leases given back
                state.ledger.close()
            if state.store is not None:
                state.recorder.close()
                state.store.close()
            if state.events is not None:  # every queued event written, the last file renamed into place
                state.events.close()

    app.cleanup_ctx.append(resources)
    app.router.add_post("/bid", bid)
    app.router.add_post("/bid/{exchange}", bid)
    app.router.add_post("/predict", predict)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/admin/reload", admin_reload)
    app.router.add_get("/admin/campaigns", admin_campaigns)
    if config.notices is not None:
        app.router.add_route("GET", "/notice/{kind:win|bill|loss}", notice)
        app.router.add_route("POST", "/notice/{kind:win|bill|loss}", notice)
        app.router.add_get("/click", click, allow_head=False)  # a prefetch is no click
    app.router.add_route("*", "/{path:.*}", no_route)  # last: only what no route above takes
    return app

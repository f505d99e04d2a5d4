"""Worker processes: ``serve(config)`` runs one worker in this process or, with ``workers > 1``, supervises N
worker processes that share the port through SO_REUSEPORT; each serves ``bidder/app.py``'s application.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from aiohttp import web
from threadpoolctl import threadpool_limits

from bidder.app import STATE, Config, create_app, forget_preloaded, reload
from bidder.campaigns import CatalogError
from bidder.events import EventLogError
from bidder.logs import access_log_options, configured, event
from bidder.scorer import BundleError, pin_to_core
from bidder.worker_metrics import MetricsServer, worker_socket

__all__ = ["EXIT_STARTUP", "StartupError", "check_port", "run_worker", "serve"]

log = logging.getLogger("bidder")

#: exit status of a server (or worker) that could not start: bad option, bundle, catalog or address
EXIT_STARTUP = 2
#: consecutive start-up failures of one worker after which the supervisor stops restarting it
MAX_STARTUP_FAILURES = 3


class StartupError(Exception):
    """A worker could not start serving; the message is one line naming the cause."""


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
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=config.shutdown_timeout,
                           **access_log_options(config.access_log_sample))
    try:
        await runner.setup()  # loads the bundle and the catalog
    except EventLogError as exc:
        raise StartupError(str(exc)) from None
    except (BundleError, CatalogError, OSError) as exc:
        raise StartupError(f"cannot load the model or the catalog: {exc}") from None
    site = web.TCPSite(runner, config.host, config.port, reuse_port=config.workers > 1, backlog=4096)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(listen_error(config.host, config.port, exc)) from None
    if config.metrics_sockets is not None:  # the supervisor's scrapes reach this worker there
        scrape_path = worker_socket(config.metrics_sockets, worker)
        scrape_path.unlink(missing_ok=True)  # left by this worker's previous process
        await web.UnixSite(runner, str(scrape_path)).start()
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
    event(log, logging.INFO, "worker_started", "worker %(index)d (pid %(pid)d) serving %(model)s on %(url)s",
          index=worker, pid=os.getpid(), model=state.engine.scorer.model_id,
          url=f"http://{config.host}:{config.port}", workers=config.workers)
    await stop.wait()
    state.draining = True
    draining = loop.time()
    event(log, logging.INFO, "drain_started", "worker %(index)d draining %(in_flight)d in-flight request(s)",
          index=worker, in_flight=state.in_flight, timeout_s=config.shutdown_timeout)
    # Not aiohttp's graceful shutdown alone (runner.cleanup with shutdown_timeout): it stops reading every
    # connection at once (aiohttp 3.14 RequestHandler.data_received drops what arrives after close()), so a
    # request whose body is still arriving could never complete, and /readyz could not answer "draining" on
    # a kept-alive connection. The listener closes now; open connections are served until none is in flight.
    await site.stop()
    deadline = loop.time() + config.shutdown_timeout
    while state.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.01)
    event(log, logging.INFO if not state.in_flight else logging.WARNING, "drain_finished",
          "worker %(index)d drained in %(seconds).3f s, %(abandoned)d request(s) cut off", index=worker,
          seconds=round(loop.time() - draining, 3), abandoned=state.in_flight)
    await runner.cleanup()


def run_worker(config: Config, worker: int, ready=None) -> int:
    """Serve until SIGTERM/SIGINT; 0, or EXIT_STARTUP after printing one line when it cannot start.

    ``ready`` (an event) is set once the worker listens: the supervisor tells start-up failures by it.
    """
    with configured(config.log_format, config.log_level, worker):
        return _serve_worker(config, worker, ready)


def _serve_worker(config: Config, worker: int, ready) -> int:
    if config.pin:
        core = pin_to_core(worker)
        event(log, logging.INFO, "worker_pinned", "worker %(index)d pinned to core %(core)d", index=worker, core=core)
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
    if config.workers <= 1 and config.metrics_port is None:
        return run_worker(config, 0)
    forget_preloaded()  # the worker processes load their own
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
        self.restarts: dict[int, int] = {}
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
        with configured(self.config.log_format, self.config.log_level, "supervisor"):
            return self._run()

    def _run(self) -> int:
        if self.config.metrics_port is None:
            return self._supervise()
        with tempfile.TemporaryDirectory(prefix="bidder-metrics-") as sockets:
            self.config = replace(self.config, metrics_sockets=sockets)
            try:
                metrics = MetricsServer(self.config.host, self.config.metrics_port, self._scrape_sockets,
                                        lambda: dict(self.restarts)).start()
            except OSError as exc:
                print("error: " + listen_error(self.config.host, self.config.metrics_port, exc), file=sys.stderr)
                return EXIT_STARTUP
            try:
                return self._supervise()
            finally:
                metrics.stop()

    def _scrape_sockets(self) -> dict[int, Path]:
        """The scrape socket of every worker that has listened since it last started."""
        return {index: worker_socket(self.config.metrics_sockets, index)
                for index, ready in list(self.ready.items()) if ready.is_set()}

    def _supervise(self) -> int:

        def on_stop(signum, _frame):
            self.stopping = True
            self._forward(signal.SIGTERM)

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, lambda signum, _frame: self._forward(signal.SIGHUP))
        for index in range(self.config.workers):
            self._start(index)
        metrics = "" if self.config.metrics_port is None else ", every worker's metrics on port %(metrics_port)d"
        event(log, logging.INFO, "supervisor_started", "supervisor (pid %(pid)d) supervising %(workers)d workers "
              "on %(url)s" + metrics, pid=os.getpid(), workers=self.config.workers,
              url=f"http://{self.config.host}:{self.config.port}", metrics_port=self.config.metrics_port)
        status = 0
        while not self.stopping:
            time.sleep(0.2)
            for index, process in list(self.workers.items()):
                if process.is_alive() or self.stopping:
                    continue
                if self.ready[index].is_set():
                    self.startup_failures[index] = 0
                    self.restarts[index] = self.restarts.get(index, 0) + 1
                    event(log, logging.WARNING, "worker_exited", "worker %(index)d exited with %(status)s; restarting",
                          index=index, status=process.exitcode, worker_pid=process.pid)
                else:
                    failures = self.startup_failures[index] = self.startup_failures.get(index, 0) + 1
                    if failures >= MAX_STARTUP_FAILURES:
                        event(log, logging.ERROR, "worker_gave_up", "worker %(index)d failed at start-up %(failures)d "
                              "times in a row (exit status %(status)s); giving up", index=index, failures=failures,
                              status=process.exitcode)
                        self.stopping = True
                        self._forward(signal.SIGTERM)
                        status = EXIT_STARTUP
                        break
                    event(log, logging.WARNING, "worker_start_failed", "worker %(index)d failed at start-up (exit "
                          "status %(status)s); retrying", index=index, status=process.exitcode)
                if time.monotonic() - self.started[index] < 2.0:
                    time.sleep(1.0)  # a worker that dies at start-up would otherwise spin
                self._start(index)
        deadline = time.monotonic() + self.config.shutdown_timeout + 5
        for process in self.workers.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
        event(log, logging.INFO, "supervisor_stopped", "supervisor (pid %(pid)d) stopped", pid=os.getpid(),
              status=status)
        return status

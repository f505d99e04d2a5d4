"""One scrape for every worker: ``bidder serve --metrics-port PORT``.

The workers share the bid port (SO_REUSEPORT), so a scrape of ``/metrics`` there reaches whichever worker the
kernel picks. With ``--metrics-port`` each worker also listens on a Unix socket of its own (in a private
directory of the supervisor's) and the supervisor answers ``GET /metrics`` on PORT with every worker's metrics,
each sample labelled with its ``worker``, plus its own (``bidder_workers``, ``bidder_workers_scraped``,
``bidder_worker_restarts_total``).

Chosen over prometheus-client's multiprocess mode, which would put a memory-mapped file write on the bid
path for every counter and histogram update (the bid path updates plain numbers, ``bidder/metrics.py``), and
over a port per worker, which needs a scrape config that knows the worker count. The bid path pays nothing:
a worker renders its metrics only when scraped, as before.
"""
from __future__ import annotations

import http.client
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from bidder.logs import event

__all__ = ["MetricsServer", "merge", "scrape_worker", "worker_socket"]

log = logging.getLogger("bidder")

#: seconds a worker has to answer the supervisor's scrape
SCRAPE_TIMEOUT_S = 2.0


def worker_socket(directory: str | Path, worker: int) -> Path:
    """The Unix socket worker ``worker`` serves its application on, for the supervisor's scrapes."""
    return Path(directory) / f"worker-{worker}.sock"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def scrape_worker(path: Path, timeout: float = SCRAPE_TIMEOUT_S) -> str:
    """A worker's ``/metrics`` text, over its Unix socket; OSError if it does not answer 200."""
    connection = _UnixConnection(path, timeout)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        body = response.read()
    except http.client.HTTPException as exc:
        raise OSError(f"{path}: {exc}") from None
    finally:
        connection.close()
    if response.status != 200:
        raise OSError(f"{path}: /metrics answered {response.status}")
    return body.decode("utf-8")


def merge(texts: dict[int, str]) -> list[Metric]:
    """The families of every worker's exposition, each sample labelled with its worker (a family that has a
    ``worker`` label already, such as ``bidder_worker_info``, keeps its own)."""
    families: dict[str, Metric] = {}
    for worker, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type)
            label = str(worker)
            for sample in family.samples:
                labels = sample.labels if "worker" in sample.labels else {"worker": label, **sample.labels}
                merged.samples.append(Sample(sample.name, labels, sample.value, sample.timestamp, sample.exemplar))
    return list(families.values())


class _Gathered:
    """A collector over one scrape's gathered families (prometheus-client renders them)."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


class MetricsServer:
    """The supervisor's ``/metrics`` on ``host:port``: every worker's, gathered at each scrape (a thread of the
    supervisor; workers that do not answer are left out and counted)."""

    def __init__(self, host: str, port: int, sockets: Callable[[], dict[int, Path]],
                 restarts: Callable[[], dict[int, int]]):
        self.sockets, self.restarts = sockets, restarts
        gather = self.render

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics here")
                    return
                body = gather()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # scrapes are not worth a line each
                pass

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server = type("Server", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True})
        self.server = server((host, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="bidder-metrics", daemon=True)

    def start(self) -> MetricsServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def render(self) -> bytes:
        texts: dict[int, str] = {}
        sockets = self.sockets()
        for worker, path in sockets.items():
            try:
                texts[worker] = scrape_worker(path)
            except OSError as exc:  # starting, restarting or stuck: its series are missing from this scrape
                event(log, logging.DEBUG, "scrape_failed", "worker %(worker)d not scraped: %(error)s",
                      worker=worker, error=str(exc))
        workers = GaugeMetricFamily("bidder_workers", "Workers the supervisor runs", value=len(sockets))
        scraped = GaugeMetricFamily("bidder_workers_scraped", "Workers whose metrics this scrape holds",
                                    value=len(texts))
        restarts = CounterMetricFamily("bidder_worker_restarts", "Workers restarted by the supervisor after they "
                                       "exited, by worker", labels=["worker"])
        for worker, count in sorted(self.restarts().items()):
            restarts.add_metric((str(worker),), count)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Gathered([*merge(texts), workers, scraped, restarts]))
        return generate_latest(registry)

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


def merge(texts: dict[int, str]) -> str:
    """Every worker's exposition as one: each family once (its HELP and TYPE from the first worker that has it)
    with the samples of every worker, each labelled with its worker (a sample that has a ``worker`` label
    already, such as ``bidder_worker_info``'s, keeps its own).

    Text in, text out: the exposition format puts a family's samples after its HELP and TYPE lines, so the
    label goes in after the sample's name without parsing the rest of the line (prometheus-client's parser
    costs tens of milliseconds a worker at each scrape, on a core the workers use)."""
    headers: dict[str, dict[str, str]] = {}
    samples: dict[str, list[str]] = {}
    for worker, text in sorted(texts.items()):
        label = f'worker="{worker}"'
        family = None
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                kind, family = line[2:6], line[7:].split(" ", 1)[0]
                headers.setdefault(family, {}).setdefault(kind, line)
                samples.setdefault(family, [])
            elif line and not line.startswith("#") and family is not None:
                samples[family].append(_with_worker(line, label))
    out = [line for family, lines in samples.items() for line in (*headers[family].values(), *lines)]
    return "\n".join(out) + "\n" if out else ""


def _with_worker(sample: str, label: str) -> str:
    """``name{a="x"} 1`` → ``name{worker="i",a="x"} 1``; ``name 1`` → ``name{worker="i"} 1``."""
    brace, space = sample.find("{"), sample.find(" ")
    if brace < 0 or 0 <= space < brace:
        return f"{sample[:space]}{{{label}}}{sample[space:]}"
    rest = sample[brace + 1:]
    if rest.startswith('worker="') or ',worker="' in rest.partition("}")[0]:
        return sample
    return f"{sample[:brace + 1]}{label}{'' if rest.startswith('}') else ','}{rest}"


class _Own:
    """The supervisor's own families, rendered by prometheus-client."""

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
        registry.register(_Own([workers, scraped, restarts]))
        return merge(texts).encode("utf-8") + generate_latest(registry)

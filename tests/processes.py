"""``python -m bidder serve`` as a child process, for tests: a port nobody else can take, and waits on what
the server says (its log lines, /readyz) instead of sleeps."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

STARTUP_S = 60.0


def reserve_port() -> socket.socket:
    """A socket bound to a free port and never listened on, kept open while the server runs.

    The kernel hands a bound port to no other socket that asks for port 0, so nothing can take it between
    here and the server's bind; the server still binds it (SO_REUSEADDR, and SO_REUSEPORT for ``--workers``
    > 1, are set on both), and only the server's listening socket receives connections.
    """
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))
    return holder


def http(port: int, path: str, body: bytes | None = None, timeout: float = 10) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Server:
    """``python -m bidder serve ARGS --port P --no-pin``; its output is collected line by line. ``{port}`` in an
    argument becomes P (a notice URL names the server's own port)."""

    def __init__(self, *args: str, workers: int = 1):
        self.holder = reserve_port()
        self.port = self.holder.getsockname()[1]
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bidder", "serve", *(a.replace("{port}", str(self.port)) for a in args), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", str(workers), "--no-pin"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pattern: str, count: int = 1, timeout: float = STARTUP_S, after: int = 0) -> list[re.Match]:
        """The first ``count`` output lines from line ``after`` on that match ``pattern`` (waits for them)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [m for m in map(regex.search, self.lines[after:]) if m]
                if len(found) >= count:
                    return found[:count]
                if self.process.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(f"server exited {self.process.returncode} before {pattern!r}:\n"
                                         + "\n".join(self.lines))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {count} line(s) matching {pattern!r} in {timeout} s:\n"
                                         + "\n".join(self.lines))
                self._changed.wait(left)

    def mark(self) -> int:
        """The number of lines so far: ``wait_for(..., after=mark)`` looks only at what comes next."""
        with self._changed:
            return len(self.lines)

    def wait_ready(self, workers: int = 1) -> dict[int, int]:
        """Waits until every worker says it serves; returns {worker: pid}."""
        found = self.wait_for(r"worker (\d+) \(pid (\d+)\) serving", count=workers)
        status, body = http(self.port, "/readyz")
        assert status == 200 and json.loads(body)["ready"] is True, body
        return {int(m.group(1)): int(m.group(2)) for m in found}

    def get(self, path: str) -> tuple[int, bytes]:
        return http(self.port, path)

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        return http(self.port, path, body)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 40) -> int:
        """SIGTERM; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.holder.close()
        self._reader.join(timeout=5)


class RedisServer:
    """A real ``redis-server`` on a free port with append-only persistence in ``directory``, for tests: started
    and stopped by the test (``stop`` then ``start`` is a restart that keeps its data, as a crash would not lose
    what the AOF holds)."""

    def __init__(self, directory):
        self.directory = str(directory)
        self.port = 0
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        for _ in range(5):  # a port freed here can be taken by another process before redis binds it: try again
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                self.port = probe.getsockname()[1]
            self._spawn()
            if self._answers():
                return self
            self.process.kill()
            self.process.wait()
        raise AssertionError(f"redis-server did not start on a free port (last {self.port})")

    def _answers(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def restart(self) -> None:
        """Start again on the same port and directory (the AOF is read back)."""
        self.stop()
        self._spawn()
        assert self._answers(), f"redis-server did not come back on port {self.port}"

    def _spawn(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", self.directory], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

"""Start a server under test as its own process group, wait until it answers, always tear it down.

Each server runs in a new session (so SIGTERM reaches its workers too), optionally pinned with
`taskset`, with stdout/stderr going to a log file rather than a pipe: a pipe nobody reads fills up
and stalls the server mid-benchmark.  The log's tail is what a failure message shows.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator


class BenchError(RuntimeError):
    """A failure the user can act on; the CLI prints its message without a traceback."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks it; a small race remains until the server binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def pinned(command: list[str], cpus: str | None) -> list[str]:
    """`command` run under `taskset -c cpus`, or unchanged when cpus is None (pinning disabled)."""
    return command if cpus is None else ["taskset", "-c", cpus, *command]


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, every thread) used so far by process ``pid`` and its live descendants.

    Under load this is a figure a busy host disturbs far less than requests per second: time other processes
    take from the server's core is not counted, so CPU time per request compares servers on a shared machine."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(b")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
        child = int(entry.name)
        children.setdefault(int(fields[1]), []).append(child)
        times[child] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    total, todo = 0.0, [pid]
    while todo:
        process = todo.pop()
        total += times.get(process, 0.0)
        todo.extend(children.get(process, ()))
    return total


@dataclass
class ServerProcess:
    name: str
    command: list[str]
    url: str
    log_path: Path
    process: subprocess.Popen | None = field(default=None, repr=False)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def failure(self, what: str) -> BenchError:
        tail = self.log_tail()
        shown = " ".join(self.command)
        return BenchError(f"{self.name} {what}\n  command: {shown}\n  log: {self.log_path}"
                          + (f"\n  last lines of its log:\n{_indent(tail)}" if tail else ""))


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def _answers(url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def wait_ready(server: ServerProcess, path: str, timeout_s: float) -> None:
    """Poll GET `path` until it answers 200; fail early, with the log, if the process dies."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise server.failure(f"exited with status {server.process.returncode} before it was ready")
        if _answers(server.url + path, timeout=1.0):
            return
        time.sleep(0.1)
    raise server.failure(f"did not answer 200 on {path} within {timeout_s:.0f} s")


def listening_sockets(port: int) -> int:
    """How many TCP sockets listen on `port` (one per worker when workers bind with SO_REUSEPORT)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def wait_listeners(server: ServerProcess, port: int, expected: int, timeout_s: float) -> int:
    """Wait until `expected` sockets listen on `port`, or the timeout; return how many do.

    wrk opens its connections once and keeps them, and SO_REUSEPORT hands a connection to a socket
    that exists at connect time, so a worker that binds late would sit idle through the whole run.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        count = listening_sockets(port)
        if count >= expected or time.monotonic() >= deadline:
            return count
        if server.process.poll() is not None:
            raise server.failure(f"exited with status {server.process.returncode} while its workers started")
        time.sleep(0.1)


def stop(server: ServerProcess, grace_s: float = 10.0) -> None:
    """SIGTERM the whole process group, SIGKILL it if it has not exited after `grace_s`."""
    process = server.process
    if process is None:
        return
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    # Also when the parent is already gone: workers outliving it would keep a core busy and skew
    # the next measurement.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def running(name: str, command: list[str], url: str, *, ready_path: str, startup_timeout_s: float,
            port: int | None = None, workers: int = 1, log_dir: Path | None = None) -> Iterator[ServerProcess]:
    """Start `command`, wait until it is ready (and all `workers` listen), yield it, always stop it.

    The log file is removed after a clean run and kept after a failure.
    """
    log_dir = Path(log_dir or tempfile.gettempdir())
    log_dir.mkdir(parents=True, exist_ok=True)
    fd, log_name = tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log", dir=log_dir)
    server = ServerProcess(name, command, url, Path(log_name))
    try:
        with os.fdopen(fd, "wb") as log:
            server.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True)
    except FileNotFoundError as exc:
        raise BenchError(f"cannot start {name}: {exc.filename} not found ({' '.join(command)})") from None
    try:
        wait_ready(server, ready_path, startup_timeout_s)
        if workers > 1 and port is not None:
            found = wait_listeners(server, port, workers, timeout_s=min(startup_timeout_s, 15.0))
            if found < workers:
                print(f"note: {name} has {found} listening socket(s) for {workers} workers; "
                      "connections may not spread over all workers", file=sys.stderr)
        yield server
    except BaseException:
        stop(server)
        raise
    stop(server)
    # A clean run's log has nothing to show; a failed one's is kept, since the error message points to it.
    server.log_path.unlink(missing_ok=True)

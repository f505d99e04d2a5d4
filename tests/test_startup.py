"""Start-up failures: one clear line on stderr and exit status 2, never a traceback or a restart loop."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bidder.__main__ import main
from bidder.app import Config
from bidder.workers import EXIT_STARTUP, StartupError, check_port, serve

pytestmark = pytest.mark.slow


@pytest.fixture
def busy_port():
    """A port held by a listening socket without SO_REUSEPORT, as another program would hold it."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def run_bidder(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bidder", "serve", "--no-pin", *args], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_busy_port_is_one_line_and_exit_2(small_bundle, busy_port, workers):
    done = run_bidder("--model", str(small_bundle), "--port", str(busy_port), "--workers", workers)
    assert done.returncode == 2
    assert one_error_line(done.stderr) == f"error: cannot listen on 127.0.0.1:{busy_port}: Address already in use"


def test_an_unknown_host_is_one_line_and_exit_2(small_bundle):
    done = run_bidder("--model", str(small_bundle), "--host", "no-such-host.invalid")
    assert done.returncode == 2 and "cannot listen on no-such-host.invalid:8080" in one_error_line(done.stderr)


def broken_bundle(small_bundle: Path, tmp_path: Path) -> Path:
    bundle = tmp_path / "broken"
    shutil.copytree(small_bundle, bundle)
    (bundle / "model.onnx").write_bytes(b"\n\nnot a model\n")
    return bundle


@pytest.mark.parametrize("case", ["missing bundle", "broken bundle", "catalog is a folder", "catalog not JSON"])
def test_an_unreadable_bundle_or_catalog_is_one_line_and_exit_2(small_bundle, tmp_path, case, capsys):
    catalog = tmp_path / "catalog.json"
    catalog.write_text("{nope")
    args = {"missing bundle": ["--model", str(tmp_path / "nothing")],
            "broken bundle": ["--model", str(broken_bundle(small_bundle, tmp_path))],
            "catalog is a folder": ["--model", str(small_bundle), "--campaigns", str(tmp_path)],
            "catalog not JSON": ["--model", str(small_bundle), "--campaigns", str(catalog)]}[case]
    assert main(["serve", "--no-pin", *args]) == 2
    one_error_line(capsys.readouterr().err)


def test_a_bundle_the_os_cannot_read_is_one_line_and_exit_2(small_bundle, monkeypatch, capsys):
    real = Path.read_bytes

    def denied(self):
        if self.name == "model.onnx":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    assert main(["serve", "--no-pin", "--model", str(small_bundle)]) == 2
    assert one_error_line(capsys.readouterr().err).endswith("model.onnx: cannot read: Permission denied")


def test_check_port_names_the_address(busy_port):
    with pytest.raises(StartupError, match=f"127.0.0.1:{busy_port}: Address already in use"):
        check_port("127.0.0.1", busy_port)
    with pytest.raises(StartupError):
        check_port("127.0.0.1", busy_port, reuse_port=True)


def test_a_worker_that_cannot_listen_exits_2_without_a_traceback(small_bundle, busy_port, capfd):
    # past the command line's own checks: the port is taken between the check and the bind
    assert serve(Config(model=small_bundle, port=busy_port, pin=False)) == EXIT_STARTUP
    err = capfd.readouterr().err
    assert f"error: cannot listen on 127.0.0.1:{busy_port}: Address already in use" in err
    assert "Traceback" not in err


def test_the_supervisor_gives_up_when_workers_keep_failing_at_start_up(small_bundle, busy_port):
    code = (f"import sys; from pathlib import Path; from bidder.app import Config; from bidder.workers import serve; "
            f"sys.exit(serve(Config(model=Path({str(small_bundle)!r}), port={busy_port}, workers=2, pin=False)))")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "failed at start-up 3 times in a row" in done.stderr and "giving up" in done.stderr
    assert done.stderr.count("restarting") == 0 and "Traceback" not in done.stderr
    assert time.monotonic() - started < 90


def test_the_command_line_reads_the_catalog_once_and_a_reload_reads_it_again(small_bundle, monkeypatch):
    """The check before serving loads the catalog; the one worker serves that object instead of reading the file
    a second time (seconds for 100,000 creatives), and a later load of the file (a reload) reads it afresh."""
    import bidder.campaigns
    import bidder.app
    import bidder.workers
    from bidder.metrics import Metrics

    reads = []
    real = bidder.campaigns.load_catalog

    def counted(path):
        reads.append(Path(path))
        return real(path)

    monkeypatch.setattr(bidder.campaigns, "load_catalog", counted)
    monkeypatch.setattr(bidder.app, "load_catalog", counted)
    served = []

    def worker(config, worker, ready=None):
        state = bidder.app.State(config, Metrics(worker))
        served.append(state.load(config.model, config.campaigns))
        served.append(state.load(config.model, config.campaigns))  # a reload of the same file
        return 0

    monkeypatch.setattr(bidder.workers, "run_worker", worker)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert main(["serve", "--no-pin", "--model", str(small_bundle), "--port", str(port)]) == 0
    assert len(reads) == 2  # the check (whose catalog the first load serves) and the reload
    assert served[0].catalog is not served[1].catalog and len(served[0].catalog) == len(served[1].catalog)
    assert not bidder.app._PRELOADED

"""Shared fixtures. `pytest --benchmark` runs the micro-benchmarks; plain `pytest` skips them."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from bidder import OPENRTB_EXAMPLES


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the pytest-benchmark micro-benchmarks (skipped otherwise)")


def pytest_configure(config):
    config.addinivalue_line("markers", "bench: a micro-benchmark, run only with --benchmark")
    config.addinivalue_line("markers", "slow: a test that trains or serves for several seconds")
    if not config.getoption("--benchmark"):
        # Benchmarks are skipped below; keep the benchmark fixture cheap if one is requested anyway.
        config.option.benchmark_disable = True


def pytest_collection_modifyitems(config, items):
    run_bench = config.getoption("--benchmark")
    skip_bench = pytest.mark.skip(reason="micro-benchmark: run with `pytest --benchmark`")
    skip_other = pytest.mark.skip(reason="--benchmark runs the micro-benchmarks only")
    for item in items:
        is_bench = "benchmark" in getattr(item, "fixturenames", ()) or item.get_closest_marker("bench")
        if is_bench and not run_bench:
            item.add_marker(skip_bench)
        elif run_bench and not is_bench:
            item.add_marker(skip_other)


@pytest.fixture(scope="session")
def openrtb_examples() -> dict[str, bytes]:
    """The IAB example bid requests, keyed by 'version/filename'."""
    out = {}
    for path in sorted(OPENRTB_EXAMPLES.glob("*/*.json")):
        out[f"{path.parent.name}/{path.name}"] = path.read_bytes()
    assert out, f"no OpenRTB examples under {OPENRTB_EXAMPLES}"
    return out


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    from train.data.synthetic import generate

    out = tmp_path_factory.mktemp("synthetic")
    generate(out, rows=20000, seed=7)
    return out


def _trained_bundle(request, tmp_path_factory, architecture: str) -> Path:
    """A 1-epoch bundle on the synthetic fixture data.

    ``BIDDER_TEST_BUNDLE_CACHE`` (set by ``make mutation`` only: every mutant runs its tests in a fresh pytest
    session) keeps trained bundles in that folder, keyed by the training code, so they are trained once a run.
    """
    cache = os.environ.get("BIDDER_TEST_BUNDLE_CACHE")
    if not cache:
        from train.fit import fit_bundle  # imports torch: only when a bundle is trained

        return fit_bundle(request.getfixturevalue("synthetic_data"), architecture,
                          tmp_path_factory.mktemp(architecture), epochs=1, progress=False)
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(architecture.encode())
    for path in sorted([*root.glob("train/**/*.py"), root / "bidder" / "spec.py", root / "bidder" / "bundle.py",
                        root / "bidder" / "_features.pyx",
                        root / "train" / "_attention.pyx", root / "train" / "_attention.h"]):
        digest.update(path.read_bytes())
    cached = Path(cache) / f"{architecture}-{digest.hexdigest()[:16]}"
    if not (cached / "model.onnx").exists():
        from train.fit import fit_bundle

        fit_bundle(request.getfixturevalue("synthetic_data"), architecture, cached.with_suffix(".tmp"), epochs=1,
                   progress=False)
        cached.with_suffix(".tmp").rename(cached)
    return cached


@pytest.fixture(scope="session")
def small_bundle(request, tmp_path_factory) -> Path:
    """DeepFM, one epoch."""
    return _trained_bundle(request, tmp_path_factory, "deepfm")


@pytest.fixture(scope="session")
def logreg_bundle(request, tmp_path_factory) -> Path:
    """Logistic regression, one epoch: another model id, architecture and set of predictions than small_bundle."""
    return _trained_bundle(request, tmp_path_factory, "logreg")


@pytest.fixture(scope="session")
def second_catalog(tmp_path_factory) -> Path:
    """A catalog unlike the default one: targeting, a paused campaign, size filters, markup-only creatives."""
    from oracle import second_catalog as build

    path = tmp_path_factory.mktemp("catalog") / "second.json"
    path.write_text(json.dumps(build()))
    return path


SAMPLE_RECORD = {
    "weekday": 3, "hour": 14, "timestamp": "20130606141502123",
    "useragent": "Mozilla/5.0 (Windows NT 6.1; WOW64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/27.0.1453.94 Safari/537.36",
    "IP": "222.94.35.*", "region": 80, "city": 85, "adexchange": 2, "domain": "trqRTuT-GNTYJNKbuKz",
    "url": "5a2d1a7a8bd3b6d95e4b59a8b5b4c0d1", "urlid": None, "slotid": "mm_10027070_118039_10308280",
    "slotwidth": 300, "slotheight": 250, "slotvisibility": "FirstView", "slotformat": "Na", "slotprice": 50,
    "creative": "e39e178ffdf366606f8cab791ee56bcd", "advertiser": 1458,
    "usertag": ["10006", "10024", "10031", "10048", "10057", "13042"],
}


def fresh_record(i: int) -> dict:
    """An iPinYou-like record whose strings are new objects, as a freshly decoded request's are.

    The featurizer caches the last value object per field, so benchmarks must not reuse objects.
    """
    record = {k: (v.encode().decode() if isinstance(v, str) else v) for k, v in SAMPLE_RECORD.items()}
    record.update(domain=f"domain-{i % 13}", slotid=f"slot-{i}", IP=f"10.{i % 250}.3.*",
                  usertag=[t.encode().decode() for t in SAMPLE_RECORD["usertag"]])
    return record


@pytest.fixture(scope="session")
def sample_records() -> list[dict]:
    """1024 iPinYou-like records, no two sharing a string object."""
    return [fresh_record(i) for i in range(1024)]


@pytest.fixture
def one_thread():
    """torch on one thread for tiny tensors: a second thread only adds synchronisation (and contention on a busy
    machine). Modules that want it name it in ``pytestmark``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def redis_server(tmp_path_factory):
    """A real redis-server of this test's own (AOF on, no RDB snapshots), stopped after it."""
    from processes import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()

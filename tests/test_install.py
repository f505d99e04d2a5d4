"""The serve-only install: `make serve` installs the runtime alone (no torch), `make test` the extras too,
whatever ran before in the same clone; and serving imports nothing from the training extras."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINING_ONLY = ("torch", "deepctr_torch", "pandas", "matplotlib", "sklearn", "tqdm", "requests")

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


@pytest.fixture
def clone(tmp_path) -> Path:
    """The files make's rules look at, in a folder without a .venv."""
    for name in ("Makefile", "pyproject.toml", "setup.py", "bidder/_features.pyx", "bidder/_pricing.pyx", "bidder/_rowkernel.pyx",
                 "bidder/_rowkernel.h", "bidder/_shading.pyx",
                 "train/_attention.pyx", "train/_attention.h", "train/_rows.pyx", "train/distributed/_flags.pyx",
                 "bidder/models/default/model.onnx"):
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"" if name.endswith(".onnx") else (ROOT / name).read_bytes())
    return tmp_path


def stamps(clone: Path, *names: str) -> None:
    """Stamps of an earlier make run, newer than every source."""
    (clone / ".venv" / "bin").mkdir(parents=True, exist_ok=True)
    (clone / ".venv" / "bin" / "python").touch(mode=0o755)
    later = time.time() + 60
    for name in names:
        path = clone / ".venv" / name
        path.touch()
        os.utime(path, (later, later))


def dry_run(clone: Path, target: str) -> str:
    done = subprocess.run(["make", "-n", target], cwd=clone, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def installs(plan: str) -> list[str]:
    return [line for line in plan.splitlines() if "pip install" in line and "-e " in line]


@needs_make
def test_make_serve_installs_the_runtime_only(clone):
    plan = dry_run(clone, "serve")
    assert [line.split("-e ")[1] for line in installs(plan)] == ["."]
    assert "train" not in plan and "torch" not in plan


@needs_make
@pytest.mark.parametrize("target", ["test", "dev", "default-model"])
def test_make_test_and_training_install_the_extras(clone, target):
    assert [line.split("-e ")[1] for line in installs(dry_run(clone, target))] == ["'.[train,dev]'"]


@needs_make
def test_make_test_after_make_serve_adds_the_extras(clone):
    stamps(clone, ".runtime", ".extension")
    assert [line.split("-e ")[1] for line in installs(dry_run(clone, "test"))] == ["'.[train,dev]'"]


@needs_make
def test_make_serve_after_make_test_installs_nothing(clone):
    stamps(clone, ".runtime", ".full", ".extension")
    assert installs(dry_run(clone, "serve")) == []


@needs_make
def test_a_missing_default_model_is_trained_with_the_extras(clone):
    (clone / "bidder/models/default/model.onnx").unlink()
    stamps(clone, ".runtime", ".extension")
    plan = dry_run(clone, "serve")
    # into the package's bundle, where serving looks: train default alone writes runs/default
    assert "-m train default --out bidder/models/default" in plan and "'.[train,dev]'" in plan


def test_runtime_dependencies_hold_no_training_library():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {re.match(r"[A-Za-z0-9._-]+", dep).group(0).lower().replace("_", "-") for dep in project["dependencies"]}
    training = {name.replace("_", "-") for name in TRAINING_ONLY} | {"scikit-learn"}
    assert not runtime & training
    assert {"train", "dev"} <= set(project["optional-dependencies"])


def test_serving_imports_nothing_from_the_training_extras(tmp_path):
    """A bid and `python -m bidder serve --help` with every training-only package made unimportable."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        f"BLOCKED = {TRAINING_ONLY!r}\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ImportError(f'{name} is a training dependency')\n"
        "sys.meta_path.insert(0, Block())\n")
    code = ("import sys; from bidder import DEFAULT_BUNDLE, OPENRTB_EXAMPLES; from bidder.app import create_app; "
            "from bidder.engine import BidEngine; from bidder.scorer import Scorer; "
            "from bidder.campaigns import load_catalog; from bidder.metrics import Metrics; "
            "e = BidEngine(Scorer(DEFAULT_BUNDLE), load_catalog(DEFAULT_BUNDLE / 'campaigns.json'), Metrics()); "
            "o = e.bid((OPENRTB_EXAMPLES / 'bid-request-2.5' / 'simple-banner.json').read_bytes()); "
            "assert o.status == 200, o; "
            "assert not [m for m in sys.modules if m.split('.')[0] in " + repr(TRAINING_ONLY) + "]")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    for args in (["-c", code], ["-m", "bidder", "serve", "--help"]):
        done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr

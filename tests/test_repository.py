"""The repository is self-contained: a clone with nothing beside it has every file its tests, benchmarks
and README read. A tracked file that reaches above the repository root for data fails here."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bidder import OPENRTB_EXAMPLES

ROOT = Path(__file__).resolve().parents[1]
# relative paths that climb: "../x", "../../x" (not "a/../b" inside the tree, not "..." ellipses)
CLIMB = re.compile(r"(?<![\w./-])((?:\.\./)+)")
# Path(__file__)...parents[N] and Path(__file__)...parent.parent...
PARENTS_INDEX = re.compile(r"__file__\)(?:\.resolve\(\))?\.parents\[(\d+)\]")
PARENT_CHAIN = re.compile(r"__file__\)(?:\.resolve\(\))?((?:\.parent\b)+)")
ROOT_PARENT = re.compile(r"\b(?:REPO|ROOT|REPO_ROOT)\.parent\b")


def tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [name for name in out.decode().split("\0") if name]


def text_of(name: str) -> str | None:
    data = (ROOT / name).read_bytes() if (ROOT / name).is_file() else b""
    if b"\0" in data[:8192]:
        return None  # binary: a model, a picture
    return data.decode("utf-8", errors="replace")


def escapes(name: str, text: str) -> list[str]:
    """Where ``text`` (the tracked file ``name``) points above the repository root."""
    depth = len(Path(name).parts) - 1  # directories between the root and the file
    found = []
    for match in CLIMB.finditer(text):
        # a relative path is read from the file's own folder at best (commands run from the root)
        if match.group(1).count("../") > depth:
            found.append(text[match.start():match.start() + 60].split("\n")[0])
    if name.endswith(".py"):
        for match in PARENTS_INDEX.finditer(text):
            if int(match.group(1)) > depth:  # parents[depth] is the root
                found.append(match.group(0))
        for match in PARENT_CHAIN.finditer(text):
            if match.group(1).count(".parent") > depth + 1:  # the first .parent is the file's folder
                found.append(match.group(0))
        found.extend(match.group(0) for match in ROOT_PARENT.finditer(text))
    return found


def test_no_tracked_file_reaches_outside_the_repository():
    offenders = {}
    for name in tracked_files():
        if name == "tests/test_repository.py":  # its strings are examples of what is refused
            continue
        text = text_of(name)
        if text is not None and (hits := escapes(name, text)):
            offenders[name] = hits
    assert not offenders, f"tracked files reading outside the repository: {offenders}"


@pytest.mark.parametrize("name,text,bad", [
    ("README.md", "curl --data-binary @../outside/openrtb/x.json", True),
    ("tests/conftest.py", 'OUTSIDE = Path(__file__).resolve().parents[2] / "outside"', True),
    ("tests/conftest.py", 'ROOT = Path(__file__).resolve().parents[1]', False),
    ("bench/load.py", 'OUTSIDE = REPO.parent / "outside"', True),
    ("bench/load.py", "Path(__file__).resolve().parent.parent.parent", True),
    ("bench/load.py", "Path(__file__).resolve().parent.parent / 'bidder'", False),
    ("docs/a/b.md", "see [the README](../../README.md)", False),
    ("Makefile", "cd \"$(dirname \"$0\")/..\" && ls ...", False),
])
def test_the_check_itself(name, text, bad):
    assert bool(escapes(name, text)) is bad


def test_the_iab_examples_live_in_the_repository_and_are_tracked():
    assert OPENRTB_EXAMPLES.resolve().is_relative_to(ROOT)
    names = {name for name in tracked_files() if name.startswith("bidder/examples/openrtb/")}
    expected = {f"bidder/examples/openrtb/{p.relative_to(OPENRTB_EXAMPLES).as_posix()}"
                for p in OPENRTB_EXAMPLES.rglob("*") if p.is_file()}
    assert len(expected) >= 12 and expected <= names, expected - names
    assert "bidder/examples/openrtb/README.md" in names  # says where the files come from

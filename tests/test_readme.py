"""The README and docs/ as a newcomer reads them: the example bids are reproducible with the documented clock, every
command as written is a valid command line, every link and repository path resolves, the current figures are the
latest results file's, and the benchmark history page is what its command writes."""
from __future__ import annotations

import argparse
import importlib
import json
import re
import time
import shlex
from pathlib import Path

import pytest

from bidder import DEFAULT_BUNDLE, OPENRTB_EXAMPLES
from bidder.__main__ import parse_now
from bidder.campaigns import load_catalog
from catalogs import parse_catalog
from bidder.engine import BidEngine
from bidder.metrics import Metrics
from bidder.scorer import Scorer
from bidder.shading import WinModel

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = {path: path.read_text(encoding="utf-8") for path in sorted((ROOT / "docs").glob("*.md"))}
BENCHMARKS = ROOT / "docs" / "benchmarks.md"
#: the pages whose commands a reader runs; docs/benchmarks.md records the commands of past runs as they were typed
#: (on other machines, with other paths) and is checked against its generator instead
INSTRUCTIONS = {ROOT / "README.md": README, **{path: text for path, text in DOCS.items() if path != BENCHMARKS}}
PAGES = {ROOT / "README.md": README, **DOCS}
#: committed files no documented command may write into
COMMITTED = ("bidder/models/", "bench/results")


def _engine(now: str) -> BidEngine:
    scorer = Scorer(DEFAULT_BUNDLE)  # with the bundle's win-price model, as served: the examples are first price
    return BidEngine(scorer, load_catalog(DEFAULT_BUNDLE / "campaigns.json"), Metrics(), now=parse_now(now),
                     market=WinModel.for_scorer(scorer))


def test_the_example_bid_is_what_the_default_model_answers_at_the_documented_time():
    intro = "A bid, for the IAB simple-banner request, served with `--now "
    start = README.index(intro) + len(intro)
    now = README[start:README.index("`", start)]
    block = re.search(r"```json\n(.*?)```", README[start:], re.S).group(1)
    documented = json.loads(block)
    assert "make serve NOW=" + now in README and "--now " + now in README
    outcome = _engine(now).bid((OPENRTB_EXAMPLES / "bid-request-2.5" / "simple-banner.json").read_bytes())
    assert outcome.status == 200
    assert json.loads(outcome.body) == documented


def test_prices_follow_the_clock_as_the_readme_says():
    assert "Prices depend on the weekday and hour" in README
    body = (OPENRTB_EXAMPLES / "bid-request-2.5" / "simple-banner.json").read_bytes()
    prices = {json.loads(_engine(now).bid(body).body)["seatbid"][0]["bid"][0]["price"]
              for now in ("2026-11-25T14:00:00Z", "2026-11-29T03:00:00Z")}  # Wednesday afternoon, Sunday night
    assert len(prices) == 2


def test_the_example_deal_bid_is_reproducible():
    serving = DOCS[ROOT / "docs" / "serving.md"]
    price, dealid, seat = re.search(r'pmp-with-direct-deal\.json` is answered\s+`…"price":([\d.]+),…,"cid":"c3358",'
                                    r'"dealid":"([^"]+)"}\],"seat":"([^"]+)"}', serving).groups()
    answer = json.loads(_engine("2026-11-25T14:00:00Z").bid(
        (OPENRTB_EXAMPLES / "bid-request-2.5" / "pmp-with-direct-deal.json").read_bytes()).body)
    (seatbid,) = answer["seatbid"]
    (bid,) = seatbid["bid"]
    assert (bid["price"], bid["dealid"], seatbid["seat"]) == (float(price), dealid, seat)


@pytest.mark.parametrize("page", [ROOT / "README.md", ROOT / "docs" / "catalog.md"], ids=lambda p: p.name)
def test_the_example_catalogs_load(page):
    text = PAGES[page]
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", text, re.S) if '"campaigns"' in b]
    assert blocks
    for block in blocks:
        assert len(parse_catalog(block, page.name)) >= 1


# --- every command as written works from the clone ----------------------------------------------------------

def fenced_commands(text: str) -> list[str]:
    """Command lines of a page's shell blocks (not JSON, Python or text diagrams), comments cut, `a && b` split."""
    commands = []
    for lang, block in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        if lang in ("json", "text", "python"):
            continue
        variables: dict[str, str] = {}  # NAME=value lines of the block, substituted in the lines after them
        for line in block.splitlines():
            assigned = re.match(r"([A-Z_][A-Z0-9_]*)=(\S+)", line)
            if assigned:  # an arithmetic value ($(( $(date +%s) + 15 ))) stands for a Unix time
                value = assigned[2]
                variables[assigned[1]] = str(int(time.time())) if value.startswith("$((") else value
                continue
            for name, value in variables.items():
                line = line.replace("$" + name, value)
            line, _, comment = line.partition(" # ")
            alternative = re.match(r"\s*or:\s*(.*)", comment)  # "make serve ...   # or: .venv/bin/python ..."
            for part in (line, alternative.group(1) if alternative else ""):
                # `a && b` is two commands; a trailing `&` only runs one in the background
                commands += [command.strip().removesuffix("&").strip() for command in part.split("&&")
                             if command.strip()]
    return commands


def inline_commands(text: str) -> list[str]:
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)
            if re.match(r"(\.venv/bin/|python|pytest|pip)", span)]


def documented_commands() -> list[tuple[str, str]]:
    """(page, command) for every command of the README and docs/ a reader may run."""
    return [(path.relative_to(ROOT).as_posix(), command) for path, text in INSTRUCTIONS.items()
            for command in fenced_commands(text) + inline_commands(text)]


def test_every_python_command_uses_the_virtual_environment():
    commands = documented_commands()
    bare = [(page, c) for page, c in commands
            if re.match(r"(python3?|pytest|pip3?)\s", c) or re.search(r"[;|(]\s*(python3?|pytest|pip3?)\s", c)]
    assert not bare, f"commands that would not run the .venv's Python: {bare}"
    assert any(c.startswith(".venv/bin/python -m bidder serve") for _, c in commands)


class Parsed(Exception):
    """Raised in place of running a command once its command line has parsed."""

    def __init__(self, namespace: argparse.Namespace):
        self.namespace = namespace


def _dispatches(parser: argparse.ArgumentParser, namespace: argparse.Namespace) -> bool:
    """Whether ``parser`` chose a subcommand that hands its arguments to another module's parser (one without
    arguments of its own, such as ``python -m bench reload``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(namespace, action.dest, None))
            return chosen is not None and not chosen._actions
    return False


def parse(module: str, args: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace | None:
    """Parse ``python -m MODULE ARGS`` with the module's own parser, and run nothing.

    bidder and train expose their parser. bench's entry points build theirs inside ``main``: they run with every
    parse stopped just after it succeeds, so the benchmark itself never starts."""
    if module in ("bidder", "train"):
        parser = importlib.import_module(f"{module}.__main__")._parser()
        try:
            return parser.parse_args(args)
        except SystemExit as exc:  # argparse's way of saying the command line is wrong (or that --help was shown)
            if exc.code == 0 and ("-h" in args or "--help" in args):
                return None
            raise AssertionError(f"python -m {module} {' '.join(args)}: not a valid command line") from exc
    if module != "bench" and not module.startswith("bench."):
        return None
    original = argparse.ArgumentParser.parse_known_args

    def parse_and_stop(self, args=None, namespace=None):
        namespace, rest = original(self, args, namespace)
        if not self._actions or _dispatches(self, namespace):  # the arguments go on to another parser
            return namespace, rest
        if rest:
            raise AssertionError(f"python -m {module}: unrecognized arguments {rest}")
        raise Parsed(namespace)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_and_stop)
    try:
        importlib.import_module(module if module != "bench" else "bench.__main__").main(args)
    except Parsed as parsed:
        return parsed.namespace
    except ModuleNotFoundError as exc:  # the FastAPI baseline needs the bench extra, which `make test` leaves out
        from bench.load import BASELINE_PACKAGES
        if exc.name not in BASELINE_PACKAGES + ("fastapi", "uvicorn", "orjson"):
            raise
        return None
    except SystemExit as exc:
        raise AssertionError(f"python -m {module} {' '.join(args)}: not a valid command line") from exc
    finally:
        monkeypatch.undo()
    raise AssertionError(f"python -m {module} {' '.join(args)}: ran without parsing a command line")


def _module_command(words: list[str]) -> tuple[str, list[str]] | None:
    """(module, arguments) of ``[taskset -c N] .venv/bin/python -m MODULE ...`` or ``.venv/bin/torchrun ... -m
    MODULE ...``; None for other commands."""
    if words[:1] == ["taskset"]:
        words = words[3:]
    if words[:2] == [".venv/bin/python", "-m"]:
        return words[2], words[3:]
    if words[:1] == [".venv/bin/torchrun"] and "-m" in words:
        at = words.index("-m")
        return words[at + 1], words[at + 2:]
    if words[:1] == [".venv/bin/bidder"]:
        return "bidder", words[1:]
    return None


def test_every_command_line_parses_and_names_files_that_exist(monkeypatch):
    makefile = (ROOT / "Makefile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    checked = 0
    for page, command in documented_commands():
        if "[" in command.replace("'.[", "") or "…" in command:  # a synopsis, not a command
            continue
        words = shlex.split(command)
        module_command = _module_command(words)
        if module_command:
            module, args = module_command
            parse(module, args, monkeypatch)
            checked += 1
            for word in args:
                if word.startswith("tests/"):
                    assert (ROOT / word.split("::")[0]).exists(), f"{page}: {command}: {word}"
        elif words[0] == "make":
            for target in (w for w in words[1:] if "=" not in w):
                assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"{page}: make {target}: no such target"
        elif words[0] == "curl":
            for word in words:
                if word.startswith("@"):
                    assert (ROOT / word[1:]).is_file(), f"{page}: {command}: {word[1:]} is not in the repository"
        elif words[:3] == [".venv/bin/pip", "install", "-e"]:
            for extra in re.findall(r"\[(\w+)\]", words[3]):
                assert re.search(rf"^{extra} = \[", pyproject, re.M), f"{page}: {command}: no extra {extra!r}"
    assert checked >= 30


def _out_of(module: str, args: list[str], monkeypatch) -> str | None:
    namespace = parse(module, args, monkeypatch)
    out = getattr(namespace, "out", None) if namespace is not None else None
    return None if out is None else str(out)


def test_no_documented_command_writes_into_the_shipped_bundle_or_committed_results(monkeypatch):
    writes = []
    for page, command in documented_commands():
        if "[" in command.replace("'.[", "") or "…" in command:
            continue
        module_command = _module_command(shlex.split(command))
        if module_command:
            out = _out_of(*module_command, monkeypatch)
            if out is not None:
                writes.append((page, command, (ROOT / out).resolve()))
    assert writes
    into = [(page, command) for page, command, out in writes
            if any(out.is_relative_to(ROOT / committed) for committed in COMMITTED)]
    assert not into, f"commands writing into committed files: {into}"


def test_commands_that_write_results_default_to_a_git_ignored_folder(monkeypatch):
    from bench.load import DEFAULT_RESULTS

    ignored = (ROOT / ".gitignore").read_text().splitlines()
    default_bundle = Path(_out_of("train", ["default"], monkeypatch))
    assert default_bundle.resolve() != DEFAULT_BUNDLE.resolve()
    for path in (default_bundle, DEFAULT_RESULTS.relative_to(ROOT)):
        assert f"/{path.parts[0]}/" in ignored, f"{path} is not under a git-ignored folder"


def test_repository_paths_named_in_the_pages_exist():
    for path, text in PAGES.items():
        paths = {p.split("::")[0] for p in re.findall(r"`((?:bidder|bench|tests|train)/[^`\s]*)`", text)}
        paths |= set(re.findall(r"@((?:bidder|bench|tests|train)/\S+\.json)", text))
        missing = sorted(p for p in paths if not (ROOT / p).exists())
        assert not missing, f"{path.name}: {missing}"


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces turned into hyphens."""
    headings = re.findall(r"^#{1,6}\s+(.*)$", re.sub(r"```.*?```", "", text, flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_every_relative_link_resolves():
    links = 0
    for path, text in PAGES.items():
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"```.*?```", "", text, flags=re.S)):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            assert resolved.exists(), f"{path.name}: link {target}: {resolved} does not exist"
            if anchor:
                assert anchor in _anchors(resolved.read_text(encoding="utf-8")), f"{path.name}: no anchor {target}"
            links += 1
    assert links > 20


def test_readme_is_a_reference_of_at_most_300_lines_with_contents():
    assert len(README.splitlines()) <= 300
    contents = README[README.index("## Contents"):]
    contents = contents[:contents.index("\n## ", 1)]
    listed = re.findall(r"\]\(#([^)]+)\)", contents)
    sections = [h for h in re.findall(r"^## (.*)$", README, re.M) if h != "Contents"]
    assert listed == [re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in sections]


def test_the_current_figures_are_the_latest_load_run():
    """The README's table is the latest committed `bench load` run's medians, so a newer run makes this fail until
    the README quotes it."""
    section = README[README.index("## Current figures"):]
    section = section[:section.index("\n## ", 1)]
    named = re.search(r"`bench/results/(load-[^`]+\.json)`", section).group(1)
    runs = {path.name: json.loads(path.read_text()) for path in (ROOT / "bench" / "results").glob("load-*.json")}
    assert named == max(runs, key=lambda name: runs[name]["created"])
    report = runs[named]
    from bench.history import load_command

    assert f"```\n{load_command(report['config'])}\n```" in section
    medians = {(m["server"], m["connections"]): m for m in report["medians"] if m["workers"] == 1}
    rows = re.findall(r"^\| ([\w-]+) \| (\d+) \| ([\d,]+) \| ([\d.]+) \| ([\d.]+) \|", section, re.M)
    assert len(rows) == len(medians)
    for server, connections, rps, p50, p99 in rows:
        median = medians[server, int(connections)]
        assert (rps, p50, p99) == (f"{median['rps']:,.0f}", f"{median['latency_ms']['p50']:.3f}",
                                   f"{median['latency_ms']['p99']:.3f}")


def test_the_benchmark_history_page_is_what_its_command_writes(capsys):
    from bench.history import main, render

    assert BENCHMARKS.read_text(encoding="utf-8") == render(), \
        "docs/benchmarks.md is stale: run .venv/bin/python -m bench history --out docs/benchmarks.md"
    assert main([]) == 0  # without --out it prints, leaving the committed page alone
    assert capsys.readouterr().out == render()
    assert main(["--results", str(ROOT / "no-such-folder")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no-such-folder" in err and err.count("\n") == 1


def test_serving_options_in_the_readme_are_the_real_ones():
    from bidder.__main__ import _parser

    serve = next(a for a in _parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith("serve"))
    real = {option for action in serve._actions for option in action.option_strings}
    start = README.index("## Serving options")
    documented = set(re.findall(r"(--[a-z][a-z-]+)", README[start:README.index("\n\n", start)]))
    assert documented and documented <= real, documented - real
    assert real - {"-h", "--help"} <= documented, f"undocumented: {real - documented}"


def test_help_is_plain_text():
    import subprocess
    import sys

    for args in (["bidder", "--help"], ["bidder", "serve", "--help"], ["train", "--help"], ["train", "fit", "--help"]):
        done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.startswith("usage:"), done.stderr
        assert "``" not in done.stdout and ":func:" not in done.stdout and ":class:" not in done.stdout, args

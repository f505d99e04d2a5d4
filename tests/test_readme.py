"""The README as a newcomer reads it: its example bid is reproducible with the documented clock."""
from __future__ import annotations

import json
import re
from pathlib import Path

from bidder import DEFAULT_BUNDLE, OPENRTB_EXAMPLES
from bidder.__main__ import parse_now
from bidder.campaigns import load_catalog
from bidder.engine import BidEngine
from bidder.metrics import Metrics
from bidder.scorer import Scorer
from bidder.shading import WinModel

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_example_bid_is_what_the_default_model_answers_at_the_documented_time():
    intro = "A bid, for the IAB simple-banner request, served with `--now "
    start = README.index(intro) + len(intro)
    now = README[start:README.index("`", start)]
    block = re.search(r"```json\n(.*?)```", README[start:], re.S).group(1)
    documented = json.loads(block)
    assert "make serve NOW=" + now in README and "--now " + now in README
    scorer = Scorer(DEFAULT_BUNDLE)  # with the bundle's win-price model, as served: the request is first price
    engine = BidEngine(scorer, load_catalog(DEFAULT_BUNDLE / "campaigns.json"), Metrics(), now=parse_now(now),
                       market=WinModel.for_scorer(scorer))
    outcome = engine.bid((OPENRTB_EXAMPLES / "bid-request-2.5" / "simple-banner.json").read_bytes())
    assert outcome.status == 200
    assert json.loads(outcome.body) == documented


def test_the_readme_says_prices_follow_the_clock():
    assert "Prices depend on the weekday and hour" in README


def test_the_example_deal_bid_is_reproducible():
    price, dealid, seat = re.search(r'pmp-with-direct-deal\.json` is answered\s+`…"price":([\d.]+),…,"cid":"c3358",'
                                    r'"dealid":"([^"]+)"}\],"seat":"([^"]+)"}', README).groups()
    scorer = Scorer(DEFAULT_BUNDLE)
    engine = BidEngine(scorer, load_catalog(DEFAULT_BUNDLE / "campaigns.json"), Metrics(),
                       now=parse_now("2026-11-25T14:00:00Z"), market=WinModel.for_scorer(scorer))
    answer = json.loads(engine.bid((OPENRTB_EXAMPLES / "bid-request-2.5" / "pmp-with-direct-deal.json").read_bytes()).body)
    (seatbid,) = answer["seatbid"]
    (bid,) = seatbid["bid"]
    assert (bid["price"], bid["dealid"], seatbid["seat"]) == (float(price), dealid, seat)


# --- every command as written works from the clone ----------------------------------------------------------

def fenced_commands() -> list[str]:
    """Command lines of the README's shell blocks (not JSON), comments cut, `a && b` split."""
    commands = []
    for lang, block in re.findall(r"```(\w*)\n(.*?)```", README, re.S):
        if lang == "json":
            continue
        for line in block.splitlines():
            line, _, comment = line.partition(" # ")
            alternative = re.match(r"\s*or:\s*(.*)", comment)  # "make serve ...   # or: .venv/bin/python ..."
            for text in (line, alternative.group(1) if alternative else ""):
                commands += [part.strip() for part in text.split("&&") if part.strip()]
    return commands


def inline_commands() -> list[str]:
    prose = re.sub(r"```.*?```", "", README, flags=re.S)
    return [span for span in re.findall(r"`([^`]+)`", prose) if re.match(r"(\.venv/bin/|python|pytest|pip)", span)]


def test_every_python_command_uses_the_virtual_environment():
    bare = [c for c in fenced_commands() + inline_commands()
            if re.match(r"(python3?|pytest|pip3?)\s", c) or re.search(r"[;|(]\s*(python3?|pytest|pip3?)\s", c)]
    assert not bare, f"commands that would not run the .venv's Python: {bare}"
    assert any(c.startswith(".venv/bin/python -m bidder serve") for c in fenced_commands() + inline_commands())


def parse(module: str, args: list[str]) -> None:
    if module == "bidder":
        from bidder.__main__ import _parser
    elif module == "train":
        from train.__main__ import _parser
    else:
        return
    try:
        _parser().parse_args(args)
    except SystemExit as exc:  # argparse's way of saying the command line is wrong
        raise AssertionError(f"python -m {module} {' '.join(args)}: not a valid command line") from exc


def test_every_command_line_parses_and_names_files_that_exist():
    import shlex

    makefile = (ROOT / "Makefile").read_text()
    checked = 0
    for command in fenced_commands() + inline_commands():
        if "[" in command or "…" in command:  # a synopsis, not a command
            continue
        words = shlex.split(command)
        if words[:2] == [".venv/bin/python", "-m"]:
            parse(words[2], words[3:])
            checked += 1
            for word in words[3:]:
                if word.startswith("tests/"):
                    assert (ROOT / word.split("::")[0]).exists(), word
        elif words[0] == ".venv/bin/bidder":
            parse("bidder", words[1:])
        elif words[0] == "make":
            for target in (w for w in words[1:] if "=" not in w):
                assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"make {target}: no such target"
        elif words[0] == "curl":
            for word in words:
                if word.startswith("@"):
                    assert (ROOT / word[1:]).is_file(), f"{command}: {word[1:]} is not in the repository"
    assert checked >= 8


def test_repository_paths_named_in_the_readme_exist():
    paths = {p.split("::")[0] for p in re.findall(r"`((?:bidder|bench|tests|train)/[^`\s]*)`", README)}
    paths |= set(re.findall(r"@((?:bidder|bench|tests|train)/\S+\.json)", README))
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing and len(paths) > 10, missing


def test_serving_options_in_the_readme_are_the_real_ones():
    from bidder.__main__ import _parser

    serve = next(a for a in _parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith("serve"))
    real = {option for action in serve._actions for option in action.option_strings}
    start = README.index("### Serving options")
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

"""Summarise the last ``mutmut run`` per module: killed / total and every mutant not killed.

Run from the repository root after ``mutmut run`` (``make mutation`` does both). A timeout counts as
killed (the mutant hung the tests); "no tests" and "suspicious" count as survivors; mutants a stopped run never
reached ("not checked") are counted apart, outside the score.
"""
from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter, defaultdict

DETECTED = {"killed", "timeout"}
NOT_RUN = "not checked"


def main() -> int:
    done = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], capture_output=True,
                          text=True, check=True)
    by_module: dict[str, Counter] = defaultdict(Counter)
    survivors: list[tuple[str, str]] = []
    for line in done.stdout.splitlines():
        match = re.match(r"\s*((bidder\.\w+)\.\S+): (.+)$", line)
        if not match:
            continue
        name, module, status = match.groups()
        by_module[module][status] += 1
        if status not in DETECTED and status != NOT_RUN:
            survivors.append((name, status))
    if not by_module:
        print("no mutation results: run `mutmut run` first", file=sys.stderr)
        return 1
    total = Counter()
    print(f"{'module':<18} {'killed':>7} {'tested':>7} {'score':>7} {'not run':>8}")
    for module, counts in sorted(by_module.items()):
        killed, not_run = sum(counts[s] for s in DETECTED), counts[NOT_RUN]
        n = sum(counts.values()) - not_run
        total.update(killed=killed, n=n, not_run=not_run)
        print(f"{module:<18} {killed:>7} {n:>7} {killed / n if n else 0:>7.1%} {not_run:>8}")
    n = total["n"]
    print(f"{'all':<18} {total['killed']:>7} {n:>7} {total['killed'] / n if n else 0:>7.1%} {total['not_run']:>8}")
    if survivors:
        print(f"\nnot killed ({len(survivors)}; `mutmut show NAME` shows the change):")
        for name, status in survivors:
            print(f"  {name}: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

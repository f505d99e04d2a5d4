"""Summarise the last ``mutmut run`` per module: killed / total and every mutant not killed.

Run from the repository root after ``mutmut run`` (``make mutation`` does both). A timeout counts as
killed (the mutant hung the tests); "no tests" and "suspicious" count as survivors.
"""
from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter, defaultdict

DETECTED = {"killed", "timeout"}


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
        if status not in DETECTED:
            survivors.append((name, status))
    if not by_module:
        print("no mutation results: run `mutmut run` first", file=sys.stderr)
        return 1
    total = Counter()
    print(f"{'module':<18} {'killed':>7} {'total':>6} {'score':>7}")
    for module, counts in sorted(by_module.items()):
        killed, n = sum(counts[s] for s in DETECTED), sum(counts.values())
        total.update(killed=killed, n=n)
        print(f"{module:<18} {killed:>7} {n:>6} {killed / n:>7.1%}")
    print(f"{'all':<18} {total['killed']:>7} {total['n']:>6} {total['killed'] / total['n']:>7.1%}")
    if survivors:
        print(f"\nnot killed ({len(survivors)}; `mutmut show NAME` shows the change):")
        for name, status in survivors:
            print(f"  {name}: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The comparison servers' worker model, the bidder's in miniature: N processes sharing one port.

Worker i runs on core i mod n of the cores this process may use (taskset narrows them), so a scaling
run compares like with like; SIGTERM/SIGINT reach every worker.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
from typing import Any, Callable

__all__ = ["run_workers"]


def run_workers(count: int, target: Callable[..., Any], args_for: Callable[[int], tuple]) -> int:
    """Run ``target(*args_for(cpu))`` in ``count`` processes until they exit; 0 if all exited cleanly."""
    cpus = sorted(os.sched_getaffinity(0))
    workers = [multiprocessing.Process(target=target, args=args_for(cpus[i % len(cpus)])) for i in range(count)]
    for worker in workers:
        worker.start()

    def forward(signum, frame):
        for worker in workers:
            if worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for worker in workers:
        worker.join()
    return 0 if all(worker.exitcode == 0 for worker in workers) else 1

"""Serving latency of an ONNX graph as the bidder runs it: one thread, IO binding, buffers bound once."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bidder.scorer import bind_buffers
from train.export import OUTPUT, serving_session

__all__ = ["BoundGraph", "measure_latencies"]


class BoundGraph:
    """A session with its inputs and output bound to fixed buffers, so a call is just the run."""

    def __init__(self, path: str | Path, feeds: dict[str, np.ndarray]) -> None:
        self.session = serving_session(path)
        batch = len(next(iter(feeds.values())))
        # the OrtValues must outlive the binding, which holds only pointers to their memory
        self.binding, self._values = bind_buffers(
            self.session, {name: np.ascontiguousarray(arr) for name, arr in feeds.items()},
            {OUTPUT: np.empty((batch, 1), dtype=np.float32)})

    def time_calls(self, calls: int) -> np.ndarray:
        """Wall time of ``calls`` consecutive runs, in microseconds each."""
        run, binding = self.session.run_with_iobinding, self.binding
        out = np.empty(calls)
        for i in range(calls):
            start = time.perf_counter_ns()
            run(binding)
            out[i] = time.perf_counter_ns() - start
        return out / 1000.0


def measure_latencies(graphs: dict[str, tuple[str | Path, dict[str, np.ndarray]]], *, rounds: int = 10,
                      calls: int = 300, warmup: int = 200) -> dict[str, dict[str, float]]:
    """Median and p90 microseconds per call for each named graph.

    The graphs take turns, round after round, so a noisy neighbour on a shared machine slows all of
    them alike instead of whichever happened to be measured at the time.
    """
    bound = {name: BoundGraph(path, feeds) for name, (path, feeds) in graphs.items()}
    for graph in bound.values():
        graph.time_calls(warmup)
    samples: dict[str, list[np.ndarray]] = {name: [] for name in bound}
    for _ in range(rounds):
        for name, graph in bound.items():
            samples[name].append(graph.time_calls(calls))
    out = {}
    for name, parts in samples.items():
        times = np.concatenate(parts)
        out[name] = {"median_us": round(float(np.median(times)), 2), "p90_us": round(float(np.percentile(times, 90)), 2)}
    return out

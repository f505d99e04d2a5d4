"""Value → bid. Second price (``at`` = 2): the value, truthful being optimal. First price (``at`` = 1):
the bid b* = argmax_b (v − b) · P(win | b, x), from the bundle's win-price model (``market.onnx``,
written by ``python -m train market``, ``train/market.py``).

The search is a grid of ``GRID`` bids per imp from its floor up to (not including) its value,
``floor + (v − floor) · k / GRID``; the win probabilities of every imp of a batch over its grid come
from one ONNX Runtime call (the graph's ``bids`` input is the grid, its ``win`` output P(market < bid)),
so shading adds one small call per batch, not one per request. An imp whose best expected surplus is
not positive gets no bid. Without a win-price model a first-price imp is bid at its value.

The graph runs as the scorer does: single-thread session, inputs and output bound once over
pre-allocated buffers (``bidder.scorer.bind_buffers``), one binding per batch size, reused.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from bidder.scorer import BundleError, bind_buffers, session_options
from bidder.spec import SPARSE_INPUT, FeatureSpec

__all__ = ["BIDS_INPUT", "GRID", "MARKET_FILE", "MARKET_GRAPH", "WIN_OUTPUT", "WinModel", "best_bids", "bid_grid"]

MARKET_GRAPH = "market"  # its key under meta.json's "graphs"
MARKET_FILE = "market.onnx"
BIDS_INPUT, WIN_OUTPUT = "bids", "win"
GRID = 64
_STEPS = np.arange(GRID, dtype=np.float64) / GRID


def bid_grid(values: np.ndarray, floors: np.ndarray, steps: np.ndarray = _STEPS) -> np.ndarray:
    """``[n, len(steps)]`` candidate bids: floor + (value − floor) · step, steps in [0, 1)."""
    values = np.asarray(values, dtype=np.float64)
    floors = np.asarray(floors, dtype=np.float64)
    return floors[:, None] + (values - floors)[:, None] * steps[None, :]


def best_bids(values: np.ndarray, grid: np.ndarray, win: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row the grid bid of highest expected surplus (v − b) · P(win | b), and that surplus."""
    surplus = (np.asarray(values, dtype=np.float64)[:, None] - grid) * win
    best = np.argmax(surplus, axis=1)
    rows = np.arange(len(best))
    return grid[rows, best], surplus[rows, best]


class WinModel:
    """P(win | bid, x) for up to ``max_imps`` imps per call, each over a grid of ``GRID`` bids."""

    def __init__(self, path: str | Path, spec: FeatureSpec, max_imps: int = 64):
        if max_imps < 1:
            raise ValueError(f"max_imps must be >= 1, got {max_imps}")
        self.path = Path(path)
        try:
            self.session = ort.InferenceSession(self.path.read_bytes(), session_options(),
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types for unreadable graphs
            raise BundleError(f"{self.path}: ONNX Runtime cannot load it: {exc}") from None
        self._check_signature(spec)
        self.max_imps = max_imps
        self.inputs = spec.allocate(max_imps)  # what the featurizer writes; the graph reads ``sparse``
        self.bids = np.zeros((max_imps, GRID), dtype=np.float32)
        self.win = np.zeros((max_imps, GRID), dtype=np.float32)
        self._bindings: dict[int, tuple[ort.IOBinding, list[ort.OrtValue]]] = {}

    def _check_signature(self, spec: FeatureSpec) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        if set(inputs) != {SPARSE_INPUT, BIDS_INPUT} or WIN_OUTPUT not in outputs:
            raise BundleError(f"{self.path}: expected inputs {SPARSE_INPUT!r}, {BIDS_INPUT!r} and output {WIN_OUTPUT!r}, "
                              f"has inputs {sorted(inputs)} and outputs {sorted(outputs)}")
        width = inputs[SPARSE_INPUT].shape[1] if len(inputs[SPARSE_INPUT].shape) == 2 else None
        if width != spec.input_width(SPARSE_INPUT):
            raise BundleError(f"{self.path}: input {SPARSE_INPUT!r} has shape {inputs[SPARSE_INPUT].shape}, "
                              f"spec.json needs [imps, {spec.input_width(SPARSE_INPUT)}]")

    @classmethod
    def for_scorer(cls, scorer: Any, max_imps: int = 64) -> "WinModel | None":
        """The win-price model ``scorer``'s bundle lists under meta.json's ``graphs.market``; None without one.

        The file must match the sha256 meta.json records and give monotone probabilities in [0, 1].
        """
        graphs = scorer.meta.get("graphs")
        entry = graphs.get(MARKET_GRAPH) if isinstance(graphs, dict) else None
        if entry is None:
            return None
        files = entry.get("files") if isinstance(entry, dict) else None
        if not (isinstance(files, list) and len(files) == 1 and isinstance(files[0], str)):
            raise BundleError(f"{scorer.bundle}: meta.json graphs.{MARKET_GRAPH}.files must name one file")
        path = scorer.bundle / files[0]
        if not path.is_file():
            raise BundleError(f"{scorer.bundle}: meta.json lists {files[0]} but the bundle has no such file")
        digest = entry.get("sha256")
        if digest is not None and digest != hashlib.sha256(path.read_bytes()).hexdigest():
            raise BundleError(f"{path}: does not match meta.json's graphs.{MARKET_GRAPH}.sha256")
        model = cls(path, scorer.spec, max_imps=max_imps)
        model.check(scorer.featurizer)
        return model

    def check(self, featurizer: Any) -> None:
        """P(win) on a grid for a few records: finite, within [0, 1] and never falling as the bid rises."""
        n = min(4, self.max_imps)
        featurizer.transform_into(self.inputs, [{}] * n)
        self.bids[:n] = np.geomspace(0.01, 1000.0, GRID, dtype=np.float32)[None, :]
        win = self._run(n)
        if not (np.all(np.isfinite(win)) and np.all((win >= 0) & (win <= 1)) and np.all(np.diff(win, axis=1) >= -1e-6)):
            raise BundleError(f"{self.path}: P(win) must be finite, within [0, 1] and non-decreasing in the bid")

    def _run(self, n: int) -> np.ndarray:
        bound = self._bindings.get(n)
        if bound is None:
            bound = self._bindings[n] = bind_buffers(
                self.session, {SPARSE_INPUT: self.inputs[SPARSE_INPUT][:n], BIDS_INPUT: self.bids[:n]},
                {WIN_OUTPUT: self.win[:n]})
        self.session.run_with_iobinding(bound[0])
        return self.win[:n]

    def shade(self, featurizer: Any, records: Sequence[dict], values: np.ndarray,
              floors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(bid, expected surplus) per imp record: one ORT call per ``max_imps`` imps."""
        return self._shade(len(records), values, floors,
                           lambda start, stop: featurizer.transform_into(self.inputs, records[start:stop]))

    def shade_features(self, sparse: np.ndarray, values: np.ndarray, floors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``shade`` for rows already featurized (the spec's ``sparse`` input), as a replay of a log has them."""
        def fill(start: int, stop: int) -> int:
            self.inputs[SPARSE_INPUT][:stop - start] = sparse[start:stop]
            return stop - start
        return self._shade(len(sparse), values, floors, fill)

    def _shade(self, n: int, values: np.ndarray, floors: np.ndarray, fill: Any) -> tuple[np.ndarray, np.ndarray]:
        bids = np.empty(n)
        surplus = np.empty(n)
        for start in range(0, n, self.max_imps):
            stop = min(n, start + self.max_imps)
            rows = fill(start, stop)
            self.bids[:rows] = bid_grid(values[start:stop], floors[start:stop])
            # the grid the model saw (float32) is the grid the bid comes from
            bids[start:stop], surplus[start:stop] = best_bids(values[start:stop], self.bids[:rows].astype(np.float64),
                                                              self._run(rows))
        return bids, surplus

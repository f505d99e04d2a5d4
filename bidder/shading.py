"""Value → bid. Second price (``at`` = 2): the value, truthful being optimal. First price (``at`` = 1):
the bid b* = argmax_b (v − b) · P(win | b, x), from the bundle's win-price model (``market.onnx``,
written by ``python -m train market``, ``train/market.py``).

The search is a grid of ``GRID`` bids per imp from its floor up to (not including) its value,
``floor + (v − floor) · k / GRID`` (``bid_grid``), and the bid is the grid point of highest expected
surplus (``best_bids``). The graph does the whole search: it takes the imps' ``sparse`` features,
``value`` and ``floor`` (float32 ``[n, 1]``) and returns the grid ``bids`` and ``win`` = P(market < bid)
(``[n, GRID]``: the model's answer at each grid bid) and the chosen ``bid`` and its ``surplus``
(``[n, 1]``). One ONNX Runtime call covers every first-price imp of a batch and no numpy work is left
per request. An imp whose best expected surplus is not positive gets no bid. Without a win-price model
a first-price imp is bid at its value.

The graph runs as the scorer does: single-thread session, inputs and output bound once over
pre-allocated buffers (``bidder.scorer.bind_buffers``), one binding per batch size, reused. With
factorized scoring the batch's imps are featurized once, for the CTR graph; the bid path hands those rows
to the win-price graph (``shade_rows``) instead of featurizing again.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from bidder.scorer import BundleError, bind_buffers, session_options
from bidder.spec import SPARSE_INPUT, FeatureSpec

__all__ = ["BID_OUTPUT", "FLOOR_INPUT", "GRID", "GRID_OUTPUT", "MARKET_FILE", "MARKET_GRAPH", "OUTPUTS", "SURPLUS_OUTPUT",
           "VALUE_INPUT", "WIN_OUTPUT", "WinModel", "best_bids", "bid_grid"]

MARKET_GRAPH = "market"  # its key under meta.json's "graphs"
MARKET_FILE = "market.onnx"
VALUE_INPUT, FLOOR_INPUT = "value", "floor"
GRID_OUTPUT, WIN_OUTPUT, BID_OUTPUT, SURPLUS_OUTPUT = "bids", "win", "bid", "surplus"
OUTPUTS = (GRID_OUTPUT, WIN_OUTPUT, BID_OUTPUT, SURPLUS_OUTPUT)
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
    """The win-price graph's bid search for up to ``max_imps`` imps per ORT call."""

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
        self.value = np.zeros((max_imps, 1), dtype=np.float32)
        self.floor = np.zeros((max_imps, 1), dtype=np.float32)
        self.outputs = {GRID_OUTPUT: np.zeros((max_imps, GRID), dtype=np.float32),
                        WIN_OUTPUT: np.zeros((max_imps, GRID), dtype=np.float32),
                        BID_OUTPUT: np.zeros((max_imps, 1), dtype=np.float32),
                        SURPLUS_OUTPUT: np.zeros((max_imps, 1), dtype=np.float32)}
        # flat views of the [n, 1] buffers: what the per-batch code reads and writes
        self._values, self._floors = self.value.reshape(-1), self.floor.reshape(-1)
        self._bids, self._surplus = self.outputs[BID_OUTPUT].reshape(-1), self.outputs[SURPLUS_OUTPUT].reshape(-1)
        self._bindings: dict[int, tuple[ort.IOBinding, list[ort.OrtValue]]] = {}

    def _check_signature(self, spec: FeatureSpec) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        if set(inputs) != {SPARSE_INPUT, VALUE_INPUT, FLOOR_INPUT} or not set(OUTPUTS) <= set(outputs):
            raise BundleError(f"{self.path}: expected inputs {SPARSE_INPUT}, {VALUE_INPUT}, {FLOOR_INPUT} and outputs "
                              f"{', '.join(OUTPUTS)}; has inputs {sorted(inputs)} and outputs {sorted(outputs)}")
        width = inputs[SPARSE_INPUT].shape[1] if len(inputs[SPARSE_INPUT].shape) == 2 else None
        if width != spec.input_width(SPARSE_INPUT):
            raise BundleError(f"{self.path}: input {SPARSE_INPUT!r} has shape {inputs[SPARSE_INPUT].shape}, "
                              f"spec.json needs [imps, {spec.input_width(SPARSE_INPUT)}]")
        if outputs[WIN_OUTPUT].shape[1:] != [GRID]:
            raise BundleError(f"{self.path}: output {WIN_OUTPUT!r} has shape {outputs[WIN_OUTPUT].shape}, "
                              f"expected [imps, {GRID}]")

    @classmethod
    def for_scorer(cls, scorer: Any, max_imps: int = 64) -> "WinModel | None":
        """The win-price model ``scorer``'s bundle lists under meta.json's ``graphs.market``; None without one.

        The file must match the sha256 meta.json records and pass ``check``.
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
        """A few records over a wide grid: P(win) finite, in [0, 1], non-decreasing in the bid; the bid the
        grid point of highest surplus, between floor and value."""
        n = min(4, self.max_imps)
        featurizer.transform_into(self.inputs, [{}] * n)
        self.value[:n, 0] = [1000.0, 10.0, 1.0, 0.1][:n]
        self.floor[:n, 0] = 0.01
        out = self._run(n)
        grid, win = out[GRID_OUTPUT][:n].astype(np.float64), out[WIN_OUTPUT][:n]
        bids, surplus = best_bids(self.value[:n, 0], grid, win)
        sane = (np.all(np.isfinite(win)) and np.all((win >= 0) & (win <= 1)) and np.all(np.diff(win, axis=1) >= -1e-6)
                and np.allclose(out[BID_OUTPUT][:n, 0], bids, rtol=1e-6)
                and np.allclose(out[SURPLUS_OUTPUT][:n, 0], surplus, rtol=1e-5, atol=1e-6))
        if not sane:
            raise BundleError(f"{self.path}: P(win) must be finite, within [0, 1] and non-decreasing in the bid, and "
                              f"{BID_OUTPUT!r} the grid bid of highest expected surplus")

    def _run(self, n: int) -> dict[str, np.ndarray]:
        bound = self._bindings.get(n)
        if bound is None:
            bound = self._bindings[n] = bind_buffers(
                self.session, {SPARSE_INPUT: self.inputs[SPARSE_INPUT][:n], VALUE_INPUT: self.value[:n],
                               FLOOR_INPUT: self.floor[:n]},
                {name: buffer[:n] for name, buffer in self.outputs.items()})
        self.session.run_with_iobinding(bound[0])
        return self.outputs

    def shade(self, featurizer: Any, records: Sequence[dict], values: Sequence[float],
              floors: Sequence[float]) -> tuple[list[float], list[float]]:
        """(bid, expected surplus) per imp record: one ORT call per ``max_imps`` imps."""
        return self._shade(len(records), values, floors,
                           lambda start, stop: featurizer.transform_into(self.inputs, records[start:stop]))

    def shade_rows(self, sparse: np.ndarray, rows: Sequence[int], values: Sequence[float],
                   floors: Sequence[float]) -> tuple[list[float], list[float]]:
        """``shade`` for imps featurized already: imp ``i``'s features are row ``rows[i]`` of ``sparse`` (the
        spec's ``sparse`` input, as the factorized graph's imp inputs hold a batch's imps)."""
        buffer = self.inputs[SPARSE_INPUT]

        def fill(start: int, stop: int) -> int:
            chunk = rows[start:stop]
            first, n = chunk[0], stop - start
            if chunk == list(range(first, first + n)):  # consecutive rows (the usual case): a slice copy
                buffer[:n] = sparse[first:first + n]
            else:
                np.take(sparse, chunk, axis=0, out=buffer[:n])
            return n
        return self._shade(len(rows), values, floors, fill)

    def shade_features(self, sparse: np.ndarray, values: Sequence[float],
                       floors: Sequence[float]) -> tuple[list[float], list[float]]:
        """``shade`` for rows already featurized (the spec's ``sparse`` input), as a replay of a log has them."""
        def fill(start: int, stop: int) -> int:
            self.inputs[SPARSE_INPUT][:stop - start] = sparse[start:stop]
            return stop - start
        return self._shade(len(sparse), values, floors, fill)

    def _shade(self, n: int, values: Sequence[float], floors: Sequence[float],
               fill: Any) -> tuple[list[float], list[float]]:
        if n <= self.max_imps:  # one call: no list slicing or concatenation
            fill(0, n)
            self._values[:n] = values
            self._floors[:n] = floors
            self._run(n)
            return self._bids[:n].tolist(), self._surplus[:n].tolist()
        bids: list[float] = []
        surplus: list[float] = []
        for start in range(0, n, self.max_imps):
            stop = min(n, start + self.max_imps)
            rows = fill(start, stop)
            self._values[:rows] = values[start:stop]
            self._floors[:rows] = floors[start:stop]
            self._run(rows)
            bids += self._bids[:rows].tolist()
            surplus += self._surplus[:rows].tolist()
        return bids, surplus

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

The model is additive (``train/market.py``): an imp's ``mu`` and ``k`` are sums of one learned pair per
imp-side field value. A bundle written since the model's terms are stored beside the graph
(``market-terms.npz``: the table of pairs, the fields' columns and row offsets, the clip range of ``k``)
is served natively: ``bidder._shading.search`` adds the imp's pairs and searches the grid in double
precision in one call per batch, with no ONNX Runtime call, no binding and no copy of the imps' rows.
The graph stays the contract: at load the search is compared with it on random imps (P(win) at every grid
bid, and the best surplus, within ``NATIVE_TOLERANCE``: the graph computes in float32) and the bundle is
refused if they differ. A bundle without the terms is served by the graph: single-thread session, inputs
and outputs bound once over pre-allocated buffers (``bidder.scorer.bind_buffers``), one binding per batch
size. Either way, with factorized scoring the batch's imps are featurized once, for the CTR graph, and the
bid path hands those rows to the search (``shade_rows``) instead of featurizing again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from bidder import _shading
from bidder.bundle import MARKET_FILE, MARKET_GRAPH, TERMS_FILE, BundleError, session_options
from bidder.scorer import bind_buffers, run_binding
from bidder.spec import SPARSE_INPUT, FeatureSpec

__all__ = ["BID_OUTPUT", "FLOOR_INPUT", "GRID", "GRID_OUTPUT", "MARKET_FILE", "MARKET_GRAPH", "NATIVE_TOLERANCE", "OUTPUTS",
           "SURPLUS_OUTPUT", "TERMS", "TERMS_FILE", "VALUE_INPUT", "WIN_OUTPUT", "MarketTerms", "WinModel", "best_bids",
           "bid_grid"]

TERMS = ("table", "columns", "starts", "k_range")
#: native (double) vs graph (float32): P(win) at each grid bid, and the best surplus relative to max(1, |s|)
NATIVE_TOLERANCE = 1e-5
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


@dataclass(frozen=True)
class MarketTerms:
    """The additive win-price model's parameters (``TERMS_FILE``): per imp-side single field its column in the
    spec's ``sparse`` input and its first row in ``table``; ``table`` [rows, 2] holds per value its term of
    ``mu`` and of ``k``; ``k_range`` = (min, max) clips ``k``."""
    table: np.ndarray    # float32 [rows, 2], C order
    columns: np.ndarray  # int64 [fields]
    starts: np.ndarray   # int64 [fields]
    k_range: tuple[float, float]

    @classmethod
    def load(cls, path: Path, spec: FeatureSpec) -> "MarketTerms":
        """Read and validate ``path``; BundleError naming what is wrong."""
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in TERMS if name in data.files}
        except (OSError, ValueError) as exc:
            raise BundleError(f"{path}: not readable as the market model's terms: {exc}") from None
        missing = [name for name in TERMS if name not in arrays]
        if missing:
            raise BundleError(f"{path}: has no {', '.join(missing)} (needs {', '.join(TERMS)})")
        table, columns, starts, k_range = (arrays[name] for name in TERMS)
        width = spec.input_width(SPARSE_INPUT)
        problem = None
        if table.dtype != np.float32 or table.ndim != 2 or table.shape[1] != 2 or not np.all(np.isfinite(table)):
            problem = f"table must be finite float32 [rows, 2], got {table.dtype} {list(table.shape)}"
        elif columns.dtype != np.int64 or columns.ndim != 1 or starts.shape != columns.shape or starts.dtype != np.int64:
            problem = "columns and starts must be int64 vectors of one length"
        elif len(columns) == 0 or columns.min() < 0 or columns.max() >= width:
            problem = f"columns must name columns of the {width}-wide {SPARSE_INPUT} input"
        elif starts.min() < 0 or any(starts[j] + spec.single_fields[c].buckets > len(table)
                                     for j, c in enumerate(columns)):
            problem = f"a field's rows run past the table's {len(table)} rows"
        elif k_range.shape != (2,) or not np.all(np.isfinite(k_range)) or not k_range[0] < k_range[1]:
            problem = "k_range must be two finite numbers, min < max"
        if problem:
            raise BundleError(f"{path}: {problem}")
        return cls(np.ascontiguousarray(table), np.ascontiguousarray(columns), np.ascontiguousarray(starts),
                   (float(k_range[0]), float(k_range[1])))


class WinModel:
    """The bid search for first-price imps: natively over the model's terms when the bundle has them, else
    through the win-price graph for up to ``max_imps`` imps per ORT call."""

    def __init__(self, path: str | Path, spec: FeatureSpec, max_imps: int = 64, terms: str | Path | None = None):
        if max_imps < 1:
            raise ValueError(f"max_imps must be >= 1, got {max_imps}")
        self.path = Path(path)
        try:
            self.session = ort.InferenceSession(self.path.read_bytes(), session_options(),
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types for unreadable graphs
            raise BundleError(f"{self.path}: ONNX Runtime cannot load it: {exc}") from None
        self._check_signature(spec)
        self.spec = spec
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
        self.terms = None if terms is None else MarketTerms.load(Path(terms), spec)
        self._search = (None if self.terms is None else
                        _shading.Search(self.terms.table, self.terms.columns, self.terms.starts, *self.terms.k_range, GRID))
        self._native = self._search  # the search in use: None while the graph searches
        self._consecutive = list(range(max_imps))  # rows 0..n-1 of ``inputs`` (``shade``)

    @property
    def native(self) -> bool:
        """True when bids are searched natively over the model's terms (no ORT call per batch)."""
        return self._native is not None

    @native.setter
    def native(self, on: bool) -> None:
        """Search natively (needs the terms) or through the graph: to compare the two in one process."""
        if on and self.terms is None:
            raise ValueError(f"{self.path}: the bundle has no {TERMS_FILE}: it can only be searched through the graph")
        self._native = self._search if on else None

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
    def for_scorer(cls, scorer: Any, max_imps: int = 64, native: bool = True) -> "WinModel | None":
        """The win-price model ``scorer``'s bundle lists under meta.json's ``graphs.market``; None without one.

        ``scorer.opened`` (``bidder.bundle.Bundle``) has checked the files against their digests; the model must
        pass ``check``. ``native=False`` searches with the graph even when the bundle has the terms (to compare).
        """
        entry = scorer.opened.graph(MARKET_GRAPH)
        if entry is None:
            return None
        path = scorer.opened.file(MARKET_FILE)
        terms = scorer.opened.file(TERMS_FILE) if native and entry.get("terms") is not None else None
        model = cls(path, scorer.spec, max_imps=max_imps, terms=terms)
        model.check(scorer.featurizer)
        return model

    def check(self, featurizer: Any, rows: int = 256, seed: int = 0) -> None:
        """The graph on a few records over a wide grid: P(win) finite, in [0, 1], non-decreasing in the bid; the
        bid the grid point of highest surplus, between floor and value. With the terms, the native search
        against the graph on ``rows`` random imps: P(win) at every grid bid and the best surplus within
        ``NATIVE_TOLERANCE``."""
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
        if self._search is not None:
            diff = self.native_difference(rows, seed)
            if not diff <= NATIVE_TOLERANCE:
                raise BundleError(f"{self.path}: the terms in {TERMS_FILE} differ from the graph by {diff:.3g} "
                                  f"(P(win) or best surplus; tolerance {NATIVE_TOLERANCE:g})")

    def native_difference(self, rows: int = 256, seed: int = 0) -> float:
        """Largest difference between the native search and the graph on ``rows`` random imps, values
        0.05-500 and floors 0-90 % of them: |Δ P(win)| at every grid bid, and |Δ best surplus| / max(1, |s|)."""
        from bidder.factorized import random_inputs  # the factorized parity's random valid rows

        rng = np.random.default_rng(seed)
        sparse = np.ascontiguousarray(random_inputs(self.spec, rows, rng)[SPARSE_INPUT])
        values = np.exp(rng.uniform(math.log(0.05), math.log(500.0), rows))
        floors = values * rng.uniform(0.0, 0.9, rows) * (rng.random(rows) < 0.8)
        graph_win, graph_surplus = self.session.run([WIN_OUTPUT, SURPLUS_OUTPUT], {
            SPARSE_INPUT: sparse, VALUE_INPUT: values.astype(np.float32).reshape(-1, 1),
            FLOOR_INPUT: floors.astype(np.float32).reshape(-1, 1)})
        _, surplus, win = self._search.search(sparse, values, floors)
        graph_surplus = graph_surplus[:, 0].astype(np.float64)
        return max(float(np.max(np.abs(win - graph_win))),
                   float(np.max(np.abs(surplus - graph_surplus) / np.maximum(1.0, np.abs(graph_surplus)))))

    def _run(self, n: int) -> dict[str, np.ndarray]:
        bound = self._bindings.get(n)
        if bound is None:
            bound = self._bindings[n] = bind_buffers(
                self.session, {SPARSE_INPUT: self.inputs[SPARSE_INPUT][:n], VALUE_INPUT: self.value[:n],
                               FLOOR_INPUT: self.floor[:n]},
                {name: buffer[:n] for name, buffer in self.outputs.items()})
        run_binding(self.session, bound[0])
        return self.outputs

    def shade(self, featurizer: Any, records: Sequence[dict], values: Sequence[float],
              floors: Sequence[float]) -> tuple[list[float], list[float]]:
        """(bid, expected surplus) per imp record: one search per ``max_imps`` imps."""
        return self._shade(len(records), values, floors,
                           lambda start, stop: featurizer.transform_into(self.inputs, records[start:stop]))

    def shade_rows(self, sparse: np.ndarray, rows: Sequence[int], values: Sequence[float],
                   floors: Sequence[float]) -> tuple[list[float], list[float]]:
        """``shade`` for imps featurized already: imp ``i``'s features are row ``rows[i]`` of ``sparse`` (the
        spec's ``sparse`` input, as the factorized graph's imp inputs hold a batch's imps)."""
        if self._native is not None:  # the search reads the rows where they are
            return self._native.shade(sparse, list(rows), list(values), list(floors))
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
        if self._native is not None:
            sparse = np.ascontiguousarray(sparse, dtype=np.int64)
            return self._native.shade(sparse, list(range(len(sparse))), list(values), list(floors))

        def fill(start: int, stop: int) -> int:
            self.inputs[SPARSE_INPUT][:stop - start] = sparse[start:stop]
            return stop - start
        return self._shade(len(sparse), values, floors, fill)

    def _shade(self, n: int, values: Sequence[float], floors: Sequence[float],
               fill: Any) -> tuple[list[float], list[float]]:
        bids: list[float] = []
        surplus: list[float] = []
        for start in range(0, n, self.max_imps):
            stop = min(n, start + self.max_imps)
            rows = fill(start, stop)
            if self._native is not None:
                got = self._native.shade(self.inputs[SPARSE_INPUT], self._consecutive[:rows], list(values[start:stop]),
                                         list(floors[start:stop]))
                bids += got[0]
                surplus += got[1]
                continue
            self._values[:rows] = values[start:stop]
            self._floors[:rows] = floors[start:stop]
            self._run(rows)
            if n <= self.max_imps:  # one call: no list concatenation
                return self._bids[:rows].tolist(), self._surplus[:rows].tolist()
            bids += self._bids[:rows].tolist()
            surplus += self._surplus[:rows].tolist()
        return bids, surplus


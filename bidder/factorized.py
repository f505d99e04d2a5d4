"""Factorized DeepFM scoring: the imp's part once per imp, each candidate's part once per catalog load.

A bid request is one imp scored against K candidate creatives, and DeepFM separates exactly along
that line. With the fields split into an imp side I and a candidate side C (``candidate_fields``),
the logit of a row is::

    linear_I + linear_C + bias                                    (linear terms)
  + 0.5 * (|s_I + s_C|^2 - q_I - q_C)                             (FM; s = sum of field vectors,
                                                                   q = sum of their squares)
  + DNN(relu(W_I e_I + W_C e_C + b1))                             (first layer split by columns)

so each side reduces to one vector of width D, laid out as ``[h (H1) | scalar (1) | -scalar (1) | s (dim)]``
with ``h = W_side e_side`` (the candidate side also carries b1), ``scalar = a * (linear_side - 0.5 *
q_side)`` (the candidate side also carries ``a * output bias + b``; ``a, b`` the calibration's scale and
shift, 1 and 0 without one) and ``s`` the side's FM sum. A row adds its imp's and its candidate's vectors,
S = A + B, and runs the DNN from the second layer on over ``relu(S)``; each layer carries two more units,
``relu(scalar)`` and ``relu(-scalar)``, so that the output product adds ``relu(scalar) - relu(-scalar)``,
``a`` times the DNN's output and ``a / 2 * |S[s]|^2``: the calibrated logit, in one node.

Two graphs in the bundle, written by ``python -m train factorize`` (``train/factorize.py``):

- ``candidate.onnx``: the model's inputs (only candidate-field columns are read) -> ``cand_part``
  float32 ``[n, D]``; run once per catalog load (``FactorizedScorer.set_candidates``).
- ``factorized.onnx``: the model's inputs for ``n_imps`` imps (only imp-side columns are read),
  ``cand_part``, ``row_imp`` and ``row_cand`` (int64 ``[rows]``) -> ``ctr`` float32 ``[rows, 1]``,
  the canonical ``model.onnx``'s probability for imp ``row_imp[r]`` with candidate ``row_cand[r]``.

``model.onnx`` stays the contract: the export and the bundle load both compare the two graphs with
it on random valid index rows (``max_abs_diff``) and refuse a difference above 1e-6.

Serving runs ``factorized.onnx``'s arithmetic in C by default (``bidder/rowkernel.py``: the graph's own weights,
its shape checked node by node, and the results checked against ``model.onnx`` at load like the graph's), because
ONNX Runtime's cost per call, paid once per batch, is most of a small batch's scoring time in a busy worker;
``native=False`` (``bidder serve --graph-rows``) runs the graph through ONNX Runtime instead.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from bidder._features import Featurizer
from bidder.campaigns import CANDIDATE_FIELDS
from bidder.bundle import (CAND_PART, CANDIDATE_FILE, FACTORIZED_FILE, FACTORIZED_GRAPH as GRAPH, ROW_CAND, ROW_IMP,
                           Bundle, BundleError)
from bidder.rowkernel import RowKernel, Unsupported, read_kernel
from bidder.scorer import OUTPUT, bind_buffers, featurize_many, run_binding
from bidder.spec import SPARSE_INPUT, FeatureSpec

__all__ = ["CAND_PART", "CANDIDATE_FILE", "FACTORIZED_FILE", "GRAPH", "ROW_CAND", "ROW_IMP", "PARITY_TOLERANCE", "FactorizedScorer",
           "candidate_fields", "kernel_diff", "max_abs_diff", "parity_rows", "random_inputs"]

PARITY_TOLERANCE = 1e-6
PARITY_IMPS, PARITY_CANDIDATES = 64, 16
_GARBAGE = 1 << 40  # written into columns a graph must not read: an out-of-range index if it did


def candidate_fields(spec: FeatureSpec) -> tuple[str, ...]:
    """Names of the spec's fields a catalog candidate supplies (their ``source`` is a candidate key)."""
    return tuple(f.name for f in spec.fields if f.source in CANDIDATE_FIELDS)


# -- parity -----------------------------------------------------------------------------------------------
def random_inputs(spec: FeatureSpec, n: int, rng: np.random.Generator, missing: float = 0.1) -> dict[str, np.ndarray]:
    """``n`` rows of random valid indices: ``1 + randint(buckets - 1)``, 0 (missing) with probability
    ``missing``; multi fields hold a random number of tags (0 to max_len) followed by padding."""
    out = spec.allocate(n)
    if spec.single_fields:
        sparse = out[SPARSE_INPUT]
        for j, f in enumerate(spec.single_fields):
            sparse[:, j] = 1 + rng.integers(0, f.buckets - 1, size=n)
            sparse[rng.random(n) < missing, j] = 0
    for f in spec.multi_fields:
        tags = out[f.name]
        lengths = rng.integers(0, int(f.max_len) + 1, size=n)
        values = 1 + rng.integers(0, f.buckets - 1, size=tags.shape)
        tags[:] = np.where(np.arange(tags.shape[1]) < lengths[:, None], values, 0)
    return out


def _scramble(spec: FeatureSpec, inputs: dict[str, np.ndarray], fields: Sequence[str]) -> None:
    """Overwrite ``fields`` with out-of-range indices: a graph that claims not to read them must not."""
    singles = [f.name for f in spec.single_fields]
    for name in fields:
        if name in singles:
            inputs[SPARSE_INPUT][:, singles.index(name)] = _GARBAGE
        else:
            inputs[name][:] = _GARBAGE


def _combine(spec: FeatureSpec, imps: Mapping[str, np.ndarray], cands: Mapping[str, np.ndarray],
             row_imp: np.ndarray, row_cand: np.ndarray) -> dict[str, np.ndarray]:
    """The canonical model's input rows: imp ``row_imp[r]``'s fields with candidate ``row_cand[r]``'s."""
    cand = set(candidate_fields(spec))
    out = {}
    if spec.single_fields:
        columns = np.array([f.name in cand for f in spec.single_fields])
        out[SPARSE_INPUT] = np.where(columns, cands[SPARSE_INPUT][row_cand], imps[SPARSE_INPUT][row_imp])
    for f in spec.multi_fields:
        source, rows = (cands, row_cand) if f.name in cand else (imps, row_imp)
        out[f.name] = np.ascontiguousarray(source[f.name][rows])
    return out


def parity_rows(spec: FeatureSpec, rng: np.random.Generator, n_imps: int = PARITY_IMPS,
                n_candidates: int = PARITY_CANDIDATES) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    """Random imps and candidates and every pairing of them in random order, with some rows repeated.

    The columns each side must not read hold out-of-range indices. Returns (imps, candidates,
    row_imp, row_cand).
    """
    imps = random_inputs(spec, n_imps, rng)
    cands = random_inputs(spec, n_candidates, rng)
    cand = candidate_fields(spec)
    _scramble(spec, imps, cand)
    _scramble(spec, cands, [f.name for f in spec.fields if f.name not in cand])
    pairs = np.stack(np.meshgrid(np.arange(n_imps), np.arange(n_candidates), indexing="ij"), -1).reshape(-1, 2)
    pairs = np.concatenate([pairs, pairs[rng.integers(0, len(pairs), size=max(1, len(pairs) // 8))]])
    pairs = pairs[rng.permutation(len(pairs))]
    return imps, cands, np.ascontiguousarray(pairs[:, 0]), np.ascontiguousarray(pairs[:, 1])


def max_abs_diff(canonical: ort.InferenceSession, candidate: ort.InferenceSession, factorized: ort.InferenceSession,
                 spec: FeatureSpec, imps: Mapping[str, np.ndarray], cands: Mapping[str, np.ndarray],
                 row_imp: np.ndarray, row_cand: np.ndarray) -> float:
    """Max |factorized - canonical| (``session.run`` on each) over the rows (row_imp[r], row_cand[r])."""
    expected = canonical.run([OUTPUT], _combine(spec, imps, cands, row_imp, row_cand))[0]
    cand_part = candidate.run([CAND_PART], dict(cands))[0]
    got = factorized.run([OUTPUT], {**imps, CAND_PART: cand_part, ROW_IMP: row_imp.astype(np.int64),
                                    ROW_CAND: row_cand.astype(np.int64)})[0]
    return _worst(got, expected)


def _worst(got: np.ndarray, expected: np.ndarray) -> float:
    """Max |got - expected|; inf when the shapes differ or a value is not finite."""
    if got.shape != expected.shape:
        return float("inf")
    worst = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64)), initial=0.0))
    return worst if math.isfinite(worst) else float("inf")


def kernel_diff(canonical: ort.InferenceSession, candidate: ort.InferenceSession, kernel: RowKernel,
                spec: FeatureSpec, imps: Mapping[str, np.ndarray], cands: Mapping[str, np.ndarray],
                row_imp: np.ndarray, row_cand: np.ndarray) -> float:
    """Max |kernel - canonical| over the rows (row_imp[r], row_cand[r]); leaves ``kernel`` bound to copies of these
    arrays (bind it to its buffers again after)."""
    expected = canonical.run([OUTPUT], _combine(spec, imps, cands, row_imp, row_cand))[0]
    inputs = {name: np.ascontiguousarray(value, dtype=np.int64) for name, value in imps.items()}
    row_imp, row_cand = (np.ascontiguousarray(a, dtype=np.int64) for a in (row_imp, row_cand))
    got = np.zeros((len(row_imp), 1), dtype=np.float32)
    kernel.bind(inputs[SPARSE_INPUT], inputs, row_imp, row_cand, got)
    kernel.set_candidates(candidate.run([CAND_PART], dict(cands))[0])
    kernel.run(len(inputs[SPARSE_INPUT]), len(row_imp))
    return _worst(got, expected)


# -- serving ----------------------------------------------------------------------------------------------
class FactorizedScorer:
    """Scores imps × candidates with a bundle's factorized graphs: by the native row kernel over these buffers
    (``kernel``), or through ONNX Runtime's IO binding (``native=False``, or a graph the kernel does not compute).

    ``set_candidates`` computes every candidate's part once (at catalog load and reload). Per batch the
    caller featurizes imps into ``imp_inputs`` (``Featurizer.transform_into``; candidate columns may
    hold anything), writes each row's imp and candidate numbers into ``row_imp`` and ``row_cand`` and
    calls ``run(n_imps, rows)``. Buffers are allocated once; through ONNX Runtime, a binding over views of them
    is made per (n_imps, rows) the first time it is needed and kept (the ``max_bindings`` most recently used).
    """

    def __init__(self, bundle: str | os.PathLike | Bundle, spec: FeatureSpec, featurizer: Featurizer,
                 max_imps: int = 64, max_rows: int = 256, *, max_bindings: int = 256, native: bool = True):
        if max_imps < 1 or max_rows < 1 or max_bindings < 1:
            raise ValueError(f"max_imps, max_rows and max_bindings must be >= 1, got {max_imps}, {max_rows}, "
                             f"{max_bindings}")
        # the bundle as its Scorer opened and checked it, else opened (and checked) here
        self.opened = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        self.bundle = self.opened.path
        self.spec = spec
        self.featurizer = featurizer
        self.max_imps, self.max_rows, self.max_bindings = max_imps, max_rows, max_bindings
        entry = self.opened.graph(GRAPH)
        if entry is None:
            raise BundleError(f"{self.bundle}: meta.json lists no factorized graph (python -m train factorize)")
        fields = candidate_fields(spec)
        if list(entry.get("candidate_fields") or []) != list(fields):
            raise BundleError(f"{self.bundle}: factorized graphs were built with candidate fields "
                              f"{entry.get('candidate_fields')}, the spec's are {list(fields)}")
        self.candidate_session = self.opened.session(CANDIDATE_FILE)
        self.session = self.opened.session(FACTORIZED_FILE)
        self.width = self._check_signatures()
        self.imp_inputs = spec.allocate(max_imps)
        self.row_imp = np.zeros(max_rows, dtype=np.int64)
        self.row_cand = np.zeros(max_rows, dtype=np.int64)
        self.output = np.zeros((max_rows, 1), dtype=np.float32)
        self.cand_part: np.ndarray | None = None
        self._cand_value: ort.OrtValue | None = None
        self._bindings: OrderedDict[tuple[int, int], tuple[ort.IOBinding, list[ort.OrtValue]]] = OrderedDict()
        # the graph's arithmetic in C over the same buffers (None: ONNX Runtime runs it); why not, when it cannot
        self.kernel: RowKernel | None = None
        self.kernel_unsupported: str | None = None
        if native:
            try:
                self.kernel = self._bound(read_kernel(self.bundle / FACTORIZED_FILE))
            except Unsupported as exc:
                self.kernel_unsupported = str(exc)

    def _bound(self, kernel: RowKernel) -> RowKernel:
        """``kernel`` over this scorer's buffers, with its candidates' parts once they are set."""
        kernel.bind(self.imp_inputs[SPARSE_INPUT], self.imp_inputs, self.row_imp, self.row_cand, self.output)
        if self.cand_part is not None:
            kernel.set_candidates(self.cand_part)
        return kernel

    @classmethod
    def for_scorer(cls, scorer: Any, max_imps: int = 64, max_rows: int = 256, *, check: bool = True,
                   native: bool = True) -> "FactorizedScorer":
        """The factorized graphs of ``scorer``'s bundle (a ``bidder.scorer.Scorer``), checked against its model (and
        so is the native kernel, when it runs them)."""
        factorized = cls(scorer.opened, scorer.spec, scorer.featurizer, max_imps, max_rows, native=native)
        if check:
            factorized.check_parity(scorer)
        return factorized

    @property
    def n_candidates(self) -> int:
        return 0 if self.cand_part is None else len(self.cand_part)

    def _check_signatures(self) -> int:
        spec_inputs = {name: ["tensor(int64)", self.spec.input_width(name)] for name in self.spec.input_names}

        def signature(args: list) -> dict[str, list]:
            return {a.name: [a.type, a.shape[1] if len(a.shape) == 2 else None] for a in args}

        candidate, factorized = self.candidate_session, self.session
        outputs = signature(candidate.get_outputs())
        width = outputs.get(CAND_PART, [None, None])[1]
        if (signature(candidate.get_inputs()) != spec_inputs or list(outputs) != [CAND_PART]
                or outputs[CAND_PART][0] != "tensor(float)" or not isinstance(width, int)):
            raise BundleError(f"{self.bundle / CANDIDATE_FILE}: expected the model's inputs -> {CAND_PART} float32 "
                              f"[n, D], has {signature(candidate.get_inputs())} -> {outputs}")
        expected = {**spec_inputs, CAND_PART: ["tensor(float)", width]}
        got = signature(factorized.get_inputs())
        rows = {a.name: a for a in factorized.get_inputs() if a.name in (ROW_IMP, ROW_CAND)}
        fact_out = signature(factorized.get_outputs())
        if ({k: v for k, v in got.items() if k not in rows} != expected or len(rows) != 2
                or any(a.type != "tensor(int64)" or len(a.shape) != 1 for a in rows.values())
                or fact_out != {OUTPUT: ["tensor(float)", 1]}):
            raise BundleError(f"{self.bundle / FACTORIZED_FILE}: expected inputs {sorted(expected)} + "
                              f"{ROW_IMP}/{ROW_CAND} int64 [rows] -> {OUTPUT} float32 [rows, 1], has "
                              f"{ {a.name: (a.type, a.shape) for a in factorized.get_inputs()} } -> {fact_out}")
        return width

    # -- candidates -------------------------------------------------------------------------------------
    def set_candidates(self, layers: Sequence[Mapping[str, Any]]) -> None:
        """Compute the part of each candidate (a catalog ``layer`` dict); candidate i is ``row_cand`` value i."""
        inputs = featurize_many(self.featurizer, self.spec, layers)
        part = self.candidate_session.run([CAND_PART], inputs)[0]
        cand_part = np.ascontiguousarray(part, dtype=np.float32)
        # bindings hold the previous array's OrtValue: drop them before it can be freed
        self._bindings.clear()
        self.cand_part = cand_part
        self._cand_value = ort.OrtValue.ortvalue_from_numpy(cand_part)
        if self.kernel is not None:
            self.kernel.set_candidates(cand_part)

    # -- scoring ----------------------------------------------------------------------------------------
    def run(self, n_imps: int, rows: int) -> np.ndarray:
        """Probabilities of rows ``[0, rows)``, a view of the output buffer overwritten by the next call.

        Row r pairs imp ``row_imp[r]`` (a row of ``imp_inputs`` below ``n_imps``) with candidate
        ``row_cand[r]``; the native kernel (IndexError) and ONNX Runtime reject indices out of range.
        """
        if self.kernel is not None:  # it refuses to run before set_candidates, as _bind does
            self.kernel.run(n_imps, rows)
            return self.output[:rows, 0]
        key = (n_imps, rows)
        bound = self._bindings.get(key)
        if bound is None:
            if rows == 0:
                return self.output[:0, 0]
            bound = self._bind(n_imps, rows)
        else:
            self._bindings.move_to_end(key)
        run_binding(self.session, bound[0])
        return self.output[:rows, 0]

    def warm(self, n_imps: int, per_imp: int) -> None:
        """Bind and run the shape of ``n_imps`` imps of ``per_imp`` candidates each, so the first batch of that
        shape does not pay ONNX Runtime's first run at it (the rows pair each imp with candidate 0); nothing to do
        for the native kernel, which has no first run to pay."""
        if self.kernel is not None:
            return
        rows = n_imps * per_imp
        self.row_imp[:rows] = np.repeat(np.arange(n_imps), per_imp)
        self.row_cand[:rows] = 0
        self.run(n_imps, rows)

    def score_rows(self, batch: Any, start: int, stop: int) -> np.ndarray:
        """Probabilities of rows ``[start, stop)`` of ``batch`` (a ``bidder.batch.Batch`` whose imps are featurized
        into ``imp_inputs``), in calls of at most ``max_rows`` rows; a view overwritten by the next call when
        they fit one call."""
        if batch.features is not self.imp_inputs:
            raise ValueError("the batch's imps are featurized into another buffer than this scorer's imp inputs")
        n_imps, limit = batch.n_imps, self.max_rows
        if stop - start <= limit:
            n = stop - start
            self.row_imp[:n] = batch.row_imp[start:stop]
            self.row_cand[:n] = batch.row_cand[start:stop]
            return self.run(n_imps, n)
        out = np.empty(stop - start, dtype=np.float32)
        for first in range(start, stop, limit):
            n = min(limit, stop - first)
            self.row_imp[:n] = batch.row_imp[first:first + n]
            self.row_cand[:n] = batch.row_cand[first:first + n]
            out[first - start:first - start + n] = self.run(n_imps, n)
        return out

    def _bind(self, n_imps: int, rows: int) -> tuple[ort.IOBinding, list[ort.OrtValue]]:
        if self._cand_value is None:
            raise RuntimeError("no candidates: call set_candidates first")
        if not 1 <= n_imps <= self.max_imps or not 1 <= rows <= self.max_rows:
            raise ValueError(f"need 1 <= n_imps <= {self.max_imps} and 0 <= rows <= {self.max_rows}, "
                             f"got n_imps={n_imps}, rows={rows}")
        inputs = {CAND_PART: self._cand_value, **{n: b[:n_imps] for n, b in self.imp_inputs.items()},
                  ROW_IMP: self.row_imp[:rows], ROW_CAND: self.row_cand[:rows]}
        self._bindings[(n_imps, rows)] = bound = bind_buffers(self.session, inputs, {OUTPUT: self.output[:rows]})
        if len(self._bindings) > self.max_bindings:
            self._bindings.popitem(last=False)
        return bound

    # -- checking ---------------------------------------------------------------------------------------
    def check_parity(self, canonical: Any, rows: int = 1000, seed: int = 0) -> float:
        """Max |factorized - canonical| over at least ``rows`` random valid rows; ``BundleError`` above 1e-6.

        ``canonical`` is the bundle's ``model.onnx`` session or a ``Scorer`` holding it. Runs the graphs
        with ``session.run``: the buffers, bindings and candidates of this scorer are left alone.
        """
        session = getattr(canonical, "session", canonical)
        rng = np.random.default_rng(seed)
        n_imps = max(PARITY_IMPS, -(-rows // PARITY_CANDIDATES))
        imps, cands, row_imp, row_cand = parity_rows(self.spec, rng, n_imps, PARITY_CANDIDATES)
        diff = max_abs_diff(session, self.candidate_session, self.session, self.spec, imps, cands, row_imp, row_cand)
        if not diff <= PARITY_TOLERANCE:
            raise BundleError(f"{self.bundle}: factorized graphs differ from model.onnx by {diff:.3g} over "
                              f"{len(row_imp)} rows (tolerance {PARITY_TOLERANCE:g})")
        if self.kernel is not None:
            native = kernel_diff(session, self.candidate_session, self.kernel, self.spec, imps, cands, row_imp,
                                 row_cand)
            self._bound(self.kernel)  # its own buffers again (the check bound the kernel to the parity rows)
            if not native <= PARITY_TOLERANCE:
                raise BundleError(f"{self.bundle}: the native row kernel differs from model.onnx by {native:.3g} over "
                                  f"{len(row_imp)} rows (tolerance {PARITY_TOLERANCE:g}); bidder serve --graph-rows "
                                  f"runs factorized.onnx through ONNX Runtime instead")
            diff = max(diff, native)
        return diff

"""The two towers of retrieval: the bundle's ``imp_tower.onnx`` and ``ad_tower.onnx`` (``meta.json``'s
``graphs.twotower``, written by ``python -m train twotower``), their signatures and parity checked at load.

- ``imp_tower.onnx``: the model's inputs (only imp-side columns are read) -> ``imp_vec`` float32 ``[n, D]``:
  the trained ``[u, 1]`` scaled to unit length (which changes no ranking of an imp); run per imp through
  IO binding (``bidder.scorer.bind_buffers``).
- ``ad_tower.onnx``: the model's inputs (only candidate columns are read) -> ``ad_vec`` float32 ``[n, D]``,
  its last entry the creative's learnt bias; run once per catalog load (and reload). The bidder adds
  log(value per click) to that entry, so the product is the ranker's target, value included.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from bidder.bundle import AD_TOWER_FILE, IMP_TOWER_FILE, TWOTOWER_GRAPH as GRAPH, Bundle, BundleError
from bidder.campaigns import Candidate
from bidder.scorer import bind_buffers, featurize_many, run_binding
from bidder.spec import FeatureSpec

__all__ = ["AD_OUTPUT", "AD_TOWER_FILE", "GRAPH", "IMP_OUTPUT", "IMP_TOWER_FILE", "PARITY_TOLERANCE", "Towers"]

IMP_OUTPUT, AD_OUTPUT = "imp_vec", "ad_vec"
PARITY_TOLERANCE = 1e-6
#: bindings ``vectors_of`` keeps (per buffer and row range) before it starts afresh
MAX_VIEW_BINDINGS = 256


class Towers:
    """A bundle's imp and ad towers (ONNX Runtime sessions), their signatures and parity checked at load."""

    def __init__(self, bundle: str | os.PathLike | Bundle, spec: FeatureSpec, featurizer: Any, max_imps: int = 64):
        # the bundle as its Scorer opened and checked it, else opened (and checked) here
        self.opened = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        self.bundle = self.opened.path
        self.spec = spec
        self.featurizer = featurizer
        entry = self.opened.graph(GRAPH)
        if entry is None:
            raise BundleError(f"{self.bundle}: meta.json lists no two-tower graphs (python -m train twotower)")
        parity = entry.get("parity") or {}
        for name in ("imp_tower", "ad_tower"):
            figure = parity.get(name)
            if not isinstance(figure, (int, float)) or not figure <= PARITY_TOLERANCE:
                raise BundleError(f"{self.bundle}: meta.json twotower parity {name} is {figure!r}, needs a figure "
                                  f"<= {PARITY_TOLERANCE:g} (the export's check against the trained towers)")
        self.imp_session = self.opened.session(IMP_TOWER_FILE)
        self.ad_session = self.opened.session(AD_TOWER_FILE)
        self.dim = self._check(self.imp_session, IMP_TOWER_FILE, IMP_OUTPUT)
        if self._check(self.ad_session, AD_TOWER_FILE, AD_OUTPUT) != self.dim:
            raise BundleError(f"{self.bundle}: {IMP_TOWER_FILE} and {AD_TOWER_FILE} disagree on the vector width")
        self.max_imps = max_imps
        self.imp_inputs = spec.allocate(max_imps)
        self.imp_output = np.zeros((max_imps, self.dim), dtype=np.float32)
        self._views: dict[tuple[int, int, int], tuple[ort.IOBinding, list[ort.OrtValue]]] = {}  # ``vectors_of``

    def _check(self, session: ort.InferenceSession, name: str, output: str) -> int:
        """The graph's inputs are some of the spec's (int64 ``[n, width]``), its output float32 ``[n, D]``."""
        for arg in session.get_inputs():
            if (arg.name not in self.spec.input_names or arg.type != "tensor(int64)" or len(arg.shape) != 2
                    or arg.shape[1] != self.spec.input_width(arg.name)):
                raise BundleError(f"{self.bundle / name}: input {arg.name!r} {arg.type} {arg.shape} is not one of "
                                  f"spec.json's inputs {list(self.spec.input_names)}")
        outputs = session.get_outputs()
        if (len(outputs) != 1 or outputs[0].name != output or outputs[0].type != "tensor(float)"
                or len(outputs[0].shape) != 2 or not isinstance(outputs[0].shape[1], int)):
            raise BundleError(f"{self.bundle / name}: expected one output {output!r} float32 [n, D], has "
                              f"{[(o.name, o.type, o.shape) for o in outputs]}")
        return int(outputs[0].shape[1])

    def imp_vectors(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """``[n, D]``: the imp vectors of at most ``max_imps`` records, featurized into the towers' own buffer, a
        new array."""
        return self.vectors_of(self.imp_inputs, self.featurizer.transform_into(self.imp_inputs, records))

    def vectors_of(self, features: Mapping[str, np.ndarray], n: int) -> np.ndarray:
        """``[n, D]``: the imp vectors of rows ``[0, n)`` of ``features`` (the spec's inputs, featurized already:
        a batch's imps), one imp tower call per ``max_imps`` rows, bound over views of ``features`` (a binding per
        buffer and row range, kept: a worker's batches reuse one buffer), a new array."""
        out = np.empty((n, self.dim), dtype=np.float32)
        names = [a.name for a in self.imp_session.get_inputs()]
        for start in range(0, n, self.max_imps):
            stop = min(n, start + self.max_imps)
            key = (id(features[names[0]]), start, stop)  # the binding holds the buffer: its id is not reused
            bound = self._views.get(key)
            if bound is None:
                if len(self._views) >= MAX_VIEW_BINDINGS:
                    self._views.clear()
                bound = self._views[key] = bind_buffers(
                    self.imp_session, {name: features[name][start:stop] for name in names},
                    {IMP_OUTPUT: self.imp_output[:stop - start]})
            run_binding(self.imp_session, bound[0])
            out[start:stop] = self.imp_output[:stop - start]
        return out

    def ad_matrix(self, candidates: Sequence[Candidate]) -> np.ndarray:
        """``[n, D]`` float32: each candidate's ad vector, log(value per click) added to its last entry."""
        inputs = featurize_many(self.featurizer, self.spec, [c.layer for c in candidates])
        names = {a.name for a in self.ad_session.get_inputs()}
        matrix = self.ad_session.run([AD_OUTPUT], {k: v for k, v in inputs.items() if k in names})[0]
        matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        matrix[:, -1] += np.log(np.array([c.value_per_click for c in candidates], dtype=np.float64)).astype(np.float32)
        if not np.isfinite(matrix).all():
            raise BundleError(f"{self.bundle / AD_TOWER_FILE}: non-finite ad vectors for this catalog")
        return matrix

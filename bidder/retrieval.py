"""Retrieval for large catalogs: targeting filters, then the top K creatives by a two-tower inner product.

Scoring every eligible creative of a 100,000-creative catalog per imp costs the ranker ~100,000 rows.
A two-tower model (``train/twotower.py``) maps an imp to a vector ``q`` (the *imp tower*) and a creative
to a vector ``a`` (the *ad tower*) so that ``q · a`` ranks creatives by the ranker's log(pCTR × value per
click); the ranker then scores only the K best. Two graphs in the bundle, listed under ``meta.json``'s
``graphs.twotower`` with their parity figures:

- ``imp_tower.onnx``: the model's inputs (only imp-side columns are read) -> ``imp_vec`` float32 ``[n, D]``:
  the trained ``[u, 1]`` scaled to unit length (which changes no ranking of an imp); run per imp through
  IO binding (``bidder.scorer.bind_buffers``).
- ``ad_tower.onnx``: the model's inputs (only candidate columns are read) -> ``ad_vec`` float32 ``[n, D]``,
  its last entry the creative's learnt bias; run once per catalog load (and reload). The bidder adds
  log(value per click) to that entry, so the product is the ranker's target, value included.

``AdIndex`` holds that ad matrix split by creative size, and the targeting of each size as index
arrays (domain, exchange, advertiser domain), so filtering 100,000 creatives is a few numpy operations
per imp, not a Python loop. ``top_k`` is exact (BLAS products over the size's creatives, the
ineligible ones masked, ``argpartition``; rows are kept best ad bias first, so blocks whose bound cannot
reach the K-th score are skipped) or approximate (``AnnIndex``, an HNSW graph per size from faiss-cpu, an
optional dependency: ``pip install 'bidder[ann]'``).

Catalogs of at most ``SMALL_CATALOG`` creatives skip retrieval: every eligible creative is scored.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from bidder.campaigns import Candidate, Catalog
from bidder.scorer import BundleError, bind_buffers, load_graph, read_meta
from bidder.spec import FeatureSpec

__all__ = ["AD_OUTPUT", "AD_TOWER_FILE", "DEFAULT_K", "GRAPH", "IMP_OUTPUT", "IMP_TOWER_FILE", "PARITY_TOLERANCE",
           "SMALL_CATALOG", "AdIndex", "AnnIndex", "Retriever", "Towers", "ann_available", "needs_retrieval",
           "retriever_for", "towers_for"]

GRAPH = "twotower"  # its key under meta.json's "graphs"
IMP_TOWER_FILE, AD_TOWER_FILE = "imp_tower.onnx", "ad_tower.onnx"
IMP_OUTPUT, AD_OUTPUT = "imp_vec", "ad_vec"
PARITY_TOLERANCE = 1e-6
#: catalogs of at most this many creatives are scored exhaustively (a few hundred rows per imp at most)
SMALL_CATALOG = 1000
DEFAULT_K = 200
#: the approximate search asks the HNSW graph for this many times K, then applies the targeting filters
ANN_OVERFETCH = 2
#: exact search: rows scored before the first bound check (at least 8 K), and rows per bounded block
FIRST_ROWS, BLOCK = 2048, 512


def needs_retrieval(catalog: Catalog) -> bool:
    return len(catalog) > SMALL_CATALOG


def ann_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


# -- the towers ---------------------------------------------------------------------------------------------
class Towers:
    """A bundle's imp and ad towers (ONNX Runtime sessions), their signatures and parity checked at load."""

    def __init__(self, bundle: str | os.PathLike, spec: FeatureSpec, featurizer: Any, max_imps: int = 16):
        self.bundle = Path(bundle)
        self.spec = spec
        self.featurizer = featurizer
        entry = (read_meta(self.bundle).get("graphs") or {}).get(GRAPH)
        if not isinstance(entry, dict):
            raise BundleError(f"{self.bundle}: meta.json lists no two-tower graphs (python -m train twotower)")
        if entry.get("files") != [IMP_TOWER_FILE, AD_TOWER_FILE]:
            raise BundleError(f"{self.bundle}: meta.json twotower files {entry.get('files')}, expected "
                              f"{[IMP_TOWER_FILE, AD_TOWER_FILE]}")
        parity = entry.get("parity") or {}
        for name in ("imp_tower", "ad_tower"):
            figure = parity.get(name)
            if not isinstance(figure, (int, float)) or not figure <= PARITY_TOLERANCE:
                raise BundleError(f"{self.bundle}: meta.json twotower parity {name} is {figure!r}, needs a figure "
                                  f"<= {PARITY_TOLERANCE:g} (the export's check against the trained towers)")
        self.imp_session = self._load(IMP_TOWER_FILE)
        self.ad_session = self._load(AD_TOWER_FILE)
        self.dim = self._check(self.imp_session, IMP_TOWER_FILE, IMP_OUTPUT)
        if self._check(self.ad_session, AD_TOWER_FILE, AD_OUTPUT) != self.dim:
            raise BundleError(f"{self.bundle}: {IMP_TOWER_FILE} and {AD_TOWER_FILE} disagree on the vector width")
        self.max_imps = max_imps
        self.imp_inputs = spec.allocate(max_imps)
        self.imp_output = np.zeros((max_imps, self.dim), dtype=np.float32)
        self._bindings: dict[int, tuple[ort.IOBinding, list[ort.OrtValue]]] = {}

    def _load(self, name: str) -> ort.InferenceSession:
        return load_graph(self.bundle / name)

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
        """Imp vectors of at most ``max_imps`` records, a view of the output buffer (overwritten by the next call)."""
        n = self.featurizer.transform_into(self.imp_inputs, records)
        bound = self._bindings.get(n)
        if bound is None:
            if n == 0:
                return self.imp_output[:0]
            names = {a.name for a in self.imp_session.get_inputs()}
            bound = self._bindings[n] = bind_buffers(
                self.imp_session, {k: v[:n] for k, v in self.imp_inputs.items() if k in names},
                {IMP_OUTPUT: self.imp_output[:n]})
        self.imp_session.run_with_iobinding(bound[0])
        return self.imp_output[:n]

    def ad_matrix(self, candidates: Sequence[Candidate]) -> np.ndarray:
        """``[n, D]`` float32: each candidate's ad vector, log(value per click) added to its last entry."""
        inputs = self.spec.allocate(len(candidates))
        self.featurizer.transform_into(inputs, [c.layer for c in candidates])
        names = {a.name for a in self.ad_session.get_inputs()}
        matrix = self.ad_session.run([AD_OUTPUT], {k: v for k, v in inputs.items() if k in names})[0]
        matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        matrix[:, -1] += np.log(np.array([c.value_per_click for c in candidates], dtype=np.float64)).astype(np.float32)
        if not np.isfinite(matrix).all():
            raise BundleError(f"{self.bundle / AD_TOWER_FILE}: non-finite ad vectors for this catalog")
        return matrix


# -- the index ------------------------------------------------------------------------------------------------
class _SizeIndex:
    """The creatives of one size, best ad bias first: their ad vectors, their targeting as index arrays, and
    per block of rows the bounds that let an exact search skip blocks that cannot reach the top K."""

    __slots__ = ("positions", "matrix", "anywhere_domain", "by_domain", "anywhere_exchange", "by_exchange",
                 "by_adomain", "open", "ann", "block_bias", "block_norm")

    def __init__(self, candidates: Sequence[Candidate], matrix: np.ndarray):
        positions = np.array([c.index for c in candidates], dtype=np.int64)
        order = np.argsort(-matrix[positions, -1], kind="stable")  # by bias (+ log value), best first
        candidates = [candidates[i] for i in order.tolist()]
        self.positions = positions[order]  # catalog index of each row
        self.matrix = np.ascontiguousarray(matrix[self.positions])
        self.anywhere_domain = np.array([c.domains is None for c in candidates])
        self.anywhere_exchange = np.array([c.exchanges is None for c in candidates])
        self.by_domain = _rows_by(candidates, lambda c: c.domains or ())
        self.by_exchange = _rows_by(candidates, lambda c: c.exchanges or ())
        self.by_adomain = _rows_by(candidates, lambda c: c.adomain)
        self.open = bool(self.anywhere_domain.all() and self.anywhere_exchange.all())
        self.ann: AnnIndex | None = None
        # row r scores q·a_r = q_last·bias_r + q_rest·rest_r <= q_last·bias_r + |q_rest|·|rest_r|: per block the
        # largest bias (its first row) and the largest |rest| of it and every later block (so bounds only fall)
        starts = np.arange(0, len(self.matrix), BLOCK)
        self.block_bias = self.matrix[starts, -1].astype(np.float64) if len(starts) else np.zeros(0)
        norms = np.linalg.norm(self.matrix[:, :-1].astype(np.float64), axis=1)
        block_norm = np.maximum.reduceat(norms, starts) if len(starts) else np.zeros(0)
        self.block_norm = np.maximum.accumulate(block_norm[::-1])[::-1]

    def scores(self, query: np.ndarray, mask: np.ndarray | None, k: int) -> tuple[np.ndarray, int]:
        """Scores of rows ``[0, n)`` (ineligible ones -inf), n covering every row that can be in the top ``k``.

        Rows come best bias first, so after the first rows' k-th best eligible score every block whose bound
        falls below it is skipped (with the imp tower's unit vectors, whose last entry is positive).
        """
        total = len(self.matrix)
        first = min(total, max(FIRST_ROWS, 8 * k))
        scores = self._masked(query, mask, 0, first)
        last = float(query[-1])
        if first == total or last <= 0.0:
            return (scores if first == total else self._masked(query, mask, 0, total)), total
        eligible = scores[scores > -np.inf]
        if len(eligible) < k:
            return self._masked(query, mask, 0, total), total
        kth = float(np.partition(eligible, len(eligible) - k)[len(eligible) - k])
        bounds = last * self.block_bias + float(np.linalg.norm(query[:-1])) * self.block_norm  # non-increasing
        stop = int(np.searchsorted(-bounds, -kth, side="right")) * BLOCK  # the first block whose bound < kth
        if stop <= first:
            return scores, first
        stop = min(stop, total)
        return np.concatenate([scores, self._masked(query, mask, first, stop)]), stop

    def _masked(self, query: np.ndarray, mask: np.ndarray | None, start: int, stop: int) -> np.ndarray:
        scores = self.matrix[start:stop] @ query
        if mask is not None:
            scores[~mask[start:stop]] = -np.inf
        return scores

    def mask(self, domain: str | None, exchange: str | None, blocked: frozenset[str]) -> np.ndarray | None:
        """Which rows may run on ``domain`` via ``exchange`` without a blocked advertiser; None: all of them."""
        if self.open and not blocked:
            return None
        ok = self.anywhere_domain.copy()
        rows = self.by_domain.get(domain)
        if rows is not None:
            ok[rows] = True
        if not self.anywhere_exchange.all():
            exchange_ok = self.anywhere_exchange.copy()
            rows = self.by_exchange.get(exchange)
            if rows is not None:
                exchange_ok[rows] = True
            ok &= exchange_ok
        for adomain in blocked:
            rows = self.by_adomain.get(adomain)
            if rows is not None:
                ok[rows] = False
        return ok


def _rows_by(candidates: Sequence[Candidate], keys) -> dict[str, np.ndarray]:
    rows: dict[str, list[int]] = {}
    for i, c in enumerate(candidates):
        for key in keys(c):
            rows.setdefault(key, []).append(i)
    return {key: np.array(r, dtype=np.int64) for key, r in rows.items()}


class AnnIndex:
    """An HNSW graph (faiss) over one size's ad vectors, for the largest inner products.

    HNSW searches a metric space, and the inner product is not a metric: ads with long vectors hide behind
    short ones (measured: 0.45 recall at K = 200 on the 100k catalog's 300x250 creatives with faiss's
    inner-product HNSW). The usual reduction makes it one: each ad gets an extra entry
    ``sqrt(R^2 - |a|^2)`` (R the largest norm) so every ad has length R, the query gets 0, and then
    ``|q - a|^2 = |q|^2 + R^2 - 2 q·a``: the nearest ads in L2 are those with the largest products.
    """

    def __init__(self, matrix: np.ndarray, m: int = 32, ef_construction: int = 80, ef_search: int = 128):
        import faiss

        faiss.omp_set_num_threads(1)
        norms = np.linalg.norm(matrix.astype(np.float64), axis=1)
        extra = np.sqrt(np.maximum(norms.max(initial=0.0) ** 2 - norms ** 2, 0.0))
        self.index = faiss.IndexHNSWFlat(matrix.shape[1] + 1, m)
        self.index.hnsw.efConstruction = ef_construction
        self.index.hnsw.efSearch = ef_search
        self.index.add(np.ascontiguousarray(np.hstack([matrix, extra[:, None]]), dtype=np.float32))
        self.ef_search = ef_search
        self._query = np.zeros((1, matrix.shape[1] + 1), dtype=np.float32)

    def search(self, query: np.ndarray, k: int) -> np.ndarray:
        """Rows of the (about) ``k`` largest inner products, best first."""
        self.index.hnsw.efSearch = max(self.ef_search, k)
        self._query[0, :-1] = query
        _, rows = self.index.search(self._query, k)
        rows = rows[0]
        return rows[rows >= 0]


class AdIndex:
    """A catalog's ad matrix, by creative size, with its targeting: top K eligible creatives per imp vector."""

    def __init__(self, catalog: Catalog, matrix: np.ndarray, ann: bool = False):
        if matrix.shape[0] != len(catalog):
            raise ValueError(f"ad matrix has {matrix.shape[0]} rows for {len(catalog)} creatives")
        self.catalog = catalog
        self.matrix = matrix
        self.sizes = {size: _SizeIndex(catalog.for_size(*size), matrix) for size in catalog.sizes}
        if ann:
            for part in self.sizes.values():
                part.ann = AnnIndex(part.matrix)

    def top_k(self, query: np.ndarray, w: int, h: int, domain: str | None, exchange: str | None,
              blocked: frozenset[str], k: int, approximate: bool = False) -> np.ndarray:
        """Catalog indices of the (at most) ``k`` eligible creatives of size ``w``x``h`` with the largest
        ``query · ad vector``, best first; exact unless ``approximate`` (and an ANN index was built)."""
        part = self.sizes.get((w, h))
        if part is None:
            return np.zeros(0, dtype=np.int64)
        mask = part.mask(domain, exchange, blocked)
        if approximate and part.ann is not None:
            found = self._approximate(part, query, mask, k)
            if found is not None:
                return part.positions[found]
        if mask is not None:
            eligible = int(np.count_nonzero(mask))
            if eligible == 0:
                return np.zeros(0, dtype=np.int64)
            k = min(k, eligible)
        scores, n = part.scores(query, mask, k)
        k = min(k, n)
        rows = np.argpartition(scores, n - k)[n - k:] if k < n else np.arange(n)
        rows = rows[np.argsort(-scores[rows], kind="stable")]
        return part.positions[rows]

    @staticmethod
    def _approximate(part: _SizeIndex, query: np.ndarray, mask: np.ndarray | None, k: int) -> np.ndarray | None:
        """HNSW rows, filtered; None when fewer than ``k`` eligible ones came back (the caller goes exact)."""
        n = len(part.positions)
        if mask is None:
            return part.ann.search(query, min(k, n))
        rows = part.ann.search(query, min(n, k * ANN_OVERFETCH))
        rows = rows[mask[rows]]
        if len(rows) >= k:
            return rows[:k]
        return None if len(rows) < min(k, int(np.count_nonzero(mask))) else rows


# -- what the engine calls ------------------------------------------------------------------------------------
class Retriever:
    """Top-K retrieval for one catalog: the imp tower per imp, the ad index built at load."""

    def __init__(self, towers: Towers, catalog: Catalog, k: int = DEFAULT_K, approximate: bool = False,
                 index: AdIndex | None = None):
        """``index``: the catalog's ``AdIndex`` when already built (else computed here from the ad tower)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.towers = towers
        self.k = k
        self.approximate = approximate
        self.index = index or AdIndex(catalog, towers.ad_matrix(catalog.candidates), ann=approximate)
        self.catalog = catalog

    def query(self, record: Mapping[str, Any]) -> np.ndarray:
        """The imp vector of one imp record (a copy: the tower's buffer is reused)."""
        return self.towers.imp_vectors((record,))[0].copy()

    def eligible(self, query: np.ndarray, w: int, h: int, domain: str | None, exchange: str | None,
                 blocked: frozenset[str], dealids: Sequence[str] = ()) -> tuple[Candidate, ...]:
        """The top K eligible candidates of size ``w``x``h`` for the imp of ``query``, best first, then the
        eligible buyers of the imp's deals (``dealids``) the K left out: a deal is a negotiated buy, which
        an inner product must not drop (in a private auction it is the only way to bid)."""
        rows = self.index.top_k(query, w, h, domain, exchange, blocked, self.k, self.approximate).tolist()
        candidates = self.catalog.candidates
        chosen = [candidates[i] for i in rows]
        if dealids:
            taken = set(rows)
            chosen.extend(c for c in self.catalog.deal_buyers(w, h, dealids, domain, exchange, blocked)
                          if c.index not in taken)
        return tuple(chosen)



def towers_for(scorer: Any, catalog: Catalog, approximate: bool = False) -> Towers:
    """The towers of ``scorer``'s bundle (a ``bidder.scorer.Scorer``) for a large catalog, or a ``BundleError``
    saying what to do."""
    if approximate and not ann_available():
        raise BundleError("--ann: approximate retrieval needs faiss-cpu (pip install 'bidder[ann]')")
    try:
        return Towers(scorer.bundle, scorer.spec, scorer.featurizer)
    except BundleError as exc:
        raise BundleError(f"{catalog.source}: {len(catalog):,} creatives (more than {SMALL_CATALOG:,}) need retrieval, "
                          f"and {exc}; add the towers with python -m train twotower --data DIR --bundle "
                          f"{scorer.bundle}, or serve with --no-retrieval to score every eligible creative") from None


def retriever_for(scorer: Any, catalog: Catalog, k: int = DEFAULT_K, approximate: bool = False,
                  enabled: bool = True) -> Retriever | None:
    """The retriever ``catalog`` needs with ``scorer``'s bundle; None for a small catalog or when not ``enabled``
    (then every eligible creative is scored)."""
    if not enabled or not needs_retrieval(catalog):
        return None
    return Retriever(towers_for(scorer, catalog, approximate), catalog, k, approximate)

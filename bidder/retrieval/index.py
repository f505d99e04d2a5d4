"""The exact and approximate top K over a catalog's ad vectors, with its targeting (``AdIndex``).

``AdIndex`` holds the ad matrix split by creative size, each size laid out so that an imp's eligible
creatives are contiguous runs (the untargeted ones, those of its exchange) plus a gather of its domain's
rows: filtering 100,000 creatives is a few slices, no mask and no Python loop. ``top_k`` is exact (BLAS
products over those runs, best ad bias first, so blocks whose bound cannot reach the K-th score are
skipped; ``argpartition``) or approximate (``AnnIndex``, an HNSW graph per size from faiss-cpu, an
optional dependency: ``pip install 'bidder[ann]'``).
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from bidder.campaigns import Candidate, Catalog

__all__ = ["ANN_OVERFETCH", "BLOCK", "FIRST_ROWS", "AdIndex", "AnnIndex", "ann_available"]

#: the approximate search asks the HNSW graph for this many times K, then applies the targeting filters
ANN_OVERFETCH = 2
#: exact search: open rows scored before the first bound check (at least 2 K), and rows per bounded block
FIRST_ROWS, BLOCK = 512, 256
#: bounds are compared with the k-th score less this share of it (float32 products round; a bound must not)
_MARGIN = 1e-4


def ann_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class _Run:
    """A contiguous run of rows, best ad bias first, searched by blocks: per block its bias range and its own
    largest |rest|, so blocks whose bound cannot reach the k-th best score are not scored."""

    __slots__ = ("start", "stop", "bias_hi", "bias_lo", "norm")

    def __init__(self, start: int, stop: int, bias: np.ndarray, rest_norm: np.ndarray):
        self.start, self.stop = start, stop
        starts = np.arange(start, stop, BLOCK)
        self.bias_hi = bias[starts]
        self.bias_lo = bias[np.minimum(starts + BLOCK, stop) - 1]
        self.norm = np.maximum.reduceat(rest_norm[start:stop], starts - start) if stop > start else np.zeros(0)

    def reach(self, last: np.ndarray, rest: np.ndarray, kth: np.ndarray, skip: int) -> tuple[int, int]:
        """The rows, after the first ``skip`` blocks, from the first to the last block whose bound reaches the
        k-th score ``kth`` of some imp (per imp: its query's ``last`` entry and the norm of the ``rest``); one
        product over the few blocks between them costs less than a call per block."""
        hi, lo, norm = self.bias_hi[skip:], self.bias_lo[skip:], self.norm[skip:]
        blocks = None
        for j in range(len(kth)):
            bounds = last[j] * (hi if last[j] >= 0.0 else lo) + rest[j] * norm
            reached = bounds >= kth[j] - _MARGIN * (1.0 + abs(kth[j]))
            blocks = reached if blocks is None else blocks | reached
        blocks = np.flatnonzero(blocks)
        if not len(blocks):
            return self.start, self.start
        return (self.start + (skip + int(blocks[0])) * BLOCK,
                min(self.start + (skip + int(blocks[-1]) + 1) * BLOCK, self.stop))


class _SizeIndex:
    """The creatives of one size laid out for the exact top K, as contiguous runs each best ad bias first:

    - the *open* creatives (no domain or exchange targeting: eligible on every imp but a blocked advertiser's);
    - per exchange, the creatives targeted at exchanges only that run there (one on two exchanges is in both runs);
    - the domain-targeted creatives, found per imp through an index by domain.

    An imp's candidates are thus the open run, its exchange's run and a gather of its domain's rows: no mask
    over the whole size. Runs are searched in blocks of ``BLOCK`` rows: the first ``FIRST_ROWS`` (at least 2 K)
    give a k-th best score, and a later block is scored only if its bound (bias part + |query rest| × its
    largest |rest|) reaches it. Ad vectors are kept column-major (one BLAS product per run of rows) and
    row-major (gathers, the approximate search's graph).
    """

    __slots__ = ("positions", "rows", "matrix", "columns", "bias", "rest_norm", "open_run", "exchange_runs", "n_plain",
                 "by_domain", "domain_exchanges", "by_adomain", "ann", "row_of")

    def __init__(self, candidates: Sequence[Candidate], matrix: np.ndarray):
        def by_bias(group: list[Candidate]) -> list[Candidate]:
            return sorted(group, key=lambda c: -float(matrix[c.index, -1]))  # bias (+ log value), best first

        layout = by_bias([c for c in candidates if c.domains is None and c.exchanges is None])
        runs = [(None, 0, len(layout))]
        for exchange in sorted({e for c in candidates if c.domains is None and c.exchanges for e in c.exchanges}):
            start = len(layout)
            layout += by_bias([c for c in candidates if c.domains is None and c.exchanges and exchange in c.exchanges])
            runs.append((exchange, start, len(layout)))
        self.n_plain = len(layout)  # rows before the domain-targeted ones
        domain_targeted = by_bias([c for c in candidates if c.domains is not None])
        layout += domain_targeted
        self.positions = np.array([c.index for c in layout], dtype=np.int64)  # catalog index of each row
        self.rows = np.arange(len(layout))  # read-only: a run's rows are a view of it, not a new range per search
        self.rows.flags.writeable = False
        self.matrix = np.ascontiguousarray(matrix[self.positions]) if len(layout) else np.zeros((0, matrix.shape[1]),
                                                                                                 np.float32)
        self.columns = np.ascontiguousarray(self.matrix.T)
        self.bias = self.matrix[:, -1].astype(np.float64)
        self.rest_norm = np.linalg.norm(self.matrix[:, :-1].astype(np.float64), axis=1)
        made = {exchange: _Run(start, stop, self.bias, self.rest_norm) for exchange, start, stop in runs}
        self.open_run = made.pop(None)
        self.exchange_runs = made
        rows = range(self.n_plain, len(layout))
        self.by_domain = _rows_by(zip(rows, domain_targeted), lambda c: c.domains)
        self.domain_exchanges = {row: c.exchanges for row, c in zip(rows, domain_targeted) if c.exchanges is not None}
        self.by_adomain = _rows_by(enumerate(layout), lambda c: c.adomain)
        self.row_of = {c.index: row for row, c in enumerate(layout)}  # catalog index -> row (excluded creatives)
        self.ann: AnnIndex | None = None

    def search(self, query: np.ndarray, domain: str | None, exchange: str | None, blocked: frozenset[str],
               k: int, excluded: frozenset[int] = frozenset()) -> tuple[np.ndarray, int]:
        """Rows of the (at most) ``k`` eligible creatives with the largest ``query · ad vector``, best first, and
        how many rows were scored (the others could not reach the top ``k``); ``excluded``: catalog indices the
        request's blocking rules exclude (``bidder.conformance``)."""
        blocked_rows = self._blocked(blocked, excluded)
        last, rest = float(query[-1]), float(np.linalg.norm(query[:-1]))
        scores: list[np.ndarray] = []
        rows: list[np.ndarray] = []
        kth = -np.inf
        runs = [self.open_run]
        if exchange in self.exchange_runs:
            runs.append(self.exchange_runs[exchange])
        for run in runs:
            if run.stop == run.start:
                continue
            first = run.start
            if kth == -np.inf:  # no k-th score yet: this run's first blocks give one
                first = min(run.stop, run.start + max(FIRST_ROWS, -(-2 * k // BLOCK) * BLOCK))
                self._score(query[None, :], run.start, first, [blocked_rows], scores, rows)
            if kth == -np.inf and scores:
                head = scores[0][0] if len(scores) == 1 else np.concatenate([part[0] for part in scores])
                if len(head) >= k:
                    kth = float(np.partition(head, len(head) - k)[len(head) - k])
            if first < run.stop:
                start, stop = ((first, run.stop) if kth == -np.inf
                               else run.reach((last,), (rest,), (kth,), (first - run.start) // BLOCK))
                if stop > start:
                    self._score(query[None, :], start, stop, [blocked_rows], scores, rows)
        return self._finish(query, last, rest, kth, domain, exchange, blocked_rows, [part[0] for part in scores],
                            rows, k)

    def search_many(self, queries: np.ndarray,
                    wheres: Sequence[tuple[str | None, str | None, frozenset[str], frozenset[int]]],
                    k: int) -> list[tuple[np.ndarray, int]]:
        """``search`` for the imps of a batch (``queries[j]`` on ``wheres[j]``: domain, exchange, blocked, excluded):
        the imps on one exchange share each product over a run, so its rows are read once for all of them."""
        out: list[tuple[np.ndarray, int]] = [(np.zeros(0, dtype=np.int64), 0)] * len(wheres)
        groups: dict[str | None, list[int]] = {}
        for j, (_, exchange, _, _) in enumerate(wheres):
            groups.setdefault(exchange if exchange in self.exchange_runs else None, []).append(j)
        for exchange, members in groups.items():
            if len(members) == 1:  # alone: the one-query search has less to do per call
                domain, exchange_of, blocked, excluded = wheres[members[0]]
                out[members[0]] = self.search(queries[members[0]], domain, exchange_of, blocked, k, excluded)
                continue
            runs = [self.open_run] + ([self.exchange_runs[exchange]] if exchange is not None else [])
            found = self._search_group(queries[members], [wheres[j] for j in members], runs, k)
            for j, result in zip(members, found):
                out[j] = result
        return out

    def _search_group(self, queries: np.ndarray,
                      wheres: Sequence[tuple[str | None, str | None, frozenset[str], frozenset[int]]],
                      runs: list[_Run], k: int) -> list[tuple[np.ndarray, int]]:
        """Imps that share ``runs``: one product per run of rows for all of them (rows past an imp's own bounds
        are scored exactly too, which changes nothing), then per imp its domain's rows and its top ``k``."""
        blocked_rows = [self._blocked(blocked, excluded) for _, _, blocked, excluded in wheres]
        last = queries[:, -1].astype(np.float64)
        rest = np.linalg.norm(queries[:, :-1].astype(np.float64), axis=1)
        scores: list[np.ndarray] = []  # [imps, rows] each
        rows: list[np.ndarray] = []
        kth = np.full(len(queries), -np.inf)  # per imp, a k-th best score so far: a lower bound on its top k's
        for run in runs:
            if run.stop == run.start:
                continue
            first = run.start
            if np.isneginf(kth).any():  # no k-th score yet: this run's first blocks give one
                first = min(run.stop, run.start + max(FIRST_ROWS, -(-2 * k // BLOCK) * BLOCK))
                self._score(queries, run.start, first, blocked_rows, scores, rows)
                head = scores[0] if len(scores) == 1 else np.concatenate(scores, axis=1)
                if head.shape[1] >= k:
                    kth = np.maximum(kth, np.partition(head, head.shape[1] - k, axis=1)[:, head.shape[1] - k])
            if first < run.stop:
                start, stop = ((first, run.stop) if np.isneginf(kth).any()
                               else run.reach(last, rest, kth, (first - run.start) // BLOCK))
                if stop > start:
                    self._score(queries, start, stop, blocked_rows, scores, rows)
        return [self._finish(queries[j], last[j], rest[j], float(kth[j]), domain, exchange, blocked_rows[j],
                             [part[j] for part in scores], rows, k)
                for j, (domain, exchange, _, _) in enumerate(wheres)]

    def _finish(self, query: np.ndarray, last: float, rest: float, kth: float, domain: str | None,
                exchange: str | None, blocked_rows: np.ndarray | None, scores: list[np.ndarray],
                rows: list[np.ndarray], k: int) -> tuple[np.ndarray, int]:
        """Add the imp's domain-targeted rows to the runs' ``scores`` (of ``rows``) and take its top ``k``."""
        domain_rows = self._domain_rows(domain, exchange, blocked_rows)
        if len(domain_rows) and kth > -np.inf:  # only rows whose own bound reaches the k-th best so far
            bound = last * self.bias[domain_rows] + rest * self.rest_norm[domain_rows]
            domain_rows = domain_rows[bound >= kth - _MARGIN * (1.0 + abs(kth))]
        if len(domain_rows):
            scores = [*scores, self.matrix[domain_rows] @ query]
            rows = [*rows, domain_rows]
        if not scores:
            return np.zeros(0, dtype=np.int64), 0
        score = scores[0] if len(scores) == 1 else np.concatenate(scores)
        row = rows[0] if len(rows) == 1 else np.concatenate(rows)
        keep = np.flatnonzero(score >= kth) if kth > -np.inf else np.flatnonzero(score > -np.inf)
        if len(keep) > k:
            keep = keep[np.argpartition(score[keep], len(keep) - k)[len(keep) - k:]]
        keep = keep[np.argsort(-score[keep], kind="stable")]
        return row[keep], len(score)

    def _score(self, queries: np.ndarray, start: int, stop: int, blocked_rows: list[np.ndarray | None],
               scores: list[np.ndarray], rows: list[np.ndarray]) -> None:
        part = queries @ self.columns[:, start:stop]
        for j, blocked in enumerate(blocked_rows):
            if blocked is not None:
                part[j, blocked[(blocked >= start) & (blocked < stop)] - start] = -np.inf
        scores.append(part)
        rows.append(self.rows[start:stop])

    def _blocked(self, blocked: frozenset[str], excluded: frozenset[int] = frozenset()) -> np.ndarray | None:
        """Rows of the blocked advertiser domains and of the excluded catalog indices, or None."""
        found = [self.by_adomain[a] for a in blocked if a in self.by_adomain] if blocked else []
        if excluded:
            row_of = self.row_of
            rows = [row_of[i] for i in excluded if i in row_of]
            if rows:
                found.append(np.array(rows, dtype=np.int64))
        if not found:
            return None
        return found[0] if len(found) == 1 and not excluded else np.unique(np.concatenate(found))

    def _domain_rows(self, domain: str | None, exchange: str | None, blocked_rows: np.ndarray | None) -> np.ndarray:
        """The domain-targeted rows eligible on ``domain`` via ``exchange``, blocked advertisers' left out."""
        found = self.by_domain.get(domain)
        if found is None:
            return np.zeros(0, dtype=np.int64)
        if self.domain_exchanges:
            exchanges = self.domain_exchanges
            found = np.array([r for r in found.tolist() if r not in exchanges or exchange in exchanges[r]],
                             dtype=np.int64)
        if blocked_rows is not None:
            found = found[~np.isin(found, blocked_rows)]
        return found

    def mask(self, domain: str | None, exchange: str | None, blocked: frozenset[str],
             excluded: frozenset[int] = frozenset()) -> np.ndarray:
        """Which rows may run on ``domain`` via ``exchange`` without a blocked advertiser or an excluded creative (the
        approximate search)."""
        ok = np.zeros(len(self.positions), dtype=bool)
        ok[self.open_run.start:self.open_run.stop] = True
        run = self.exchange_runs.get(exchange)
        if run is not None:
            ok[run.start:run.stop] = True
        blocked_rows = self._blocked(blocked, excluded)
        ok[self._domain_rows(domain, exchange, None)] = True
        if blocked_rows is not None:
            ok[blocked_rows] = False
        return ok


def _rows_by(rows: Iterable[tuple[int, Candidate]], keys) -> dict[str, np.ndarray]:
    """key -> the sorted rows whose candidate has it among ``keys(candidate)`` (a hashable collection).

    A campaign's creatives share one targeting set, so rows are grouped by set first: a 100,000-creative
    catalog has 3.2 million (domain, creative) pairs but only a few thousand distinct sets.
    """
    by_set: dict[Any, list[int]] = {}
    for row, c in rows:
        by_set.setdefault(keys(c), []).append(row)
    found: dict[str, list[int]] = {}
    for keyset, members in by_set.items():
        for key in keyset:
            found.setdefault(key, []).extend(members)
    return {key: np.sort(np.array(r, dtype=np.int64)) for key, r in found.items()}


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
              blocked: frozenset[str], k: int, approximate: bool = False,
              excluded: frozenset[int] = frozenset()) -> np.ndarray:
        """Catalog indices of the (at most) ``k`` eligible creatives of size ``w``x``h`` with the largest
        ``query · ad vector``, best first, none of the ``excluded``; exact unless ``approximate`` (and an ANN index
        was built)."""
        part = self.sizes.get((w, h))
        if part is None:
            return np.zeros(0, dtype=np.int64)
        if approximate and part.ann is not None:
            found = self._approximate(part, query, part.mask(domain, exchange, blocked, excluded), k)
            if found is not None:
                return part.positions[found]
        return part.positions[part.search(np.asarray(query, dtype=np.float32), domain, exchange, blocked, k,
                                          excluded)[0]]

    def top_k_many(self, queries: np.ndarray,
                   wanted: Sequence[tuple[int, int, str | None, str | None, frozenset[str], frozenset[int]]],
                   k: int, approximate: bool = False) -> list[np.ndarray]:
        """``top_k`` for several imps (``queries[j]`` of size, domain, exchange, blocked, excluded ``wanted[j]``): the
        exact search reads each run of rows once for the imps of one size and exchange; ``excluded`` may be left
        out, as in ``top_k``."""
        wanted = [where if len(where) == 6 else (*where, frozenset()) for where in wanted]
        if approximate or len(wanted) == 1:
            return [self.top_k(queries[j], w, h, domain, exchange, blocked, k, approximate, excluded)
                    for j, (w, h, domain, exchange, blocked, excluded) in enumerate(wanted)]
        queries = np.asarray(queries, dtype=np.float32)
        out: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(wanted)
        by_size: dict[tuple[int, int], list[int]] = {}
        for j, (w, h, _, _, _, _) in enumerate(wanted):
            by_size.setdefault((w, h), []).append(j)
        for size, members in by_size.items():
            part = self.sizes.get(size)
            if part is None:
                continue
            found = part.search_many(queries[members], [wanted[j][2:] for j in members], k)
            for j, (rows, _) in zip(members, found):
                out[j] = part.positions[rows]
        return out

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

# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""First-price bid search over the win-price model's terms, natively: no ONNX Runtime call per batch.

The win-price model (``train/market.py``) is additive: an imp's ``mu`` and ``k`` = −ln(sigma·√2) are
sums of one learned pair per imp-side field value, ``k`` clipped to sigma's range, and
P(market < b) = ½ + ½·erf((ln b − mu)·e^k). ``market.onnx`` computes exactly that over a grid of bids;
``Search`` does the same sums and the same grid search in double precision, reading each imp's row of
the spec's ``sparse`` input where the featurizer left it (skipping, exactly, the grid bids that cannot
beat the best one found). ``bidder/shading.py`` checks it against the graph when the bundle loads.
"""
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from libc.math cimport erf, exp, log, INFINITY
from libc.stdint cimport int64_t

import numpy as np

cdef extern from "Python.h":
    double PyFloat_AsDouble(object o) except? -1.0
    long long PyLong_AsLongLong(object o) except? -1


#: coarse grid points are every ``BLOCK``-th bid (and the last); grids up to ``MAX_PRUNED_GRID`` bids are pruned
cdef enum:
    BLOCK = 8
    MAX_PRUNED_GRID = 1024
#: a block is skipped only when its bound is below the best surplus by more than this share: libm's log and erf are
#: monotone to far better than that, so rounding can never hide a grid bid that beats the best
cdef double BOUND_MARGIN = 1e-9


cdef inline double _win(double mu, double scale, double b) noexcept nogil:
    """P(market < b) for an imp of ``mu`` and ``scale`` = e^k."""
    return 0.5 + 0.5 * erf((log(b) - mu) * scale)


cdef void _pruned(double mu, double scale, double value, double floor, double step, int grid, double* bid,
                  double* surplus) noexcept nogil:
    """The grid search's answer, exactly, without every bid's P(win): grid bid ``g`` is floor + step·g, its surplus
    (value − b_g)·P(win | b_g). P(win) rises with the bid and (value − b) falls, so every bid strictly between coarse
    points ``a`` < ``c`` has a surplus of at most (value − b_a)·P(win | b_c): the bids between are worked out only
    where that bound reaches the best coarse surplus (the best bid is then the first of the greatest surplus, over
    the same numbers as the plain loop)."""
    cdef double s_at[MAX_PRUNED_GRID]
    cdef double p_at[MAX_PRUNED_GRID]
    cdef Py_ssize_t g, a, c
    cdef double b, p, s, best = -INFINITY, best_bid = floor, bound
    for g in range(grid):
        s_at[g] = -INFINITY
    g = 0
    while True:  # the coarse points: 0, BLOCK, 2·BLOCK, ... and grid − 1
        b = floor + step * g
        p = _win(mu, scale, b)
        p_at[g] = p
        s = (value - b) * p
        s_at[g] = s
        if s > best:
            best = s
        if g == grid - 1:
            break
        g = min(g + BLOCK, grid - 1)
    a = 0
    while a < grid - 1:
        c = min(a + BLOCK, grid - 1)
        bound = (value - (floor + step * a)) * p_at[c]
        if bound * (1.0 + BOUND_MARGIN) >= best:
            for g in range(a + 1, c):
                b = floor + step * g
                s = (value - b) * _win(mu, scale, b)
                s_at[g] = s
                if s > best:
                    best = s
        a = c
    best = -INFINITY
    for g in range(grid):  # the first of the greatest, as the plain loop keeps it
        if s_at[g] > best:
            best = s_at[g]
            best_bid = floor + step * g
    bid[0] = best_bid
    surplus[0] = best


cdef class Search:
    """The grid search over ``grid`` bids floor + (value − floor)·g/grid, g = 0..grid−1, for the model whose
    terms are ``table`` (float32 [rows, 2]: per value its term of mu and of k), ``columns`` and ``starts``
    (per imp-side field: its column in ``sparse`` and its first row in ``table``) and ``k_min``/``k_max``."""
    cdef const float[:, ::1] table
    cdef const int64_t[::1] columns
    cdef const int64_t[::1] starts
    cdef double k_min, k_max
    cdef readonly int grid
    cdef object _keep  # the arrays the views read

    def __init__(self, table, columns, starts, double k_min, double k_max, int grid):
        table = np.ascontiguousarray(table, dtype=np.float32)
        columns = np.ascontiguousarray(columns, dtype=np.int64)
        starts = np.ascontiguousarray(starts, dtype=np.int64)
        if table.ndim != 2 or table.shape[1] != 2:
            raise ValueError(f"table must be [rows, 2], got {list(table.shape)}")
        if columns.ndim != 1 or starts.shape != columns.shape:
            raise ValueError("columns and starts must be vectors of one length")
        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
        self._keep = (table, columns, starts)
        self.table, self.columns, self.starts = table, columns, starts
        self.k_min, self.k_max, self.grid = k_min, k_max, grid

    cdef int _terms(self, const int64_t[:, ::1] sparse, Py_ssize_t r, double* mu, double* scale) noexcept nogil:
        """Imp at row ``r``: its ``mu`` and ``e^k``; 1 for a feature index outside the table."""
        cdef Py_ssize_t j, at, n_table = self.table.shape[0]
        cdef double m = 0.0, k = 0.0
        for j in range(self.columns.shape[0]):
            at = sparse[r, self.columns[j]] + self.starts[j]
            if at < 0 or at >= n_table:
                return 1
            m += self.table[at, 0]
            k += self.table[at, 1]
        mu[0] = m
        scale[0] = exp(min(max(k, self.k_min), self.k_max))
        return 0

    cdef int _one(self, const int64_t[:, ::1] sparse, Py_ssize_t r, double value, double floor,
                  double* bid, double* surplus, double* win) noexcept nogil:
        """Imp at row ``r``: its best grid bid and surplus (the first of equal ones, as ``ArgMax`` takes);
        P(win) at every grid bid into ``win`` unless NULL. 1 for a feature index outside the table."""
        cdef Py_ssize_t g
        cdef double mu, scale, step, b, p, s, best = -INFINITY, best_bid = floor
        if self._terms(sparse, r, &mu, &scale):
            return 1
        step = (value - floor) / self.grid
        if win == NULL and step > 0.0 and self.grid <= MAX_PRUNED_GRID:
            _pruned(mu, scale, value, floor, step, self.grid, bid, surplus)
            return 0
        for g in range(self.grid):
            b = floor + step * g
            p = _win(mu, scale, b)
            s = (value - b) * p
            if win != NULL:
                win[g] = p
            if s > best:
                best = s
                best_bid = b
        bid[0] = best_bid
        surplus[0] = best
        return 0

    def shade(self, const int64_t[:, ::1] sparse, list rows, list values, list floors):
        """(bids, surplus) as lists: imp ``i`` has its features in row ``rows[i]`` of ``sparse``, its value
        ``values[i]`` and its floor ``floors[i]``. ``ValueError`` for a row or feature index out of range."""
        cdef Py_ssize_t i, r, n = PyList_GET_SIZE(rows)
        cdef double bid, gain
        if PyList_GET_SIZE(values) != n or PyList_GET_SIZE(floors) != n:
            raise ValueError("rows, values and floors differ in length")
        self._check_columns(sparse)
        bids, surplus = [None] * n, [None] * n
        for i in range(n):
            r = PyLong_AsLongLong(<object>PyList_GET_ITEM(rows, i))
            if r < 0 or r >= sparse.shape[0]:
                raise ValueError(f"row {r} is outside the sparse input's {sparse.shape[0]} rows")
            if self._one(sparse, r, PyFloat_AsDouble(<object>PyList_GET_ITEM(values, i)),
                         PyFloat_AsDouble(<object>PyList_GET_ITEM(floors, i)), &bid, &gain, NULL):
                raise ValueError(f"row {r}: a feature index is outside the market table's {self.table.shape[0]} rows")
            bids[i] = bid
            surplus[i] = gain
        return bids, surplus

    def search(self, const int64_t[:, ::1] sparse, const double[::1] values, const double[::1] floors):
        """Every row of ``sparse``: (bids, surplus, win) as arrays, win [rows, grid] = P(win) at each grid bid."""
        cdef Py_ssize_t i, n = sparse.shape[0]
        if values.shape[0] != n or floors.shape[0] != n:
            raise ValueError("sparse, values and floors differ in rows")
        self._check_columns(sparse)
        out_bids, out_surplus, out_win = np.empty(n), np.empty(n), np.empty((n, self.grid))
        cdef double[::1] bids = out_bids, surplus = out_surplus
        cdef double[:, ::1] win = out_win
        for i in range(n):
            if self._one(sparse, i, values[i], floors[i], &bids[i], &surplus[i], &win[i, 0]):
                raise ValueError(f"row {i}: a feature index is outside the market table's {self.table.shape[0]} rows")
        return out_bids, out_surplus, out_win

    cdef _check_columns(self, const int64_t[:, ::1] sparse):
        cdef Py_ssize_t j
        for j in range(self.columns.shape[0]):
            if self.columns[j] < 0 or self.columns[j] >= sparse.shape[1]:
                raise ValueError(f"column {self.columns[j]} is outside the sparse input's {sparse.shape[1]} columns")

# cython: language_level=3
"""Row bookkeeping for row-wise Adam in C: the rows a batch reads, the sums of several processes' rows, Adam's step.

Each function walks the entries it is given once and touches only the table rows they name. A table-sized
``slot`` scratch (int32, every entry -1 between calls; the caller keeps one per table group) maps a row to its
place among the rows seen so far; every call sets back the entries it used before it returns, also when it
raises. ``train/fused.py`` and ``train/optim.py`` call them on torch tensors' memory.
"""
from libc.math cimport sqrtf
from libc.stdint cimport int32_t, int64_t

cdef extern from *:
    """
    #define ROWS_PREFETCH(p) __builtin_prefetch((p), 1, 3)
    """
    void ROWS_PREFETCH(const void *p) noexcept nogil

cdef enum:
    AHEAD = 16  # rows ahead whose weights and moments are prefetched: spread over the table, each is a cache miss


cdef inline void _reset(int32_t[::1] slot, const int64_t[::1] rows, Py_ssize_t k) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(k):
        slot[rows[i]] = -1


def unique_rows(const int64_t[:, ::1] index, const int64_t[::1] offsets, int32_t[::1] slot,
                int64_t[::1] rows, int64_t[:, ::1] position) -> int:
    """The distinct ``index[i, j] + offsets[j]``, in order of first appearance, and each entry's place among them.

    Writes the distinct rows to ``rows[:k]`` and ``position[i, j]`` (their index into ``rows``); returns k.
    Raises IndexError for a row outside ``slot``.
    """
    cdef Py_ssize_t n = index.shape[0], c = index.shape[1], size = slot.shape[0], i, j, k = 0, bad = -1
    cdef int64_t r
    cdef int32_t s
    if offsets.shape[0] != c or position.shape[0] != n or position.shape[1] != c or rows.shape[0] < min(n * c, size):
        raise ValueError("unique_rows: index, offsets, rows and position do not agree in shape")
    if size >= 1 << 31:
        raise ValueError("unique_rows: a table of 2**31 rows or more")
    with nogil:
        for i in range(n):
            if i + 1 < n:  # the next sample's rows, one cache line of the scratch each
                for j in range(c):
                    r = index[i + 1, j] + offsets[j]
                    if 0 <= r < size:
                        ROWS_PREFETCH(&slot[r])
            for j in range(c):
                r = index[i, j] + offsets[j]
                if r < 0 or r >= size:
                    bad = i * c + j
                    break
                s = slot[r]
                if s < 0:
                    s = <int32_t>k
                    slot[r] = s
                    rows[k] = r
                    k += 1
                position[i, j] = s
            if bad >= 0:
                break
        _reset(slot, rows, k)
    if bad >= 0:
        raise IndexError(f"row {index[bad // c, bad % c] + offsets[bad % c]} (entry {bad}) is outside the table's "
                         f"{size} rows")
    return k


def add_rows(const int64_t[::1] position, const float[:, ::1] values, float[:, ::1] sums) -> None:
    """``sums[position[i]] += values[i]`` for every i, in order: each row's sum adds its entries as they come."""
    cdef Py_ssize_t n = position.shape[0], width = values.shape[1], k = sums.shape[0], i, j, bad = -1
    cdef int64_t s
    if values.shape[0] != n or sums.shape[1] != width:
        raise ValueError("add_rows: position, values and sums do not agree in shape")
    with nogil:
        for i in range(n):
            s = position[i]
            if s < 0 or s >= k:
                bad = i
                break
            for j in range(width):
                sums[s, j] += values[i, j]
    if bad >= 0:
        raise IndexError(f"position {position[bad]} (entry {bad}) is outside the {k} sums")


def adam_rows(float[:, ::1] weight, float[:, ::1] exp_avg, float[:, ::1] exp_avg_sq, const int64_t[::1] rows,
              float[:, ::1] grad, double lr, double beta1, double beta2, double eps, double l2, double bias1,
              double bias2) -> None:
    """Adam's step on ``weight[rows]`` in place, with its moments: lazy Adam, the rows distinct.

    Per element, in float32: g = grad + 2 l2 w; m = beta1 m + (1 - beta1) g; v = beta2 v + (1 - beta2) g g;
    w -= lr / bias1 * m / (sqrt(v / bias2) + eps). ``grad`` is overwritten with g.
    """
    cdef Py_ssize_t n = rows.shape[0], width = weight.shape[1], size = weight.shape[0], i, j
    cdef int64_t r
    cdef float b1 = <float>beta1, c1 = <float>(1.0 - beta1), b2 = <float>beta2, c2 = <float>(1.0 - beta2)
    cdef float decay = <float>(2.0 * l2), step = <float>(lr / bias1), inv2 = <float>(1.0 / bias2), e = <float>eps
    cdef float g, m, v, w
    if (exp_avg.shape[0] != size or exp_avg_sq.shape[0] != size or exp_avg.shape[1] != width
            or exp_avg_sq.shape[1] != width or grad.shape[0] != n or grad.shape[1] != width):
        raise ValueError("adam_rows: weight, moments, rows and grad do not agree in shape")
    for i in range(n):
        if rows[i] < 0 or rows[i] >= size:
            raise IndexError(f"row {rows[i]} is outside the table's {size} rows")
    with nogil:
        for i in range(n):
            r = rows[i]
            if i + AHEAD < n:
                ROWS_PREFETCH(&weight[rows[i + AHEAD], 0])
                ROWS_PREFETCH(&exp_avg[rows[i + AHEAD], 0])
                ROWS_PREFETCH(&exp_avg_sq[rows[i + AHEAD], 0])
            for j in range(width):
                w = weight[r, j]
                g = grad[i, j] + decay * w
                grad[i, j] = g
                m = b1 * exp_avg[r, j] + c1 * g
                v = b2 * exp_avg_sq[r, j] + c2 * g * g
                exp_avg[r, j] = m
                exp_avg_sq[r, j] = v
                weight[r, j] = w - step * (m / (sqrtf(v * inv2) + e))


def adam_flat(float[::1] weight, float[::1] exp_avg, float[::1] exp_avg_sq, const float[::1] grad, double lr,
              double beta1, double beta2, double eps, double bias1, double bias2) -> None:
    """Adam's step on every element of ``weight`` in place (``adam_rows``' arithmetic, no L2 term), for parameters
    kept in one flat storage with their gradients in another (``FlatAdam``)."""
    cdef Py_ssize_t n = weight.shape[0], i
    cdef float b1 = <float>beta1, c1 = <float>(1.0 - beta1), b2 = <float>beta2, c2 = <float>(1.0 - beta2)
    cdef float step = <float>(lr / bias1), inv2 = <float>(1.0 / bias2), e = <float>eps
    cdef float g, m, v
    if exp_avg.shape[0] != n or exp_avg_sq.shape[0] != n or grad.shape[0] != n:
        raise ValueError("adam_flat: weight, moments and grad do not agree in length")
    with nogil:
        for i in range(n):
            g = grad[i]
            m = b1 * exp_avg[i] + c1 * g
            v = b2 * exp_avg_sq[i] + c2 * g * g
            exp_avg[i] = m
            exp_avg_sq[i] = v
            weight[i] = weight[i] - step * (m / (sqrtf(v * inv2) + e))

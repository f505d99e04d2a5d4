# cython: language_level=3
"""Row bookkeeping for row-wise Adam in C: the rows a batch reads, the sums of several processes' rows, Adam's step.

Each function walks the entries it is given once and touches only the table rows they name. A table-sized
``slot`` scratch (int32, every entry -1 between calls; the caller keeps one per table group) maps a row to its
place among the rows seen so far; every call sets back the entries it used before it returns, also when it
raises. ``train/fused.py`` and ``train/optim.py`` call them on torch tensors' memory.
"""
from libc.math cimport sqrtf
from libc.stdint cimport int32_t, int64_t, uint32_t
from libc.stdlib cimport free, malloc

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


cdef inline int32_t _place(int32_t *slot, int64_t *rows, int64_t r, Py_ssize_t *k) noexcept nogil:
    """Row ``r``'s place among the rows seen so far (``rows[:k]``), added at ``k`` if it is new."""
    cdef int32_t s = slot[r]
    if s < 0:
        s = <int32_t>k[0]
        slot[r] = s
        rows[k[0]] = r
        k[0] += 1
    return s


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
                position[i, j] = _place(&slot[0], &rows[0], r, &k)
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


cdef inline Py_ssize_t _owner(int64_t r, int shift, uint32_t owners) noexcept nogil:
    """Row r's owner, r >= 0 and below 2**31: a mask where ``owners`` is a power of two, else an unsigned modulo."""
    cdef uint32_t block = <uint32_t>(r >> shift)
    if owners & (owners - 1) == 0:
        return <Py_ssize_t>(block & (owners - 1))
    return <Py_ssize_t>(block % owners)


def pack_owned(float[::1] message, Py_ssize_t offset, const int64_t[::1] rows, const float[:, ::1] grads, int shift,
               int64_t[::1] counts) -> None:
    """Write ``rows`` and their ``grads`` into ``message`` from ``offset``, a row at a time: the row number (int32
    bits in a float32 slot), then its gradient's ``width`` floats (the data-parallel exchange's table blocks).

    The rows are grouped by the process that owns them, row r belonging to process ``(r >> shift) % owners``
    (``owners`` = ``counts``' length): each owner's rows are one run, in their order in ``rows``, the runs in
    owner order; ``counts[o]`` gets owner o's number of rows. With one owner the rows stay in their order."""
    cdef Py_ssize_t n = rows.shape[0], width = grads.shape[1], owners = counts.shape[0], i, j, o, at
    cdef int64_t *cursor
    cdef int64_t running = 0
    if grads.shape[0] != n or offset < 0 or offset + n * (width + 1) > message.shape[0] or not 1 <= owners < 1 << 31:
        raise ValueError("pack_owned: rows, grads, counts and the message do not agree in shape")
    if shift < 0 or shift > 62:
        raise ValueError(f"pack_owned: shift {shift} is not in 0..62")
    for i in range(n):
        if rows[i] < 0 or rows[i] >= 1 << 31:
            raise IndexError(f"row {rows[i]} does not fit the message's int32 row numbers")
    cursor = <int64_t *>malloc(owners * sizeof(int64_t))
    if cursor == NULL:
        raise MemoryError()
    with nogil:
        for o in range(owners):
            counts[o] = 0
        for i in range(n):
            counts[_owner(rows[i], shift, <uint32_t>owners)] += 1
        for o in range(owners):
            cursor[o] = running
            running += counts[o]
        for i in range(n):
            o = _owner(rows[i], shift, <uint32_t>owners)
            at = offset + cursor[o] * (width + 1)
            cursor[o] += 1
            (<int32_t *>&message[at])[0] = <int32_t>rows[i]
            for j in range(width):
                message[at + 1 + j] = grads[i, j]
    free(cursor)


cdef int _blocks(const float[:, :] gathered, Py_ssize_t offset, Py_ssize_t width, const int64_t[::1] counts,
                 const int64_t[::1] starts, Py_ssize_t entries) except -1:
    """Checks that every process's block (``counts[p]`` rows of 1 + ``width`` floats, ``starts[p]`` rows after
    ``offset``) fits."""
    cdef Py_ssize_t p, total = 0
    if counts.shape[0] != gathered.shape[0] or starts.shape[0] != gathered.shape[0]:
        raise ValueError("one count and one start per process")
    for p in range(counts.shape[0]):
        if (counts[p] < 0 or starts[p] < 0 or offset < 0
                or offset + (starts[p] + counts[p]) * (width + 1) > gathered.shape[1]):
            raise ValueError(f"process {p}'s block of {counts[p]} rows does not fit in its message")
        total += counts[p]
    if entries >= 0 and total != entries:
        raise ValueError(f"{entries} positions for {total} received rows")
    return 0


def merge_blocks(const float[:, :] gathered, Py_ssize_t offset, Py_ssize_t width, const int64_t[::1] counts,
                 const int64_t[::1] starts, int32_t[::1] slot, int64_t[::1] rows, int64_t[::1] position,
                 float[:, ::1] sums) -> int:
    """Every process's block of rows (``pack_owned``' layout, ``counts[p]`` rows from ``starts[p]`` rows after
    ``offset`` in row p of ``gathered``) merged: the distinct rows in order of first appearance (``rows[:k]``),
    each entry's place among them (``position``, process after process) and each row's gradients summed in process
    order (``sums[:k]``, which must be zero). Returns k. Every process that merges the same blocks computes the
    same bits."""
    cdef Py_ssize_t processes = gathered.shape[0], size = slot.shape[0], p, i, j, at, k = 0, entry = 0, bad = -1
    cdef int32_t r, s
    _blocks(gathered, offset, width, counts, starts, position.shape[0])
    if sums.shape[1] != width or rows.shape[0] < min(position.shape[0], size) or sums.shape[0] < rows.shape[0]:
        raise ValueError("merge_blocks: rows, position and sums do not agree in shape")
    with nogil:
        for p in range(processes):
            for i in range(counts[p]):
                at = offset + (starts[p] + i) * (width + 1)
                if i + AHEAD < counts[p]:  # the scratch entry of a row further on: spread over the table
                    r = (<const int32_t *>&gathered[p, at + AHEAD * (width + 1)])[0]
                    if 0 <= r < size:
                        ROWS_PREFETCH(&slot[r])
                r = (<const int32_t *>&gathered[p, at])[0]
                if r < 0 or r >= size:
                    bad = entry
                    break
                s = _place(&slot[0], &rows[0], r, &k)
                position[entry] = s
                entry += 1
                for j in range(width):
                    sums[s, j] += gathered[p, at + 1 + j]
            if bad >= 0:
                break
        _reset(slot, rows, k)
    if bad >= 0:
        raise IndexError(f"received row (entry {bad}) is outside the table's {size} rows")
    return k


def add_blocks(const float[:, :] gathered, Py_ssize_t offset, Py_ssize_t width, const int64_t[::1] counts,
               const int64_t[::1] starts, const int64_t[::1] position, float[:, ::1] sums) -> None:
    """``merge_blocks``' sums for another group whose blocks list the same rows in the same order (the fused
    forward stages one row tensor for the linear weights and the vectors): ``position`` is that merge's."""
    cdef Py_ssize_t processes = gathered.shape[0], p, i, j, at, entry = 0, s, k = sums.shape[0]
    _blocks(gathered, offset, width, counts, starts, position.shape[0])
    if sums.shape[1] != width:
        raise ValueError("add_blocks: sums and width do not agree")
    for i in range(position.shape[0]):
        if position[i] < 0 or position[i] >= k:
            raise IndexError(f"position {position[i]} is outside the {k} sums")
    with nogil:
        for p in range(processes):
            for i in range(counts[p]):
                at = offset + (starts[p] + i) * (width + 1)
                s = position[entry]
                entry += 1
                for j in range(width):
                    sums[s, j] += gathered[p, at + 1 + j]


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

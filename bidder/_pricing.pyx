# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The best row per imp of a whole batch, natively: the scan behind ``bidder.pricing.best_rows``.

Every input is an array worked out before the scan (the rows' imps, candidates, floors and deal terms), so
the scan makes no Python call. A row's value is pCTR × value per click × 1000 in double precision (a float32
score widened exactly, as ``float(score)`` widens it), so its choices and values are bit-identical to
pricing the rows one by one in Python. The pricing rules that follow (rounding, deal prices, shading)
stay in ``bidder/pricing.py`` and ``bidder/engine.py``.

The arrays arrive as ndarrays and are read through their data pointers once their type, layout and length
are checked: typed memoryviews cost about 0.2 µs each to acquire, and a lone request pays for all eleven.
"""
from libc.math cimport isnan
from libc.stdint cimport int64_t, uint8_t

cimport numpy as cnp

cnp.import_array()

_NAMES = {cnp.NPY_INT64: "int64", cnp.NPY_FLOAT32: "float32", cnp.NPY_FLOAT64: "float64", cnp.NPY_UINT8: "uint8"}


cdef void* _data(cnp.ndarray array, int kind, Py_ssize_t length, str name) except NULL:
    """``array``'s data, once it is a C-contiguous array of NumPy type ``kind`` with at least ``length`` entries."""
    if cnp.PyArray_TYPE(array) != kind or not cnp.PyArray_IS_C_CONTIGUOUS(array) or cnp.PyArray_NDIM(array) != 1:
        raise ValueError(f"{name} must be a contiguous 1-d array of {_NAMES.get(kind, kind)}, got "
                         f"{(<object> array).dtype} {(<object> array).shape}")
    if cnp.PyArray_DIM(array, 0) < length:
        raise ValueError(f"{name} holds {cnp.PyArray_DIM(array, 0)} entries, fewer than {length}")
    return cnp.PyArray_DATA(array)


def best_rows(Py_ssize_t n, Py_ssize_t imps, cnp.ndarray row_imp, cnp.ndarray row_cand, cnp.ndarray scores,
              cnp.ndarray value_per_click, cnp.ndarray row_floor, cnp.ndarray deal_floor, cnp.ndarray deal_private,
              cnp.ndarray best_row, cnp.ndarray best_value, cnp.ndarray via_deal, cnp.ndarray order):
    """Per imp ``i < imps`` the best of rows ``r < n`` at or above its floor.

    Row ``r`` pairs imp ``row_imp[r]`` with the candidate at catalog position ``row_cand[r]`` (int64), whose
    value per click is ``value_per_click[r]``, scored ``scores[r]`` (float32 or float64: the arithmetic is in
    double precision), under the imp floor ``row_floor[r]``. A row that can bid through a deal has the deal's
    floor in ``deal_floor[r]`` (NaN: no deal): it bids through the deal when its value reaches that floor;
    otherwise, in a private auction (``deal_private[r]``, uint8) not at all, in an open one against the imp
    floor. Ties go to the candidate earlier in the catalog, whatever the rows' order.

    Writes, per imp ``i``: ``best_row[i]`` (int64, -1: no row at or above its floor), ``best_value[i]`` and
    ``via_deal[i]`` (uint8, 1 when the best row bids through its deal); and in ``order`` (int64) the imps that
    have a best row, in the order of their first row at or above its floor. Returns how many imps have one.
    """
    if n < 0 or imps < 0:
        raise ValueError(f"negative counts: {n} rows, {imps} imps")
    cdef const int64_t* imp_of = <const int64_t*> _data(row_imp, cnp.NPY_INT64, n, "row_imp")
    cdef const int64_t* cand_of = <const int64_t*> _data(row_cand, cnp.NPY_INT64, n, "row_cand")
    cdef bint wide = cnp.PyArray_TYPE(scores) == cnp.NPY_FLOAT64
    cdef const float* narrow_score = NULL
    cdef const double* wide_score = NULL
    if wide:
        wide_score = <const double*> _data(scores, cnp.NPY_FLOAT64, n, "scores")
    else:
        narrow_score = <const float*> _data(scores, cnp.NPY_FLOAT32, n, "scores")
    cdef const double* vpc = <const double*> _data(value_per_click, cnp.NPY_FLOAT64, n, "value_per_click")
    cdef const double* floor_of = <const double*> _data(row_floor, cnp.NPY_FLOAT64, n, "row_floor")
    cdef const double* deal_of = <const double*> _data(deal_floor, cnp.NPY_FLOAT64, n, "deal_floor")
    cdef const uint8_t* private = <const uint8_t*> _data(deal_private, cnp.NPY_UINT8, n, "deal_private")
    cdef int64_t* best = <int64_t*> _data(best_row, cnp.NPY_INT64, imps, "best_row")
    cdef double* best_of = <double*> _data(best_value, cnp.NPY_FLOAT64, imps, "best_value")
    cdef uint8_t* through_of = <uint8_t*> _data(via_deal, cnp.NPY_UINT8, imps, "via_deal")
    cdef int64_t* first = <int64_t*> _data(order, cnp.NPY_INT64, imps, "order")
    cdef Py_ssize_t r, imp, found = 0
    cdef double value, floor, deal
    cdef uint8_t through
    cdef int64_t last
    for imp in range(imps):
        best[imp] = -1
    for r in range(n):
        imp = imp_of[r]
        if imp < 0 or imp >= imps:
            raise IndexError(f"row {r} belongs to imp {imp}, but the batch has {imps} imps")
        value = (wide_score[r] if wide else <double> narrow_score[r]) * vpc[r] * 1000.0
        floor = floor_of[r]
        through = 0
        deal = deal_of[r]
        if not isnan(deal):
            if value >= deal:
                floor = deal
                through = 1
            elif private[r]:
                continue
        if not value >= floor:
            continue
        last = best[imp]
        if last < 0:
            first[found] = imp
            found += 1
        elif not (value > best_of[imp] or (value == best_of[imp] and cand_of[r] < cand_of[last])):
            continue
        best[imp] = r
        best_of[imp] = value
        through_of[imp] = through
    return found

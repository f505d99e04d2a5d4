# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The best row per imp of a whole batch, natively: the scan behind ``bidder.pricing.best_rows``.

Every input is an array worked out before the scan (the rows' imps, candidates, floors and deal terms), so
the scan makes no Python call. A row's value is pCTR × value per click × 1000 in double precision (a float32
score widened exactly, as ``float(score)`` widens it), so its choices and values are bit-identical to
pricing the rows one by one in Python. The pricing rules that follow (rounding, deal prices, shading)
stay in ``bidder/pricing.py`` and ``bidder/engine.py``.
"""
from libc.math cimport isnan
from libc.stdint cimport int64_t, uint8_t


ctypedef fused score_t:
    float
    double


def best_rows(Py_ssize_t n, Py_ssize_t imps, const int64_t[::1] row_imp, const int64_t[::1] row_cand, const score_t[::1] scores,
              const double[::1] value_per_click, const double[::1] row_floor, const double[::1] deal_floor,
              const uint8_t[::1] deal_private, int64_t[::1] best_row, double[::1] best_value,
              uint8_t[::1] via_deal, int64_t[::1] order):
    """Per imp the row of highest value at or above its floor.

    Row ``r`` pairs imp ``row_imp[r]`` with the candidate at catalog position ``row_cand[r]``, whose value per
    click is ``value_per_click[r]``, scored ``scores[r]`` (a float32 score widened: the arithmetic is in double
    precision), under the imp floor ``row_floor[r]``. A row that
    can bid through a deal has the deal's floor in ``deal_floor[r]`` (NaN: no deal): it bids through the deal
    when its value reaches that floor; otherwise, in a private auction (``deal_private[r]``) not at all, in an
    open one against the imp floor. Ties go to the candidate earlier in the catalog, whatever the rows' order.

    Writes, per imp ``i``: ``best_row[i]`` (-1: no row at or
    above its floor), ``best_value[i]`` and ``via_deal[i]`` (1 when the best row bids through its deal); and
    in ``order`` the imps that have a best row, in the order of their first row at or above its floor.
    Returns how many imps have one.
    """
    cdef Py_ssize_t r, imp
    cdef double value, floor, deal
    cdef uint8_t through
    cdef int64_t cand, last
    if (n < 0 or imps < 0 or row_imp.shape[0] < n or row_cand.shape[0] < n or scores.shape[0] < n or value_per_click.shape[0] < n or row_floor.shape[0] < n
            or deal_floor.shape[0] < n or deal_private.shape[0] < n):
        raise ValueError(f"{n} rows, but row_imp, row_cand, scores, value_per_click, row_floor, deal_floor or "
                         "deal_private is shorter")
    cdef Py_ssize_t found = 0
    if best_row.shape[0] < imps or best_value.shape[0] < imps or via_deal.shape[0] < imps or order.shape[0] < imps:
        raise ValueError(f"{imps} imps, but best_row, best_value, via_deal or order is shorter")
    for imp in range(imps):
        best_row[imp] = -1
    for r in range(n):
        imp = row_imp[r]
        cand = row_cand[r]
        if imp < 0 or imp >= imps:
            raise IndexError(f"row {r} belongs to imp {imp}, but the batch has {imps} imps")
        value = <double> scores[r] * value_per_click[r] * 1000.0
        floor = row_floor[r]
        through = 0
        deal = deal_floor[r]
        if not isnan(deal):
            if value >= deal:
                floor = deal
                through = 1
            elif deal_private[r]:
                continue
        if not value >= floor:
            continue
        last = best_row[imp]
        if last < 0:
            order[found] = imp
            found += 1
        elif not (value > best_value[imp] or (value == best_value[imp] and cand < row_cand[last])):
            continue
        best_row[imp] = r
        best_value[imp] = value
        via_deal[imp] = through
    return found

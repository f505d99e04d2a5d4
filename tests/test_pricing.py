"""Pricing: CPM = pCTR × value per click × 1000, floors respected, the best candidate per imp."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bidder.pricing import best_per_imp, bid_cpm
from catalogs import parse_catalog


def candidates(*values_per_click: float):
    return list(parse_catalog({"campaigns": [
        {"id": f"c{i}", "advertiser": i, "value_per_click": v, "creatives": [
            {"id": f"cr{i}", "w": 300, "h": 250, "adomain": [f"{i}.com"], "nurl": "https://w/${AUCTION_PRICE}"}]}
        for i, v in enumerate(values_per_click)]}).candidates)


def test_cpm_is_expected_value_per_thousand():
    assert bid_cpm(0.01, 2.0) == pytest.approx(20.0)
    assert bid_cpm(np.float32(0.5), 1.0) == pytest.approx(500.0)


def test_floors_are_respected_and_the_best_per_imp_wins():
    cands = candidates(1, 2, 3)
    ctr = np.array([0.01, 0.01, 0.001, 0.01], dtype=np.float32)
    best = best_per_imp([0, 0, 0, 1], [cands[0], cands[1], cands[2], cands[0]], ctr, floors=[5.0, 20.0])
    assert set(best) == {0}  # imp 1's only bid (10 CPM) is under its 20 CPM floor
    assert best[0].candidate.advertiser == 1 and best[0].price == pytest.approx(bid_cpm(0.01, 2), rel=1e-6)
    assert best[0].imp_index == 0 and best[0].ctr == pytest.approx(0.01)
    assert best[0].value == pytest.approx(bid_cpm(0.01, 2), rel=1e-6)  # before rounding: what shading reads


def test_a_bid_exactly_at_the_floor_is_kept_and_rounding_never_goes_under_it():
    (c,) = candidates(1.0)
    floor = 0.0123456789
    best = best_per_imp([0], [c], [floor / 1000.0], [floor])
    assert best[0].price >= floor
    assert best_per_imp([0], [c], [0.0], [0.0])[0].price == 0.0  # a zero floor accepts a zero price


def test_rows_must_come_with_one_candidate_and_one_score_each():
    cands = candidates(1.0, 2.0)
    with pytest.raises(ValueError, match="2 owners, 1 candidates and 2 scores"):
        best_per_imp([0, 0], cands[:1], [0.01, 0.02], [0.0])
    with pytest.raises(ValueError, match="2 owners, 2 candidates and 1 scores"):
        best_per_imp([0, 0], cands, [0.01], [0.0])


def test_prices_are_rounded_to_micro_dollars():
    (c,) = candidates(1.0)
    assert best_per_imp([0], [c], [0.0123456789], [0.0])[0].price == 12.345679


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2), st.floats(0, 1)), max_size=30),
       st.lists(st.floats(0, 2000), min_size=4, max_size=4))
def test_best_is_the_maximum_over_rows_at_or_above_floor(rows, floors):
    cands = candidates(0.5, 1.0, 3.0)
    owners = [imp for imp, _, _ in rows]
    chosen = [cands[k] for _, k, _ in rows]
    ctr = [p for _, _, p in rows]
    best = best_per_imp(owners, chosen, ctr, floors)
    for imp in range(4):
        prices = [bid_cpm(p, cands[k].value_per_click) for i, k, p in rows if i == imp]
        eligible = [p for p in prices if p >= floors[imp]]
        if not eligible:
            assert imp not in best
        else:
            assert best[imp].price >= floors[imp]
            assert best[imp].price == pytest.approx(max(eligible), abs=1e-6)


def test_a_tie_goes_to_the_candidate_earlier_in_the_catalog_whatever_the_row_order():
    cands = candidates(2.0, 1.0, 2.0)
    best = best_per_imp([0, 0, 0], cands, [0.01, 0.02, 0.01], [0.0])
    assert best[0].candidate is cands[0] and best[0].price == pytest.approx(20.0)
    best = best_per_imp([0, 0, 0], cands[::-1], [0.01, 0.02, 0.01], [0.0])  # rows ordered as retrieval might
    assert best[0].candidate is cands[0]


def test_prices_are_python_floats_whatever_holds_the_scores():
    """The scorer hands a float32 array: prices computed in float32 would differ, and would not encode."""
    cands = candidates(1.7, 1.0)
    scores = np.array([0.0123456789, 0.0201], dtype=np.float32)
    from_array = best_per_imp([0, 1], cands, scores, [0.0, 0.0])
    from_list = best_per_imp([0, 1], cands, scores.tolist(), [0.0, 0.0])
    for imp in (0, 1):
        assert type(from_array[imp].price) is float and type(from_array[imp].ctr) is float
        assert from_array[imp].price == from_list[imp].price == round(float(scores[imp]) * cands[imp].value_per_click
                                                                       * 1000.0, 6)


def test_a_private_deal_out_of_reach_rules_out_its_row_only():
    from bidder.deals import DealOffer

    rich, plain = candidates(5.0, 1.0)
    private = DealOffer(dealid="d", seat="s", floor=1000.0, fixed_price=False, private=True)
    best = best_per_imp([0, 0, 1], [rich, plain, plain], [0.01, 0.01, 0.01], [0.0, 0.0], {0: private})
    assert best[0].candidate is plain and best[0].deal is None and best[0].price == pytest.approx(10.0)
    assert best[1].candidate is plain


def _floor_for(offer, value, imp_floor):
    """(floor, deal) a row of ``value`` with a deal ``offer`` is held to, or None when it may not bid at all."""
    if value >= offer.floor:
        return offer.floor, offer
    return None if offer.private else (imp_floor, None)


def _reference_best(owners, chosen, ctr, floors, offers):
    """The scan written plainly in Python: the native one must choose exactly what this does."""
    best = {}
    for row, (imp, candidate, p) in enumerate(zip(owners, chosen, ctr)):
        price = p * candidate.value_per_click * 1000.0
        floor, offer = floors[imp], offers.get(row)
        if offer is not None:
            terms = _floor_for(offer, price, floor)
            if terms is None:
                continue
            floor, offer = terms
        if price >= floor:
            current = best.get(imp)
            if current is None or price > current[0] or (price == current[0] and candidate.index < current[1].index):
                best[imp] = (price, candidate, p, offer)
    return [(imp, candidate, p, offer) for imp, (_, candidate, p, offer) in best.items()]


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.sampled_from([0.0, 0.001, 0.004, 0.01, 0.5]),
                          st.sampled_from([None, 0, 1, 2])), max_size=40),
       st.lists(st.sampled_from([0.0, 1.0, 4.0, 10.0, 2000.0]), min_size=4, max_size=4))
def test_the_native_scan_chooses_what_the_plain_loop_chooses(rows, floors):
    """Same winners (ties, deals, private deals, floors), same imp order, bit-identical prices and pCTRs."""
    from bidder.deals import DealOffer

    cands = candidates(0.5, 1.0, 2.0, 2.0)  # two candidates of one value: ties
    kinds = [DealOffer("open", "s", 5.0, False, False), DealOffer("private", "s", 5.0, False, True),
             DealOffer("fixed", "s", 3.0, True, False)]
    owners = [imp for imp, _, _, _ in rows]
    chosen = [cands[k] for _, k, _, _ in rows]
    ctr = np.array([p for _, _, p, _ in rows], dtype=np.float32)
    offers = {row: kinds[kind] for row, (_, _, _, kind) in enumerate(rows) if kind is not None}
    best = best_per_imp(owners, chosen, ctr, floors, offers)
    expected = _reference_best(owners, chosen, ctr.tolist(), floors, offers)
    assert [(imp, b.candidate, b.ctr, b.deal) for imp, b in best.items()] == expected
    for imp, candidate, p, deal in expected:
        value = p * candidate.value_per_click * 1000.0
        assert best[imp].price == (deal.price(value) if deal else max(round(value, 6), floors[imp]))


def test_rows_of_an_imp_the_request_does_not_have_are_refused():
    (c,) = candidates(1.0)
    with pytest.raises(IndexError, match="row 0 belongs to imp 1"):
        best_per_imp([1], [c], [0.01], [0.0])
    with pytest.raises(ValueError, match="2 owners, 1 candidates"):
        best_per_imp([0, 0], [c], [0.01], [0.0])

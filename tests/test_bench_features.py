"""Micro-benchmarks: featurize 1 and 64 records, Cython kernel vs pure-Python twin (`pytest --benchmark`).

Each call takes the next records of a pool of distinct objects, so the kernel's per-field identity
cache only helps where real traffic would let it (small ints, which CPython shares).
"""
import itertools

import pytest

from bidder import Featurizer, default_spec, reference

SPEC = default_spec()


def batches(records, rows):
    return itertools.cycle([records[i:i + rows] for i in range(0, len(records), rows)])


@pytest.mark.parametrize("rows", [1, 64])
def test_featurize_cython(benchmark, sample_records, rows):
    benchmark.group = f"featurize {rows} record(s)"
    featurizer = Featurizer(SPEC)
    buffers = SPEC.allocate(rows)
    pool = batches(sample_records, rows)
    assert benchmark(lambda: featurizer.transform_into(buffers, next(pool))) == rows


@pytest.mark.parametrize("rows", [1, 64])
def test_featurize_twin(benchmark, sample_records, rows):
    benchmark.group = f"featurize {rows} record(s)"
    pool = batches(sample_records, rows)
    assert benchmark(lambda: reference.featurize(SPEC, next(pool)))["sparse"].shape == (rows, 18)


def test_featurize_one_imp_all_candidates(benchmark, sample_records):
    """The bid path's shape: (candidate, imp) layered rows, 27 candidates sharing one imp."""
    benchmark.group = "featurize 1 imp x 27 candidates"
    featurizer = Featurizer(SPEC)
    buffers = SPEC.allocate(256)
    candidates = [{"creative": f"cr-{a}-{c}", "advertiser": a, "slotwidth": w, "slotheight": h}
                  for a in (1458, 2259, 2261, 2821, 2997, 3358, 3386, 3427, 3476)
                  for c, (w, h) in enumerate([(300, 250), (728, 90), (160, 600)])]
    imps = itertools.cycle(sample_records)

    def one_request():
        imp = next(imps)
        return featurizer.transform_into(buffers, [(c, imp) for c in candidates])

    assert benchmark(one_request) == 27

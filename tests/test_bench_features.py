"""Micro-benchmarks: featurize 1 and 64 records, Cython kernel vs pure-Python twin (`pytest --benchmark`)."""
import pytest

from bidder import Featurizer, default_spec, reference

SPEC = default_spec()


@pytest.mark.parametrize("rows", [1, 64])
def test_featurize_cython(benchmark, sample_records, rows):
    benchmark.group = f"featurize {rows} record(s)"
    featurizer = Featurizer(SPEC)
    buffers = SPEC.allocate(rows)
    records = sample_records[:rows]
    assert benchmark(featurizer.transform_into, buffers, records) == rows


@pytest.mark.parametrize("rows", [1, 64])
def test_featurize_twin(benchmark, sample_records, rows):
    benchmark.group = f"featurize {rows} record(s)"
    records = sample_records[:rows]
    assert benchmark(reference.featurize, SPEC, records)["sparse"].shape == (rows, 18)

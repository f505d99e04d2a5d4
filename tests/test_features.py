"""The Cython featurizer against its pure-Python twin, bit for bit, and the twin against mmh3."""
from __future__ import annotations

import string
import sys
from collections import OrderedDict
from datetime import datetime

import mmh3
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bidder import Featurizer, default_spec, reference
from bidder._features import hash_bytes, hash_value
from bidder.spec import BROWSER_KEYWORDS, OS_KEYWORDS, FeatureSpec, _parse_spec

SPEC = default_spec()
FEATURIZER = Featurizer(SPEC)

# -- value strategies -----------------------------------------------------------------------------
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(),
    st.text(alphabet=string.digits, max_size=20),
    st.just(""),
)
useragents = st.one_of(
    st.text(),
    st.lists(
        st.one_of(st.sampled_from(OS_KEYWORDS + BROWSER_KEYWORDS + ("Mozilla/5.0", "Mobile", "MSIE")),
                  st.text(max_size=5)),
        max_size=8,
    ).map(" ".join).flatmap(lambda s: st.sampled_from([s, s.upper(), s.title(), s.swapcase()])),
)
ips = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.ip_addresses(v=6).map(lambda a: a.exploded.upper()),
    st.ip_addresses(v=4).map(lambda a: ".".join(str(a).split(".")[:3]) + ".*"),
    st.text(alphabet="0123456789abcdefABCDEFg:.*%", max_size=45),
    st.text(),
)
stamps = st.one_of(
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)).map(
        lambda d: d.strftime("%Y%m%d%H%M%S") + f"{d.microsecond // 1000:03d}"),
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)).map(
        lambda d: d.strftime("%Y%m%d%H%M%S")),
    st.integers(min_value=0, max_value=10**13),
    st.floats(min_value=0, max_value=1e12),
    st.text(alphabet=string.digits + ".-", max_size=20),
    scalars,
)
prices = st.one_of(
    scalars,
    st.from_regex(r"[+-]?([0-9]{1,6}\.?[0-9]{0,4}|\.[0-9]{1,3})([eE][+-]?[0-9]{1,3})?", fullmatch=True),
    st.integers(min_value=-5, max_value=200),
    st.floats(min_value=-5, max_value=200),
)
tag_lists = st.one_of(
    st.none(),
    st.lists(scalars, max_size=40),
    st.tuples(scalars, scalars),
    st.lists(st.integers(min_value=10000, max_value=20000).map(str), max_size=30).map(",".join),
    st.text(alphabet="0123,", max_size=60),
    scalars,
)
FIELD_VALUES = {
    "weekday": scalars, "hour": scalars, "timestamp": stamps, "useragent": useragents, "IP": ips,
    "slotprice": prices, "usertag": tag_lists,
}


def record_strategy(keys=None):
    keys = keys or sorted(set(SPEC.sources) | {"timestamp"})
    return st.fixed_dictionaries({}, optional={k: FIELD_VALUES.get(k, scalars) for k in keys})


def assert_same(spec: FeatureSpec, records) -> dict[str, np.ndarray] | None:
    """Both implementations give identical arrays, or both refuse the input with a ValueError."""
    try:
        expected = reference.featurize(spec, records)
    except ValueError as exc:
        with pytest.raises(ValueError) as info:
            Featurizer(spec).transform(records)
        # both name the same record and the same field
        assert str(exc).split(":")[0] == str(info.value).split(":")[0]
        return None
    got = Featurizer(spec).transform(records)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == np.int64 and got[name].shape == expected[name].shape
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    return got


# -- hashing ----------------------------------------------------------------------------------------
@given(st.text(), st.integers(min_value=0, max_value=2**32 - 1))
@example("", 0)
@example("x" * 100_003, 2**32 - 1)
def test_twin_hash_matches_mmh3(value, seed):
    assert reference.hash_value(value, seed) == mmh3.hash(value, seed, signed=False)


@given(st.binary(max_size=300), st.integers(min_value=0, max_value=2**32 - 1))
def test_kernel_hash_matches_mmh3(data, seed):
    assert hash_bytes(data, seed) == mmh3.hash(data, seed, signed=False)


@given(st.text(), st.integers(min_value=0, max_value=2**32 - 1))
def test_kernel_hash_value_matches_twin(value, seed):
    assert hash_value(value, seed) == reference.hash_value(value, seed)


# -- whole records, default spec (every kind and every transform) ---------------------------------
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(record_strategy(), max_size=8))
def test_kernel_equals_twin_on_arbitrary_records(records):
    assert_same(SPEC, records)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(record_strategy(["creative", "advertiser", "slotwidth", "usertag"]),
                          record_strategy()), max_size=5))
def test_layered_records(records):
    assert_same(SPEC, records)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(record_strategy(["creative", "advertiser", "slotwidth", "usertag", "weekday", "timestamp"]),
                max_size=6), record_strategy(), record_strategy())
def test_rows_sharing_a_base_layer(tops, base, other_base):
    """One imp x many candidates: (candidate, imp) rows share the imp dict (the overlay fast path)."""
    records = [(top, base) for top in tops] + [(top, other_base) for top in tops[:2]] + ([(tops[0], base)] if tops else [])
    assert_same(SPEC, records)


def test_a_bad_base_value_shadowed_by_the_top_layer_is_not_an_error():
    base = {"timestamp": 3.87e-231, "slotprice": "cheap", "domain": "a.com"}
    records = [({"weekday": 1, "hour": 2, "slotprice": 5}, base), ({"weekday": 3, "hour": 4, "slotprice": 7}, base)]
    assert assert_same(SPEC, records) is not None
    assert assert_same(SPEC, records + [({"weekday": 1}, base)]) is None  # this one reads the bad timestamp


def test_cached_values_follow_mutation_between_calls():
    """The identity caches hold only immutable values across calls: mutated dicts and lists are re-read."""
    tags = ["1", "2"]
    imp = {"domain": "a.com", "usertag": tags, "hour": 3}
    rows = [({"creative": "c1"}, imp), ({"creative": "c2"}, imp)]
    first = FEATURIZER.transform(rows)
    tags.append("3")
    imp["domain"] = "b.com"
    second = FEATURIZER.transform(rows)
    for name in first:
        np.testing.assert_array_equal(second[name], reference.featurize(SPEC, rows)[name])
    assert (first["usertag"] != second["usertag"]).any() and (first["sparse"] != second["sparse"]).any()


@settings(max_examples=200, deadline=None)
@given(useragents)
def test_os_browser_transform(ua):
    got = assert_same(SPEC, [{"useragent": ua}])
    col = [f.name for f in SPEC.single_fields].index("os_browser")
    if got is not None and ua:
        family = reference.os_browser(ua)
        assert got["sparse"][0, col] == 1 + mmh3.hash(family, SPEC.seed, signed=False) % 4095


@settings(max_examples=300, deadline=None)
@given(ips)
def test_ip_prefix_transform(ip):
    assert_same(SPEC, [{"IP": ip}])


@settings(max_examples=300, deadline=None)
@given(stamps)
def test_timestamp_transform(stamp):
    assert_same(SPEC, [{"timestamp": stamp}, {"timestamp": stamp, "weekday": 2, "hour": None}])


@settings(max_examples=300, deadline=None)
@given(prices)
def test_bucketized_slotprice(price):
    assert_same(SPEC, [{"slotprice": price}])


@settings(max_examples=300, deadline=None)
@given(tag_lists)
def test_multi_usertag(tags):
    assert_same(SPEC, [{"usertag": tags}])


# -- arbitrary specs: every kind with random buckets, boundaries, max_len and seeds ----------------
@st.composite
def specs(draw):
    kinds = draw(st.lists(st.sampled_from(["categorical", "os_browser", "ip_prefix", "weekday", "hour",
                                           "bucketized", "multi"]), min_size=1, max_size=8))
    fields = []
    for i, kind in enumerate(kinds):
        entry = {"name": f"f{i}", "source": draw(st.sampled_from(["a", "b", "useragent", "IP", "hour"]))}
        if kind == "bucketized":
            bounds = sorted(set(draw(st.lists(st.integers(-100, 1000) | st.floats(-1e6, 1e6), min_size=1,
                                              max_size=6))))
            entry.update(kind="bucketized", boundaries=bounds)
        elif kind == "multi":
            entry.update(kind="multi", max_len=draw(st.integers(1, 20)), buckets=draw(st.integers(2, 2**31)))
        elif kind == "categorical":
            entry.update(kind="categorical", buckets=draw(st.integers(2, 2**31)))
        else:
            entry.update(kind="derived", transform=kind, buckets=draw(st.integers(2, 2**31)))
        fields.append(entry)
    seed = draw(st.integers(0, 2**32 - 1))
    return _parse_spec({"schema_version": 1, "seed": seed, "fields": fields}, "spec")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs(), st.data())
def test_kernel_equals_twin_on_arbitrary_specs(spec, data):
    values = st.one_of(scalars, useragents, ips, stamps, tag_lists)
    records = data.draw(st.lists(st.dictionaries(st.sampled_from(["a", "b", "useragent", "IP", "hour",
                                                                  "timestamp"]), values), max_size=4))
    assert_same(spec, records)


# -- specific rules ---------------------------------------------------------------------------------
def col(name):
    return [f.name for f in SPEC.single_fields].index(name)


def index_of(field, text):
    return 1 + mmh3.hash(text, SPEC.seed, signed=False) % (SPEC.field(field).buckets - 1)


def test_canonical_values():
    records = [{"region": v} for v in (None, "", float("nan"), True, False, 7, 7.0, -0.0, 2.5, 10**25,
                                       float("inf"), "7")]
    got = FEATURIZER.transform(records)["sparse"][:, col("region")]
    expected = [0, 0, 0, index_of("region", "1"), index_of("region", "0"), index_of("region", "7"),
                index_of("region", "7"), index_of("region", "0"), index_of("region", "2.5"),
                index_of("region", str(10**25)), index_of("region", "inf"), index_of("region", "7")]
    assert got.tolist() == expected


def test_transforms_follow_the_spec():
    ua = "Mozilla/5.0 (Linux; Android 10) AppleWebKit/537.36 Chrome/120 Mobile Safari/537.36"
    assert reference.os_browser(ua) == "android_chrome"
    assert reference.os_browser("Mozilla/4.0 (compatible; MSIE 8.0; Windows NT 6.1)") == "windows_ie"
    assert reference.os_browser("curl/8") == "other_other"
    assert reference.ip_prefix("222.94.35.*") == "222.94.35.*"
    assert reference.ip_prefix("10.1.2.3") == "10.1.2.*"
    assert reference.ip_prefix("2001:0DB8:0:0::1") == "2001:db8:0:0:*"
    assert reference.ip_prefix("::ffff:1.2.3.4") == "1.2.3.*"
    assert reference.ip_prefix("not-an-ip") == "not-an-ip"
    assert reference.timestamp_parts("20130606000104828", "t") == (3, 0)  # a Thursday
    assert reference.timestamp_parts(1370476800, "t") == (3, 0)  # 2013-06-06T00:00Z
    row = FEATURIZER.transform([{"timestamp": "20130606231500000"}])["sparse"][0]
    assert row[col("weekday")] == index_of("weekday", "3")
    assert row[col("hour")] == index_of("hour", "23")


def test_explicit_weekday_wins_over_timestamp():
    row = FEATURIZER.transform([{"weekday": 5, "hour": 9, "timestamp": "20130606231500000"}])["sparse"][0]
    assert row[col("weekday")] == index_of("weekday", "5")
    assert row[col("hour")] == index_of("hour", "9")


@pytest.mark.parametrize("price,bucket", [(None, 0), (-3, 1), (0, 1), (1, 2), (10, 2), (10.5, 3),
                                          (50, 3), (51, 4), (100, 4), (101, 5), ("300", 5), ("", 0),
                                          (float("inf"), 5), (10**400, 5)])
def test_slotprice_buckets(price, bucket):
    assert FEATURIZER.transform([{"slotprice": price}])["sparse"][0, col("slotprice")] == bucket


def test_usertag_padding_truncation_and_missing_elements():
    tags = [str(10000 + i) for i in range(40)]
    got = FEATURIZER.transform([{"usertag": tags}, {"usertag": [None, "", "a"]}, {"usertag": "a,,b"},
                                {"usertag": []}, {}])["usertag"]
    assert got.shape == (5, 16)
    assert got[0].tolist() == [index_of("usertag", t) for t in tags[:16]]
    assert got[1].tolist() == [index_of("usertag", "a")] + [0] * 15
    assert got[2].tolist() == [index_of("usertag", "a"), index_of("usertag", "b")] + [0] * 14
    assert not got[3].any() and not got[4].any()


def test_huge_strings_are_hashed_whole():
    big = "domain-" * 200_000
    got = FEATURIZER.transform([{"domain": big, "useragent": "x" * 10_000 + "Windows Firefox",
                                 "IP": "1" * 5000 + ".2.3.4"}])
    assert got["sparse"][0, col("domain")] == index_of("domain", big)
    assert_same(SPEC, [{"domain": big, "useragent": "x" * 10_000 + "Windows Firefox", "IP": "1" * 5000 + ".2.3.4"}])


@pytest.mark.parametrize("field", ["domain", "useragent", "IP", "usertag", "slotprice", "timestamp"])
def test_lone_surrogate_is_a_clear_error(field):
    for impl in (FEATURIZER.transform, lambda r: reference.featurize(SPEC, r)):
        with pytest.raises(ValueError, match=rf"record 1: field '{field}'.*"):
            impl([{}, {field: "ab\ud800c"}])


@pytest.mark.parametrize("record,message", [
    ({"domain": ["a"]}, "field 'domain': expected a string"),
    ({"domain": b"raw"}, "field 'domain': expected a string"),
    ({"slotprice": "cheap"}, "field 'slotprice': expected a number"),
    ({"timestamp": "yesterday"}, "field 'timestamp': cannot read timestamp"),
    ({"usertag": [["nested"]]}, "field 'usertag': expected a string"),
])
def test_bad_values_name_the_field(record, message):
    for impl in (FEATURIZER.transform, lambda r: reference.featurize(SPEC, r)):
        with pytest.raises(ValueError, match=f"record 0: {message}"):
            impl([record])


def test_records_must_be_mappings():
    for impl in (FEATURIZER.transform, lambda r: reference.featurize(SPEC, r)):
        with pytest.raises(ValueError, match="record 0: expected a mapping"):
            impl([["not", "a", "record"]])


def test_other_mappings_and_iterables():
    records = [OrderedDict(domain="a.com", hour=3), {"domain": "b.com"}]
    np.testing.assert_array_equal(FEATURIZER.transform(iter(records))["sparse"],
                                  reference.featurize(SPEC, records)["sparse"])


# -- transform_into: caller-owned buffers ---------------------------------------------------------
def test_transform_into_writes_the_first_rows_only():
    buffers = SPEC.allocate(10)
    for arr in buffers.values():
        arr.fill(-1)
    records = [{"domain": "a.com", "usertag": ["1", "2"]}, {"hour": 3}]
    assert FEATURIZER.transform_into(buffers, records) == 2
    expected = reference.featurize(SPEC, records)
    for name in buffers:
        np.testing.assert_array_equal(buffers[name][:2], expected[name])
        assert (buffers[name][2:] == -1).all()


@pytest.mark.parametrize("mutate,message", [
    (lambda b: b.pop("usertag"), "no array for model input 'usertag'"),
    (lambda b: b.update(sparse=b["sparse"].astype(np.int32)), "2-D int64"),
    (lambda b: b.update(sparse=np.zeros((4, 3), np.int64)), "expected 18 columns"),
    (lambda b: b.update(sparse=np.zeros((1, 18), np.int64)), "do not fit in 1 rows"),
    (lambda b: b.update(sparse=np.zeros((4, 36), np.int64)[:, ::2]), "rows must be contiguous"),
    (lambda b: b["sparse"].setflags(write=False), "read-only"),
])
def test_transform_into_validates_buffers(mutate, message):
    buffers = SPEC.allocate(4)
    mutate(buffers)
    with pytest.raises(ValueError, match=message):
        FEATURIZER.transform_into(buffers, [{}, {}])


def test_no_python_allocation_per_row():
    """Steady state: featurizing 20k rows allocates no Python object per row.

    sys.getallocatedblocks() counts live interpreter memory blocks; a per-row allocation that is
    freed again would not show there, so tracemalloc also checks the peak stays O(1).
    """
    import tracemalloc

    base = {"weekday": 3, "hour": 14, "useragent": "Mozilla/5.0 (Windows NT 6.1) Chrome/27 Safari/537",
            "IP": "222.94.35.12", "region": 80, "city": 85, "adexchange": 2, "domain": "trqRTuT-GNTYJNKbuKz",
            "url": "a1b2c3", "urlid": None, "slotid": "mm_10027070_118039_10308280", "slotwidth": 300,
            "slotheight": 250, "slotvisibility": "FirstView", "slotformat": "Na", "slotprice": 50,
            "creative": "e39e178ffdf366606f8cab791ee56bcd", "advertiser": 1458, "usertag": ["10006", "10024"],
            "timestamp": "20130606000104828"}
    records = [dict(base, slotid=f"slot-{i % 97}") for i in range(20_000)]
    buffers = SPEC.allocate(len(records))
    FEATURIZER.transform_into(buffers, records)  # warm-up
    blocks = sys.getallocatedblocks()
    tracemalloc.start()
    FEATURIZER.transform_into(buffers, records)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert sys.getallocatedblocks() - blocks < 50
    assert peak < 16_384, f"peak {peak} bytes while featurizing {len(records)} rows"

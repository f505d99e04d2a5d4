"""Feature spec: round trips, layout and validation errors that name the bad entry."""
from __future__ import annotations

import copy
import json

import pytest

from bidder import DEFAULT_BUNDLE, default_spec, load_spec
from bidder.spec import RAW_FIELDS, SpecError


def test_default_spec_covers_the_ipinyou_schema():
    spec = default_spec()
    assert {f.source for f in spec.fields} == set(RAW_FIELDS)
    assert len(spec.single_fields) == 18 and [f.name for f in spec.multi_fields] == ["usertag"]
    kinds = {f.kind for f in spec.fields}
    assert kinds == {"categorical", "derived", "bucketized", "multi"}
    assert {f.transform for f in spec.fields if f.kind == "derived"} == {"os_browser", "ip_prefix", "weekday", "hour"}
    assert spec.input_names == ("sparse", "usertag")
    assert spec.input_width("sparse") == 18 and spec.input_width("usertag") == 16
    assert spec.field("slotprice").buckets == 6
    offsets = spec.sparse_offsets
    assert offsets[0] == 0 and offsets[1] == spec.single_fields[0].buckets


def test_round_trip_through_a_file_and_a_bundle_dir(tmp_path):
    spec = default_spec(seed=99)
    path = spec.save(tmp_path)
    assert path == tmp_path / "spec.json"
    assert load_spec(tmp_path) == spec == load_spec(path)
    assert load_spec(tmp_path).digest == spec.digest != default_spec().digest


def test_allocate_gives_zeroed_int64_buffers():
    buffers = default_spec().allocate(7)
    assert {k: (v.shape, v.dtype.name) for k, v in buffers.items()} == {
        "sparse": ((7, 18), "int64"), "usertag": ((7, 16), "int64")}


def test_default_bundle_directory_holds_a_valid_spec():
    assert load_spec(DEFAULT_BUNDLE).input_names == ("sparse", "usertag")


def _with(change):
    data = copy.deepcopy(default_spec().to_dict())
    change(data)
    return data


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(schema_version=2), "schema_version must be 1"),
    (lambda d: d.update(seed=-1), "seed must be an integer"),
    (lambda d: d.update(hash="md5"), "hash must be 'murmur3_x86_32'"),
    (lambda d: d.update(fields=[]), "fields must be a non-empty list"),
    (lambda d: d.update(extra=1), r"unknown key\(s\) \['extra'\]"),
    (lambda d: d["fields"][3].update(buckets=1), r"fields\[3\] \('ip_prefix'\): buckets must be"),
    (lambda d: d["fields"][4].update(buckets="many"), r"fields\[4\] \('region'\): buckets must be"),
    (lambda d: d["fields"][4].update(kind="hashed"), r"fields\[4\] \('region'\): kind must be one of"),
    (lambda d: d["fields"][2].update(transform="ua"), r"fields\[2\] \('os_browser'\): transform must be"),
    (lambda d: d["fields"][15].update(boundaries=[10, 5]), r"fields\[15\] \('slotprice'\): boundaries must be strictly"),
    (lambda d: d["fields"][15].update(boundaries=[]), r"fields\[15\] \('slotprice'\): boundaries must be a non-empty"),
    (lambda d: d["fields"][15].update(buckets=9), r"fields\[15\] \('slotprice'\): buckets must be len"),
    (lambda d: d["fields"][18].update(max_len=0), r"fields\[18\] \('usertag'\): max_len must be"),
    (lambda d: d["fields"][5].update(name="region"), r"fields\[5\] \('region'\): duplicate field name"),
    (lambda d: d["fields"][5].update(name="1city"), r"fields\[5\] \('1city'\): name must be an identifier"),
    (lambda d: d["fields"][5].update(max_len=3), r"fields\[5\] \('city'\): unknown key\(s\) \['max_len'\]"),
    (lambda d: d["fields"][5].update(source=""), r"fields\[5\] \('city'\): source must be"),
    (lambda d: d["fields"].__setitem__(0, "weekday"), r"fields\[0\]: expected an object"),
])
def test_validation_errors_name_the_entry(tmp_path, change, message):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(_with(change)))
    with pytest.raises(SpecError, match=message) as info:
        load_spec(path)
    assert str(path) in str(info.value)


def test_unreadable_files_are_spec_errors(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "missing.json")
    (tmp_path / "spec.json").write_text("{not json")
    with pytest.raises(SpecError, match="invalid JSON at line 1"):
        load_spec(tmp_path)
    (tmp_path / "spec.json").write_text("[1, 2]")
    with pytest.raises(SpecError, match="spec.json: expected a JSON object, got list"):
        load_spec(tmp_path)

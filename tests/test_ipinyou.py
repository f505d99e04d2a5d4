"""The make-ipinyou-data reader and the featurized dataset: headers, bad lines, null, usertag, splits."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bidder import Featurizer
from bidder.spec import RAW_FIELDS, default_spec
from train.__main__ import main
from train.data.dataset import load_dataset
from train.data.ipinyou import REQUIRED_COLUMNS, LogReader
from train.errors import DataError

HEADER = ("click weekday hour bidid timestamp logtype ipinyouid useragent IP region city adexchange domain url "
          "urlid slotid slotwidth slotheight slotvisibility slotformat slotprice creative bidprice payprice keypage "
          "advertiser usertag").split()


def line(**overrides) -> str:
    values = {
        "click": "0", "weekday": "3", "hour": "14", "bidid": "b1", "timestamp": "20130606141502123", "logtype": "1",
        "ipinyouid": "u1", "useragent": "Mozilla/4.0 (compatible; MSIE 8.0; Windows NT 5.1)", "IP": "1.2.3.*",
        "region": "80", "city": "85", "adexchange": "2", "domain": "dom", "url": "url", "urlid": "null",
        "slotid": "slot", "slotwidth": "300", "slotheight": "250", "slotvisibility": "FirstView",
        "slotformat": "Na", "slotprice": "50", "creative": "cre", "bidprice": "300", "payprice": "80",
        "keypage": "null", "advertiser": "1458", "usertag": "10006,10024",
    }
    values.update(overrides)
    return "\t".join(values[c] for c in HEADER)


def write_log(path: Path, lines: list[str], header: list[str] = HEADER) -> Path:
    path.write_text("\t".join(header) + "\n" + "".join(f"{x}\n" for x in lines))
    return path


def read_all(path: Path, **kwargs) -> tuple[list[dict], list[float], LogReader]:
    reader = LogReader(path, **kwargs)
    records, labels = [], []
    for chunk in reader:
        records += chunk.records
        labels += chunk.labels.tolist()
    return records, labels, reader


def test_reads_records_with_null_and_usertag_lists(tmp_path):
    path = write_log(tmp_path / "train.log.txt", [
        line(click="1"),
        line(usertag="null", adexchange="null", domain=""),
        line(usertag="10006", timestamp="null"),
    ])
    records, labels, _ = read_all(path)
    assert labels == [1.0, 0.0, 0.0]
    assert set(records[0]) == set(RAW_FIELDS) | {"timestamp"}
    assert records[0]["usertag"] == ["10006", "10024"]
    assert records[0]["urlid"] is None
    assert records[1]["usertag"] is None and records[1]["adexchange"] is None and records[1]["domain"] is None
    assert records[2]["usertag"] == ["10006"] and records[2]["timestamp"] is None
    assert records[0]["slotprice"] == "50" and records[0]["weekday"] == "3"


def test_records_hash_like_typed_values(tmp_path):
    """The strings read from a log featurize exactly like the ints and lists the server builds."""
    path = write_log(tmp_path / "train.log.txt", [line()])
    records, _, _ = read_all(path)
    typed = dict(records[0], weekday=3, hour=14, region=80, city=85, adexchange=2, slotwidth=300, slotheight=250,
                 slotprice=50, advertiser=1458, usertag=["10006", "10024"])
    featurizer = Featurizer(default_spec())
    got, want = featurizer.transform(records), featurizer.transform([typed])
    for name in got:
        np.testing.assert_array_equal(got[name], want[name])


def test_missing_columns_are_named(tmp_path):
    header = [c for c in HEADER if c not in ("usertag", "slotprice")]
    path = write_log(tmp_path / "train.log.txt", [], header=header)
    with pytest.raises(DataError, match=r"train\.log\.txt:1: missing column\(s\) slotprice, usertag"):
        LogReader(path)


def test_empty_and_absent_files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty file"):
        LogReader(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="no such file"):
        LogReader(tmp_path / "absent.txt")


def test_extra_and_reordered_columns_are_fine(tmp_path):
    header = list(reversed(HEADER)) + ["extra"]
    values = dict(zip(HEADER, line(click="1").split("\t")), extra="x")
    path = write_log(tmp_path / "t.txt", ["\t".join(values[c] for c in header)], header=header)
    records, labels, _ = read_all(path)
    assert labels == [1.0] and records[0]["advertiser"] == "1458"


@pytest.mark.parametrize("bad, reason", [
    ("\t".join(line().split("\t")[:-2]), "expected 27 tab-separated columns, got 25"),
    (line(click="yes"), "column 'click'"),
    (line(timestamp="2013-06-06"), "column 'timestamp'"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad, reason):
    path = write_log(tmp_path / "train.log.txt", [line(), line(), bad, line()])
    with pytest.raises(DataError) as err:
        read_all(path)
    assert f"train.log.txt:4: {reason}" in str(err.value)


def test_skip_bad_lines_counts_and_reports(tmp_path):
    path = write_log(tmp_path / "train.log.txt", [line(), "garbage", line(click="1"), line(click="-1")])
    records, labels, reader = read_all(path, skip_bad_lines=True)
    assert labels == [0.0, 1.0] and len(records) == 2
    assert reader.bad_lines.count == 2
    assert reader.bad_lines.examples[0].endswith("train.log.txt:3: expected 27 tab-separated columns, got 1")
    assert "skipped 2 malformed line(s)" in reader.bad_lines.summary()


def test_invalid_utf8_is_a_bad_line(tmp_path):
    path = tmp_path / "train.log.txt"
    path.write_bytes(("\t".join(HEADER) + "\n").encode() + line().encode() + b"\xff\n")
    with pytest.raises(DataError, match=r"train\.log\.txt:2: not UTF-8"):
        read_all(path)


def test_value_the_featurizer_rejects_names_the_line(tmp_path):
    write_log(tmp_path / "train.log.txt", [line()] * 5 + [line(slotprice="cheap")] + [line()] * 5)
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path, default_spec(), progress=False)
    assert "train.log.txt:7:" in str(err.value) and "slotprice" in str(err.value)
    data = load_dataset(tmp_path, default_spec(), progress=False, skip_bad_lines=True)
    assert data.bad_lines.count == 1 and sum(data.rows().values()) == 10


def test_streams_in_chunks(tmp_path):
    path = write_log(tmp_path / "train.log.txt", [line(bidid=str(i)) for i in range(10)])
    chunks = list(LogReader(path, chunk_rows=3))
    assert [len(c.records) for c in chunks] == [3, 3, 3, 1]
    assert chunks[-1].line_numbers == [11]


def test_timestamps_in_every_accepted_form_sort_chronologically(tmp_path):
    stamps = ["20130606141502123", "20130606141503", "1370528104", "1370528105000"]  # the last two: UTC seconds, ms
    path = write_log(tmp_path / "train.log.txt", [line(timestamp=s) for s in stamps])
    chunk = next(iter(LogReader(path)))
    assert chunk.timestamps.tolist() == [20130606141502123, 20130606141503000, 20130606141504000,
                                         20130606141505000]


def test_time_ordered_split_and_sources(tmp_path):
    # lines out of order: the split sorts by time, so validation holds the latest training lines
    lines = [line(hour=str(10 + i % 10), timestamp=f"201306061{i % 10}0000000", click=str(i % 2))
             for i in range(30)]
    write_log(tmp_path / "train.log.txt", lines)
    write_log(tmp_path / "test.log.txt", [line(click="1"), line()])
    data = load_dataset(tmp_path, default_spec(), progress=False)
    assert data.split == "time" and data.source == "ipinyou"
    assert data.rows() == {"train": 27, "val": 3, "test": 2}
    hour_col = [f.name for f in default_spec().single_fields].index("hour")
    index_of = {h: Featurizer(default_spec()).transform([{"hour": h}])["sparse"][0, hour_col] for h in range(10, 20)}
    assert (data.val.inputs["sparse"][:, hour_col] == index_of[19]).all()
    assert index_of[19] not in data.train.inputs["sparse"][:, hour_col]
    assert data.test.pctr_true is None
    assert len(data.digest) == 64


def test_random_split_without_timestamps_and_without_test_file(tmp_path):
    header = [c for c in HEADER if c != "timestamp"]
    rows = [dict(zip(HEADER, line(bidid=str(i)).split("\t"))) for i in range(40)]
    write_log(tmp_path / "train.log.txt", ["\t".join(r[c] for c in header) for r in rows], header=header)
    a = load_dataset(tmp_path, default_spec(), progress=False, seed=1)
    b = load_dataset(tmp_path, default_spec(), progress=False, seed=1)
    assert a.split == "random" and a.rows() == {"train": 32, "val": 4, "test": 4}
    np.testing.assert_array_equal(a.val.inputs["sparse"], b.val.inputs["sparse"])


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        load_dataset(tmp_path / "nope", default_spec(), progress=False)
    with pytest.raises(DataError, match="no train.log.txt"):
        load_dataset(tmp_path, default_spec(), progress=False)


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    write_log(tmp_path / "train.log.txt", [line(), "broken line"])
    code = main(["fit", "--data", str(tmp_path), "--model", "deepfm", "--out", str(tmp_path / "b"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "error:" in err and "train.log.txt:3: expected 27 tab-separated columns" in err
    assert "Traceback" not in err


def test_required_columns_are_the_raw_schema_plus_click():
    assert REQUIRED_COLUMNS == ("click",) + RAW_FIELDS

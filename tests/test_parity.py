"""Parity: what the bidder serves vs plain Python ONNX Runtime on the pure-Python twin's features.

(a) Cython featurizer arrays == reference.featurize arrays, exactly;
(b) Scorer.predict (Cython + IO binding) at batch sizes 1, 7, 64, 256 vs InferenceSession.run();
(c) the same through HTTP /predict on a live server process.
Every served architecture is covered; the max |Δ| figures are printed (pytest -s shows them).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bidder import Featurizer, load_spec, reference
from bidder.scorer import Scorer
from processes import Server

TOLERANCE = 1e-6
ARCHITECTURES = ["deepfm", "autoint", "dcnv2", "tabtransformer", "lightgbm"]
N_RECORDS = 2000
UNICODE = ["北京", "上海市", "café", "🙂🚀", "Ωmega", "naïve", "ñ", "東京都", "\u200b", "a\u0301"]


def parity_records(n: int, seed: int) -> list[dict]:
    """Records with missing values, usertag lists of every length 0-20, unicode and odd numbers."""
    rng = random.Random(seed)

    def maybe(value, p_missing=0.15):
        r = rng.random()
        if r < p_missing / 3:
            return None
        if r < 2 * p_missing / 3:
            return ""
        if r < p_missing:
            return _ABSENT
        return value

    def text(prefix, cardinality):
        value = f"{prefix}{rng.randrange(cardinality)}"
        return value + rng.choice(UNICODE) if rng.random() < 0.2 else value

    agents = ["Mozilla/5.0 (Windows NT 6.1) AppleWebKit/537.36 Chrome/27.0 Safari/537.36",
              "Mozilla/5.0 (iPhone; CPU iPhone OS 16_0 like Mac OS X) Safari/604.1",
              "Mozilla/5.0 (Linux; Android 13) Chrome/120 Mobile", "Mozilla/4.0 (compatible; MSIE 8.0)",
              "Opera/9.80 (X11; Linux x86_64)", "Dalvik/2.1.0 (Linux; U; Android 9) 🙂"]
    out = []
    for i in range(n):
        record = {
            "weekday": maybe(rng.randrange(7)), "hour": maybe(rng.randrange(24)),
            "timestamp": maybe(f"201306{rng.randrange(6, 13):02d}{rng.randrange(24):02d}{rng.randrange(60):02d}"
                               f"{rng.randrange(60):02d}{rng.randrange(1000):03d}"),
            "useragent": maybe(rng.choice(agents)), "IP": maybe(rng.choice(
                [f"{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}.*",
                 f"2001:db8:{rng.randrange(65536):x}::{rng.randrange(65536):x}"])),
            "region": maybe(rng.randrange(400)), "city": maybe(rng.randrange(400)),
            "adexchange": maybe(rng.randrange(1, 5)), "domain": maybe(text("dom", 500)),
            "url": maybe(text("url", 2000)), "urlid": maybe(None), "slotid": maybe(text("slot", 3000)),
            "slotwidth": maybe(rng.choice([300, 728, 160, 336, 1000, 950])),
            "slotheight": maybe(rng.choice([250, 90, 600, 280, 60])),
            "slotvisibility": maybe(rng.choice(["FirstView", "SecondView", "OtherView", 0, 1, 2, 255])),
            "slotformat": maybe(rng.choice(["Na", "Fixed", 0, 1, 5])),
            "slotprice": maybe(rng.choice([0, 5, 10, 11, 50, 70, 100, 101, 238, 0.5, "42"])),
            "creative": maybe(text("cr", 60)), "advertiser": maybe(rng.choice(
                [1458, 2259, 2261, 2821, 2997, 3358, 3386, 3427, 3476])),
            "usertag": [text("1", 90) for _ in range(i % 21)] if i % 7 else ",".join(
                str(10000 + rng.randrange(70)) for _ in range(i % 21)),
        }
        out.append({k: v for k, v in record.items() if v is not _ABSENT})
    return out


_ABSENT = object()


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return parity_records(N_RECORDS, seed=2013)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def bundle(request, synthetic_data, small_bundle, tmp_path_factory) -> Path:
    if request.param == "deepfm":
        return small_bundle
    if request.param == "lightgbm":
        from bidder.spec import default_spec
        from train.data.dataset import load_dataset
        from train.fit import save_gbdt_bundle
        from train.gbdt import train_gbdt

        dataset = load_dataset(synthetic_data, default_spec(), progress=False)
        model, metrics = train_gbdt(dataset, progress=False)
        return save_gbdt_bundle(model, metrics, dataset, tmp_path_factory.mktemp("lightgbm"))
    from train.fit import fit_bundle

    return fit_bundle(synthetic_data, request.param, tmp_path_factory.mktemp(request.param), epochs=1,
                      progress=False)


def plain_session(bundle: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])


def expected_ctr(bundle: Path, records: list[dict]) -> np.ndarray:
    feed = reference.featurize(load_spec(bundle), records)
    return plain_session(bundle).run(["ctr"], feed)[0].reshape(-1)


def test_featurizer_equals_twin_on_generated_records(records, small_bundle):
    spec = load_spec(small_bundle)
    kernel = Featurizer(spec).transform(records)
    twin = reference.featurize(spec, records)
    for name in spec.input_names:
        np.testing.assert_array_equal(kernel[name], twin[name], err_msg=name)
    lengths = {int((row != 0).sum()) for row in twin["usertag"]}
    assert lengths >= set(range(17)), "usertag lists of every length up to max_len"
    print(f"\n[parity a] {len(records)} records: Cython == twin on {', '.join(spec.input_names)}")


@pytest.mark.parametrize("batch", [1, 7, 64, 256])
def test_scorer_matches_plain_onnxruntime(bundle, records, batch):
    expected = expected_ctr(bundle, records)
    scorer = Scorer(bundle, max_batch=256)
    got = np.concatenate([scorer.predict(records[i:i + batch]) for i in range(0, len(records), batch)])
    assert got.shape == expected.shape and got.dtype == np.float32
    diff = float(np.max(np.abs(got - expected)))
    arch = json.loads((bundle / "meta.json").read_text())["architecture"]
    print(f"\n[parity b] {arch} batch {batch}: max |Δ| = {diff:.3g} over {len(records)} rows")
    assert diff <= TOLERANCE


@pytest.mark.slow
def test_http_predict_matches_plain_onnxruntime(bundle, records):
    with Server("--model", str(bundle)) as server:
        server.wait_ready()
        expected = expected_ctr(bundle, records)
        got = []
        for i in range(0, len(records), 100):
            status, body = server.post("/predict", json.dumps({"records": records[i:i + 100]}).encode())
            assert status == 200, body
            got.extend(json.loads(body)["ctr"])
        got = np.asarray(got, dtype=np.float64)
        diff = float(np.max(np.abs(got - expected)))
        print(f"\n[parity c] HTTP /predict: max |Δ| = {diff:.3g} over {len(records)} rows")
        assert diff <= TOLERANCE
        assert server.stop() == 0

"""Factorized DeepFM scoring: equal to model.onnx, refused where it does not apply, checked at load.

The micro-benchmarks at the end (`pytest --benchmark`) compare row scoring with factorized scoring
for 1 imp × 9 candidates, 8 imps × 72 rows and 32 × 288, featurization included.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from bidder import DEFAULT_BUNDLE, default_spec
from bidder.app import DEFAULT_CAMPAIGNS
from bidder.campaigns import CANDIDATE_FIELDS, load_catalog
from bidder.factorized import CANDIDATE_FILE, FACTORIZED_FILE, FactorizedScorer, candidate_fields
from bidder.scorer import BundleError, Scorer
from catalogs import parse_catalog
from train.__main__ import main as train_main
from train.bundle import write_bundle
from train.calibrate import Calibration
from train.errors import ParityError, TrainError
from train.export import export_lean
from train.factorize import check_parity, factorize_bundle
from train.fit import fit_bundle
from train.models import build_model, resolve_hyperparameters

from tamper import restamp

TOLERANCE = 1e-6
SHAPES = [(1, 1), (1, 9), (3, 27), (32, 288)]


@pytest.fixture(scope="module")
def catalog():
    return load_catalog(DEFAULT_CAMPAIGNS)


@pytest.fixture(scope="module", params=["default", "small"])
def bundle(request) -> Path:
    return DEFAULT_BUNDLE if request.param == "default" else request.getfixturevalue("small_bundle")


@pytest.fixture(scope="module")
def scorer(bundle) -> Scorer:
    return Scorer(bundle, max_batch=512)


@pytest.fixture(scope="module")
def factorized(scorer, catalog) -> FactorizedScorer:
    f = FactorizedScorer.for_scorer(scorer, max_imps=32, max_rows=512)
    f.set_candidates([c.layer for c in catalog.candidates])
    return f


def canonical(scorer: Scorer, imps: list[dict], layers: list[dict], row_imp, row_cand) -> np.ndarray:
    return scorer.score([(layers[c], imps[i]) for i, c in zip(row_imp, row_cand)]).copy()


def fill(f: FactorizedScorer, imps: list[dict], row_imp, row_cand) -> int:
    f.featurizer.transform_into(f.imp_inputs, imps)
    f.row_imp[:len(row_imp)] = row_imp
    f.row_cand[:len(row_cand)] = row_cand
    return len(row_imp)


def assert_scores_as_model_onnx(bundle, catalog, records: list[dict]) -> None:
    """The bundle's factorized graphs score 4 imps x every candidate (64 rows) as its model.onnx does."""
    scorer = Scorer(bundle)
    f = FactorizedScorer.for_scorer(scorer, max_imps=4, max_rows=64)  # the load-time parity check
    assert f.kernel is not None, f.kernel_unsupported  # the native kernel computes this shape of graph
    layers = [c.layer for c in catalog.candidates]
    f.set_candidates(layers)
    row_imp, row_cand = np.arange(64) % 4, np.arange(64) % len(layers)
    expected = canonical(scorer, records[:4], layers, row_imp, row_cand)
    assert expected.std() > 1e-3
    np.testing.assert_allclose(f.run(4, fill(f, records[:4], row_imp, row_cand)), expected, rtol=0,
                               atol=TOLERANCE)


# -- the split ----------------------------------------------------------------------------------------------
def test_candidate_fields_are_the_catalog_layer_keys(catalog):
    assert all(tuple(c.layer) == CANDIDATE_FIELDS for c in catalog.candidates)
    assert candidate_fields(default_spec()) == ("slotwidth", "slotheight", "creative", "advertiser")


def test_bundles_list_their_factorized_graphs(bundle, scorer):
    meta = json.loads((bundle / "meta.json").read_text())
    entry = meta["graphs"]["factorized"]
    assert entry["files"] == [CANDIDATE_FILE, FACTORIZED_FILE]
    assert entry["candidate_fields"] == ["slotwidth", "slotheight", "creative", "advertiser"]
    hidden = meta["hyperparameters"]["dnn_hidden_units"][0]  # 256, or the shipped student's 64
    assert entry["layout"] == {"width": hidden + 10, "dnn_first_layer": [0, hidden], "scalar": [hidden, hidden + 1],
                               "scalar_negated": [hidden + 1, hidden + 2], "fm_sum": [hidden + 2, hidden + 10]}
    assert entry["parity"]["rows"] >= 1000 and entry["parity"]["max_abs_diff"] <= TOLERANCE
    assert scorer.factorized_files() == (bundle / CANDIDATE_FILE, bundle / FACTORIZED_FILE)
    # the canonical graph is the one the bundle was exported with
    assert meta["onnx_sha256"] == hashlib.sha256((bundle / "model.onnx").read_bytes()).hexdigest()


# -- parity -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_imps, rows", SHAPES)
def test_factorized_equals_canonical_on_catalog_rows(scorer, factorized, catalog, sample_records, n_imps, rows):
    layers = [c.layer for c in catalog.candidates]
    rng = np.random.default_rng(n_imps * 1000 + rows)
    imps = sample_records[5 * n_imps:6 * n_imps]
    # every imp at least once, then random (repeated, unsorted) imps and candidates
    row_imp = rng.permutation(np.concatenate([np.arange(n_imps), rng.integers(0, n_imps, rows - n_imps)]))
    row_cand = rng.integers(0, len(layers), rows)
    expected = canonical(scorer, imps, layers, row_imp, row_cand)
    got = factorized.run(n_imps, fill(factorized, imps, row_imp, row_cand))
    assert got.shape == (rows,)
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE)
    assert np.unique(got).size > 1 or rows == 1


def test_one_request_in_catalog_order(scorer, factorized, catalog, sample_records):
    """The bid path's shape: one imp, every creative of its size, rows in catalog order."""
    eligible = catalog.for_size(300, 250)
    assert len(eligible) == 9
    number = {c.creative_id: i for i, c in enumerate(catalog.candidates)}
    imp = sample_records[3]
    rows = fill(factorized, [imp], [0] * 9, [number[c.creative_id] for c in eligible])
    expected = scorer.score([(c.layer, imp) for c in eligible])
    np.testing.assert_allclose(factorized.run(1, rows), expected, rtol=0, atol=TOLERANCE)


def test_load_time_parity_check(scorer, factorized):
    assert factorized.check_parity(scorer, rows=1000) <= TOLERANCE
    assert factorized.check_parity(scorer.session, rows=2000, seed=1) <= TOLERANCE


def test_bindings_are_reused_and_bounded(scorer, catalog, sample_records):
    """ONNX Runtime's bindings, when it runs the graph (``bidder serve --graph-rows``)."""
    f = FactorizedScorer(scorer.bundle, scorer.spec, scorer.featurizer, max_imps=4, max_rows=16, max_bindings=3,
                         native=False)
    f.set_candidates([c.layer for c in catalog.candidates])
    layers = [c.layer for c in catalog.candidates]
    imps = sample_records[:4]
    for n_imps, rows in itertools.product(range(1, 5), (1, 7, 16)):
        row_imp, row_cand = np.arange(rows) % n_imps, (np.arange(rows) * 5) % len(layers)
        got = f.run(n_imps, fill(f, imps[:n_imps], row_imp, row_cand))
        np.testing.assert_allclose(got, canonical(scorer, imps, layers, row_imp, row_cand), rtol=0, atol=TOLERANCE)
        assert len(f._bindings) <= 3
    binding = f._bindings[(4, 16)][0]
    f.run(4, 16)
    assert f._bindings[(4, 16)][0] is binding and len(f.run(4, 0)) == 0


def test_set_candidates_on_a_reloaded_catalog(scorer, catalog, sample_records):
    f = FactorizedScorer.for_scorer(scorer, max_imps=2, max_rows=64)
    f.set_candidates([c.layer for c in catalog.candidates])
    data = json.loads(DEFAULT_CAMPAIGNS.read_text())
    # the reload drops a campaign, reverses the others and adds a creative the model has never seen
    data["campaigns"] = data["campaigns"][1:][::-1]
    data["campaigns"][0]["creatives"].append({"id": "brand-new", "w": 300, "h": 250, "adomain": ["new.example"],
                                              "nurl": "https://win.example/?p=${AUCTION_PRICE}"})
    reloaded = parse_catalog(data, "reloaded")
    f.run(2, fill(f, sample_records[:2], [0, 1], [0, 1]))  # a binding over the old candidates
    layers = [c.layer for c in reloaded.candidates]
    f.set_candidates(layers)
    assert f.n_candidates == len(layers) and f.cand_part.shape == (len(layers), f.width)
    row_imp, row_cand = np.array([0, 1] * len(layers)), np.repeat(np.arange(len(layers)), 2)
    got = f.run(2, fill(f, sample_records[:2], row_imp, row_cand))
    np.testing.assert_allclose(got, canonical(scorer, sample_records[:2], layers, row_imp, row_cand),
                               rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("native", [True, False])
def test_run_refuses_what_it_cannot_score(scorer, catalog, native):
    f = FactorizedScorer(scorer.bundle, scorer.spec, scorer.featurizer, max_imps=2, max_rows=8, native=native)
    assert (f.kernel is not None) == native
    with pytest.raises(RuntimeError, match="set_candidates"):
        f.run(1, 1)
    f.set_candidates([c.layer for c in catalog.candidates])
    with pytest.raises(ValueError, match="n_imps"):
        f.run(3, 4)
    with pytest.raises(ValueError, match="rows"):
        f.run(1, 9)
    f.row_cand[:1] = len(catalog.candidates)  # no such candidate: ONNX Runtime (or the kernel) refuses the index
    with pytest.raises(Exception, match="(?i)indices|out of|bound"):
        f.run(1, 1)
    f.row_cand[:1], f.row_imp[:1] = 0, 1  # no such imp in a batch of one
    with pytest.raises(Exception, match="(?i)indices|out of|bound"):
        f.run(1, 1)


# -- what is refused ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def logreg_bundle(synthetic_data, tmp_path_factory) -> Path:
    return fit_bundle(synthetic_data, "logreg", tmp_path_factory.mktemp("logreg"), epochs=1, progress=False)


def test_non_deepfm_bundles_keep_row_scoring(logreg_bundle, capsys):
    assert not (logreg_bundle / CANDIDATE_FILE).exists() and not (logreg_bundle / FACTORIZED_FILE).exists()
    scorer = Scorer(logreg_bundle)
    assert scorer.meta["graphs"] == {} and scorer.factorized_files() == ()
    with pytest.raises(BundleError, match="no factorized graph"):
        FactorizedScorer.for_scorer(scorer)
    with pytest.raises(TrainError, match="needs a DeepFM bundle, this one is 'logreg'"):
        factorize_bundle(logreg_bundle)
    assert train_main(["factorize", "--bundle", str(logreg_bundle)]) == 2
    assert "needs a DeepFM bundle" in capsys.readouterr().err


def test_retraining_a_deepfm_folder_as_another_model_removes_its_graphs(synthetic_data, small_bundle, tmp_path):
    out = shutil.copytree(small_bundle, tmp_path / "bundle")
    fit_bundle(synthetic_data, "logreg", out, epochs=1, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "model.onnx", "spec.json"]


# -- corrupted graphs ---------------------------------------------------------------------------------------
def perturb(path: Path, initializer: str, index: tuple, delta: float) -> None:
    model = onnx.load(str(path))
    for tensor in model.graph.initializer:
        if tensor.name == initializer:
            array = numpy_helper.to_array(tensor).copy()
            array[index] += delta
            tensor.CopyFrom(numpy_helper.from_array(array, initializer))
            break
    else:
        raise AssertionError(f"no initializer {initializer}")
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def random_bundle(tmp_path_factory) -> Path:
    bundle = random_deepfm_bundle(tmp_path_factory.mktemp("random") / "bundle")
    factorize_bundle(bundle)
    return bundle


@pytest.mark.parametrize("file, initializer, index", [
    (FACTORIZED_FILE, "row.out", (-2, 0)),                  # the scalar (linear and FM squares) as the DNN carries it
    (FACTORIZED_FILE, "row.out", (-1, 0)),                  # ... and its negated copy
    (FACTORIZED_FILE, "imp.weight", (0, 258)),              # the first imp field's vector into the FM sum
    (FACTORIZED_FILE, "dnn.1.bias", (0,)),                  # the DNN after the split layer
    (CANDIDATE_FILE, "candidate.weight", (0, 3)),           # the first candidate field's share of the DNN
    (CANDIDATE_FILE, "candidate.constants", (256,)),        # the output bias the candidate side carries
])
def test_a_corrupted_graph_fails_the_load_check(random_bundle, tmp_path, file, initializer, index):
    bundle = shutil.copytree(random_bundle, tmp_path / "bundle")
    perturb(bundle / file, initializer, index, 0.05)
    restamp(bundle)  # digests that match: the parity check is what must refuse it
    scorer = Scorer(bundle)
    with pytest.raises(BundleError, match="factorized graphs differ from model.onnx"):
        FactorizedScorer.for_scorer(scorer)
    with pytest.raises(ParityError, match="factorized graphs differ"):
        check_parity(bundle / "model.onnx", bundle / CANDIDATE_FILE, bundle / FACTORIZED_FILE, scorer.spec)


def test_a_graph_with_the_wrong_signature_is_refused(small_bundle, tmp_path):
    bundle = shutil.copytree(small_bundle, tmp_path / "bundle")
    shutil.copyfile(bundle / "model.onnx", bundle / FACTORIZED_FILE)
    with pytest.raises(BundleError, match="factorized.onnx: its sha256 .* is not the .* meta.json records"):
        Scorer(bundle)
    restamp(bundle)  # digests that match: the signature check is what must refuse it
    with pytest.raises(BundleError, match="factorized.onnx: expected inputs"):
        FactorizedScorer(bundle, Scorer(bundle).spec, Scorer(bundle).featurizer)
    (bundle / CANDIDATE_FILE).unlink()
    with pytest.raises(BundleError, match="graphs.factorized lists candidate.onnx but the bundle has no such file"):
        Scorer(bundle)


# -- building from model.onnx -------------------------------------------------------------------------------
def test_factorize_leaves_model_onnx_alone_and_keeps_meta(tmp_path):
    bundle = shutil.copytree(DEFAULT_BUNDLE, tmp_path / "bundle")
    model = (bundle / "model.onnx").read_bytes()
    before = json.loads((bundle / "meta.json").read_text())
    entry = factorize_bundle(bundle)
    after = json.loads((bundle / "meta.json").read_text())
    assert (bundle / "model.onnx").read_bytes() == model
    written = ("graphs", "files", "format_version")  # the new graph, its digests, and the format they are written in
    assert {k: v for k, v in after.items() if k not in written} == {k: v for k, v in before.items() if k not in written}
    assert after["graphs"]["factorized"] == entry and entry["parity"]["max_abs_diff"] <= TOLERANCE
    assert not [p for p in bundle.iterdir() if p.name.startswith(".")]  # no staging left behind


def random_deepfm_bundle(out: Path, calibration: Calibration | None = None, **overrides) -> Path:
    """An untrained DeepFM with every weight drawn at a scale where each part of the logit matters."""
    spec = default_spec()
    hp = resolve_hyperparameters("deepfm", overrides)
    model = build_model("deepfm", spec, hp, seed=11)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    out.mkdir(parents=True)
    path = export_lean(model, spec, "deepfm", out / "lean.onnx", combiner=hp["usertag_combiner"],
                       calibration=calibration)
    write_bundle(out, onnx_path=path, spec=spec, architecture="deepfm", hyperparameters=hp, data={}, metrics={},
                 parity={})
    path.unlink()
    return out


@pytest.mark.parametrize("calibration", [Calibration(1.3, -0.4), Calibration(-0.8, 0.5)])
@pytest.mark.parametrize("overrides", [{}, {"dnn_hidden_units": [32]}])
def test_the_calibration_folded_into_the_factorized_graphs_scores_as_model_onnx(tmp_path, catalog, sample_records,
                                                                              calibration, overrides):
    """The graphs carry sigmoid(a * logit + b) in their weights (any sign of a), not as nodes of its own."""
    bundle = random_deepfm_bundle(tmp_path / "bundle", calibration, **overrides)
    assert factorize_bundle(bundle)["parity"]["max_abs_diff"] <= TOLERANCE
    assert initializers(bundle / "model.onnx")["calibration_scale"] == np.float32(calibration.scale)
    graph = onnx.load(str(bundle / FACTORIZED_FILE)).graph
    assert not {"calibration_scale", "calibration_shift"} & {t.name for t in graph.initializer}
    assert [n.op_type for n in graph.node].count("Mul") == 1  # the imp side's squares, nothing after the split
    assert_scores_as_model_onnx(bundle, catalog, sample_records)


@pytest.mark.parametrize("overrides", [{"usertag_combiner": "mean"}, {"dnn_hidden_units": [32]},
                                       {"embedding_dim": 4, "dnn_hidden_units": [16, 8, 8, 4]}])
def test_other_deepfm_shapes_factorize(tmp_path, catalog, sample_records, overrides):
    bundle = random_deepfm_bundle(tmp_path / "bundle", **overrides)
    assert factorize_bundle(bundle)["parity"]["max_abs_diff"] <= TOLERANCE
    scorer = Scorer(bundle)
    f = FactorizedScorer.for_scorer(scorer, max_imps=4, max_rows=64)
    assert f.kernel is not None, f.kernel_unsupported
    layers = [c.layer for c in catalog.candidates]
    f.set_candidates(layers)
    row_imp, row_cand = np.arange(64) % 4, np.arange(64) % len(layers)
    expected = canonical(scorer, sample_records[:4], layers, row_imp, row_cand)
    assert expected.std() > 1e-3  # the scores vary: the comparison compares something
    np.testing.assert_allclose(f.run(4, fill(f, sample_records[:4], row_imp, row_cand)), expected, rtol=0,
                               atol=TOLERANCE)


# -- the native row kernel -----------------------------------------------------------------------------------
def test_the_row_kernel_scores_as_the_graph_through_onnx_runtime(scorer, catalog, sample_records):
    """Same buffers, same rows: the kernel and ONNX Runtime on factorized.onnx agree to float32 rounding, and a row's
    score does not depend on the other imps of its batch (bit for bit)."""
    native = FactorizedScorer.for_scorer(scorer, max_imps=8, max_rows=128)
    graph = FactorizedScorer.for_scorer(scorer, max_imps=8, max_rows=128, native=False)
    assert native.kernel is not None and graph.kernel is None
    layers = [c.layer for c in catalog.candidates]
    for f in (native, graph):
        f.set_candidates(layers)
    rng = np.random.default_rng(3)
    imps = sample_records[:8]
    row_imp, row_cand = rng.integers(0, 8, 128), rng.integers(0, len(layers), 128)
    got = native.run(8, fill(native, imps, row_imp, row_cand)).copy()
    np.testing.assert_allclose(got, graph.run(8, fill(graph, imps, row_imp, row_cand)), rtol=1e-5, atol=1e-7)
    alone = native.run(1, fill(native, [imps[int(row_imp[0])]], [0], [row_cand[0]]))
    assert alone[0] == got[0]


def test_a_row_kernel_that_disagrees_with_model_onnx_fails_the_load_check(random_bundle, tmp_path, monkeypatch):
    """The kernel is checked at load as the graph is: fed a perturbed copy of the graph's weights (the graph itself
    intact), the scorer refuses the bundle and names the way out."""
    import bidder.factorized
    from bidder.rowkernel import read_kernel
    broken = tmp_path / FACTORIZED_FILE
    shutil.copy(random_bundle / FACTORIZED_FILE, broken)
    perturb(broken, "dnn.1.bias", (slice(None),), 0.05)
    monkeypatch.setattr(bidder.factorized, "read_kernel", lambda path: read_kernel(broken))
    scorer = Scorer(random_bundle)
    with pytest.raises(BundleError, match="native row kernel differs from model.onnx.*--graph-rows"):
        FactorizedScorer.for_scorer(scorer)
    assert FactorizedScorer.for_scorer(scorer, native=False).kernel is None  # ONNX Runtime still serves it


def test_a_graph_the_kernel_does_not_know_runs_through_onnx_runtime(random_bundle, tmp_path, catalog, sample_records):
    """A factorized graph of another shape (here its last ReLU a LeakyRelu, as a future export might write) keeps
    ONNX Runtime, says why, and scores as model.onnx."""
    from bidder.rowkernel import Unsupported, read_kernel
    bundle = shutil.copytree(random_bundle, tmp_path / "bundle")
    model = onnx.load(str(bundle / FACTORIZED_FILE))
    relu = [n for n in model.graph.node if n.op_type == "Relu"][-1]
    relu.op_type = "LeakyRelu"
    relu.attribute.append(onnx.helper.make_attribute("alpha", 0.0))  # the same function: parity still holds
    onnx.save(model, str(bundle / FACTORIZED_FILE))
    restamp(bundle)
    with pytest.raises(Unsupported, match="expected Relu, found LeakyRelu"):
        read_kernel(bundle / FACTORIZED_FILE)
    scorer = Scorer(bundle)
    f = FactorizedScorer.for_scorer(scorer, max_imps=4, max_rows=64)
    assert f.kernel is None and "LeakyRelu" in f.kernel_unsupported
    layers = [c.layer for c in catalog.candidates]
    f.set_candidates(layers)
    row_imp, row_cand = np.arange(64) % 4, np.arange(64) % len(layers)
    np.testing.assert_allclose(f.run(4, fill(f, sample_records[:4], row_imp, row_cand)),
                               canonical(scorer, sample_records[:4], layers, row_imp, row_cand), rtol=0, atol=TOLERANCE)


async def test_graph_rows_serve_the_same_bids(aiohttp_client, openrtb_examples):
    """``bidder serve --graph-rows``: factorized.onnx through ONNX Runtime instead of the native kernel; every IAB
    example gets the same answer, prices within the float32 rounding of the two sums (both within 1e-6 of
    model.onnx's pCTR: a few micro-dollars on a 20 USD CPM)."""
    from bidder.app import STATE, Config, create_app

    answers = []
    for native in (True, False):
        app = create_app(Config(model=DEFAULT_BUNDLE, campaigns=DEFAULT_CAMPAIGNS, now=1_700_000_000.0,
                                native_rows=native))
        client = await aiohttp_client(app)
        bodies = []
        for name, body in openrtb_examples.items():
            async with client.post("/bid", data=body) as response:
                bodies.append((name, response.status, await response.read()))
        assert (app[STATE].engine.factorized.kernel is not None) == native
        answers.append(bodies)
    priced = 0
    for (name, status, native), (_, status_graph, graph) in zip(*answers):
        assert status == status_graph, name
        if status != 200:
            continue
        a, b = json.loads(native), json.loads(graph)
        prices = [[bid.pop("price") for seat in answer["seatbid"] for bid in seat["bid"]] for answer in (a, b)]
        assert a == b, name
        priced += len(prices[0])
        assert prices[0] == pytest.approx(prices[1], rel=1e-5), name
    assert priced >= 4


def test_the_row_kernel_refuses_feature_indices_outside_its_tables(scorer, catalog, sample_records):
    f = FactorizedScorer.for_scorer(scorer, max_imps=2, max_rows=4)
    f.set_candidates([c.layer for c in catalog.candidates])
    fill(f, sample_records[:1], [0], [0])
    f.imp_inputs["sparse"][0, int(initializers(scorer.bundle / FACTORIZED_FILE)["imp.columns"][0])] = 1 << 40
    with pytest.raises(IndexError, match="feature index 1099511627776 is out of range"):
        f.run(1, 1)


# -- micro-benchmarks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("way", ["canonical", "factorized"])
@pytest.mark.parametrize("requests", [1, 8, 32])
def test_bench_request_scoring(benchmark, small_bundle, catalog, sample_records, way, requests):
    """``requests`` simple-banner-like requests (1 imp × 9 candidates each) in one call, featurize included."""
    benchmark.group = f"{requests} imp(s) x 9 candidates = {requests * 9} rows: canonical vs factorized"
    scorer = Scorer(small_bundle, max_batch=512)
    eligible = catalog.for_size(300, 250)
    pool = itertools.cycle([sample_records[i:i + requests] for i in range(0, len(sample_records), requests)])
    if way == "canonical":
        result = benchmark(lambda: scorer.score([(c.layer, imp) for imp in next(pool) for c in eligible]))
    else:
        f = FactorizedScorer.for_scorer(scorer, max_imps=32, max_rows=512)
        f.set_candidates([c.layer for c in catalog.candidates])
        number = {c.creative_id: i for i, c in enumerate(catalog.candidates)}
        rows = requests * len(eligible)
        row_imp = np.repeat(np.arange(requests), len(eligible))
        row_cand = np.tile([number[c.creative_id] for c in eligible], requests)

        def score():
            f.featurizer.transform_into(f.imp_inputs, next(pool))
            f.row_imp[:rows] = row_imp
            f.row_cand[:rows] = row_cand
            return f.run(requests, rows)

        result = benchmark(score)
    assert len(result) == requests * 9


# -- compressed tables (train compress --method int8-embeddings) -----------------------------------------------
def compressed(bundle: Path, out: Path, dtype: str) -> Path:
    """int8 (a scale per row) or fp16 tables (int8-embeddings), or uint8 tables (int8-dynamic, ops=tables)."""
    from train.compress import compress_bundle

    if dtype == "uint8":
        compress_bundle(bundle, "int8-dynamic", out, settings={"ops": "tables"}, progress=False)
    else:
        compress_bundle(bundle, "int8-embeddings", out, settings={"dtype": dtype}, progress=False)
    return out


TABLE_SUFFIX = {"int8": ("_int8", np.int8), "fp16": ("_fp16", np.float16), "uint8": ("_quantized", np.uint8)}


def initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("dtype", ["int8", "fp16", "uint8"])
@pytest.mark.parametrize("overrides", [{}, {"usertag_combiner": "mean"}, {"embedding_dim": 4, "dnn_hidden_units": [16, 8]}])
def test_compressed_tables_stay_compressed_in_factorized_graphs_equal_to_model_onnx(tmp_path, catalog, sample_records,
                                                                                  dtype, overrides):
    bundle = compressed(random_deepfm_bundle(tmp_path / "source", **overrides), tmp_path / "q", dtype)
    meta = json.loads((bundle / "meta.json").read_text())
    assert meta["graphs"]["factorized"]["parity"]["max_abs_diff"] <= TOLERANCE  # checked at export
    model = initializers(bundle / "model.onnx")
    for file, side in ((CANDIDATE_FILE, "candidate"), (FACTORIZED_FILE, "imp")):
        tables = initializers(bundle / file)
        suffix, numpy_type = TABLE_SUFFIX[dtype]
        table = tables[f"{side}.single_table{suffix}"]
        assert table.dtype == numpy_type
        assert not [name for name, a in tables.items() if a.dtype == np.float32 and a.ndim and len(a) >= len(table)]
        if dtype == "int8":  # the very rows and scales of model.onnx
            scales = tables[f"{side}.single_table_scale"]
            assert scales.shape == (len(table), 1) and scales.dtype == model["embeddings.single_table_scale"].dtype
            assert np.isin(table, model["embeddings.single_table_int8"]).all()
        if dtype == "uint8":  # model.onnx's scale and zero point for the whole table
            assert tables[f"{side}.single_table_scale"] == model["embeddings.single_table_scale"]
            assert tables[f"{side}.single_table_zero_point"] == model["embeddings.single_table_zero_point"]
    assert (bundle / FACTORIZED_FILE).stat().st_size < 0.6 * (tmp_path / "source" / "model.onnx").stat().st_size
    assert_scores_as_model_onnx(bundle, catalog, sample_records)  # after the load-time parity check


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("int8")
    return compressed(random_deepfm_bundle(root / "source"), root / "q", "int8")


@pytest.mark.parametrize("file, initializer, index, delta", [
    (FACTORIZED_FILE, "imp.single_table_int8", (slice(None), 0), 9),         # the imp fields' first coordinate
    (FACTORIZED_FILE, "imp.single_table_scale", (slice(None), 0), 0.05),     # their row scales
    (FACTORIZED_FILE, "imp.multi_table_0_scale", (slice(1, None), 0), 0.05),  # the usertag rows' scales
    (CANDIDATE_FILE, "candidate.single_table_scale", (slice(None), 0), 0.05),
])
def test_a_corrupted_compressed_table_fails_the_load_check(int8_bundle, tmp_path, file, initializer, index, delta):
    bundle = shutil.copytree(int8_bundle, tmp_path / "bundle")
    perturb(bundle / file, initializer, index, delta)
    restamp(bundle)  # digests that match: the parity check is what must refuse it
    scorer = Scorer(bundle)
    with pytest.raises(BundleError, match="factorized graphs differ from model.onnx"):
        FactorizedScorer.for_scorer(scorer)


@pytest.fixture(scope="module")
def uint8_bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uint8")
    return compressed(random_deepfm_bundle(root / "source"), root / "q", "uint8")


@pytest.mark.parametrize("tables", ["int8_bundle", "uint8_bundle"])
async def test_a_compressed_bundle_bids_through_its_factorized_graphs_as_model_onnx_scores(aiohttp_client, request,
                                                                                          tables, openrtb_examples):
    """Served /bid (factorized graphs over int8 or uint8 tables) equals the oracle's plain ORT on model.onnx."""
    from oracle import bid_and_check, raw_catalog
    from bidder.app import STATE, Config, create_app

    int8_bundle = request.getfixturevalue(tables)
    app = create_app(Config(model=int8_bundle, campaigns=DEFAULT_CAMPAIGNS))
    client = await aiohttp_client(app)
    async with client.get("/readyz"):  # the app has started: its engine exists
        pass
    assert app[STATE].engine.factorized is not None
    catalog = raw_catalog(DEFAULT_CAMPAIGNS)
    bids = 0
    for name in ("bid-request-2.5/simple-banner.json", "bid-request-2.6/mobile.json",
                 "bid-request-2.5/expandable-creative.json"):
        expectation, _ = await bid_and_check(client, json.loads(openrtb_examples[name]), catalog, int8_bundle)
        bids += expectation.status == 200
    assert bids >= 2


def test_layout_rows_lays_out_imps_and_candidates_and_refuses_short_arrays():
    from types import SimpleNamespace

    from bidder._features import layout_rows

    cands = [SimpleNamespace(index=i, value_per_click=v) for i, v in ((7, 0.5), (3, 1.5), (5, 2.0))]
    first = SimpleNamespace(first_imp=0, imp_ids=[0, 2], floors=[1.0, 9.0, 2.0], candidates=[cands[:2], cands],
                            first_row=None)
    second = SimpleNamespace(first_imp=2, imp_ids=[1], floors=[0.0, 3.0], candidates=[cands[2:]], first_row=None)
    row_imp, row_cand = np.full(9, -1, dtype=np.int64), np.full(9, -1, dtype=np.int64)
    row_floor, row_value = np.full(9, -1.0), np.full(9, -1.0)
    assert layout_rows([first, second], row_imp, row_cand, row_floor, row_value) == 6
    assert (first.first_row, second.first_row) == (0, 5)
    assert row_imp.tolist() == [0, 0, 1, 1, 1, 2, -1, -1, -1]
    assert row_cand.tolist() == [7, 3, 7, 3, 5, 5, -1, -1, -1]
    assert row_floor.tolist() == [1.0, 1.0, 2.0, 2.0, 2.0, 3.0, -1.0, -1.0, -1.0]  # each imp's own floor
    assert row_value.tolist() == [0.5, 1.5, 0.5, 1.5, 2.0, 2.0, -1.0, -1.0, -1.0]
    with pytest.raises(ValueError, match="do not fit arrays of 4"):
        layout_rows([first, second], row_imp[:4], row_cand[:4], row_floor[:4], row_value[:4])

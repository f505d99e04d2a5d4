"""Micro-benchmarks of scoring and the whole bid (`pytest --benchmark`).

Groups: score B=1/16/64 (featurize + IO binding), stock deepctr graph vs lean graph, session.run()
vs IO binding, and the full in-process bid for the IAB simple-banner request. One thread throughout.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from bidder import Featurizer
from bidder.app import DEFAULT_CAMPAIGNS
from bidder.campaigns import load_catalog
from bidder.engine import BidEngine
from bidder.metrics import Metrics
from bidder.scorer import Scorer

BATCHES = [1, 16, 64]


@pytest.fixture(scope="module")
def graphs(synthetic_data, tmp_path_factory):
    """A DeepFM trained briefly, exported both ways: deepctr's own graph and the lean one."""
    from bidder import default_spec
    from train.data.dataset import load_dataset
    from train.export import export_lean, export_stock
    from train.trainer import train_model

    spec = default_spec()
    dataset = load_dataset(synthetic_data, spec, seed=0, progress=False)
    trained = train_model(dataset, "deepfm", epochs=1, progress=False)
    out = tmp_path_factory.mktemp("graphs")
    lean = export_lean(trained.model, spec, "deepfm", out / "lean.onnx",
                       combiner=trained.hyperparameters["usertag_combiner"])
    stock = export_stock(trained.model, spec, out / "stock.onnx")
    return {"spec": spec, "lean": lean, "stock": stock, "inputs": dataset.test.inputs}


def _feeds(graphs, kind: str, batch: int) -> dict[str, np.ndarray]:
    from train.models import deepctr_input

    inputs = {k: v[:batch] for k, v in graphs["inputs"].items()}
    if kind == "lean":
        return inputs
    return {"x": deepctr_input(inputs, graphs["spec"]).astype(np.float32)}


@pytest.mark.parametrize("batch", BATCHES)
def test_score(benchmark, small_bundle, sample_records, batch):
    benchmark.group = f"score B={batch} (featurize + IO binding)"
    scorer = Scorer(small_bundle, max_batch=256)
    pool = itertools.cycle([sample_records[i:i + batch] for i in range(0, len(sample_records), batch)])
    assert len(benchmark(lambda: scorer.score(next(pool)))) == batch


@pytest.mark.parametrize("kind", ["stock", "lean"])
@pytest.mark.parametrize("batch", [1, 64])
def test_graph_stock_vs_lean(benchmark, graphs, kind, batch):
    from train.studies.latency import BoundGraph

    benchmark.group = f"graph B={batch}: stock vs lean (IO binding)"
    graph = BoundGraph(graphs[kind], _feeds(graphs, kind, batch))
    benchmark(graph.session.run_with_iobinding, graph.binding)


@pytest.mark.parametrize("call", ["run", "iobinding"])
@pytest.mark.parametrize("batch", [1, 64])
def test_run_vs_iobinding(benchmark, small_bundle, sample_records, call, batch):
    benchmark.group = f"lean B={batch}: session.run() vs IO binding (featurize included)"
    scorer = Scorer(small_bundle, max_batch=256)
    records = sample_records[:batch]
    if call == "iobinding":
        result = benchmark(scorer.score, records)
    else:
        featurizer, session = Featurizer(scorer.spec), scorer.session
        result = benchmark(lambda: session.run(["ctr"], featurizer.transform(records))[0])
    assert len(result) == batch


def test_full_bid_simple_banner(benchmark, small_bundle, openrtb_examples):
    """decode → 9 candidate rows → featurize → score → price → encode, no HTTP."""
    benchmark.group = "full in-process bid (IAB 2.5 simple-banner)"
    engine = BidEngine(Scorer(small_bundle), load_catalog(DEFAULT_CAMPAIGNS), Metrics())
    body = openrtb_examples["bid-request-2.5/simple-banner.json"]
    assert benchmark(engine.bid, body).status == 200


@pytest.mark.parametrize("rows", [9, 200])
def test_best_per_imp(benchmark, rows):
    """Each imp's best row at or above its floor: 9 rows (the simple banner) and 200 (a retrieved imp)."""
    from bidder.pricing import best_per_imp

    benchmark.group = "best row per imp"
    catalog = load_catalog(DEFAULT_CAMPAIGNS)
    chosen = [catalog.candidates[i % len(catalog)] for i in range(rows)]
    ctr = np.random.default_rng(0).uniform(0.0, 0.02, rows).astype(np.float32).tolist()
    best = benchmark(best_per_imp, [0] * rows, chosen, ctr, [0.5], {})
    assert list(best) == [0] and best[0].price >= 0.5

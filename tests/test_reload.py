"""Reloading to a different bundle and catalog: what is served changes whole, or not at all.

Two bundles that differ in model id, architecture and predictions (DeepFM, logistic regression) and two
catalogs that share no creative; every bid is checked against tests/oracle.py for the pair in force.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import oracle
from bidder.app import DEFAULT_CAMPAIGNS, Config, create_app
from oracle import bid_and_check, metric, raw_catalog


def model_id(bundle: Path) -> str:
    return json.loads((bundle / "meta.json").read_text())["model_id"]


async def served_models(client) -> list[tuple[str, str]]:
    text = await (await client.get("/metrics")).text()
    return [(s.labels["model_id"], s.labels["architecture"]) for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "bidder_model_info" and s.value == 1]


async def assert_serving(client, bundle: Path, catalog_path: Path, seed: int) -> None:
    """/readyz, bidder_model_info and the bids all say: ``bundle`` with ``catalog_path``."""
    ready = await client.get("/readyz")
    assert ready.status == 200 and (await ready.json())["model"] == model_id(bundle)
    architecture = json.loads((bundle / "meta.json").read_text())["architecture"]
    assert await served_models(client) == [(model_id(bundle), architecture)]
    catalog = raw_catalog(catalog_path)
    bids = 0
    for exchange, request in oracle.generate_requests(catalog, 25, seed=seed):
        expectation, _ = await bid_and_check(client, request, catalog, bundle, exchange)
        bids += expectation.status == 200
    assert bids >= 5


@pytest.fixture
def broken_bundle(small_bundle, tmp_path) -> Path:
    broken = tmp_path / "broken-bundle"
    shutil.copytree(small_bundle, broken)
    (broken / "model.onnx").write_bytes(b"not a model")
    return broken


@pytest.fixture
def broken_catalog(tmp_path) -> Path:
    path = tmp_path / "broken-catalog.json"
    path.write_text('{"campaigns": [{"id": "c", "advertiser": 1, "value_per_click": 1, "creatives": []}]}')
    return path


async def test_reload_to_another_bundle_and_catalog(aiohttp_client, small_bundle, logreg_bundle, second_catalog):
    assert model_id(small_bundle) != model_id(logreg_bundle)
    client = await aiohttp_client(create_app(Config(model=small_bundle, campaigns=DEFAULT_CAMPAIGNS)))
    await assert_serving(client, small_bundle, DEFAULT_CAMPAIGNS, seed=10)
    response = await client.post("/admin/reload", json={"model": str(logreg_bundle), "campaigns": str(second_catalog)})
    assert response.status == 200 and await response.json() == {"model": model_id(logreg_bundle)}
    await assert_serving(client, logreg_bundle, second_catalog, seed=11)
    # an empty reload re-reads what is now in force, not what the process started with
    assert (await client.post("/admin/reload", json={})).status == 200
    await assert_serving(client, logreg_bundle, second_catalog, seed=12)
    # each half alone: a new catalog keeps the model, a new model keeps the catalog
    assert (await client.post("/admin/reload", json={"campaigns": str(DEFAULT_CAMPAIGNS)})).status == 200
    await assert_serving(client, logreg_bundle, DEFAULT_CAMPAIGNS, seed=13)
    assert (await client.post("/admin/reload", json={"model": str(small_bundle)})).status == 200
    await assert_serving(client, small_bundle, DEFAULT_CAMPAIGNS, seed=14)
    text = await (await client.get("/metrics")).text()
    assert metric(text, "bidder_reloads_total", result="ok") == 4


async def test_a_refused_reload_keeps_both_the_old_model_and_the_old_catalog(
        aiohttp_client, small_bundle, logreg_bundle, second_catalog, broken_bundle, broken_catalog, tmp_path):
    client = await aiohttp_client(create_app(Config(model=logreg_bundle, campaigns=second_catalog)))
    refusals = [
        {"model": str(broken_bundle), "campaigns": str(DEFAULT_CAMPAIGNS)},   # good catalog, broken model
        {"model": str(small_bundle), "campaigns": str(broken_catalog)},       # good model, broken catalog
        {"model": str(tmp_path / "missing")},
        {"campaigns": str(tmp_path / "missing.json")},
    ]
    for n, options in enumerate(refusals):
        response = await client.post("/admin/reload", json=options)
        assert response.status == 422, options
        assert "old model still serving" in (await response.json())["error"]
        await assert_serving(client, logreg_bundle, second_catalog, seed=20 + n)
    text = await (await client.get("/metrics")).text()
    assert metric(text, "bidder_reloads_total", result="refused") == len(refusals)
    assert metric(text, "bidder_reloads_total", result="ok") == 0
    assert metric(text, "bidder_errors_total", kind="reload_refused") == len(refusals)
    # the failed attempts did not stick as the paths to re-read either
    assert (await client.post("/admin/reload", json={})).status == 200
    await assert_serving(client, logreg_bundle, second_catalog, seed=30)


def test_building_an_engine_pauses_the_collector_and_shortens_the_gil_interval_then_restores_both(
        small_bundle, broken_bundle):
    """A large catalog's build runs beside the serving thread: the collector off (its scans would hold the GIL),
    a short switch interval, then what was built frozen; both settings come back, also when the build fails."""
    import gc
    import sys

    from bidder.app import BUILD_SWITCH_INTERVAL_S, State
    from bidder.metrics import Metrics
    from bidder.scorer import BundleError

    state = State(Config(model=small_bundle), Metrics())
    seen = []
    build = state._build

    def spy(model, campaigns):
        seen.append((gc.isenabled(), sys.getswitchinterval()))
        return build(model, campaigns)

    state._build = spy
    interval = sys.getswitchinterval()
    frozen = gc.get_freeze_count()
    engine = state.load(small_bundle, DEFAULT_CAMPAIGNS)
    assert seen == [(False, pytest.approx(min(interval, BUILD_SWITCH_INTERVAL_S)))]
    assert gc.isenabled() and sys.getswitchinterval() == interval
    assert gc.get_freeze_count() > frozen and engine.catalog is not None
    with pytest.raises(BundleError):
        state.load(broken_bundle, DEFAULT_CAMPAIGNS)
    assert gc.isenabled() and sys.getswitchinterval() == interval

"""The scorer: bundle checks, the single-thread session, IO binding over shared buffers, chunking, pinning."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bidder import default_spec, load_spec, reference
from bidder.scorer import OUTPUT, BundleError, Scorer, pin_to_core, run_binding


def tiny_model(path: Path, inputs: dict[str, list], output: str = "ctr", out_shape=("batch", 1)) -> Path:
    """ctr = sigmoid(sum of all int64 inputs / 1e5): enough to tell rows apart, built in milliseconds."""
    import onnx
    from onnx import TensorProto, helper

    nodes, sums = [], []
    for name in inputs:
        nodes.append(helper.make_node("Cast", [name], [f"{name}_f"], to=TensorProto.FLOAT))
        nodes.append(helper.make_node("ReduceSum", [f"{name}_f", "axis1"], [f"{name}_s"],
                                      keepdims=int(len(out_shape) == 2)))
        sums.append(f"{name}_s")
    nodes.append(helper.make_node("Sum", sums, ["total"]))
    nodes.append(helper.make_node("Div", ["total", "scale"], ["logit"]))
    nodes.append(helper.make_node("Sigmoid", ["logit"], [output]))
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info(name, TensorProto.INT64, shape) for name, shape in inputs.items()],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, list(out_shape))],
        initializer=[helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
                     helper.make_tensor("scale", TensorProto.FLOAT, [], [1e5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def tiny_bundle(root: Path, meta: dict | None = None, **model_kwargs) -> Path:
    spec = default_spec()
    root.mkdir(parents=True, exist_ok=True)
    spec.save(root)
    inputs = model_kwargs.pop("inputs", {n: ["batch", spec.input_width(n)] for n in spec.input_names})
    tiny_model(root / "model.onnx", inputs, **model_kwargs)
    if meta is not None:
        (root / "meta.json").write_text(json.dumps(meta))
    return root


RECORDS = [{"domain": f"site-{i}.example", "slotid": f"slot-{i % 5}", "usertag": ["10006", str(i)],
            "creative": "c", "advertiser": 1458, "slotprice": i} for i in range(40)]


def test_a_tiny_bundle_scores_like_plain_onnxruntime(tmp_path):
    bundle = tiny_bundle(tmp_path / "b", meta={"model_id": "tiny-1", "spec_digest": default_spec().digest})
    scorer = Scorer(bundle, max_batch=16)
    assert scorer.model_id == "tiny-1"
    got = scorer.predict(RECORDS)
    feed = reference.featurize(scorer.spec, RECORDS)
    expected = ort.InferenceSession(str(bundle / "model.onnx")).run(["ctr"], feed)[0].reshape(-1)
    assert got.dtype == np.float32 and got.shape == (len(RECORDS),)
    np.testing.assert_array_equal(got, expected)


def test_model_id_without_meta_names_the_bundle_and_hash(tmp_path):
    scorer = Scorer(tiny_bundle(tmp_path / "nometa"))
    assert scorer.model_id.startswith("nometa-") and len(scorer.model_id) == len("nometa-") + 8


@pytest.mark.parametrize("change,message", [
    (dict(inputs={"sparse": ["batch", 18]}), r"inputs \['sparse'\] do not match spec.json's \['sparse', 'usertag'\]"),
    (dict(inputs={"sparse": ["batch", 17], "usertag": ["batch", 16]}), r"'sparse' has shape .*needs \[batch, 18\]"),
    (dict(inputs={"sparse": [1, 18], "usertag": [1, 16]}), "fixed batch dimension"),
    (dict(output="prob"), "needs a float32 output named 'ctr'"),
    (dict(out_shape=("batch",)), r"output 'ctr' has shape \['batch'\], expected \[batch, 1\]"),
])
def test_a_model_that_disagrees_with_its_spec_is_refused(tmp_path, change, message):
    bundle = tiny_bundle(tmp_path / "b", **change)
    with pytest.raises(BundleError, match=message):
        Scorer(bundle)


def test_broken_bundles_are_refused_with_the_file_named(tmp_path):
    with pytest.raises(BundleError, match="no model.onnx"):
        Scorer(tmp_path)
    bundle = tiny_bundle(tmp_path / "garbage")
    (bundle / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(BundleError, match="model.onnx: ONNX Runtime cannot load it"):
        Scorer(bundle)
    bundle = tiny_bundle(tmp_path / "digest", meta={"spec_digest": "0" * 64})
    with pytest.raises(BundleError, match="spec.json does not match"):
        Scorer(bundle)
    bundle = tiny_bundle(tmp_path / "badmeta")
    (bundle / "meta.json").write_text("[")
    with pytest.raises(BundleError, match="meta.json: cannot read"):
        Scorer(bundle)
    bundle = tiny_bundle(tmp_path / "nospec")
    (bundle / "spec.json").unlink()
    with pytest.raises(BundleError):
        Scorer(bundle)
    with pytest.raises(ValueError, match="max_batch"):
        Scorer(tiny_bundle(tmp_path / "ok"), max_batch=0)


def test_session_is_single_threaded_sequential_and_does_not_spin(small_bundle):
    options = Scorer(small_bundle, max_batch=4).session.get_session_options()
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"


def test_bindings_are_made_once_per_batch_size_over_the_shared_buffers(small_bundle, sample_records):
    scorer = Scorer(small_bundle, max_batch=32)
    buffers = {name: buffer for name, buffer in scorer.inputs.items()}
    first = scorer.score(sample_records[:9])
    binding = scorer._binding(9)
    scorer.score(sample_records[9:18])
    scorer.score(sample_records[:3])
    assert scorer._binding(9) is binding and sorted(scorer._bindings) == [3, 9]
    # the featurizer wrote into the very arrays ORT reads, and ORT wrote into the output buffer
    assert all(scorer.inputs[name] is buffers[name] for name in buffers)
    _, values = scorer._bindings[9]
    pointers = {v.data_ptr() for v in values}
    assert {b.ctypes.data for b in scorer.inputs.values()} | {scorer.output.ctypes.data} == pointers
    assert first.base is scorer.output or first.base is scorer.output.base
    expected = Scorer(small_bundle, max_batch=32).predict(sample_records[:3])
    np.testing.assert_array_equal(scorer.output[:3, 0], expected)


def test_run_binding_runs_the_binding_as_onnx_runtimes_own_call(small_bundle, sample_records):
    scorer = Scorer(small_bundle, max_batch=32)
    scorer.featurizer.transform_into(scorer.inputs, sample_records[:9])
    binding = scorer._binding(9)
    scorer.session.run_with_iobinding(binding)
    expected = scorer.output[:9].copy()
    scorer.output[:] = -1.0
    run_binding(scorer.session, binding)
    np.testing.assert_array_equal(scorer.output[:9], expected)
    np.testing.assert_array_equal(scorer.output[9:], -1.0)  # rows outside the binding are left alone
    inputs = {name: buffer[:9] for name, buffer in scorer.inputs.items()}
    np.testing.assert_array_equal(scorer.session.run([OUTPUT], inputs)[0], expected)


def test_score_refuses_more_rows_than_the_buffers_hold(small_bundle, sample_records):
    scorer = Scorer(small_bundle, max_batch=4)
    with pytest.raises(ValueError, match="do not fit"):
        scorer.score(sample_records[:5])


def test_predict_chunks_large_batches_and_numbers_errors_absolutely(small_bundle, sample_records):
    records = sample_records[:50]
    whole = Scorer(small_bundle, max_batch=256).predict(records)
    chunked = Scorer(small_bundle, max_batch=7)
    got = chunked.predict(iter(records))  # any iterable
    np.testing.assert_array_equal(got, whole)
    assert max(chunked._bindings) == 7 and 50 % 7 in chunked._bindings
    assert chunked.predict([]).shape == (0,)
    bad = list(records[:20]) + [{"slotprice": "cheap"}]
    with pytest.raises(ValueError, match=r"^record 20: "):
        chunked.predict(bad)


def test_layered_records_score_like_merged_dicts(small_bundle, sample_records):
    scorer = Scorer(small_bundle, max_batch=16)
    imp = {k: v for k, v in sample_records[0].items() if k not in ("creative", "advertiser", "slotwidth",
                                                                      "slotheight")}
    layers = [{"creative": f"cr{i}", "advertiser": 1458 + i, "slotwidth": 300, "slotheight": 250} for i in range(5)]
    layered = scorer.predict([(layer, imp) for layer in layers])
    merged = scorer.predict([{**imp, **layer} for layer in layers])
    np.testing.assert_array_equal(layered, merged)
    assert len(set(layered.tolist())) > 1, "candidates should score differently"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity")
def test_pin_to_core_wraps_around_the_usable_cores():
    original = os.sched_getaffinity(0)
    try:
        usable = sorted(original)
        core = pin_to_core(len(usable) + 1)
        assert core == usable[1 % len(usable)]
        assert os.sched_getaffinity(0) == {core}
    finally:
        os.sched_setaffinity(0, original)


def test_scorer_loads_a_copied_bundle_and_its_spec(small_bundle, tmp_path):
    copy = shutil.copytree(small_bundle, tmp_path / "copy")
    scorer = Scorer(copy)
    assert scorer.spec == load_spec(small_bundle)
    assert scorer.model_id == json.loads((small_bundle / "meta.json").read_text())["model_id"]


def test_featurize_many_equals_one_call_and_numbers_errors_from_the_first_record(monkeypatch, small_bundle,
                                                                                  sample_records):
    from bidder import scorer as scorer_module
    from bidder.scorer import featurize_many

    scorer = Scorer(small_bundle)
    records = list(sample_records[:50])
    whole = scorer.spec.allocate(len(records))
    scorer.featurizer.transform_into(whole, records)
    monkeypatch.setattr(scorer_module, "FEATURIZE_CHUNK", 7)  # 50 records: 8 calls, the last one short
    chunked = featurize_many(scorer.featurizer, scorer.spec, iter(records))
    assert chunked.keys() == whole.keys()
    for name in whole:
        np.testing.assert_array_equal(chunked[name], whole[name])
    with pytest.raises(ValueError, match=r"^record 22: "):
        featurize_many(scorer.featurizer, scorer.spec, records[:22] + [{"slotprice": "cheap"}])

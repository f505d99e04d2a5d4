"""Lean ONNX export: the served graph reproduces the trained deepctr model at batch 1 and 64, every model."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from bidder.spec import default_spec
from train.data.dataset import load_dataset
from train.errors import ParityError
from train.export import check_parity, export_lean, export_stock, serving_session
from train.models import ARCHITECTURES, deepctr_input
from train.evaluate import predict
from train.trainer import train_model

TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def dataset(synthetic_data):
    return load_dataset(synthetic_data, default_spec(), progress=False)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def trained(request, dataset):
    result = train_model(dataset, request.param, epochs=1, progress=False)
    # One short epoch leaves many weights near their initial values; shake every weight so each
    # path of the graph (every table row used, the FM, attention, cross and DNN parts) matters.
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in result.model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return result


def test_lean_graph_matches_trained_model(trained, dataset, tmp_path):
    spec = dataset.spec
    path = export_lean(trained.model, spec, trained.architecture, tmp_path / "model.onnx",
                       combiner=trained.hyperparameters["usertag_combiner"])
    report = check_parity(trained.model, path, spec, dataset.test, batch_sizes=(1, 64), tolerance=TOLERANCE)
    assert report["rows"] >= 1000
    assert report["batch_sizes"][:2] == [1, 64] and report["batch_sizes"][-1] == report["rows"]
    assert report["max_abs_diff"] <= TOLERANCE
    # the predictions are not degenerate: the check compares something that varies
    probs = predict(trained.model, deepctr_input({k: v[:1000] for k, v in dataset.test.inputs.items()}, spec))
    assert probs.std() > 1e-3


def test_lean_graph_has_one_gather_per_input_group_and_no_casts(trained, dataset, tmp_path):
    path = export_lean(trained.model, dataset.spec, trained.architecture, tmp_path / "model.onnx",
                       combiner=trained.hyperparameters["usertag_combiner"])
    graph = onnx.load(str(path)).graph
    tables = {init.name for init in graph.initializer if len(init.dims) == 2 and init.dims[0] >= 1000}
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in tables]
    assert len(gathers) == len(dataset.spec.input_names)
    assert not [n for n in graph.node if n.op_type == "Cast"]


def test_contract_of_the_bundle_graph(small_bundle):
    model = onnx.load(str(small_bundle / "model.onnx"))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    assert list(inputs) == ["sparse", "usertag"]
    for name, width in (("sparse", 18), ("usertag", 16)):
        assert inputs[name].elem_type == onnx.TensorProto.INT64
        dims = inputs[name].shape.dim
        assert dims[0].dim_param == "batch" and dims[1].dim_value == width
    (output,) = model.graph.output
    assert output.name == "ctr" and output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert output.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert output.type.tensor_type.shape.dim[1].dim_value == 1
    session = ort.InferenceSession(str(small_bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 64):
        feed = {"sparse": np.ones((batch, 18), np.int64), "usertag": np.zeros((batch, 16), np.int64)}
        (ctr,) = session.run(["ctr"], feed)
        assert ctr.shape == (batch, 1) and ctr.dtype == np.float32 and ((ctr > 0) & (ctr < 1)).all()


def test_parity_failure_is_loud(dataset, tmp_path):
    trained = train_model(dataset, "deepfm", epochs=1, progress=False)
    path = export_lean(trained.model, dataset.spec, "deepfm", tmp_path / "model.onnx", combiner="sum")
    with torch.no_grad():
        trained.model.out.bias.add_(1e-3)  # the graph no longer matches the model
    with pytest.raises(ParityError, match="differs from the trained model"):
        check_parity(trained.model, path, dataset.spec, dataset.test)


def test_stock_deepctr_export_runs_at_any_batch(dataset, tmp_path):
    trained = train_model(dataset, "deepfm", epochs=1, progress=False)
    path = export_stock(trained.model, dataset.spec, tmp_path / "stock.onnx")
    x = deepctr_input({k: v[:64] for k, v in dataset.test.inputs.items()}, dataset.spec)
    session = serving_session(path)
    expected = predict(trained.model, x)
    for batch in (1, 64):
        got = np.concatenate([session.run(None, {"x": x[i:i + batch]})[0].reshape(-1) for i in range(0, 64, batch)])
        assert np.max(np.abs(got - expected)) <= TOLERANCE

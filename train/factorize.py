"""Factorized DeepFM graphs, built from the weights of a bundle's lean ``model.onnx``.

``bidder/factorized.py`` explains the split and serves the graphs. This module reads the lean graph's
tables and DNN weights (``train/export.py`` names them), writes ``candidate.onnx`` and
``factorized.onnx``, proves them equal to ``model.onnx`` on random valid rows (and held-out rows when
the caller has them) and records them in ``meta.json``. Working from the ONNX file rather than the
torch model lets any DeepFM bundle, the shipped default included, be factorized without retraining.

Each side's part is one matrix product ``x @ W (+ c)``: ``x`` holds the side's gathered table rows
(per single field ``[vector, linear weight]``, per multi field the pooled ``[vector, linear(, count)]``)
followed by the same numbers squared, and W the side's columns of the first DNN layer (into h), ones
(the vectors into s), ``a`` (the linear weights into the scalar) and ``-a/2`` (the squared vector
coordinates into the scalar), where ``a`` is the calibration's scale (1 without one).

The graphs are built for few nodes, because ONNX Runtime's cost per node, not the arithmetic, is most of a
bid batch's scoring time: the calibration ``sigmoid(a * logit + b)`` is folded into the weights (the
scalar columns, the output weights and the FM term's factor) instead of two nodes of its own, and the
scalar reaches the output product through the DNN (once as is and once negated, so that ``relu(x) -
relu(-x)`` gives it back) instead of two Slices and an Add; ONNX Runtime then fuses the output product with
the sigmoid.

Compressed tables (``train/compress/embeddings.py``'s ``int8-embeddings``: int8 with one scale per row, or
float16; its ``int8-dynamic`` with ``ops=tables``: uint8 with one scale and zero point per table) stay
compressed in the factorized graphs, dequantized after the Gather exactly as ``model.onnx`` does it
(``Cast`` then ``Mul`` by the row's gathered scale, or the same ``DequantizeLinear``), so the graphs add
little to the bundle and score what ``model.onnx`` scores (float32 copies of the shipped bundle's tables
would save its two DequantizeLinear nodes: measured, about 0.5 µs of a 12 µs run, for 3.3 MB more). A
multi field's tag count, which per-row tables do not store, is the number of non-zero indices.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from bidder.bundle import add_graph, session_options
from bidder.factorized import (CAND_PART, CANDIDATE_FILE, FACTORIZED_FILE, GRAPH, PARITY_TOLERANCE, ROW_CAND, ROW_IMP,
                               candidate_fields, max_abs_diff, parity_rows)
from bidder.spec import SPARSE_INPUT, FeatureSpec
from train.bundle import MODEL_FILE, read_bundle
from train.errors import ParityError, TrainError
from train.export import OPSET, OUTPUT, graph_calibration

__all__ = ["build_graphs", "bundle_graphs", "factorize_bundle", "write_graphs"]

_EPS = 1e-8  # the lean graph's mean pooling divides by (count + 1e-8)
PARITY_REAL_ROWS = 1024


@dataclass
class Table:
    """One embedding table of the lean graph: float32 or compressed.

    Compressed: int8 with one scale per row or float16 (``train/compress/embeddings.py``'s ``int8-embeddings``;
    a multi field's table then has no count column), or uint8 with one scale and zero point for the
    table, read by a ``DequantizeLinear`` after the Gather (ONNX Runtime's quantizer, ``int8-dynamic``
    with ``ops=tables``).
    """
    values: np.ndarray                    # [rows, columns] float32, int8, float16 or uint8
    scale: np.ndarray | None = None       # int8: [rows, 1] float16 or float32; uint8: a float32 scalar
    zero_point: np.ndarray | None = None  # uint8: a uint8 scalar

    @property
    def compressed(self) -> bool:
        return self.values.dtype != np.float32

    @property
    def per_row(self) -> bool:
        """int8 with a scale per row, or float16: stored without a multi field's count column."""
        return self.values.dtype in (np.int8, np.float16)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    def rows(self, start: int, stop: int) -> "Table":
        scale = self.scale[start:stop] if self.scale is not None and self.scale.ndim else self.scale
        return Table(self.values[start:stop], scale, self.zero_point)


def _concat_tables(tables: list[Table]) -> Table:
    """Row slices of one table, concatenated (a per-table scale and zero point are shared)."""
    first = tables[0]
    per_row_scale = first.scale is not None and first.scale.ndim
    return Table(np.concatenate([t.values for t in tables]),
                 np.concatenate([t.scale for t in tables]) if per_row_scale else first.scale, first.zero_point)


@dataclass
class LeanWeights:
    """What the lean DeepFM graph computes with (``train.export.LeanModel``)."""
    single_table: Table          # [sum of single buckets, dim + 1]: field vector, linear weight
    offsets: np.ndarray          # [n_single]: each single field's first row
    multi_tables: list[Table]    # per multi field [buckets, dim + 2]: vector, linear, 1 (row 0 zero); compressed: no count
    layers: list[tuple[np.ndarray, np.ndarray]]  # DNN (weight [out, in], bias [out]), Linear + ReLU each
    out: np.ndarray              # dnn_linear [H_last, 1] (no bias)
    bias: float
    mean: bool                   # usertag combiner
    calibration: tuple[float, float] | None = None  # (scale, shift) applied to the logit, if the graph has one

    @property
    def dim(self) -> int:
        return self.single_table.shape[1] - 1


def read_lean_deepfm(model: onnx.ModelProto, spec: FeatureSpec, combiner: str) -> LeanWeights:
    """The weights of a lean DeepFM graph, or ``TrainError`` naming what does not look like one."""
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = list(model.graph.node)

    def need(name: str) -> np.ndarray:
        if name not in init:
            raise TrainError(f"model.onnx has no {name!r}: not a lean DeepFM graph (train/export.py)")
        return init[name]

    def table(name: str) -> Table:  # train/export.py's float32 table, or compressed by train/compress/embeddings.py
        if f"{name}_int8" in init:
            return Table(init[f"{name}_int8"], need(f"{name}_scale"))
        if f"{name}_fp16" in init:
            return Table(init[f"{name}_fp16"])
        if f"{name}_quantized" in init:
            table = Table(init[f"{name}_quantized"], need(f"{name}_scale"), need(f"{name}_zero_point"))
            if table.values.dtype != np.uint8 or table.scale.ndim or table.zero_point.ndim:
                raise TrainError(f"model.onnx: {name}_quantized: expected uint8 with one scale and zero point")
            return table
        return Table(need(name))

    if not any(n.op_type == "Pow" for n in nodes):
        raise TrainError("model.onnx has no FM term: not a lean DeepFM graph")
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def bias_of(node: onnx.NodeProto) -> np.ndarray | None:
        """The 1-D initializer an Add reading ``node``'s output adds: a DNN layer's bias (a Gemm that ONNX
        Runtime's quantizer split into MatMul + Add); None for the output product."""
        for reader in readers.get(node.output[0], []):
            biases = [init[name] for name in reader.input if name in init and init[name].ndim == 1]
            if reader.op_type == "Add" and biases:
                return biases[0]
        return None

    layers, outs = [], []
    for node in nodes:
        if node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
                raise TrainError(f"model.onnx: unexpected Gemm attributes {attrs}")
            weight = init[node.input[1]]
            layers.append((weight if attrs.get("transB", 0) else weight.T, init[node.input[2]]))
        elif node.op_type == "MatMul" and node.input[1] in init:
            bias = bias_of(node)
            if bias is None:
                outs.append(init[node.input[1]])
            else:
                layers.append((init[node.input[1]].T, bias))
    if not layers or len(outs) != 1:
        raise TrainError("model.onnx: expected a DNN of Gemm layers and one output MatMul (lean DeepFM graph)")
    weights = LeanWeights(
        single_table=table("embeddings.single_table"), offsets=need("embeddings.single_offsets").reshape(-1),
        multi_tables=[table(f"embeddings.multi_table_{i}") for i in range(len(spec.multi_fields))],
        layers=layers, out=outs[0], bias=float(need("bias").reshape(-1)[0]), mean=combiner == "mean",
        calibration=graph_calibration(init))
    fields = len(spec.single_fields) + len(spec.multi_fields)
    shapes_ok = (
        np.array_equal(weights.offsets, spec.sparse_offsets)
        and weights.single_table.shape[0] == sum(f.buckets for f in spec.single_fields)
        and all(t.shape == (f.buckets, weights.dim + (1 if t.per_row else 2))
                for t, f in zip(weights.multi_tables, spec.multi_fields))
        and all(t.scale is None or not t.per_row or t.scale.shape == (t.shape[0], 1)
                for t in [weights.single_table, *weights.multi_tables])
        and layers[0][0].shape[1] == fields * weights.dim
        and all(w.shape[1] == prev[0].shape[0] for (w, _), prev in zip(layers[1:], layers))
        and weights.out.shape == (layers[-1][0].shape[0], 1))
    if not shapes_ok:
        raise TrainError("model.onnx: table or layer shapes do not match spec.json")
    return weights


# -- graph building ----------------------------------------------------------------------------------------
class _Graph:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name

    def model(self, inputs: list, outputs: list, doc: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "factorized_deepfm", inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="train.factorize",
                                  doc_string=doc)
        model.ir_version = 8  # what the lean export writes; readable by every onnxruntime the bidder supports
        onnx.checker.check_model(model, full_check=True)
        return model


class _Layout:
    """Columns of a side part: ``[h (hidden) | scalar | -scalar | s (dim)]``.

    The scalar is there twice, once negated, so that it can cross the ReLUs of the DNN unchanged (``relu(x) -
    relu(-x) = x``) and reach the output product, which then adds it with the DNN's output in one node.
    """

    def __init__(self, hidden: int, dim: int) -> None:
        self.hidden, self.dim = hidden, dim
        self.scalar, self.negated = hidden, hidden + 1
        self.s = slice(hidden + 2, hidden + 2 + dim)
        self.width = hidden + 2 + dim

    def describe(self) -> dict[str, Any]:
        return {"width": self.width, "dnn_first_layer": [0, self.hidden], "scalar": [self.scalar, self.scalar + 1],
                "scalar_negated": [self.negated, self.negated + 1], "fm_sum": [self.s.start, self.s.stop]}


def _side_part(g: _Graph, side: str, spec: FeatureSpec, w: LeanWeights, layout: _Layout, fields: set[str],
               out: str, with_constants: bool) -> str:
    """Nodes computing one side's part ``[n, D]`` (named ``out``) from the model inputs.

    ``x`` holds per single field its table row ``[vector, linear weight]`` and per multi field its pooled
    ``[vector, linear(, count)]``, followed by all of that squared; one product ``x @ W (+ c)`` then yields
    ``[h | scalar | -scalar | s]`` (the squared vector coordinates enter the scalar with -1/2). With a
    calibration ``(a, b)`` the scalar columns are ``a`` times theirs and the constants carry ``a * bias + b``:
    the row graph adds them to ``a`` times the DNN output and to ``a / 2`` times the FM square, which is
    ``a * logit + b``.
    """
    dim, first_w, first_b = w.dim, w.layers[0][0], w.layers[0][1]
    scale, shift = w.calibration if w.calibration is not None else (1.0, 0.0)
    pieces: list[str] = []
    roles: list[tuple[str, int, int]] = []  # per column of x: (role, field position in the DNN input, dim)
    singles = [(j, f) for j, f in enumerate(spec.single_fields) if f.name in fields]
    if singles:
        columns = np.array([j for j, _ in singles], dtype=np.int64)
        table = _concat_tables([w.single_table.rows(w.offsets[j], w.offsets[j] + f.buckets) for j, f in singles])
        offsets = np.concatenate([[0], np.cumsum([f.buckets for _, f in singles])[:-1]]).astype(np.int64).reshape(1, -1)
        picked = g.op("Gather", [SPARSE_INPUT, g.const(f"{side}.columns", columns)], f"{side}.picked", axis=1)
        rows = g.op("Add", [picked, g.const(f"{side}.offsets", offsets)], f"{side}.rows")
        gathered = _gather_rows(g, f"{side}.single_table", table, rows)
        pieces.append(g.op("Flatten", [gathered], f"{side}.singles", axis=1))
        for j, _ in singles:
            roles += [("vector", j, d) for d in range(dim)] + [("linear", j, 0)]
    for i, f in enumerate(spec.multi_fields):
        if f.name not in fields:
            continue
        position = len(spec.single_fields) + i
        table = w.multi_tables[i]
        tags = _gather_rows(g, f"{side}.multi_table_{i}", table, f.name)
        pooled = g.op("ReduceSum", [tags, g.const(f"{side}.axis_{i}", np.array([1], np.int64))], f"{side}.pooled_{i}",
                      keepdims=0)
        if w.mean:  # as the lean graph: vector and linear weight divided by (count + eps)
            if table.per_row:  # no count column: the count is the number of non-zero (non-padding) indices
                padding = g.op("Equal", [f.name, g.const(f"{side}.padding_{i}", np.array(0, np.int64))],
                               f"{side}.padding_{i}.is")
                present = g.op("Cast", [g.op("Not", [padding], f"{side}.present_{i}")], f"{side}.present_{i}.float",
                               to=TensorProto.FLOAT)
                count = g.op("ReduceSum", [present, g.const(f"{side}.count_axis_{i}", np.array([1], np.int64))],
                             f"{side}.count_{i}", keepdims=1)
            else:
                count = g.op("Slice", [pooled, g.const(f"{side}.count_start_{i}", np.array([dim + 1], np.int64)),
                                       g.const(f"{side}.count_end_{i}", np.array([dim + 2], np.int64)),
                                       g.const(f"{side}.count_axis_{i}", np.array([1], np.int64))], f"{side}.count_{i}")
            count = g.op("Add", [count, g.const(f"{side}.eps_{i}", np.array(_EPS, np.float32))], f"{side}.count_eps_{i}")
            pooled = g.op("Div", [pooled, count], f"{side}.mean_{i}")
        pieces.append(pooled)
        extra = table.shape[1] - dim - 1  # the count column of a float32 table
        roles += [("vector", position, d) for d in range(dim)] + [("linear", position, 0)] + [("none", position, 0)] * extra
    linear = pieces[0] if len(pieces) == 1 else g.op("Concat", pieces, f"{side}.linear", axis=1)
    squared = g.op("Mul", [linear, linear], f"{side}.squared")
    x = g.op("Concat", [linear, squared], f"{side}.x", axis=1)
    roles += [("square" if role == "vector" else "none", position, d) for role, position, d in roles]

    weight = np.zeros((len(roles), layout.width), dtype=np.float64)
    for row, (role, position, d) in enumerate(roles):
        if role == "vector":
            weight[row, :layout.hidden] = first_w[:, position * dim + d]  # into h
            weight[row, layout.s.start + d] = 1.0                        # into the FM sum
        elif role == "linear":
            weight[row, layout.scalar] = scale
        elif role == "square":                                           # FM: minus half the sum of squares
            weight[row, layout.scalar] = -0.5 * scale
    weight[:, layout.negated] = -weight[:, layout.scalar]
    inputs = [x, g.const(f"{side}.weight", weight.astype(np.float32))]
    if with_constants:  # the first layer's bias and the output bias (calibrated), once (on the candidate side)
        constants = np.zeros(layout.width, dtype=np.float32)
        constants[:layout.hidden] = first_b
        constants[layout.scalar] = scale * w.bias + shift
        constants[layout.negated] = -constants[layout.scalar]
        inputs.append(g.const(f"{side}.constants", constants))
    return g.op("Gemm", inputs, out)


def _gather_rows(g: _Graph, name: str, table: Table, index: str) -> str:
    """float32 rows of ``table`` at ``index``; a compressed table is dequantized as ``model.onnx`` does it."""
    suffix = {np.dtype(np.int8): "_int8", np.dtype(np.float16): "_fp16", np.dtype(np.uint8): "_quantized"}
    rows = g.op("Gather", [g.const(f"{name}{suffix.get(table.values.dtype, '')}", table.values), index],
                f"{name}.gathered")
    if not table.compressed:
        return rows
    if table.zero_point is not None:
        return g.op("DequantizeLinear", [rows, g.const(f"{name}_scale", table.scale),
                                         g.const(f"{name}_zero_point", table.zero_point)], f"{name}.dequantized")
    rows = g.op("Cast", [rows], f"{name}.float", to=TensorProto.FLOAT)
    if table.scale is None:
        return rows
    scale = g.op("Gather", [g.const(f"{name}_scale", table.scale), index], f"{name}.scale")
    if table.scale.dtype != np.float32:
        scale = g.op("Cast", [scale], f"{name}.scale_float", to=TensorProto.FLOAT)
    return g.op("Mul", [rows, scale], f"{name}.dequantized")


def _inputs(spec: FeatureSpec, batch: str) -> list[onnx.ValueInfoProto]:
    return [helper.make_tensor_value_info(name, TensorProto.INT64, [batch, spec.input_width(name)])
            for name in spec.input_names]


def build_graphs(model: onnx.ModelProto, spec: FeatureSpec, combiner: str = "sum"
                 ) -> tuple[onnx.ModelProto, onnx.ModelProto, dict[str, Any]]:
    """(candidate graph, factorized graph, layout) for the lean DeepFM ``model``."""
    w = read_lean_deepfm(model, spec, combiner)
    cand = set(candidate_fields(spec))
    imp = {f.name for f in spec.fields} - cand
    if not cand or not imp:
        raise TrainError(f"factorizing needs fields on both sides; candidate fields: {sorted(cand)}")
    layout = _Layout(w.layers[0][0].shape[0], w.dim)
    doc = (f"Factorized DeepFM (train/factorize.py). {CAND_PART} columns: [0, {layout.hidden}) the first DNN "
           f"layer's pre-activation share, {layout.scalar} linear terms - 0.5 * sum of squared field vectors, "
           f"[{layout.s.start}, {layout.s.stop}) the FM sum vector; the candidate side carries the biases.")

    g = _Graph()
    _side_part(g, "candidate", spec, w, layout, cand, CAND_PART, with_constants=True)
    candidate = g.model(_inputs(spec, "candidates"),
                        [helper.make_tensor_value_info(CAND_PART, TensorProto.FLOAT, ["candidates", layout.width])], doc)

    g = _Graph()
    imp_part = _side_part(g, "imp", spec, w, layout, imp, "imp.part", with_constants=False)
    a = g.op("Gather", [imp_part, ROW_IMP], "row.imp", axis=0)
    b = g.op("Gather", [CAND_PART, ROW_CAND], "row.candidate", axis=0)
    total = g.op("Add", [a, b], "row.sum")
    h = g.op("Relu", [total], "row.hidden_0")
    # every layer after the first carries relu(scalar) and relu(-scalar) through two more units (weight 1, bias 0:
    # a ReLU of a non-negative number is that number); the first reads them from their columns of relu(row.sum)
    scale = w.calibration[0] if w.calibration is not None else 1.0
    width = layout.width
    for k, (lw, lb) in enumerate(w.layers[1:], start=1):
        units = lw.shape[0]
        weight = np.zeros((units + 2, width), dtype=np.float32)
        weight[:units, :lw.shape[1]] = lw  # the first layer's h, or the previous layer's units
        carried = (layout.scalar, layout.negated) if k == 1 else (width - 2, width - 1)
        weight[units, carried[0]] = weight[units + 1, carried[1]] = 1.0
        bias = np.concatenate([lb, np.zeros(2, np.float32)]).astype(np.float32)
        h = g.op("Gemm", [h, g.const(f"dnn.{k}.weight", weight), g.const(f"dnn.{k}.bias", bias)], f"row.gemm_{k}",
                 transB=1)
        h = g.op("Relu", [h], f"row.hidden_{k}")
        width = units + 2
    out = np.zeros((width, 1), dtype=np.float32)
    out[:w.out.shape[0]] = (scale * w.out.astype(np.float64)).astype(np.float32)  # a * the DNN's output
    carried = (layout.scalar, layout.negated) if len(w.layers) == 1 else (width - 2, width - 1)
    out[carried[0]], out[carried[1]] = 1.0, -1.0  # the scalar (a * linear terms - a/2 * squares + a * bias + b)
    s = g.op("Slice", [total, g.const("row.s_start", np.array([layout.s.start], np.int64)),
                       g.const("row.s_end", np.array([layout.s.stop], np.int64)),
                       g.const("row.axis", np.array([1], np.int64))], "row.s")
    square = g.op("ReduceSumSquare", [s], "row.square_of_sum", axes=[1], keepdims=1)
    # a * logit + b = relu(scalar) - relu(-scalar) + a * dnn + a/2 * |s|^2, in one product
    logit = g.op("Gemm", [h, g.const("row.out", out), square], "row.logit", beta=0.5 * scale)
    g.op("Sigmoid", [logit], OUTPUT)
    factorized = g.model(
        _inputs(spec, "imps") + [helper.make_tensor_value_info(CAND_PART, TensorProto.FLOAT, ["candidates", layout.width]),
                                 helper.make_tensor_value_info(ROW_IMP, TensorProto.INT64, ["rows"]),
                                 helper.make_tensor_value_info(ROW_CAND, TensorProto.INT64, ["rows"])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["rows", 1])], doc)
    return candidate, factorized, layout.describe()


# -- checking and writing ------------------------------------------------------------------------------------
def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])


def check_parity(model_path: Path, candidate_path: Path, factorized_path: Path, spec: FeatureSpec,
                 held_out: Mapping[str, np.ndarray] | None = None, seed: int = 0) -> dict[str, Any]:
    """Factorized vs canonical (``session.run``): 64 random imps × 16 random candidates in shuffled order
    with repeats, plus held-out rows (each its own imp and candidate); ``ParityError`` above 1e-6."""
    canonical, candidate, factorized = _session(model_path), _session(candidate_path), _session(factorized_path)
    imps, cands, row_imp, row_cand = parity_rows(spec, np.random.default_rng(seed))
    worst, rows = max_abs_diff(canonical, candidate, factorized, spec, imps, cands, row_imp, row_cand), len(row_imp)
    if held_out is not None:
        n = min(PARITY_REAL_ROWS, len(next(iter(held_out.values()))))
        if n:
            real = {name: np.ascontiguousarray(held_out[name][:n]) for name in spec.input_names}
            index = np.arange(n, dtype=np.int64)
            worst = max(worst, max_abs_diff(canonical, candidate, factorized, spec, real, real, index, index))
            rows += n
    if not worst <= PARITY_TOLERANCE:
        raise ParityError(f"{factorized_path}: factorized graphs differ from {model_path.name} by {worst:.3g} over "
                          f"{rows} rows (tolerance {PARITY_TOLERANCE:g})")
    return {"max_abs_diff": worst, "rows": rows, "tolerance": PARITY_TOLERANCE}


def write_graphs(model_path: Path, spec: FeatureSpec, out_dir: Path, *, combiner: str = "sum",
                 held_out: Mapping[str, np.ndarray] | None = None) -> tuple[dict[str, Path], dict[str, Any]]:
    """Build, save and check the factorized graphs of ``model_path`` in ``out_dir``.

    Returns ({file name: path}, the ``meta.json`` entry for ``graphs.factorized``).
    """
    candidate, factorized, layout = build_graphs(onnx.load(str(model_path)), spec, combiner)
    paths = {CANDIDATE_FILE: out_dir / CANDIDATE_FILE, FACTORIZED_FILE: out_dir / FACTORIZED_FILE}
    onnx.save(candidate, str(paths[CANDIDATE_FILE]))
    onnx.save(factorized, str(paths[FACTORIZED_FILE]))
    parity = check_parity(model_path, paths[CANDIDATE_FILE], paths[FACTORIZED_FILE], spec, held_out)
    entry = {"files": list(paths), "candidate_fields": list(candidate_fields(spec)), "layout": layout,
             "parity": parity}
    return paths, entry


def bundle_graphs(architecture: str, hyperparameters: Mapping[str, Any], model_path: Path, spec: FeatureSpec,
                  out_dir: Path, held_out: Mapping[str, np.ndarray] | None = None
                  ) -> tuple[dict[str, Path] | None, dict[str, Any] | None]:
    """The factorized graphs a new bundle of ``model_path`` ships ((files, ``meta.json``'s ``graphs``)), or
    (None, None): only a DeepFM with DNN layers splits into imp and candidate parts (the other models'
    interactions do not; FM + linear alone has no DNN to split)."""
    if architecture != "deepfm" or not hyperparameters.get("dnn_hidden_units"):
        return None, None
    files, entry = write_graphs(model_path, spec, out_dir, held_out=held_out,
                                combiner=hyperparameters.get("usertag_combiner", "sum"))
    return files, {GRAPH: entry}


def factorize_bundle(bundle: str | Path, *, held_out: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Add the factorized graphs to an existing DeepFM bundle (``model.onnx`` untouched); returns the entry."""
    bundle = Path(bundle)
    model_path = bundle / MODEL_FILE
    meta, spec = read_bundle(bundle)
    architecture = meta.get("architecture")
    if architecture != "deepfm":
        raise TrainError(f"{bundle}: factorized scoring needs a DeepFM bundle, this one is {architecture!r} "
                         "(its interactions do not split into an imp and a candidate part; it keeps row scoring)")
    combiner = (meta.get("hyperparameters") or {}).get("usertag_combiner", "sum")
    with tempfile.TemporaryDirectory(prefix=".factorize-", dir=bundle) as tmp:
        paths, entry = write_graphs(model_path, spec, Path(tmp), combiner=combiner, held_out=held_out)
        add_graph(bundle, GRAPH, paths, entry)  # model.onnx and the rest of the bundle as they were
    return entry

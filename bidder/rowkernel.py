"""The factorized graph read into a C kernel (``bidder/_rowkernel.h``): the same arithmetic, without ONNX Runtime's
cost per call.

``factorized.onnx`` (``train/factorize.py``) is small arithmetic: for the shipped bundle's engine batch of 12 imps ×
9 candidates, two products of ~0.25 M multiply-adds each. ONNX Runtime runs it in ~29 µs when the call is repeated
in a loop (~8.5 µs of it fixed per call), but the server does other work between two calls: inside a worker at
c=32 the same call takes ~82 µs, and in a loop that streams 16 MB between calls (as the server's aiohttp and
Python do) 80–84 µs, whatever the batch size (+47 to +50 µs at 1, 4, 12 and 24 imps). That extra is the
cache misses of ORT's code and buffers on each call; at c=1 it is paid by every request.

The kernel reads the graph's own initializers and checks the graph's shape node by node, so it scores exactly
the graph the bundle's digest covers; a shape it does not know is ``Unsupported`` and the
scorer keeps ONNX Runtime. The serving scorer also checks the kernel against ``model.onnx`` at load, to the
same 1e-6 as the factorized graph (``FactorizedScorer.check_parity``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from bidder._rowkernel import MAX_LAYERS, MAX_MULTI, RowKernel
from bidder.bundle import CAND_PART, ROW_CAND, ROW_IMP
from bidder.scorer import OUTPUT
from bidder.spec import SPARSE_INPUT

__all__ = ["RowKernel", "Unsupported", "read_kernel"]


class Unsupported(ValueError):
    """A factorized graph whose shape the kernel does not compute; the message says which node."""


class _Graph:
    def __init__(self, model: Any):
        from onnx import helper, numpy_helper
        self.by_output = {out: node for node in model.graph.node for out in node.output}
        self.init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.inputs = {i.name for i in model.graph.input}
        self._attr = helper.get_attribute_value

    def node(self, name: str, op: str, n_inputs: int | tuple[int, ...] | None = None) -> Any:
        node = self.by_output.get(name)
        if node is None or node.op_type != op or node.domain not in ("", "ai.onnx"):
            raise Unsupported(f"{name}: expected {op}, found {node.op_type if node is not None else 'no node'}")
        counts = (n_inputs,) if isinstance(n_inputs, int) else n_inputs
        if counts is not None and len(node.input) not in counts:
            raise Unsupported(f"{name}: {op} with {len(node.input)} inputs")
        return node

    def attrs(self, node: Any) -> dict[str, Any]:
        return {a.name: self._attr(a) for a in node.attribute}

    def const(self, name: str) -> np.ndarray:
        if name not in self.init:
            raise Unsupported(f"{name}: expected an initializer")
        return self.init[name]

    def axis_one(self, node: Any, name: str) -> None:
        if [int(a) for a in np.ravel(self.const(name))] != [1]:
            raise Unsupported(f"{node.output[0]}: expected axis 1")


def _dequantized(g: _Graph, name: str) -> tuple[np.ndarray, str]:
    """(the float32 table whose rows ``name`` gathers, the index input), dequantized as the graph does it per row."""
    node = g.by_output.get(name)
    if node is not None and node.op_type == "DequantizeLinear":
        if len(node.input) != 3 or g.attrs(node).get("axis", 1) != 1:
            raise Unsupported(f"{name}: DequantizeLinear with a zero point and one scale expected")
        scale, zero = g.const(node.input[1]), g.const(node.input[2])
        if scale.size != 1 or zero.size != 1 or scale.dtype != np.float32:
            raise Unsupported(f"{name}: DequantizeLinear with one scale and zero point expected")
        gather = g.node(node.input[0], "Gather", 2)
        values = g.const(gather.input[0])
        if values.dtype not in (np.uint8, np.int8) or zero.dtype != values.dtype:
            raise Unsupported(f"{name}: DequantizeLinear of {values.dtype}")
        table = ((values.astype(np.int32) - np.int32(zero.reshape(()))).astype(np.float32)
                 * np.float32(scale.reshape(())))
        return table, _index(g, gather)
    if node is not None and node.op_type == "Mul":  # int8 rows times their gathered scale
        cast = g.node(node.input[0], "Cast", 1)
        gather = g.node(cast.input[0], "Gather", 2)
        scale_node = g.by_output.get(node.input[1])
        if scale_node is not None and scale_node.op_type == "Cast":
            scale_node = g.node(scale_node.input[0], "Gather", 2)
        else:
            scale_node = g.node(node.input[1], "Gather", 2)
        if scale_node.input[1] != gather.input[1] or g.attrs(gather).get("axis", 0) != 0:
            raise Unsupported(f"{name}: rows and scales gathered at different indices")
        values, scales = g.const(gather.input[0]), g.const(scale_node.input[0]).astype(np.float32)
        if values.ndim != 2 or scales.shape != (values.shape[0], 1):
            raise Unsupported(f"{name}: one scale per row expected, got {scales.shape}")
        return values.astype(np.float32) * scales, _index(g, gather)
    if node is not None and node.op_type == "Cast":  # float16 rows
        gather = g.node(node.input[0], "Gather", 2)
        return g.const(gather.input[0]).astype(np.float32), _index(g, gather)
    gather = g.node(name, "Gather", 2)
    values = g.const(gather.input[0])
    if values.dtype != np.float32:
        raise Unsupported(f"{name}: gathers {values.dtype} rows without dequantizing them")
    return values, _index(g, gather)


def _mean(g: _Graph, div: Any) -> tuple:
    """How the mean pooling ``div`` = sum / (count + eps) counts: ("column", j, eps) for the sum's own column j, or
    ("nonzero", eps, input) for the number of non-zero indices of ``input``."""
    plus = g.node(div.input[1], "Add", 2)
    eps = g.const(plus.input[1])
    if eps.size != 1 or eps.dtype != np.float32:
        raise Unsupported(f"{plus.output[0]}: expected count + a float32 constant")
    eps = float(eps.reshape(()))
    count = g.by_output.get(plus.input[0])
    if count is not None and count.op_type == "Slice":
        g.node(count.output[0], "Slice", 4)
        g.axis_one(count, count.input[3])
        start, end = int(np.ravel(g.const(count.input[1]))[0]), int(np.ravel(g.const(count.input[2]))[0])
        if count.input[0] != div.input[0] or end != start + 1:
            raise Unsupported(f"{count.output[0]}: expected one column of the pooled sum")
        return ("column", start, eps)
    count = g.node(plus.input[0], "ReduceSum", 2)
    g.axis_one(count, count.input[1])
    if g.attrs(count).get("keepdims", 1) != 1:
        raise Unsupported(f"{count.output[0]}: expected keepdims")
    cast = g.node(count.input[0], "Cast", 1)
    not_ = g.node(cast.input[0], "Not", 1)
    equal = g.node(not_.input[0], "Equal", 2)
    if g.attrs(cast).get("to") != 1 or np.ravel(g.const(equal.input[1])).tolist() != [0]:  # 1: FLOAT
        raise Unsupported(f"{count.output[0]}: expected the count of non-zero indices as float")
    return ("nonzero", eps, equal.input[0])


def _index(g: _Graph, gather: Any) -> str:
    if g.attrs(gather).get("axis", 0) != 0 or g.const(gather.input[0]).ndim != 2:
        raise Unsupported(f"{gather.output[0]}: expected rows of a 2-d table")
    return gather.input[1]


def read_kernel(path: str | os.PathLike) -> RowKernel:
    """A ``RowKernel`` for the factorized graph at ``path``; ``Unsupported`` for a graph of another shape."""
    import onnx
    g = _Graph(onnx.load(str(Path(path))))
    sigmoid = g.node(OUTPUT, "Sigmoid", 1)
    logit = g.node(sigmoid.input[0], "Gemm", 3)
    attrs = g.attrs(logit)
    if attrs.get("alpha", 1.0) != 1.0 or attrs.get("transA", 0) or attrs.get("transB", 0):
        raise Unsupported(f"{logit.output[0]}: Gemm with alpha 1, no transposes expected")
    beta = float(attrs.get("beta", 1.0))
    out = g.const(logit.input[1])
    square = g.node(logit.input[2], "ReduceSumSquare", 1)
    if list(g.attrs(square).get("axes", [])) != [1] or g.attrs(square).get("keepdims", 1) != 1:
        raise Unsupported(f"{square.output[0]}: expected axes [1], keepdims")
    s = g.node(square.input[0], "Slice", 4)
    g.axis_one(s, s.input[3])
    s0, s1 = int(np.ravel(g.const(s.input[1]))[0]), int(np.ravel(g.const(s.input[2]))[0])
    total_name = s.input[0]

    layers: list[tuple[np.ndarray, np.ndarray]] = []
    h = logit.input[0]
    while True:
        relu = g.node(h, "Relu", 1)
        if relu.input[0] == total_name:
            break
        gemm = g.node(relu.input[0], "Gemm", 3)
        a = g.attrs(gemm)
        if a.get("transB", 0) != 1 or a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
            raise Unsupported(f"{gemm.output[0]}: Gemm with transB and alpha, beta 1 expected")
        weight, bias = g.const(gemm.input[1]), g.const(gemm.input[2])
        if weight.dtype != np.float32 or bias.dtype != np.float32 or bias.shape != (weight.shape[0],):
            raise Unsupported(f"{gemm.output[0]}: float32 weight [out, in] and bias [out] expected")
        layers.append((weight, bias))
        h = gemm.input[0]
        if len(layers) > MAX_LAYERS:
            raise Unsupported(f"more than {MAX_LAYERS} layers")
    layers.reverse()

    total = g.node(total_name, "Add", 2)
    row_imp, row_cand = g.node(total.input[0], "Gather", 2), g.node(total.input[1], "Gather", 2)
    if (row_imp.input[1] != ROW_IMP or row_cand.input[1] != ROW_CAND or row_cand.input[0] != CAND_PART
            or g.attrs(row_imp).get("axis", 0) or g.attrs(row_cand).get("axis", 0)):
        raise Unsupported(f"{total_name}: expected imp part[row_imp] + cand_part[row_cand]")
    imp = g.node(row_imp.input[0], "Gemm", 2)
    a = g.attrs(imp)
    if a.get("transA", 0) or a.get("transB", 0) or a.get("alpha", 1.0) != 1.0:
        raise Unsupported(f"{imp.output[0]}: Gemm x @ W expected")
    weight = g.const(imp.input[1])
    x = g.node(imp.input[0], "Concat", 2)
    squared = g.node(x.input[1], "Mul", 2)
    if g.attrs(x).get("axis") != 1 or squared.input[0] != x.input[0] or squared.input[1] != x.input[0]:
        raise Unsupported(f"{x.output[0]}: expected [x | x * x]")
    linear = g.by_output.get(x.input[0])
    pieces = list(linear.input) if linear is not None and linear.op_type == "Concat" else [x.input[0]]
    if linear is not None and linear.op_type == "Concat" and g.attrs(linear).get("axis") != 1:
        raise Unsupported(f"{x.input[0]}: Concat on axis 1 expected")

    single: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    multi: list[tuple[str, np.ndarray, tuple | None]] = []
    for at, piece in enumerate(pieces):
        node = g.by_output.get(piece)
        if node is not None and node.op_type == "Flatten" and at == 0 and single is None:
            if g.attrs(node).get("axis", 1) != 1:
                raise Unsupported(f"{piece}: Flatten on axis 1 expected")
            table, index = _dequantized(g, node.input[0])
            rows = g.node(index, "Add", 2)
            picked = g.node(rows.input[0], "Gather", 2)
            if picked.input[0] != SPARSE_INPUT or g.attrs(picked).get("axis") != 1:
                raise Unsupported(f"{index}: expected the sparse input's columns plus offsets")
            columns, offsets = g.const(picked.input[1]), g.const(rows.input[1])
            if columns.ndim != 1 or offsets.size != columns.size:
                raise Unsupported(f"{index}: {columns.size} columns, {offsets.size} offsets")
            single = (columns.astype(np.int64), offsets.astype(np.int64).reshape(-1), table)
        elif node is not None and node.op_type in ("ReduceSum", "Div"):
            mean = None
            if node.op_type == "Div":
                node, mean = g.node(node.input[0], "ReduceSum", 2), _mean(g, node)
            if g.attrs(node).get("keepdims", 1) != 0:
                raise Unsupported(f"{piece}: ReduceSum without keepdims expected")
            g.axis_one(node, node.input[1])
            table, index = _dequantized(g, node.input[0])
            if index not in g.inputs:
                raise Unsupported(f"{piece}: pools another value than a graph input")
            if mean is not None and mean[0] == "nonzero" and mean[2] != index:
                raise Unsupported(f"{piece}: counts the tags of another input")
            multi.append((index, table, mean[:2] if mean is not None and mean[0] == "nonzero" else mean))
        else:
            raise Unsupported(f"{piece}: expected a Flatten of single fields or a ReduceSum (or mean) of a multi "
                              f"field")
    if len(multi) > MAX_MULTI:
        raise Unsupported(f"more than {MAX_MULTI} multi fields")
    if single is None:
        columns = offsets = np.zeros(0, np.int64)
        single_table = np.zeros((0, 0), np.float32)
    else:
        columns, offsets, single_table = single
    k = len(columns) * (single_table.shape[1] if single_table.ndim == 2 else 0) + sum(t.shape[1] for _, t, _ in multi)
    if weight.dtype != np.float32 or weight.shape[0] != 2 * k:
        raise Unsupported(f"{imp.output[0]}: weight {weight.shape} for an x {2 * k} wide")
    return RowKernel(columns, offsets, np.ascontiguousarray(single_table, np.float32),
                     [(name, np.ascontiguousarray(t, np.float32), mean) for name, t, mean in multi],
                     np.ascontiguousarray(weight), [(np.ascontiguousarray(w), np.ascontiguousarray(b))
                                                    for w, b in layers],
                     out, beta, s0, s1)

"""ONNX export: the lean serving graph, the stock deepctr graph for comparison, and the parity check.

deepctr's own graph is slow to serve: it slices one float matrix per field, casts each slice back to
int64, runs a gather per field and a masked pooling per multi field. The lean graph takes the
featurizer's int64 inputs as they are and does one gather per input group: the single-valued fields
share one concatenated table (a constant offset per column turns field indices into rows of it), and
each table row holds the field's embedding next to its linear weight, so the linear part costs
nothing extra. Multi-field tables zero their padding row 0 and carry a column of ones, so a plain sum
over the gathered rows yields the masked sum and the tag count at once: no mask, no casts.

The interaction heads below repeat deepctr's arithmetic in the same order with the trained weights,
so the exported graph agrees with the trained model to float32 rounding; ``check_parity`` proves it
on held-out rows at batch 1, 64 and all rows, and raises ``ParityError`` otherwise.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

from bidder.bundle import session_options
from bidder.spec import FeatureSpec
from train.calibrate import Calibration
from train.data.dataset import Split
from train.errors import ParityError, TrainError
from train.evaluate import predict
from train.models import deepctr_input

__all__ = ["CALIBRATION_SCALE", "CALIBRATION_SHIFT", "OPSET", "OUTPUT", "PARITY_TOLERANCE", "check_parity",
           "export_lean", "export_module", "export_stock", "graph_calibration", "lean_module", "serving_session",
           "torch_probabilities"]

OPSET = 17
OUTPUT = "ctr"
CALIBRATION_SCALE, CALIBRATION_SHIFT = "calibration_scale", "calibration_shift"  # the lean graph's initializers
STOCK_INPUT = "x"
PARITY_TOLERANCE = 1e-6
PARITY_ROWS = 2048
_EPS = 1e-8  # deepctr's mean pooling divides by (count + 1e-8)


# -- the lean graph -----------------------------------------------------------------------------------------
class Embeddings(nn.Module):
    """Model inputs -> (field vectors ``[batch, fields, dim]`` or None, linear logit ``[batch, 1]``)."""

    def __init__(self, spec: FeatureSpec, model: nn.Module, with_vectors: bool, combiner: str) -> None:
        super().__init__()
        self.names = list(spec.input_names)
        self.has_single = bool(spec.single_fields)
        self.n_multi = len(spec.multi_fields)
        self.mean = combiner == "mean"
        self.dim = model.embedding_dict[spec.fields[0].name].weight.shape[1] if with_vectors else 0
        vectors = model.embedding_dict if with_vectors else None
        linear = model.linear_model.embedding_dict
        if self.has_single:
            rows = [_table_rows(f.name, vectors, linear) for f in spec.single_fields]
            self.register_buffer("single_table", torch.cat(rows, dim=0))
            self.register_buffer("single_offsets", torch.from_numpy(spec.sparse_offsets).reshape(1, -1).clone())
        for i, f in enumerate(spec.multi_fields):
            table = _table_rows(f.name, vectors, linear)
            table = torch.cat([table, torch.ones(len(table), 1)], dim=1)  # the last column counts tags
            table[0] = 0.0  # padding contributes nothing, which is what deepctr's mask achieves
            self.register_buffer(f"multi_table_{i}", table)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        vectors, linear = [], []
        position = 0
        if self.has_single:
            rows = self.gather("single_table", inputs[0] + self.single_offsets)  # one gather
            if self.dim:
                vectors.append(rows[:, :, :self.dim])
            linear.append(rows[:, :, self.dim])
            position = 1
        for i in range(self.n_multi):
            pooled = self.gather(f"multi_table_{i}", inputs[position + i]).sum(dim=1)
            if self.mean:
                pooled = pooled[:, :-1] / (pooled[:, -1:] + _EPS)
            if self.dim:
                vectors.append(pooled[:, :self.dim].unsqueeze(1))
            linear.append(pooled[:, self.dim:self.dim + 1])
        field_vectors = torch.cat(vectors, dim=1) if self.dim else None
        return field_vectors, torch.cat(linear, dim=1).sum(dim=1, keepdim=True)

    def gather(self, table: str, index: torch.Tensor) -> torch.Tensor:
        """The rows of table ``table`` (``single_table`` or ``multi_table_<i>``) at ``index``."""
        return F.embedding(index, getattr(self, table))


def _table_rows(name: str, vectors: nn.ModuleDict | None, linear: nn.ModuleDict) -> torch.Tensor:
    weight = linear[name].weight.detach()
    if vectors is not None:
        weight = torch.cat([vectors[name].weight.detach(), weight], dim=1)
    return weight.clone().float()


class MLP(nn.Module):
    """deepctr's DNN at inference: Linear + ReLU per layer (dropout is off, batch norm is not used)."""

    def __init__(self, dnn: nn.Module) -> None:
        super().__init__()
        if getattr(dnn, "use_bn", False):
            raise TrainError("lean export does not support dnn_use_bn")
        if not all(isinstance(a, nn.ReLU) for a in dnn.activation_layers):
            raise TrainError("lean export supports ReLU hidden layers only")
        self.layers = nn.ModuleList([_copy_linear(layer) for layer in dnn.linears])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def _copy_linear(layer: nn.Linear) -> nn.Linear:
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    out.load_state_dict(layer.state_dict())
    return out


class DeepFMHead(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.use_fm = model.use_fm
        self.use_dnn = model.use_dnn
        if self.use_dnn:
            self.dnn = MLP(model.dnn)
            self.dnn_linear = _copy_linear(model.dnn_linear)

    def forward(self, v: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
        if self.use_fm:
            square_of_sum = torch.pow(torch.sum(v, dim=1, keepdim=True), 2)
            sum_of_square = torch.sum(v * v, dim=1, keepdim=True)
            logit = logit + 0.5 * torch.sum(square_of_sum - sum_of_square, dim=2)
        if self.use_dnn:
            logit = logit + self.dnn_linear(self.dnn(v.flatten(1)))
        return logit


class AttentionLayer(nn.Module):
    """deepctr's InteractingLayer with heads split by reshape instead of split/stack/concat.

    A layer whose heads were pruned (``kept_heads`` set on it, the removed heads' value columns zero:
    ``train/compress/heads.py``) computes only its kept heads; a 0/1 ``placement`` matrix puts their outputs
    back into their columns of the layer's output, the removed heads' columns holding the residual only.
    """

    def __init__(self, layer: nn.Module, fields: int) -> None:
        super().__init__()
        self.fields = fields  # static sizes keep shape arithmetic out of the graph
        self.dim = layer.W_Query.shape[0]
        self.head_dim = self.dim // layer.head_num
        kept = getattr(layer, "kept_heads", None)
        self.heads = layer.head_num if kept is None else len(kept)
        columns = (torch.arange(self.dim) if kept is None else
                   torch.cat([torch.arange(h * self.head_dim, (h + 1) * self.head_dim) for h in kept]))
        self.scaling = layer.scaling
        self.use_res = layer.use_res
        self.w_query = nn.Parameter(layer.W_Query.detach()[:, columns].clone(), requires_grad=False)
        self.w_key = nn.Parameter(layer.W_key.detach()[:, columns].clone(), requires_grad=False)
        self.w_value = nn.Parameter(layer.W_Value.detach()[:, columns].clone(), requires_grad=False)
        if kept is not None:
            placement = torch.zeros(len(columns), self.dim)
            placement[torch.arange(len(columns)), columns] = 1.0
            self.register_buffer("placement", placement)
        else:
            self.placement = None
        if self.use_res:
            self.w_res = nn.Parameter(layer.W_Res.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fields, head_dim = self.fields, self.head_dim

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, F, D] -> [B, H, F, D/H]
            return torch.matmul(x, t).reshape(-1, fields, self.heads, head_dim).transpose(1, 2)

        q, k, v = heads(self.w_query), heads(self.w_key), heads(self.w_value)
        scores = torch.matmul(q, k.transpose(2, 3))
        if self.scaling:
            scores = scores / head_dim ** 0.5
        out = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(-1, fields, self.heads * head_dim)
        if self.placement is not None:
            out = torch.matmul(out, self.placement)
        if self.use_res:
            out = out + torch.matmul(x, self.w_res)
        return torch.relu(out)


class AutoIntHead(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        fields = len(model.embedding_dict)
        self.attention = nn.ModuleList([AttentionLayer(layer, fields) for layer in model.int_layers])
        self.use_dnn = len(model.dnn_hidden_units) > 0
        if self.use_dnn:
            self.dnn = MLP(model.dnn)
        self.dnn_linear = _copy_linear(model.dnn_linear)

    def forward(self, v: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
        att = v
        for layer in self.attention:
            att = layer(att)
        parts = []
        if len(self.attention):
            parts.append(att.flatten(1))
        if self.use_dnn:
            parts.append(self.dnn(v.flatten(1)))
        return logit + self.dnn_linear(torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0])


class CrossMixLayers(nn.Module):
    """deepctr's CrossNetMix with the experts batched: matmuls over stacked weights, no per-expert loop."""

    def __init__(self, cross: nn.Module) -> None:
        super().__init__()
        layers, experts, dim, rank = cross.U_list.shape
        self.layers, self.experts, self.dim, self.rank = layers, experts, dim, rank
        # v_x = V^T x for every expert at once: [D, K*r]
        self.register_buffer("v", cross.V_list.detach().permute(0, 2, 1, 3).reshape(layers, dim, experts * rank).clone())
        self.register_buffer("c_t", cross.C_list.detach().transpose(2, 3).clone())  # [L, K, r, r]
        self.register_buffer("u_t", cross.U_list.detach().transpose(2, 3).clone())  # [L, K, r, D]
        self.register_buffer("bias", cross.bias.detach().reshape(layers, 1, 1, dim).clone())
        self.register_buffer("gate", torch.cat([g.weight.detach() for g in cross.gating], 0).t().clone())  # [D, K]

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        x0_wide = x0.unsqueeze(1)  # [B, 1, D]
        for i in range(self.layers):
            low = torch.tanh(torch.matmul(x, self.v[i]).reshape(-1, self.experts, 1, self.rank))
            low = torch.tanh(torch.matmul(low, self.c_t[i]))
            up = torch.matmul(low, self.u_t[i]).reshape(-1, self.experts, self.dim)  # [B, K, D]
            experts = x0_wide * (up + self.bias[i].reshape(1, 1, self.dim))
            gate = torch.softmax(torch.matmul(x, self.gate), dim=1)  # [B, K]
            x = torch.matmul(gate.unsqueeze(1), experts).reshape(-1, self.dim) + x
        return x


class DCNMixHead(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.use_dnn = len(model.dnn_hidden_units) > 0
        self.use_cross = model.cross_num > 0
        if self.use_dnn:
            self.dnn = MLP(model.dnn)
        if self.use_cross:
            self.cross = CrossMixLayers(model.crossnet)
        self.dnn_linear = _copy_linear(model.dnn_linear)

    def forward(self, v: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
        x = v.flatten(1)
        parts = []
        if self.use_cross:
            parts.append(self.cross(x))
        if self.use_dnn:
            parts.append(self.dnn(x))
        return logit + self.dnn_linear(torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0])


class LinearHead(nn.Module):
    def forward(self, v: torch.Tensor | None, logit: torch.Tensor) -> torch.Tensor:
        return logit


class LeanModel(nn.Module):
    """int64 model inputs -> click probability ``[batch, 1]``.

    With a calibration (``train/calibrate.py``) the logit is mapped to ``scale * logit + shift`` before
    the sigmoid; its two constants are the graph's ``calibration_scale`` and ``calibration_shift``.
    """

    def __init__(self, embeddings: Embeddings, head: nn.Module, bias: torch.Tensor,
                 calibration: Calibration | None = None) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.head = head
        self.register_buffer("bias", bias.detach().clone().reshape(1, 1))
        self.calibrated = calibration is not None
        if calibration is not None:
            self.register_buffer(CALIBRATION_SCALE, torch.tensor([[calibration.scale]], dtype=torch.float32))
            self.register_buffer(CALIBRATION_SHIFT, torch.tensor([[calibration.shift]], dtype=torch.float32))

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        vectors, linear = self.embeddings(*inputs)
        logit = self.head(vectors, linear) + self.bias
        if self.calibrated:
            logit = logit * getattr(self, CALIBRATION_SCALE) + getattr(self, CALIBRATION_SHIFT)
        return torch.sigmoid(logit)


def _tabtransformer_head(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model.head).eval()  # the trained head is already a (vectors, logit) -> logit module


_HEADS = {"deepfm": DeepFMHead, "autoint": AutoIntHead, "dcnv2": DCNMixHead, "tabtransformer": _tabtransformer_head}


def lean_module(model: nn.Module, spec: FeatureSpec, architecture: str, combiner: str,
                calibration: Calibration | None = None) -> LeanModel:
    """The serving graph carrying ``model``'s trained weights (and the calibration, if any)."""
    if architecture == "logreg":
        embeddings, head = Embeddings(spec, model, with_vectors=False, combiner=combiner), LinearHead()
    elif architecture in _HEADS:
        embeddings, head = Embeddings(spec, model, with_vectors=True, combiner=combiner), _HEADS[architecture](model)
    else:
        raise TrainError(f"no lean export for model {architecture!r}")
    return LeanModel(embeddings, head, model.out.bias, calibration).eval()


# -- exporting --------------------------------------------------------------------------------------------------
def export_lean(model: nn.Module, spec: FeatureSpec, architecture: str, path: str | Path, *, combiner: str,
                opset: int = OPSET, calibration: Calibration | None = None) -> Path:
    """Write the lean graph: int64 inputs named by the spec, output ``ctr`` float32 ``[batch, 1]``."""
    return export_module(lean_module(model, spec, architecture, combiner, calibration), spec, path, opset=opset)


def export_module(lean: LeanModel, spec: FeatureSpec, path: str | Path, *, opset: int = OPSET) -> Path:
    """Write an already built (possibly altered: ``train/compress/``) lean module like ``export_lean``."""
    example = tuple(torch.zeros((2, spec.input_width(n)), dtype=torch.int64) for n in spec.input_names)
    return _export(lean.eval(), example, list(spec.input_names), Path(path), opset)


def export_stock(model: nn.Module, spec: FeatureSpec, path: str | Path, *, opset: int = OPSET) -> Path:
    """deepctr's own graph as exported by torch (one float32 input ``x``): the baseline the lean graph beats."""
    width = sum(spec.input_width(n) for n in spec.input_names)
    return _export(model.eval(), (torch.zeros((2, width), dtype=torch.float32),), [STOCK_INPUT], Path(path), opset)


def _export(module: nn.Module, example: tuple, input_names: list[str], path: Path, opset: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {name: {0: "batch"} for name in input_names + [OUTPUT]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; the parity check is the judge
        torch.onnx.export(module, example, str(path), input_names=input_names, output_names=[OUTPUT],
                          dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)
    onnx.checker.check_model(str(path))
    return path


@torch.no_grad()
def predict_calibrated(model: nn.Module, x: np.ndarray, calibration: Calibration) -> np.ndarray:
    """``sigmoid(scale * logit + shift)`` of a deepctr model in float32, as the calibrated graph computes it.

    The logit is taken at the model's output layer (its input plus the output bias), not recovered
    from the probability: inverting a float32 sigmoid loses the digits the parity check needs.
    """
    captured: list[torch.Tensor] = []
    hook = model.out.register_forward_pre_hook(lambda module, args: captured.append(args[0].clone()))
    try:
        predict(model, x)
    finally:
        hook.remove()
    logit = torch.cat(captured).reshape(-1) + model.out.bias.reshape(-1)
    scale = torch.tensor(calibration.scale, dtype=torch.float32)
    shift = torch.tensor(calibration.shift, dtype=torch.float32)
    return torch.sigmoid(logit * scale + shift).numpy()


# -- checking ---------------------------------------------------------------------------------------------------
def graph_calibration(init: dict[str, np.ndarray]) -> Calibration | None:
    """The calibration a lean graph's initializers (name -> array) carry, None when it has none."""
    if CALIBRATION_SCALE not in init and CALIBRATION_SHIFT not in init:
        return None
    if CALIBRATION_SCALE not in init or CALIBRATION_SHIFT not in init:
        raise TrainError(f"model.onnx has only one of {CALIBRATION_SCALE!r} and {CALIBRATION_SHIFT!r}")
    return Calibration(float(init[CALIBRATION_SCALE].reshape(-1)[0]), float(init[CALIBRATION_SHIFT].reshape(-1)[0]))


@torch.no_grad()
def torch_probabilities(model: nn.Module, inputs: dict[str, np.ndarray], spec: FeatureSpec) -> np.ndarray:
    """Click probabilities of a deepctr model (float input matrix) or a ``LeanModel`` (the int64 inputs)."""
    if isinstance(model, LeanModel):
        model.eval()
        tensors = [torch.from_numpy(np.ascontiguousarray(inputs[name])) for name in spec.input_names]
        return model(*tensors).reshape(-1).numpy()
    return predict(model, deepctr_input(inputs, spec))


def serving_session(path: str | Path) -> ort.InferenceSession:
    """An ONNX Runtime session configured exactly as the bidder serves (bidder.bundle.session_options)."""
    return ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])


def check_parity(model: nn.Module, path: str | Path, spec: FeatureSpec, held_out: Split, *,
                 rows: int = PARITY_ROWS, batch_sizes: tuple[int, ...] = (1, 64),
                 tolerance: float = PARITY_TOLERANCE, calibration: Calibration | None = None) -> dict[str, Any]:
    """Max |trained torch model - ONNX Runtime| over ``rows`` held-out rows at each batch size and all at once.

    With ``calibration`` the torch model's probabilities are calibrated (in float64) before comparing.
    Raises ``ParityError`` when the difference exceeds ``tolerance`` (or is not finite).
    """
    n = min(rows, len(held_out))
    if n == 0:
        raise ParityError("parity check needs held-out rows, got none")
    inputs = {name: np.ascontiguousarray(arr[:n]) for name, arr in held_out.inputs.items()}
    expected = (torch_probabilities(model, inputs, spec) if calibration is None
                else predict_calibrated(model, deepctr_input(inputs, spec), calibration))
    session = serving_session(path)
    sizes = [b for b in batch_sizes if b < n] + [n]
    worst = 0.0
    for size in sizes:
        got = np.concatenate([
            session.run([OUTPUT], {k: v[i:i + size] for k, v in inputs.items()})[0].reshape(-1)
            for i in range(0, n, size)])
        diff = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))
        if not np.isfinite(diff) or diff > tolerance:
            raise ParityError(f"{path}: ONNX Runtime differs from the trained model by {diff:.3g} at batch size "
                              f"{size} over {n} rows (tolerance {tolerance:g})")
        worst = max(worst, diff)
    return {"max_abs_diff": worst, "rows": n, "batch_sizes": sizes, "tolerance": tolerance}

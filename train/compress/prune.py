"""``prune``: structured pruning of the DNN: whole neurons, ranked by mean activation times the norm of their
outgoing weights on training rows, removed; then a short fine-tune."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from bidder.spec import FeatureSpec
from train.compress.common import trained_model, tuning_hp
from train.compress.heads import copy_kept_heads, head_masks
from train.data.dataset import Dataset
from train.errors import TrainError
from train.models import build_model, deepctr_input, parameter_count
from train.trainer import TrainedModel, fit_epochs

__all__ = ["prune_neurons"]


def _dnn_input_sample(model: nn.Module, dataset: Dataset, rows: int, seed: int) -> torch.Tensor:
    index = np.sort(np.random.default_rng(seed).permutation(len(dataset.train))[:rows])
    x = torch.from_numpy(deepctr_input({k: v[index] for k, v in dataset.train.inputs.items()}, dataset.spec))
    captured: list[torch.Tensor] = []
    hook = model.dnn.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        hook.remove()
    return captured[0]


def prune_neurons(teacher: nn.Module, hp: dict[str, Any], meta: dict[str, Any], spec: FeatureSpec, dataset: Dataset,
           settings: dict[str, Any], seed: int, progress: bool, src_model: Path) -> tuple[TrainedModel, dict]:
    """Remove the least important neurons of every DNN layer (keep a ``keep`` fraction), then fine-tune."""
    architecture = meta["architecture"]
    units = hp["dnn_hidden_units"]
    if not units:
        raise TrainError("prune: this bundle's model has no DNN layers")
    h = _dnn_input_sample(teacher, dataset, settings["importance_rows"], seed)
    linears = list(teacher.dnn.linears)
    out_w = teacher.dnn_linear.weight.detach()[0]  # the deep output is the last columns of dnn_linear's input
    deep_start = out_w.shape[0] - units[-1]
    kept: list[torch.Tensor] = []
    with torch.no_grad():
        for k, layer in enumerate(linears):
            h = torch.relu(layer(h))
            outgoing = (linears[k + 1].weight.norm(dim=0) if k + 1 < len(linears) else out_w[deep_start:].abs())
            importance = h.mean(dim=0) * outgoing
            n_keep = max(1, math.ceil(settings["keep"] * layer.out_features))
            kept.append(torch.sort(torch.argsort(importance, descending=True)[:n_keep]).values)
    pruned_hp = {**hp, "dnn_hidden_units": [len(k) for k in kept]}
    student = build_model(architecture, spec, pruned_hp, seed)
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    previous = torch.arange(linears[0].in_features)
    for k, rows in enumerate(kept):
        state[f"dnn.linears.{k}.weight"] = state[f"dnn.linears.{k}.weight"][rows][:, previous]
        state[f"dnn.linears.{k}.bias"] = state[f"dnn.linears.{k}.bias"][rows]
        previous = rows
    columns = torch.cat([torch.arange(deep_start), deep_start + kept[-1]])
    state["dnn_linear.weight"] = state["dnn_linear.weight"][:, columns]
    student.load_state_dict(state)
    copy_kept_heads(teacher, student)
    history, best = fit_epochs(student, dataset, tuning_hp(pruned_hp, settings), seed=seed, progress=progress,
                               desc="prune fine-tune", keep_start=True, grad_masks=head_masks(student))
    details = {"dnn_hidden_units": {"before": units, "after": pruned_hp["dnn_hidden_units"]},
               "parameters": {"before": parameter_count(teacher), "after": parameter_count(student)},
               "fine_tune": history}
    return trained_model(architecture, student, pruned_hp, dataset, history, best), details

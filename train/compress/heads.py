"""``heads``: AutoInt attention heads ranked by how much validation log loss rises when each alone is removed;
the least important removed (value projection zeroed and kept at zero while fine-tuning)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from bidder.spec import FeatureSpec
from train.compress.common import trained_model, tuning_hp
from train.data.dataset import Dataset
from train.errors import TrainError
from train.evaluate import binary_metrics
from train.models import deepctr_input
from train.trainer import TrainedModel, fit_epochs

__all__ = ["copy_kept_heads", "head_masks", "prune_heads"]


def head_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gradient masks that keep removed heads' value columns at zero while fine-tuning."""
    masks = {}
    for i, layer in enumerate(getattr(model, "int_layers", [])):
        kept = getattr(layer, "kept_heads", None)
        if kept is not None:
            masks[f"int_layers.{i}.W_Value"] = _value_mask(layer, kept)
    return masks


def _value_mask(layer: nn.Module, kept: list[int]) -> torch.Tensor:
    mask = torch.zeros_like(layer.W_Value)
    size = layer.att_embedding_size
    for h in kept:
        mask[:, h * size:(h + 1) * size] = 1.0
    return mask


def copy_kept_heads(teacher: nn.Module, student: nn.Module) -> None:
    for mine, theirs in zip(getattr(student, "int_layers", []), getattr(teacher, "int_layers", [])):
        if getattr(theirs, "kept_heads", None) is not None:
            mine.kept_heads = list(theirs.kept_heads)


def prune_heads(teacher: nn.Module, hp: dict[str, Any], meta: dict[str, Any], spec: FeatureSpec, dataset: Dataset,
                 settings: dict[str, Any], seed: int, progress: bool, src_model: Path) -> tuple[TrainedModel, dict]:
    """Remove the AutoInt heads whose removal alone raises validation log loss least, then fine-tune."""
    layers = list(teacher.int_layers)
    heads = [(i, h) for i, layer in enumerate(layers)
             for h in (getattr(layer, "kept_heads", None) or range(layer.head_num))]
    remove = settings["remove"]
    count = int(round(remove * len(heads))) if remove < 1 else int(remove)
    count = min(count, len(heads) - len(layers))  # every layer keeps one head
    if count < 1:
        raise TrainError(f"heads: --set remove={remove} removes no head of {len(heads)}")
    n = min(settings["importance_rows"], len(dataset.val))
    x_val = torch.from_numpy(deepctr_input({k: v[:n] for k, v in dataset.val.inputs.items()}, spec))
    y_val = dataset.val.labels[:n]

    def logloss() -> float:
        with torch.no_grad():
            return float(binary_metrics(y_val, teacher(x_val).reshape(-1).numpy())["logloss"])

    base = logloss()
    cost: dict[tuple[int, int], float] = {}
    for i, h in heads:
        value = layers[i].W_Value
        size = layers[i].att_embedding_size
        saved = value.detach()[:, h * size:(h + 1) * size].clone()
        with torch.no_grad():
            value[:, h * size:(h + 1) * size] = 0.0
        cost[(i, h)] = logloss() - base
        with torch.no_grad():
            value[:, h * size:(h + 1) * size] = saved
    removed: list[tuple[int, int]] = []
    remaining = {i: [h for j, h in heads if j == i] for i in range(len(layers))}
    for i, h in sorted(cost, key=cost.get):
        if len(removed) == count:
            break
        if len(remaining[i]) > 1:
            remaining[i].remove(h)
            removed.append((i, h))
    student = teacher
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.kept_heads = remaining[i]
            layer.W_Value.mul_(_value_mask(layer, remaining[i]))
    pruned_hp = {**hp, "att_kept_heads": [remaining[i] for i in range(len(layers))]}
    history, best = fit_epochs(student, dataset, tuning_hp(pruned_hp, settings), seed=seed, progress=progress,
                               desc="heads fine-tune", keep_start=True, grad_masks=head_masks(student))
    details = {"heads": {"before": len(heads), "after": len(heads) - len(removed)},
               "removed": [list(pair) for pair in removed],
               "val_logloss_increase_alone": {f"{i}.{h}": round(c, 6) for (i, h), c in sorted(cost.items())},
               "fine_tune": history}
    return trained_model("autoint", student, pruned_hp, dataset, history, best), details

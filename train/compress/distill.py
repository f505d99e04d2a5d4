"""``distill``: a smaller DeepFM student (a narrower DNN, or FM + linear) trained on the label mixed with the
teacher's probability."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from bidder.spec import FeatureSpec
from train.compress.common import onnx_probabilities, trained_model
from train.data.dataset import Dataset
from train.errors import TrainError
from train.models import build_model, parameter_count, resolve_hyperparameters
from train.trainer import TrainedModel, fit_epochs

__all__ = ["distill", "student_units"]


def student_units(text: str) -> list[int]:
    if text == "fm":
        return []
    try:
        units = [int(part) for part in text.split(",")]
    except ValueError:
        units = []
    if not units or any(u < 1 for u in units):
        raise TrainError(f"--set student={text}: expected 'fm' or hidden layer widths such as 64,32")
    return units


def distill(teacher: nn.Module, hp: dict[str, Any], meta: dict[str, Any], spec: FeatureSpec, dataset: Dataset,
             settings: dict[str, Any], seed: int, progress: bool, src_model: Path) -> tuple[TrainedModel, dict]:
    """A DeepFM student (narrow DNN, or FM + linear) on labels mixed with the teacher's probabilities."""
    units = student_units(settings["student"])
    student_hp = resolve_hyperparameters("deepfm", {"embedding_dim": settings["embedding_dim"],
                                                    "usertag_combiner": hp["usertag_combiner"]})
    student_hp["dnn_hidden_units"] = units
    student_hp["epochs"] = max(1, settings["epochs"])
    weight = settings["label_weight"]
    targets = dataset.train.labels.astype(np.float64)
    if weight < 1.0:
        teacher_p = onnx_probabilities(src_model, dataset.train.inputs).astype(np.float64)
        targets = weight * targets + (1.0 - weight) * teacher_p
    student = build_model("deepfm", spec, student_hp, seed)
    rate = float(np.clip(targets.mean(), 1e-6, 1 - 1e-6))
    with torch.no_grad():
        student.out.bias.fill_(math.log(rate / (1 - rate)))
    history, best = fit_epochs(student, dataset, student_hp, seed=seed, progress=progress, desc="student",
                               targets=targets.astype(np.float32))
    details = {"student": {"architecture": "deepfm", "dnn_hidden_units": units,
                           "embedding_dim": settings["embedding_dim"]},
               "label_weight": weight, "teacher_architecture": meta["architecture"],
               "parameters": {"teacher": parameter_count(teacher), "student": parameter_count(student)}}
    return trained_model("deepfm", student, student_hp, dataset, history, best), details

"""What the compression methods share: a bundle graph's probabilities and metrics, random valid rows when no
data was given, the fine-tuning settings and the trained result."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn

from bidder.factorized import random_inputs
from bidder.spec import FeatureSpec
from train.data.dataset import Dataset, Split
from train.evaluate import binary_metrics
from train.export import OUTPUT, serving_session
from train.trainer import TrainedModel, split_metrics

__all__ = ["onnx_metrics", "onnx_probabilities", "random_split", "trained_model", "tuning_hp"]


def onnx_probabilities(path: str | Path, inputs: dict[str, np.ndarray], batch: int = 8192) -> np.ndarray:
    """Click probabilities of a bundle graph for all rows of ``inputs``, via the serving session options."""
    session = serving_session(path)
    n = len(next(iter(inputs.values())))
    parts = [session.run([OUTPUT], {k: np.ascontiguousarray(v[i:i + batch]) for k, v in inputs.items()})[0].reshape(-1)
             for i in range(0, n, batch)]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def onnx_metrics(path: Path, dataset: Dataset | None) -> dict[str, Any]:
    if dataset is None:
        return {}
    return {name: binary_metrics(part.labels, onnx_probabilities(path, part.inputs))
            for name, part in (("val", dataset.val), ("test", dataset.test)) if len(part)}


def random_split(spec: FeatureSpec, seed: int, rows: int = 2048) -> Split:
    """Random valid rows, for a parity check when no data was given."""
    return Split(random_inputs(spec, rows, np.random.default_rng(seed)), np.zeros(rows, dtype=np.float32))


def tuning_hp(hp: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    tuned = dict(hp)
    tuned["epochs"] = max(1, settings["epochs"])
    if "lr" in settings:
        tuned["lr"] = settings["lr"]
    return tuned


def trained_model(architecture: str, model: nn.Module, hp: dict[str, Any], dataset: Dataset, history: list[dict],
             best_epoch: int) -> TrainedModel:
    return TrainedModel(architecture, model, hp, split_metrics(model, dataset), history, best_epoch)

"""The trainable models: deepctr-torch networks over the feature spec's columns, and their settings.

Feature columns are declared once, from the spec: one ``SparseFeat`` per single-valued field (its
vocabulary is the field's bucket count, index 0 = missing) and a ``VarLenSparseFeat`` per multi field
(index 0 = padding, masked by deepctr's pooling). deepctr models take one float matrix holding every
input side by side; ``deepctr_input`` builds it from the featurizer's int64 arrays.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from bidder.spec import FeatureSpec
from train._deepctr import AutoInt, BaseModel, DCNMix, DeepFM, SparseFeat, VarLenSparseFeat
from train.errors import TrainError

__all__ = ["ARCHITECTURES", "DEFAULT_HYPERPARAMETERS", "HashedLogisticRegression", "build_model",
           "deepctr_input", "feature_columns", "resolve_hyperparameters"]

ARCHITECTURES = ("deepfm", "autoint", "dcnv2", "tabtransformer", "logreg")

# Settings every architecture trains with. lr/batch/Adam follow the DeepFM proof of concept; ``epochs``
# is the ceiling, early stopping on validation AUC (``patience`` epochs without a gain) ends sooner.
# ``sparse_tables``: row-wise Adam on the embedding tables (train/optim.py); false is torch's dense Adam.
_TRAINING = {"lr": 5e-4, "lr_decay": 1.0, "adam_eps": 1e-8, "table_eps": 0.1, "batch_size": 512, "epochs": 4, "patience": 1, "usertag_combiner": "sum",
             "sparse_tables": True, "fused_forward": True}

# DeepFM trains with 4x the batch and 8x the learning rate: per sample nearly as fast as batch 4096 (the
# fused forward left little per-step overhead), and better after one epoch of 216k rows (test AUC 0.7657
# against 0.7581 at 4096 / 4e-3 and deepctr fit()'s 0.7610 at 512 / 5e-4). On the default bundle's 1M
# synthetic rows with early stopping 2048 and 4096 are within run-to-run noise (0.7186 and 0.7224 against
# 0.7215; dense tables at 512 / 5e-4, the older default: 0.7193); lr 8e-3 at 4096 overfit there (0.7117).
# AutoInt keeps batch 512: at 4096 / 4e-3 its 1M-row test AUC fell to 0.7157 from 0.7198. README
# "Training throughput".
_LARGE_BATCH = {"batch_size": 2048, "lr": 4e-3}

DEFAULT_HYPERPARAMETERS: dict[str, dict[str, Any]] = {
    "deepfm": {**_TRAINING, **_LARGE_BATCH, "dnn_init": "glorot", "vector_eps": 0.1, "init_std": 1e-4, "l2_reg_linear": 1e-5, "embedding_dim": 8, "dnn_hidden_units": [256, 128, 64], "l2_reg_embedding": 1e-5,
               "dnn_dropout": 0.0},
    "autoint": {**_TRAINING, "dnn_init": "glorot", "vector_eps": 0.1, "init_std": 1e-4, "embedding_dim": 16, "att_layer_num": 3, "att_head_num": 4, "att_res": True,
                "dnn_hidden_units": [256, 128], "l2_reg_embedding": 1e-5, "dnn_dropout": 0.0, "fused_attention": True},
    "dcnv2": {**_TRAINING, "dnn_init": "glorot", "vector_eps": 0.1, "init_std": 1e-4, "l2_reg_linear": 1e-5, "embedding_dim": 8, "cross_num": 2, "low_rank": 32, "num_experts": 4,
              "dnn_hidden_units": [256, 128, 64], "l2_reg_embedding": 1e-5, "l2_reg_cross": 1e-5,
              "dnn_dropout": 0.0},
    # TabTransformer (train/tabtransformer.py): settings not tuned here; batch 1024 and lr 1e-3 are the usual
    # transformer start, embeddings drawn at 1e-2 so the layer norms see more than the column embeddings
    "tabtransformer": {**_TRAINING, "batch_size": 1024, "lr": 1e-3, "vector_eps": 0.1, "init_std": 1e-2,
                       "embedding_dim": 16, "layers": 2, "heads": 4, "ff_mult": 2, "dnn_hidden_units": [128, 64],
                       "dropout": 0.0, "l2_reg_linear": 1e-5, "l2_reg_embedding": 1e-5},
    "logreg": {**_TRAINING, "lr": 2e-3, "l2_reg_linear": 1e-5},
}
_COMBINERS = ("sum", "mean")


def resolve_hyperparameters(architecture: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults for ``architecture`` with ``overrides`` applied; unknown names and wrong types are errors."""
    if architecture not in DEFAULT_HYPERPARAMETERS:
        raise TrainError(f"unknown model {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    hp = json.loads(json.dumps(DEFAULT_HYPERPARAMETERS[architecture]))  # a deep copy
    for name, value in (overrides or {}).items():
        if name not in hp:
            raise TrainError(f"hyper-parameter {name!r} is not used by {architecture} "
                             f"(known: {', '.join(sorted(hp))})")
        hp[name] = _coerce(name, value, hp[name])
    if hp["usertag_combiner"] not in _COMBINERS:
        raise TrainError(f"hyper-parameter 'usertag_combiner' must be one of {list(_COMBINERS)}, "
                         f"got {hp['usertag_combiner']!r}")
    for name in ("lr", "batch_size", "epochs", "patience", "embedding_dim", "layers", "heads", "ff_mult"):
        if name in hp and not hp[name] > 0:
            raise TrainError(f"hyper-parameter {name!r} must be positive, got {hp[name]!r}")
    if hp.get("dnn_init", "glorot") not in ("glorot", "deepctr"):
        raise TrainError(f"hyper-parameter 'dnn_init': expected 'glorot' or 'deepctr', got {hp['dnn_init']!r}")
    if architecture == "autoint" and hp["embedding_dim"] % hp["att_head_num"]:
        raise TrainError(f"hyper-parameter 'embedding_dim' ({hp['embedding_dim']}) must be a multiple of "
                         f"'att_head_num' ({hp['att_head_num']})")
    if architecture == "tabtransformer" and hp["embedding_dim"] % hp["heads"]:
        raise TrainError(f"hyper-parameter 'embedding_dim' ({hp['embedding_dim']}) must be a multiple of "
                         f"'heads' ({hp['heads']})")
    if "dropout" in hp and not 0 <= hp["dropout"] < 1:
        raise TrainError(f"hyper-parameter 'dropout' must be in [0, 1), got {hp['dropout']!r}")
    return hp


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Bring a value (possibly a command-line string) to the default's type, or fail naming it."""
    try:
        if isinstance(value, str) and isinstance(default, list):
            # "256,128,64" or "[256, 128, 64]" from the command line
            text = value.strip().strip("[]")
            value = [int(part) for part in text.split(",")] if text else []
        elif isinstance(value, str) and not isinstance(default, str):
            value = json.loads(value)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if isinstance(default, int):
            if isinstance(value, bool) or not float(value).is_integer():
                raise TypeError
            return int(value)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if isinstance(default, list):
            if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, int) and v > 0 for v in value):
                raise TypeError
            return [int(v) for v in value]
        if isinstance(default, str):
            if not isinstance(value, str):
                raise TypeError
            return value
    except (TypeError, ValueError):
        pass
    kind = "a list of positive integers" if isinstance(default, list) else type(default).__name__
    raise TrainError(f"hyper-parameter {name!r}: expected {kind}, got {value!r}")


def feature_columns(spec: FeatureSpec, embedding_dim: int, combiner: str) -> list:
    """deepctr columns in the order of ``spec.input_names`` (single fields, then each multi field)."""
    columns: list = [SparseFeat(f.name, vocabulary_size=f.buckets, embedding_dim=embedding_dim)
                     for f in spec.single_fields]
    columns += [VarLenSparseFeat(SparseFeat(f.name, vocabulary_size=f.buckets, embedding_dim=embedding_dim),
                                 maxlen=int(f.max_len), combiner=combiner)
                for f in spec.multi_fields]
    return columns


def deepctr_input(inputs: dict[str, np.ndarray], spec: FeatureSpec) -> np.ndarray:
    """The one float32 matrix deepctr models read: every model input side by side, in spec order.

    Indices stay exact as float32 because every bucket count is far below 2**24.
    """
    if any(f.buckets > 1 << 24 for f in spec.fields):
        raise TrainError("deepctr models read indices as float32; bucket counts above 2**24 would be rounded")
    return np.concatenate([inputs[name] for name in spec.input_names], axis=1).astype(np.float32)


class HashedLogisticRegression(BaseModel):
    """Logistic regression on hashed one-hot features: a weight per bucket plus a bias.

    It is deepctr's linear part on its own, so it trains, evaluates and exports like the deep models.
    """

    def __init__(self, columns: list, l2_reg_linear: float, seed: int) -> None:
        super().__init__(columns, [], l2_reg_linear=l2_reg_linear, l2_reg_embedding=0.0, seed=seed,
                         task="binary", device="cpu")

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.out(self.linear_model(X))


def build_model(architecture: str, spec: FeatureSpec, hp: dict[str, Any], seed: int) -> BaseModel:
    """A freshly initialised deepctr model (deterministic for a given seed)."""
    torch.manual_seed(seed)
    columns = feature_columns(spec, hp.get("embedding_dim", 1), hp["usertag_combiner"])
    if architecture == "logreg":
        return HashedLogisticRegression(columns, hp["l2_reg_linear"], seed)
    if architecture == "tabtransformer":
        from train.tabtransformer import TabTransformer

        return TabTransformer(columns, layers=hp["layers"], heads=hp["heads"], ff_mult=hp["ff_mult"],
                              dnn_hidden_units=hp["dnn_hidden_units"], dropout=hp["dropout"],
                              l2_reg_linear=hp["l2_reg_linear"], l2_reg_embedding=hp["l2_reg_embedding"],
                              init_std=hp["init_std"], seed=seed)
    common = dict(l2_reg_embedding=hp["l2_reg_embedding"], dnn_hidden_units=tuple(hp["dnn_hidden_units"]),
                  dnn_dropout=hp["dnn_dropout"], init_std=hp["init_std"], seed=seed, task="binary", device="cpu")
    if architecture == "deepfm":
        return _init_dnn(DeepFM(columns, columns, l2_reg_linear=hp["l2_reg_linear"], **common), hp["dnn_init"])
    if architecture == "autoint":
        # deepctr's AutoInt takes no l2_reg_linear: its linear part is unregularised
        return _init_dnn(AutoInt(columns, columns, att_layer_num=hp["att_layer_num"], att_head_num=hp["att_head_num"],
                       att_res=hp["att_res"], **common), hp["dnn_init"])
    if architecture == "dcnv2":
        return _init_dnn(DCNMix(columns, columns, cross_num=hp["cross_num"], low_rank=hp["low_rank"],
                      num_experts=hp["num_experts"], l2_reg_linear=hp["l2_reg_linear"],
                      l2_reg_cross=hp["l2_reg_cross"], **common), hp["dnn_init"])
    raise TrainError(f"unknown model {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")


def _init_dnn(model: BaseModel, how: str) -> BaseModel:
    """Initialise the DNN tower's weights.

    deepctr draws them from N(0, init_std) with the embeddings' init_std (1e-4): the output of a
    three-layer ReLU tower then starts near 1e-12 and its gradients vanish, so the tower stays dead
    (its output std was 9e-8 after two epochs on a million rows) and the model is linear + FM only.
    ``glorot`` (the default) draws Glorot-normal weights and zero biases; ``deepctr`` (checked by
    ``resolve_hyperparameters``) keeps deepctr's.
    """
    if how == "glorot" and hasattr(model, "dnn"):  # DeepFM without hidden layers (FM + linear) has no tower
        with torch.no_grad():
            for layer in model.dnn.linears:
                torch.nn.init.xavier_normal_(layer.weight)
                torch.nn.init.zeros_(layer.bias)
            torch.nn.init.xavier_normal_(model.dnn_linear.weight)
    return model


def parameter_count(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))

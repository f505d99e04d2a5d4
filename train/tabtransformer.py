"""TabTransformer (Huang et al., 2020): the fields' embeddings made contextual by transformer layers, then an MLP.

Written here in torch rather than taken from ``tab-transformer-pytorch``: that package embeds each categorical
column from one shared table with its own offsets and has no multi-valued field, while this model must read
the featurizer's hashed inputs as every other model does (deepctr's feature columns, ``usertag`` pooled into
one field vector), train through the same loop (row-wise Adam on its tables: it is a deepctr ``BaseModel``),
and export to the same lean graph (``train/export.py``: one gather per input group, then this head), where
parity with the trained model is checked to 1e-6. The package would add a dependency for about forty lines.

Layout per row: F field vectors (dim d) plus a learned per-field (column) embedding, ``layers`` pre-norm
transformer blocks (multi-head self-attention over the F fields, a GELU feed-forward of ``ff_mult`` × d),
a final layer norm, the F contextual vectors flattened into the MLP (``dnn_hidden_units``, ReLU), whose
output is added to deepctr's linear logit (a wide part, as in DeepFM) before the output bias and sigmoid.
The attention mixes imp and candidate fields in every layer, so unlike DeepFM nothing beyond the
embedding gather factorizes into an imp part and a candidate part: it is served by row scoring.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from train._deepctr import BaseModel

__all__ = ["Block", "TabTransformer", "TabTransformerHead"]


class Block(nn.Module):
    """Pre-norm transformer block over the field axis: ``x + attention(norm(x))``, then ``x + ff(norm(x))``."""

    def __init__(self, dim: int, heads: int, ff_mult: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.attention_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.project = nn.Linear(dim, dim)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff_in = nn.Linear(dim, ff_mult * dim)
        self.ff_out = nn.Linear(ff_mult * dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fields, dim = x.shape[1], x.shape[2]
        q, k, v = self.qkv(self.attention_norm(x)).reshape(-1, fields, 3, self.heads, self.head_dim).permute(
            2, 0, 3, 1, 4)  # each [B, H, F, D/H]
        scores = torch.matmul(q, k.transpose(2, 3)) / self.head_dim ** 0.5
        attended = torch.matmul(self.dropout(torch.softmax(scores, dim=-1)), v)
        x = x + self.dropout(self.project(attended.transpose(1, 2).reshape(-1, fields, dim)))
        return x + self.dropout(self.ff_out(F.gelu(self.ff_in(self.ff_norm(x)))))


class TabTransformerHead(nn.Module):
    """Field vectors ``[B, F, d]`` and the linear logit -> the logit before the output bias.

    The trained model's forward and the lean export's head in one: the export copies this module as it is.
    """

    def __init__(self, fields: int, dim: int, layers: int, heads: int, ff_mult: int, hidden: list[int],
                 dropout: float) -> None:
        super().__init__()
        self.column = nn.Parameter(torch.randn(1, fields, dim) * 0.02)
        self.blocks = nn.ModuleList([Block(dim, heads, ff_mult, dropout) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        widths = [fields * dim, *hidden]
        self.mlp = nn.ModuleList([nn.Linear(a, b) for a, b in zip(widths, widths[1:])])
        self.final = nn.Linear(widths[-1], 1, bias=False)  # the model's output layer holds the bias
        self.dropout = nn.Dropout(dropout)
        for layer in [*self.mlp, self.final]:
            nn.init.xavier_normal_(layer.weight)

    def forward(self, v: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
        x = v + self.column
        for block in self.blocks:
            x = block(x)
        x = self.norm(x).flatten(1)
        for layer in self.mlp:
            x = self.dropout(torch.relu(layer(x)))
        return logit + self.final(x)


class TabTransformer(BaseModel):
    """deepctr ``BaseModel`` (feature columns, tables, linear part, L2 terms, output layer) with the head above."""

    def __init__(self, columns: list, *, layers: int, heads: int, ff_mult: int, dnn_hidden_units: list[int],
                 dropout: float, l2_reg_linear: float, l2_reg_embedding: float, init_std: float, seed: int) -> None:
        super().__init__(columns, columns, l2_reg_linear=l2_reg_linear, l2_reg_embedding=l2_reg_embedding,
                         init_std=init_std, seed=seed, task="binary", device="cpu")
        dim = columns[0].embedding_dim
        self.head = TabTransformerHead(len(columns), dim, layers, heads, ff_mult, list(dnn_hidden_units), dropout)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        vectors, _ = self.input_from_feature_columns(X, self.dnn_feature_columns, self.embedding_dict)
        return self.out(self.head(torch.cat(vectors, dim=1), self.linear_model(X)))

"""``int8-embeddings``: the hashed tables as int8 with one scale per row, or as float16, in the lean module."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from train.export import Embeddings

__all__ = ["QuantizedEmbeddings"]


class QuantizedEmbeddings(Embeddings):
    """``Embeddings`` whose tables are int8 with one scale per row, or float16.

    A multi field's count column (1 per tag, 0 for padding) is not stored: only the mean combiner reads
    it, and then it is ``index != 0``.
    """

    def __init__(self, source: Embeddings, dtype: str, scale_dtype: str) -> None:
        nn.Module.__init__(self)
        self.names, self.has_single, self.n_multi = source.names, source.has_single, source.n_multi
        self.mean, self.dim, self.dtype = source.mean, source.dim, dtype
        self.scale_dtype = torch.float16 if scale_dtype == "fp16" else torch.float32
        tables = (["single_table"] if self.has_single else []) + [f"multi_table_{i}" for i in range(self.n_multi)]
        if self.has_single:
            self.register_buffer("single_offsets", source.single_offsets.clone())
        for name in tables:
            table = getattr(source, name)
            if name.startswith("multi"):
                table = table[:, :-1]
            if dtype == "fp16":
                self.register_buffer(f"{name}_fp16", table.half())
            else:
                scale = table.abs().amax(dim=1, keepdim=True) / 127.0
                scale = scale.to(self.scale_dtype)  # the stored scale is what quantizes, so rounding stays exact
                safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
                self.register_buffer(f"{name}_int8", torch.clamp(torch.round(table / safe), -127, 127).to(torch.int8))
                self.register_buffer(f"{name}_scale", scale)

    def gather(self, table: str, index: torch.Tensor) -> torch.Tensor:
        if self.dtype == "fp16":
            rows = F.embedding(index, getattr(self, f"{table}_fp16")).float()
        else:
            rows = F.embedding(index, getattr(self, f"{table}_int8")).float()
            rows = rows * F.embedding(index, getattr(self, f"{table}_scale")).float()
        if self.mean and table.startswith("multi"):
            rows = torch.cat([rows, (index != 0).unsqueeze(-1).float()], dim=-1)
        return rows

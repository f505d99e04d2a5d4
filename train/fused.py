"""DeepFM's and AutoInt's training forward with one gather per table group instead of one lookup per field.

deepctr's forward looks every field up in its own ``nn.Embedding`` (19 fields, twice: vectors and linear
weights), pools the multi-valued field with a mask built per call, concatenates the pieces, and with
``sparse=True`` hands back one sparse gradient per table, which row-wise Adam then concatenates, makes
unique and sums again. Here, while training with row-wise Adam (``train/optim.py``), a step:

- turns the batch's index columns into row numbers of each group's flat storage (the tables of a
  group already share one, ``RowwiseAdam``) and makes them unique once (``unique_rows``, one pass in C);
- gathers those rows into a small dense leaf tensor (rows read x width) and every (sample, column)
  from it; backward then sums each row's gradient into that leaf, which is exactly what row-wise Adam
  needs: the rows and the leaf are staged in the optimizer's group (``group["staged"]``, read by
  ``RowwiseAdam._touched``), no sparse tensors on the way;
- pools multi-valued fields as deepctr does (a weighted sum, the weights its mask of non-zero indices,
  over their count for ``mean``), and runs the model's own modules (``fm``, ``dnn``, ``dnn_linear``,
  ``int_layers``, ``out``) on the result.

AutoInt's attention layers (deepctr's ``InteractingLayer``) run, with ``fused_attention`` (default true),
as one matmul for the four projections (x @ [W_Query | W_key | W_Value | W_Res]) and a C kernel for the
rest (``train/_attention.h``: scores, softmax, the weighted values, residual and relu, and their
backward, 8 samples per vector, the batch laid out in blocks of 8 samples between the layers;
``tests/test_attention.py`` checks outputs and gradients against deepctr's module). In torch the per-head products are 19 x 4 by 4 x 19 per sample, too
small for any batched matmul (``bmm``, ``scaled_dot_product_attention``, a block-diagonal form,
``torch.compile``) to run near the machine's speed, and its softmax over rows of 19 is slow too: about
80 µs of CPU time a sample for the three layers, forward and backward, in every form. Without
``fused_attention`` the layers are deepctr's modules.

The parameters are the model's own (the per-field weights stay views of the flat storage), so export,
scoring and the ONNX parity contract see the same model; ``tests/test_fused.py`` checks that this
forward and its gradients equal deepctr's. Anything else (other models, masks on table gradients) keeps
deepctr's forward.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from train import _attention, _rows
from train._deepctr import AutoInt, DeepFM, SparseFeat, VarLenSparseFeat

__all__ = ["FusedForward", "from_blocks", "fused_forward", "interacting_layer", "interacting_layers",
           "native_attention", "to_blocks", "unique_rows"]


def unique_rows(index: torch.Tensor, rows: int, offsets: torch.Tensor | None = None,
                slot: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct rows ``index`` reads, in order of first appearance, and each entry's position among them.

    ``index`` is 1-D, or 2-D (samples, columns) with ``offsets`` added per column (where each column's table starts
    in its group's flat storage); every row must lie below ``rows``. One pass over the entries in C
    (``train/_rows.pyx``), with ``slot``, a table-sized int32 scratch of -1 the caller may keep between calls:
    ``torch.unique(return_inverse=True)`` sorts the entries, and a mark per table row, then ``nonzero``, scans the
    table (~10^5 rows) at every step. Returns (rows (k,), positions shaped like ``index``), both int64.
    """
    table = index.reshape(-1, 1) if index.dim() == 1 else index
    table = table.to(torch.long).contiguous()
    offsets = torch.zeros(table.shape[1], dtype=torch.long) if offsets is None else offsets.to(torch.long).contiguous()
    slot = torch.full((rows,), -1, dtype=torch.int32) if slot is None else slot
    distinct = torch.empty(min(table.numel(), rows), dtype=torch.long)
    position = torch.empty(table.shape, dtype=torch.long)
    count = _rows.unique_rows(table.numpy(), offsets.numpy(), slot.numpy(), distinct.numpy(), position.numpy())
    return distinct[:count], position.view(index.shape)


class _Group:
    """One table group of ``RowwiseAdam`` as the input columns see it: each column's offset in the flat storage."""

    def __init__(self, group: dict[str, Any], column_offsets: list[int]) -> None:
        self.group = group
        self.offsets = torch.tensor(column_offsets, dtype=torch.long)
        self.rows = group["flat"].shape[0]
        # groups laid out alike (the linear weights and the vectors of the same fields) share one unique_rows
        self.signature = (self.rows, tuple(column_offsets))

    def leaf(self, index: torch.Tensor, cache: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows the batch reads as a leaf tensor (staged for the optimizer) and each (sample, column)'s
        position in it, (batch, columns); ``cache`` holds ``unique_rows`` of ``index`` by layout (``signature``)."""
        rows, inverse = cache[self.signature]
        leaf = self.group["flat"].index_select(0, rows).requires_grad_(True)
        self.group["staged"] = (rows, leaf)
        return leaf, inverse


class _Fields:
    """Where each field's index columns sit in the input matrix, and how multi-valued ones are pooled."""

    def __init__(self, feature_index: dict[str, tuple[int, int]], columns: list) -> None:
        singles = [f for f in columns if isinstance(f, SparseFeat)]
        self.single = [feature_index[f.name][0] for f in singles]
        self.multi = [(*feature_index[f.name], f.combiner) for f in columns if isinstance(f, VarLenSparseFeat)]
        self.column_tables: dict[int, str] = {}
        for f in columns:
            start, stop = feature_index[f.name]
            for c in range(start, stop):
                self.column_tables[c] = f.embedding_name

    def vectors(self, leaf: torch.Tensor, position: torch.Tensor, weights: dict) -> torch.Tensor:
        """(batch, fields, width) in deepctr's order: single fields, then each multi-valued field pooled.

        Single fields and each multi-valued field are gathered apart (a slice of one gather would cost a
        zero-filled batch-sized gradient in backward); a multi-valued field is pooled as a weighted sum,
        the weights deepctr's mask (over the count of non-zero slots for ``mean``).
        """
        batch = len(position)
        parts = [leaf.index_select(0, position[:, self.single].reshape(-1)).view(batch, len(self.single), -1)]
        for start, stop, combiner in self.multi:
            slots = leaf.index_select(0, position[:, start:stop].reshape(-1)).view(batch, stop - start, -1)
            parts.append((slots * weights[(start, stop, combiner)].unsqueeze(-1)).sum(dim=1, keepdim=True))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def logit(self, leaf: torch.Tensor, position: torch.Tensor, weights: dict) -> torch.Tensor:
        """deepctr's linear logit (batch, 1) for width-1 tables: every field's weight (pooled ones pooled), summed."""
        slots = torch.ones(position.shape, dtype=leaf.dtype)
        for start, stop, combiner in self.multi:
            slots[:, start:stop] = weights[(start, stop, combiner)]
        gathered = leaf.index_select(0, position.reshape(-1)).view(position.shape)
        return (gathered * slots).sum(dim=1, keepdim=True)


class _Attention(torch.autograd.Function):
    """relu(multi-head self-attention (+ residual)) of ``qkvr`` = [W_Query | W_key | W_Value (| W_Res)]^T x.

    In blocks of 8 samples: qkvr is ((3 or 4) x embedding size, batch / 8, fields, 8), contiguous float32,
    the result (embedding size, batch / 8, fields, 8). The C kernel saves the attention weights for the
    backward, which returns qkvr's gradient.
    """

    @staticmethod
    def forward(ctx, qkvr: torch.Tensor, heads: int, res: bool, scale: float) -> torch.Tensor:
        width, blocks, fields, chunk = qkvr.shape
        out = torch.empty((width // (4 if res else 3), blocks, fields, chunk), dtype=qkvr.dtype)
        saved = torch.empty(_attention.saved_size(blocks * chunk, fields, heads), dtype=qkvr.dtype)
        _attention.forward(qkvr.detach().numpy(), heads, res, scale, out.numpy(), saved.numpy())
        ctx.save_for_backward(qkvr, out, saved)
        ctx.heads, ctx.res, ctx.scale = heads, res, scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        qkvr, out, saved = ctx.saved_tensors
        grad_qkvr = torch.empty_like(qkvr)
        _attention.backward(grad.contiguous().numpy(), out.numpy(), qkvr.detach().numpy(), saved.numpy(), ctx.heads,
                            ctx.res, ctx.scale, grad_qkvr.numpy())
        return grad_qkvr, None, None, None


def native_attention(layer: torch.nn.Module) -> bool:
    """Whether ``interacting_layer`` can run ``layer`` (float32 weights, heads no wider than the kernel's limit)."""
    return layer.W_Query.dtype == torch.float32 and layer.att_embedding_size <= _attention.MAX_D


def to_blocks(x: torch.Tensor) -> torch.Tensor:
    """(batch, fields, E) -> (E, batch / 8, fields, 8), the kernel's layout; the batch padded with zero samples
    to a multiple of 8 (their attention is computed and never read)."""
    batch, fields, width = x.shape
    chunk = _attention.CHUNK
    if batch % chunk:
        x = torch.cat([x, x.new_zeros((chunk - batch % chunk, fields, width))])
    return x.view(-1, chunk, fields, width).permute(3, 0, 2, 1).contiguous()


def from_blocks(x: torch.Tensor, batch: int) -> torch.Tensor:
    """``to_blocks`` undone: (E, blocks, fields, 8) -> (batch, fields, E), a view."""
    width, blocks, fields, chunk = x.shape
    return x.permute(1, 3, 2, 0).reshape(blocks * chunk, fields, width)[:batch]


def interacting_layer(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """deepctr's ``InteractingLayer`` forward ``layer(x)`` in the kernel's layout: ``x`` and the result are
    (embedding size, batch / 8, fields, 8) float32 (``to_blocks``). One matmul for the four projections of
    the whole batch, then the C kernel; the same function of the same parameters (``tests/test_attention.py``).
    Unlike deepctr's module it does not keep the attention weights in ``layer.normalized_att_scores``."""
    width, blocks, fields, chunk = x.shape
    weights = [layer.W_Query, layer.W_key, layer.W_Value] + ([layer.W_Res] if layer.use_res else [])
    qkvr = (torch.cat(weights, dim=1).t() @ x.reshape(width, -1)).view(-1, blocks, fields, chunk)
    scale = layer.att_embedding_size ** -0.5 if layer.scaling else 1.0
    return _Attention.apply(qkvr, layer.head_num, bool(layer.use_res), scale)


def interacting_layers(layers, emb: torch.Tensor, native: bool = True) -> torch.Tensor:
    """AutoInt's stack of interacting layers on (batch, fields, embedding size) ``emb``, flattened to
    (batch, fields x embedding size) as deepctr's AutoInt feeds it on. With ``native``, the layers that
    ``native_attention`` accepts run as ``interacting_layer``, in its layout (``to_blocks`` once in, once out)."""
    att, blocked = emb, False
    for layer in layers:
        if native and native_attention(layer):
            if not blocked:
                att, blocked = to_blocks(att), True
            att = interacting_layer(layer, att)
        else:
            if blocked:
                att, blocked = from_blocks(att, len(emb)), False
            att = layer(att)
    if blocked:
        att = from_blocks(att, len(emb))
    return att.reshape(len(emb), -1)


class FusedForward:
    """``model(x)`` for a DeepFM or AutoInt trained with row-wise Adam, as one gather per table group."""

    def __init__(self, model: torch.nn.Module, vectors: _Group, vector_fields: _Fields, linear: _Group,
                 linear_fields: _Fields, attention: bool = True) -> None:
        self.model = model
        self.attention = attention  # AutoInt: interacting layers as the C kernel (``interacting_layers``)
        self.vectors, self.vector_fields = vectors, vector_fields
        self.linear, self.linear_fields = linear, linear_fields
        self.multi = sorted(set(vector_fields.multi + linear_fields.multi))
        self._prepared: tuple | None = None  # (x, what ``_inputs(x)`` returned): ``prepare``

    def prepare(self, x: torch.Tensor) -> None:
        """Work out now what the forward of ``x`` needs from ``x`` alone (``_inputs``), so that ``self(x)``, the next
        call, starts from it. Under torchrun the trainer has this run for the next batch while a process waits for the
        others to send their gradients: a process that arrives early spends part of its wait on it."""
        self._prepared = (x, self._inputs(x))

    def _inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
        """The batch as indices, the pooling weights of the multi-valued fields, and the rows each group reads with
        each entry's position among them (``unique_rows``, once per layout)."""
        index = x.long()
        weights = {}
        for start, stop, combiner in self.multi:  # deepctr's SequencePoolingLayer: non-zero slots count
            mask = (index[:, start:stop] != 0).to(x.dtype)
            weights[(start, stop, combiner)] = (mask if combiner == "sum" else
                                                mask / (mask.sum(dim=-1, keepdim=True) + 1e-8))
        cache: dict = {}
        for group in (self.vectors, self.linear):
            if group.signature not in cache:
                cache[group.signature] = unique_rows(index, group.rows, group.offsets, group.group["slot"])
        return index, weights, cache

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        prepared, self._prepared = self._prepared, None
        index, weights, cache = prepared[1] if prepared is not None and prepared[0] is x else self._inputs(x)
        emb = self.vector_fields.vectors(*self.vectors.leaf(index, cache), weights)
        logit = self.linear_fields.logit(*self.linear.leaf(index, cache), weights)
        model = self.model
        if isinstance(model, DeepFM):
            if model.use_fm:
                logit = logit + model.fm(emb)
            if model.use_dnn:
                logit = logit + model.dnn_linear(model.dnn(emb.reshape(len(x), -1)))
            return model.out(logit)
        # AutoInt
        att = interacting_layers(model.int_layers, emb, self.attention)
        if len(model.dnn_hidden_units) > 0 and model.att_layer_num > 0:
            logit = logit + model.dnn_linear(torch.cat([att, model.dnn(emb.reshape(len(x), -1))], dim=-1))
        elif len(model.dnn_hidden_units) > 0:
            logit = logit + model.dnn_linear(model.dnn(emb.reshape(len(x), -1)))
        elif model.att_layer_num > 0:
            logit = logit + model.dnn_linear(att)
        return model.out(logit)


def fused_forward(model: torch.nn.Module, tables: Any | None, columns: int,
                  grad_masks: dict[str, torch.Tensor] | None = None,
                  attention: bool = True) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A ``FusedForward`` for ``model`` trained by ``tables`` (a ``RowwiseAdam``), or None where it does not apply.

    It applies to deepctr's DeepFM and AutoInt (exactly those classes) over sparse fields only, whose
    vectors sit in one group and linear weights in another, every input column read by both; not when
    ``grad_masks`` name a table (their hooks are on the per-field weights, which it does not read).
    ``attention``: AutoInt's interacting layers run as the C kernel (``interacting_layer``), not as
    deepctr's modules (masks on their weights still apply: the kernel reads the parameters themselves).
    """
    if tables is None or type(model) not in (DeepFM, AutoInt):
        return None
    if grad_masks and any("embedding_dict" in name for name in grad_masks):
        return None
    linear_model = model.linear_model
    if getattr(linear_model, "dense_feature_columns", []) or any(
            not isinstance(f, (SparseFeat, VarLenSparseFeat)) for f in model.dnn_feature_columns):
        return None
    place = {id(w): (group, offset) for group in tables.param_groups
             for w, offset in zip(group["params"], group["offsets"])}
    parts = []
    for fields_of, tables_of in ((model.dnn_feature_columns, model.embedding_dict),
                                 (linear_model.sparse_feature_columns + linear_model.varlen_sparse_feature_columns,
                                  linear_model.embedding_dict)):
        fields = _Fields(model.feature_index, list(fields_of))
        if sorted(fields.column_tables) != list(range(columns)):
            return None
        if any(combiner not in ("sum", "mean") for _, _, combiner in fields.multi):
            return None
        located = [place.get(id(tables_of[fields.column_tables[c]].weight)) for c in range(columns)]
        if any(p is None for p in located) or len({id(group) for group, _ in located}) != 1:
            return None
        parts.append((_Group(located[0][0], [offset for _, offset in located]), fields))
    (vectors, vector_fields), (linear, linear_fields) = parts
    return FusedForward(model, vectors, vector_fields, linear, linear_fields, attention)

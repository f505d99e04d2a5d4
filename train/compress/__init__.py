"""Compressing a bundle: INT8 quantization, DNN neuron pruning, distillation and attention-head pruning.

``python -m train compress --bundle SRC --method METHOD --out DST [--data DIR]`` writes a normal
bundle (``bidder serve`` loads it unchanged) whose ``meta.json`` gains ``compression``: the method,
its settings, the source's model id, the size ratio of the two ``model.onnx`` files and, when test
rows are at hand (``--data``), the paired test AUC delta against the source with a bootstrap 95 %
interval.

Methods:

- ``int8-dynamic``: ONNX Runtime's dynamic quantization (weights int8, activations quantized per
  call). ``ops=dnn`` quantizes the DNN's matrix products only, ``ops=tables`` the embedding tables'
  Gathers only (uint8 with one scale per table, one DequantizeLinear after each Gather), ``ops=all`` both.
- ``int8-static``: ONNX Runtime's static quantization, activation ranges calibrated on training rows;
  QDQ or QOperator format, per channel or per tensor.
- ``int8-embeddings``: the hashed tables (most of the bundle's bytes) as int8 with one scale per row
  (``Gather`` on the int8 table, ``Cast``, ``Mul`` by the row's gathered scale) or as float16
  (``Gather`` then ``Cast``); the rest of the graph stays float32. Built as a torch module and
  exported, so its ONNX is checked against that module like any lean export (<= 1e-6).
- ``prune``: structured pruning of the DNN: whole neurons, ranked by mean activation times the norm
  of their outgoing weights on training rows, are removed, then a short fine-tune.
- ``distill``: a smaller student (a narrower DeepFM, or FM + linear with ``student=fm``) trained on
  ``label_weight * label + (1 - label_weight) * teacher probability`` (binary cross-entropy against
  that soft target is the same mix of the two losses); ``label_weight=1`` is the label-only control.
- ``heads``: AutoInt attention heads, ranked by how much validation log loss rises when each alone
  is removed; the least important are removed (their value projection zeroed and kept at zero while
  fine-tuning), and the exported graph computes only the kept heads.

The trainable methods start from the bundle's own ``model.onnx``: its weights are loaded back into the
deepctr model they came from (``deepctr_from_bundle``), which is proven equal to the source graph
(<= 1e-6) before anything else happens.

One module per method: ``int8`` (``int8-dynamic``, ``int8-static``), ``embeddings`` (``int8-embeddings``),
``prune``, ``distill`` and ``heads``; ``readback`` reads a bundle back into its model, ``command`` runs a method
(or a chain) from bundle to bundle, ``common`` holds what they share.

Factorized graphs (``candidate.onnx`` / ``factorized.onnx``, DeepFM with a DNN only): a pruned or
distilled DeepFM student is a float32 DeepFM like any other, and bundles whose tables alone are
compressed (``int8-embeddings``, ``int8-dynamic`` with ``ops=tables``) keep them compressed in the
factorized graphs too (``train/factorize.py`` dequantizes after the Gather as model.onnx does), so each
gets its own graphs, checked against its own ``model.onnx`` at export and again at load. A bundle
whose DNN is quantized gets none: the factorized graphs split the first DNN layer by sides and sum the
halves, so a graph that quantizes that layer's whole input at once cannot be reproduced to the
bidder's 1e-6 load-time tolerance, and float32 factorized layers beside it would make the bidder serve
other weights than its model.onnx. Such a bundle is scored row by row through its model.onnx.
"""
from __future__ import annotations

from train.compress.command import (CARRIED_GRAPHS, DEFAULT_CHAIN, METHODS, carry_graphs, check_method, compress_bundle,
                                    compress_chain)
from train.compress.common import onnx_probabilities
from train.compress.embeddings import QuantizedEmbeddings
from train.compress.readback import deepctr_from_bundle

__all__ = ["CARRIED_GRAPHS", "DEFAULT_CHAIN", "METHODS", "QuantizedEmbeddings", "carry_graphs", "check_method",
           "compress_bundle", "compress_chain", "deepctr_from_bundle", "onnx_probabilities"]

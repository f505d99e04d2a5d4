"""Scoring: one single-thread ONNX Runtime session per worker, called through IO binding.

Input and output buffers are allocated once for the largest batch. For each batch size a binding
over views of those buffers is made the first time it is needed and reused forever after, so a
call allocates nothing: the featurizer writes indices straight into the bound input memory, ORT
writes probabilities straight into the bound output memory.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from bidder._features import Featurizer
from bidder.bundle import FACTORIZED_GRAPH, MODEL_FILE, Bundle, BundleError
from bidder.logs import event
from bidder.spec import FeatureSpec

# BundleError: bidder.bundle's, for callers
__all__ = ["BundleError", "Scorer", "bind_buffers", "pin_to_core", "run_binding"]

OUTPUT = "ctr"
log = logging.getLogger("bidder")
# Made once: called without run options, ONNX Runtime's binding builds default ones on every run (about 1 µs)
_RUN_OPTIONS = ort.RunOptions()


def bind_buffers(session: ort.InferenceSession, inputs: dict[str, np.ndarray | ort.OrtValue],
                 outputs: dict[str, np.ndarray]) -> tuple[ort.IOBinding, list[ort.OrtValue]]:
    """An IO binding of ``session`` over caller-owned memory, and the OrtValues it holds.

    ``ortvalue_from_numpy`` on a CPU array wraps its memory without copying: what the caller writes
    into an input buffer is what ORT reads, and ORT's output lands in the output buffer. The
    OrtValues hold the views; keep them as long as the binding.
    """
    binding = session.io_binding()
    values = []
    for name, buffer in inputs.items():
        value = buffer if isinstance(buffer, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(buffer)
        binding.bind_ortvalue_input(name, value)
        values.append(value)
    for name, buffer in outputs.items():
        value = ort.OrtValue.ortvalue_from_numpy(buffer)
        binding.bind_ortvalue_output(name, value)
        values.append(value)
    return binding, values


def run_binding(session: ort.InferenceSession, binding: ort.IOBinding) -> None:
    """``session.run_with_iobinding(binding)`` at about 1.3 µs less a run (a tenth of a one-request batch's run of
    the factorized graph): the compiled session is called directly with run options made once, skipping the Python
    wrapper's per-run check for WebGPU graph capture and the default run options built per call."""
    session._sess.run_with_iobinding(binding._iobinding, _RUN_OPTIONS)


def pin_to_core(core: int) -> int:
    """Pin this process to ``core`` mod the cores it may use; returns the core chosen."""
    allowed = sorted(os.sched_getaffinity(0))
    chosen = allowed[core % len(allowed)]
    os.sched_setaffinity(0, {chosen})
    return chosen


class Scorer:
    """Predicts click probabilities for raw records with the model of one bundle directory."""

    def __init__(self, bundle: str | os.PathLike, max_batch: int = 256):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.opened = Bundle.open(bundle)  # checked: format, spec, graphs, every file's digest
        for warning in self.opened.warnings:
            event(log, logging.WARNING, "bundle_warning", "%(warning)s", warning=str(warning),
                  bundle=str(self.opened.path))
        self.bundle = self.opened.path
        self.spec: FeatureSpec = self.opened.spec
        self.meta = self.opened.meta
        model = self.opened.file(MODEL_FILE)
        self.session = self.opened.session(MODEL_FILE)
        self._check_signature(model)
        self.model_id = str(self.meta.get("model_id") or f"{self.bundle.name}-{self.opened.digests[MODEL_FILE][:8]}")
        self.max_batch = max_batch
        self.featurizer = Featurizer(self.spec)
        self.inputs = self.spec.allocate(max_batch)
        self.output = np.zeros((max_batch, 1), dtype=np.float32)
        self._bindings: dict[int, tuple[ort.IOBinding, list[ort.OrtValue]]] = {}

    def _check_signature(self, model: Path) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        expected = set(self.spec.input_names)
        if set(inputs) != expected:
            raise BundleError(f"{model}: inputs {sorted(inputs)} do not match spec.json's {sorted(expected)}")
        for name, arg in inputs.items():
            width = self.spec.input_width(name)
            if arg.type != "tensor(int64)":
                raise BundleError(f"{model}: input {name!r} is {arg.type}, expected tensor(int64)")
            if len(arg.shape) != 2 or (isinstance(arg.shape[1], int) and arg.shape[1] != width):
                raise BundleError(f"{model}: input {name!r} has shape {arg.shape}, spec.json needs [batch, {width}]")
            if isinstance(arg.shape[0], int):  # a fixed batch size would refuse every other batch at run time
                raise BundleError(f"{model}: input {name!r} has a fixed batch dimension {arg.shape[0]}, "
                                  "expected a symbolic one")
        outputs = {o.name: o for o in self.session.get_outputs()}
        out = outputs.get(OUTPUT)
        if out is None or out.type != "tensor(float)":
            raise BundleError(f"{model}: needs a float32 output named {OUTPUT!r}, has "
                              f"{ {name: o.type for name, o in outputs.items()} }")
        if len(out.shape) != 2 or (isinstance(out.shape[1], int) and out.shape[1] != 1):
            raise BundleError(f"{model}: output {OUTPUT!r} has shape {out.shape}, expected [batch, 1]")

    def factorized_files(self) -> tuple[Path, ...]:
        """The bundle's factorized graphs as meta.json lists them (``bidder.factorized``), () if it has none.

        Only DeepFM bundles have them; ``FactorizedScorer.for_scorer(self)`` loads and checks them.
        """
        entry = self.opened.graph(FACTORIZED_GRAPH)
        return tuple(self.bundle / name for name in entry["files"]) if entry is not None else ()

    def _binding(self, rows: int) -> ort.IOBinding:
        """The binding for a batch of ``rows``: OrtValues over views of the shared buffers, made once.

        ``ortvalue_from_numpy`` on a CPU array wraps its memory without copying, so the featurizer's
        writes into ``self.inputs`` are what ORT reads and ORT's output lands in ``self.output``.
        """
        bound = self._bindings.get(rows)
        if bound is None:
            bound = self._bindings[rows] = bind_buffers(
                self.session, {name: buffer[:rows] for name, buffer in self.inputs.items()},
                {OUTPUT: self.output[:rows]})
        return bound[0]

    def score(self, records: Sequence[Any]) -> np.ndarray:
        """Probabilities for at most ``max_batch`` records, as a view of the output buffer.

        The view is overwritten by the next call: the hot path reads it at once instead of copying.
        """
        rows = self.featurizer.transform_into(self.inputs, records)
        if rows == 0:
            return self.output[:0, 0]
        run_binding(self.session, self._binding(rows))
        return self.output[:rows, 0]

    def score_rows(self, batch: Any, start: int, stop: int) -> np.ndarray:
        """Probabilities of rows ``[start, stop)`` of ``batch`` (a ``bidder.batch.Batch``): each row's candidate
        layer over its imp's record, featurized and scored row by row (``score``, or ``predict`` past
        ``max_batch`` rows)."""
        rows = batch.pair_rows(start, stop)
        return self.score(rows) if len(rows) <= self.max_batch else self.predict(rows)

    def predict(self, records: Sequence[Any]) -> np.ndarray:
        """Probabilities for any number of records (scored in chunks of ``max_batch``), a new array."""
        if not isinstance(records, (list, tuple)):
            records = list(records)
        out = np.empty(len(records), dtype=np.float32)
        for start in range(0, len(records), self.max_batch):
            chunk = records[start:start + self.max_batch]
            try:
                out[start:start + len(chunk)] = self.score(chunk)
            except ValueError as exc:
                if start:  # featurizer errors count rows from the chunk start: make them absolute
                    raise ValueError(_shift_record_number(str(exc), start)) from None
                raise
        return out


#: records per featurizer call when a whole catalog is featurized (``featurize_many``)
FEATURIZE_CHUNK = 4096


def featurize_many(featurizer: Any, spec: Any, records: Sequence[Any]) -> dict[str, np.ndarray]:
    """The spec's inputs for any number of records (a whole catalog's candidate layers), new arrays.

    Featurized ``FEATURIZE_CHUNK`` records per call: each call holds the GIL, and a reload builds its catalog
    in a thread while the event loop serves, which then gets the GIL between two calls instead of after
    the whole catalog. A bad record's number counts from the first record, as in ``Scorer.predict``.
    """
    if not isinstance(records, (list, tuple)):
        records = list(records)
    inputs = spec.allocate(len(records))
    for start in range(0, len(records), FEATURIZE_CHUNK):
        chunk = records[start:start + FEATURIZE_CHUNK]
        try:
            featurizer.transform_into({name: buffer[start:start + len(chunk)] for name, buffer in inputs.items()},
                                      chunk)
        except ValueError as exc:
            raise ValueError(_shift_record_number(str(exc), start)) from None
    return inputs


def _shift_record_number(message: str, offset: int) -> str:
    head, sep, rest = message.partition(": ")
    if head.startswith("record ") and head[7:].isdigit():
        return f"record {int(head[7:]) + offset}{sep}{rest}"
    return message

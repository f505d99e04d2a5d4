"""``int8-dynamic`` and ``int8-static``: ONNX Runtime's quantizers on the matrix products (``ops=dnn``), the
table Gathers (``ops=tables``) or both; static quantization calibrates activation ranges on training rows."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

from bidder.spec import FeatureSpec
from train.compress.common import onnx_probabilities, random_split
from train.data.dataset import Dataset

__all__ = ["quantize", "quantized_parity"]


class _Calibration(CalibrationDataReader):
    """Training rows for static quantization's range calibration, in batches of 64."""

    def __init__(self, inputs: dict[str, np.ndarray], rows: int, batch: int = 64) -> None:
        n = min(rows, len(next(iter(inputs.values()))))
        self.batches = iter([{k: np.ascontiguousarray(v[i:min(i + batch, n)]) for k, v in inputs.items()}
                             for i in range(0, n, batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)

    def rewind(self) -> None:  # not needed: one calibration pass
        pass


def quantize(src: Path, out: Path, method: str, settings: dict[str, Any], spec: FeatureSpec,
              dataset: Dataset | None, seed: int) -> None:
    """ONNX Runtime's quantizer on ``src``'s matrix products (``ops=dnn``), table Gathers (``ops=tables``) or both."""
    ops = {"dnn": ["MatMul", "Gemm"], "tables": ["Gather"], "all": ["MatMul", "Gemm", "Gather"]}[settings["ops"]]
    # the quantizer logs a line per tensor on the root logger, and a warning advising its shape-inference
    # pre-processing (for models with dynamic shapes in convolutions; it changes nothing here)
    logging.disable(logging.WARNING)
    try:
        _run_quantizer(src, out, method, settings, dataset, seed, ops)
    finally:
        logging.disable(logging.NOTSET)
    onnx.checker.check_model(str(out))


def _run_quantizer(src: Path, out: Path, method: str, settings: dict[str, Any], dataset: Dataset | None, seed: int,
                   ops: list[str]) -> None:
    if method == "int8-dynamic":
        quantize_dynamic(str(src), str(out), per_channel=settings["per_channel"], weight_type=QuantType.QInt8,
                         op_types_to_quantize=ops)
    else:
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(dataset.train))[:settings["calibration_rows"]]
        reader = _Calibration({k: v[np.sort(order)] for k, v in dataset.train.inputs.items()},
                              settings["calibration_rows"])
        quantize_static(str(src), str(out), reader,
                        quant_format=QuantFormat.QDQ if settings["format"] == "qdq" else QuantFormat.QOperator,
                        per_channel=settings["per_channel"], weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8, op_types_to_quantize=ops)


def quantized_parity(src: Path, out: Path, spec: FeatureSpec, dataset: Dataset | None) -> dict[str, Any]:
    """What a quantized graph can be checked against: how far it moves from the float32 source."""
    rows = dataset.test if dataset is not None else random_split(spec, 0)
    n = min(2048, len(rows))
    inputs = {k: v[:n] for k, v in rows.inputs.items()}
    diff = np.abs(onnx_probabilities(out, inputs).astype(np.float64) - onnx_probabilities(src, inputs))
    return {"reference": "float32 source model.onnx (quantization has no exact reference)",
            "max_abs_diff_from_source": float(diff.max()), "mean_abs_diff_from_source": float(diff.mean()),
            "rows": n}

"""A log folder turned into model inputs: featurized with the bidder's own featurizer, then split.

Training goes through ``bidder.Featurizer`` so a model sees exactly the indices the server will compute
for the same impression. The split is by time when every line has a timestamp (the model is judged on
traffic later than anything it trained on, as in production), otherwise seeded and random.
``test.log.txt``, when present, is the test set as make-ipinyou-data defines it.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bidder import Featurizer
from bidder.spec import FeatureSpec
from train.data.ipinyou import BadLines, LogChunk, LogReader
from train.errors import DataError

__all__ = ["TRAIN_LOG", "TEST_LOG", "Split", "Dataset", "load_dataset", "featurize_log"]

TRAIN_LOG, TEST_LOG = "train.log.txt", "test.log.txt"
VAL_FRACTION = 0.1
TEST_FRACTION = 0.1  # used only when the folder has no test.log.txt
_RECORD_ERROR = re.compile(r"^record (\d+): (.*)$", re.S)


@dataclass
class Split:
    """Model inputs (int64, keyed by the spec's input names), labels and, on synthetic data, the truth; ``weights``
    (each row's weight in the training loss) when the log has a weight column."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray
    pctr_true: np.ndarray | None = None
    weights: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> "Split":
        return Split({k: v[index] for k, v in self.inputs.items()}, self.labels[index],
                     None if self.pctr_true is None else self.pctr_true[index],
                     None if self.weights is None else self.weights[index])


@dataclass
class Dataset:
    spec: FeatureSpec
    train: Split
    val: Split
    test: Split
    source: str          # "synthetic" (the logs carry pctr_true) or "ipinyou"
    path: str
    digest: str          # sha256 over the log files read
    split: str           # "time" or "random"
    bad_lines: BadLines = field(default_factory=BadLines)

    def rows(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def load_dataset(data_dir: str | Path, spec: FeatureSpec, *, seed: int = 0, skip_bad_lines: bool = False,
                 progress: bool = True) -> Dataset:
    """Read ``train.log.txt`` (and ``test.log.txt`` if present) from a campaign folder."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a directory (expected a folder with {TRAIN_LOG})")
    if not (folder / TRAIN_LOG).is_file():
        raise DataError(f"{folder}: no {TRAIN_LOG} in this folder")
    bad = BadLines()
    digest = hashlib.sha256()
    train_all, train_time, train_synthetic = featurize_log(folder / TRAIN_LOG, spec, skip_bad_lines=skip_bad_lines,
                                                           bad_lines=bad, progress=progress, digest=digest)
    has_test = (folder / TEST_LOG).is_file()
    if has_test:
        test, _, test_synthetic = featurize_log(folder / TEST_LOG, spec, skip_bad_lines=skip_bad_lines,
                                                bad_lines=bad, progress=progress, digest=digest)
        if len(test) == 0:
            raise DataError(f"{folder / TEST_LOG}: no usable lines")
    needed = 2 if has_test else 3
    if len(train_all) < needed:
        raise DataError(f"{folder / TRAIN_LOG}: {len(train_all)} usable line(s), need at least {needed} to split")

    by_time = train_time is not None and bool((train_time >= 0).all())
    order = (np.argsort(train_time, kind="stable") if by_time
             else np.random.default_rng(seed).permutation(len(train_all)))
    n = len(train_all)
    if has_test:
        n_val = max(1, int(round(n * VAL_FRACTION)))
        train, val = train_all.take(order[:n - n_val]), train_all.take(order[n - n_val:])
    else:
        n_test = max(1, int(round(n * TEST_FRACTION)))
        n_val = max(1, int(round(n * VAL_FRACTION)))
        train = train_all.take(order[:n - n_val - n_test])
        val = train_all.take(order[n - n_val - n_test:n - n_test])
        test = train_all.take(order[n - n_test:])
    synthetic = train_synthetic and (test_synthetic if has_test else True)
    if not synthetic:  # the oracle exists only when every file carries the truth
        for part in (train, val, test):
            part.pctr_true = None
    return Dataset(spec=spec, train=train, val=val, test=test, source="synthetic" if synthetic else "ipinyou",
                   path=str(folder), digest=digest.hexdigest(), split="time" if by_time else "random",
                   bad_lines=bad)


def featurize_log(path: Path, spec: FeatureSpec, *, skip_bad_lines: bool = False, bad_lines: BadLines | None = None,
                  progress: bool = True, digest=None) -> tuple[Split, np.ndarray | None, bool]:
    """One log file as a ``Split``, the lines' sortable timestamps (or None) and whether it has pctr_true.

    ``digest`` (a hashlib object), when given, is updated with the file name and content hash.
    """
    reader = LogReader(path, skip_bad_lines=skip_bad_lines, bad_lines=bad_lines)
    featurizer = Featurizer(spec)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in spec.input_names}
    labels, stamps, pctrs, weights = [], [], [], []
    with tqdm(total=reader.size, unit="B", unit_scale=True, desc=f"featurize {path.name}",
              disable=not progress, leave=False) as bar:
        for chunk in reader:
            features = _featurize_chunk(featurizer, chunk, reader)
            for name, arr in features.items():
                parts[name].append(arr)
            labels.append(chunk.labels)
            stamps.append(chunk.timestamps)
            pctrs.append(chunk.pctr_true)
            weights.append(chunk.weights)
            bar.update(reader.bytes_read - bar.n)
    if digest is not None:
        digest.update(path.name.encode() + b"\0" + reader.sha256.digest())
    if not labels:
        empty = spec.allocate(0)
        return Split(empty, np.zeros(0, np.float32), np.zeros(0) if reader.has_pctr_true else None,
                     np.zeros(0, np.float32) if reader.has_weight else None), \
            (np.zeros(0, np.int64) if reader.has_timestamp else None), reader.has_pctr_true
    inputs = {name: np.concatenate(arrs) for name, arrs in parts.items()}
    split = Split(inputs, np.concatenate(labels), np.concatenate(pctrs) if reader.has_pctr_true else None,
                  np.concatenate(weights) if reader.has_weight else None)
    return split, (np.concatenate(stamps) if reader.has_timestamp else None), reader.has_pctr_true


def _featurize_chunk(featurizer: Featurizer, chunk: LogChunk, reader: LogReader) -> dict[str, np.ndarray]:
    """Featurize a chunk; a record the featurizer rejects is reported as its file:line (or dropped)."""
    while True:
        try:
            return featurizer.transform(chunk.records)
        except ValueError as exc:
            match = _RECORD_ERROR.match(str(exc))
            if match is None or int(match.group(1)) >= len(chunk.records):
                raise DataError(f"{reader.path}: lines {chunk.line_numbers[0]}-{chunk.line_numbers[-1]}: {exc}") from None
            row = int(match.group(1))
            reader.reject(chunk.line_numbers[row], match.group(2))
            chunk.drop(row)

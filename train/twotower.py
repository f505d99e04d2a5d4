"""Two-tower retrieval model, distilled from a bundle's ranker, exported into that bundle.

``python -m train twotower --data DIR --bundle BUNDLE`` trains an imp tower and an ad tower over the
spec's hashed fields (the ad tower reads the candidate fields, creative, advertiser and size; the imp
tower everything else) so that ``imp_vec · ad_vec`` ranks a catalog's creatives for an imp the way the
ranker does by expected value, log(pCTR × value per click); ``bidder/retrieval/`` serves them.

Objective: a sampled softmax over each batch's candidates, with the ranker as teacher.
    * candidates: the creatives the batch's log rows showed (*in-batch negatives*: popular creatives are
      drawn often) plus ``uniform`` creatives drawn uniformly from the catalog (the tail, which the logs
      rarely or never show, would otherwise never be a negative: mixed negative sampling);
    * logQ correction: both teacher and student logits of candidate j get ``- log q_j``, q the mixture the
      candidates were drawn from (``(B·p_log(j) + U/N) / (B + U)``), which makes the sampled softmax an
      estimate of the softmax over the whole catalog instead of one biased towards popular creatives;
    * targets: the ranker's softmax over the same candidates (``log pCTR + log value``, from the
      bundle's factorized graphs, or ``model.onnx`` row by row), not the clicks: with ~1 % CTR and
      100,000 creatives the logs hold a handful of clicks per creative at best, while the ranker scores
      any pair; and retrieval is judged by agreement with the ranker;
    * an imp competes only with creatives of its slot's size (the others are masked), as at serving,
      where the size filter comes first.

Plain torch, not TorchRec: the towers' tables are the spec's hashed fields (a few MB), so TorchRec's
sharded tables and fused sparse optimizers have nothing to shard, and a step's time goes to the
teacher's scoring, not to the tables (``training.seconds_teacher`` in ``meta.json``); TorchRec would add
fbgemm-gpu, whose compiled operators are built for one torch release, next to the pinned torch==2.13.0.

Export: both towers as ONNX graphs taking the model's inputs (each reads only its side's columns),
checked against the trained towers (``max |Δ| <= 1e-6``) on held-out imps and on the catalog's creatives,
and listed in ``meta.json``'s ``graphs.twotower``.
"""
from __future__ import annotations

import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from bidder._features import Featurizer
from bidder.bundle import CAMPAIGNS_FILE, add_graph, session_options
from bidder.campaigns import CatalogError, load_catalog
from bidder.factorized import CAND_PART, CANDIDATE_FILE, FACTORIZED_FILE, GRAPH as FACTORIZED, ROW_CAND, ROW_IMP, \
    candidate_fields
from bidder.retrieval import AD_OUTPUT, AD_TOWER_FILE, GRAPH, IMP_OUTPUT, IMP_TOWER_FILE, PARITY_TOLERANCE
from bidder.scorer import OUTPUT
from bidder.spec import SPARSE_INPUT, FeatureSpec
from train.bundle import MODEL_FILE, open_bundle
from train.data.ipinyou import LogReader
from train.data.synthetic import TEST_FILE, TRAIN_FILE
from train.errors import ParityError, TrainError
from train.export import OPSET

__all__ = ["DEFAULTS", "TowerModel", "train_twotower"]

DEFAULTS = {"dim": 32, "embedding_dim": 16, "hidden": 128, "batch": 256, "uniform": 1024, "steps": 1500,
            "lr": 0.003}
PARITY_ROWS = 2048
_MIN_PCTR = 1e-7


# -- the towers ---------------------------------------------------------------------------------------------
class Tower(nn.Module):
    """The model's int64 inputs -> ``[n, out]``: the chosen fields' embeddings, concatenated, through an MLP.

    Single-valued fields share one table (a constant offset per column), gathered at once; multi fields
    are summed over their tags (row 0, padding, stays zero). With ``append_one`` a constant 1 is appended,
    and with ``unit`` (set for export) the vector is scaled to unit length.
    """

    def __init__(self, spec: FeatureSpec, fields: set[str], embedding_dim: int, hidden: int, out: int,
                 append_one: bool, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        singles = [j for j, f in enumerate(spec.single_fields) if f.name in fields]
        buckets = [spec.single_fields[j].buckets for j in singles]
        self.register_buffer("columns", torch.tensor(singles, dtype=torch.int64))
        self.register_buffer("offsets", torch.tensor(np.concatenate([[0], np.cumsum(buckets)[:-1]]) if singles else [],
                                                     dtype=torch.int64).reshape(1, -1))
        self.table = nn.Embedding(int(sum(buckets)) or 1, embedding_dim)
        nn.init.normal_(self.table.weight, std=0.05)
        self.has_single = bool(singles)
        names = list(spec.input_names)
        multi = [f for f in spec.multi_fields if f.name in fields]
        self.multi_positions = [names.index(f.name) for f in multi]
        self.multi = nn.ModuleList([nn.Embedding(f.buckets, embedding_dim, padding_idx=0) for f in multi])
        for table in self.multi:
            nn.init.normal_(table.weight, std=0.05)
            with torch.no_grad():
                table.weight[0] = 0.0
        width = (len(singles) + len(multi)) * embedding_dim
        if width == 0:
            raise TrainError(f"no fields for a tower among {sorted(fields)}")
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, out))
        self.append_one = append_one
        # served imp vectors have unit length: a positive scale per imp changes none of its rankings, and
        # entries at most 1 keep float32 rounding (torch vs ONNX Runtime) well inside the 1e-6 parity bound
        self.unit = False

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.has_single:
            parts.append(self.table(inputs[0].index_select(1, self.columns) + self.offsets).flatten(1))
        for position, table in zip(self.multi_positions, self.multi):
            parts.append(table(inputs[position]).sum(dim=1))
        out = self.mlp(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
        if self.append_one:
            out = torch.cat([out, out[:, :1] * 0.0 + 1.0], dim=1)
            if self.unit:
                out = out / torch.linalg.vector_norm(out, dim=1, keepdim=True)
        return out


class TowerModel(nn.Module):
    """Imp tower ``[n, dim + 1]`` (``[u, 1]``, unit length once exported) and ad tower ``[n, dim + 1]`` (last entry
    the ad's bias)."""

    def __init__(self, spec: FeatureSpec, hp: Mapping[str, Any], seed: int):
        super().__init__()
        ad_fields = set(candidate_fields(spec))
        imp_fields = {f.name for f in spec.fields} - ad_fields
        self.imp = Tower(spec, imp_fields, hp["embedding_dim"], hp["hidden"], hp["dim"], True, seed)
        self.ad = Tower(spec, ad_fields, hp["embedding_dim"], hp["hidden"], hp["dim"] + 1, False, seed + 1)


def _tensors(spec: FeatureSpec, inputs: Mapping[str, np.ndarray], rows: np.ndarray | None = None) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(inputs[n] if rows is None else inputs[n][rows]))
            for n in spec.input_names]


# -- the teacher ----------------------------------------------------------------------------------------------
class Teacher:
    """The bundle's ranker: log pCTR of (imp, catalog creative) pairs, via its factorized graphs when it has them."""

    def __init__(self, bundle: Path, spec: FeatureSpec, meta: Mapping[str, Any], cand_inputs: Mapping[str, np.ndarray],
                 threads: int):
        options = session_options()
        options.intra_op_num_threads = max(1, threads)
        self.spec = spec
        self.cand_inputs = cand_inputs
        self.factorized = FACTORIZED in (meta.get("graphs") or {})
        if self.factorized:
            candidate = ort.InferenceSession(str(bundle / CANDIDATE_FILE), options, providers=["CPUExecutionProvider"])
            self.cand_part = candidate.run([CAND_PART], dict(cand_inputs))[0]
            self.session = ort.InferenceSession(str(bundle / FACTORIZED_FILE), options,
                                                providers=["CPUExecutionProvider"])
        else:
            self.session = ort.InferenceSession(str(bundle / MODEL_FILE), options, providers=["CPUExecutionProvider"])
        self.cand_columns = np.array([f.name in set(candidate_fields(spec)) for f in spec.single_fields])

    def log_pctr(self, imps: Mapping[str, np.ndarray], row_imp: np.ndarray, row_cand: np.ndarray) -> np.ndarray:
        """``log pCTR`` of imp ``row_imp[r]`` (a row of ``imps``) with catalog creative ``row_cand[r]``."""
        if self.factorized:
            used, local = np.unique(row_cand, return_inverse=True)
            ctr = self.session.run([OUTPUT], {**imps, CAND_PART: self.cand_part[used], ROW_IMP: row_imp.astype(np.int64),
                                              ROW_CAND: local.astype(np.int64)})[0]
        else:
            rows = {}
            if self.spec.single_fields:
                rows[SPARSE_INPUT] = np.where(self.cand_columns, self.cand_inputs[SPARSE_INPUT][row_cand],
                                              imps[SPARSE_INPUT][row_imp])
            for f in self.spec.multi_fields:
                source, index = (self.cand_inputs, row_cand) if f.name in candidate_fields(self.spec) else (imps, row_imp)
                rows[f.name] = np.ascontiguousarray(source[f.name][index])
            ctr = self.session.run([OUTPUT], rows)[0]
        return np.log(np.maximum(ctr.reshape(-1).astype(np.float64), _MIN_PCTR))


# -- data ---------------------------------------------------------------------------------------------------------
def _read_log(path: Path, spec: FeatureSpec, creative_index: Mapping[str, int], progress: bool
              ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The log's rows whose creative is in the catalog: their features and the catalog index of that creative."""
    if not path.is_file():
        raise TrainError(f"{path}: no such file (python -m train synth --creatives C writes it)")
    featurizer = Featurizer(spec)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in spec.input_names}
    shown: list[np.ndarray] = []
    reader = LogReader(path)
    with tqdm(total=reader.size, unit="B", unit_scale=True, desc=f"read {path.name}", disable=not progress,
              leave=False) as bar:
        for chunk in reader:
            index = np.array([creative_index.get(str(r.get("creative")), -1) for r in chunk.records], dtype=np.int64)
            keep = np.flatnonzero(index >= 0)
            features = featurizer.transform([chunk.records[i] for i in keep.tolist()])
            for n in spec.input_names:
                parts[n].append(features[n])
            shown.append(index[keep])
            bar.update(reader.bytes_read - bar.n)
    rows = np.concatenate(shown) if shown else np.zeros(0, np.int64)
    if len(rows) == 0:
        raise TrainError(f"{path}: no line shows a creative of the catalog (wrong --campaigns?)")
    return {n: np.concatenate(a) for n, a in parts.items()}, rows


# -- training -------------------------------------------------------------------------------------------------
def check_settings(overrides: Mapping[str, Any]) -> dict[str, Any]:
    hp = dict(DEFAULTS)
    for name, value in overrides.items():
        if name not in DEFAULTS:
            raise TrainError(f"unknown two-tower setting {name!r} (known: {', '.join(DEFAULTS)})")
        kind = type(DEFAULTS[name])
        try:
            converted = kind(value)
        except (TypeError, ValueError):
            raise TrainError(f"--{name.replace('_', '-')}: expected a {kind.__name__}, got {value!r}") from None
        if not converted > 0 or (kind is float and not math.isfinite(converted)):
            raise TrainError(f"--{name.replace('_', '-')}: must be positive, got {value!r}")
        hp[name] = converted
    return hp


def train_twotower(data: str | Path, bundle: str | Path, *, campaigns: str | Path | None = None, seed: int = 0,
                   threads: int = 1, progress: bool = True, **overrides: Any) -> dict[str, Any]:
    """Train the towers on ``data``'s logs against ``bundle``'s ranker, write them into the bundle; returns the entry."""
    hp = check_settings(overrides)
    data, bundle = Path(data), Path(bundle)
    try:
        opened = open_bundle(bundle)
    except TrainError as exc:
        raise TrainError(f"--bundle {exc}") from None
    meta, spec = opened.meta, opened.spec
    campaigns = Path(campaigns) if campaigns else data / CAMPAIGNS_FILE
    try:
        catalog = load_catalog(campaigns)
    except CatalogError as exc:
        raise TrainError(str(exc)) from None
    if len(catalog) < 2:
        raise TrainError(f"{campaigns}: a catalog of {len(catalog)} creative(s) has nothing to retrieve from")
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        return _train(data, bundle, meta, spec, catalog, campaigns, hp, seed, threads, progress)
    finally:
        torch.set_num_threads(previous)


def _train(data: Path, bundle: Path, meta: dict, spec: FeatureSpec, catalog, campaigns: Path, hp: dict, seed: int,
           threads: int, progress: bool) -> dict[str, Any]:
    started = time.perf_counter()
    featurizer = Featurizer(spec)
    candidates = catalog.candidates
    n_cat = len(candidates)
    cand_inputs = spec.allocate(n_cat)
    featurizer.transform_into(cand_inputs, [c.layer for c in candidates])
    log_value = np.log(np.array([c.value_per_click for c in candidates]))
    sizes = {size: i for i, size in enumerate(sorted(catalog.sizes))}
    cand_size = np.array([sizes[(c.w, c.h)] for c in candidates])
    creative_index = {c.creative_id: c.index for c in candidates}
    imps, shown = _read_log(data / TRAIN_FILE, spec, creative_index, progress)
    teacher = Teacher(bundle, spec, meta, cand_inputs, threads)

    p_log = np.bincount(shown, minlength=n_cat) / len(shown)
    batch, uniform = hp["batch"], hp["uniform"]
    model = TowerModel(spec, hp, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=hp["lr"])
    rng = np.random.default_rng(seed)
    cand_tensors = _tensors(spec, cand_inputs)
    teacher_seconds, losses = 0.0, []
    for step in tqdm(range(hp["steps"]), desc="two-tower", unit="step", disable=not progress, leave=False):
        rows = rng.integers(0, len(shown), batch)
        cands = np.concatenate([shown[rows], rng.integers(0, n_cat, uniform)])
        log_q = np.log((batch * p_log[cands] + uniform / n_cat) / (batch + uniform))
        same = cand_size[shown[rows]][:, None] == cand_size[cands][None, :]  # an imp meets its size only
        row_imp, row_cand = np.nonzero(same)
        tick = time.perf_counter()
        batch_imps = {n: np.ascontiguousarray(a[rows]) for n, a in imps.items()}
        target = np.full(same.shape, -np.inf)
        target[row_imp, row_cand] = (teacher.log_pctr(batch_imps, row_imp, cands[row_cand]) + log_value[cands[row_cand]]
                                     - log_q[row_cand])
        teacher_seconds += time.perf_counter() - tick
        target = torch.from_numpy(np.exp(target - target.max(axis=1, keepdims=True)))
        target = (target / target.sum(dim=1, keepdim=True)).float()
        q = model.imp(*[torch.from_numpy(batch_imps[n]) for n in spec.input_names])
        a = model.ad(*[t[torch.from_numpy(cands)] for t in cand_tensors])
        a = torch.cat([a[:, :-1], a[:, -1:] + torch.from_numpy(log_value[cands]).float().reshape(-1, 1)], dim=1)
        logits = (q @ a.T - torch.from_numpy(log_q).float()).masked_fill(torch.from_numpy(~same), -1e9)
        loss = -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    model.imp.unit = True
    trained_seconds = time.perf_counter() - started

    held_out, _ = _read_log(data / TEST_FILE, spec, creative_index, progress=False) if (data / TEST_FILE).is_file() \
        else (imps, None)
    with tempfile.TemporaryDirectory(prefix=".twotower-", dir=bundle) as tmp:
        staged = {IMP_TOWER_FILE: Path(tmp) / IMP_TOWER_FILE, AD_TOWER_FILE: Path(tmp) / AD_TOWER_FILE}
        _export(model.imp, spec, staged[IMP_TOWER_FILE], IMP_OUTPUT)
        _export(model.ad, spec, staged[AD_TOWER_FILE], AD_OUTPUT)
        parity = {"imp_tower": _parity(model.imp, staged[IMP_TOWER_FILE], spec, held_out, IMP_OUTPUT),
                  "ad_tower": _parity(model.ad, staged[AD_TOWER_FILE], spec, cand_inputs, AD_OUTPUT),
                  "rows": PARITY_ROWS, "tolerance": PARITY_TOLERANCE}
        tail = losses[-max(1, len(losses) // 10):]
        entry = {
            "files": [IMP_TOWER_FILE, AD_TOWER_FILE],
            "dim": hp["dim"] + 1,
            "imp_fields": [f.name for f in spec.fields if f.name not in candidate_fields(spec)],
            "ad_fields": list(candidate_fields(spec)),
            "score": "imp_vec · ad_vec, ad_vec's last entry + log(value_per_click) at catalog load",
            "parity": parity,
            "hyperparameters": hp,
            "training": {"objective": "sampled softmax distilled from the ranker's log(pCTR x value), in-batch + "
                                      "uniform negatives, logQ-corrected, same-size candidates only",
                         "teacher": "factorized" if teacher.factorized else "model.onnx",
                         "data": str(data), "campaigns": str(campaigns), "catalog_creatives": n_cat,
                         "log_rows": int(len(shown)), "seed": seed, "threads": threads,
                         "final_loss": round(float(np.mean(tail)), 5), "first_loss": round(losses[0], 5),
                         "seconds": round(trained_seconds, 1), "seconds_teacher": round(teacher_seconds, 1)},
            "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
        }
        add_graph(bundle, GRAPH, staged, entry)  # the ranker and its other graphs as they were
    return entry


# -- export ---------------------------------------------------------------------------------------------------
def _export(tower: Tower, spec: FeatureSpec, path: Path, output: str) -> None:
    example = tuple(torch.zeros((2, spec.input_width(n)), dtype=torch.int64) for n in spec.input_names)
    names = list(spec.input_names)
    axes = {n: {0: "batch"} for n in names + [output]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(tower, example, str(path), input_names=names, output_names=[output], dynamic_axes=axes,
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    onnx.checker.check_model(str(path))


def _parity(tower: Tower, path: Path, spec: FeatureSpec, inputs: Mapping[str, np.ndarray], output: str) -> float:
    """Max |torch tower - ONNX Runtime (served settings)| over up to PARITY_ROWS rows, at batch 1 and all at once."""
    n = min(PARITY_ROWS, len(next(iter(inputs.values()))))
    rows = {k: np.ascontiguousarray(v[:n]) for k, v in inputs.items()}
    with torch.no_grad():
        expected = tower(*_tensors(spec, rows)).numpy().astype(np.float64)
    session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    names = {a.name for a in session.get_inputs()}
    got_all = session.run([output], {k: v for k, v in rows.items() if k in names})[0]
    got_one = np.concatenate([session.run([output], {k: v[i:i + 1] for k, v in rows.items() if k in names})[0]
                              for i in range(min(n, 64))])
    worst = max(float(np.max(np.abs(got_all - expected))), float(np.max(np.abs(got_one - expected[:len(got_one)]))))
    if not worst <= PARITY_TOLERANCE:
        raise ParityError(f"{path}: ONNX Runtime differs from the trained tower by {worst:.3g} over {n} rows "
                          f"(tolerance {PARITY_TOLERANCE:g})")
    return worst

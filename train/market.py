"""The win-price model: P(win | bid, x) = P(market < bid | x), learned from a censored bid log.

Model family: the market price is log-normal given the impression, ``ln market ~ N(mu(x), sigma(x))``,
with ``mu`` and ``log sigma`` sums of per-value terms of the imp-side fields (the ones a bid request
carries: exchange, domain, slot, floor, time, user agent, place; not the candidate's creative, which
the market does not see). Why this family rather than a discrete hazard model: the bid grid the
shader searches is continuous, a parametric CDF gives a smooth, monotone P(win | b) at any bid
(a hazard model is a step function at its bin edges and needs many bins to shade finely), and two
outputs per impression keep the served graph tiny. Its limit is the shape: a market with two modes
(say, a rival that bids only on some users) is fitted by one bump.

Censored likelihood, per bid-log row (Φ the standard normal CDF, z(t) = (ln t − mu) / sigma):

    lost (either auction)          market >= bid           log(1 − Φ(z(bid)))
    lost, with min-to-win m        market =  m             log φ(z(m)) − log sigma − log m
    first-price win                market <  bid           log Φ(z(bid))
    second-price win, paid > floor market =  paid          log φ(z(paid)) − log sigma − log paid
    second-price win, paid = floor market <= floor         log Φ(z(floor))

The exported graph (``market.onnx``) runs the served bid search (``bidder/shading.py``): from the
spec's ``sparse`` input, ``value`` and ``floor`` it builds each imp's grid of ``GRID`` bids and returns
it (``bids``), the model's P(market < bid | x) there (``win``), the grid bid of highest expected surplus
(``bid``) and that surplus. Parity is checked on ``win`` (the model) and the grid; ``bid`` must be
the argmax of ONNX Runtime's own surplus.
"""
from __future__ import annotations

import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
import torch.nn as nn
from tqdm import tqdm

from bidder.bundle import add_graph
from bidder.factorized import candidate_fields
from bidder.shading import (BID_OUTPUT, FLOOR_INPUT, GRID, GRID_OUTPUT, MARKET_FILE, MARKET_GRAPH, NATIVE_TOLERANCE,
                            OUTPUTS, SURPLUS_OUTPUT, TERMS_FILE, VALUE_INPUT, WIN_OUTPUT, WinModel, best_bids)
from bidder.spec import SPARSE_INPUT, FeatureSpec
from train.bundle import open_bundle
from train.data.bidlog import BidLog, read_bid_log, split_bid_log
from train.errors import ParityError, TrainError
from train.export import OPSET, serving_session

__all__ = ["MarketModel", "censored_nll", "fit_market", "market_bundle", "market_terms", "write_terms"]

PARITY_TOLERANCE = 1e-6
PARITY_ROWS = 2048
EVAL_GRID = np.geomspace(1.0, 40.0, 16)  # USD CPM: spans the synthetic market's bulk
_LOG_SQRT2 = 0.5 * math.log(2.0)
_MIN_K, _MAX_K = -math.log(5.0) - _LOG_SQRT2, -math.log(0.02) - _LOG_SQRT2  # sigma within [0.02, 5]

#: row kinds of the censored likelihood
LOST, WON_BELOW, EXACT = 0, 1, 2


class MarketModel(nn.Module):
    """imp-side single fields -> (mu, sigma) of the log market price; ``forward`` runs the served bid search.

    Additive in log space: each value of each imp-side field has two learned terms, one for ``mu`` and
    one for ``k`` = −ln(sigma·√2); an impression's ``mu`` and ``k`` are the sums over its fields (the
    first field's terms also carry the intercept). No hidden layer: the market price of an exchange is
    a sum of slot, site, exchange and floor effects far more often than an interaction of them, and the
    served graph stays a handful of kernels (it runs on every first-price request). ``k`` is what the
    search multiplies by, so the graph never divides.
    """

    def __init__(self, spec: FeatureSpec, init_mu: float = 0.0, init_log_sigma: float = 0.0) -> None:
        super().__init__()
        candidates = set(candidate_fields(spec))
        columns = [j for j, f in enumerate(spec.single_fields) if f.name not in candidates]
        if not columns:
            raise TrainError("the spec has no imp-side single fields to model the market price with")
        self.fields = [spec.single_fields[j].name for j in columns]
        buckets = sum(spec.single_fields[j].buckets for j in columns)
        starts = np.concatenate([[0], np.cumsum([spec.single_fields[j].buckets for j in columns])[:-1]])
        self.register_buffer("columns", torch.tensor(columns, dtype=torch.int64))
        self.register_buffer("starts", torch.tensor(starts, dtype=torch.int64).reshape(1, -1))
        self.register_buffer("steps", torch.arange(GRID, dtype=torch.float32).reshape(1, -1) / GRID)
        self.table = nn.Embedding(buckets, 2)  # per value: its term of mu and of k = -ln(sigma * sqrt 2)
        nn.init.normal_(self.table.weight, 0.0, 0.01)
        with torch.no_grad():  # the intercept lives in the first field's terms: every imp has one value there
            first = spec.single_fields[columns[0]].buckets
            self.table.weight[:first, 0] += init_mu
            self.table.weight[:first, 1] += -init_log_sigma - _LOG_SQRT2

    def _terms(self, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, k), each ``[n, 1]``; k = −ln(sigma·√2), clamped to sigma's range."""
        mu, k = torch.split(self.table(torch.index_select(sparse, 1, self.columns) + self.starts).sum(dim=1), 1, dim=1)
        return mu, torch.clamp(k, _MIN_K, _MAX_K)

    def params(self, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, sigma), each ``[n, 1]``."""
        mu, k = self._terms(sparse)
        return mu, torch.exp(-k) * (1.0 / math.sqrt(2.0))

    def probability(self, sparse: torch.Tensor, bids: torch.Tensor) -> torch.Tensor:
        """P(market < bids[i, g] | x_i)."""
        mu, k = self._terms(sparse)
        return 0.5 + 0.5 * torch.erf((torch.log(bids) - mu) * torch.exp(k))

    def forward(self, sparse: torch.Tensor, value: torch.Tensor, floor: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The served search (``bidder.shading``): (grid bids, P(win) there, best bid, its expected surplus)."""
        bids = floor + (value - floor) * self.steps
        win = self.probability(sparse, bids)
        surplus = (value - bids) * win
        best = torch.argmax(surplus, dim=1, keepdim=True)
        return bids, win, torch.gather(bids, 1, best), torch.gather(surplus, 1, best)


def observations(log: BidLog) -> tuple[np.ndarray, np.ndarray]:
    """(kind, threshold) per row: what the row says about the market price (see the module's table)."""
    kind = np.full(len(log), LOST, dtype=np.int64)
    threshold = log.bid.copy()
    first_win = log.won & log.first_price
    kind[first_win] = WON_BELOW
    second_win = log.won & ~log.first_price
    at_floor = second_win & (log.paid <= log.floor + 1e-9)
    kind[second_win & ~at_floor] = EXACT
    threshold[second_win & ~at_floor] = log.paid[second_win & ~at_floor]
    kind[at_floor] = WON_BELOW
    threshold[at_floor] = log.floor[at_floor]
    told = ~log.won & np.isfinite(log.min_to_win)  # the exchange said what would have won: the market price
    kind[told] = EXACT
    threshold[told] = log.min_to_win[told]
    return kind, threshold


def censored_nll(mu: torch.Tensor, sigma: torch.Tensor, kind: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of censored log-normal observations (float64 inside)."""
    mu, sigma, threshold = mu.double().reshape(-1), sigma.double().reshape(-1), threshold.double().reshape(-1)
    log_t = torch.log(torch.clamp(threshold, min=1e-12))
    z = (log_t - mu) / sigma
    below = torch.special.log_ndtr(z)
    above = torch.special.log_ndtr(-z)
    exact = -0.5 * z * z - 0.5 * math.log(2 * math.pi) - torch.log(sigma) - log_t
    ll = torch.where(kind == LOST, above, torch.where(kind == WON_BELOW, below, exact))
    return -ll.mean()


# -- fitting ---------------------------------------------------------------------------------------------
def fit_market(data_dir: str | Path, spec: FeatureSpec, *, epochs: int = 8, batch_size: int = 2048, lr: float = 3e-3,
               seed: int = 0, threads: int = 1, progress: bool = True) -> tuple[MarketModel, dict[str, Any], dict]:
    """Train on the bid log's train split, stop early on validation NLL; (model, metrics, splits)."""
    started = time.perf_counter()
    log = read_bid_log(data_dir, spec, progress=progress)
    parts = split_bid_log(log)
    if len(parts["train"]) < 100:
        raise TrainError(f"{data_dir}: the bid log's training split has {len(parts['train'])} rows; need at least 100")
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    torch.manual_seed(seed)
    try:
        tensors = {name: _tensors(part) for name, part in parts.items()}
        kind, threshold = tensors["train"][1], tensors["train"][2]
        # start at the exact observations' log mean and spread (a fair guess before any gradient)
        exact = threshold[kind == EXACT]
        init_mu = float(torch.log(exact).mean()) if len(exact) else float(torch.log(threshold).mean())
        init_sigma = float(torch.log(exact).std()) if len(exact) > 1 else 1.0
        model = MarketModel(spec, init_mu=init_mu, init_log_sigma=math.log(max(init_sigma, 0.05)))
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(seed)
        best, best_state, history, stale = math.inf, None, [], 0
        sparse, kind, threshold = tensors["train"]
        for epoch in range(1, epochs + 1):
            model.train()
            order = torch.randperm(len(kind), generator=generator)
            total = 0.0
            steps = range(0, len(order), batch_size)
            for start in tqdm(steps, desc=f"market epoch {epoch}/{epochs}", disable=not progress, leave=False):
                index = order[start:start + batch_size]
                mu, sigma = model.params(sparse[index])
                loss = censored_nll(mu, sigma, kind[index], threshold[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * len(index)
            val = _nll(model, *tensors["val"])
            history.append({"epoch": epoch, "train_nll": round(total / len(order), 6), "val_nll": round(val, 6)})
            if progress:
                tqdm.write(f"market epoch {epoch}: train nll {total / len(order):.5f}  val nll {val:.5f}")
            if val < best:
                best, best_state, stale = val, {k: v.clone() for k, v in model.state_dict().items()}, 0
            else:
                stale += 1
                if stale >= 1:
                    break
        model.load_state_dict(best_state)
        model.eval()
        metrics = {"test": evaluate(model, parts["test"]), "history": history,
                   "rows": {name: len(part) for name, part in parts.items()},
                   "seconds": round(time.perf_counter() - started, 2)}
    finally:
        torch.set_num_threads(previous)
    return model, metrics, parts


def _tensors(log: BidLog) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kind, threshold = observations(log)
    return (torch.from_numpy(np.ascontiguousarray(log.inputs[SPARSE_INPUT])), torch.from_numpy(kind),
            torch.from_numpy(threshold))


@torch.no_grad()
def _nll(model: MarketModel, sparse: torch.Tensor, kind: torch.Tensor, threshold: torch.Tensor) -> float:
    model.eval()
    mu, sigma = model.params(sparse)
    return float(censored_nll(mu, sigma, kind, threshold))


@torch.no_grad()
def evaluate(model: MarketModel, log: BidLog, bins: int = 10) -> dict[str, Any]:
    """Held-out figures: censored NLL (the model's and, on synthetic logs, the truth's), win rate by predicted bin,
    MAE vs truth (synthetic logs only: None on a log from the bidder's own events)."""
    sparse, kind, threshold = _tensors(log)
    mu, sigma = model.params(sparse)
    nll = float(censored_nll(mu, sigma, kind, threshold))
    if not log.has_truth:
        predicted = model.probability(sparse, torch.from_numpy(log.bid.astype(np.float32)).reshape(-1, 1)).numpy()
        return {"rows": len(log), "censored_nll": round(nll, 5), "censored_nll_truth": None,
                "win_rate": {"predicted": round(float(predicted.mean()), 4), "observed": round(float(log.won.mean()), 4)},
                "mae_vs_truth": None}
    true_mu = torch.from_numpy(log.market_mu_true)
    true_sigma = torch.from_numpy(log.market_sigma_true)
    nll_true = float(censored_nll(true_mu, true_sigma, kind, threshold))
    predicted = model.probability(sparse, torch.from_numpy(log.bid.astype(np.float32)).reshape(-1, 1)).numpy().reshape(-1)
    edges = np.quantile(predicted, np.linspace(0, 1, bins + 1)[1:-1])
    index = np.searchsorted(edges, predicted, side="left")
    by_bin = []
    for b in range(bins):
        rows = index == b
        if rows.any():
            by_bin.append({"rows": int(rows.sum()), "predicted": round(float(predicted[rows].mean()), 4),
                           "observed": round(float(log.won[rows].mean()), 4)})
    grid = torch.from_numpy(np.tile(EVAL_GRID.astype(np.float32), (len(log), 1)))
    p_model = model.probability(sparse, grid).numpy().astype(np.float64)
    p_true = _normal_cdf((np.log(EVAL_GRID)[None, :] - log.market_mu_true[:, None]) / log.market_sigma_true[:, None])
    return {"rows": len(log), "censored_nll": round(nll, 5), "censored_nll_truth": round(nll_true, 5),
            "win_rate": {"predicted": round(float(predicted.mean()), 4), "observed": round(float(log.won.mean()), 4)},
            "win_rate_by_bin": by_bin, "bid_grid_usd_cpm": [round(float(b), 3) for b in EVAL_GRID],
            "mae_vs_truth": round(float(np.abs(p_model - p_true).mean()), 5),
            "mae_vs_truth_by_auction": {
                "first": round(float(np.abs(p_model - p_true)[log.first_price].mean()), 5) if log.first_price.any() else None,
                "second": round(float(np.abs(p_model - p_true)[~log.first_price].mean()), 5)
                if (~log.first_price).any() else None}}


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    return torch.special.ndtr(torch.from_numpy(np.asarray(z, dtype=np.float64))).numpy()


# -- export and bundle --------------------------------------------------------------------------------------
def export_market(model: MarketModel, spec: FeatureSpec, path: Path) -> Path:
    example = (torch.zeros((2, spec.input_width(SPARSE_INPUT)), dtype=torch.int64), torch.full((2, 1), 5.0),
               torch.full((2, 1), 0.5))
    axes = {name: {0: "imps"} for name in (SPARSE_INPUT, VALUE_INPUT, FLOOR_INPUT, *OUTPUTS)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), example, str(path), input_names=[SPARSE_INPUT, VALUE_INPUT, FLOOR_INPUT],
                          output_names=list(OUTPUTS), dynamic_axes=axes, opset_version=OPSET, dynamo=False,
                          do_constant_folding=True)
    onnx.checker.check_model(str(path))
    return path


@torch.no_grad()
def check_market_parity(model: MarketModel, path: Path, log: BidLog, rows: int = PARITY_ROWS) -> dict[str, Any]:
    """torch vs ONNX Runtime on held-out rows at batch 1, 64 and all rows: max |Δ| of the grid and of P(win)
    (values 0.2-2x the logged bid, floors the logged ones); ``bid`` and ``surplus`` must be the argmax of
    ONNX Runtime's own grid and P(win). ``ParityError`` otherwise."""
    n = min(rows, len(log))
    if n == 0:
        raise ParityError("market parity check needs held-out rows, got none")
    sparse = np.ascontiguousarray(log.inputs[SPARSE_INPUT][:n])
    value = (log.bid[:n] * np.geomspace(0.2, 2.0, n)).astype(np.float32).reshape(-1, 1)
    floor = np.minimum(log.floor[:n].astype(np.float32).reshape(-1, 1), value)
    expected = model(torch.from_numpy(sparse), torch.from_numpy(value), torch.from_numpy(floor))
    expected = {GRID_OUTPUT: expected[0].numpy().astype(np.float64), WIN_OUTPUT: expected[1].numpy().astype(np.float64)}
    session = serving_session(path)
    worst = 0.0
    sizes = [b for b in (1, 64) if b < n] + [n]
    for size in sizes:
        parts = [session.run(list(OUTPUTS), {SPARSE_INPUT: sparse[i:i + size], VALUE_INPUT: value[i:i + size],
                                             FLOOR_INPUT: floor[i:i + size]}) for i in range(0, n, size)]
        got = {name: np.concatenate([p[k] for p in parts]).astype(np.float64) for k, name in enumerate(OUTPUTS)}
        diff = max(float(np.max(np.abs(got[name] - expected[name]) / np.maximum(1.0, np.abs(expected[name]))))
                   for name in (GRID_OUTPUT, WIN_OUTPUT))
        if not np.isfinite(diff) or diff > PARITY_TOLERANCE:
            raise ParityError(f"{path}: ONNX Runtime differs from the trained market model by {diff:.3g} at batch "
                              f"size {size} (tolerance {PARITY_TOLERANCE:g})")
        # the graph's bid must be a grid bid of the highest expected surplus; where two grid bids tie (a P(win)
        # that saturates), ONNX Runtime's ArgMax and numpy's may pick different ones of the same surplus
        grid, win = got[GRID_OUTPUT], got[WIN_OUTPUT]
        _, surplus = best_bids(value[:, 0].astype(np.float64), grid, win)
        every = np.arange(len(grid))
        chosen = np.argmin(np.abs(grid - got[BID_OUTPUT]), axis=1)  # the graph's bid's place in its grid
        chosen_surplus = (value[:, 0].astype(np.float64) - grid[every, chosen]) * win[every, chosen]
        if not (np.allclose(got[BID_OUTPUT][:, 0], grid[every, chosen], rtol=1e-6)
                and np.allclose(chosen_surplus, surplus, rtol=1e-5, atol=1e-6)
                and np.allclose(got[SURPLUS_OUTPUT][:, 0], surplus, rtol=1e-5, atol=1e-6)):
            raise ParityError(f"{path}: its {BID_OUTPUT!r} is not the grid bid of highest expected surplus")
        worst = max(worst, diff)
    return {"max_abs_diff": worst, "measure": "max |Δ| of P(win) and of the bid grid (relative above 1)", "rows": n,
            "grid": GRID, "batch_sizes": sizes, "tolerance": PARITY_TOLERANCE}


def market_bundle(data_dir: str | Path, bundle: str | Path, *, epochs: int = 8, seed: int = 0, threads: int = 1,
                  progress: bool = True, data_label: str | None = None) -> dict[str, Any]:
    """Fit the win-price model on ``data_dir``'s bid log and add it to ``bundle``; returns meta.json's entry
    (its ``data``: ``data_label``, else the folder)."""
    bundle = Path(bundle)
    try:
        spec = open_bundle(bundle).spec
    except TrainError as exc:
        raise TrainError(f"--bundle {exc}") from None
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise TrainError(f"--epochs must be a positive integer, got {epochs!r}")
    model, metrics, parts = fit_market(data_dir, spec, epochs=epochs, seed=seed, threads=threads, progress=progress)
    with tempfile.TemporaryDirectory(prefix=".market-", dir=bundle) as tmp:
        path = export_market(model, spec, Path(tmp) / MARKET_FILE)
        parity = check_market_parity(model, path, parts["test"])
        terms = write_terms(path, spec, Path(tmp) / TERMS_FILE)
        entry = {"files": [MARKET_FILE], "family": "log-normal",
                 "fields": model.fields, "inputs": [SPARSE_INPUT, VALUE_INPUT, FLOOR_INPUT], "outputs": list(OUTPUTS),
                 "terms": terms, "data": data_label or str(data_dir), "metrics": metrics, "parity": parity}
        add_graph(bundle, MARKET_GRAPH, {MARKET_FILE: path, TERMS_FILE: Path(tmp) / TERMS_FILE}, entry)
    return entry


# -- the terms, for the native bid search ------------------------------------------------------------------------
def market_terms(path: Path) -> dict[str, np.ndarray]:
    """The additive model's parameters as ``export_market`` wrote them into ``path`` (``bidder.shading.TERMS``):
    the table of (mu, k) terms, each field's column and first row, and the clip range of k."""
    graph = onnx.load(str(path)).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}
    clips = [n for n in graph.node if n.op_type == "Clip"]
    if not {"table.weight", "columns", "starts"} <= set(init) or len(clips) != 1:
        raise TrainError(f"{path}: not a win-price graph written by train/market.py (no terms table, or not one Clip)")
    bounds = [float({**init, **constants}[name]) for name in clips[0].input[1:3]]
    return {"table": np.ascontiguousarray(init["table.weight"], dtype=np.float32),
            "columns": init["columns"].astype(np.int64).reshape(-1),
            "starts": init["starts"].astype(np.int64).reshape(-1), "k_range": np.array(bounds, dtype=np.float64)}


def write_terms(graph: Path, spec: FeatureSpec, out: Path) -> dict[str, Any]:
    """Write ``graph``'s terms to ``out`` and check the native search they drive against the graph; returns
    meta.json's ``terms`` entry (file, the largest difference). ``ParityError`` above the tolerance."""
    np.savez(out, **market_terms(graph))
    model = WinModel(graph, spec, max_imps=8, terms=out)
    diff = model.native_difference(rows=PARITY_ROWS)
    if not diff <= NATIVE_TOLERANCE:
        raise ParityError(f"{graph}: the native bid search differs from the graph by {diff:.3g} "
                          f"(tolerance {NATIVE_TOLERANCE:g})")
    return {"file": TERMS_FILE, "max_abs_diff": diff, "rows": PARITY_ROWS,
            "measure": "max |Δ| of P(win) at every grid bid and of the best surplus (relative above 1), "
                       "native (double) vs the graph (float32)", "tolerance": NATIVE_TOLERANCE}

"""The model study: DeepFM, AutoInt, DCNv2, TabTransformer, a hashed logistic regression and LightGBM on the same split.

Every model is trained, calibrated, exported and parity-checked exactly as ``fit`` does (its bundle is kept
under ``OUT/<model>/``; LightGBM through ``train/gbdt.py``); DeepFM is also exported as deepctr's stock graph
so the table shows what the lean graph buys. Each row: test ``auc`` and ``logloss`` of the served (calibrated)
model, ``calibration`` (its mean test prediction over the mean true pCTR on synthetic data, over the test CTR
otherwise), ``train_seconds``, and latency measured the way the bidder serves: one thread, IO binding, at 1, 9
(``latency_b9_us``) and 64 rows, all graphs taking turns in the same run. Results go to ``compare.md``,
``compare.json`` and ``compare.png``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from bidder.spec import FeatureSpec
from train.bundle import MODEL_FILE
from train.distributed.group import requested_size
from train.crosses import GENERATOR_CROSSES, fit_crossed_logreg
from train.data.dataset import Dataset, load_dataset
from train.errors import TrainError
from train.evaluate import oracle_metrics, predict
from train.export import STOCK_INPUT, export_stock, serving_session
from train.fit import report_skipped, resolve_spec, save_bundle, save_gbdt_bundle
from train.gbdt import train_gbdt
from train.studies.latency import measure_latencies
from train.models import ARCHITECTURES, deepctr_input
from train.trainer import train_model

__all__ = ["MODELS", "compare", "data_line", "render_markdown", "target_lines"]

LATENCY_BATCHES = (1, 9, 64)
GBDT = "lightgbm"
MODELS = ARCHITECTURES + (GBDT,)
STOCK = "deepfm (stock deepctr graph)"


def compare(data_dir: str | Path, out_dir: str | Path, *, models: tuple[str, ...] = MODELS,
            epochs: int | None = None, seed: int = 0, progress: bool = True, skip_bad_lines: bool = False,
            spec: FeatureSpec | str | Path | None = None,
            hyperparameters: dict[str, dict[str, Any]] | None = None, threads: int = 1,
            reference: bool = True) -> dict[str, Any]:
    """Train and measure ``models``; write the report files to ``out_dir`` and return the results.

    On synthetic data (``pctr_true`` present) and with ``reference``, logistic regression with the
    generator's own feature crosses is fitted too (``train.crosses``): what this many rows can teach a
    model that knows where the interactions are.
    """
    if requested_size() > 1:
        raise TrainError("compare trains in one process; use torchrun with train fit, one model at a time")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(data_dir, resolve_spec(spec), seed=seed, skip_bad_lines=skip_bad_lines, progress=progress)
    report_skipped(dataset)
    rows: list[dict[str, Any]] = []
    graphs: dict[str, Path] = {}
    for architecture in models:
        settings = (hyperparameters or {}).get(architecture, {})
        if architecture == GBDT:
            model, metrics = train_gbdt(dataset, seed=seed, threads=threads, progress=progress, **settings)
            bundle = save_gbdt_bundle(model, metrics, dataset, out / architecture)
            rows.append(_row(architecture, bundle, parameters=model.booster.num_trees(), best_epoch=None,
                             seconds=model.seconds))
            graphs[architecture] = bundle / MODEL_FILE
            continue
        trained = train_model(dataset, architecture, epochs=epochs, seed=seed, progress=progress, threads=threads,
                              **settings)
        bundle = save_bundle(trained, dataset, out / architecture)
        row = _row(architecture, bundle, parameters=trained.parameters, best_epoch=trained.best_epoch,
                   seconds=trained.seconds)
        rows.append(row)
        graphs[architecture] = bundle / MODEL_FILE
        if architecture == "deepfm":
            stock_path = export_stock(trained.model, dataset.spec, out / "deepfm-stock.onnx")
            stock_parity = _stock_parity(trained.model, stock_path, dataset)
            # the stock graph is the uncalibrated model: its own log loss and calibration, not the served ones
            raw = predict(trained.model, deepctr_input(dataset.test.inputs, dataset.spec))
            rows.append({**row, "model": STOCK, "graph": "stock", "onnx_bytes": stock_path.stat().st_size,
                         "parity_max_abs_diff": stock_parity, "logloss": trained.metrics["test"]["logloss"],
                         "calibration": _calibration(raw, dataset)})
            graphs[STOCK] = stock_path

    latency = _latencies(graphs, dataset)
    for row in rows:
        for batch in LATENCY_BATCHES:
            row[f"latency_{'b' if batch == 9 else ''}{batch}_us"] = latency[(row["model"], batch)]["median_us"]
    oracle = (oracle_metrics(dataset.test.labels, dataset.test.pctr_true)
              if dataset.test.pctr_true is not None else None)
    names = {f.name for f in dataset.spec.fields}
    crosses = [pair for pair in GENERATOR_CROSSES if set(pair) <= names]
    crossed = (fit_crossed_logreg(dataset, crosses) if reference and crosses and dataset.test.pctr_true is not None
               and len(dataset.val) and len(dataset.test) else None)
    results = {
        "data": {"path": dataset.path, "source": dataset.source, "digest": dataset.digest, "rows": dataset.rows(),
                 "split": dataset.split},
        "oracle": {"test_auc": oracle["auc"], "test_logloss": oracle["logloss"]} if oracle else None,
        "reference": crossed,
        "rows": rows,
        "targets": _targets(rows, oracle),
    }
    (out / "compare.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "compare.md").write_text(render_markdown(results))
    _plot(results, out / "compare.png")
    return results


def _row(model: str, bundle: Path, *, parameters: int, best_epoch: int | None, seconds: float) -> dict[str, Any]:
    """A table row from a written bundle: the served model's test figures, as ``meta.json`` records them."""
    meta = json.loads((bundle / "meta.json").read_text())
    test, after = meta["metrics"]["test"], meta["calibration"]["test"]["after"]
    return {"model": model, "graph": "lean", "auc": test["auc"], "logloss": test["logloss"],
            "calibration": after.get("mean_over_true", after["mean_over_ctr"]),
            "calibration_kept": meta["calibration"]["kept"], "val_auc": meta["metrics"]["val"]["auc"],
            "parameters": parameters, "onnx_bytes": (bundle / MODEL_FILE).stat().st_size,
            "parity_max_abs_diff": meta["parity"]["max_abs_diff"], "best_epoch": best_epoch, "train_seconds": seconds}


def _calibration(probs: np.ndarray, dataset: Dataset) -> float | None:
    """Mean test prediction over the mean true pCTR (synthetic data) or over the test CTR."""
    truth = dataset.test.pctr_true if dataset.test.pctr_true is not None else dataset.test.labels
    return round(float(np.mean(probs) / np.mean(truth)), 4) if np.mean(truth) > 0 else None


def _stock_parity(model, path: Path, dataset: Dataset) -> float:
    """The stock graph takes deepctr's float matrix; check it against the model like the lean one."""
    n = min(2048, len(dataset.test))
    x = deepctr_input({k: v[:n] for k, v in dataset.test.inputs.items()}, dataset.spec)
    got = serving_session(path).run(None, {STOCK_INPUT: x})[0].reshape(-1)
    return float(np.max(np.abs(got.astype(np.float64) - predict(model, x))))


def _latencies(graphs: dict[str, Path], dataset: Dataset) -> dict[tuple[str, int], dict[str, float]]:
    out = {}
    for batch in LATENCY_BATCHES:
        feeds = {name: np.ascontiguousarray(arr[:batch]) for name, arr in dataset.test.inputs.items()}
        stock_feed = {STOCK_INPUT: deepctr_input(feeds, dataset.spec)}
        measured = measure_latencies({name: (path, stock_feed if name == STOCK else feeds)
                                      for name, path in graphs.items()})
        for name, figures in measured.items():
            out[(name, batch)] = figures
    return out


def _targets(rows: list[dict[str, Any]], oracle: dict[str, Any] | None) -> dict[str, Any]:
    """The study's acceptance criteria, evaluated on this run."""
    lean = {r["model"]: r for r in rows if r["graph"] == "lean"}
    targets: dict[str, Any] = {}
    deepfm = lean.get("deepfm")
    if deepfm and oracle and oracle["auc"] is not None and deepfm["auc"] is not None:
        gap = oracle["auc"] - deepfm["auc"]
        targets["deepfm_within_0.005_of_oracle"] = {"gap": round(gap, 6), "met": gap <= 0.005}
    for name in ("autoint", "dcnv2"):
        if deepfm and name in lean and lean[name]["auc"] is not None and deepfm["auc"] is not None:
            delta = lean[name]["auc"] - deepfm["auc"]
            targets[f"{name}_at_least_deepfm_minus_0.002"] = {"delta": round(delta, 6), "met": delta >= -0.002}
    if "logreg" in lean and len(lean) > 1 and lean["logreg"]["auc"] is not None:
        others = [r["auc"] for n, r in lean.items() if n not in ("logreg", GBDT) and r["auc"] is not None]
        targets["logreg_below_all_deep_models"] = {"met": all(lean["logreg"]["auc"] < a for a in others)}
    if deepfm and GBDT in lean and lean[GBDT]["auc"] is not None and deepfm["auc"] is not None:
        delta = deepfm["auc"] - lean[GBDT]["auc"]
        targets["deepfm_above_lightgbm"] = {"delta": round(delta, 6), "met": delta > 0}
    stock = next((r for r in rows if r["graph"] == "stock"), None)
    if deepfm and stock:
        ratio = deepfm["latency_1_us"] / stock["latency_1_us"]
        targets["lean_deepfm_single_row_at_most_half_of_stock"] = {"ratio": round(ratio, 3), "met": ratio <= 0.5}
    return targets


def render_markdown(results: dict[str, Any]) -> str:
    data = results["data"]
    lines = [
        "# Model comparison",
        "",
        data_line(data),
        "",
    ]
    if results["oracle"]:
        lines += [f"Oracle (true pCTR) on test: AUC {results['oracle']['test_auc']:.4f}, "
                  f"log loss {results['oracle']['test_logloss']:.5f}.", ""]
    ref = results.get("reference")
    if ref:
        lines += [f"Reference, not served: logistic regression on the same hashed features plus the generator's "
                  f"crosses ({', '.join(ref['crosses'])}), L2 picked on "
                  f"validation (C = {ref['C']}): test AUC {_num(ref['test']['auc'], 4)}, log loss "
                  f"{_num(ref['test']['logloss'], 5)}, {ref['parameters']:,} non-zero weights.", ""]
    lines += [
        "| model | graph | test AUC | test log loss | calibration | parameters | ONNX MB | train s | 1 row µs "
        "| 9 rows µs | 64 rows µs | parity max abs diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        lines.append(f"| {r['model']} | {r['graph']} | {_num(r['auc'], 4)} | {_num(r['logloss'], 5)} | "
                     f"{_num(r['calibration'], 3)} | {r['parameters']:,} | {r['onnx_bytes'] / 1e6:.2f} | "
                     f"{r['train_seconds']:.1f} | {r['latency_1_us']:.1f} | {r['latency_b9_us']:.1f} | "
                     f"{r['latency_64_us']:.1f} | {r['parity_max_abs_diff']:.2g} |")
    lines += ["", "Log loss and calibration are the served (calibrated) model's, except the stock graph's (uncalibrated). "
              "Calibration: mean test prediction / mean true pCTR on synthetic data (the test CTR otherwise). "
              "Parameters: LightGBM's are its trees. Latency: median of 3000 calls per graph, ONNX Runtime on one "
              "thread with IO binding, graphs measured in turns within the same run.", ""]
    return "\n".join(lines + target_lines(results["targets"]))


def data_line(data: dict[str, Any]) -> str:
    """The report line naming the data and its split."""
    return (f"Data: `{data['path']}` ({data['source']}, {data['split']} split; rows train {data['rows']['train']}, "
            f"val {data['rows']['val']}, test {data['rows']['test']}).")


def target_lines(targets: dict[str, dict[str, Any]]) -> list[str]:
    """A report's "Targets" section: each target met or NOT met, with its figures."""
    if not targets:
        return []
    lines = ["## Targets", ""]
    for name, verdict in targets.items():
        detail = ", ".join(f"{k} {v}" for k, v in verdict.items() if k != "met")
        lines.append(f"- {name}: {'met' if verdict['met'] else 'NOT met'}{f' ({detail})' if detail else ''}")
    return lines + [""]


def _num(x: float | None, digits: int) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    lean = [r for r in rows if r["graph"] == "lean"]
    fig, (ax_auc, ax_lat) = plt.subplots(1, 2, figsize=(14, 4.5))
    names = [r["model"] for r in lean]
    aucs = [r["auc"] or 0.0 for r in lean]
    ax_auc.bar(names, aucs, color="#4c72b0")
    if results["oracle"]:
        ax_auc.axhline(results["oracle"]["test_auc"], color="#c44e52", linestyle="--", label="oracle (true pCTR)")
    ref = results.get("reference")
    if ref and ref["test"]["auc"] is not None:
        ax_auc.axhline(ref["test"]["auc"], color="#55a868", linestyle=":", label="logistic regression + true crosses")
    if results["oracle"] or ref:
        ax_auc.legend(loc="lower right")
    low = min(aucs + ([results["oracle"]["test_auc"]] if results["oracle"] else []))
    ax_auc.set_ylim(max(0.5, low - 0.03), None)
    ax_auc.set_ylabel("test AUC")
    ax_auc.set_title("Accuracy")
    labels = [r["model"].replace(" (stock deepctr graph)", "\n(stock)") for r in rows]
    x = np.arange(len(rows))
    ax_lat.bar(x - 0.27, [r["latency_1_us"] for r in rows], width=0.27, label="1 row")
    ax_lat.bar(x, [r["latency_b9_us"] for r in rows], width=0.27, label="9 rows")
    ax_lat.bar(x + 0.27, [r["latency_64_us"] for r in rows], width=0.27, label="64 rows")
    ax_lat.set_xticks(x, labels, fontsize=8)
    ax_lat.set_ylabel("µs per call (median, 1 thread, IO binding)")
    ax_lat.set_title("Serving latency")
    ax_lat.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

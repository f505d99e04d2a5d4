"""The calibration study: seeds × sizes of synthetic data, the served model's calibration judged against the truth.

For every (rows, seed) the synthetic logs of ``train synth --rows ROWS --seed SEED`` are read (generated once
under ``DATA_ROOT/synth-ROWS-SEED``), DeepFM is trained as ``train fit`` trains it, and its test predictions are
compared with ``pctr_true`` on the same rows three ways: raw (uncalibrated), Platt by maximum likelihood on the
validation split (the map shipped before: its ±1/√clicks noise is what this study is about), and the calibration
``train fit`` now exports (``train/calibrate.py``: the level from the training rows, then level and scale on the
validation rows with that as prior, kept when its posterior says the map moved). The same candidate map under the
other keep rules (``KEEP_RULES``: validation log loss on held-out halves or folds, the posterior's level interval,
always) is scored beside it, and per split what the clicks say about the level against what the truth says.
Each is scored by mean prediction / mean ``pctr_true``, ECE against ``pctr_true`` and test log loss (against
``pctr_true`` and the test clicks); the target is the issue's (within 3 % of the truth at 1M rows, within
2/√(training clicks) below; never worse than raw on held-out log loss).
Every run's raw predictions, labels and ``pctr_true`` per split are saved under ``OUT/predictions/`` (``ROWS-SEED.npz``)
so that ``rescore`` (``train calibration-study --from-predictions OUT``) scores changed calibration code on the same
models without training them again. Results go to ``calibration.md``, ``calibration.json`` and
``calibration.png``.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bidder.spec import default_spec
from train.calibrate import (KEEP_COVERAGE, apply, calibration_report, choose_by_folds, choose_by_posterior, choose_for_serving,
                             fit_platt, keep_always, log_loss, truth_summary)
from train.data.dataset import TRAIN_LOG, load_dataset
from train.errors import TrainError
from train.evaluate import predict
from train.models import deepctr_input
from train.trainer import train_model

__all__ = ["KEEP_RULES", "ROWS", "SEEDS", "calibration_study", "predictions_path", "render_markdown", "rescore"]

ROWS = (200_000, 400_000, 1_000_000)
SEEDS = (2013, 2014, 2015)
MODEL = "deepfm"
STRICT_ROWS = 1_000_000  # from this size on the target is 3 %, below it the training clicks' own noise
STRICT_TOLERANCE = 0.03
VARIANTS = ("raw", "platt on val", "served")
PREDICTIONS = "predictions"  # under the study's --out: one npz per run (raw predictions, labels, pctr_true per split)
# the keep rules compared on every run (the served one is ``choose_for_serving``); each takes (train, train labels,
# val, val labels) predictions and returns a ``Choice``
KEEP_RULES = {
    "halves": lambda *rows: choose_by_folds(*rows, folds=2),
    "5 folds": lambda *rows: choose_by_folds(*rows, folds=5),
    "posterior level 90 %": lambda *rows: choose_by_posterior(*rows, coverage=0.90, judge="level"),
    "posterior map 90 %": lambda *rows: choose_by_posterior(*rows, coverage=0.90, judge="map"),
    "always": keep_always,
}


def calibration_study(out_dir: str | Path, *, rows: tuple[int, ...] = ROWS, seeds: tuple[int, ...] = SEEDS,
                      data_root: str | Path | None = None, epochs: int | None = None, threads: int = 1,
                      progress: bool = True) -> dict[str, Any]:
    """Run every (rows, seed) pair; write the report files to ``out_dir`` and return the results."""
    if not rows or not seeds or any(r < 1000 for r in rows) or any(s < 0 for s in seeds):
        raise TrainError(f"calibration study: expected row counts of at least 1000 and non-negative seeds, got rows "
                         f"{list(rows)} and seeds {list(seeds)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(data_root) if data_root is not None else out / "data"
    runs = []
    pairs = [(n, s) for n in rows for s in seeds]
    for n, seed in tqdm(pairs, desc="calibration study", unit="run", disable=not progress):
        runs.append(_run(_synthetic(root, n, seed), n, seed, epochs, threads, progress,
                         predictions_path(out, n, seed)))
        _write(out, runs)  # a long study leaves its finished runs behind if stopped
    return _write(out, runs)


def rescore(predictions_dir: str | Path, out_dir: str | Path, *, rows: tuple[int, ...] = ROWS,
            seeds: tuple[int, ...] = SEEDS, progress: bool = True) -> dict[str, Any]:
    """The study's report from the predictions an earlier study saved (``predictions_dir`` is its --out), without
    training: the current calibration code and keep rules on the same models."""
    source = Path(predictions_dir)
    paths = [predictions_path(source, n, seed) for n in rows for seed in seeds]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise TrainError(f"calibration study: no saved predictions for {len(missing)} of {len(paths)} runs (first: "
                         f"{missing[0]}); run the study with --out {source} and the same --rows/--seeds first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for path in tqdm(paths, desc="calibration re-score", unit="run", disable=not progress):
        with np.load(path) as saved:
            runs.append(_score(dict(saved)))
    return _write(out, runs)


def _synthetic(root: Path, rows: int, seed: int) -> Path:
    """``root/synth-ROWS-SEED``, generated (into a temporary name, then renamed) unless it is there already."""
    from train.data.synthetic import generate

    folder = root / f"synth-{rows}-{seed}"
    if not (folder / TRAIN_LOG).is_file():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        generate(partial, rows=rows, seed=seed)
        partial.rename(folder)
    return folder


def _run(folder: Path, rows: int, seed: int, epochs: int | None, threads: int, progress: bool,
         saved: Path) -> dict[str, Any]:
    """Train DeepFM on ``folder``, save its raw predictions per split to ``saved`` and score them."""
    dataset = load_dataset(folder, default_spec(), seed=0, progress=progress)
    if dataset.test.pctr_true is None:
        raise TrainError(f"{folder}: no pctr_true column; the study needs synthetic logs")
    trained = train_model(dataset, MODEL, epochs=epochs, seed=0, progress=progress, threads=threads)
    arrays: dict[str, np.ndarray] = {"rows": np.array(rows), "seed": np.array(seed),
                                     "best_epoch": np.array(trained.best_epoch),
                                     "test_auc": np.array(trained.metrics["test"]["auc"])}
    for name, part in (("train", dataset.train), ("val", dataset.val), ("test", dataset.test)):
        arrays[f"{name}_prob"] = predict(trained.model, deepctr_input(part.inputs, dataset.spec))
        arrays[f"{name}_label"] = np.asarray(part.labels, dtype=np.float32)
        arrays[f"{name}_pctr_true"] = np.asarray(part.pctr_true, dtype=np.float32)
    saved.parent.mkdir(parents=True, exist_ok=True)
    partial = saved.with_name(saved.name + ".partial.npz")
    np.savez_compressed(partial, **arrays)
    partial.rename(saved)
    return _score(arrays)


def predictions_path(out: Path, rows: int, seed: int) -> Path:
    """Where the study keeps one run's raw predictions, labels and ``pctr_true`` per split."""
    return out / PREDICTIONS / f"{rows}-{seed}.npz"


def _score(saved: dict[str, np.ndarray]) -> dict[str, Any]:
    """One run's figures from its saved predictions: the served map, the other keep rules, Platt on the validation
    split alone and raw, each scored on test against ``pctr_true`` and the test clicks."""
    train, val, test = (saved[f"{name}_prob"] for name in ("train", "val", "test"))
    train_labels, val_labels, test_labels = (saved[f"{name}_label"] for name in ("train", "val", "test"))
    truth = saved["test_pctr_true"]
    rows = int(saved["rows"])
    on_val = fit_platt(val, val_labels, fit_scale=True, prior_sd=math.inf).calibration
    choice = choose_for_serving(train, train_labels, val, val_labels)
    entry = calibration_report(choice, test, test_labels, truth)
    rules = {name: rule(train, train_labels, val, val_labels) for name, rule in KEEP_RULES.items()}
    variants = {"raw": test, "platt on val": apply(test, on_val), "served": apply(test, choice.calibration)}
    clicks = int(train_labels.sum())
    return {
        "rows": rows, "seed": int(saved["seed"]), "train_clicks": clicks, "val_clicks": int(val_labels.sum()),
        "test_clicks": int(test_labels.sum()), "best_epoch": int(saved["best_epoch"]),
        "test_auc": float(saved["test_auc"]),
        "tolerance": _tolerance(rows, clicks),
        "platt_on_val": {"scale": round(on_val.scale, 4), "shift": round(on_val.shift, 4)},
        "served": {k: entry[k] for k in ("scale", "shift", "kept", "fitted_on", "judged_on", "candidate",
                                         "held_out_logloss", "val_mean_factor",
                                         "identity_distance2")},
        "test": {name: _test_figures(p, test_labels, truth) for name, p in variants.items()},
        "rules": {name: {"kept": c.kept, **_test_figures(apply(test, c.calibration), test_labels, truth)}
                  for name, c in rules.items()},
        "reach": _reach(saved),
    }


def _tolerance(rows: int, train_clicks: float) -> float:
    """The issue's target on mean prediction / mean truth: 3 % from ``STRICT_ROWS`` on, the training clicks' own
    noise (2/√clicks) below."""
    return STRICT_TOLERANCE if rows >= STRICT_ROWS else round(2 / math.sqrt(train_clicks), 4)


def _reach(saved: dict[str, np.ndarray]) -> dict[str, Any]:
    """What the clicks could tell: the factor on the mean prediction the test rows need (from ``pctr_true``), the
    factors that would put the run within its tolerance, and per split the factor its clicks say (clicks / summed prediction, with the 95 % interval of their Poisson noise) and
    the one its truth says (what that split's clicks would say with no noise)."""
    test = saved["test_prob"].astype(np.float64)
    needed = float(saved["test_pctr_true"].mean() / test.mean())
    tolerance = _tolerance(int(saved["rows"]), float(saved["train_label"].sum()))
    reach: dict[str, Any] = {"needed_on_test": round(needed, 4),
                             "within_tolerance": [round(needed * (1 - tolerance), 4), round(needed * (1 + tolerance), 4)]}
    for name in ("train", "val"):
        probs = saved[f"{name}_prob"].astype(np.float64)
        clicks = float(saved[f"{name}_label"].sum())
        factor = clicks / probs.sum()
        half = 1.959964 / math.sqrt(max(clicks, 1.0))
        reach[name] = {"clicks_factor": round(factor, 4),
                       "clicks_factor_95": [round(factor * math.exp(-half), 4), round(factor * math.exp(half), 4)],
                       "truth_factor": round(float(saved[f"{name}_pctr_true"].mean() / probs.mean()), 4)}
    return reach


def _test_figures(probs: np.ndarray, labels: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    return {**truth_summary(probs, truth), "logloss": round(log_loss(probs, labels), 6)}


def _verdicts(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The targets, per run: served mean within tolerance of the truth, and test log loss not above raw."""
    within = [abs(r["test"]["served"]["mean_over_true"] - 1) <= r["tolerance"] for r in runs]
    held_out = [r["served"]["held_out_logloss"]["calibrated"] <= r["served"]["held_out_logloss"]["raw"]
                or not r["served"]["kept"] for r in runs]
    truth = [r["test"]["served"]["logloss_true"] <= r["test"]["raw"]["logloss_true"] for r in runs]
    clicks = [r["test"]["served"]["logloss"] <= r["test"]["raw"]["logloss"] for r in runs]
    return {"served_mean_within_tolerance": {"met": all(within), "runs": f"{sum(within)}/{len(runs)}"},
            "served_val_logloss_not_above_raw": {"met": all(held_out), "runs": f"{sum(held_out)}/{len(runs)}"},
            "served_test_logloss_against_truth_not_above_raw": {"met": all(truth), "runs": f"{sum(truth)}/{len(runs)}"},
            "served_test_logloss_against_clicks_not_above_raw": {"met": all(clicks),
                                                                 "runs": f"{sum(clicks)}/{len(runs)}"}}


def _rule_verdicts(runs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Per keep rule: runs within tolerance, and runs whose test log loss (against pctr_true, against the test
    clicks) is not above raw's."""
    names = list(runs[0]["rules"]) if runs else []

    def count(name: str, test) -> str:
        return f"{sum(bool(test(r, r['rules'][name])) for r in runs)}/{len(runs)}"

    return {name: {"within": count(name, lambda r, c: abs(c["mean_over_true"] - 1) <= r["tolerance"]),
                   "truth": count(name, lambda r, c: c["logloss_true"] <= r["test"]["raw"]["logloss_true"]),
                   "clicks": count(name, lambda r, c: c["logloss"] <= r["test"]["raw"]["logloss"])}
            for name in names}


def _write(out: Path, runs: list[dict[str, Any]]) -> dict[str, Any]:
    results = {"model": MODEL, "runs": runs, "targets": _verdicts(runs), "rules": _rule_verdicts(runs)}
    (out / "calibration.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "calibration.md").write_text(render_markdown(results))
    _plot(results, out / "calibration.png")
    return results


def render_markdown(results: dict[str, Any]) -> str:
    lines = ["# Calibration study", "",
             f"{results['model']}; the served calibration is Platt in two Bayesian steps: the level from the training "
             "rows, then level and scale on the validation rows with that as prior, kept when the identity lies "
             "outside the posterior's 90 % credible region of (scale, shift). Per run: test mean "
             "prediction / mean pctr_true (ECE against pctr_true; test log loss against pctr_true, i.e. without the "
             "clicks' noise) for the raw model, Platt fitted on the validation split alone, and the served "
             "calibration; tolerance = 3 % at 1M rows, 2/√(training clicks) below.", "",
             "| rows | seed | train / val clicks | raw | platt on val | served | kept (identity's d², kept above "
             f"{-2 * math.log(1 - KEEP_COVERAGE):.2f}) | candidate's 90 % mean factor (val) | tolerance |",
             "|---:|---:|---:|---|---|---|---|---|---:|"]
    for r in results["runs"]:
        cells = [f"{r['test'][v]['mean_over_true']:.3f} ({r['test'][v]['ece_true']:.5f}, {r['test'][v]['logloss_true']:.6f})"
                 for v in VARIANTS]
        factor = r["served"]["val_mean_factor"]["interval"]
        lines.append(f"| {r['rows']:,} | {r['seed']} | {r['train_clicks']:,} / {r['val_clicks']:,} | {' | '.join(cells)} "
                     f"| {'yes' if r['served']['kept'] else 'no'} ({r['served']['identity_distance2']:.1f}) "
                     f"| {factor[0]:.3f}–{factor[1]:.3f} "
                     f"| ±{r['tolerance'] * 100:.1f} % |")
    lines += ["", "## Keep rules", "",
              "The same candidate map (`fit_level`) under each keep rule: halves and 5 folds keep it when the "
              "validation log loss of rows it was not fitted on falls; posterior level keeps it when the 90 % "
              "posterior interval of its factor on the mean validation prediction excludes 1, posterior map (served) "
              "when the identity lies outside the 90 % posterior credible region of (scale, shift); always keeps it. Per run and "
              "rule: kept (y/n), test mean / true mean (✓ within tolerance), ECE against pctr_true, log loss "
              "against pctr_true and against the test clicks, each as a difference from raw (×10⁻⁶; negative is "
              "better).", "",
              "| rows | seed | " + " | ".join(_rule_names(results)) + " |",
              "|---:|---:|" + "---|" * len(_rule_names(results))]
    for r in results["runs"]:
        raw = r["test"]["raw"]
        cells = []
        for name in _rule_names(results):
            rule = r["rules"][name]
            within = "✓" if abs(rule["mean_over_true"] - 1) <= r["tolerance"] else "✗"
            cells.append(f"{'y' if rule['kept'] else 'n'} {rule['mean_over_true']:.3f}{within} "
                         f"{rule['ece_true']:.5f} {_micro(rule['logloss_true'] - raw['logloss_true'])} "
                         f"{_micro(rule['logloss'] - raw['logloss'])}")
        lines.append(f"| {r['rows']:,} | {r['seed']} | {' | '.join(cells)} |")
    lines += ["", "| rule | within tolerance | test log loss vs pctr_true not above raw | vs test clicks not above raw |",
              "|---|---:|---:|---:|"]
    for name in _rule_names(results):
        verdict = results["rules"][name]
        lines.append(f"| {name} | {verdict['within']} | {verdict['truth']} | {verdict['clicks']} |")
    lines += ["", "## What the clicks can tell", "",
              "The factor on the mean prediction the test rows need (mean pctr_true / mean raw prediction), the "
              "factors that would put the run within its tolerance, and per split the factor its clicks say (clicks / summed raw prediction, 95 % Poisson interval) and its "
              "truth says (mean pctr_true / mean raw prediction: the clicks' factor without their noise).", "",
              "| rows | seed | needed on test | within tolerance | train clicks (95 %) | train truth | val clicks (95 %) "
              "| val truth |",
              "|---:|---:|---:|---|---|---:|---|---:|"]
    for r in results["runs"]:
        reach = r["reach"]
        split = [f"{reach[n]['clicks_factor']:.3f} ({reach[n]['clicks_factor_95'][0]:.3f}–"
                 f"{reach[n]['clicks_factor_95'][1]:.3f}) | {reach[n]['truth_factor']:.3f}" for n in ("train", "val")]
        band = reach["within_tolerance"]
        lines.append(f"| {r['rows']:,} | {r['seed']} | {reach['needed_on_test']:.3f} | {band[0]:.3f}–{band[1]:.3f} "
                     f"| {' | '.join(split)} |")
    lines += ["", "## Targets", ""]
    for name, verdict in results["targets"].items():
        lines.append(f"- {name}: {'met' if verdict['met'] else 'NOT met'} ({verdict['runs']} runs)")
    return "\n".join(lines + [""])


def _rule_names(results: dict[str, Any]) -> list[str]:
    return list(results["runs"][0]["rules"]) if results["runs"] else []


def _micro(difference: float) -> str:
    return f"{difference * 1e6:+.0f}"


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    sizes = sorted({r["rows"] for r in runs})
    fig, (ax_mean, ax_ece, ax_rules) = plt.subplots(1, 3, figsize=(18, 4.8))
    colors = {"raw": "#8c8c8c", "platt on val": "#c44e52", "served": "#4c72b0"}
    for i, variant in enumerate(VARIANTS):
        for r in runs:
            x = sizes.index(r["rows"]) + (i - 1) * 0.22
            ax_mean.scatter(x, r["test"][variant]["mean_over_true"], color=colors[variant], s=22,
                            label=variant if r is runs[0] else None)
            ax_ece.scatter(x, r["test"][variant]["ece_true"], color=colors[variant], s=22,
                           label=variant if r is runs[0] else None)
    for k, n in enumerate(sizes):
        tol = max(r["tolerance"] for r in runs if r["rows"] == n)
        ax_mean.fill_between([k - 0.4, k + 0.4], 1 - tol, 1 + tol, color="#55a868", alpha=0.15, lw=0)
    ax_mean.axhline(1.0, color="black", lw=0.8)
    for ax, title, label in ((ax_mean, "Mean prediction / mean true pCTR (test)", "ratio (band: tolerance)"),
                             (ax_ece, "ECE against true pCTR (test)", "ECE")):
        ax.set_xticks(range(len(sizes)), [f"{n:,} rows" for n in sizes])
        ax.set_title(title)
        ax.set_ylabel(label)
        ax.legend()
    names = _rule_names(results)
    markers = "osD^vP*X"
    for i, name in enumerate(names):
        offset = (i - (len(names) - 1) / 2) * 0.13
        ax_rules.scatter([k + offset for k in range(len(runs))],
                         [abs(r["rules"][name]["mean_over_true"] - 1) / r["tolerance"] for r in runs],
                         marker=markers[i % len(markers)], s=24, label=name)
    ax_rules.axhline(1.0, color="#55a868", lw=1.2)
    ax_rules.set_xticks(range(len(runs)), [f"{r['rows'] // 1000}k/{r['seed']}" for r in runs], rotation=45)
    ax_rules.set_title("Keep rules: |mean / true − 1| / tolerance (test; ≤ 1 within)")
    ax_rules.set_ylabel("share of the tolerance")
    ax_rules.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

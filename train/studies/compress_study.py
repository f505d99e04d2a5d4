"""The compression study: every ``train/compress.py`` method on DeepFM and AutoInt, in one table.

Each source model is trained here (or taken from ``--bundle``); every method, and the combinations
that make sense (a pruned or distilled model with int8 tables or int8 DNN, pruned heads with int8
tables), writes its bundle under ``OUT/<source>/<variant>/``. All of them are scored on the same test
rows: AUC, log loss and the paired AUC delta against their source with a bootstrap 95 % interval.
Latency is measured as the bidder serves (one thread, IO binding) at 1, 9 and 64 rows, every graph
taking turns in the same run. Results go to ``compress.md``, ``compress.json`` and ``compress.png``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from train.bundle import MODEL_FILE, read_bundle
from train.studies.compare import data_line, target_lines
from train.compress import check_method, compress_bundle, onnx_probabilities
from train.data.dataset import Dataset
from train.errors import TrainError
from train.evaluate import binary_metrics, paired_auc_delta
from train.fit import report_skipped, resolve_spec, save_bundle
from train.studies.latency import measure_latencies
from train.trainer import train_model

__all__ = ["LATENCY_BATCHES", "compress_study", "render_markdown"]

LATENCY_BATCHES = (1, 9, 64)
SOURCES = ("deepfm", "autoint")

#: per source architecture: (variant name, method, settings, variant it starts from or None for the source)
PLAN: dict[str, list[tuple[str, str, dict[str, str], str | None]]] = {
    "deepfm": [
        ("int8-dynamic", "int8-dynamic", {}, None),
        ("int8-dynamic (+tables)", "int8-dynamic", {"ops": "all"}, None),
        ("int8 tables", "int8-dynamic", {"ops": "tables"}, None),
        ("int8-static qdq", "int8-static", {"format": "qdq"}, None),
        ("int8-static qoperator", "int8-static", {"format": "qoperator"}, None),
        ("int8-embeddings", "int8-embeddings", {}, None),
        ("fp16-embeddings", "int8-embeddings", {"dtype": "fp16"}, None),
        ("prune", "prune", {}, None),
        ("prune + int8-embeddings", "int8-embeddings", {}, "prune"),
        ("prune + int8 tables", "int8-dynamic", {"ops": "tables"}, "prune"),
        ("distill 64,32", "distill", {}, None),
        ("labels-only 64,32", "distill", {"label_weight": "1"}, None),
        ("distill fm", "distill", {"student": "fm"}, None),
        ("labels-only fm", "distill", {"student": "fm", "label_weight": "1"}, None),
        ("distill 64,32 + int8-embeddings", "int8-embeddings", {}, "distill 64,32"),
        ("distill 64,32 + int8-embeddings + int8-dynamic", "int8-dynamic", {}, "distill 64,32 + int8-embeddings"),
        ("distill 64,32 + int8 tables", "int8-dynamic", {"ops": "tables"}, "distill 64,32"),
    ],
    "autoint": [
        ("int8-dynamic", "int8-dynamic", {}, None),
        ("int8-static qdq", "int8-static", {"format": "qdq"}, None),
        ("int8-embeddings", "int8-embeddings", {}, None),
        ("prune", "prune", {}, None),
        ("heads", "heads", {}, None),
        ("heads + int8-embeddings", "int8-embeddings", {}, "heads"),
        ("heads + int8 tables", "int8-dynamic", {"ops": "tables"}, "heads"),
        ("distill 64,32", "distill", {}, None),
    ],
}


def compress_study(data_dir: str | Path, out_dir: str | Path, *, bundles: list[str] | None = None,
                   models: tuple[str, ...] = SOURCES, epochs: int | None = None, seed: int = 0, progress: bool = True,
                   threads: int = 1, only: list[str] | None = None) -> dict[str, Any]:
    """Run the study on ``models`` (a subset of ``SOURCES``) and write its report files to ``out_dir``.

    ``only`` names the variants to run (with the variants they start from); None runs the whole plan."""
    from train.data.dataset import load_dataset

    unknown = [m for m in models if m not in SOURCES]
    if unknown or not models:
        raise TrainError(f"--models: unknown model(s) {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(SOURCES)}")
    plan = {source: select_variants(source, only) for source in models}
    out = Path(out_dir)
    given: dict[str, Path] = {}
    for path in bundles or []:
        meta, _ = read_bundle(path)
        if meta.get("architecture") not in SOURCES:
            raise TrainError(f"--bundle {path}: the study compresses {' and '.join(SOURCES)}, "
                             f"this bundle is {meta.get('architecture')!r}")
        if meta["architecture"] not in models:
            raise TrainError(f"--bundle {path}: a {meta['architecture']} bundle, but --models leaves it out")
        given[meta["architecture"]] = Path(path)
    specs = {read_bundle(p)[1].digest for p in given.values()}
    if len(specs) > 1:
        raise TrainError("--bundle: the bundles were trained with different feature specs")
    spec = read_bundle(next(iter(given.values())))[1] if given else resolve_spec(None)
    out.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(data_dir, spec, seed=seed, progress=progress)
    report_skipped(dataset)

    variants: dict[tuple[str, str], Path] = {}
    details: dict[tuple[str, str], dict[str, Any]] = {}
    for source in models:
        if source in given:
            src = given[source]
        else:
            trained = train_model(dataset, source, epochs=epochs, seed=seed, progress=progress, threads=threads)
            src = save_bundle(trained, dataset, out / source / "source")
        variants[(source, "fp32 (source)")] = src
        steps = plan[source]
        for name, method, settings, start in tqdm(steps, desc=f"compressing {source}", disable=not progress):
            target = out / source / _folder(name)
            origin = variants[(source, start)] if start else src
            entry = _reusable(target, origin, method, settings)
            if entry is None:
                if target.exists():
                    shutil.rmtree(target)
                entry = compress_bundle(origin, method, target, data=dataset, settings=settings, seed=seed,
                                        progress=progress, threads=threads)
            variants[(source, name)] = target
            details[(source, name)] = {"method": method, "settings": entry["settings"], "from": start or "source",
                                       "details": entry.get("details")}

    rows = _score(variants, details, dataset, out)
    latency = _latencies(variants, dataset)
    for row in rows:
        for batch in LATENCY_BATCHES:
            row[f"latency_{batch}_us"] = latency[(row["source"], row["variant"], batch)]["median_us"]
        base = next(r for r in rows if r["source"] == row["source"] and r["variant"] == "fp32 (source)")
        row["latency_9_ratio"] = round(row["latency_9_us"] / base["latency_9_us"], 3)
    results = {
        "data": {"path": dataset.path, "source": dataset.source, "digest": dataset.digest, "rows": dataset.rows(),
                 "split": dataset.split},
        "rows": rows,
        "targets": _targets(rows),
    }
    (out / "compress.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "compress.md").write_text(render_markdown(results))
    _plot(results, out / "compress.png")
    return results


def select_variants(source: str, only: list[str] | None) -> list[tuple[str, str, dict[str, str], str | None]]:
    """``source``'s plan steps: all, or those ``only`` names plus the steps they start from (in plan order)."""
    steps = PLAN[source]
    if only is None:
        return steps
    known = {name for s in PLAN.values() for name, *_ in s}
    unknown = [name for name in only if name not in known]
    if unknown:
        raise TrainError(f"--variant {unknown[0]!r}: not a variant of the study; choose from {', '.join(sorted(known))}")
    by_name = {step[0]: step for step in steps}
    wanted: set[str] = set()
    for name in only:
        while name in by_name and name not in wanted:
            wanted.add(name)
            name = by_name[name][3]
    return [step for step in steps if step[0] in wanted]


def _reusable(target: Path, origin: Path, method: str, settings: dict[str, str]) -> dict[str, Any] | None:
    """The ``compression`` entry of a variant an earlier run of the study already wrote from the same source
    with the same method and settings (a study interrupted half-way resumes instead of starting over)."""
    try:
        meta, _ = read_bundle(target)
        source_id = read_bundle(origin)[0].get("model_id")
    except TrainError:
        return None
    entry = meta.get("compression") or {}
    same = (entry.get("method") == method and entry.get("settings") == check_method(method, settings)
            and entry.get("source_model_id") == source_id)
    return entry if same else None


def _folder(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name.replace(" + ", "+"))


def _score(variants: dict[tuple[str, str], Path], details: dict[tuple[str, str], dict[str, Any]],
           dataset: Dataset, out: Path) -> list[dict[str, Any]]:
    test = dataset.test
    probabilities = {key: onnx_probabilities(path / MODEL_FILE, test.inputs) for key, path in variants.items()}
    rows = []
    for (source, name), path in variants.items():
        meta, _ = read_bundle(path)
        metrics = binary_metrics(test.labels, probabilities[(source, name)])
        base_key = (source, "fp32 (source)")
        paired = paired_auc_delta(test.labels, probabilities[base_key], probabilities[(source, name)], seed=1)
        base_bytes = variants[base_key].joinpath(MODEL_FILE).stat().st_size
        size = (path / MODEL_FILE).stat().st_size
        control = (source, name.replace("distill ", "labels-only ", 1))
        if name.startswith("distill ") and "+" not in name and control in variants:
            # the same student trained on the labels alone, on the same rows: does the teacher help?
            details[(source, name)]["vs_labels_only"] = paired_auc_delta(
                test.labels, probabilities[control], probabilities[(source, name)], seed=1)
        rows.append({"source": source, "variant": name, **details.get((source, name), {"method": None}),
                     "test_auc": metrics["auc"], "test_logloss": metrics["logloss"], "paired_auc_delta": paired,
                     "bytes": size, "size_ratio": round(size / base_bytes, 4),
                     "parameters": _onnx_parameters(path / MODEL_FILE),
                     "factorized_graphs": bool((meta.get("graphs") or {}).get("factorized")),
                     "bundle": _relative(path, out)})
    return rows


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:  # a --bundle from elsewhere
        return str(path)


def _onnx_parameters(path: Path) -> int:
    import onnx

    return int(sum(np.prod(t.dims) for t in onnx.load(str(path)).graph.initializer))


def _latencies(variants: dict[tuple[str, str], Path], dataset: Dataset) -> dict[tuple[str, str, int], dict[str, float]]:
    out = {}
    for batch in LATENCY_BATCHES:
        feeds = {name: np.ascontiguousarray(arr[:batch]) for name, arr in dataset.test.inputs.items()}
        measured = measure_latencies({f"{s}|{v}": (path / MODEL_FILE, feeds) for (s, v), path in variants.items()})
        for key, figures in measured.items():
            source, _, name = key.partition("|")
            out[(source, name, batch)] = figures
    return out


def _targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's acceptance criteria on this run."""
    targets: dict[str, Any] = {}
    deepfm = [r for r in rows if r["source"] == "deepfm" and r["variant"] != "fp32 (source)"]

    def accurate(r: dict[str, Any]) -> bool:
        p = r["paired_auc_delta"]
        return p["delta"] is not None and -p["delta"] < 0.002 and -p["low"] < 0.005

    winners = [r for r in deepfm if accurate(r) and r["size_ratio"] <= 0.30 and r["latency_9_ratio"] <= 0.8]
    # the best winner by AUC; without one, the smallest and fastest of the accurate enough variants
    best = deepfm and (max(winners, key=lambda r: r["paired_auc_delta"]["delta"]) if winners else
                       min(deepfm, key=lambda r: (not accurate(r), r["size_ratio"] + r["latency_9_ratio"])))
    if best:
        targets["deepfm_best_variant"] = {
            "variant": best["variant"], "size_ratio": best["size_ratio"], "latency_9_ratio": best["latency_9_ratio"],
            "paired_auc_delta": best["paired_auc_delta"]["delta"], "interval_low": best["paired_auc_delta"]["low"],
            "met": bool(winners), "variants_meeting_all": [r["variant"] for r in winners]}
    by_name = {(r["source"], r["variant"]): r for r in rows}
    for student in ("64,32", "fm"):
        taught, alone = by_name.get(("deepfm", f"distill {student}")), by_name.get(("deepfm", f"labels-only {student}"))
        if taught and alone:
            paired = taught["vs_labels_only"]
            targets[f"distilled_{student}_beats_labels_only"] = {
                "distilled_auc": taught["test_auc"], "labels_only_auc": alone["test_auc"],
                "paired_delta": paired["delta"], "interval": [paired["low"], paired["high"]],
                "met": paired["delta"] is not None and paired["delta"] > 0}
    heads = by_name.get(("autoint", "heads"))
    if heads:
        targets["autoint_heads"] = {
            "heads": (heads.get("details") or {}).get("heads"), "paired_auc_delta": heads["paired_auc_delta"]["delta"],
            "interval": [heads["paired_auc_delta"]["low"], heads["paired_auc_delta"]["high"]],
            "latency_1_ratio": round(heads["latency_1_us"] / by_name[("autoint", "fp32 (source)")]["latency_1_us"], 3),
            "latency_9_ratio": heads["latency_9_ratio"],
            "met": bool(heads.get("details")) and heads["details"]["heads"]["after"] < heads["details"]["heads"]["before"]}
    return targets


def render_markdown(results: dict[str, Any]) -> str:
    data = results["data"]
    lines = [
        "# Model compression",
        "",
        data_line(data),
        "",
        "| source | variant | test AUC | log loss | paired AUC delta [95 % CI] | MB | size | parameters "
        "| 1 row µs | 9 rows µs | 64 rows µs | B=9 vs fp32 | factorized |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results["rows"]:
        p = r["paired_auc_delta"]
        delta = "—" if r["variant"] == "fp32 (source)" else f"{p['delta']:+.4f} [{p['low']:+.4f}, {p['high']:+.4f}]"
        lines.append(
            f"| {r['source']} | {r['variant']} | {r['test_auc']:.4f} | {r['test_logloss']:.5f} | {delta} | "
            f"{r['bytes'] / 1e6:.2f} | {r['size_ratio']:.0%} | {r['parameters']:,} | {r['latency_1_us']:.1f} | "
            f"{r['latency_9_us']:.1f} | {r['latency_64_us']:.1f} | {r['latency_9_ratio']:.2f}x | "
            f"{'yes' if r['factorized_graphs'] else 'no'} |")
    lines += ["", "Paired AUC delta: variant minus its fp32 source on the same test rows, 95 % interval from 1000 "
              "paired bootstrap resamples. Size: model.onnx bytes against the source's. Latency: median per call, "
              "ONNX Runtime on one thread with IO binding, all graphs taking turns in one run. Parameters: "
              "numbers held by the graph's initializers.", ""]
    return "\n".join(lines + target_lines(results["targets"]))


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = [s for s in SOURCES if any(r["source"] == s for r in results["rows"])]
    fig, axes = plt.subplots(1, len(sources), figsize=(7 * len(sources), 5.5), squeeze=False)
    for ax, source in zip(axes[0], sources):
        rows = [r for r in results["rows"] if r["source"] == source]
        for r in rows:
            p = r["paired_auc_delta"]
            delta = 0.0 if r["variant"] == "fp32 (source)" else p["delta"]
            err = None if r["variant"] == "fp32 (source)" else [[delta - p["low"]], [p["high"] - delta]]
            ax.errorbar(r["latency_9_us"], delta, yerr=err, fmt="o", markersize=4 + 12 * r["size_ratio"], capsize=3,
                        alpha=0.8)
            ax.annotate(f"{r['variant']} ({r['size_ratio']:.0%})", (r["latency_9_us"], delta), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.axhline(-0.002, color="#c44e52", linestyle="--", linewidth=0.8, label="AUC drop 0.002")
        ax.set_xlabel("µs per call at 9 rows (median, 1 thread, IO binding)")
        ax.set_ylabel("paired test AUC delta vs fp32 source (95 % CI)")
        ax.set_title(f"{source}: accuracy vs latency (marker size ~ model size)")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

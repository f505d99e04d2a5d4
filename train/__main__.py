"""Command line: ``python -m train COMMAND ...``, COMMAND one of synth, fit, default, compare, factorize, twotower,
market, logs, speed, speed-ddp, compress, compress-study, calibration-study, bundle-upgrade.

Each command prints its results as JSON on stdout (progress bars and warnings go to stderr). Bad
input ends with a one-line ``error: ...`` naming the file, line, field or setting, and exit status 2;
a failed parity check exits with status 1.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from bidder.bundle import META_FILE, MODEL_FILE, SPEC_FILE, BundleError
from bidder.spec import SpecError
from train.errors import ParityError, TrainError
from train.models import ARCHITECTURES

DEFAULT_ROWS = 1_000_000
BUNDLE_FILES = (MODEL_FILE, SPEC_FILE, META_FILE)
DEFAULT_DATA_SEED = 2013
DEFAULT_BUNDLE_OUT = "runs/default"  # git-ignored


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    try:
        result = args.run(args)
    except ParityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (TrainError, SpecError, BundleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if result is not None:  # None: a torchrun process other than 0, which writes nothing
        print(json.dumps(result, indent=2))
    return 0


# -- commands ---------------------------------------------------------------------------------------------
def _synth(args: argparse.Namespace) -> dict[str, Any]:
    if args.creatives is None:
        return _generate(args.out, args.rows, args.seed)
    from train.data.market_catalog import generate_market

    try:
        return generate_market(args.out, rows=args.rows, seed=args.seed, creatives=args.creatives)
    except ValueError as exc:  # the generator's argument checks
        raise TrainError(f"--creatives: {exc}" if "creatives" in str(exc) else str(exc)) from None


def _generate(out: str | Path, rows: int, seed: int) -> dict[str, Any]:
    from train.data.synthetic import generate

    try:
        return generate(out, rows=rows, seed=seed)
    except ValueError as exc:  # the generator's argument checks
        raise TrainError(str(exc)) from None


def _fit(args: argparse.Namespace) -> dict[str, Any]:
    from train.fit import fit_bundle

    _check_out(args.out, args.force)
    bundle = fit_bundle(args.data, args.model, args.out, epochs=args.epochs, seed=args.seed,
                        progress=not args.quiet, skip_bad_lines=args.skip_bad_lines, spec=args.spec,
                        threads=args.threads, **_settings(args.set))
    return None if bundle is None else _bundle_summary(bundle)


#: the shipped teacher's settings where they differ from DeepFM's defaults: it was trained at batch 4096, which on
#: its 1M rows is within run-to-run noise of the default 2048 (train/models.py)
DEFAULT_TEACHER = {"batch_size": 4096}


def _default(args: argparse.Namespace) -> dict[str, Any]:
    """The shipped bundle: DeepFM on the synthetic logs, distilled into a smaller DeepFM whose tables are
    stored as 8-bit integers (``train.compress.DEFAULT_CHAIN``), then the win-price model on their bid log."""
    import bidder
    from train.bundle import install_bundle
    from train.compress import DEFAULT_CHAIN, compress_chain
    from train.data.dataset import load_dataset
    from train.fit import fit_bundle
    from train.market import market_bundle

    from train.trainer import check_training

    check_training("deepfm", args.epochs, {})  # before the data: a typo must not wait for generating it
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="synthetic-") as tmp:
        _generate(tmp, args.rows, args.data_seed)  # the impression logs and bids.log.txt
        label = f"synthetic: python -m train synth --rows {args.rows} --seed {args.data_seed}"
        dataset = load_dataset(tmp, bidder.default_spec(), seed=args.seed, progress=not args.quiet)
        teacher = fit_bundle(dataset, "deepfm", Path(tmp) / "teacher", epochs=args.epochs, seed=args.seed,
                             progress=not args.quiet, data_label=label, threads=args.threads, **DEFAULT_TEACHER)
        if teacher is None:  # a torchrun process other than 0: process 0 writes the bundle
            return None
        staged = Path(tmp) / "bundle"
        compression = compress_chain(teacher, DEFAULT_CHAIN, staged, data=dataset, seed=args.seed,
                                     progress=not args.quiet, threads=args.threads)
        market = market_bundle(tmp, staged, seed=args.seed, threads=args.threads, progress=not args.quiet,
                               data_label=label)
        bundle = install_bundle(staged, out)
    return {**_bundle_summary(bundle), "compression": {k: compression[k] for k in
                                                       ("method", "source_model_id", "size_ratio", "paired_test_auc")},
            "market": market}


def _compare(args: argparse.Namespace) -> dict[str, Any]:
    from train.gbdt import check_gbdt
    from train.studies.compare import GBDT, MODELS, compare, render_markdown
    from train.trainer import check_training

    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise TrainError(f"--models: unknown model(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(MODELS)}")
    per_model: dict[str, dict[str, str]] = {}
    for key, value in _settings(args.set).items():
        model, dot, name = key.partition(".")
        if not dot or model not in MODELS:
            raise TrainError(f"--set {key}=...: use MODEL.NAME=VALUE with MODEL one of {', '.join(MODELS)}")
        per_model.setdefault(model, {})[name] = value
    for model in models:  # before the data is read: a typo must not wait for featurizing
        if model == GBDT:
            check_gbdt(per_model.get(model))
        else:
            check_training(model, args.epochs, per_model.get(model))
    results = compare(args.data, args.out, models=models, epochs=args.epochs, seed=args.seed,
                      progress=not args.quiet, skip_bad_lines=args.skip_bad_lines, spec=args.spec,
                      hyperparameters=per_model, threads=args.threads, reference=not args.no_reference)
    print(render_markdown(results), file=sys.stderr)
    return results


def _factorize(args: argparse.Namespace) -> dict[str, Any]:
    from train.factorize import factorize_bundle

    return {"bundle": args.bundle, "factorized": factorize_bundle(args.bundle)}


def _twotower(args: argparse.Namespace) -> dict[str, Any]:
    from train.twotower import DEFAULTS, train_twotower

    settings = {name: getattr(args, name) for name in DEFAULTS if getattr(args, name) is not None}
    entry = train_twotower(args.data, args.bundle, campaigns=args.campaigns, seed=args.seed, threads=args.threads,
                           progress=not args.quiet, **settings)
    return {"bundle": args.bundle, "twotower": entry}


def _market(args: argparse.Namespace) -> dict[str, Any]:
    from train.market import market_bundle

    return {"bundle": args.bundle, "market": market_bundle(args.data, args.bundle, epochs=args.epochs, seed=args.seed,
                                                           threads=args.threads, progress=not args.quiet)}


def _logs(args: argparse.Namespace) -> dict[str, Any]:
    from train.logs import write_training_data

    return write_training_data(args.events, args.out, click_window=args.click_window, ips_clip=args.ips_clip,
                               progress=not args.quiet)


def _speed(args: argparse.Namespace) -> dict[str, Any]:
    from train.studies.speed import check_speed, measure_speed, render_table

    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    overrides = _settings(args.set)
    check_speed(models, rows=args.rows, epochs=args.epochs, repeats=args.repeats, threads=args.threads,
                overrides=overrides, deepctr_batch_size=args.deepctr_batch_size, deepctr_lr=args.deepctr_lr)
    out = Path(args.out) if args.out else None
    if out is not None and not out.parent.is_dir():  # before the data: a typo must not wait for the runs
        raise TrainError(f"--out {out}: folder {out.parent} does not exist")
    if out is not None and out.is_dir():
        raise TrainError(f"--out {out}: is a folder, expected a JSON file name")
    result = measure_speed(args.data, models=models, rows=args.rows, epochs=args.epochs, repeats=args.repeats,
                           threads=args.threads, seed=args.seed, profile=args.profile, progress=not args.quiet,
                           skip_bad_lines=args.skip_bad_lines, spec=args.spec, overrides=overrides,
                           deepctr_batch_size=args.deepctr_batch_size, deepctr_lr=args.deepctr_lr)
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(render_table(result), file=sys.stderr)
    return result


def _speed_ddp(args: argparse.Namespace) -> dict[str, Any]:
    from train.studies.speed import check_processes, measure_processes, render_processes

    try:
        processes = tuple(int(n) for n in args.processes.split(",") if n.strip())
    except ValueError:
        raise TrainError(f"--processes {args.processes!r}: expected comma-separated integers such as 1,2") from None
    overrides = _settings(args.set)
    transports = tuple(t.strip() for t in args.transports.split(",") if t.strip())
    check_processes(args.model, processes, repeats=args.repeats, epochs=args.epochs, overrides=overrides,
                    transports=transports)
    out = Path(args.out) if args.out else None
    if out is not None and (not out.parent.is_dir() or out.is_dir()):
        raise TrainError(f"--out {out}: expected a JSON file name in an existing folder")
    result = measure_processes(args.data, model=args.model, processes=processes, repeats=args.repeats,
                               epochs=args.epochs, overrides=overrides, seed=args.seed, transports=transports,
                               progress=not args.quiet)
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(render_processes(result), file=sys.stderr)
    return result


def _compress(args: argparse.Namespace) -> dict[str, Any]:
    from train.compress import check_method, compress_bundle

    settings = _settings(args.set)
    if args.epochs is not None:
        if args.method in ("int8-dynamic", "int8-static", "int8-embeddings"):
            raise TrainError(f"--epochs: {args.method} does not train")
        settings["epochs"] = str(args.epochs)
    check_method(args.method, settings, has_data=args.data is not None)  # before any bundle or data
    _check_out(args.out, args.force)
    if Path(args.out).resolve() == Path(args.bundle).resolve():
        raise TrainError(f"--out {args.out}: is the source bundle; write the compressed bundle elsewhere")
    entry = compress_bundle(args.bundle, args.method, args.out, data=args.data, settings=settings,
                            seed=args.seed, progress=not args.quiet, threads=args.threads)
    return {"bundle": args.out, "compression": entry}


def _bundle_upgrade(args: argparse.Namespace) -> dict[str, Any]:
    from bidder.bundle import upgrade

    return upgrade(args.bundle)


def _compress_study(args: argparse.Namespace) -> dict[str, Any]:
    from train.studies.compress_study import compress_study, render_markdown

    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    results = compress_study(args.data, args.out, bundles=args.bundle, models=models, epochs=args.epochs,
                             seed=args.seed, progress=not args.quiet, threads=args.threads, only=args.variant or None)
    print(render_markdown(results), file=sys.stderr)
    return results


def _calibration_study(args: argparse.Namespace) -> dict[str, Any]:
    from train.studies.calibration import calibration_study, render_markdown, rescore

    rows, seeds = _integers("--rows", args.rows), _integers("--seeds", args.seeds)
    if args.from_predictions:
        results = rescore(args.from_predictions, args.out, rows=rows, seeds=seeds, progress=not args.quiet)
    else:
        results = calibration_study(args.out, rows=rows, seeds=seeds, data_root=args.data_root, epochs=args.epochs,
                                    threads=args.threads, progress=not args.quiet)
    print(render_markdown(results), file=sys.stderr)
    return results


def _integers(option: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise TrainError(f"{option} {text!r}: expected comma-separated integers such as 200000,400000") from None


def _check_out(out: str, force: bool) -> None:
    existing = [name for name in BUNDLE_FILES if (Path(out) / name).exists()]
    if existing and not force:
        raise TrainError(f"--out {out} already holds a bundle ({', '.join(existing)}); pass --force to replace it")


def _bundle_summary(bundle: Path) -> dict[str, Any]:
    meta = json.loads((bundle / META_FILE).read_text())
    return {"bundle": str(bundle), "model_id": meta["model_id"], "metrics": meta["metrics"],
            "parity": meta["parity"], "training": meta.get("training", {})}


#: settings that have their own command-line option, not a ``--set`` name
_OWN_OPTIONS = {"epochs": "--epochs", "seed": "--seed", "threads": "--threads"}


def _settings(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        if not eq or not name:
            raise TrainError(f"--set {pair!r}: expected NAME=VALUE")
        option = _OWN_OPTIONS.get(name.strip().rpartition(".")[2])
        if option:
            raise TrainError(f"--set {pair!r}: use {option} instead")
        out[name.strip()] = value.strip()
    return out


# -- arguments --------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train", description="Train, export and compare CTR models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = commands.add_parser("synth", help="write synthetic iPinYou-style logs with the true pCTR")
    synth.add_argument("--rows", type=int, required=True, help="impressions in all (the latest 20%% are the test log)")
    synth.add_argument("--seed", type=int, default=DEFAULT_DATA_SEED)
    synth.add_argument("--out", required=True, help="folder for train.log.txt and test.log.txt")
    synth.add_argument("--creatives", type=int,
                       help="a large market of this many creatives (100 to 1,000,000, about 50 per campaign, two "
                            "campaigns per advertiser) with its campaigns.json in --out (default: the 9 iPinYou "
                            "advertisers' 34 creatives, no catalog written)")
    synth.set_defaults(run=_synth)

    fit = commands.add_parser("fit", help="train one model and write its bundle")
    fit.add_argument("--data", required=True, help="folder with train.log.txt (and test.log.txt)")
    fit.add_argument("--model", required=True, choices=ARCHITECTURES)
    fit.add_argument("--out", required=True,
                     help="bundle folder to write (refused when it already holds a bundle, unless --force)")
    fit.add_argument("--force", action="store_true", help="replace the bundle already in --out")
    _training_options(fit)
    fit.set_defaults(run=_fit)

    default = commands.add_parser("default", help="reproduce the bundle shipped in bidder/models/default")
    # Never the shipped bundle unless asked: a rerun must not silently replace the committed files.
    default.add_argument("--out", default=DEFAULT_BUNDLE_OUT,
                         help="bundle folder (default: %(default)s; --out bidder/models/default replaces the shipped one)")
    default.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    default.add_argument("--data-seed", type=int, default=DEFAULT_DATA_SEED)
    default.add_argument("--seed", type=int, default=0, help="training seed")
    default.add_argument("--epochs", type=int, help="maximum epochs (early stopping may end sooner)")
    default.add_argument("--threads", type=int, default=1, help="torch threads while training (default 1)")
    default.add_argument("--quiet", action="store_true", help="no progress bars")
    default.set_defaults(run=_default)

    from train.studies.compare import MODELS

    cmp = commands.add_parser("compare", help="train DeepFM, AutoInt, DCNv2, TabTransformer, logistic regression and "
                                              "LightGBM on the same rows; report")
    cmp.add_argument("--data", required=True, help="folder with train.log.txt (and test.log.txt)")
    cmp.add_argument("--out", default="compare", help="folder for the report and the bundles (default: compare)")
    cmp.add_argument("--models", default=",".join(MODELS),
                     help="comma-separated subset to train (default: %(default)s)")
    cmp.add_argument("--no-reference", action="store_true",
                     help="skip the reference fit (logistic regression with the generator's crosses, synthetic data)")
    _training_options(cmp, per_model=True)
    cmp.set_defaults(run=_compare)

    factorize = commands.add_parser(
        "factorize", help="add factorized scoring graphs (imp part once per imp, candidate part once per creative) "
                          "to an existing DeepFM bundle, checked against its model.onnx")
    factorize.add_argument("--bundle", required=True, help="bundle folder (model.onnx is left as it is)")
    factorize.set_defaults(run=_factorize)
    twotower = commands.add_parser(
        "twotower", help="train retrieval towers (imp tower, ad tower) distilled from a bundle's ranker and add "
                         "them to the bundle, checked against the trained towers")
    twotower.add_argument("--data", required=True,
                          help="folder with train.log.txt (and test.log.txt, for the parity rows) and campaigns.json")
    twotower.add_argument("--bundle", required=True, help="the ranker's bundle folder; the towers are written into it")
    twotower.add_argument("--campaigns", help="catalog the towers retrieve from (default: DATA/campaigns.json)")
    twotower.add_argument("--steps", type=int, help="training steps (default 1500)")
    twotower.add_argument("--batch", type=int, help="log rows (imps) per step; their creatives are in-batch "
                                                    "negatives (default 256)")
    twotower.add_argument("--uniform", type=int, help="creatives drawn uniformly from the catalog per step "
                                                      "(default 1024)")
    twotower.add_argument("--dim", type=int, help="tower output width before the bias / constant entry (default 32)")
    twotower.add_argument("--embedding-dim", type=int, help="embedding width per field (default 16)")
    twotower.add_argument("--hidden", type=int, help="hidden layer width of each tower (default 128)")
    twotower.add_argument("--lr", type=float, help="Adam learning rate (default 0.003)")
    twotower.add_argument("--seed", type=int, default=0, help="seed for initialisation and sampling")
    twotower.add_argument("--threads", type=int, default=1, help="torch and teacher threads (default 1)")
    twotower.add_argument("--quiet", action="store_true", help="no progress bars")
    twotower.set_defaults(run=_twotower)
    market = commands.add_parser(
        "market", help="learn P(win | bid, features) from a censored bid log (bids.log.txt) and add it to a bundle "
                       "as market.onnx (first-price bid shading)")
    market.add_argument("--data", required=True, help="folder with bids.log.txt (python -m train synth writes one)")
    market.add_argument("--bundle", required=True, help="bundle folder to add market.onnx to (its spec featurizes)")
    market.add_argument("--epochs", type=int, default=8, help="maximum epochs (early stopping may end sooner)")
    market.add_argument("--seed", type=int, default=0)
    market.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    market.add_argument("--quiet", action="store_true", help="no progress bars")
    market.set_defaults(run=_market)
    from train.logs import DEFAULT_CLICK_WINDOW_S

    logs = commands.add_parser(
        "logs", help="training data from the bidder's own event log (bidder serve --events DIR): train.log.txt "
                     "for train fit and bids.log.txt for train market (docs/events.md)")
    logs.add_argument("--events", required=True, help="the event log directory bidder serve --events wrote")
    logs.add_argument("--out", required=True, help="folder to write train.log.txt and bids.log.txt to")
    logs.add_argument("--click-window", type=float, default=DEFAULT_CLICK_WINDOW_S, metavar="SECONDS",
                      help="a click counts (label 1) when it arrives this long after its bid at most "
                           "(default %(default)s)")
    logs.add_argument("--ips-clip", type=float, metavar="MAX",
                      help="add a weight column, 1 / the bid's propensity at most MAX, that train fit weighs each "
                           "row's loss by (inverse propensity scoring; default: no weights)")
    logs.add_argument("--quiet", action="store_true", help="no progress bars")
    logs.set_defaults(run=_logs)
    speed = commands.add_parser(
        "speed", help="training throughput: our loop against deepctr-torch's fit() on the same rows, taking turns")
    speed.add_argument("--data", required=True, help="folder with train.log.txt (and test.log.txt)")
    speed.add_argument("--models", default="deepfm,autoint", help="comma-separated models (default: deepfm,autoint)")
    speed.add_argument("--rows", type=int, help="train on the first ROWS rows of the training split (default: all)")
    speed.add_argument("--epochs", type=int, default=1, help="timed epochs per run (default 1)")
    speed.add_argument("--repeats", type=int, default=1,
                       help="runs of each loop, taking turns; the median is reported (default 1)")
    speed.add_argument("--profile", action="store_true",
                       help="one more epoch of our loop timed per phase: data, forward, regularization, "
                            "backward, optimizer")
    speed.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                       help="override a hyper-parameter of the models and our loop (repeatable)")
    speed.add_argument("--deepctr-batch-size", type=int, default=512,
                       help="batch size of deepctr's fit() (default 512, our loop's setting before sparse tables)")
    speed.add_argument("--deepctr-lr", type=float, default=5e-4,
                       help="Adam learning rate of deepctr's fit() (default 5e-4)")
    speed.add_argument("--out", help="also write the JSON result to this file")
    speed.add_argument("--seed", type=int, default=0, help="seed for initialisation and shuffling")
    speed.add_argument("--skip-bad-lines", action="store_true", help="leave malformed lines out instead of stopping")
    speed.add_argument("--spec", help="feature spec JSON (default: the bidder's iPinYou spec)")
    speed.add_argument("--threads", type=int, default=1, help="torch threads for both loops (default 1)")
    speed.add_argument("--quiet", action="store_true", help="no progress bars")
    speed.set_defaults(run=_speed)
    ddp = commands.add_parser(
        "speed-ddp", help="data-parallel throughput: train fit under torchrun with 1, 2, ... processes, taking turns")
    ddp.add_argument("--data", required=True, help="folder with train.log.txt (and test.log.txt)")
    ddp.add_argument("--model", default="deepfm", help="model to train (default deepfm)")
    ddp.add_argument("--processes", default="1,2", help="comma-separated process counts (default 1,2)")
    ddp.add_argument("--repeats", type=int, default=2, help="runs of each count, taking turns (default 2; median)")
    ddp.add_argument("--epochs", type=int, default=1, help="epochs per run (default 1)")
    ddp.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                     help="override a hyper-parameter (repeatable)")
    ddp.add_argument("--transports", default="shm",
                     help="comma-separated all-gather transports to compare, shm and/or gloo, each run in turn "
                          "(default shm)")
    ddp.add_argument("--seed", type=int, default=0, help="seed for initialisation and shuffling")
    ddp.add_argument("--out", help="also write the JSON result to this file")
    ddp.add_argument("--quiet", action="store_true", help="no progress bars")
    ddp.set_defaults(run=_speed_ddp)

    compress = commands.add_parser(
        "compress", help="write a compressed copy of a bundle: int8-dynamic, int8-static, int8-embeddings, prune, "
                         "distill or heads (train/compress/)")
    compress.add_argument("--bundle", required=True, help="source bundle folder (left as it is)")
    compress.add_argument("--method", required=True, metavar="METHOD",
                          help="int8-dynamic, int8-static, int8-embeddings, prune, distill or heads")
    compress.add_argument("--out", required=True,
                          help="bundle folder to write (refused when it already holds a bundle, unless --force)")
    compress.add_argument("--data", help="folder with train.log.txt (and test.log.txt): training rows for "
                                         "int8-static, prune, distill and heads; test rows for the paired AUC delta")
    compress.add_argument("--force", action="store_true", help="replace the bundle already in --out")
    compress.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                          help="a setting of the method (repeatable; train/compress/ lists them)")
    compress.add_argument("--epochs", type=int, help="epochs of fine-tuning (prune, heads) or of the student (distill)")
    compress.add_argument("--seed", type=int, default=0, help="seed for the split, sampling and fine-tuning")
    compress.add_argument("--threads", type=int, default=1, help="torch threads while training (default 1)")
    compress.add_argument("--quiet", action="store_true", help="no progress bars")
    compress.set_defaults(run=_compress)

    study = commands.add_parser(
        "compress-study", help="DeepFM and AutoInt, every compression method: accuracy, size and latency in one table")
    study.add_argument("--data", required=True, help="folder with train.log.txt (and test.log.txt)")
    study.add_argument("--out", required=True, help="folder for the report, the PNG and the bundles")
    study.add_argument("--bundle", action="append", default=[], metavar="BUNDLE",
                       help="use this DeepFM or AutoInt bundle instead of training one (repeatable)")
    study.add_argument("--models", default="deepfm,autoint", help="source models to study (default: deepfm,autoint)")
    study.add_argument("--variant", action="append", metavar="NAME",
                       help="run only this variant (and the variants it starts from; repeatable; default: all)")
    study.add_argument("--epochs", type=int, help="maximum epochs of the source models trained here")
    study.add_argument("--seed", type=int, default=0)
    study.add_argument("--threads", type=int, default=1, help="torch threads while training (default 1)")
    study.add_argument("--quiet", action="store_true", help="no progress bars")
    study.set_defaults(run=_compress_study)
    from train.studies.calibration import ROWS, SEEDS

    calibration = commands.add_parser(
        "calibration-study", help="DeepFM on synthetic data of several sizes and seeds: the served calibration, "
                                  "Platt on the validation split and no calibration, judged against pctr_true")
    calibration.add_argument("--out", required=True, help="folder for the report, the PNG and (by default) the data")
    calibration.add_argument("--rows", default=",".join(map(str, ROWS)),
                             help="comma-separated data sizes (default: %(default)s)")
    calibration.add_argument("--seeds", default=",".join(map(str, SEEDS)),
                             help="comma-separated data seeds (default: %(default)s)")
    calibration.add_argument("--data-root", help="folder holding (or to receive) synth-ROWS-SEED/ (default: OUT/data)")
    calibration.add_argument("--epochs", type=int, help="maximum epochs (early stopping may end sooner)")
    calibration.add_argument("--threads", type=int, default=1, help="torch threads while training (default 1)")
    calibration.add_argument("--quiet", action="store_true", help="no progress bars")
    calibration.add_argument("--from-predictions", metavar="DIR",
                             help="no training: re-score the predictions a study saved under DIR (its --out) with "
                                  "the current calibration and keep rules")
    calibration.set_defaults(run=_calibration_study)
    upgrade = commands.add_parser(
        "bundle-upgrade", help="rewrite a bundle's format-1 meta.json as the current format (its files' digests "
                               "recorded, checked first as format 1 allows); no other file changes")
    upgrade.add_argument("bundle", metavar="DIR", help="the bundle folder to upgrade in place")
    upgrade.set_defaults(run=_bundle_upgrade)
    return parser


def _training_options(parser: argparse.ArgumentParser, per_model: bool = False) -> None:
    parser.add_argument("--epochs", type=int, help="maximum epochs (early stopping may end sooner)")
    parser.add_argument("--seed", type=int, default=0, help="seed for initialisation, shuffling and a random split")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="leave malformed lines out (counted and reported) instead of stopping")
    parser.add_argument("--spec", help="feature spec JSON (default: the bidder's iPinYou spec)")
    parser.add_argument("--set", action="append", default=[], metavar="MODEL.NAME=VALUE" if per_model else "NAME=VALUE",
                        help="override a hyper-parameter (repeatable)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while training (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


if __name__ == "__main__":
    sys.exit(main())

"""`python -m bench loop`: the learning loop on the simulated exchange, measured.

    python -m bench loop [--days N] [--rate RPS] [--speed X] [--epochs E] [--explore SHARE] [--ips-clip MAX]
                         [--out DIR]

1. **Days 1..N**: `bidder serve` on the shipped bundle with `--events` and `--notice-url`, against
   `bench exchange` (its faults on: late, lost, duplicated, forged notices, billing retries), then stopped with
   SIGTERM (which writes every queued event and finishes the last file).
2. **The join**: `train logs` turns the event log into `train.log.txt` (billed impressions, labelled by clicks)
   and `bids.log.txt` (the censored win-price log); its summary gives the billed-to-bid join rate. With
   `--ips-clip`, each billed row is weighted by 1 / its propensity, clipped (`train logs --ips-clip`).
3. **Two bundles, one test**: `train fit` on the bidder's own rows, and `train fit` on as many rows drawn at
   random from the generator's training rows (`train synth`, the same world the exchange simulates); both
   data folders hold the generator's held-out `test.log.txt`, so both bundles' test AUC is on the same rows.
   `train market` adds the win-price model learnt from the bidder's own bid log to the first.
4. **Day N+1**, twice on the same traffic (same seed): the shipped bundle (the control) and the bundle trained
   on the logs. The bidder is restarted on the new bundle (a hot reload would serve it as well, `POST
   /admin/reload`; a restart also closes day N's last log file, which `train logs` needs finished).

Writes `DIR/loop.json` (every figure, the exchange reports' per-bidder sections, the join summary, the commands
run) and `DIR/loop.png`; the event log, data and bundles stay in `DIR` to look at.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.exchange.cli import DEFAULT_WORLD_ROWS, DEFAULT_WORLD_SEED, ExchangeConfig, positive, run_exchange
from bench.exchange.faults import Faults
from bench.exchange.traffic import Market
from bench.load import REPO, child_environment
from bench.machine import machine_info
from bench.servers import BenchError, free_port, running
from bidder import DEFAULT_BUNDLE
from bidder.clock import parse_time
from train.errors import TrainError

DAY_S = 86_400.0
START = "2026-12-01T00:00:00Z"
#: wall seconds from a bidder's start to its clock's anchor: its start-up (a few seconds; more on a busy host)
ANCHOR_LEAD_S = 45.0
KEPT = ("requests", "bids", "wins", "bills", "spend", "value", "surplus", "clicks", "cpc", "ecpm", "win_rate",
        "bid_rate", "errors", "timeouts", "latency_ms", "notice_latency_ms", "notices")


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _run(command: list[str], log: list[list[str]], output: Path) -> None:
    """Run a ``train`` command; what it prints (its JSON summary) goes to ``output``."""
    log.append(command)
    print("$ " + " ".join(command[1:]) + f" > {output}", file=sys.stderr, flush=True)
    with open(output, "wb") as f:
        done = subprocess.run(command, cwd=REPO, stdout=f)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(command[1:4])} failed with status {done.returncode}")


def serve_days(name: str, bundle: Path, campaigns: Path, market: Market, out: Path, *, first_day: int, days: int,
               args: argparse.Namespace, events: Path | None = None, options: tuple[str, ...] = (),
               workers: int = 1, faults: Faults = Faults(), before_stop=None) -> dict[str, Any]:
    """Days ``first_day + 1 .. first_day + days`` against one bidder on ``bundle`` (with notices, and with
    ``options`` added to its command line): the exchange's figures for it. ``before_stop(base_url)``, when given, is
    called once the day is over, while the bidder still serves; what it returns is kept as ``"bidder"``."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    start = parse_time(START) + first_day * DAY_S
    anchor = time.time() + ANCHOR_LEAD_S
    command = _python("-m", "bidder", "serve", "--model", str(bundle), "--campaigns", str(campaigns),
                      "--port", str(port), "--no-pin", "--notice-url", base, "--state-dir", str(out / f"state-{name}"),
                      "--clock-start", str(start), "--clock-speed", str(args.speed), "--clock-anchor", str(anchor))
    if events is not None:
        command += ["--events", str(events)]
    command += [*options, "--workers", str(workers)]
    config = ExchangeConfig(bidders=(base + "/bid/{exchange}",), campaigns=campaigns, start=start, speed=args.speed,
                            anchor=anchor, hours=24.0 * days, rate=args.rate, seed=args.seed + first_day,
                            world_seed=args.world_seed, world_rows=args.world_rows,
                            faults=faults)
    print(f"{name}: days {first_day + 1}-{first_day + days} on {bundle}", file=sys.stderr, flush=True)
    with running(name, command, base, ready_path="/readyz", startup_timeout_s=ANCHOR_LEAD_S - 2, port=port,
                 workers=workers):
        time.sleep(max(0.0, anchor - time.time() - 0.5))
        report, _ = run_exchange(config, progress=not args.quiet, market=market)
        seen = before_stop(base) if before_stop is not None else None
    # leaving `running` sent SIGTERM and waited: every queued event is written and the last file renamed
    entry = next(iter(report["bidders"].values()))
    out = {"bundle": str(bundle), "days": [first_day + 1, first_day + days], "command": command,
           **{key: entry.get(key) for key in KEPT}, "campaigns": entry.get("campaigns")}
    if seen is not None:
        out["bidder"] = seen
    return out


def new_folder(out: str | Path) -> Path:
    """``--out``, created; BenchError when it holds files already (a run never mixes with an earlier one's)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise BenchError(f"--out {out} is not empty: give a new folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def reference_data(generator: Path, rows: int, out: Path, seed: int) -> None:
    """``rows`` lines drawn at random from the generator's training log, and its test log, into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with open(generator / "train.log.txt", encoding="utf-8") as f:
        header, *lines = f.readlines()
    if rows > len(lines):
        raise BenchError(f"the logs hold {rows:,} training rows, more than the generator's {len(lines):,}: "
                         f"raise --generator-rows")
    chosen = sorted(random.Random(seed).sample(range(len(lines)), rows))  # in time order, as train fit reads logs
    with open(out / "train.log.txt", "w", encoding="utf-8") as f:
        f.write(header)
        f.writelines(lines[i] for i in chosen)
    shutil.copyfile(generator / "test.log.txt", out / "test.log.txt")


def _rows(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f) - 1  # less the header


def _test_metrics(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "meta.json").read_text())["metrics"]["test"]


def run_loop(args: argparse.Namespace) -> dict[str, Any]:
    from train.logs import check_ips_clip, write_training_data

    check_ips_clip(args.ips_clip)  # before the days are served, not after
    out = new_folder(args.out)
    commands: list[list[str]] = []
    campaigns = args.campaigns
    print(f"building the market ({args.world_rows:,} rows, seed {args.world_seed})", file=sys.stderr, flush=True)
    market = Market(args.world_seed, args.world_rows)
    events = out / "events"
    logged = serve_days("logged", args.model, campaigns, market, out, first_day=0, days=args.days, args=args,
                        events=events, options=("--explore", str(args.explore)))

    joined = write_training_data(events, out / "data-logs", ips_clip=args.ips_clip, progress=not args.quiet)
    _run(_python("-m", "train", "synth", "--rows", str(args.generator_rows), "--seed", str(args.world_seed),
                 "--out", str(out / "generator")), commands, out / "synth.json")
    shutil.copyfile(out / "generator" / "test.log.txt", out / "data-logs" / "test.log.txt")
    rows = _rows(out / "data-logs" / "train.log.txt")
    if rows == 0:
        raise BenchError("the bidder's logs hold no billed impression: nothing to train on")
    reference_data(out / "generator", rows, out / "data-generator", args.seed)

    fit = ["--model", "deepfm", "--seed", str(args.seed), "--quiet"] + (["--epochs", str(args.epochs)]
                                                                       if args.epochs else [])
    _run(_python("-m", "train", "fit", "--data", str(out / "data-logs"), "--out", str(out / "bundle-logs"), *fit),
         commands, out / "fit-logs.json")
    _run(_python("-m", "train", "market", "--data", str(out / "data-logs"), "--bundle", str(out / "bundle-logs"),
                 "--seed", str(args.seed), "--quiet"), commands, out / "market-logs.json")
    _run(_python("-m", "train", "fit", "--data", str(out / "data-generator"), "--out",
                 str(out / "bundle-generator"), *fit), commands, out / "fit-generator.json")

    control = serve_days("control", args.model, campaigns, market, out, first_day=args.days, days=1, args=args)
    retrained = serve_days("retrained", out / "bundle-logs", campaigns, market, out, first_day=args.days, days=1,
                           args=args)
    auc_logs, auc_generator = _test_metrics(out / "bundle-logs"), _test_metrics(out / "bundle-generator")
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine_info(REPO, "not used"),
        "command": (f"python -m bench loop --days {args.days} --rate {args.rate:g} --speed {args.speed:g} "
                    f"--explore {args.explore:g} "
                    + (f"--ips-clip {args.ips_clip:g} " if args.ips_clip is not None else "")
                    + f"--seed {args.seed} --out {args.out}"),
        "config": {"days": args.days, "explore": args.explore, "ips_clip": args.ips_clip, "rate": args.rate,
                   "speed": args.speed,
                   "seed": args.seed, "world_seed": args.world_seed, "world_rows": args.world_rows, "epochs": args.epochs,
                   "generator_rows": args.generator_rows, "model": str(args.model), "campaigns": str(campaigns)},
        "join": joined,
        "training_rows": rows,
        "test": {"logs": auc_logs, "generator": auc_generator,
                 "auc_gap": round(auc_generator["auc"] - auc_logs["auc"], 6)},
        "days": {"logged": logged, "control": control, "retrained": retrained},
        "train_commands": commands,
    }
    (out / "loop.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, out / "loop.png")
    return report


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    days = report["days"]
    names = list(days)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for offset, key in ((-0.2, "surplus"), (0.2, "spend")):
        left.bar([i + offset for i in range(len(names))], [days[n][key] or 0.0 for n in names], width=0.4, label=key)
    left.set_xticks(range(len(names)), [f"{n}\nday {days[n]['days'][0]}-{days[n]['days'][1]}" for n in names])
    left.set_ylabel("USD")
    left.set_title("the exchange's figures per run")
    left.legend()
    test = report["test"]
    right.bar(["own logs", "generator rows"], [test["logs"]["auc"], test["generator"]["auc"]])
    right.set_ylim(0.5, max(test["logs"]["auc"], test["generator"]["auc"]) + 0.05)
    right.set_title(f"test AUC, {report['training_rows']:,} training rows each")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(report: dict[str, Any], out: Path) -> str:
    join = report["join"]
    lines = [f"join: {join['bids']:,} bids, {join['billed']:,} billed, {join['clicks']:,} clicks; billed join rate "
             f"{join['billed_join_rate']}; outcomes without a bid {join['outcomes_without_bid']}",
             f"test AUC on the generator's held-out rows, {report['training_rows']:,} training rows each: own logs "
             f"{report['test']['logs']['auc']:.4f}, generator {report['test']['generator']['auc']:.4f} "
             f"(gap {report['test']['auc_gap']:+.4f})"]
    for name, day in report["days"].items():
        lines.append(f"{name:9} days {day['days'][0]}-{day['days'][1]}: requests {day['requests']:,}  bids "
                     f"{day['bids']:,}  bills {day['bills']:,}  clicks {day['clicks']:,}  spend {day['spend']:.2f}  "
                     f"surplus {day['surplus']:.2f} USD")
    lines += [f"results: {out / 'loop.json'}", f"plot:    {out / 'loop.png'}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench loop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=positive(int), default=1, help="days of logs to train on (default: 1)")
    parser.add_argument("--rate", type=positive(float), default=1000.0,
                        help="the exchange's mean wall-clock requests/s (default: %(default)s)")
    parser.add_argument("--speed", type=positive(float), default=720.0,
                        help="simulated seconds per wall second (default: %(default)s, a day in two minutes)")
    parser.add_argument("--epochs", type=positive(int), default=None, help="train fit's maximum epochs")
    parser.add_argument("--explore", type=float, default=0.0, metavar="SHARE",
                        help="the logged days' bidder --explore: the share of imps bid with a random eligible "
                             "creative (default: 0)")
    parser.add_argument("--ips-clip", type=float, default=None, metavar="MAX",
                        help="weight each of the bidder's billed rows by 1 / its propensity, at most MAX, in its fit "
                             "(train logs --ips-clip; default: unweighted)")
    parser.add_argument("--seed", type=int, default=0, help="traffic, sampling and training seed (default: 0)")
    parser.add_argument("--world-seed", type=int, default=DEFAULT_WORLD_SEED,
                        help="the market's (and the generator's) seed (default: %(default)s)")
    parser.add_argument("--world-rows", type=positive(int), default=DEFAULT_WORLD_ROWS,
                        help="the market's size in rows (default: %(default)s)")
    parser.add_argument("--generator-rows", type=positive(int), default=DEFAULT_WORLD_ROWS,
                        help="rows train synth writes for the reference bundle and the test rows; the same as "
                             "--world-rows, so that it is the world the exchange simulates (default: %(default)s)")
    parser.add_argument("--model", type=Path, default=DEFAULT_BUNDLE, help="the bundle of days 1..N and the control")
    parser.add_argument("--campaigns", type=Path, default=DEFAULT_BUNDLE / "campaigns.json")
    parser.add_argument("--out", type=Path, default=Path("runs") / time.strftime("loop-%Y%m%dT%H%M%SZ", time.gmtime()))
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    child_environment()
    try:
        report = run_loop(args)
    except (BenchError, TrainError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary(report, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

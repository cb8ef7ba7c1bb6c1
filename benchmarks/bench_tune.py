"""Search benchmark (`make bench-tune`): ASHA vs no scheduler (the full-budget baseline) on the same space.

Both searches run ``pipeline.search.driver.run_search`` on ``configs/tune/toy_asha.yaml`` in this process, one
after the other on one private local Ray instance, with the **same** sampled candidates (same
``search.seed`` and ``search.num_trials``): trial *i* is the same config in both. Each trial is a 1-worker
Ray Train run of toy_resnet20 on a small embedded dataset generated here (32 px, ``--train-per-class`` /
``--val-per-class`` images per class, 10 classes), tracked in a fresh sqlite MLflow store of the bench dir.

* **none**: every trial trains ``--epochs`` epochs: its epochs used are the budget, its best objective the
  best the space offers at that budget;
* **asha**: ASHA (``--grace-period``, ``--reduction-factor``, ``max_t = --epochs``) stops trials early.

The goal: ASHA finds the same or an equally good config with <= 35% of the epochs. "Equally good" here:
ASHA's best objective >= the baseline's best - ``--tolerance`` (absolute val/top1). Reported beside it:
whether ASHA's best trial is the baseline's best trial, what ASHA's pick scored at the full budget in the
baseline (its regret), the run-to-run noise measured on the epochs both runs trained of the same trial (the
same config and seed, so any difference is nondeterminism), and the binomial standard error of an accuracy
on the val set (differences below it are not meaningful on this data).

    python benchmarks/bench_tune.py [--trials 8] [--epochs 8] [--reduction-factor 3] [--grace-period 1]
        [--concurrent 2] [--train-per-class 80] [--val-per-class 20] [--tolerance 0.02] [--tracking sqlite|none]

The bench dir (``--workdir``) is wiped first, so nothing resumes. Exit 0 whether or not the goal is met (it
is a measurement); a search that fails raises.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GOAL_FRACTION = 0.35
CONFIG = "configs/tune/toy_asha.yaml"
SCHEDULERS = ("asha", "none")
"""Run order: ASHA first, so any warm-up cost of the first search (imports, first worker start) is ASHA's."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=8, help="search.num_trials (the same candidates in both)")
    p.add_argument("--epochs", type=int, default=8, help="pretrain.train.epochs: max_t and the baseline's")
    p.add_argument("--reduction-factor", type=int, default=3)
    p.add_argument("--grace-period", type=int, default=1)
    p.add_argument("--concurrent", type=int, default=2, help="search.max_concurrent_trials (1 CPU each)")
    p.add_argument("--seed", type=int, default=0, help="search.seed (candidate sampler)")
    p.add_argument("--train-per-class", type=int, default=80, help="embedded train images per class (10)")
    p.add_argument("--val-per-class", type=int, default=20, help="embedded val images per class")
    p.add_argument("--batch-size", type=int, default=50, help="pretrain.data.batch_size_per_worker")
    p.add_argument("--tolerance", type=float, default=0.02, help="'equally good': absolute val/top1")
    p.add_argument(
        "--tracking",
        choices=["sqlite", "none"],
        default="sqlite",
        help="sqlite: MLflow store in the bench dir (as the job runs); none: untracked, no per-epoch noise",
    )
    p.add_argument("--workdir", default=".cache/bench/tune", help="bench dir, wiped first")
    p.add_argument("--json", default=".cache/bench/tune.json")
    args = p.parse_args(argv)
    if args.trials < 1 or args.epochs < 1 or args.concurrent < 1:
        p.error("--trials, --epochs and --concurrent must be >= 1")
    cpus = os.cpu_count() or 1
    if args.concurrent > cpus:
        p.error(f"--concurrent {args.concurrent}: 1 CPU per trial worker, this machine has {cpus} CPUs")
    return args


def other_raylets() -> list[str]:
    """Command lines of raylets already running on this machine (another cluster, e.g. a test's)."""
    try:
        out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [line.strip() for line in out.splitlines() if "/raylet" in line and "--node_id" in line]


def prepare_data(args: argparse.Namespace, work: Path) -> dict[str, str]:
    from pipeline.config import ShardConfig, ToyConfig
    from pipeline.data.prepare import prepare_embedded

    toy = ToyConfig(
        root=str(work / "raw"),
        image_size=32,
        pretrain_train_per_class=args.train_per_class,
        pretrain_val_per_class=args.val_per_class,
        downstream_train_max=4,
        downstream_val_per_class=2,
        downstream_imbalance=2.0,
    )
    shards = ShardConfig(dest=str(work / "shards"), samples_per_shard=250, workers=1)
    return prepare_embedded(toy, shards).manifests["pretrain"]


def overrides_for(
    args: argparse.Namespace, scheduler: str, manifests: dict[str, str], work: Path
) -> list[str]:
    uri = f"sqlite:///{(work / 'mlflow.db').resolve()}" if args.tracking == "sqlite" else "none"
    return [
        f"pretrain.data.train_manifest={manifests['train']}",
        f"pretrain.data.val_manifest={manifests['val']}",
        f"pretrain.data.batch_size_per_worker={args.batch_size}",
        f"pretrain.train.epochs={args.epochs}",
        f"pretrain.tracking.uri={uri}",
        "pretrain.tracking.experiment=bench-tune",
        "pretrain.tracking.register_as=bench-tune-best",
        f"search.scheduler={scheduler}",
        f"search.num_trials={args.trials}",
        f"search.grace_period={args.grace_period}",
        f"search.reduction_factor={args.reduction_factor}",
        f"search.max_concurrent_trials={args.concurrent}",
        f"search.seed={args.seed}",
        f"search.name=bench-{scheduler}",
        f"search.storage_path={(work / 'ray_results').resolve()}",
    ]


def histories(outcome: Any, metric: str) -> dict[int, list[float]]:
    """Per trial, the objective of each epoch it trained (from its MLflow child run; {} when untracked)."""
    if not outcome.tracking_uri:
        return {}
    from pipeline.tracking.mlflow_tracker import metric_history

    return {
        t.index: [v for _, v in metric_history(outcome.tracking_uri, t.run_id, metric)]
        for t in outcome.trials
        if t.run_id is not None
    }


def run_one(
    args: argparse.Namespace, scheduler: str, manifests: dict[str, str], work: Path
) -> dict[str, Any]:
    from pipeline.config import TuneConfig, load_config
    from pipeline.search.driver import run_search

    overrides = overrides_for(args, scheduler, manifests, work)
    cfg = load_config(TuneConfig, CONFIG, overrides)
    started = time.perf_counter()
    outcome = run_search(cfg)
    wall = time.perf_counter() - started
    return {
        "scheduler": scheduler,
        "overrides": overrides,
        "wall_s": wall,
        "name": outcome.name,
        "trials": [
            {
                "index": t.index,
                "overrides": t.overrides,
                "epochs": t.epochs,
                "best": t.best,
                "stop_reason": t.stop_reason,
            }
            for t in outcome.trials
        ],
        "best_index": outcome.best_index,
        "best_objective": outcome.best_objective,
        "epochs_used": outcome.epochs_used,
        "epochs_budget": outcome.epochs_budget,
        "fraction": outcome.epochs_used / outcome.epochs_budget,
        "best_config_path": outcome.best_config_path,
        "tracking_uri": outcome.tracking_uri,
        "histories": histories(outcome, cfg.search.metric),
    }


def _ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties averaged."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation; None when undefined (fewer than 3 points or a constant side)."""
    if len(xs) < 3:
        return None
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if vx == 0 or vy == 0 else cov / math.sqrt(vx * vy)


def rungs(args: argparse.Namespace) -> list[int]:
    """ASHA's decision epochs below max_t (grace_period x reduction_factor^k)."""
    out, epoch = [], args.grace_period
    while epoch < args.epochs:
        out.append(epoch)
        epoch *= args.reduction_factor
    return out


def rung_fidelity(args: argparse.Namespace, base: dict[str, Any]) -> dict[int, float | None]:
    """Per ASHA rung, how well the baseline's objective at that epoch ranks the trials as their full-budget
    best does (Spearman): what ASHA decides on vs what it should predict. Needs the per-epoch histories."""
    full = {t["index"]: t["best"] for t in base["trials"] if t["best"] is not None}
    out: dict[int, float | None] = {}
    for epoch in rungs(args):
        pairs = [
            (h[epoch - 1], full[i]) for i, h in base["histories"].items() if len(h) >= epoch and i in full
        ]
        out[epoch] = spearman([a for a, _ in pairs], [b for _, b in pairs]) if pairs else None
    return out


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def analyse(args: argparse.Namespace, asha: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    same_candidates = [t["overrides"] for t in asha["trials"]] == [t["overrides"] for t in base["trials"]]
    base_by_index = {t["index"]: t for t in base["trials"]}
    # What ASHA's pick reaches when trained to the full budget (the baseline ran exactly that config).
    pick_full = base_by_index[asha["best_index"]]["best"]
    regret = None if pick_full is None else base["best_objective"] - pick_full
    # Run-to-run noise: the same trial (config and seed) on the epochs both runs trained.
    diffs = []
    for index, values in asha["histories"].items():
        other = base["histories"].get(index, [])
        diffs += [abs(a - b) for a, b in zip(values, other, strict=False)]
    noise = {
        "matched_epochs": len(diffs),
        "max_abs_diff": max(diffs) if diffs else None,
        "mean_abs_diff": sum(diffs) / len(diffs) if diffs else None,
    }
    n_val = 10 * args.val_per_class
    p = base["best_objective"]
    val_se = math.sqrt(max(p * (1 - p), 0.0) / n_val)
    equally_good = asha["best_objective"] >= base["best_objective"] - args.tolerance
    cheap = asha["fraction"] <= GOAL_FRACTION
    return {
        "same_candidates": same_candidates,
        "asha_fraction": asha["fraction"],
        "asha_epochs_vs_baseline_used": asha["epochs_used"] / base["epochs_used"],
        "delta_best": asha["best_objective"] - base["best_objective"],
        "tolerance": args.tolerance,
        "equally_good": equally_good,
        "same_best_trial": asha["best_index"] == base["best_index"],
        "asha_pick_full_budget_best": pick_full,
        "asha_pick_regret": regret,
        "baseline_best_stopped_by_asha": next(
            t["stop_reason"] for t in asha["trials"] if t["index"] == base["best_index"]
        ).startswith("scheduler"),
        "noise": noise,
        "rung_fidelity_spearman": rung_fidelity(args, base),
        "val_images": n_val,
        "val_binomial_se_at_baseline_best": val_se,
        "goal_fraction": GOAL_FRACTION,
        "goal_met": bool(same_candidates and equally_good and cheap),
    }


def report(
    args: argparse.Namespace, runs: dict[str, dict[str, Any]], verdict: dict[str, Any], command: str
) -> None:
    asha, base = runs["asha"], runs["none"]
    print(
        f"\n{args.trials} trials of toy_resnet20 (1 CPU worker each, {args.concurrent} at a time), up to "
        f"{args.epochs} epochs, {args.train_per_class}/{args.val_per_class} train/val images per class x 10, "
        f"32 px, batch {args.batch_size}; ASHA grace_period={args.grace_period}, "
        f"reduction_factor={args.reduction_factor}, max_t={args.epochs}; search.seed={args.seed}; "
        f"tracking: {args.tracking}; {os.cpu_count()} CPU cores"
    )
    print(
        "\n| scheduler | trials | epochs used / budget | fraction | best objective | best trial | wall s |\n"
        "|---|---:|---:|---:|---:|---:|---:|"
    )
    for r in (asha, base):
        print(
            f"| {r['scheduler']} | {len(r['trials'])} | {r['epochs_used']} / {r['epochs_budget']} | "
            f"{r['fraction']:.0%} | {r['best_objective']:.4f} | {r['best_index']} | {r['wall_s']:.0f} |"
        )
    keys = sorted({k for t in base["trials"] for k in t["overrides"]})
    print(
        "\n| trial | "
        + " | ".join(keys)
        + " | none: epochs | none: best | asha: epochs | asha: best | asha: stop |"
    )
    print("|" + "---:|" * (len(keys) + 5) + "---|")
    asha_by_index = {t["index"]: t for t in asha["trials"]}
    for t in base["trials"]:
        a = asha_by_index[t["index"]]
        values = " | ".join(_fmt(t["overrides"].get(k), ".3g") for k in keys)
        marks = ("*" if t["index"] == base["best_index"] else "") + (
            "+" if t["index"] == asha["best_index"] else ""
        )
        print(
            f"| {t['index']}{marks} | {values} | {t['epochs']} | {_fmt(t['best'])} | {a['epochs']} | "
            f"{_fmt(a['best'])} | {a['stop_reason']} |"
        )
    print("(* the baseline's best trial, + ASHA's best trial)")
    noise = verdict["noise"]
    noise_text = (
        f"max |diff| {noise['max_abs_diff']:.4f} (mean {noise['mean_abs_diff']:.4f}) over "
        f"{noise['matched_epochs']} epochs both runs trained of the same trial"
        if noise["matched_epochs"]
        else "not measured (untracked)"
    )
    print(
        f"\nsame candidates in both searches: {verdict['same_candidates']}; run-to-run noise: {noise_text}; "
        f"binomial SE of val/top1 at {base['best_objective']:.3f} on {verdict['val_images']} val images: "
        f"{verdict['val_binomial_se_at_baseline_best']:.3f}"
    )
    print(
        f"ASHA's pick (trial {asha['best_index']}) at the full budget in the baseline: "
        f"{_fmt(verdict['asha_pick_full_budget_best'])} (regret {_fmt(verdict['asha_pick_regret'])}); "
        f"the baseline's best trial {base['best_index']} was "
        f"{'STOPPED EARLY' if verdict['baseline_best_stopped_by_asha'] else 'not stopped'} by ASHA"
    )
    fidelity = verdict["rung_fidelity_spearman"]
    if fidelity:
        cells = ", ".join(f"epoch {e}: {_fmt(r, '+.2f')}" for e, r in fidelity.items())
        print(f"ASHA rungs, Spearman of the baseline's objective there vs its full-budget best: {cells}")
    met = "met" if verdict["goal_met"] else "NOT met"
    print(
        f"\ngoal (ASHA best >= baseline best - {args.tolerance:g} with <= {GOAL_FRACTION:.0%} of the epochs): "
        f"{met}: ASHA best {asha['best_objective']:.4f} vs baseline {base['best_objective']:.4f} "
        f"(delta {verdict['delta_best']:+.4f}, equally good: {verdict['equally_good']}), same best trial: "
        f"{verdict['same_best_trial']}, epochs {asha['epochs_used']}/{asha['epochs_budget']} = "
        f"{verdict['asha_fraction']:.1%} (<= {GOAL_FRACTION:.0%}: {verdict['asha_fraction'] <= GOAL_FRACTION})"
    )
    print(f"command: {command}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/bench_tune.py", *(sys.argv[1:] if argv is None else argv)])
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.pop("RAY_ADDRESS", None)  # a private local instance, never a cluster that happens to be set
    running = other_raylets()
    if running:
        print(
            f"warning: {len(running)} raylet(s) already running on this machine (another Ray instance): the "
            "searches share the CPUs with it and the timings are not comparable",
            file=sys.stderr,
        )
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    manifests = prepare_data(args, work)
    data_s = time.perf_counter() - t0

    import ray

    # As pipeline.launch.ensure_ray starts it, with the dashboard (Train's placement-group cleaner needs its
    # state API, or a trial stopped by ASHA leaks its placement group) and one CPU per trial worker.
    t1 = time.perf_counter()
    ray.init(address="local", num_cpus=os.cpu_count(), dashboard_host="127.0.0.1", log_to_driver=False)
    ray_init_s = time.perf_counter() - t1
    runs: dict[str, dict[str, Any]] = {}
    try:
        for scheduler in SCHEDULERS:
            print(
                f"[{time.perf_counter() - t0:5.0f} s] search with scheduler={scheduler} ...", file=sys.stderr
            )
            runs[scheduler] = run_one(args, scheduler, manifests, work)
    finally:
        ray.shutdown()
    verdict = analyse(args, runs["asha"], runs["none"])
    report(args, runs, verdict, command)
    total_s = time.perf_counter() - t0
    print(f"data {data_s:.0f} s, ray.init {ray_init_s:.0f} s, total {total_s:.0f} s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {
                "command": command,
                "settings": {k: v for k, v in vars(args).items() if k != "json"},
                "config": CONFIG,
                "cpu_count": os.cpu_count(),
                "runs": runs,
                "verdict": verdict,
                "data_s": data_s,
                "ray_init_s": ray_init_s,
                "total_s": total_s,
            },
            indent=1,
            default=str,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

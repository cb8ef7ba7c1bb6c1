"""Search benchmark (`make bench-tune`): random+ASHA and TPE+ASHA against the full grid, on the same candidates.

Three searches run ``pipeline.search.driver.run_search`` on ``configs/tune/toy_asha.yaml`` in this process, one
after the other on one private local Ray instance, over one finite space (``--lrs`` x ``--weight-decays`` x
``--dropouts``, 16 combinations by default) on the *easy* embedded task (``toy.difficulty: easy``: a ResNet-20
fits it within a few hundred CPU steps, so a trial's first epochs already rank it):

* **grid**: ``search.sampler=grid``, no scheduler: every combination trains ``--epochs`` epochs. Its best
  val/top1 is the best the space offers at that budget, its epochs the cost to beat;
* **random+asha**: ``search.sampler=random`` with ``--trials`` trials (distinct candidates: with as many trials
  as combinations, each combination once in a seeded order) under ASHA (``--grace-period``,
  ``--reduction-factor``, ``max_t = --epochs``);
* **tpe+asha**: ``search.sampler=tpe`` (Optuna's TPE via Tune's OptunaSearch; ``--tpe-startup`` random trials
  first) with ``--trials`` trials over the same choices, under the same ASHA.

The goal (issue #17): a searcher finds the grid's best val/top1 within ``--tolerance`` (0.01) with at most 35%
of the grid's epochs. Reported beside it: each searcher's pick trained to the full budget (the grid ran that
exact config: its regret), the binomial standard error of an accuracy on the val set, and the fixed cost of
starting a trial (from each trial's MLflow record: child run start -> first epoch's metrics, less that epoch's
own seconds).

    python benchmarks/bench_tune.py [--trials 16] [--epochs 12] [--reduction-factor 4] [--grace-period 1]
        [--concurrent 2] [--train-per-class 40] [--val-per-class 30] [--batch-size 10] [--tolerance 0.01]
        [--only grid,random,tpe]

The defaults make an epoch 40 SGD steps (400 images at batch 10) and judge on 300 val images: with epochs of
24 steps and 150 val images (the earlier defaults: 60 / 15 per class, batch 25), the best config was still at
its slow start when ASHA's rungs judged it (docs/performance.md).
    python benchmarks/bench_tune.py --startup 6 [--ray-defaults]   # only the start-up cost: 6 one-epoch trials

``--ray-defaults`` runs trials with Ray Train's default settings (worker polls every 2 s, the preemption
watcher on) instead of the search's local-instance settings (pipeline.launch.LOCAL_RUN_ENV): the
"before" of the start-up cut. The bench dir (``--workdir``) is wiped first, so nothing resumes. Exit 0 whether
or not the goal is met (it is a measurement); a search that fails raises.
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
SEARCHES = ("random", "tpe", "grid")
"""Run order: the searchers first, so any warm-up cost of the first search (imports, first workers) is theirs."""
RAY_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2.0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"}


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=16, help="trials of random+asha and tpe+asha")
    p.add_argument(
        "--epochs", type=int, default=12, help="pretrain.train.epochs: max_t and the grid's budget"
    )
    p.add_argument("--reduction-factor", type=int, default=4)
    p.add_argument("--grace-period", type=int, default=1)
    p.add_argument("--tpe-startup", type=int, default=6, help="search.tpe_startup_trials")
    p.add_argument("--concurrent", type=int, default=2, help="search.max_concurrent_trials (1 CPU each)")
    p.add_argument("--seed", type=int, default=0, help="search.seed (random order, TPE)")
    p.add_argument("--lrs", type=_floats, default=[5e-4, 1e-3, 2e-3, 8e-3], help="optim.lr choices")
    p.add_argument("--weight-decays", type=_floats, default=[1e-4, 1e-2], help="optim.weight_decay choices")
    p.add_argument("--dropouts", type=_floats, default=[0.0, 0.4], help="model.dropout choices")
    p.add_argument(
        "--train-per-class", type=int, default=40, help="easy embedded train images per class (10)"
    )
    p.add_argument("--val-per-class", type=int, default=30, help="easy embedded val images per class")
    p.add_argument("--batch-size", type=int, default=10, help="pretrain.data.batch_size_per_worker")
    p.add_argument("--tolerance", type=float, default=0.01, help="'found the grid's best': absolute val/top1")
    p.add_argument("--only", default=",".join(SEARCHES), help="searches to run (grid is needed for the goal)")
    p.add_argument("--startup", type=int, default=0, help="only measure trial start-up: N one-epoch trials")
    p.add_argument("--ray-defaults", action="store_true", help="trials with Ray Train's default settings")
    p.add_argument("--workdir", default=".cache/bench/tune", help="bench dir, wiped first")
    p.add_argument("--json", default=".cache/bench/tune.json")
    args = p.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s]
    if set(args.only) - set(SEARCHES):
        p.error(f"--only: choose among {', '.join(SEARCHES)}")
    if args.trials < 1 or args.epochs < 1 or args.concurrent < 1:
        p.error("--trials, --epochs and --concurrent must be >= 1")
    cpus = os.cpu_count() or 1
    if args.concurrent > cpus:
        p.error(f"--concurrent {args.concurrent}: 1 CPU per trial worker, this machine has {cpus} CPUs")
    return args


def grid_size(args: argparse.Namespace) -> int:
    return len(args.lrs) * len(args.weight_decays) * len(args.dropouts)


def other_raylets() -> list[str]:
    """Command lines of raylets already running on this machine (another cluster, e.g. a test's)."""
    try:
        out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [line.strip() for line in out.splitlines() if "/raylet" in line and "--node_id" in line]


def prepare_data(args: argparse.Namespace, work: Path, *, tiny: bool) -> dict[str, str]:
    from pipeline.config import ShardConfig, ToyConfig
    from pipeline.data.prepare import prepare_embedded

    toy = ToyConfig(
        root=str(work / "raw"),
        difficulty="easy",
        image_size=32,
        pretrain_train_per_class=8 if tiny else args.train_per_class,
        pretrain_val_per_class=4 if tiny else args.val_per_class,
        downstream_train_max=4,
        downstream_val_per_class=2,
        downstream_imbalance=2.0,
    )
    shards = ShardConfig(dest=str(work / "shards"), samples_per_shard=250, workers=1)
    return prepare_embedded(toy, shards).manifests["pretrain"]


def _choice(values: list[float]) -> str:
    return f"{{type: choice, values: [{', '.join(repr(v) for v in values)}]}}"


def overrides_for(args: argparse.Namespace, search: str, manifests: dict[str, str], work: Path) -> list[str]:
    sampler, scheduler = {"grid": ("grid", "none"), "random": ("random", "asha"), "tpe": ("tpe", "asha")}[
        search
    ]
    trials = grid_size(args) if search == "grid" else args.trials
    return [
        f"pretrain.data.train_manifest={manifests['train']}",
        f"pretrain.data.val_manifest={manifests['val']}",
        f"pretrain.data.batch_size_per_worker={args.batch_size}",
        "pretrain.data.loader_workers=0",  # 600 images an epoch: a loader process costs more than it saves
        f"pretrain.train.epochs={args.epochs}",
        # The lr choices are the lrs used (no linear scaling from the recipe's batch of 128), from the first
        # step (no warm-up epoch): epoch 1, ASHA's first rung, is then the most informative it can be.
        f"pretrain.optim.reference_batch_size={args.batch_size}",
        "pretrain.optim.warmup_epochs=0",
        f"pretrain.tracking.uri=sqlite:///{(work / 'mlflow.db').resolve()}",
        "pretrain.tracking.experiment=bench-tune",
        "pretrain.tracking.register_as=bench-tune-best",
        f"space.weight_decay={_choice(args.weight_decays)}",
        f"space.dropout={_choice(args.dropouts)}",
        f"space.extra={{optim.lr: {_choice(args.lrs)}}}",
        f"search.sampler={sampler}",
        f"search.scheduler={scheduler}",
        f"search.num_trials={trials}",
        f"search.tpe_startup_trials={args.tpe_startup}",
        f"search.grace_period={args.grace_period}",
        f"search.reduction_factor={args.reduction_factor}",
        f"search.max_concurrent_trials={args.concurrent}",
        f"search.seed={args.seed}",
        f"search.name=bench-{search}",
        f"search.storage_path={(work / 'ray_results').resolve()}",
    ]


def startup_costs(outcome: Any) -> list[float]:
    """Per trial, seconds from its child run's creation (Tune started the trial) to its first epoch's metrics
    reaching the driver, less that epoch's own ``system/epoch_s``: the fixed cost of starting a trial."""
    from mlflow import MlflowClient

    client = MlflowClient(outcome.tracking_uri)
    costs = []
    for trial in outcome.trials:
        if trial.run_id is None:
            continue
        run = client.get_run(trial.run_id)
        first = min(client.get_metric_history(trial.run_id, "val/top1"), key=lambda m: m.step, default=None)
        epoch = client.get_metric_history(trial.run_id, "system/epoch_s")
        if first is None or not epoch:
            continue
        epoch_s = min(epoch, key=lambda m: m.step).value
        costs.append((first.timestamp - run.info.start_time) / 1000 - epoch_s)
    return costs


def key_of(overrides: dict[str, Any]) -> tuple:
    return (overrides["optim.lr"], overrides["optim.weight_decay"], overrides["model.dropout"])


def run_one(args: argparse.Namespace, search: str, manifests: dict[str, str], work: Path) -> dict[str, Any]:
    from pipeline.config import TuneConfig, load_config
    from pipeline.search.driver import run_search

    overrides = overrides_for(args, search, manifests, work)
    cfg = load_config(TuneConfig, CONFIG, overrides)
    started = time.perf_counter()
    outcome = run_search(cfg)
    wall = time.perf_counter() - started
    return {
        "search": search,
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
        "startup_s": startup_costs(outcome),
    }


def analyse(args: argparse.Namespace, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    grid = runs.get("grid")
    verdict: dict[str, Any] = {"tolerance": args.tolerance, "goal_fraction": GOAL_FRACTION, "searchers": {}}
    if grid is None:
        return verdict
    full = {key_of(t["overrides"]): t["best"] for t in grid["trials"]}
    best_full = max(v for v in full.values() if v is not None)
    verdict["grid_best"] = best_full
    verdict["grid_epochs"] = grid["epochs_used"]
    p, n_val = best_full, 10 * args.val_per_class
    verdict["val_images"] = n_val
    verdict["val_binomial_se_at_grid_best"] = math.sqrt(max(p * (1 - p), 0.0) / n_val)
    winners = {k for k, v in full.items() if v is not None and v >= best_full - args.tolerance}
    verdict["grid_configs_within_tolerance"] = len(winners)
    for search in ("random", "tpe"):
        run = runs.get(search)
        if run is None:
            continue
        pick = next(t for t in run["trials"] if t["index"] == run["best_index"])
        pick_full = full.get(key_of(pick["overrides"]))
        fraction = run["epochs_used"] / grid["epochs_used"]
        found = run["best_objective"] >= best_full - args.tolerance
        verdict["searchers"][search] = {
            "best": run["best_objective"],
            "delta_vs_grid_best": run["best_objective"] - best_full,
            "found_grid_best": found,
            "epochs": run["epochs_used"],
            "fraction_of_grid_epochs": fraction,
            "pick": pick["overrides"],
            "pick_at_full_budget": pick_full,
            "pick_regret": None if pick_full is None else best_full - pick_full,
            "distinct_configs": len({key_of(t["overrides"]) for t in run["trials"]}),
            "goal_met": bool(found and fraction <= GOAL_FRACTION),
        }
    return verdict


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def report(args: argparse.Namespace, runs: dict[str, dict[str, Any]], verdict: dict[str, Any]) -> None:
    print(
        f"\nspace: lr {args.lrs} x weight_decay {args.weight_decays} x dropout {args.dropouts} "
        f"({grid_size(args)} combinations); toy_resnet20 on the easy embedded task ({args.train_per_class}/"
        f"{args.val_per_class} train/val images per class x 10, 32 px, batch {args.batch_size}), 1 CPU worker "
        f"per trial, {args.concurrent} at a time, up to {args.epochs} epochs; ASHA grace_period="
        f"{args.grace_period}, reduction_factor={args.reduction_factor}; TPE startup {args.tpe_startup}; "
        f"search.seed={args.seed}; {os.cpu_count()} CPU cores"
    )
    print(
        "\n| search | trials | distinct configs | epochs | of the grid's | best val/top1 | its pick at the full "
        "budget | trial start-up s (mean) | wall s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    grid_epochs = verdict.get("grid_epochs")
    for search in SEARCHES:
        run = runs.get(search)
        if run is None:
            continue
        info = verdict["searchers"].get(search, {})
        share = f"{run['epochs_used'] / grid_epochs:.0%}" if grid_epochs else "n/a"
        print(
            f"| {search}{'' if search == 'grid' else '+asha'} | {len(run['trials'])} | "
            f"{len({key_of(t['overrides']) for t in run['trials']})} | {run['epochs_used']} | {share} | "
            f"{run['best_objective']:.4f} | {_fmt(info.get('pick_at_full_budget'))} | "
            f"{_fmt(_mean(run['startup_s']), '.1f')} | {run['wall_s']:.0f} |"
        )
    if "grid_best" not in verdict:
        return
    print(
        f"\ngrid best {verdict['grid_best']:.4f} (binomial SE {verdict['val_binomial_se_at_grid_best']:.3f} on "
        f"{verdict['val_images']} val images; {verdict['grid_configs_within_tolerance']} of {grid_size(args)} "
        f"configs within {args.tolerance:g} of it)"
    )
    for search, info in verdict["searchers"].items():
        met = "met" if info["goal_met"] else "NOT met"
        print(
            f"goal ({search}+asha: grid best within {args.tolerance:g} with <= {GOAL_FRACTION:.0%} of the grid's "
            f"epochs): {met}: best {info['best']:.4f} (delta {info['delta_vs_grid_best']:+.4f}), "
            f"{info['fraction_of_grid_epochs']:.1%} of the grid's epochs, pick {info['pick']} regret "
            f"{_fmt(info['pick_regret'])}"
        )


def startup_only(args: argparse.Namespace, manifests: dict[str, str], work: Path) -> dict[str, Any]:
    """N one-epoch trials one at a time (no contention between trials) on tiny data."""
    from pipeline.config import TuneConfig, load_config
    from pipeline.search.driver import run_search

    overrides = overrides_for(args, "random", manifests, work)
    overrides += [
        "pretrain.train.epochs=1",
        "pretrain.optim.warmup_epochs=0",
        "search.scheduler=none",
        f"search.num_trials={args.startup}",
        "search.max_concurrent_trials=1",
        "search.name=bench-startup",
        "space.weight_decay={type: loguniform, low: 1.0e-4, high: 1.0e-2}",  # never runs out of candidates
    ]
    started = time.perf_counter()
    outcome = run_search(load_config(TuneConfig, CONFIG, overrides))
    wall = time.perf_counter() - started
    costs = startup_costs(outcome)
    print(
        f"\ntrial start-up ({'Ray Train defaults' if args.ray_defaults else 'search settings'}), {args.startup} "
        f"one-epoch trials one at a time: {', '.join(f'{c:.1f}' for c in costs)} s; mean "
        f"{_fmt(_mean(costs), '.1f')} s; search wall {wall:.0f} s ({wall / args.startup:.1f} s per trial)"
    )
    return {"startup_s": costs, "wall_s": wall, "ray_defaults": args.ray_defaults}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/bench_tune.py", *(sys.argv[1:] if argv is None else argv)])
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.pop("RAY_ADDRESS", None)  # a private local instance, never a cluster that happens to be set
    if args.ray_defaults:
        os.environ.update(RAY_DEFAULTS)  # inherited by every Ray process started below: the trials keep them
    running = other_raylets()
    if running:
        print(
            f"warning: {len(running)} raylet(s) already running on this machine (another Ray instance): the "
            "searches share the CPUs with it and the timings are not comparable",
            file=sys.stderr,
        )
    load = os.getloadavg()[0]
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    manifests = prepare_data(args, work, tiny=bool(args.startup))
    data_s = time.perf_counter() - t0

    import ray

    from pipeline.config import ScalingConfig
    from pipeline.launch import ensure_ray

    # As the search job starts it: with the dashboard and its state API address in every worker's
    # environment (Train's placement-group cleaner asks it; with another Ray instance on the machine and no
    # address, the cleaner dies and ASHA-stopped trials keep their CPUs: a search stalled so here) and a CPU
    # for the trials' drivers.
    t1 = time.perf_counter()
    ensure_ray(
        ScalingConfig(num_workers=1, cpus_per_worker=1), concurrent=args.concurrent, trial_drivers=True
    )
    ray_init_s = time.perf_counter() - t1
    runs: dict[str, dict[str, Any]] = {}
    results: dict[str, Any] = {}
    try:
        if args.startup:
            results = startup_only(args, manifests, work)
        else:
            for search in [s for s in SEARCHES if s in args.only]:
                print(f"[{time.perf_counter() - t0:5.0f} s] search {search} ...", file=sys.stderr)
                runs[search] = run_one(args, search, manifests, work)
    finally:
        ray.shutdown()
    verdict = {}
    if not args.startup:
        verdict = analyse(args, runs)
        report(args, runs, verdict)
    total_s = time.perf_counter() - t0
    print(
        f"data {data_s:.0f} s, ray.init {ray_init_s:.0f} s, total {total_s:.0f} s; 1-minute load at start "
        f"{load:.2f}\ncommand: {command}"
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {
                "command": command,
                "settings": {k: v for k, v in vars(args).items() if k != "json"},
                "config": CONFIG,
                "cpu_count": os.cpu_count(),
                "load_1min_at_start": load,
                "runs": runs,
                "startup": results,
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

"""Every shipped recipe runs end to end: each file under configs/pretrain, configs/finetune and configs/tune
(and so every experiment's base recipe), at a tiny size on CPU, with the recipe's own flags.

One rule, :func:`smoke_overrides`, shrinks a recipe and changes nothing else: the data location (embedded
shards at 32 px), sizes (resolution, batch, shuffle buffer), the epoch count with the epoch-valued schedule
fields compressed to it (warm-up, step milestones, fine-tuning's head stage), worker counts (in-process
training for pre-training and fine-tuning, one Ray worker per trial and 2 trials for a search) and where
checkpoints and MLflow records go. channels_last, AMP, optimizer, schedule, augmentation, dropout,
stochastic depth, label smoothing, class weights, the scheduler and search space stay as shipped, and a test
checks that the rule touched only those fields. A new recipe is covered by adding its file.

Pre-training and fine-tuning run through the job's driver in Ray Train's local mode (``scaling.num_workers=0``:
the same worker function, reports, replica digest, export and registration, without the ~12 s a Ray worker
group costs to start); the Ray-distributed path itself (DDP, restarts, S3) is covered on the toy recipe by
test_pretrain, test_multinode and test_stack. Searches need Ray workers: they share one Ray instance.
"""

from __future__ import annotations

import math
from pathlib import Path

import psutil
import pytest

from pipeline.config import (
    FinetuneConfig,
    PretrainConfig,
    ShardConfig,
    ToyConfig,
    deep_merge,
    load_config,
    read_yaml,
    to_dict,
)

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = sorted((REPO / "configs" / "pretrain").glob("*.yaml"))
FINETUNE = sorted((REPO / "configs" / "finetune").glob("*.yaml"))
TUNE = sorted((REPO / "configs" / "tune").glob("*.yaml"))
SMOKE_EPOCHS = 2
SMOKE_RESOLUTION = 32
"""Two, not one: a warm-up epoch and a scheduled one, both fine-tuning stages, and a replica check after an
epoch that is not the last."""
SEARCH_SMOKE_EPOCHS = 1
"""A search's trial trains one epoch: what a search adds - sampling, the trial, the summary, the best config
and model - does not need a second epoch."""
SEARCH_SMOKE_TRIALS = 1
"""One trial per shipped search: its sampler, scheduler, space and recipe all run. Several trials at once,
failed ones among them, and a scheduler that stops some are covered by the failed-trial tests below and by
test_multinode's ASHA search (a trial costs ~10 s of Ray Train start-up on 2 cores)."""

# What the rule may change; everything else must equal the shipped recipe.
ALLOWED = (
    "data.train_manifest",
    "data.val_manifest",
    "data.resolution",
    "data.eval_resize",
    "data.eval_crop",
    "data.batch_size_per_worker",
    "data.loader_workers",
    "data.shuffle_buffer",
    "train.epochs",
    "optim.warmup_epochs",
    "optim.step_milestones",
    "optim.step_size",
    "train.ema.every_steps",
    "finetune.head_epochs",
    "scaling.num_workers",
    "scaling.use_gpu",
    "scaling.cpus_per_worker",
    "checkpoint.storage_path",
    "tracking.uri",
)


def _ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


def _compress_schedule(tree: dict, epochs: int) -> dict[str, object]:
    """The recipe's epoch-valued fields scaled to ``epochs`` (a warm-up stays a warm-up, a step stays a
    step, a two-stage run keeps both stages), so the shrunk schedule has the recipe's shape."""
    optim, train = tree.get("optim", {}), tree.get("train", {})
    scale = epochs / train.get("epochs", 90)
    warmup = min(1, optim.get("warmup_epochs", 0), epochs - 1)  # a warm-up needs an epoch after it
    changes: dict[str, object] = {"train.epochs": epochs, "optim.warmup_epochs": warmup}
    if optim.get("schedule") == "multistep":
        milestones = optim.get("step_milestones", [30, 60, 80])
        changes["optim.step_milestones"] = sorted(
            {min(epochs, max(warmup + 1, round(m * scale))) for m in milestones}
        )
    if optim.get("schedule") == "step":  # a decay inside the run, after the warm-up epoch
        changes["optim.step_size"] = max(1, min(epochs - 1, round(optim.get("step_size", 30) * scale)))
    if train.get("ema", {}).get("enabled"):
        changes["train.ema.every_steps"] = 1  # a few steps per epoch: the average must move to be tested
    if "finetune" in tree and tree["finetune"].get("strategy") == "two_stage":
        changes["finetune.head_epochs"] = 1
    return changes


def smoke_overrides(
    tree: dict, *, manifests: dict[str, str], workdir: Path, ray_workers: int, epochs: int = SMOKE_EPOCHS
) -> dict:
    """The one shrinking rule: dotted key -> value for a PretrainConfig/FinetuneConfig-shaped ``tree``."""
    data = tree.get("data", {})
    # FixRes sizes keep their ratio to the training crop.
    fixres = {
        f"data.{key}": round(data[key] * SMOKE_RESOLUTION / data.get("resolution", 64))
        for key in ("eval_resize", "eval_crop")
        if data.get(key) is not None
    }
    return {
        "data.train_manifest": manifests["train"],
        "data.val_manifest": manifests["val"],
        "data.resolution": SMOKE_RESOLUTION,
        **fixres,
        "data.batch_size_per_worker": 8,
        "data.loader_workers": 0,
        "data.shuffle_buffer": min(64, data.get("shuffle_buffer", 2000)),
        **_compress_schedule(tree, epochs),
        "scaling.num_workers": ray_workers,
        "scaling.use_gpu": False,
        "scaling.cpus_per_worker": 1,
        "checkpoint.storage_path": str(workdir / "checkpoints"),
        "tracking.uri": f"sqlite:///{workdir / 'mlflow.db'}",
    }


def _argv(overrides: dict, prefix: str = "") -> list[str]:
    def text(value) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        return f"[{', '.join(map(str, value))}]" if isinstance(value, list) else str(value)

    return [f"{prefix}{key}={text(value)}" for key, value in overrides.items()]


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One MLflow store for the module: fine-tuning recipes find their sources registered by the
    pre-training recipes, exactly as a user's registry would hold them."""
    return tmp_path_factory.mktemp("recipes")


@pytest.fixture(scope="module")
def tiny_data(workdir):
    """Embedded shards at 32 px: 10 pretrain classes (8 train / 4 val each), 4 downstream classes."""
    from pipeline.data.prepare import prepare_embedded

    toy = ToyConfig(
        root=str(workdir / "raw"),
        image_size=32,
        pretrain_train_per_class=8,
        pretrain_val_per_class=4,
        downstream_train_max=12,
        downstream_val_per_class=4,
        downstream_imbalance=3.0,
    )
    return prepare_embedded(
        toy, ShardConfig(dest=str(workdir / "shards"), samples_per_shard=40, workers=1)
    ).manifests


def _run_training(path: Path, tiny_data, workdir):
    """Run one pre-training or fine-tuning recipe through its driver; returns (cfg, outcome)."""
    finetune = path.parent.name == "finetune"
    tree = read_yaml(path)
    overrides = smoke_overrides(
        tree,
        manifests=tiny_data["downstream" if finetune else "pretrain"],
        workdir=workdir,
        ray_workers=0,
    )
    if finetune:
        from pipeline.finetune import run_finetune

        _ensure_source(tree["finetune"]["source"], tiny_data, workdir)
        cfg = load_config(FinetuneConfig, path, _argv(overrides))
        return cfg, run_finetune(cfg)
    from pipeline.pretrain import run_pretrain

    cfg = load_config(PretrainConfig, path, _argv(overrides))
    return cfg, run_pretrain(cfg)


_done: dict[Path, tuple] = {}


def _trained(path: Path, tiny_data, workdir):
    if path not in _done:
        _done[path] = _run_training(path, tiny_data, workdir)
    return _done[path]


def _ensure_source(source: str, tiny_data, workdir) -> None:
    """A fine-tuning recipe's ``models:/NAME@ALIAS`` comes from the pre-training recipe registering NAME."""
    if not source.startswith("models:/"):
        return
    name = source.removeprefix("models:/").split("@")[0]
    makers = [p for p in PRETRAIN if read_yaml(p).get("tracking", {}).get("register_as") == name]
    assert makers, f"no shipped pre-training recipe registers {name!r}, the source of a fine-tuning recipe"
    _trained(makers[0], tiny_data, workdir)


def test_every_experiment_base_recipe_is_a_shipped_recipe_covered_here():
    covered = {p.relative_to(REPO).as_posix() for p in PRETRAIN + FINETUNE}
    for experiment in sorted((REPO / "configs" / "experiments").glob("*.yaml")):
        tree = read_yaml(experiment)
        recipes = [
            tree["recipe"],
            *([tree["source"]["recipe"]] if "recipe" in tree.get("source", {}) else []),
        ]
        for recipe in recipes:
            assert recipe in covered, f"{experiment.name}: base recipe {recipe} is not run by the smoke tests"


@pytest.mark.parametrize("path", PRETRAIN + FINETUNE, ids=_ids(PRETRAIN + FINETUNE))
def test_recipe_runs_end_to_end_with_its_own_flags(path, tiny_data, workdir):
    from mlflow import MlflowClient

    config_type = FinetuneConfig if path.parent.name == "finetune" else PretrainConfig
    cfg, outcome = _trained(path, tiny_data, workdir)

    # The rule changed only what it may: every other field is the shipped recipe's.
    shipped = _flatten(to_dict(load_config(config_type, path)))
    ran = _flatten(to_dict(cfg))
    changed = {k for k in ran.keys() | shipped.keys() if ran.get(k) != shipped.get(k)}
    assert changed <= set(ALLOWED), f"the smoke rule changed recipe fields {sorted(changed - set(ALLOWED))}"

    assert outcome.epochs_completed == SMOKE_EPOCHS
    digests = outcome.final_metrics["param_digests"].split(",")
    assert len(digests) == 1 and len(digests[0]) == 16
    client = MlflowClient(outcome.tracking_uri)
    run = client.get_run(outcome.mlflow_run_id)
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/top1"))
    assert steps == list(range(SMOKE_EPOCHS))
    assert all(math.isfinite(m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert run.data.params["train.channels_last"] == str(cfg.train.channels_last)
    # Dataset lineage in the UI's Datasets column: both splits, named and digested.
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    split = "downstream" if path.parent.name == "finetune" else "pretrain"
    assert {c: d.name for c, d in inputs.items()} == {
        "training": f"{split}/train",
        "validation": f"{split}/val",
    }
    assert run.data.tags["dataset.manifest_digest"].startswith(inputs["training"].digest)
    # MLflow's system metrics (CPU and memory here), sampled by the training rank, once per epoch.
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert sorted(m.step for m in cpu) == list(range(SMOKE_EPOCHS)) and all(m.value >= 0 for m in cpu)
    memory = run.data.metrics["system/system_memory_usage_megabytes"]
    assert 0 < memory < psutil.virtual_memory().total / 1e6
    if cfg.tracking.register_as:
        assert outcome.registration is not None and outcome.registration.name == cfg.tracking.register_as


@pytest.fixture
def search_ray(local_ray):
    """The session's local Ray instance, for every search in this module (each trial a 1-worker Train run)."""


def _search_recipe(tree: dict) -> dict:
    """A search's recipe tree with the search's shared changes applied."""
    return deep_merge(read_yaml(REPO / tree["recipe"]), tree.get("pretrain", {}))


def search_smoke_overrides(tree: dict, *, manifests: dict[str, str], workdir: Path) -> dict:
    """The same rule for a search: its recipe shrunk as above (one Ray worker per trial), SEARCH_SMOKE_TRIALS
    trials, searched resolutions scaled like the recipe's. The FLOPs budget stays as shipped: it is still
    applied to every candidate (at 32 px all pass; scaled by px^2 it would reject most, since the fixed
    head's share of the MACs grows as the image shrinks). A two-stage fine-tuning search trains 2 epochs
    (one per stage), and a searched head-stage length is held to the first."""
    recipe = _search_recipe(tree)
    two_stage = recipe.get("finetune", {}).get("strategy") == "two_stage"
    epochs = max(SEARCH_SMOKE_EPOCHS, 2) if two_stage else SEARCH_SMOKE_EPOCHS
    overrides = smoke_overrides(recipe, manifests=manifests, workdir=workdir, ray_workers=1, epochs=epochs)
    changes = {f"pretrain.{key}": value for key, value in overrides.items()}
    head_epochs = tree.get("space", {}).get("extra", {}).get("finetune.head_epochs")
    if two_stage and head_epochs is not None:
        # The whole space.extra: a dotted override path cannot name a key that holds dots, and a mapping
        # given for space.extra replaces it.
        held = {"type": "choice", "values": [overrides["finetune.head_epochs"]]}
        changes["space.extra"] = {**tree["space"]["extra"], "finetune.head_epochs": held}
    grace_period = tree.get("search", {}).get("grace_period", 1)
    changes.update(
        {
            "search.grace_period": min(grace_period, epochs),  # a rung within the shrunk budget
            "search.num_trials": SEARCH_SMOKE_TRIALS,
            "search.max_concurrent_trials": 2,
            "search.storage_path": str(workdir / "tune"),
        }
    )
    factor = overrides["data.resolution"] / recipe.get("data", {}).get("resolution", 64)
    scaling = tree.get("space", {}).get("scaling", {})
    if scaling.get("mode") == "direct" and "values" in scaling.get("resolution", {}):
        changes["space.scaling.resolution.values"] = [
            max(8, round(r * factor)) for r in scaling["resolution"]["values"]
        ]
    return changes


def _search_argv(path: Path, tiny_data, workdir: Path, *extra: str) -> list[str]:
    """A search recipe's smoke command line; a fine-tuning search runs on the downstream task, its source
    registered by the shipped pre-training recipe that makes it (as a user would run them)."""
    tree = read_yaml(path)
    recipe = _search_recipe(tree)
    if "finetune" in recipe:
        _ensure_source(recipe["finetune"]["source"], tiny_data, workdir)
    manifests = tiny_data["downstream" if "finetune" in recipe else "pretrain"]
    overrides = search_smoke_overrides(tree, manifests=manifests, workdir=workdir)
    return ["--config", str(path), *_argv(overrides), *extra]


# Searches run end to end in their own, longer tests: running them here again would only repeat them.
RUN_ELSEWHERE = {"toy_asha": "test_multinode.py", "toy_pbt": "test_recipes.py"}


def test_searches_run_elsewhere_really_are():
    for stem, test_file in RUN_ELSEWHERE.items():
        assert f"configs/tune/{stem}.yaml" in (REPO / "tests" / test_file).read_text(), (stem, test_file)


@pytest.mark.ray
@pytest.mark.parametrize(
    "path",
    [p for p in TUNE if p.stem not in RUN_ELSEWHERE],
    ids=_ids([p for p in TUNE if p.stem not in RUN_ELSEWHERE]),
)
def test_search_recipe_runs_end_to_end(path, tiny_data, workdir, search_ray, capsys):
    """Each shipped search with its own sampler (random, tpe), scheduler (asha, hyperband, median) and
    space, on a pre-training or a fine-tuning recipe."""
    from mlflow import MlflowClient

    from jobs.tune import main
    from pipeline.config import TuneConfig

    code = main(_search_argv(path, tiny_data, workdir))
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    assert (
        out.out.count("\ntrial ") == SEARCH_SMOKE_TRIALS and "<- best" in out.out and "failed" not in out.out
    )
    assert "best config: " in out.out
    register_as = read_yaml(path).get("pretrain", {}).get("tracking", {}).get("register_as")
    if register_as:
        assert f"registered {register_as} version" in out.out

    # The parent run records the sampler and scheduler that ran, and each trial's values come from the space.
    shipped = load_config(TuneConfig, path)
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(shipped.pretrain["tracking"]["experiment"])
    runs = client.search_runs([experiment.experiment_id], max_results=50)
    parent = next(r for r in runs if r.info.run_name == shipped.search.name and r.info.status == "FINISHED")
    assert parent.data.params["search.sampler"] == shipped.search.sampler
    assert parent.data.params["search.scheduler"] == shipped.search.scheduler
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(int(c.data.params["trial.index"]) for c in children) == list(range(SEARCH_SMOKE_TRIALS))
    for name, entry in shipped.space.extra.items():
        values = [c.data.params[name] for c in children]
        if entry.type in ("loguniform", "uniform"):
            assert all(entry.low <= float(v) <= entry.high for v in values), (name, values)
    if "finetune" in _search_recipe(read_yaml(path)):
        # The source was fetched once by the driver (its lineage on the parent) and every trial started from it.
        assert any(key.startswith("source.") for key in parent.data.tags), parent.data.tags
        assert (Path(parent.data.tags["pipeline.search_url"]) / "source" / "model.pt").is_file()


@pytest.mark.ray
def test_pbt_trials_continue_from_a_better_trials_state_with_its_lr_and_decay_perturbed(
    tiny_data, tmp_path, search_ray, capsys
):
    """configs/tune/toy_pbt.yaml with a population of 2 (one exploits the other at each decision), decisions
    every 2 of 12 epochs (five chances: PBT clones only a trial it saved at an earlier decision) and no
    resampling, so every change is the donor's value x 0.8 or x 1.2."""
    from jobs.tune import main

    toy = REPO / "configs" / "tune" / "toy_pbt.yaml"
    argv = _search_argv(toy, tiny_data, tmp_path, "pretrain.train.epochs=12", "search.num_trials=2")
    argv += [
        "search.quantile_fraction=0.5",
        "search.resample_probability=0.0",
        "pretrain.tracking.experiment=pbt",
    ]
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 0, out[-2000:]
    # Each trial once in the summary, by its own index: an exploit copies the donor's whole config.
    assert out.count("\ntrial ") == 2 and "\ntrial 0: " in out and "\ntrial 1: " in out and "<- best" in out

    # Each exploit started a Train run of its own from the copied state of the other trial.
    trials = tmp_path / "tune" / "toy-pbt" / "trials"
    exploits = sorted(p.name for p in trials.glob("train-*-at*"))
    assert exploits, sorted(p.name for p in trials.iterdir())
    assert list((trials / "pbt-states").rglob("epoch-*.pt"))

    client, parent, children = _search_runs(tmp_path, "pbt")
    assert parent.info.status == "FINISHED" and parent.data.params["search.scheduler"] == "pbt"

    def series(run, key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}

    lrs = {c.info.run_id: series(c, "pbt/lr") for c in children}
    decays = {c.info.run_id: series(c, "pbt/weight_decay") for c in children}
    changed = 0
    for child in children:
        mine, other = lrs[child.info.run_id], next(v for k, v in lrs.items() if k != child.info.run_id)
        my_decay = decays[child.info.run_id]
        other_decay = next(v for k, v in decays.items() if k != child.info.run_id)
        steps = sorted(mine)
        for before, step in zip(steps, steps[1:], strict=False):
            if mine[step] == mine[before] and my_decay[step] == my_decay[before]:
                continue
            # Explored from the donor's values when it was copied: its last epoch logged before this one (a
            # donor restarted by an exploit of its own may have no point at every epoch).
            copied = max(s for s in other if s < step)
            changed += 1
            assert any(mine[step] == pytest.approx(other[copied] * f) for f in (0.8, 1.2)), (
                step,
                mine,
                other,
            )
            assert any(my_decay[step] == pytest.approx(other_decay[copied] * f) for f in (0.8, 1.2))
        # The loop's own lr (constant after the warm-up epoch) follows the perturbed value: the state's
        # schedule was retargeted, not restored at the donor's lr.
        trained = series(child, "train/lr")
        ratios = {round(trained[step] / mine[step], 9) for step in mine if step >= 1}
        assert len(ratios) == 1, (trained, mine)
    assert changed >= 1, lrs


# --------------------------------------------------------------------------------------------------------
# A search tells the truth about failed trials. The failure is a real one, raised in the Train worker by the
# first optimizer step: a learning rate of 1e300 does not fit float32 parameters ("RuntimeError: value cannot
# be converted to type float without overflow"), a deterministic error that the launcher must not retry.

OVERFLOW_LR = "1.0e300"


def _search_runs(workdir: Path, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=50)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return client, parent, children


@pytest.mark.ray
def test_a_search_whose_trials_all_fail_exits_1_and_publishes_nothing(
    tiny_data, tmp_path, search_ray, capsys
):
    from jobs.tune import main

    toy = REPO / "configs" / "tune" / "toy_asha.yaml"
    space = f"space.extra={{optim.lr: {{type: fixed, values: [{OVERFLOW_LR}]}}}}"
    argv = _search_argv(toy, tiny_data, tmp_path, space, "pretrain.checkpoint.max_failures=2")
    # One trial is enough for "all failed" (the mixed case below has two).
    argv += ["search.num_trials=1", "pretrain.tracking.experiment=all-fail"]
    argv += ["pretrain.tracking.register_as=never-registered"]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1, err[-2000:]
    line = next(line for line in err.splitlines() if line.startswith("tune: failed:"))
    assert "all 1 of 1 trials failed; first error (trial 0): rank 0 raised RuntimeError" in line, line
    assert "overflow" in line and "not retried" in line, line
    assert len(line) < 500
    assert not list((tmp_path / "tune").rglob("best_config.yaml"))

    client, parent, children = _search_runs(tmp_path, "all-fail")
    assert parent.info.status == "FAILED"
    assert parent.data.tags["search.failed_trials"] == "1 of 1"
    assert len(children) == 1 and all(c.info.status == "FAILED" for c in children)
    # Told apart from a lost worker: failed at once instead of after max_failures=2 restarts.
    errors = [c.data.tags["error"] for c in children]
    assert all("RuntimeError" in e and "not retried" in e for e in errors), errors
    assert not client.search_registered_models("name='never-registered'")


@pytest.mark.ray
def test_a_failed_trial_is_never_the_best_and_the_summary_says_why(tiny_data, tmp_path, search_ray, capsys):
    from jobs.tune import main

    toy = REPO / "configs" / "tune" / "toy_asha.yaml"
    # Trial 0 draws the overflowing lr (fails in its worker), trial 1 a sane one (trains): seed 1.
    space = f"space.extra={{optim.lr: {{type: choice, values: [{OVERFLOW_LR}, 1.0e-3]}}}}"
    argv = _search_argv(toy, tiny_data, tmp_path, space, "search.seed=1", "search.scheduler=none")
    argv += ["search.num_trials=2", "pretrain.tracking.experiment=some-fail"]
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 0
    _, parent, children = _search_runs(tmp_path, "some-fail")
    by_index = {int(c.data.params["trial.index"]): c for c in children}
    lrs = {i: float(c.data.params["optim.lr"]) for i, c in by_index.items()}
    assert lrs == {0: float(OVERFLOW_LR), 1: 1.0e-3}, lrs
    assert by_index[0].info.status == "FAILED" and by_index[1].info.status == "FINISHED"
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best/trial"] == 1
    assert parent.data.tags["search.failed_trials"] == "1 of 2"
    assert "overflow" in parent.data.tags["search.first_error"]
    assert "1 of 2 trials failed (never chosen as best); first: trial 0: " in out
    assert f"trial 1: {SEARCH_SMOKE_EPOCHS} epochs" in out and out.split("trial 1: ")[1].splitlines()[
        0
    ].endswith("<- best")


def test_the_guard_stops_only_errors_a_restart_would_repeat():
    from ray.exceptions import ActorDiedError
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    from pipeline.launch_callbacks import DeterministicErrorGuard, DeterministicWorkerError

    guard = DeterministicErrorGuard()
    lost = WorkerHealthCheckFailedError("worker 1 died", ActorDiedError())
    retried = [
        {1: lost},  # a dead process or node
        {
            0: RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer"),
            1: lost,
        },
        {
            0: RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1800000ms")
        },  # its peer
        {0: ConnectionResetError("s3 read")},  # I/O that may work next time
        {0: __import__("torch").distributed.DistBackendError("NCCL communicator was aborted")},
    ]
    for errors in retried:
        guard.after_exception(None, errors)  # returns: Ray Train restarts the group
    with pytest.raises(ControllerError, match=r"rank 0 raised KeyError: 'head'.*not retried") as raised:
        guard.after_exception(None, {0: KeyError("head"), 1: KeyError("head")})
    # A damaged shard on rank 1: rank 0 only sees its collective break, which alone would be retried.
    from pipeline.data.loader import LoaderError

    damaged = LoaderError("s3://b/train/shard-000003.tar: tar member at byte 512 is cut short")
    broken = RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    assert isinstance(
        raised.value.controller_failure, DeterministicWorkerError
    )  # a failure Ray never retries
    with pytest.raises(ControllerError, match=r"rank 1 raised LoaderError: .*shard-000003.tar"):
        guard.after_exception(None, {0: broken, 1: damaged})


@pytest.mark.ray
def test_a_shard_damaged_in_place_ends_a_ray_run_at_once_or_is_skipped_and_counted(
    tiny_data, tmp_path, search_ray, capsys
):
    """A training shard with a JPEG zeroed in place (same size: the size check passes it). In a 2-worker Ray
    Train run allowed 2 restarts, data.on_corrupt=fail ends the job with one line naming the shard and no
    restart (one worker group was started); skip finishes it, and the epoch's data/skipped metric in MLflow
    counts it."""
    import shutil

    from imgtree import corrupt_in_place
    from mlflow import MlflowClient
    from ray.util.state import list_actors

    from jobs.pretrain import main

    source = Path(tiny_data["pretrain"]["train"]).parent
    damaged = tmp_path / "train"
    shutil.copytree(source, damaged)
    shard = sorted(damaged.glob("*.tar"))[0]
    corrupt_in_place(shard, image=1)
    recipe = REPO / "configs" / "pretrain" / "toy_resnet20.yaml"
    manifests = {**tiny_data["pretrain"], "train": str(damaged / "manifest.json")}
    overrides = {
        **smoke_overrides(read_yaml(recipe), manifests=manifests, workdir=tmp_path, ray_workers=2, epochs=1),
        "checkpoint.max_failures": 2,
        "tracking.system_metrics": False,
    }

    def worker_groups_started() -> int:
        return len(list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=10_000)) // 2

    before = worker_groups_started()
    capsys.readouterr()
    code = main(["--config", str(recipe), *_argv(overrides), "checkpoint.name=fail"])
    err = capsys.readouterr().err
    assert code == 1, err[-3000:]
    # The job's own report is one line naming the shard; Ray's worker and controller logs above it carry the
    # error once each (measured before: 2 restarts, 10 tracebacks).
    (report,) = [line for line in err.splitlines() if line.startswith("pretrain: failed:")]
    assert report.startswith("pretrain: failed: rank ") and "cannot decode sample" in report, err[-3000:]
    assert shard.name in report and report.endswith("not retried)"), err[-3000:]
    assert err.count("Traceback (most recent call last)") <= 2, err[-5000:]
    assert worker_groups_started() == before + 1, "the worker group was restarted"

    # In Ray Train's local mode (the same worker function, without a second ~12 s worker group start).
    skip = [
        "checkpoint.name=skip",
        "scaling.num_workers=0",
        "data.on_corrupt=skip",
        "data.max_corrupt_fraction=0.1",
    ]
    code = main(["--config", str(recipe), *_argv(overrides), *skip])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "attributes.status = 'FINISHED'"
    )
    assert run.data.metrics["data/skipped"] >= 1


def test_local_mode_raises_the_training_error_as_a_launch_error(tmp_path):
    """num_workers=0 runs the training function in this process (Ray Train's local mode, no Ray started):
    its error reaches the job as one LaunchError, like a distributed run's."""
    from pipeline.config import CheckpointConfig, ScalingConfig
    from pipeline.launch import LaunchError, launch

    def train_fn(spec):
        raise KeyError(spec["missing"])

    with pytest.raises(LaunchError, match="KeyError"):
        launch(
            train_fn,
            spec={"missing": "head"},
            scaling=ScalingConfig(num_workers=0),
            checkpoint=CheckpointConfig(),
            storage_path=str(tmp_path),
            name="local",
            metric="val/top1",
            mode="max",
        )


def test_a_resolution_too_small_for_the_architecture_is_a_config_error(tiny_data, tmp_path, capsys):
    from jobs.pretrain import main

    recipe = REPO / "configs" / "pretrain" / "convnext_tiny_imagenet.yaml"
    overrides = smoke_overrides(
        read_yaml(recipe), manifests=tiny_data["pretrain"], workdir=tmp_path, ray_workers=0
    )
    code = main(["--config", str(recipe), *_argv(overrides), "data.resolution=8"])
    err = capsys.readouterr().err
    assert code == 2
    assert "pretrain: config error: data.resolution: 8 px is too small for convnext_tiny" in err, err[-1500:]
    assert not (tmp_path / "mlflow.db").exists(), "refused before an MLflow run was opened"


# ------------------------------------------------------------------------------------------------------
# The ImageNet recipes against the published hyperparameters behind torchvision's weights (and the
# papers' where torchvision publishes no recipe). Source of each row: the recipe file's header. "lr" is the
# published peak lr at the published global batch ("batch"); a recipe may run another global batch as long
# as its lr follows the linear scaling rule from that point.

# torchvision references/classification, train.py defaults (ResNet*_Weights.IMAGENET1K_V1): the same for 18 and 34
_TORCHVISION_V1 = {
    "batch": 256,
    "lr": 0.1,
    "optim.name": "sgd",
    "optim.momentum": 0.9,
    "optim.weight_decay": 1e-4,
    "optim.schedule": "step",
    "optim.step_size": 30,
    "optim.step_gamma": 0.1,
    "optim.schedule_unit": "epoch",
    "optim.warmup_epochs": 0,
    "train.epochs": 90,
    "data.resolution": 224,
    "data.eval_resize": 256,
    "data.eval_crop": 224,
    "data.min_crop_scale": 0.08,
    "data.augment": "basic",
    "optim.label_smoothing": 0.0,
    "train.ema.enabled": False,
}


# torchvision's V2-style recipe, shared by its ResNet-50 (IMAGENET1K_V2) and ConvNeXt weights
_TORCHVISION_V2 = {
    "batch": 1024,
    "optim.schedule": "cosine",
    "optim.schedule_unit": "epoch",
    "optim.warmup_epochs": 5,
    "optim.warmup_method": "linear",
    "optim.warmup_factor": 0.01,
    "train.epochs": 600,
    "data.augment": "trivialaugment",
    "data.random_erasing": 0.1,
    "optim.label_smoothing": 0.1,
    "train.mixup_alpha": 0.2,
    "train.cutmix_alpha": 1.0,
    "data.resolution": 176,
    "data.eval_resize": 232,
    "data.eval_crop": 224,
    "data.repeated_augment": 4,
    "train.ema.enabled": True,
    "train.ema.decay": 0.99998,
    "train.ema.every_steps": 32,
}


PUBLISHED: dict[str, dict[str, object]] = {
    "resnet18_imagenet": {"model.name": "resnet18", **_TORCHVISION_V1},
    "resnet34_imagenet": {"model.name": "resnet34", **_TORCHVISION_V1},
    # torchvision's "How to train state-of-the-art models" (ResNet50_Weights.IMAGENET1K_V2, 80.86%)
    "resnet50_imagenet": {
        "model.name": "resnet50",
        "lr": 0.5,
        "optim.name": "sgd",
        "optim.momentum": 0.9,
        "optim.weight_decay": 2e-5,
        **_TORCHVISION_V2,
    },
    # torchvision's ConvNeXt recipe (ConvNeXt_Tiny_Weights.IMAGENET1K_V1, 82.52%): ResNet-50 V2's with AdamW
    "convnext_tiny_imagenet": {
        "model.name": "convnext_tiny",
        "lr": 1e-3,
        "optim.name": "adamw",
        "optim.weight_decay": 0.05,
        "model.stochastic_depth": 0.1,
        **_TORCHVISION_V2,
    },
    # torchvision's MobileNetV2 recipe = Sandler et al.'s hyperparameters with SGD (71.88%)
    "mobilenet_v2_imagenet": {
        "model.name": "mobilenet_v2",
        "batch": 256,
        "lr": 0.045,
        "optim.name": "sgd",
        "optim.momentum": 0.9,
        "optim.weight_decay": 4e-5,
        "optim.schedule": "exponential",
        "optim.exponential_gamma": 0.98,
        "optim.schedule_unit": "epoch",
        "optim.warmup_epochs": 0,
        "train.epochs": 300,
        "data.resolution": 224,
        "data.eval_resize": 256,
        "data.eval_crop": 224,
        "model.dropout": 0.2,
    },
    # Tan & Le (torchvision ports the B0 weights; no SGD/AdamW recipe is published): what carries over
    "efficientnet_b0_imagenet": {
        "model.name": "efficientnet_b0",
        "train.epochs": 350,
        "optim.warmup_epochs": 5,
        "optim.label_smoothing": 0.1,
        "data.augment": "autoaugment",
        "model.dropout": 0.2,
        "model.stochastic_depth": 0.2,
        "data.resolution": 224,
        "train.ema.enabled": True,
    },
}


@pytest.mark.parametrize("stem", sorted(PUBLISHED))
def test_imagenet_recipe_holds_the_published_hyperparameters(stem):
    expected = dict(PUBLISHED[stem])
    cfg = load_config(PretrainConfig, REPO / "configs" / "pretrain" / f"{stem}.yaml")
    flat = _flatten(to_dict(cfg))
    batch, lr = expected.pop("batch", None), expected.pop("lr", None)
    mismatched = {key: (flat[key], value) for key, value in expected.items() if flat[key] != value}
    assert not mismatched, f"{stem}: (recipe, published) {mismatched}"
    if batch is not None:
        shipped_batch = cfg.data.batch_size_per_worker * cfg.scaling.num_workers * cfg.train.accumulate_steps
        shipped_lr = cfg.optim.lr * shipped_batch / cfg.optim.reference_batch_size
        assert shipped_lr == pytest.approx(lr * shipped_batch / batch), "lr off the linear scaling rule"
        assert shipped_batch == batch, f"{stem}: the published global batch is {batch}"


def test_every_imagenet_recipe_is_in_the_published_table():
    shipped = {p.stem for p in PRETRAIN if p.stem.endswith("_imagenet")}
    assert shipped == set(PUBLISHED), sorted(shipped ^ set(PUBLISHED))

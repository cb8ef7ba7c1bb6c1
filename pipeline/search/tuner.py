"""Ray Tune, the only module that imports it: one Tune trial per candidate, each trial a Ray Train DDP run.

The pattern Ray 2.60 recommends for Train inside Tune (facts.md): the Tune trainable is a small *driver*
function that builds a ``TorchTrainer`` named ``train-<trial id>`` with ``TuneReportCallback`` and calls
``fit()``; the Train workers' per-epoch ``ray.train.report`` reaches the Tune scheduler through that
callback, so ASHA / HyperBand / the median rule can stop a trial after any epoch. The driver function asks
Tune for almost no CPU (``{"cpu": 0.01}``); Tune does not count the Train workers, so the search bounds
``max_concurrent_trials`` to what the cluster holds.

A deterministic Train run name per trial means a trial restarted after the search driver died resumes from
its own last epoch checkpoint rather than from scratch.

Samplers: random and grid candidates are a list made up front (a ``grid_search`` over them, in trial order);
tpe is Tune's ``OptunaSearch`` with a define-by-run space that draws through the same
:func:`pipeline.search.space.draw_overrides`, so every trial's config has the same shape,
``{"trial": {"index", "overrides"}}`` (a tpe trial's index is Optuna's trial number: the order TPE chose
them in).

The fixed cost of a trial, measured on 2 cores (benchmarks/bench_tune.py --startup): three fresh processes
each import torch in turn (the trial's driver, Ray Train's controller, the worker), beside four light Ray
helpers (Tune's report queue, Train's placement-group cleaner, sync and preemption-watcher actors). On a
local instance the trials run with :data:`pipeline.launch.LOCAL_RUN_ENV` (no preemption watcher, workers polled every
0.5 s), set in each trial's process, whose Train controller inherits it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ray import tune

from pipeline.config import ParamSpace, PretrainConfig, SearchConfig, SearchSpace
from pipeline.data import storage
from pipeline.launch import STATE_FILE, ensure_ray, launch, local_run_env, pretrain_worker
from pipeline.launch_callbacks import PBT_STATES, TRACKED_KEY, ReportRelay, log_points
from pipeline.pretrain import ray_datasets
from pipeline.search.space import apply_overrides, draw_overrides
from pipeline.specs import StartFrom, TrialSpec, WorkerSpec

TRIAL_TAG = "tune.trial_id"
PBT_POINTER = "pbt_state.json"
"""The file of a PBT trial's Tune checkpoint: which state to continue from, and its lr and weight decay."""
PBT_KEYS = ("pbt/lr", "pbt/weight_decay")
"""Reported by PBT trials every epoch: the values they trained that epoch with (the schedule PBT found)."""


LIST_TRIAL_ID = r"[0-9a-f]{5}_(\d{5})"
"""Tune's id of a trial from a list of candidates: the experiment's hex prefix and the candidate's place."""


def trial_key(config: dict[str, Any], trial_id: str) -> tuple[int, dict[str, Any]]:
    """(index, overrides) of a trial from its Tune config and id. A trial of a list of candidates takes its
    index from the id's counter (``<hex>_<00007>``: the candidate's place in the list), not from the config:
    under PBT an exploit replaces the whole config with the donor's, index included. A TPE trial's id has no
    counter; its index is Optuna's trial number in the config."""
    counter = re.fullmatch(LIST_TRIAL_ID, trial_id)
    index = int(counter.group(1)) if counter else int(config["trial"]["index"])
    return index, dict(config["trial"]["overrides"])


@dataclass(frozen=True)
class TrialResult:
    index: int
    trial_id: str
    overrides: dict[str, Any]
    history: list[tuple[int, float]]
    """(epoch, objective) for every epoch the trial reported."""
    last: dict[str, Any]
    """The trial's last reported result (Train metrics plus Tune's bookkeeping)."""
    error: str | None


def trial_fn(config: dict[str, Any], spec: TrialSpec, source_url: str | None, env: dict[str, str]) -> None:
    """One trial: apply its candidate to the base config and train with DDP. It never talks to MLflow: its
    reports reach Tune through ``TuneReportCallback`` (or, under Population Based Training, through
    :func:`_population_trial`), and :class:`TrialRuns` logs them on the driver.
    ``source_url``: a fine-tuning search's staged source weights; ``env``: Ray Train settings for the run."""
    from ray.tune.integration.ray_train import TuneReportCallback

    for key, value in env.items():
        os.environ.setdefault(key, value)
    trial_id = tune.get_context().get_trial_id()
    index, overrides = trial_key(config, trial_id)
    cfg = apply_overrides(spec.base, overrides)
    worker = WorkerSpec(config=cfg, run_name=f"trial-{index:03d}", source_url=source_url)
    run = functools.partial(
        launch,
        pretrain_worker,
        scaling=cfg.scaling,
        checkpoint=cfg.checkpoint,
        storage_path=spec.train_storage,
        metric=cfg.train.watched_metric,
        mode=cfg.train.early_stopping.mode,
        datasets=ray_datasets(cfg),
        fetch_checkpoint=False,
    )
    if spec.perturbation_interval is None:
        run(spec=worker, name=f"train-{trial_id}", callbacks=[TuneReportCallback()])
    else:
        _population_trial(run, worker, spec=spec, trial_id=trial_id)


def _population_trial(run: Callable[..., Any], worker: WorkerSpec, *, spec: TrialSpec, trial_id: str) -> None:
    """A Population Based Training trial: its Train run in a thread, every report relayed to Tune by this
    one, with a checkpoint at every ``perturbation_interval``-th epoch: a small file pointing at the copy of
    that epoch's state (:class:`~pipeline.launch_callbacks.ReportRelay`), with the lr and weight decay it was
    trained with. When PBT makes this trial exploit another, Tune restarts it with that trial's pointer and
    a perturbed config: the trial starts a new Train run from the state, its schedule retargeted
    (:func:`~pipeline.train.state.retarget_state`). The run's name follows from the pointer, so a restart of
    the same step resumes that run."""
    import threading

    from ray.util.queue import Empty, Queue

    cfg, interval = worker.config, spec.perturbation_interval
    assert interval is not None
    name = f"train-{trial_id}"
    start = tune.get_checkpoint()
    if start is not None:
        with start.as_directory() as directory:
            pointer = json.loads((Path(directory) / PBT_POINTER).read_text())
        worker = replace(
            worker,
            start_from=StartFrom(
                state_url=pointer["state_url"],
                lr=pointer["optim.lr"],
                weight_decay=pointer["optim.weight_decay"],
            ),
        )
        digest = hashlib.sha1(pointer["state_url"].encode()).hexdigest()[:8]
        name = f"train-{trial_id}-at{int(pointer['epochs']):04d}-{digest}"
    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    failure: list[BaseException] = []

    def train() -> None:
        try:
            run(
                spec=worker,
                name=name,
                callbacks=[ReportRelay(queue, keep_every=interval, state_file=STATE_FILE)],
            )
        except BaseException as error:  # raised again in the trial's own thread, as Tune expects
            failure.append(error)

    thread = threading.Thread(target=train, name=f"pbt-{trial_id}", daemon=True)
    thread.start()
    while True:
        try:
            item = queue.get(timeout=1.0)
        except Empty:
            if thread.is_alive():
                continue
            try:  # the last report may have come just before the run ended
                item = queue.get_nowait()
            except Empty:
                break
        metrics = {
            **item["metrics"],
            "train_run": name,
            "pbt/lr": cfg.optim.lr,
            "pbt/weight_decay": cfg.optim.weight_decay,
        }
        if item["state"] is None:
            tune.report(metrics)
            continue
        with tempfile.TemporaryDirectory(prefix="pipeline-pbt-") as directory:
            pointer = {
                "state_url": storage.join(spec.train_storage, PBT_STATES, name, item["state"]),
                "epochs": int(item["metrics"]["epoch"]) + 1,
                "optim.lr": cfg.optim.lr,
                "optim.weight_decay": cfg.optim.weight_decay,
            }
            (Path(directory) / PBT_POINTER).write_text(json.dumps(pointer))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
    thread.join()
    if failure:
        raise failure[0]


class TrialRuns(tune.Callback):
    """Each trial's nested MLflow run, written from the search's driver process (where Tune runs its
    callbacks): created when the trial starts (or found again after a restart or ``--resume``, by its
    ``tune.trial_id`` tag), then every reported epoch's metric points. Trials may run on any node; only
    the driver needs the tracking store."""

    def __init__(self, *, tracking_uri: str, parent_run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.parent_run_id = parent_run_id
        self._runs: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its callbacks with the experiment state
        return {**self.__dict__, "_runs": {}}

    def _run(self, trial) -> Any:
        if trial.trial_id not in self._runs:
            from pipeline.provenance import redact_uri
            from pipeline.tracking.mlflow_tracker import TolerantTracker, child_tracker

            index, overrides = trial_key(trial.config, trial.trial_id)
            child = child_tracker(
                tracking_uri=self.tracking_uri,
                parent_run_id=self.parent_run_id,
                key_tag=TRIAL_TAG,
                key=trial.trial_id,
                run_name=f"trial-{index:03d}",
            )
            child.log_params({"trial.index": index, **overrides})
            child.set_tags({"stop_reason": "running"})
            self._runs[trial.trial_id] = TolerantTracker(child, where=redact_uri(self.tracking_uri))
        return self._runs[trial.trial_id]

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._guarded(lambda: self._run(trial))

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        points = json.loads(result.get(TRACKED_KEY) or "[]")
        # A PBT trial's lr and weight decay may change at every perturbation: the schedule it trained with.
        points += [[key, int(result["epoch"]), float(result[key])] for key in PBT_KEYS if key in result]
        if points:
            self._guarded(lambda: log_points(self._run(trial), points))

    def _guarded(self, call) -> None:
        try:
            call()
        except Exception as error:  # a failing tracking store must not fail the search
            print(f"tracking: could not record a trial ({type(error).__name__}: {error}); the search goes on")


def _scheduler(search: SearchConfig, *, max_epochs: int, space: SearchSpace | None = None):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler, MedianStoppingRule

    if search.scheduler == "pbt":
        from ray.tune.schedulers import PopulationBasedTraining

        assert space is not None, "pbt mutates the space's entries"
        return PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=search.perturbation_interval,
            quantile_fraction=search.quantile_fraction,
            resample_probability=search.resample_probability,
            # The trial's config is {"trial": {"index", "overrides": {recipe field: value}}}.
            hyperparam_mutations={
                "trial": {"overrides": {key: _domain(param) for key, param in space.pbt_mutations().items()}}
            },
        )

    if search.scheduler == "asha":
        return ASHAScheduler(
            time_attr="training_iteration",
            max_t=max_epochs,
            grace_period=search.grace_period,
            reduction_factor=search.reduction_factor,
        )
    if search.scheduler == "hyperband":
        return HyperBandScheduler(
            time_attr="training_iteration", max_t=max_epochs, reduction_factor=search.reduction_factor
        )
    if search.scheduler == "median":
        # Counted in epochs: the rule's default time_attr is wall-clock seconds.
        return MedianStoppingRule(
            time_attr="training_iteration", grace_period=search.grace_period, min_samples_required=2
        )
    return FIFOScheduler()


def _domain(param: ParamSpace) -> Any:
    """A space entry as PBT's mutation: a Tune distribution to resample from (explore multiplies the value
    by 0.8 or 1.2 otherwise), or the list of choices (explore moves to a neighbour)."""
    if param.type == "loguniform":
        return tune.loguniform(param.low, param.high)
    if param.type == "uniform":
        return tune.uniform(param.low, param.high)
    return list(param.values)


class TpeSpace:
    """Optuna's define-by-run space for ``OptunaSearch``: each entry of the search space suggested by TPE
    under its ``space.`` name, then the candidate built from those values and Optuna's trial number as the
    index (returned as the trial's config)."""

    def __init__(self, base: PretrainConfig, space: SearchSpace) -> None:
        self.base, self.space = base, space

    def __call__(self, optuna_trial) -> dict[str, Any]:
        def draw(name: str, param: ParamSpace) -> Any:
            if param.type in ("loguniform", "uniform"):
                return optuna_trial.suggest_float(name, param.low, param.high, log=param.type == "loguniform")
            if param.type == "choice":
                return optuna_trial.suggest_categorical(name, param.values)
            return param.values[0]

        overrides = draw_overrides(self.base, self.space, draw)
        return {"trial": {"index": optuna_trial.number, "overrides": overrides}}


def _search_alg(search: SearchConfig, *, base: PretrainConfig, space: SearchSpace):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(
        space=TpeSpace(base, space),
        metric=search.metric,
        mode=search.mode,
        sampler=optuna.samplers.TPESampler(seed=search.seed, n_startup_trials=search.tpe_startup_trials),
    )


def _trial_id_of(path: str) -> str:
    """A trial's id from its directory name (``trial_fn_<id>_<n>_...``; the id is ``<hex>_<00007>`` for a
    list of candidates, 8 hex digits with a search algorithm), for a trial that reported nothing."""
    found = re.search(rf"_({LIST_TRIAL_ID}|[0-9a-f]{{8}})_\d+(?:_|$)", path.rstrip("/").rsplit("/", 1)[-1])
    return found.group(1) if found else path.rstrip("/").rsplit("/", 1)[-1]


def run_trials(
    *,
    spec: TrialSpec,
    candidates: list[dict[str, Any]] | None,
    space: SearchSpace,
    source_url: str | None,
    search: SearchConfig,
    max_epochs: int,
    storage_path: str,
    name: str,
    resume: bool,
    scaling: Any,
    runs: TrialRuns | None = None,
) -> list[TrialResult]:
    """Run (or, with ``resume``, continue) the Tune experiment ``{storage_path}/{name}``: the given
    ``candidates`` in order, or (None) ``search.num_trials`` trials chosen by TPE from ``space``. ``runs``
    records the trials in MLflow from this process (None: tracking is off)."""
    ensure_ray(scaling, concurrent=search.max_concurrent_trials, trial_drivers=True)
    # Tune's hint to reuse actors under PBT does not apply: every trial start is a new Ray Train run anyway.
    warnings.filterwarnings("ignore", message="Consider boosting PBT performance", category=UserWarning)
    trainable = tune.with_resources(
        tune.with_parameters(trial_fn, spec=spec, source_url=source_url, env=local_run_env()), {"cpu": 0.01}
    )
    path = f"{storage_path.rstrip('/')}/{name}"
    if resume and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        if candidates is None:
            param_space, search_alg = None, _search_alg(search, base=spec.base, space=space)
        else:
            trials = [{"index": index, "overrides": overrides} for index, overrides in enumerate(candidates)]
            param_space, search_alg = {"trial": tune.grid_search(trials)}, None
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=search.metric,
                mode=search.mode,
                search_alg=search_alg,
                scheduler=_scheduler(search, max_epochs=max_epochs, space=space),
                num_samples=search.num_trials if candidates is None else 1,
                max_concurrent_trials=search.max_concurrent_trials,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage_path,
                # Worker failures are retried inside each Train run; a trial that still fails stays failed.
                failure_config=tune.FailureConfig(max_failures=0),
                # PBT stops nothing itself: without this, a decision at the last epoch would restart a trial
                # (a new Train run) from another's final state only to find no epoch left to train.
                stop={"training_iteration": max_epochs} if search.scheduler == "pbt" else None,
                verbose=1,
                callbacks=[runs] if runs is not None else [],
            ),
        )
    grid = tuner.fit()
    results = []
    for result in grid:
        trial_id = str((result.metrics or {}).get("trial_id") or _trial_id_of(result.path))
        index, overrides = trial_key(result.config, trial_id)
        frame = result.metrics_dataframe
        history: list[tuple[int, float]] = []
        if frame is not None and search.metric in frame:
            history = [
                (int(epoch), float(value))
                for epoch, value in zip(frame["training_iteration"], frame[search.metric], strict=True)
            ]
        results.append(
            TrialResult(
                index=index,
                trial_id=trial_id,
                overrides=overrides,
                history=history,
                last=dict(result.metrics or {}),
                # The whole text (Ray's wrapper lines and the trial's own error); the driver shortens it.
                error=None if result.error is None else str(result.error).strip()[-2000:],
            )
        )
    return sorted(results, key=lambda r: r.index)

"""Ray Tune, the only module that imports it: one Tune trial per candidate, each trial a Ray Train DDP run.

The pattern Ray 2.60 recommends for Train inside Tune (facts.md): the Tune trainable is a small *driver*
function that builds a ``TorchTrainer`` named ``train-<trial id>`` with ``TuneReportCallback`` and calls
``fit()``; the Train workers' per-epoch ``ray.train.report`` reaches the Tune scheduler through that
callback, so ASHA / HyperBand / the median rule can stop a trial after any epoch. The driver function asks
Tune for almost no CPU (``{"cpu": 0.01}``); Tune does not count the Train workers, so the search bounds
``max_concurrent_trials`` to what the cluster holds.

A deterministic Train run name per trial means a trial restarted after the search driver died resumes from
its own last epoch checkpoint rather than from scratch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ray import tune

from pipeline.config import SearchConfig
from pipeline.launch import TRACKED_KEY, ensure_ray, launch, log_points, pretrain_worker
from pipeline.search.space import apply_overrides
from pipeline.specs import TrialSpec, WorkerSpec

TRIAL_TAG = "tune.trial_id"


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


def trial_fn(config: dict[str, Any], spec: TrialSpec) -> None:
    """One trial: apply its candidate to the base config and train with DDP. It never talks to MLflow: its
    reports reach Tune through ``TuneReportCallback``, and :class:`TrialRuns` logs them on the driver."""
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    index, overrides = config["trial"]["index"], config["trial"]["overrides"]
    cfg = apply_overrides(spec.base, overrides)
    launch(
        pretrain_worker,
        spec=WorkerSpec(config=cfg, run_name=f"trial-{index:03d}"),
        scaling=cfg.scaling,
        checkpoint=cfg.checkpoint,
        storage_path=spec.train_storage,
        name=f"train-{trial_id}",
        metric=cfg.train.watched_metric,
        mode=cfg.train.early_stopping.mode,
        callbacks=[TuneReportCallback()],
    )


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

            index, overrides = trial.config["trial"]["index"], trial.config["trial"]["overrides"]
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
        if points:
            self._guarded(lambda: log_points(self._run(trial), points))

    def _guarded(self, call) -> None:
        try:
            call()
        except Exception as error:  # a failing tracking store must not fail the search
            print(f"tracking: could not record a trial ({type(error).__name__}: {error}); the search goes on")


def _scheduler(search: SearchConfig, *, max_epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler, MedianStoppingRule

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


def run_trials(
    *,
    spec: TrialSpec,
    candidates: list[dict[str, Any]],
    search: SearchConfig,
    max_epochs: int,
    storage_path: str,
    name: str,
    resume: bool,
    scaling: Any,
    runs: TrialRuns | None = None,
) -> list[TrialResult]:
    """Run (or, with ``resume``, continue) the Tune experiment ``{storage_path}/{name}``; ``runs`` records
    the trials in MLflow from this process (None: tracking is off)."""
    ensure_ray(scaling, concurrent=search.max_concurrent_trials, trial_drivers=True)
    trainable = tune.with_resources(tune.with_parameters(trial_fn, spec=spec), {"cpu": 0.01})
    path = f"{storage_path.rstrip('/')}/{name}"
    if resume and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        trials = [{"index": index, "overrides": overrides} for index, overrides in enumerate(candidates)]
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(trials)},
            tune_config=tune.TuneConfig(
                metric=search.metric,
                mode=search.mode,
                scheduler=_scheduler(search, max_epochs=max_epochs),
                num_samples=1,
                max_concurrent_trials=search.max_concurrent_trials,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage_path,
                # Worker failures are retried inside each Train run; a trial that still fails stays failed.
                failure_config=tune.FailureConfig(max_failures=0),
                verbose=1,
                callbacks=[runs] if runs is not None else [],
            ),
        )
    grid = tuner.fit()
    results = []
    for result in grid:
        trial = result.config["trial"]
        frame = result.metrics_dataframe
        history: list[tuple[int, float]] = []
        if frame is not None and search.metric in frame:
            history = [
                (int(epoch), float(value))
                for epoch, value in zip(frame["training_iteration"], frame[search.metric], strict=True)
            ]
        results.append(
            TrialResult(
                index=int(trial["index"]),
                trial_id=str(
                    (result.metrics or {}).get("trial_id") or result.path.rstrip("/").split("/")[-1]
                ),
                overrides=dict(trial["overrides"]),
                history=history,
                last=dict(result.metrics or {}),
                # The whole text (Ray's wrapper lines and the trial's own error); the driver shortens it.
                error=None if result.error is None else str(result.error).strip()[-2000:],
            )
        )
    return sorted(results, key=lambda r: r.index)

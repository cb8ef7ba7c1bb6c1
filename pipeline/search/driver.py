"""The search job's driver: validate and sample, open the MLflow parent run, run the trials on Ray Tune,
then settle every trial's status, summarize, write the best config and register the best model.

The recipe may be a pre-training or a fine-tuning one (a ``finetune:`` section): for fine-tuning, the driver
fetches the source weights once (a registry may be reachable only from here), takes the architecture from
them, and stages them in the search's storage, where every trial's workers read them.

Statuses are set here, on the driver side, after ``Tuner.fit()``: a trial stopped by the scheduler has its
processes killed, so it cannot close its own MLflow run. Each child run ends FINISHED with a ``stop_reason``
tag (``completed``, ``early_stopping``, ``scheduler:asha`` ...) or FAILED with ``stop_reason=error``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import (
    ConfigError,
    FinetuneConfig,
    PretrainConfig,
    TuneConfig,
    deep_merge,
    dump_yaml,
    from_dict,
    read_yaml,
    to_dict,
)
from pipeline.data import storage
from pipeline.data.storage import StorageError
from pipeline.errors import PipelineError
from pipeline.pretrain import (
    Validated,
    absolute_storage,
    localize,
    log_datasets,
    preflight,
    resolve_run_name,
    validate,
    validate_model,
)
from pipeline.publish import publish_model
from pipeline.search.space import (
    Candidates,
    apply_overrides,
    corner_candidates,
    grid_candidates,
    sample_candidates,
)

if TYPE_CHECKING:
    from pipeline.lifecycle import RunTarget, TrackedRun
    from pipeline.search.tuner import TrialResult

SEARCH_MARKER = "pipeline_search.json"
BEST_CONFIG = "best_config.yaml"
SOURCE_DIR = "source"
"""Fine-tuning searches: the source weights (``source/model.pt``), staged once for every trial."""


@dataclass(frozen=True)
class TrialSummary:
    index: int
    overrides: dict[str, Any]
    epochs: int
    best: float | None
    """Best objective over the trial's epochs (by the search's mode)."""
    stop_reason: str
    run_id: str | None
    error: str | None = None
    """The trial's error, shortened, when it failed."""


@dataclass(frozen=True)
class SearchOutcome:
    name: str
    search_url: str
    trials: list[TrialSummary]
    best_index: int
    best_objective: float
    best_config_path: str
    epochs_used: int
    epochs_budget: int
    rejected: int
    parent_run_id: str | None
    tracking_uri: str | None
    registration: Any | None

    @property
    def failed(self) -> list[TrialSummary]:
        """Trials that ended in an error (never the best one)."""
        return [t for t in self.trials if t.stop_reason == "error"]


def base_config(cfg: TuneConfig) -> PretrainConfig:
    """The recipe with the search's shared changes (``pretrain:``) applied and validated: a
    :class:`FinetuneConfig` when the recipe has a ``finetune:`` section, else a :class:`PretrainConfig`."""
    tree = deep_merge(read_yaml(cfg.recipe), cfg.pretrain)
    return from_dict(FinetuneConfig if "finetune" in tree else PretrainConfig, tree)


def _objective_best(values: list[float], mode: str) -> float | None:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return None
    return max(finite) if mode == "max" else min(finite)


def _stop_reason(trial, *, max_epochs: int, scheduler: str) -> str:
    if trial.error is not None:
        return "error"
    epochs = len(trial.history)
    if epochs >= max_epochs:
        return "completed"
    if trial.last.get("early_stop"):
        return "early_stopping"
    return f"scheduler:{scheduler}" if scheduler != "none" else "interrupted"


def _trials_csv(trials: list[TrialSummary], keys: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trial", *keys, "epochs", "best", "stop_reason"])
    for t in trials:
        writer.writerow([t.index, *(t.overrides.get(k) for k in keys), t.epochs, t.best, t.stop_reason])
    return buffer.getvalue()


def _trials_markdown(trials: list[TrialSummary], keys: list[str], metric: str) -> str:
    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = [
        "| trial | " + " | ".join(keys) + f" | epochs | best {metric} | stop reason |",
        "|" + "---|" * (len(keys) + 4),
    ]
    for t in trials:
        values = " | ".join(cell(t.overrides.get(k)) for k in keys)
        best = "n/a" if t.best is None else f"{t.best:.4f}"
        lines.append(f"| {t.index} | {values} | {t.epochs} | {best} | {t.stop_reason} |")
    return "\n".join(lines) + "\n"


def _plot_curves(results, metric: str, path: Path, *, best_index: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    for trial in results:
        if not trial.history:
            continue
        epochs, values = zip(*trial.history, strict=True)
        style = {"linewidth": 2.5, "color": "black"} if trial.index == best_index else {"alpha": 0.7}
        axis.plot(epochs, values, marker="o", label=f"trial {trial.index}", **style)
    axis.set_xlabel("epoch (training_iteration)")
    axis.set_ylabel(metric)
    axis.set_title("learning curves: early-stopped trials end early")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _latest_state(trial_storage: str) -> str | None:
    """URL of the newest epoch checkpoint's state file that exists under a trial's Train run, or None.

    Not the trial's last *reported* checkpoint: when the scheduler stops a trial, its workers may finish one
    more epoch before they are killed, and Ray Train's ``num_to_keep`` (ranked by the score) then deletes the
    checkpoint Tune last saw. Every state file holds the best weights seen so far, so the newest is the one
    to publish."""
    from pipeline.launch import STATE_FILE

    try:
        names = storage.list_names(trial_storage)
    except StorageError:
        return None
    for name in sorted((n for n in names if re.fullmatch(r"epoch-\d+", n)), reverse=True):
        url = storage.join(trial_storage, name, STATE_FILE)
        if storage.exists(url):
            return url
    return None


def run_search(cfg: TuneConfig, *, resume: bool = False) -> SearchOutcome:
    """Validate, sample, track, tune, settle, summarize. ConfigError for bad input (before Ray)."""
    from pipeline.lifecycle import execute

    return execute(SearchJob(cfg, resume=resume))


@dataclass(frozen=True)
class SearchPlan:
    """What :meth:`SearchJob.prepare` settled before anything started."""

    base: PretrainConfig
    """The recipe with the search's changes, manifest paths made absolute."""
    validated: Validated
    candidates: Candidates
    """The trials' candidates (random, grid); empty for tpe, which chooses each when its trial starts."""
    name: str
    storage_path: str
    search_url: str
    previous_run_id: str | None
    source: Any | None = None
    """Fine-tuning: the fetched source (:class:`pipeline.finetune.Source`), staged for the trials by run()."""

    @property
    def train_storage(self) -> str:
        return storage.join(self.search_url, "trials")


@dataclass(frozen=True)
class Settled:
    results: list[TrialResult]
    summaries: list[TrialSummary]
    best: TrialSummary


class SearchJob:
    """The search as :func:`pipeline.lifecycle.execute` runs it: one parent run, a child run per trial."""

    def __init__(self, cfg: TuneConfig, *, resume: bool = False) -> None:
        self.cfg, self.resume = cfg, resume

    def prepare(self) -> SearchPlan:
        cfg = self.cfg
        base = base_config(cfg)
        if base.scaling.num_workers == 0:
            # Tune hears a trial's epochs through the Train workers' reports (TuneReportCallback), which Ray
            # Train's local mode never calls back: every trial would end with nothing reported.
            raise ConfigError(
                "pretrain.scaling.num_workers: a search's trials need Ray Train workers; use >= 1"
            )
        source = None
        if isinstance(base, FinetuneConfig) and base.finetune.strategy != "scratch":
            base, source = _fetch_source(base)
        if cfg.search.scheduler == "pbt" and cfg.search.perturbation_interval >= base.train.epochs:
            raise ConfigError(
                f"search.perturbation_interval: {cfg.search.perturbation_interval} epochs, not fewer than a "
                f"trial trains (train.epochs={base.train.epochs}); PBT would never perturb: lower it"
            )
        if cfg.search.scheduler not in ("none", "pbt") and cfg.search.grace_period > base.train.epochs:
            raise ConfigError(
                f"search.grace_period: {cfg.search.grace_period} epochs, more than a trial trains "
                f"(train.epochs={base.train.epochs}); lower it"
            )
        validated = validate(base)
        base = localize(base)
        sampler = cfg.search.sampler
        if sampler == "grid":
            candidates = grid_candidates(base, cfg.space)
        elif sampler == "random":
            candidates = sample_candidates(
                base,
                cfg.space,
                num_trials=cfg.search.num_trials,
                seed=cfg.search.seed,
                num_classes=validated.num_classes,
            )
        else:  # tpe: values are chosen as trials start; the space's bounds and every choice are checked now
            candidates = Candidates(overrides=[])
        checked = candidates.overrides if sampler != "tpe" else corner_candidates(base, cfg.space)
        for index, overrides in enumerate(checked):
            try:
                validate_model(apply_overrides(base, overrides))
            except ConfigError as error:
                where = f"trial {index}" if sampler != "tpe" else f"values {overrides}"
                raise ConfigError(f"space ({where}): {error}") from None
        storage_path = absolute_storage(cfg.search.storage_path or storage.default_location("tune"))
        name = resolve_run_name(
            storage_path,
            cfg.search.name or f"tune-{base.model.name}",
            resume=self.resume,
            markers=(SEARCH_MARKER, "tuner.pkl"),
        )
        preflight(
            base,
            {
                "pretrain.data.train_manifest": base.data.train_manifest,
                "pretrain.data.val_manifest": base.data.val_manifest,
                "search.storage_path": storage_path,
            },
            concurrent=cfg.search.max_concurrent_trials,
            search=True,
        )
        search_url = storage.join(storage_path, name)
        marker_url = storage.join(search_url, SEARCH_MARKER)
        previous = (
            json.loads(storage.read_bytes(marker_url)) if self.resume and storage.exists(marker_url) else {}
        )
        return SearchPlan(
            base=base,
            validated=validated,
            candidates=candidates,
            name=name,
            storage_path=storage_path,
            search_url=search_url,
            previous_run_id=previous.get("parent_run_id"),
            source=source,
        )

    def target(self, plan: SearchPlan) -> RunTarget:
        from pipeline.lifecycle import RunTarget

        return RunTarget.of(plan.base.tracking, run_name=plan.name, run_id=plan.previous_run_id)

    def run(self, plan: SearchPlan, run: TrackedRun) -> list[TrialResult]:
        from pipeline.provenance import flatten_params
        from pipeline.search.tuner import TrialRuns, run_trials
        from pipeline.specs import TrialSpec

        cfg, tracker = self.cfg, run.tracker
        if tracker.run_id is not None:
            log_datasets(tracker, plan.validated)
            tracker.set_tags({"pipeline.job": "tune", "pipeline.search_url": plan.search_url})
            if plan.source is not None:
                tracker.set_tags(plan.source.lineage)
            tracker.log_params(flatten_params({"search": to_dict(cfg.search), "space": to_dict(cfg.space)}))
            tracker.log_params({"recipe": cfg.recipe, "search.max_epochs": plan.base.train.epochs})
            tracker.log_text(dump_yaml(cfg), "config/search.yaml")
            tracker.log_text(dump_yaml(plan.base), "config/base_pretrain.yaml")
        storage.makedirs(plan.search_url)
        storage.write_bytes_atomic(
            storage.join(plan.search_url, SEARCH_MARKER),
            json.dumps({"parent_run_id": tracker.run_id}).encode(),
        )
        return run_trials(
            spec=TrialSpec(
                base=plan.base,
                train_storage=plan.train_storage,
                perturbation_interval=cfg.search.perturbation_interval
                if cfg.search.scheduler == "pbt"
                else None,
            ),
            candidates=plan.candidates.overrides if cfg.search.sampler != "tpe" else None,
            space=cfg.space,
            source_url=_stage_source(plan),
            search=cfg.search,
            max_epochs=plan.base.train.epochs,
            storage_path=plan.storage_path,
            name=plan.name,
            resume=self.resume,
            scaling=plan.base.scaling,
            runs=TrialRuns(tracking_uri=run.tracking_uri, parent_run_id=run.run_id)
            if run.run_id is not None
            else None,
        )

    def settle(self, plan: SearchPlan, run: TrackedRun, ran: list[TrialResult]) -> Settled:
        """Each trial's child run gets its final status and stop reason; the parent run says how many trials
        failed and why. Raises :class:`SearchFailedError` when no trial finished with a score."""
        from pipeline.tracking.mlflow_tracker import child_runs

        cfg, tracker, tracking_uri = self.cfg, run.tracker, run.tracking_uri
        results = list(ran)
        children = {}
        if tracker.run_id is not None:
            children = {
                int(r.data.params.get("trial.index", -1)): r for r in child_runs(tracking_uri, tracker.run_id)
            }
        summaries = []
        for position, trial in enumerate(results):
            child = children.get(trial.index)
            if child is not None:
                # The child run is the record across restarts: Tune misses the results of epochs a killed
                # trial had already checkpointed, which its restart then does not re-run.
                history = _child_history(tracking_uri, child.info.run_id, cfg.search.metric)
                trial = results[position] = dataclasses.replace(trial, history=history or trial.history)
            reason = _stop_reason(trial, max_epochs=plan.base.train.epochs, scheduler=cfg.search.scheduler)
            summaries.append(
                TrialSummary(
                    index=trial.index,
                    overrides=trial.overrides,
                    epochs=len(trial.history),
                    best=_objective_best([v for _, v in trial.history], cfg.search.mode),
                    stop_reason=reason,
                    run_id=child.info.run_id if child is not None else None,
                    error=_short(trial.error) if trial.error else None,
                )
            )
            if child is not None:
                _settle_child(tracking_uri, child.info.run_id, reason, summaries[-1].error)
        failed = [s for s in summaries if s.stop_reason == "error"]
        if failed and tracker.run_id is not None:
            tracker.set_tags(
                {
                    "search.failed_trials": f"{len(failed)} of {len(summaries)}",
                    "search.first_error": failed[0].error,
                }
            )
        # An errored trial is never the best, whatever it reported before failing: its run did not finish.
        scored = [s for s in summaries if s.best is not None and s.stop_reason != "error"]
        if not scored:
            if failed:
                raise SearchFailedError(
                    f"all {len(failed)} of {len(summaries)} trials failed; first error (trial "
                    f"{failed[0].index}): {failed[0].error}"
                )
            raise SearchFailedError(f"none of the {len(summaries)} trials reported {cfg.search.metric}")
        sign = 1 if cfg.search.mode == "max" else -1
        return Settled(results=results, summaries=summaries, best=max(scored, key=lambda s: sign * s.best))

    def publish(self, plan: SearchPlan, run: TrackedRun, settled: Settled) -> SearchOutcome:
        """The best config (a pre-training recipe as is), the summary on the parent run, and the best
        trial's model exported and registered from its checkpoint in the search's storage."""
        from pipeline.provenance import flatten_params

        cfg, tracker, tracking_uri = self.cfg, run.tracker, run.tracking_uri
        results, summaries, best = settled.results, settled.summaries, settled.best
        name, candidates = plan.name, plan.candidates
        best_trial = next(t for t in results if t.index == best.index)
        best_cfg = apply_overrides(plan.base, best.overrides)
        job = "finetune" if isinstance(best_cfg, FinetuneConfig) else "pretrain"
        best_cfg_text = (
            f"# Best config of search {name}: trial {best.index}, best {cfg.search.metric} = {best.best:.4f}\n"
            f"# Use it as is: python jobs/{job}.py --config <this file>\n" + dump_yaml(best_cfg)
        )
        best_config_url = storage.join(plan.search_url, BEST_CONFIG)
        storage.write_bytes_atomic(best_config_url, best_cfg_text.encode())
        epochs_used = sum(s.epochs for s in summaries)
        budget = plan.base.train.epochs * len(summaries)
        keys = sorted({k for s in summaries for k in s.overrides})
        registration = None
        if tracker.run_id is not None:
            tracker.log_params({f"best.{k}": v for k, v in flatten_params(best.overrides).items()})
            tracker.log_metrics(
                {
                    "best/objective": best.best,
                    "best/trial": best.index,
                    "search/epochs_used": epochs_used,
                    "search/epochs_budget": budget,
                    "search/epochs_fraction": epochs_used / budget,
                    "search/trials": len(summaries),
                    "search/stopped_early": sum(s.stop_reason.startswith("scheduler") for s in summaries),
                    "search/failed": sum(s.stop_reason == "error" for s in summaries),
                    "search/rejected_by_flops": len(candidates.rejected),
                },
                step=0,
            )
            tracker.log_text(best_cfg_text, BEST_CONFIG)
            tracker.log_text(_trials_csv(summaries, keys), "trials/trials.csv")
            tracker.log_text(_trials_markdown(summaries, keys, cfg.search.metric), "trials/trials.md")
            if candidates.rejected:
                tracker.log_text(json.dumps(candidates.rejected, indent=2), "trials/rejected_by_flops.json")
            with tempfile.TemporaryDirectory(prefix="pipeline-search-") as scratch:
                plot = _plot_curves(
                    results, cfg.search.metric, Path(scratch) / "learning_curves.png", best_index=best.index
                )
                tracker.log_artifact(plot, artifact_path="plots")
            # A PBT trial's weights are in the Train run it ended with (one per exploit); it reports its name.
            train_run = best_trial.last.get("train_run") or f"train-{best_trial.trial_id}"
            state_url = _latest_state(storage.join(plan.train_storage, train_run))
            if state_url is None:
                print(
                    f"search: trial {best.index} left no checkpoint under {plan.train_storage}; "
                    "its model is not registered (its config is in best_config.yaml)",
                    file=sys.stderr,
                )
            elif best.run_id is not None:
                from pipeline.tracking.mlflow_tracker import MlflowTracker
                from pipeline.train.state import read_state

                state = read_state(state_url)
                child_tracker = MlflowTracker(
                    tracking_uri=tracking_uri, experiment="", run_name="", run_id=best.run_id
                )
                registration = publish_model(
                    state,
                    best_cfg,
                    plan.validated,
                    tracker=child_tracker,
                    export_url=storage.join(plan.search_url, "best_model"),
                )
                _settle_child(tracking_uri, best.run_id, best.stop_reason, None)
                tracker.set_tags({"best.run_id": best.run_id})
        return SearchOutcome(
            name=name,
            search_url=plan.search_url,
            trials=summaries,
            best_index=best.index,
            best_objective=best.best,
            best_config_path=best_config_url,
            epochs_used=epochs_used,
            epochs_budget=budget,
            rejected=len(candidates.rejected),
            parent_run_id=tracker.run_id,
            tracking_uri=tracking_uri,
            registration=registration,
        )


def _fetch_source(base: FinetuneConfig) -> tuple[FinetuneConfig, Any]:
    """A fine-tuning recipe's source weights, fetched once by the driver, and the recipe with the source's
    architecture (as the fine-tuning job does it); ConfigError naming ``finetune.source``."""
    from pipeline.finetune import fetch_source, resolve_architecture
    from pipeline.tracking.mlflow_tracker import resolve_tracking_uri

    uri = None if (base.tracking.uri or "").lower() == "none" else resolve_tracking_uri(base.tracking.uri)
    fetched = fetch_source(base, tracking_uri=uri)
    return resolve_architecture(base, fetched), fetched


def _stage_source(plan: SearchPlan) -> str | None:
    """Fine-tuning: the source weights written once under the search directory, where every trial's workers
    (on any node) read them; a resumed search writes them again (the same bytes)."""
    if plan.source is None:
        return None
    import torch

    buffer = io.BytesIO()
    torch.save(plan.source.payload, buffer)
    from pipeline.publish import EXPORT_WEIGHTS

    directory = storage.join(plan.search_url, SOURCE_DIR)
    storage.makedirs(directory)
    url = storage.join(directory, EXPORT_WEIGHTS)
    storage.write_bytes_atomic(url, buffer.getvalue())
    return url


class SearchFailedError(PipelineError, RuntimeError):
    """No trial finished: the job exits 1, the parent run is FAILED, nothing is written or registered."""


def _short(error: str | None, limit: int = 300) -> str:
    """One line of a trial's error: its last non-empty line (the exception), at most ``limit`` characters."""
    lines = [line.strip() for line in (error or "").splitlines() if line.strip()]
    # The launcher's wrapper adds nothing to the worker's error it carries ("rank R raised ...").
    text = re.sub(r"^[\w.]*LaunchError: ", "", lines[-1]) if lines else "unknown error"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _child_history(tracking_uri: str, run_id: str, metric: str) -> list[tuple[int, float]]:
    from pipeline.tracking.mlflow_tracker import metric_history

    return [(step + 1, value) for step, value in metric_history(tracking_uri, run_id, metric)]


def _settle_child(tracking_uri: str, run_id: str, reason: str, error: str | None) -> None:
    """Final status of a trial's run: FINISHED with its stop reason, or FAILED with the error."""
    from pipeline.tracking.mlflow_tracker import MlflowTracker

    child = MlflowTracker(tracking_uri=tracking_uri, experiment="", run_name="", run_id=run_id)
    tags = {"stop_reason": reason}
    if error:
        tags["error"] = error[:500]
    child.set_tags(tags)
    child.close(status="FAILED" if reason == "error" else "FINISHED")

"""Run an experiment: prepare its data, check every arm, open one MLflow parent run, pre-train the fine-tuning
source if needed, train every (arm, seed) as a child run, judge the claim from the measured numbers and write
the evidence (``<output_dir>/<name>.md`` and ``.png``, also logged to the parent run).

Arms run one after another in this process (``build_run`` + ``fit`` on one device, no Ray): on a 2-core
machine a Ray worker group would only add start-up time, and a GPU node runs the small CIFAR-scale arms on one
GPU. The parent run carries the verdict as the tag ``verdict`` and ``claim_held`` = true/false.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import ConfigError, ExperimentConfig, FinetuneConfig, dump_yaml
from pipeline.data.manifest import load_manifest
from pipeline.experiments.arm import ArmRun, resolve_source, summarize, train_arm
from pipeline.experiments.data import prepare_data
from pipeline.experiments.report import markdown, plot, results_of
from pipeline.experiments.source import ensure_source
from pipeline.experiments.spec import ArmPlan, dotted, output_stem, plan_arms
from pipeline.experiments.stats import Results, Verdict
from pipeline.experiments.verdicts import judge
from pipeline.lifecycle import RunTarget, TrackedRun
from pipeline.tracking.base import NullTracker, Tracker


@dataclass(frozen=True)
class ExperimentOutcome:
    name: str
    verdict: Verdict
    runs: list[ArmRun]
    markdown_path: Path
    plot_path: Path
    parent_run_id: str | None
    tracking_uri: str | None
    seconds: float


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def _needs_source(plans: list) -> bool:
    """Some arm fine-tunes (any strategy but scratch)."""
    return any(
        isinstance(p.config, FinetuneConfig) and p.config.finetune.strategy != "scratch" for p in plans
    )


def run_experiment(
    cfg: ExperimentConfig, *, command: str, log: Callable[[str], None] = lambda line: None
) -> ExperimentOutcome:
    """Run every arm and seed, judge, report. ConfigError (before anything trains) for a bad arm."""
    from pipeline.lifecycle import execute

    return execute(ExperimentJob(cfg, command=command, log=log))


@dataclass(frozen=True)
class ExperimentPlan:
    device: torch.device
    data: Any
    """The prepared data (:func:`pipeline.experiments.data.prepare_data`)."""
    data_args: dict[str, Any]
    plans: list[ArmPlan]
    stem: str
    started: float


@dataclass(frozen=True)
class Ran:
    runs: list[ArmRun]
    source_fact: list[str]


class ExperimentJob:
    """An experiment as :func:`pipeline.lifecycle.execute` runs it: one parent run, a child run per arm and
    seed, the verdict and the evidence page published at the end."""

    def __init__(self, cfg: ExperimentConfig, *, command: str, log: Callable[[str], None]) -> None:
        self.cfg, self.command, self.log = cfg, command, log

    def prepare(self) -> ExperimentPlan:
        from pipeline.pretrain import validate

        cfg = self.cfg
        started = time.perf_counter()
        device = resolve_device(cfg.device)
        data = prepare_data(cfg)
        train_manifest = load_manifest(data.train_manifest)
        data_args = {
            "train_manifest": data.train_manifest,
            "val_manifest": data.val_manifest,
            "num_classes": train_manifest.num_classes,
        }
        plans = plan_arms(cfg, **data_args)
        for (
            plan
        ) in plans:  # fail fast: every arm's model, manifests and batch, before the first epoch anywhere
            if plan.config.model.name != "source":
                try:
                    validate(plan.config)
                except ConfigError as error:
                    raise ConfigError(f"arms.{plan.arm}: {error}") from None
        return ExperimentPlan(
            device=device, data=data, data_args=data_args, plans=plans, stem=output_stem(cfg), started=started
        )

    def target(self, plan: ExperimentPlan) -> RunTarget:
        return RunTarget.of(self.cfg.tracking, run_name=plan.stem)

    def run(self, plan: ExperimentPlan, run: TrackedRun) -> Ran:
        from pipeline.pretrain import manifest_digest
        from pipeline.provenance import git_revision, redact_uri
        from pipeline.tracking.mlflow_tracker import child_tracker

        cfg, tracker, tracking_uri, data = self.cfg, run.tracker, run.tracking_uri, plan.data

        def child(key: str) -> Tracker:
            if tracker.run_id is None:
                return NullTracker()
            return child_tracker(
                tracking_uri=tracking_uri,
                parent_run_id=tracker.run_id,
                key_tag="experiment.run",
                key=key,
                run_name=f"{plan.stem}/{key}",
            )

        tracker.set_tags(
            {
                "pipeline.job": "experiment",
                "experiment.name": cfg.name,
                "experiment.scale": cfg.scale,
                "claim": cfg.claim,
                "git.revision": git_revision(),
                "dataset.manifest_url": redact_uri(data.train_manifest),
                "dataset.manifest_digest": manifest_digest(load_manifest(data.train_manifest)),
            }
        )
        tracker.log_params(
            {
                "experiment.name": cfg.name,
                "experiment.scale": cfg.scale,
                "experiment.recipe": cfg.recipe,
                "experiment.seeds": ",".join(map(str, cfg.seeds)),
                "experiment.shared": " ".join(f"{k}={v}" for k, v in dotted(cfg.shared).items())[:5000],
                **{
                    f"arm.{arm}": " ".join(f"{k}={v}" for k, v in dotted(o).items())
                    for arm, o in cfg.arms.items()
                },
            }
        )
        plans, source_fact = plan.plans, []
        if _needs_source(plans):
            source_uri, trained_now = ensure_source(
                cfg, data, device=plan.device, open_tracker=lambda: child("source")
            )
            how = "pre-trained in this run" if trained_now else "reused from the cache"
            source_fact = [
                f"- Fine-tuning source: `{source_uri}` ({how}; recipe `{cfg.source.recipe}` with "
                f"{cfg.source.overrides or 'no overrides'})"
            ]
            self.log(f"source: {source_uri} ({how})")
            plans = plan_arms(cfg, **plan.data_args, source_uri=source_uri)

        runs: list[ArmRun] = []
        for index, arm_plan in enumerate(plans, start=1):
            arm_run = _train_plan(
                arm_plan,
                cfg=cfg,
                device=plan.device,
                tracker=child(f"{arm_plan.arm}/seed{arm_plan.seed}"),
                tracking_uri=tracking_uri,
            )
            runs.append(arm_run)
            shown = ", ".join(f"{m} {arm_run.summary.get(m, float('nan')):.3f}" for m in cfg.metrics)
            self.log(
                f"[{index}/{len(plans)}] {arm_plan.arm} seed {arm_plan.seed}: {shown} "
                f"({arm_run.summary['seconds']:.0f} s)"
            )
        return Ran(runs=runs, source_fact=source_fact)

    def settle(self, plan: ExperimentPlan, run: TrackedRun, ran: Ran) -> tuple[Ran, Results, Verdict]:
        """The verdict, from the measured numbers (each arm's run was closed as it ended)."""
        results = results_of(ran.runs)
        return ran, results, judge(self.cfg, results)

    def publish(
        self, plan: ExperimentPlan, run: TrackedRun, settled: tuple[Ran, Results, Verdict]
    ) -> ExperimentOutcome:
        """The evidence page and plot, also logged to the parent run with the verdict."""
        cfg, tracker = self.cfg, run.tracker
        ran, results, verdict = settled
        runs = ran.runs
        seconds = time.perf_counter() - plan.started
        output_dir = Path(cfg.output_dir)
        plot_path = plot(cfg, runs, output_dir / f"{plan.stem}.png")
        facts = [
            f"- Device: {_device_label(plan.device)}; wall time {seconds / 60:.1f} min for {len(runs)} runs "
            f"({len(cfg.arms)} arms x {len(cfg.seeds)} seeds), data preparation included",
            *ran.source_fact,
            (
                f"- MLflow: experiment `{cfg.tracking.experiment}`, parent run `{tracker.run_id}` "
                f"(one child run per arm and seed)"
                if tracker.run_id
                else "- MLflow: tracking was off"
            ),
        ]
        if cfg.flops_match.directions:
            facts.append(
                f"- FLOPs matching: every arm of `flops_match.directions` was given the knobs whose MACs (the "
                f"profiler's count) lie within {cfg.flops_match.tolerance:.0%} of "
                f"{cfg.flops_match.target_factor}x the `{cfg.flops_match.baseline_arm}` arm's; the MMACs column is "
                "each trained model's own count"
            )
        markdown_path = output_dir / f"{plan.stem}.md"
        markdown_path.write_text(
            markdown(cfg, runs, verdict, command=self.command, plot_name=plot_path.name, facts=facts)
        )
        if tracker.run_id is not None:
            _publish(tracker, cfg, results, verdict, files=(markdown_path, plot_path))
        return ExperimentOutcome(
            name=cfg.name,
            verdict=verdict,
            runs=runs,
            markdown_path=markdown_path,
            plot_path=plot_path,
            parent_run_id=tracker.run_id,
            tracking_uri=run.tracking_uri,
            seconds=seconds,
        )


def _train_plan(
    plan: ArmPlan, *, cfg: ExperimentConfig, device: torch.device, tracker: Tracker, tracking_uri: str | None
) -> ArmRun:
    """One (arm, seed) in its child run: config as params, fit's and the experiment's metrics per epoch, the
    summary at the end; the run is closed FINISHED, or FAILED / KILLED when training raises."""
    from pipeline.pretrain import validate_model
    from pipeline.provenance import flatten_params

    with TrackedRun(tracker):  # closed FINISHED, or FAILED / KILLED when training raises
        config, payload = resolve_source(plan.config, tracking_uri=tracking_uri)
        tracker.set_tags(
            {
                "experiment.arm": plan.arm,
                "experiment.seed": str(plan.seed),
                "model.arch": validate_model(config),
            }
        )
        tracker.log_params(flatten_params(config))
        tracker.log_params({"experiment.arm": plan.arm, "experiment.seed": plan.seed})
        trained = train_arm(
            config, device=device, source=payload, tracker=tracker, eval_train_set=cfg.eval_train_set
        )
        summary = summarize(trained, config)
        tracker.log_metrics({f"summary/{key}": value for key, value in summary.items()}, step=0)
    return ArmRun(plan.arm, plan.seed, plan.overrides, trained.history, summary, tracker.run_id)


def _publish(
    tracker: Tracker, cfg: ExperimentConfig, results: Results, verdict: Verdict, *, files: tuple[Path, ...]
) -> None:
    """The parent run's record: the table as metrics, the config, page and plot as artifacts, the verdict."""
    for arm in results.arms:
        for metric in cfg.metrics:
            stats = results.stats(arm, metric)
            tracker.log_metrics(
                {f"{arm}/{metric}/mean": stats.mean, f"{arm}/{metric}/spread": stats.spread}, step=0
            )
    with tempfile.TemporaryDirectory(prefix="pipeline-experiment-") as scratch:
        config_path = Path(scratch) / "experiment.yaml"
        config_path.write_text(dump_yaml(cfg))
        tracker.log_artifact(config_path, artifact_path="config")
    for path in files:
        tracker.log_artifact(path, artifact_path="results")
    tracker.set_tags(
        {
            "verdict": verdict.line,
            "verdict.outcome": verdict.outcome,
            "claim_held": str(verdict.claim_held).lower(),
        }
    )

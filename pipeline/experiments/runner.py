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
    from pipeline.pretrain import manifest_digest, validate
    from pipeline.tracking.mlflow_tracker import child_tracker, git_revision, open_tracker, redact_uri

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
    for plan in plans:  # fail fast: every arm's model, manifests and batch, before the first epoch anywhere
        if plan.config.model.name != "source":
            try:
                validate(plan.config)
            except ConfigError as error:
                raise ConfigError(f"arms.{plan.arm}: {error}") from None

    stem = output_stem(cfg)
    tracker = open_tracker(
        uri=cfg.tracking.uri,
        experiment=cfg.tracking.experiment,
        run_name=stem,
        required=cfg.tracking.required,
    )
    tracking_uri = getattr(tracker, "tracking_uri", None)

    def child(key: str) -> Tracker:
        if tracker.run_id is None:
            return NullTracker()
        return child_tracker(
            tracking_uri=tracking_uri,
            parent_run_id=tracker.run_id,
            key_tag="experiment.run",
            key=key,
            run_name=f"{stem}/{key}",
        )

    status = "FAILED"
    try:
        tracker.set_tags(
            {
                "pipeline.job": "experiment",
                "experiment.name": cfg.name,
                "experiment.scale": cfg.scale,
                "claim": cfg.claim,
                "git.revision": git_revision(),
                "dataset.manifest_url": redact_uri(data.train_manifest),
                "dataset.manifest_digest": manifest_digest(train_manifest),
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
        source_uri, source_fact = None, []
        if _needs_source(plans):
            source_uri, trained_now = ensure_source(
                cfg, data, device=device, open_tracker=lambda: child("source")
            )
            how = "pre-trained in this run" if trained_now else "reused from the cache"
            source_fact = [
                f"- Fine-tuning source: `{source_uri}` ({how}; recipe `{cfg.source.recipe}` with "
                f"{cfg.source.overrides or 'no overrides'})"
            ]
            log(f"source: {source_uri} ({how})")
            plans = plan_arms(cfg, **data_args, source_uri=source_uri)

        runs: list[ArmRun] = []
        for index, plan in enumerate(plans, start=1):
            run = _train_plan(
                plan,
                cfg=cfg,
                device=device,
                tracker=child(f"{plan.arm}/seed{plan.seed}"),
                tracking_uri=tracking_uri,
            )
            runs.append(run)
            shown = ", ".join(f"{m} {run.summary.get(m, float('nan')):.3f}" for m in cfg.metrics)
            log(
                f"[{index}/{len(plans)}] {plan.arm} seed {plan.seed}: {shown} ({run.summary['seconds']:.0f} s)"
            )

        results = results_of(runs)
        verdict = judge(cfg, results)
        seconds = time.perf_counter() - started
        output_dir = Path(cfg.output_dir)
        plot_path = plot(cfg, runs, output_dir / f"{stem}.png")
        facts = [
            f"- Device: {_device_label(device)}; wall time {seconds / 60:.1f} min for {len(plans)} runs "
            f"({len(cfg.arms)} arms x {len(cfg.seeds)} seeds), data preparation included",
            *source_fact,
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
        markdown_path = output_dir / f"{stem}.md"
        markdown_path.write_text(
            markdown(cfg, runs, verdict, command=command, plot_name=plot_path.name, facts=facts)
        )

        if tracker.run_id is not None:
            _publish(tracker, cfg, results, verdict, files=(markdown_path, plot_path))
        status = "FINISHED"
        return ExperimentOutcome(
            name=cfg.name,
            verdict=verdict,
            runs=runs,
            markdown_path=markdown_path,
            plot_path=plot_path,
            parent_run_id=tracker.run_id,
            tracking_uri=tracking_uri,
            seconds=seconds,
        )
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.close(status=status)


def _train_plan(
    plan: ArmPlan, *, cfg: ExperimentConfig, device: torch.device, tracker: Tracker, tracking_uri: str | None
) -> ArmRun:
    """One (arm, seed) in its child run: config as params, fit's and the experiment's metrics per epoch, the
    summary at the end; the run is closed FINISHED, or FAILED / KILLED when training raises."""
    from pipeline.pretrain import validate_model
    from pipeline.tracking.mlflow_tracker import flatten_params

    status = "FAILED"
    try:
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
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.close(status=status)
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

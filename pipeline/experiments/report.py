"""The evidence of an experiment: a Markdown page (claim, verdict, table, plot, how it was produced) and the
plot of its per-epoch curves, mean over seeds with the min-max band."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from pipeline.config import ExperimentConfig, dump_yaml
from pipeline.experiments.arm import ArmRun
from pipeline.experiments.stats import Results, Verdict

# Column titles of the summary metrics that need words; others are shown as their key.
LABELS = {
    "last/train/error": "final train error",
    "last/val/error": "final val error",
    "last/val/top1": "final val top-1",
    "best/val/top1": "restored (best) val top-1",
    "last/weights/l2_norm": "final weight norm",
    "last/gap/top1": "final train-val gap",
    "last/train_eval/top1": "final train top-1 (eval mode)",
    "best/val/balanced_acc": "best val balanced acc.",
    "best/val/minority_recall": "minority recall (best epoch)",
    "epochs_run": "epochs run",
    "epochs_saved": "epochs saved",
    "restored_gain": "best - last",
    "model/mmacs": "MMACs",
    "model/params_m": "params (M)",
}


def label(metric: str) -> str:
    return LABELS.get(metric, metric)


def results_of(runs: Sequence[ArmRun]) -> Results:
    summaries: dict[str, list[dict[str, float]]] = {}
    for run in runs:
        summaries.setdefault(run.arm, []).append(run.summary)
    return Results(summaries)


def _overrides_text(overrides: dict) -> str:
    if not overrides:
        return "(shared only)"
    return "<br>".join(f"`{key}={value}`" for key, value in overrides.items())


def table(cfg: ExperimentConfig, runs: Sequence[ArmRun]) -> str:
    """arm | its overrides | seeds | mean ± spread of each of cfg.metrics."""
    results = results_of(runs)
    header = ["arm", "overrides", "seeds", *(label(m) for m in cfg.metrics)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * len(cfg.metrics)]
    for arm in results.arms:
        arm_runs = [run for run in runs if run.arm == arm]
        seeds = ", ".join(str(run.seed) for run in arm_runs)
        cells = [str(results.stats(arm, metric)) for metric in cfg.metrics]
        lines.append(
            f"| {arm} | {_overrides_text(arm_runs[0].overrides)} | {seeds} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def markdown(
    cfg: ExperimentConfig,
    runs: Sequence[ArmRun],
    verdict: Verdict,
    *,
    command: str,
    plot_name: str,
    facts: Sequence[str],
) -> str:
    """The results page; ``facts`` are "- ..." lines on how it was produced (device, time, MLflow run)."""
    shared = ", ".join(f"`{k}={v}`" for k, v in _flat(cfg.shared).items()) or "none"
    lines = [
        f"# {cfg.name}",
        "",
        f"**Claim** ({cfg.claim_source}): {cfg.claim}",
        "",
        f"**Verdict:** {verdict.line}",
        "",
        *([f"**What it shows.** {cfg.discussion.strip()}", ""] if cfg.discussion.strip() else []),
        table(cfg, runs),
        "`±` is the spread over seeds (max - min); a difference counts only when it exceeds the larger spread "
        "of the two arms compared.",
        "",
        f"![{cfg.name}]({plot_name})",
        "",
        "## How this was produced",
        "",
        f"- Command: `{command}`",
        f"- Scale: `{cfg.scale}`; data: {_data_text(cfg)}",
        f"- Base recipe: `{cfg.recipe}`; shared overrides: {shared}",
        *facts,
        "",
        "<details><summary>Resolved experiment config</summary>",
        "",
        "```yaml",
        dump_yaml(cfg).rstrip(),
        "```",
        "",
        "</details>",
        "",
    ]
    return "\n".join(lines)


def _flat(mapping: dict) -> dict:
    from pipeline.experiments.spec import dotted

    return dotted(mapping)


def _data_text(cfg: ExperimentConfig) -> str:
    if cfg.data.source == "manifests":
        return f"`{cfg.data.train_manifest}` / `{cfg.data.val_manifest}`"
    toy = cfg.data.toy
    if cfg.data.task == "pretrain":
        sizes = (
            f"10 classes, {toy.pretrain_train_per_class} train / {toy.pretrain_val_per_class} val per class"
        )
    else:
        sizes = (
            f"{toy.downstream_classes} classes, {toy.downstream_train_max} train images in the largest class, "
            f"imbalance {toy.downstream_imbalance:g}:1, {toy.downstream_val_per_class} val per class (balanced)"
        )
    return f"embedded `{cfg.data.task}` task ({sizes}, {toy.image_size} px images)"


def plot(cfg: ExperimentConfig, runs: Sequence[ArmRun], path: Path) -> Path:
    """One panel per ``cfg.curves`` metric: each arm's mean over seeds per epoch, the band from min to max.
    Epochs only some seeds reached (early stopping) average those seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(run.arm for run in runs))
    figure, axes = plt.subplots(1, len(cfg.curves), figsize=(5.2 * len(cfg.curves), 3.8), squeeze=False)
    for axis, metric in zip(axes[0], cfg.curves, strict=True):
        for index, arm in enumerate(arms):
            by_epoch: dict[int, list[float]] = {}
            for run in runs:
                if run.arm != arm:
                    continue
                for entry in run.history:
                    value = entry.get(metric)
                    if value is not None and not math.isnan(value):
                        by_epoch.setdefault(int(entry["epoch"]), []).append(value)
            if not by_epoch:
                continue
            epochs = sorted(by_epoch)
            means = [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]
            color = f"C{index % 10}"
            axis.plot(epochs, means, marker="o", markersize=3, color=color, label=arm)
            axis.fill_between(
                epochs,
                [min(by_epoch[e]) for e in epochs],
                [max(by_epoch[e]) for e in epochs],
                color=color,
                alpha=0.2,
            )
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(
        f"{cfg.name} ({cfg.scale}): mean over seeds {list(cfg.seeds)}, band = min..max", fontsize=10
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path

"""One verdict function per claim, by name: it reads the measured summaries, compares arms with the seeds'
spread (:mod:`pipeline.experiments.stats`) and writes the one-line verdict.

The rule is the same everywhere: a part of a claim holds only when the difference between the means exceeds
the larger of the two arms' spreads (max - min over seeds) in the claimed direction. A claim is ``held`` when
all of its parts hold, ``contradicted`` when some part is measured the other way round beyond the spread, and
``not_shown`` otherwise. No import of torch or MLflow: the registry is checked while the config loads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeline.config import ConfigError, ExperimentConfig
from pipeline.experiments.stats import Comparison, Outcome, Results, Verdict, fmt, verdict


@dataclass(frozen=True)
class VerdictSpec:
    arms: tuple[str, ...]
    """Arm names the verdict compares (the experiment may have more)."""
    judge: Callable[[Results], Verdict]


VERDICTS: dict[str, VerdictSpec] = {}


def register(name: str, *, arms: tuple[str, ...]) -> Callable[[Callable[[Results], Verdict]], Callable]:
    def decorate(judge: Callable[[Results], Verdict]) -> Callable[[Results], Verdict]:
        assert name not in VERDICTS, f"verdict {name} registered twice"
        VERDICTS[name] = VerdictSpec(arms=arms, judge=judge)
        return judge

    return decorate


def check_verdict(cfg: ExperimentConfig) -> VerdictSpec:
    """The experiment's verdict function; ConfigError when it is unknown or an arm it compares is missing."""
    name = cfg.verdict or cfg.name
    if name not in VERDICTS:
        raise ConfigError(f"verdict: no verdict function {name!r}; known: {', '.join(sorted(VERDICTS))}")
    spec = VERDICTS[name]
    missing = [arm for arm in spec.arms if arm not in cfg.arms]
    if missing:
        raise ConfigError(
            f"arms: the {name} verdict compares arms {', '.join(spec.arms)}; missing: {', '.join(missing)}"
        )
    return spec


def judge(cfg: ExperimentConfig, results: Results) -> Verdict:
    return check_verdict(cfg).judge(results)


def relation(comparison: Comparison, a: str, b: str) -> str:
    """``plain56 above plain20 (0.412 vs 0.331, spread 0.020)``: the words follow the spread rule."""
    words = {1: "above", -1: "below", 0: "within the spread of"}[comparison.direction]
    return f"{a} {words} {b} ({comparison.text()})"


def _combine(parts_for: list[bool], parts_against: list[bool]) -> Outcome:
    if any(parts_against):
        return "contradicted"
    return "held" if all(parts_for) else "not_shown"


@register("degradation", arms=("plain20", "plain56", "resnet20", "resnet56"))
def degradation(results: Results) -> Verdict:
    """Deeper plain nets train worse (higher final training error); residual ones do not."""
    metric = "last/train/error"
    plain = results.compare("plain56", "plain20", metric)
    residual = results.compare("resnet56", "resnet20", metric)
    outcome = _combine(
        [plain.direction == 1, residual.direction <= 0], [plain.direction == -1, residual.direction == 1]
    )
    details = (
        f"final training error: {relation(plain, 'plain56', 'plain20')}; "
        f"{relation(residual, 'resnet56', 'resnet20')}"
    )
    return verdict(outcome, details, seeds=results.seeds)


@register("l2_vs_weight_decay", arms=("adam_l2", "adamw", "sgd"))
def l2_vs_weight_decay(results: Results) -> Verdict:
    """At the same delta, AdamW (decoupled decay) generalizes better than Adam with an L2 penalty."""
    accuracy, norm = "last/val/top1", "last/weights/l2_norm"
    adamw = results.compare("adamw", "adam_l2", accuracy)
    outcome = _combine([adamw.direction == 1], [adamw.direction == -1])
    norms = ", ".join(f"{arm} {results.stats(arm, norm)}" for arm in ("adam_l2", "adamw", "sgd"))
    details = (
        f"final val top-1: {relation(adamw, 'adamw', 'adam_l2')}, sgd {results.stats('sgd', accuracy)}; "
        f"final weight norm: {norms}"
    )
    return verdict(outcome, details, seeds=results.seeds)


@register("dropout", arms=("p0", "p0.2", "p0.5"))
def dropout(results: Results) -> Verdict:
    """Dropout before the last layer shrinks the train-val gap of a network that overfits."""
    gap, accuracy = "last/gap/top1", "last/val/top1"
    stronger = results.compare("p0", "p0.5", gap)
    # The claim is about a setting that overfits: without a gap at p=0 there is nothing to shrink.
    overfits = results.stats("p0", gap).mean > results.stats("p0", gap).spread
    outcome = _combine([overfits, stronger.direction == 1], [stronger.direction == -1])
    details = (
        f"final train-val top-1 gap (train set in eval mode): {relation(stronger, 'p0', 'p0.5')}, "
        f"p0.2 {results.stats('p0.2', gap)}; final val top-1: "
        + ", ".join(f"{arm} {results.stats(arm, accuracy)}" for arm in ("p0", "p0.2", "p0.5"))
    )
    if not overfits:
        details += " (the p0 arm does not overfit: its gap is within its spread)"
    return verdict(outcome, details, seeds=results.seeds)


@register("early_stopping", arms=("patience1", "patience3", "off"))
def early_stopping(results: Results) -> Verdict:
    """Early stopping with e > 1 saves epochs without losing accuracy (it restores the best epoch); e = 1
    stops too early."""
    restored = "best/val/top1"
    saved = results.compare("off", "patience3", "epochs_run")
    lost = results.compare("patience3", "off", restored)
    patient = results.compare("patience3", "patience1", restored)
    outcome = _combine(
        [saved.direction == 1, lost.direction >= 0, patient.direction == 1],
        [lost.direction == -1, patient.direction == -1],
    )
    details = (
        f"epochs run: patience3 {results.stats('patience3', 'epochs_run')}, "
        f"patience1 {results.stats('patience1', 'epochs_run')}, off {results.stats('off', 'epochs_run')}; "
        f"restored best val top-1: {relation(lost, 'patience3', 'off')}, "
        f"{relation(patient, 'patience3', 'patience1')}; "
        f"restoring the best epoch instead of keeping the last gained "
        f"{results.stats('off', 'restored_gain')} (off)"
    )
    return verdict(outcome, details, seeds=results.seeds)


SINGLE_DIMENSIONS = ("width", "depth", "resolution")


@register("scaling", arms=("baseline", *SINGLE_DIMENSIONS, "compound"))
def scaling(results: Results) -> Verdict:
    """At matched FLOPs, compound scaling beats the best single-dimension scaling."""
    accuracy = "last/val/top1"
    best_single = max(SINGLE_DIMENSIONS, key=lambda arm: results.stats(arm, accuracy).mean)
    compound = results.compare("compound", best_single, accuracy)
    outcome = _combine([compound.direction == 1], [compound.direction == -1])
    over_baseline = ", ".join(
        f"{arm} {fmt(results.compare(arm, 'baseline', accuracy).difference)}"
        for arm in (*SINGLE_DIMENSIONS, "compound")
    )
    details = (
        f"final val top-1: {relation(compound, 'compound', best_single + ' (best single dimension)')}; "
        f"gain over the baseline: {over_baseline} (baseline {results.stats('baseline', accuracy)})"
    )
    return verdict(outcome, details, seeds=results.seeds)


@register("finetune_vs_scratch", arms=("linear", "two_stage", "scratch"))
def finetune_vs_scratch(results: Results) -> Verdict:
    """Fine-tuning a pre-trained network beats training the same network from scratch on a small target set."""
    accuracy = "best/val/balanced_acc"
    two_stage = results.compare("two_stage", "scratch", accuracy)
    linear = results.compare("linear", "scratch", accuracy)
    outcome = _combine(
        [two_stage.direction == 1, linear.direction == 1], [two_stage.direction == -1, linear.direction == -1]
    )
    details = (
        f"best val balanced accuracy: {relation(two_stage, 'two_stage', 'scratch')}; "
        f"{relation(linear, 'linear', 'scratch')}; "
        f"{relation(results.compare('two_stage', 'linear', accuracy), 'two_stage', 'linear')}"
    )
    return verdict(outcome, details, seeds=results.seeds)


CORRECTIONS = ("inverse", "effective_number", "oversample")


@register("imbalance", arms=("none", *CORRECTIONS))
def imbalance(results: Results) -> Verdict:
    """Class weights (inverse, effective number) and oversampling raise the minority class's recall over no
    correction, without lowering balanced accuracy."""
    recall, balanced = "best/val/minority_recall", "best/val/balanced_acc"
    recalls = {arm: results.compare(arm, "none", recall) for arm in CORRECTIONS}
    balances = {arm: results.compare(arm, "none", balanced) for arm in CORRECTIONS}
    outcome = _combine(
        [c.direction == 1 for c in recalls.values()] + [c.direction >= 0 for c in balances.values()],
        [c.direction == -1 for c in recalls.values()] + [c.direction == -1 for c in balances.values()],
    )
    details = (
        "minority recall: "
        + "; ".join(relation(c, arm, "none") for arm, c in recalls.items())
        + ". Balanced accuracy: "
        + "; ".join(relation(c, arm, "none") for arm, c in balances.items())
    )
    return verdict(outcome, details, seeds=results.seeds)


TECHNIQUES = (
    "mixup",
    "cutmix",
    "trivialaugment",
    "randaugment",
    "autoaugment",
    "augmix",
    "random_erasing",
    "label_smoothing",
    "ema",
    "repeated_augment",
    "stochastic_depth",
)


@register("techniques", arms=("baseline", *TECHNIQUES, "train24", "fixres"))
def techniques(results: Results) -> Verdict:
    """Each technique of torchvision's recipes, added alone, raises the restored model's val top-1 over the
    recipe without it (FixRes: evaluating at 32 px over evaluating at the 24 px training crop)."""
    accuracy = "restored/top1"
    comparisons = {arm: (results.compare(arm, "baseline", accuracy), "baseline") for arm in TECHNIQUES}
    comparisons["fixres"] = (results.compare("fixres", "train24", accuracy), "train24")
    outcome = _combine(
        [c.direction == 1 for c, _ in comparisons.values()],
        [c.direction == -1 for c, _ in comparisons.values()],
    )
    details = "restored val top-1: " + "; ".join(
        relation(c, arm, reference) for arm, (c, reference) in comparisons.items()
    )
    return verdict(outcome, details, seeds=results.seeds)

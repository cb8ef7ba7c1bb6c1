"""Experiment configs: find ``configs/experiments/<name>.yaml``, apply a ``scale=`` preset and ``key=value``
overrides, and resolve every (arm, seed) into the typed config it trains with. No torch here, so a bad
experiment fails in milliseconds with a ConfigError naming the field.

An arm's config is built in one order, later entries winning: the base recipe, the experiment's data
(manifests), ``shared``, the arm's own overrides, the FLOPs-matched scaling knobs (scaling experiment), then
what the experiment owns: the seed (``train.seed`` and ``data.seed``), one in-process worker and the
fine-tuning source.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import (
    ConfigError,
    ExperimentConfig,
    FinetuneConfig,
    PretrainConfig,
    deep_merge,
    from_dict,
    merge_overrides,
    read_yaml,
)

REPO_DIR = Path(__file__).resolve().parents[2]
EXPERIMENTS_DIR = REPO_DIR / "configs" / "experiments"
# What finetune.source holds while arms are checked before the in-process source exists (only non-empty
# matters to FinetuneConfig; nothing reads it).
PENDING_SOURCE = "pending:in-process-source"
PENDING_DATA = "pending:prepared-at-run-time"


@dataclass(frozen=True)
class ArmPlan:
    """One (arm, seed) run of an experiment."""

    arm: str
    seed: int
    overrides: dict[str, Any]
    """The arm's own dotted overrides, FLOPs-matched knobs included (what the table shows)."""
    config: PretrainConfig
    """The resolved config it trains with (a FinetuneConfig for kind=finetune)."""


def list_experiments() -> list[str]:
    return sorted(path.stem for path in EXPERIMENTS_DIR.glob("*.yaml"))


def experiment_path(name: str) -> Path:
    """``configs/experiments/<name>.yaml`` (or ``name`` itself when it is a YAML path)."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else EXPERIMENTS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"experiment {name!r}: no {path}; known experiments: {', '.join(list_experiments())}"
        )
    return path


def repo_path(path: str) -> Path:
    """A recipe path as given (relative to the working directory), else relative to the repository."""
    given = Path(path)
    return given if given.exists() or given.is_absolute() else REPO_DIR / given


def load_experiment(name: str, overrides: list[str] | None = None) -> ExperimentConfig:
    """The typed experiment: the YAML, then the preset named by ``scale`` (from the YAML or the overrides),
    then the overrides, which win over the preset."""
    from pipeline.experiments.verdicts import check_verdict
    from pipeline.pretrain import validate_model

    overrides = list(overrides or [])
    path = experiment_path(name)
    tree = read_yaml(path)
    scale = merge_overrides(tree, overrides).get("scale", "default")
    if scale != "default":
        presets = tree.get("presets") or {}
        if not isinstance(presets, dict) or scale not in presets:
            known = ", ".join(["default", *(presets if isinstance(presets, dict) else [])])
            raise ConfigError(f"scale: unknown preset {scale!r} of experiment {path.stem}; known: {known}")
        if not isinstance(presets[scale], dict):
            raise ConfigError(f"presets.{scale}: expected a mapping of changes to the experiment")
        tree = deep_merge(tree, presets[scale])
    cfg = from_dict(ExperimentConfig, merge_overrides(tree, overrides))
    if not name.endswith((".yaml", ".yml")) and cfg.name != path.stem:
        raise ConfigError(f"name: {cfg.name!r} must equal the file name {path.stem!r}")
    check_verdict(cfg)
    for arm in cfg.arms:  # every arm typed and its model known now: a typo fails before any data is made
        config = arm_config(
            cfg, arm, seed=cfg.seeds[0], train_manifest=PENDING_DATA, val_manifest=PENDING_DATA
        )
        if config.model.name != "source":  # the fine-tuning source's architecture is known once it exists
            try:
                validate_model(config)
            except ConfigError as error:
                raise ConfigError(f"arms.{arm}: {error}") from None
    return cfg


def dotted(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}, "train.epochs": 3} -> {"optim.lr": 0.1, "train.epochs": 3}``. An empty mapping
    stays a value (``model.scaling: {}`` clears the knobs)."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(dotted(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key in a plain config tree; unknown names are left for the typed build to report."""
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part} is a value, not a section")
        node = child
    node[leaf] = value


def arm_config(
    cfg: ExperimentConfig,
    arm: str,
    *,
    seed: int,
    train_manifest: str,
    val_manifest: str,
    source_uri: str | None = None,
    extra: dict[str, Any] | None = None,
) -> PretrainConfig:
    """The typed config of one (arm, seed); a ConfigError names the arm and the field."""
    config_type = FinetuneConfig if cfg.kind == "finetune" else PretrainConfig
    changes = {
        "data.train_manifest": train_manifest,
        "data.val_manifest": val_manifest,
        **dotted(cfg.shared),
        **dotted(cfg.arms[arm]),
        **(extra or {}),
        "train.seed": seed,
        "data.seed": seed,
        # Arms run in this process on one device; the recipe's DDP worker count does not apply.
        "scaling.num_workers": 1,
    }
    if cfg.kind == "finetune":
        changes["finetune.source"] = source_uri or PENDING_SOURCE
    return recipe_config(config_type, cfg.recipe, changes, where=f"arms.{arm}")


def recipe_config(config_type: type, recipe: str, changes: dict[str, Any], *, where: str) -> Any:
    """``recipe`` with dotted ``changes`` applied, typed; a ConfigError is prefixed with ``where``."""
    tree = read_yaml(repo_path(recipe))
    try:
        for key, value in changes.items():
            set_dotted(tree, key, value)
        return from_dict(config_type, tree)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def plan_arms(
    cfg: ExperimentConfig,
    *,
    train_manifest: str,
    val_manifest: str,
    num_classes: int,
    source_uri: str | None = None,
) -> list[ArmPlan]:
    """Every (arm, seed) in report order: arms as listed, seeds within each arm. The scaling arms' knobs are
    matched to the FLOPs target here, before anything trains."""
    matched: dict[str, dict[str, Any]] = {}
    if cfg.flops_match.directions:
        from pipeline.experiments.matching import match_flops

        baseline = arm_config(
            cfg,
            cfg.flops_match.baseline_arm,
            seed=cfg.seeds[0],
            train_manifest=train_manifest,
            val_manifest=val_manifest,
            source_uri=source_uri,
        )
        matches = match_flops(baseline, cfg.flops_match, num_classes=num_classes)
        matched = {arm: match.overrides for arm, match in matches.items()}
    plans = []
    for arm in cfg.arms:
        extra = matched.get(arm, {})
        for seed in cfg.seeds:
            config = arm_config(
                cfg,
                arm,
                seed=seed,
                train_manifest=train_manifest,
                val_manifest=val_manifest,
                source_uri=source_uri,
                extra=extra,
            )
            plans.append(
                ArmPlan(arm=arm, seed=seed, overrides={**dotted(cfg.arms[arm]), **extra}, config=config)
            )
    return plans


def output_stem(cfg: ExperimentConfig) -> str:
    """``<name>`` for the default scale, ``<name>-<scale>`` for a preset (the embedded result is kept)."""
    return cfg.name if cfg.scale == "default" else f"{cfg.name}-{cfg.scale}"

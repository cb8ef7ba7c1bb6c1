"""Candidate configs of a search, sampled up front in the driver: no Ray here.

Sampling every candidate before Tune starts (seeded) has three uses: a resumed search has exactly the same
trials; the compound-scaling constraint and the FLOPs budget are enforced on concrete configs, each built and
measured by the profiler before anything runs; and a bad space fails in seconds, before Ray.

A candidate is a flat ``{dotted pretrain field: value}`` dict, applied on top of the recipe with the same
override machinery as ``key=value`` on the command line, so any config field can be searched.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import (
    ConfigError,
    ParamSpace,
    PretrainConfig,
    ScalingSpace,
    SearchSpace,
    from_dict,
    to_dict,
)

COMPOUND_MODEL = "efficientnet_compound"
DIRECT_MODEL = "efficientnet_scaled"
MAX_ATTEMPTS_PER_TRIAL = 200


@dataclass
class Candidates:
    overrides: list[dict[str, Any]]
    """One flat {dotted field: value} dict per trial, in trial order."""
    rejected: list[dict[str, Any]] = field(default_factory=list)
    """Sampled candidates the FLOPs budget refused, each with its ``gflops``."""


def sample_value(space: ParamSpace, rng: random.Random) -> Any:
    if space.type == "loguniform":
        return math.exp(rng.uniform(math.log(space.low), math.log(space.high)))
    if space.type == "uniform":
        return rng.uniform(space.low, space.high)
    if space.type == "choice":
        return rng.choice(space.values)
    return space.values[0]


def compound_product(alpha: float, beta: float, gamma: float) -> float:
    """Tan & Le's resource factor per unit of phi: depth x width^2 x resolution^2."""
    return alpha * beta**2 * gamma**2


def sample_compound(space: ScalingSpace, rng: random.Random) -> tuple[float, float, float]:
    """(alpha, beta, gamma), each in [1, max_coefficient], with alpha*beta^2*gamma^2 = target.

    beta and gamma are drawn so that the implied alpha = target / (beta^2 gamma^2) can lie in range, then
    alpha is solved for: the constraint holds by construction (up to rounding), never by luck.
    """
    for _ in range(10_000):
        beta = rng.uniform(1.0, min(space.max_coefficient, math.sqrt(space.target)))
        gamma_max = min(space.max_coefficient, math.sqrt(space.target / beta**2))
        gamma = rng.uniform(1.0, gamma_max)
        alpha = space.target / (beta**2 * gamma**2)
        if 1.0 <= alpha <= space.max_coefficient:
            # Rounded for readable params and names; the rounding error is far inside any tolerance >= 1e-3.
            alpha, beta, gamma = round(alpha, 4), round(beta, 4), round(gamma, 4)
            if abs(compound_product(alpha, beta, gamma) - space.target) <= space.tolerance * space.target:
                return alpha, beta, gamma
    raise ConfigError(
        f"space.scaling: no (alpha, beta, gamma) in [1, {space.max_coefficient}] satisfies "
        f"alpha*beta^2*gamma^2 = {space.target}; raise max_coefficient or lower target"
    )


def _scaling_overrides(base: PretrainConfig, space: ScalingSpace, rng: random.Random) -> dict[str, Any]:
    if space.mode == "none":
        return {}
    if space.mode == "direct":
        return {
            "model.name": DIRECT_MODEL,
            "model.scaling": {
                "width_mult": round(sample_value(space.width_mult, rng), 4),
                "depth_mult": round(sample_value(space.depth_mult, rng), 4),
            },
            "data.resolution": int(sample_value(space.resolution, rng)),
        }
    alpha, beta, gamma = sample_compound(space, rng)
    # Resolution scales by gamma^phi from the recipe's (224 for B0), as depth and width do from B0's.
    resolution = round(base.data.resolution * gamma**space.phi)
    return {
        "model.name": COMPOUND_MODEL,
        "model.scaling": {"phi": space.phi, "alpha": alpha, "beta": beta, "gamma": gamma},
        "data.resolution": resolution,
    }


def apply_overrides(base: PretrainConfig, overrides: dict[str, Any]) -> PretrainConfig:
    """``base`` with flat dotted overrides applied and the result validated (ConfigError names the field)."""
    tree = to_dict(base)
    for dotted, value in overrides.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"space.extra.{dotted}: {part} is not a config section")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"space.extra.{dotted}: no such pretrain field")
        node[leaf] = value
    return from_dict(PretrainConfig, tree)


def gflops(cfg: PretrainConfig, *, num_classes: int) -> float:
    """Forward GFLOPs of one image: 2 x the MACs that the profiler (torch's FlopCounterMode) counts at
    data.resolution on the candidate model itself, so torchvision's rounding of channels and layers counts."""
    from pipeline.models.profile import count_macs
    from pipeline.train.build import build_classifier

    model = build_classifier(cfg.model, num_classes=num_classes)
    return 2 * count_macs(model, resolution=cfg.data.resolution) / 1e9


def sample_candidates(
    base: PretrainConfig, space: SearchSpace, *, num_trials: int, seed: int, num_classes: int
) -> Candidates:
    """``num_trials`` validated candidates; with a FLOPs budget, over-budget ones are rejected and redrawn."""
    rng = random.Random(seed)
    result = Candidates(overrides=[])
    budget = space.scaling.flops_budget_g
    while len(result.overrides) < num_trials:
        if len(result.rejected) > MAX_ATTEMPTS_PER_TRIAL * num_trials:
            raise ConfigError(
                f"space.scaling.flops_budget_g: {len(result.rejected)} candidates in a row exceed "
                f"{budget} GFLOPs; raise the budget or shrink the scaling ranges"
            )
        overrides: dict[str, Any] = {
            "optim.weight_decay": sample_value(space.weight_decay, rng),
            "model.dropout": sample_value(space.dropout, rng),
        }
        overrides.update(_scaling_overrides(base, space.scaling, rng))
        for dotted, param in sorted(space.extra.items()):
            overrides[dotted] = sample_value(param, rng)
        cfg = apply_overrides(base, overrides)
        if budget is not None:
            cost = gflops(cfg, num_classes=num_classes)
            if cost > budget:
                result.rejected.append({**overrides, "gflops": cost})
                continue
        result.overrides.append(overrides)
    return result

"""Candidate configs of a search: no Ray and no Optuna here.

``search.sampler=random`` samples every candidate before Tune starts (seeded), which has three uses: a
resumed search has exactly the same trials; the compound-scaling constraint and the FLOPs budget are enforced
on concrete configs, each built and measured by the profiler before anything runs; and a bad space fails in
seconds, before Ray. ``grid`` enumerates every combination of a finite space, also up front. ``tpe`` chooses
each trial's values when Tune asks for the trial (pipeline.search.tuner), through the same
:func:`draw_overrides` with Optuna's suggestions as the draw, so all three build candidates alike.

A candidate is a flat ``{dotted recipe field: value}`` dict, applied on top of the recipe with the same
override machinery as ``key=value`` on the command line, so any config field can be searched.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable
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


Draw = Callable[[str, ParamSpace], Any]
"""``draw(name, entry)``: one value of the space entry ``space.<name>`` (random, grid or Optuna's TPE)."""


def draw_overrides(
    base: PretrainConfig, space: SearchSpace, draw: Draw, *, rng: random.Random | None = None
) -> dict[str, Any]:
    """One candidate: every entry of ``space`` drawn with ``draw`` (in :meth:`SearchSpace.entries` order)
    and turned into the recipe fields it sets. Compound scaling solves its constraint with ``rng`` (random
    sampling only: the config refuses it for the other samplers)."""
    overrides: dict[str, Any] = {
        "optim.weight_decay": draw("weight_decay", space.weight_decay),
        "model.dropout": draw("dropout", space.dropout),
    }
    scaling = space.scaling
    if scaling.mode == "direct":
        overrides.update(
            {
                "model.name": DIRECT_MODEL,
                "model.scaling": {
                    "width_mult": round(draw("scaling.width_mult", scaling.width_mult), 4),
                    "depth_mult": round(draw("scaling.depth_mult", scaling.depth_mult), 4),
                },
                "data.resolution": int(draw("scaling.resolution", scaling.resolution)),
            }
        )
    elif scaling.mode == "compound":
        assert rng is not None, "compound scaling is drawn by the random sampler"
        alpha, beta, gamma = sample_compound(scaling, rng)
        # Resolution scales by gamma^phi from the recipe's (224 for B0), as depth and width do from B0's.
        overrides.update(
            {
                "model.name": COMPOUND_MODEL,
                "model.scaling": {"phi": scaling.phi, "alpha": alpha, "beta": beta, "gamma": gamma},
                "data.resolution": round(base.data.resolution * gamma**scaling.phi),
            }
        )
    for dotted, param in sorted(space.extra.items()):
        overrides[dotted] = draw(f"extra.{dotted}", param)
    return overrides


def apply_overrides(base: PretrainConfig, overrides: dict[str, Any]) -> PretrainConfig:
    """``base`` with flat dotted overrides applied and the result validated (ConfigError names the field);
    of ``base``'s own type, so a fine-tuning recipe stays one."""
    tree = to_dict(base)
    for dotted, value in overrides.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"space.extra.{dotted}: {part} is not a config section")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"space.extra.{dotted}: no such recipe field")
        node[leaf] = value
    return from_dict(type(base), tree)


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
    """``num_trials`` validated, distinct candidates drawn at random; with a FLOPs budget, over-budget ones
    are rejected and redrawn. A candidate equal to an earlier one is redrawn too (only a space of choices can
    repeat one), so a space of N combinations searched with N trials runs each once, in a seeded order."""
    rng = random.Random(seed)
    result = Candidates(overrides=[])
    budget = space.scaling.flops_budget_g
    repeats = 0
    while len(result.overrides) < num_trials:
        if len(result.rejected) > MAX_ATTEMPTS_PER_TRIAL * num_trials:
            raise ConfigError(
                f"space.scaling.flops_budget_g: {len(result.rejected)} candidates in a row exceed "
                f"{budget} GFLOPs; raise the budget or shrink the scaling ranges"
            )
        overrides = draw_overrides(base, space, lambda _, param: sample_value(param, rng), rng=rng)
        if overrides in result.overrides:
            repeats += 1
            if repeats > MAX_ATTEMPTS_PER_TRIAL * num_trials:
                raise ConfigError(
                    f"search.num_trials: the space holds only {len(result.overrides)} distinct candidates "
                    f"(found in {repeats + len(result.overrides)} draws), fewer than {num_trials}"
                )
            continue
        cfg = apply_overrides(base, overrides)
        if budget is not None:
            cost = gflops(cfg, num_classes=num_classes)
            if cost > budget:
                result.rejected.append({**overrides, "gflops": cost})
                continue
        result.overrides.append(overrides)
    return result


def grid_candidates(base: PretrainConfig, space: SearchSpace) -> Candidates:
    """Every combination of the space's choice/fixed entries once, the first entry varying slowest."""
    entries = space.entries()
    options = [param.values if param.type == "choice" else param.values[:1] for param in entries.values()]
    overrides = []
    for combination in itertools.product(*options):
        chosen = dict(zip(entries, combination, strict=True))
        overrides.append(draw_overrides(base, space, lambda name, _, chosen=chosen: chosen[name]))
    return Candidates(overrides=overrides)


def corner_candidates(base: PretrainConfig, space: SearchSpace) -> list[dict[str, Any]]:
    """Candidates that reach every bound of the continuous entries and every value of the choices (the first
    at the lows, the second at the highs, choices cycling): what a sampler that picks values later (tpe) may
    produce is checked against the recipe before anything runs."""
    entries = space.entries()
    count = max([2, *(len(p.values) for p in entries.values() if p.type == "choice")])

    def corner(index: int):
        def draw(_: str, param: ParamSpace) -> Any:
            if param.type in ("loguniform", "uniform"):
                return param.low if index % 2 == 0 else param.high
            return param.values[index % len(param.values)] if param.type == "choice" else param.values[0]

        return draw

    return [draw_overrides(base, space, corner(index)) for index in range(count)]

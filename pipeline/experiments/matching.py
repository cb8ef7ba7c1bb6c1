"""Scaling arms at matched FLOPs: pick each arm's depth, width and resolution so that its MACs, counted by the
profiler on the real architecture, lie within a tolerance of a target (e.g. 2x the baseline's).

Each arm grows along one direction (alpha, beta, gamma) of Tan & Le's rule: depth_mult x alpha^phi, width_mult
x beta^phi, resolution x gamma^phi; width-only is beta > 1 with alpha = gamma = 1, compound is all three. phi
is searched on a grid: the formula's "FLOPs ~ d w^2 r^2" is only approximate once torchvision rounds channels
to multiples of 8 and layers per stage up, so the count decides, not the formula.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.config import ConfigError, FlopsMatchConfig, PretrainConfig, ScalingDirection

WIDTH_KEY = "model.scaling.width_mult"
DEPTH_KEY = "model.scaling.depth_mult"
RESOLUTION_KEY = "data.resolution"


@dataclass(frozen=True)
class Match:
    overrides: dict[str, Any]
    """The arm's knobs: model.scaling.width_mult, model.scaling.depth_mult, data.resolution."""
    phi: float
    macs: int
    target_macs: int


_COUNTED: dict[tuple, int] = {}  # one process often counts the same architecture again (plan, then check)


def count_config_macs(cfg: PretrainConfig, *, num_classes: int) -> int:
    """MACs of one image at data.resolution, counted on the meta device (shapes only: no memory, ~0.1 s)."""
    import torch

    from pipeline.models.profile import count_macs
    from pipeline.train.build import build_classifier

    model_cfg = cfg.model
    key = (
        model_cfg.name,
        tuple(sorted(model_cfg.scaling.items())),
        model_cfg.dropout,
        model_cfg.stochastic_depth,
        cfg.data.resolution,
        num_classes,
    )
    if key not in _COUNTED:
        with torch.device("meta"):
            model = build_classifier(model_cfg, num_classes=num_classes)
        _COUNTED[key] = count_macs(model, resolution=cfg.data.resolution)
    return _COUNTED[key]


def _knobs(base: PretrainConfig, direction: ScalingDirection, phi: float) -> dict[str, Any]:
    scaling = base.model.scaling
    return {
        WIDTH_KEY: round(scaling["width_mult"] * direction.width**phi, 3),
        DEPTH_KEY: round(scaling["depth_mult"] * direction.depth**phi, 3),
        RESOLUTION_KEY: round(base.data.resolution * direction.resolution**phi),
    }


def _with_knobs(base: PretrainConfig, knobs: dict[str, Any]) -> PretrainConfig:
    from pipeline.config import replace_fields

    model = replace_fields(
        base.model,
        scaling={**base.model.scaling, "width_mult": knobs[WIDTH_KEY], "depth_mult": knobs[DEPTH_KEY]},
    )
    data = replace_fields(base.data, resolution=knobs[RESOLUTION_KEY])
    return replace_fields(base, model=model, data=data)


def match_flops(base: PretrainConfig, spec: FlopsMatchConfig, *, num_classes: int) -> dict[str, Match]:
    """Per arm of ``spec.directions``: the knobs whose MACs are closest to target_factor x the baseline's,
    searched on the grid phi = 0, phi_step, ... up to phi_max. ConfigError naming the arm when none lies within
    the tolerance."""
    from pipeline.models import get_spec

    knobs_of_model = get_spec(base.model.name).scaling
    missing = [k for k in ("width_mult", "depth_mult") if k not in knobs_of_model]
    if missing:
        raise ConfigError(
            f"flops_match: the baseline's model {base.model.name!r} has no {' or '.join(missing)} knob; use a "
            "model with both (efficientnet_scaled)"
        )
    base = _with_knobs(
        base,
        {
            WIDTH_KEY: base.model.scaling.get("width_mult", knobs_of_model["width_mult"]),
            DEPTH_KEY: base.model.scaling.get("depth_mult", knobs_of_model["depth_mult"]),
            RESOLUTION_KEY: base.data.resolution,
        },
    )
    target = round(spec.target_factor * count_config_macs(base, num_classes=num_classes))

    def macs_at(direction: ScalingDirection, step: int) -> tuple[dict[str, Any], int]:
        knobs = _knobs(base, direction, step * spec.phi_step)
        return knobs, count_config_macs(_with_knobs(base, knobs), num_classes=num_classes)

    matches = {}
    for arm, direction in spec.directions.items():
        # MACs never decrease with phi (channels, layers and pixels all round monotonically), so bisect for the
        # first grid step at or above the target; the closest match is that step or the one before it.
        low, high = 0, int(spec.phi_max / spec.phi_step)
        if macs_at(direction, high)[1] < target:
            low = high
        while high - low > 1:
            middle = (low + high) // 2
            if macs_at(direction, middle)[1] >= target:
                high = middle
            else:
                low = middle
        candidates = [(step, *macs_at(direction, step)) for step in (low, high)]
        step, knobs, macs = min(candidates, key=lambda c: abs(c[2] / target - 1))
        phi = round(step * spec.phi_step, 6)
        if abs(macs / target - 1) > spec.tolerance:
            raise ConfigError(
                f"flops_match.directions.{arm}: no phi up to {spec.phi_max} gives MACs within "
                f"{spec.tolerance:.0%} of the target {target / 1e6:.2f} M ({spec.target_factor}x the baseline); "
                f"closest: {macs / 1e6:.2f} M ({macs / target:.2f}x) at {knobs}. Rounding of layers and "
                "channels makes some targets unreachable: change the direction, target_factor or tolerance"
            )
        matches[arm] = Match(overrides=knobs, phi=phi, macs=macs, target_macs=target)
    return matches

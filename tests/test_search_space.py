"""The search space without Ray: the compound-scaling constraint, the FLOPs budget, and candidate configs
that pretrain accepts."""

from __future__ import annotations

import random

import pytest

from pipeline.config import (
    ConfigError,
    DataConfig,
    ParamSpace,
    PretrainConfig,
    ScalingSpace,
    SearchSpace,
    TuneConfig,
    load_config,
)
from pipeline.search.space import (
    apply_overrides,
    compound_product,
    gflops,
    sample_candidates,
    sample_compound,
)

BASE = PretrainConfig(data=DataConfig(train_manifest="unused", val_manifest="unused", resolution=64))


@pytest.mark.parametrize(
    "target,tolerance,max_coefficient",
    [(2.0, 0.01, 2.0), (2.0, 0.001, 1.5), (3.0, 0.005, 2.0), (1.5, 0.02, 1.3)],
)
def test_compound_sampler_always_satisfies_the_constraint(target, tolerance, max_coefficient):
    space = ScalingSpace(mode="compound", target=target, tolerance=tolerance, max_coefficient=max_coefficient)
    rng = random.Random(0)
    triples = [sample_compound(space, rng) for _ in range(500)]
    for alpha, beta, gamma in triples:
        assert abs(compound_product(alpha, beta, gamma) - target) <= tolerance * target
        assert all(1.0 <= c <= max_coefficient for c in (alpha, beta, gamma))
    # It explores the constraint surface rather than returning one point.
    assert len({round(b, 2) for _, b, _ in triples}) > 10 and len({round(g, 2) for _, _, g in triples}) > 10


def test_compound_sampler_reports_an_impossible_constraint():
    with pytest.raises(ConfigError, match="space.scaling"):
        sample_compound(ScalingSpace(mode="compound", target=20.0, max_coefficient=1.1), random.Random(0))


def test_compound_candidates_scale_resolution_by_gamma_phi():
    space = SearchSpace(scaling=ScalingSpace(mode="compound", phi=2.0))
    candidates = sample_candidates(BASE, space, num_trials=5, seed=1, num_classes=10)
    for overrides in candidates.overrides:
        scaling = overrides["model.scaling"]
        assert overrides["model.name"] == "efficientnet_compound" and scaling["phi"] == 2.0
        assert overrides["data.resolution"] == round(64 * scaling["gamma"] ** 2)
        assert abs(compound_product(scaling["alpha"], scaling["beta"], scaling["gamma"]) - 2.0) <= 0.02


def test_flops_budget_rejects_exactly_the_candidates_above_it():
    direct = ScalingSpace(
        mode="direct",
        width_mult=ParamSpace(type="uniform", low=0.25, high=1.5),
        depth_mult=ParamSpace(type="uniform", low=0.25, high=1.5),
        resolution=ParamSpace(type="choice", values=[32, 64, 96]),
        flops_budget_g=0.03,
    )
    candidates = sample_candidates(BASE, SearchSpace(scaling=direct), num_trials=6, seed=0, num_classes=10)
    assert len(candidates.overrides) == 6
    assert candidates.rejected, "this space has candidates above 0.03 GFLOPs: some must be rejected"
    for rejected in candidates.rejected:
        assert rejected["gflops"] > 0.03
    for overrides in candidates.overrides:  # measured again by the profiler, not by a formula
        assert gflops(apply_overrides(BASE, overrides), num_classes=10) <= 0.03


def test_candidates_are_deterministic_and_in_range():
    space = SearchSpace(extra={"optim.lr": ParamSpace(type="loguniform", low=1e-3, high=1e-1)})
    first = sample_candidates(BASE, space, num_trials=20, seed=7, num_classes=10).overrides
    again = sample_candidates(BASE, space, num_trials=20, seed=7, num_classes=10).overrides
    assert first == again
    for overrides in first:
        assert 1e-4 <= overrides["optim.weight_decay"] <= 1e-2
        assert 0.0 <= overrides["model.dropout"] <= 0.5
        assert 1e-3 <= overrides["optim.lr"] <= 1e-1


def test_an_unknown_extra_field_names_it():
    space = SearchSpace(extra={"optim.learning_rate": ParamSpace(type="fixed", values=[0.1])})
    with pytest.raises(ConfigError, match="space.extra.optim.learning_rate: no such pretrain field"):
        sample_candidates(BASE, space, num_trials=1, seed=0, num_classes=10)


def test_shipped_searches_load():
    from pathlib import Path

    for path in sorted(Path("configs/tune").glob("*.yaml")):
        cfg = load_config(TuneConfig, path)
        assert cfg.search.num_trials >= 1, path


@pytest.mark.parametrize(
    "override,message",
    [
        ("search.scheduler=asha2", "search.scheduler: must be one of"),
        ("search.num_trials=0", "search.num_trials: must be >= 1"),
        ("space.weight_decay.low=0", "space.weight_decay.low: loguniform needs low > 0"),
        ("space.scaling.mode=compund", "space.scaling.mode: must be one of"),
        ("pretrain.optim.weight_decay=2", "optim.weight_decay: must be in [0, 1)"),
    ],
)
def test_tune_job_bad_config_exits_2(override, message, capsys):
    import jobs.tune

    assert jobs.tune.main(["--config", "configs/tune/toy_asha.yaml", override]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "scheduler,expected",
    [
        ("asha", "AsyncHyperBandScheduler"),
        ("hyperband", "HyperBandScheduler"),
        ("median", "MedianStoppingRule"),
        ("none", "FIFOScheduler"),
    ],
)
def test_each_scheduler_counts_epochs(scheduler, expected):
    from pipeline.config import SearchConfig
    from pipeline.search.tuner import _scheduler

    built = _scheduler(SearchConfig(scheduler=scheduler, grace_period=2), max_epochs=9)
    assert type(built).__name__ == expected
    if scheduler != "none":
        assert built._time_attr == "training_iteration"  # epochs, not the median rule's default seconds

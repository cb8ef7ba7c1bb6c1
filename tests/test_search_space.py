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
    corner_candidates,
    gflops,
    grid_candidates,
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
    with pytest.raises(ConfigError, match="space.extra.optim.learning_rate: no such recipe field"):
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
        ("search.grace_period=7", "search.grace_period: 7 epochs, more than a trial trains (train.epochs=6)"),
        ("search.sampler=grid", "space.weight_decay.type: sampler=grid needs choice or fixed entries"),
    ],
)
def test_tune_job_bad_config_exits_2(override, message, capsys):
    import jobs.tune

    assert jobs.tune.main(["--config", "configs/tune/toy_asha.yaml", override]) == 2
    assert message in capsys.readouterr().err


def test_a_pbt_search_that_would_never_perturb_exits_2(capsys):
    import jobs.tune

    assert jobs.tune.main(["--config", "configs/tune/toy_pbt.yaml", "search.perturbation_interval=10"]) == 2
    assert "search.perturbation_interval: 10 epochs, not fewer than a trial trains" in capsys.readouterr().err


@pytest.mark.parametrize(
    "scheduler,expected",
    [
        ("asha", "AsyncHyperBandScheduler"),
        ("hyperband", "HyperBandScheduler"),
        ("median", "MedianStoppingRule"),
        ("pbt", "PopulationBasedTraining"),
        ("none", "FIFOScheduler"),
    ],
)
def test_each_scheduler_counts_epochs(scheduler, expected):
    from pipeline.config import SearchConfig
    from pipeline.search.tuner import _scheduler

    space = SearchSpace(extra={"optim.lr": ParamSpace(type="choice", values=[0.1, 0.01])})
    built = _scheduler(SearchConfig(scheduler=scheduler, grace_period=2), max_epochs=9, space=space)
    assert type(built).__name__ == expected
    if scheduler != "none":
        assert built._time_attr == "training_iteration"  # epochs, not the median rule's default seconds
    if scheduler == "pbt":  # what PBT may perturb, where the trial's config holds it
        overrides = built._hyperparam_mutations["trial"]["overrides"]
        assert overrides["optim.lr"] == [0.1, 0.01] and set(overrides) == {"optim.weight_decay", "optim.lr"}


# --------------------------------------------------------------------------------------------------------
# Samplers: random (distinct candidates), grid (every combination once), tpe (Optuna's TPE through Tune's
# OptunaSearch, drawing with the same candidate builder). No Ray cluster: the searcher is driven directly.

FINITE = SearchSpace(
    weight_decay=ParamSpace(type="choice", values=[1e-4, 1e-3]),
    dropout=ParamSpace(type="fixed", values=[0.1]),
    extra={"optim.lr": ParamSpace(type="choice", values=[0.01, 0.1, 1.0])},
)


def test_grid_runs_every_combination_once_in_order():
    candidates = grid_candidates(BASE, FINITE).overrides
    assert [(c["optim.weight_decay"], c["optim.lr"]) for c in candidates] == [
        (1e-4, 0.01),
        (1e-4, 0.1),
        (1e-4, 1.0),
        (1e-3, 0.01),
        (1e-3, 0.1),
        (1e-3, 1.0),
    ]
    assert all(c["model.dropout"] == 0.1 for c in candidates)


def test_random_candidates_are_distinct_and_a_finite_space_runs_out():
    candidates = sample_candidates(BASE, FINITE, num_trials=6, seed=3, num_classes=10).overrides
    keys = {(c["optim.weight_decay"], c["optim.lr"]) for c in candidates}
    assert len(keys) == 6, "6 trials over a 6-combination space: each combination once"
    with pytest.raises(ConfigError, match="search.num_trials: the space holds only 6 distinct candidates"):
        sample_candidates(BASE, FINITE, num_trials=7, seed=3, num_classes=10)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["search.sampler=grid", "search.num_trials=3"],
            "space.weight_decay.type: sampler=grid needs choice",
        ),
        (
            [
                "search.sampler=grid",
                "space.weight_decay={type: choice, values: [1.0e-4, 1.0e-3]}",
                "space.dropout={type: fixed, values: [0.0]}",
                "space.extra={}",
                "search.num_trials=3",
            ],
            "search.num_trials: sampler=grid runs every combination of the space once: set it to 2, got 3",
        ),
        (["search.sampler=tpe", "space.scaling.mode=compound"], "search.sampler: tpe cannot draw"),
        (["search.sampler=tpe", "space.scaling.flops_budget_g=1.0"], "search.sampler: tpe cannot redraw"),
        (
            ["search.sampler=tpe", "space.dropout={type: choice, values: [[0.1]]}"],
            "space.dropout.values: tpe",
        ),
        (["search.sampler=bayes"], "search.sampler: must be one of"),
        (["search.scheduler=pbs"], "search.scheduler: must be one of"),
        (
            ["search.scheduler=pbt", "search.sampler=tpe"],
            "search.sampler: pbt needs random or grid candidates",
        ),
        (
            [
                "search.scheduler=pbt",
                "space.weight_decay={type: fixed, values: [1.0e-4]}",
                "space.extra={optim.lr: {type: choice, values: [0.01]}}",
            ],
            "space: pbt mutates optim.weight_decay and optim.lr",
        ),
        (["search.scheduler=pbt", "search.quantile_fraction=0.6"], "search.quantile_fraction: must be in"),
        (
            ["search.scheduler=pbt", "search.num_trials=4", "search.max_concurrent_trials=2"],
            "search.max_concurrent_trials: pbt's population is the trials that train together",
        ),
        (["search.scheduler=pbt", "search.perturbation_interval=0"], "search.perturbation_interval: must be"),
    ],
)
def test_sampler_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(TuneConfig, "configs/tune/toy_asha.yaml", overrides)


def test_corner_candidates_reach_every_bound_and_choice():
    space = SearchSpace(extra={"optim.name": ParamSpace(type="choice", values=["sgd", "adamw", "sgd"])})
    corners = corner_candidates(BASE, space)
    assert {c["optim.weight_decay"] for c in corners} == {1e-4, 1e-2}
    assert {c["model.dropout"] for c in corners} == {0.0, 0.5}
    assert {c["optim.name"] for c in corners} == {"sgd", "adamw"}


def test_tpe_draws_candidates_of_the_space_through_tunes_optuna_searcher():
    from pipeline.config import SearchConfig
    from pipeline.search.tuner import _search_alg, trial_key

    space = SearchSpace(
        dropout=ParamSpace(type="fixed", values=[0.2]),
        extra={
            "optim.lr": ParamSpace(type="loguniform", low=1e-3, high=1e-1),
            "optim.name": ParamSpace(type="choice", values=["sgd", "adamw"]),
        },
    )
    search = SearchConfig(sampler="tpe", seed=5, tpe_startup_trials=2)

    def run() -> list[dict]:
        searcher = _search_alg(search, base=BASE, space=space)
        drawn = []
        for number in range(6):
            trial_id = f"abc12_{number:05d}"
            index, overrides = trial_key(searcher.suggest(trial_id), trial_id)
            assert index == number
            apply_overrides(BASE, overrides)  # a valid pretrain config
            # The objective favours a low lr: TPE's later suggestions are modelled on these results.
            searcher.on_trial_complete(
                trial_id, {"val/top1": -overrides["optim.lr"], "training_iteration": 1}
            )
            drawn.append(overrides)
        return drawn

    drawn = run()
    assert drawn == run(), "seeded: the same results give the same suggestions"
    for overrides in drawn:
        assert 1e-4 <= overrides["optim.weight_decay"] <= 1e-2 and overrides["model.dropout"] == 0.2
        assert 1e-3 <= overrides["optim.lr"] <= 1e-1 and overrides["optim.name"] in ("sgd", "adamw")
    assert len({o["optim.lr"] for o in drawn}) == 6


def test_a_finetune_recipe_searches_as_a_finetune_config():
    from pipeline.config import FinetuneConfig
    from pipeline.search.driver import base_config

    cfg = load_config(TuneConfig, "configs/tune/toy_finetune_median.yaml")
    base = base_config(cfg)
    assert isinstance(base, FinetuneConfig) and base.finetune.strategy == "two_stage"
    (overrides,) = sample_candidates(base, cfg.space, num_trials=1, seed=0, num_classes=4).overrides
    tuned = apply_overrides(base, overrides)
    assert isinstance(tuned, FinetuneConfig)
    assert tuned.finetune.class_weights == overrides["finetune.class_weights"]
    assert tuned.finetune.head_epochs in (1, 2, 3) and 0.01 <= tuned.finetune.backbone_lr_factor <= 1.0

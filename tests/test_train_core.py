"""Training core without Ray: L2 vs decoupled decay, no decay on biases/norms, lr scaling and schedules,
early stopping (incl. cross-rank agreement in a real 2-process gloo group), bitwise-exact resume."""

from __future__ import annotations

import io
import math
import os
import random
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipeline.config import ConfigError, EarlyStoppingConfig, OptimConfig, load_config
from pipeline.models import build_model, get_classifier
from pipeline.stack import free_port
from pipeline.train import (
    EarlyStopping,
    agree,
    build_optimizer,
    build_scheduler,
    capture_state,
    l2_penalty,
    load_checkpoint,
    regularization_loss,
    restore_state,
    save_checkpoint,
)


def tiny_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(4, 3),
    )


def decayed_and_not(model: nn.Sequential) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    conv, bn, linear = model[0], model[1], model[6]
    return [conv.weight, linear.weight], [conv.bias, bn.weight, bn.bias, linear.bias]


def set_weights_away_from_zero(model: nn.Sequential) -> None:
    """|w| in [0.5, 1] with mixed signs, so delta*w >> Adam's eps and no weight crosses 0 within the test."""
    with torch.no_grad():
        for parameter in decayed_and_not(model)[0]:
            magnitude = torch.linspace(0.5, 1.0, parameter.numel()).reshape(parameter.shape)
            sign = torch.where(torch.arange(parameter.numel()) % 2 == 0, 1.0, -1.0).reshape(parameter.shape)
            parameter.copy_(magnitude * sign)


def zero_gradient_steps(model: nn.Module, cfg: OptimConfig, steps: int) -> None:
    """Steps whose data gradient is exactly 0 (loss = 0 * output): only the regularizer moves the weights."""
    optimizer = build_optimizer(model, cfg, global_batch_size=cfg.reference_batch_size)
    x = torch.randn(4, 3, 6, 6)
    model.eval()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = 0.0 * model(x).sum() + regularization_loss(model, cfg)
        loss.backward()
        optimizer.step()


LR, DELTA, STEPS = 1e-3, 1e-2, 20


def test_adamw_shrinks_by_exactly_one_minus_lr_delta_per_step():
    model = tiny_model()
    set_weights_away_from_zero(model)
    decayed, not_decayed = decayed_and_not(model)
    expected = [p.detach().clone() for p in decayed]
    untouched = [p.detach().clone() for p in not_decayed]
    zero_gradient_steps(model, OptimConfig(name="adamw", lr=LR, weight_decay=DELTA), STEPS)
    for _ in range(STEPS):
        for w in expected:
            w.mul_(1 - LR * DELTA)  # the decoupled rule, w <- (1 - lr*delta) w, as float32 arithmetic
    for parameter, w in zip(decayed, expected, strict=True):
        assert torch.equal(parameter, w)
    # After 20 steps: |w| shrank by (1 - 1e-5)^20, i.e. 2e-4 relative, proportional to delta.
    assert decayed[0].abs().max().item() == pytest.approx(1.0 * (1 - LR * DELTA) ** STEPS, rel=1e-6)
    for parameter, before in zip(not_decayed, untouched, strict=True):
        assert torch.equal(parameter, before)  # zero gradient and no decay: biases/norms do not move


def test_adam_with_l2_moves_every_weight_by_lr_whatever_delta():
    moved = {}
    for delta in (1e-2, 1e-4):
        model = tiny_model()
        set_weights_away_from_zero(model)
        before = [p.detach().clone() for p in decayed_and_not(model)[0]]
        zero_gradient_steps(
            model, OptimConfig(name="adam", regularization="l2", lr=LR, weight_decay=delta), 1
        )
        after = decayed_and_not(model)[0]
        step = torch.cat([(a - b).flatten() for a, b in zip(after, before, strict=True)])
        signs = torch.cat([b.sign().flatten() for b in before])
        # Step 1 of Adam: m_hat = g, v_hat = g^2, so the update is lr * g / (|g| + eps) ~ lr * sign(w).
        torch.testing.assert_close(step, -LR * signs, rtol=1e-3, atol=0.0)
        moved[delta] = step
    # A 100x smaller delta gives the same step: Adam normalizes the L2 gradient's scale away.
    torch.testing.assert_close(moved[1e-2], moved[1e-4], rtol=1e-3, atol=0.0)
    # Versus AdamW at delta=1e-2: |step| = lr*delta*|w| <= 1e-5, 100x smaller than Adam+L2's 1e-3.


def test_adam_l2_and_adamw_differ_on_real_data():
    torch.manual_seed(1)
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 3, (16,))
    results = []
    for cfg in (
        OptimConfig(name="adam", regularization="l2", lr=1e-2, weight_decay=0.1),
        OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1),
    ):
        model = tiny_model()
        model.eval()
        optimizer = build_optimizer(model, cfg, global_batch_size=256)
        for _ in range(10):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y) + regularization_loss(model, cfg)
            loss.backward()
            optimizer.step()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert (results[0] - results[1]).abs().max().item() > 1e-3


def test_sgd_weight_decay_equals_sgd_l2():
    """For SGD the optimizer's weight_decay is L2: same trajectory with momentum 0.9, up to float rounding."""
    torch.manual_seed(2)
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 3, (16,))
    results = []
    for regularization in ("weight_decay", "l2"):
        cfg = OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=0.05, regularization=regularization)
        model = tiny_model()
        model.eval()
        optimizer = build_optimizer(model, cfg, global_batch_size=256)
        for _ in range(10):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y) + regularization_loss(model, cfg)
            loss.backward()
            optimizer.step()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "cfg",
    [
        OptimConfig(name="sgd", weight_decay=DELTA),
        OptimConfig(name="adamw", weight_decay=DELTA),
        OptimConfig(name="adam", regularization="l2", weight_decay=DELTA),
        OptimConfig(name="sgd", regularization="l2", weight_decay=DELTA),
    ],
    ids=lambda c: f"{c.name}-{c.regularization}",
)
def test_biases_and_norms_get_no_decay(cfg):
    model = tiny_model()
    decayed, not_decayed = decayed_and_not(model)
    optimizer = build_optimizer(model, cfg, global_batch_size=256)
    by_decay: dict[bool, set[int]] = {True: set(), False: set()}
    for group in optimizer.param_groups:
        is_decay_group = not group["name"].endswith("no_decay")
        by_decay[is_decay_group] |= {id(p) for p in group["params"]}
        expected_wd = DELTA if (is_decay_group and cfg.regularization == "weight_decay") else 0.0
        assert group["weight_decay"] == expected_wd, group["name"]
    assert by_decay[True] == {id(p) for p in decayed}
    assert by_decay[False] == {id(p) for p in not_decayed}

    with torch.no_grad():
        for parameter in not_decayed:
            parameter.fill_(100.0)  # would dominate the penalty if it were included
    expected = DELTA / 2 * sum(float(p.detach().pow(2).sum()) for p in decayed)
    penalty = regularization_loss(model, cfg)
    if cfg.regularization == "l2":
        assert penalty.item() == pytest.approx(expected, rel=1e-6)
        penalty.backward()
        assert all(p.grad is None for p in not_decayed)
    else:
        assert penalty.item() == 0.0
    assert l2_penalty(model, weight_decay=DELTA).item() == pytest.approx(expected, rel=1e-6)


def lrs_over(cfg: OptimConfig, *, global_batch_size: int, steps_per_epoch: int, epochs: int) -> list[float]:
    """lr in effect at each iteration 0..epochs*steps_per_epoch (the last one after the final step)."""
    model = tiny_model()
    optimizer = build_optimizer(model, cfg, global_batch_size=global_batch_size)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=steps_per_epoch, epochs=epochs)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(steps_per_epoch * epochs):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
        assert len({g["lr"] for g in optimizer.param_groups}) == 1  # all groups follow the same schedule
    return lrs


def test_lr_scales_linearly_with_global_batch():
    cfg = OptimConfig(lr=0.1, reference_batch_size=256, schedule="constant")
    for global_batch_size, expected in ((256, 0.1), (512, 0.2), (64, 0.025)):
        optimizer = build_optimizer(tiny_model(), cfg, global_batch_size=global_batch_size)
        assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(expected)] * len(
            optimizer.param_groups
        )
    assert lrs_over(cfg, global_batch_size=512, steps_per_epoch=5, epochs=2) == [pytest.approx(0.2)] * 11


def test_warmup_then_cosine():
    cfg = OptimConfig(lr=0.1, warmup_epochs=1, schedule="cosine")
    lrs = lrs_over(cfg, global_batch_size=512, steps_per_epoch=10, epochs=5)  # peak 0.2, 10 warm-up steps
    for t in (0, 5, 10):  # linear from 1% of the peak to the peak over 10 steps
        assert lrs[t] == pytest.approx(0.2 * (0.01 + 0.99 * t / 10), abs=1e-9)
    for k in (0, 10, 20, 30, 40):  # then cosine over the remaining 40 steps down to 0
        assert lrs[10 + k] == pytest.approx(0.2 * (1 + math.cos(math.pi * k / 40)) / 2, abs=1e-9)
    assert lrs[30] == pytest.approx(0.1, abs=1e-9) and lrs[50] == pytest.approx(0.0, abs=1e-9)


def test_warmup_then_step_milestones_in_epochs():
    cfg = OptimConfig(lr=0.1, warmup_epochs=1, schedule="multistep", step_milestones=[2, 4], step_gamma=0.1)
    lrs = lrs_over(cfg, global_batch_size=256, steps_per_epoch=10, epochs=5)
    assert lrs[10] == pytest.approx(0.1) and lrs[19] == pytest.approx(0.1)
    assert lrs[20] == pytest.approx(0.01) and lrs[39] == pytest.approx(0.01)
    assert lrs[40] == pytest.approx(0.001) and lrs[50] == pytest.approx(0.001)


def test_scheduler_rejects_warmup_longer_than_training():
    optimizer = build_optimizer(tiny_model(), OptimConfig(warmup_epochs=3), global_batch_size=256)
    with pytest.raises(ValueError, match="warmup_epochs"):
        build_scheduler(optimizer, OptimConfig(warmup_epochs=3), steps_per_epoch=4, epochs=3)


# Every schedule x unit x warm-up method against its closed form in epochs e (fractional for unit=step):
# warm-up (e < W) at f, or ramping f + (1 - f) e / W; then with k = e - W epochs after warm-up: cosine
# (1 + cos(pi k / (E - W))) / 2, step gamma^floor(k / step_size), multistep gamma^(milestones <= e) counted
# from the start, exponential gamma^k, constant 1.
CURVE_STEPS_PER_EPOCH, CURVE_EPOCHS = 4, 8
CURVE_CFG = {
    "lr": 0.1,
    "warmup_epochs": 2,
    "warmup_factor": 0.1,
    "step_size": 2,
    "step_gamma": 0.5,
    "exponential_gamma": 0.8,
}


def closed_form_factor(cfg: OptimConfig, epoch: float, epochs: int) -> float:
    warm = cfg.warmup_epochs
    if epoch < warm and cfg.warmup_method == "constant":
        return cfg.warmup_factor
    if epoch < warm:
        return cfg.warmup_factor + (1 - cfg.warmup_factor) * epoch / warm
    after = epoch - warm
    return {
        "cosine": (1 + math.cos(math.pi * after / (epochs - warm))) / 2,
        "step": cfg.step_gamma ** math.floor(after / cfg.step_size),
        "multistep": cfg.step_gamma ** sum(m <= epoch for m in cfg.step_milestones),
        "exponential": cfg.exponential_gamma**after,
        "constant": 1.0,
    }[cfg.schedule]


@pytest.mark.parametrize("warmup_method", ["linear", "constant"])
@pytest.mark.parametrize("unit", ["step", "epoch"])
@pytest.mark.parametrize("schedule", ["cosine", "step", "multistep", "exponential", "constant"])
def test_schedule_follows_its_closed_form(schedule, unit, warmup_method):
    milestones = [3, 6] if schedule == "multistep" else [30, 60, 80]
    cfg = OptimConfig(
        **CURVE_CFG,
        schedule=schedule,
        schedule_unit=unit,
        warmup_method=warmup_method,
        step_milestones=milestones,
    )
    steps_per_epoch, epochs = CURVE_STEPS_PER_EPOCH, CURVE_EPOCHS
    lrs = lrs_over(cfg, global_batch_size=256, steps_per_epoch=steps_per_epoch, epochs=epochs)
    for step, lr in enumerate(lrs):
        epoch = step / steps_per_epoch if unit == "step" else step // steps_per_epoch
        assert lr == pytest.approx(0.1 * closed_form_factor(cfg, epoch, epochs), abs=1e-12), step
    if unit == "epoch":  # torchvision's per-epoch stepping: one lr per epoch
        assert all(len(set(lrs[e * steps_per_epoch : (e + 1) * steps_per_epoch])) == 1 for e in range(epochs))


def test_step_decays_every_step_size_after_warm_up_multistep_at_epochs_from_the_start():
    def per_epoch(**kwargs) -> list[float]:
        cfg = OptimConfig(lr=0.1, warmup_epochs=1, step_gamma=0.5, schedule_unit="epoch", **kwargs)
        return lrs_over(cfg, global_batch_size=256, steps_per_epoch=2, epochs=7)[:-1:2]

    step = per_epoch(schedule="step", step_size=2)
    multistep = per_epoch(schedule="multistep", step_milestones=[2, 4, 6])
    assert step == pytest.approx([0.001, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025])  # x0.5 at epochs 3, 5
    assert multistep == pytest.approx([0.001, 0.1, 0.05, 0.05, 0.025, 0.025, 0.0125])  # at 2, 4, 6
    assert per_epoch(schedule="multistep", step_milestones=[3, 5]) == step


def step_lrs(optimizer, scheduler, steps: int) -> list[float]:
    """The lr after each of ``steps`` optimizer + scheduler steps (no gradients: only the schedule moves)."""
    lrs = []
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize(
    "cfg",
    [
        OptimConfig(warmup_epochs=2, warmup_method="constant", schedule="cosine", schedule_unit="step"),
        OptimConfig(warmup_epochs=2, schedule="exponential", exponential_gamma=0.5, schedule_unit="epoch"),
    ],
    ids=lambda c: c.schedule_unit,
)
def test_resumed_scheduler_continues_identically(cfg):
    """Resume after epoch 1 of a 2-epoch warm-up: the restored state must also cross into the schedule."""
    steps_per_epoch, epochs, resume_at = 3, 5, 3

    def build(seed: int):
        optimizer = build_optimizer(tiny_model(seed), cfg, global_batch_size=256)
        return optimizer, build_scheduler(optimizer, cfg, steps_per_epoch=steps_per_epoch, epochs=epochs)

    reference = step_lrs(*build(0), steps_per_epoch * epochs)
    optimizer, scheduler = build(0)
    step_lrs(optimizer, scheduler, resume_at)
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # as load_checkpoint reads it
    optimizer, scheduler = build(1)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    assert step_lrs(optimizer, scheduler, len(reference) - resume_at) == reference[resume_at:]
    per_epoch = [
        set(reference[e * steps_per_epoch - 1 : (e + 1) * steps_per_epoch - 1]) for e in range(1, epochs)
    ]
    assert all(len(lrs) == 1 for lrs in per_epoch) == (cfg.schedule_unit == "epoch")


@pytest.mark.parametrize(
    "cfg",
    [
        OptimConfig(name="adamw", warmup_epochs=2, schedule="cosine", schedule_unit="step"),
        OptimConfig(warmup_epochs=1, schedule="multistep", step_milestones=[3], schedule_unit="epoch"),
        OptimConfig(name="adamw", warmup_epochs=1, schedule="constant"),
    ],
    ids=lambda c: c.schedule,
)
def test_a_retargeted_state_follows_the_new_lrs_schedule_from_where_it_was(cfg):
    """Population Based Training continues a trial from another's state with lr x 1.2 and weight decay x 0.8:
    from then on the lr must be what the new peak's schedule gives at that step (warm-up, cosine or
    milestones), and only the decayed groups carry the new weight decay."""
    from dataclasses import replace

    from pipeline.train.state import retarget_state

    steps_per_epoch, epochs, switch_at = 3, 5, 4
    new = replace(cfg, lr=cfg.lr * 1.2, weight_decay=cfg.weight_decay * 0.8)

    def build(config: OptimConfig):
        optimizer = build_optimizer(tiny_model(), config, global_batch_size=256)
        return optimizer, build_scheduler(optimizer, config, steps_per_epoch=steps_per_epoch, epochs=epochs)

    reference = step_lrs(*build(new), steps_per_epoch * epochs)
    optimizer, scheduler = build(cfg)
    step_lrs(optimizer, scheduler, switch_at)
    saved = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": 1}
    moved = retarget_state(
        saved, lr_factor=new.lr / cfg.lr, weight_decay_factor=new.weight_decay / cfg.weight_decay
    )
    assert (
        moved["epoch"] == 1 and saved["optimizer"]["param_groups"][0]["lr"] == optimizer.param_groups[0]["lr"]
    )
    optimizer, scheduler = build(new)
    optimizer.load_state_dict(moved["optimizer"])
    scheduler.load_state_dict(moved["scheduler"])
    assert step_lrs(optimizer, scheduler, len(reference) - switch_at) == pytest.approx(
        reference[switch_at:], rel=1e-9
    )
    assert sorted({g["weight_decay"] for g in optimizer.param_groups}) == pytest.approx(
        [0.0, new.weight_decay]
    )


# Layer-wise lr decay: L blocks below the head by pipeline.models.layers' rule, and the parameters the stem
# (depth 0) must hold.
LAYER_DECAY_MODELS = {
    "resnet18": (9, "conv1.weight"),
    "convnext_tiny": (23, "features.0.0.weight"),
    "efficientnet_b0": (18, "features.0.0.weight"),
    "mobilenet_v2": (19, "features.0.0.weight"),
    "cifar_resnet20": (10, "conv1.weight"),
    "cifar_baseline10": (3, "layer1.3.weight"),
}


@pytest.mark.parametrize("name", sorted(LAYER_DECAY_MODELS))
def test_layer_decay_scales_each_block_by_its_depth(name):
    num_layers, stem_weight = LAYER_DECAY_MODELS[name]
    with torch.device("meta"):  # shapes only: building convnext_tiny costs milliseconds
        model = build_model(name, num_classes=7)
    cfg = OptimConfig(lr=0.1, layer_decay=0.8, weight_decay=0.05)
    optimizer = build_optimizer(model, cfg, global_batch_size=256, backbone_lr_factor=0.5)
    groups = optimizer.param_groups
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in model.parameters())
    head = get_classifier(model)
    assert [(g["name"], g["lr"]) for g in groups[:2]] == [("head", 0.1), ("head_no_decay", 0.1)]
    assert groups[0]["params"] == [head.weight] and groups[1]["params"] == [head.bias]

    lr_by_depth: dict[int, float] = {}
    for group in groups[2:]:
        depth = int(group["name"].removeprefix("depth").removesuffix("_no_decay"))
        # The backbone factor and the decay multiply: head 0.1, depth d at 0.1 * 0.5 * 0.8^(L - d).
        assert group["lr"] == pytest.approx(0.05 * 0.8 ** (num_layers - depth), rel=1e-12), group["name"]
        assert lr_by_depth.setdefault(depth, group["lr"]) == group["lr"]  # decay and no-decay agree
        assert group["weight_decay"] == (0.0 if group["name"].endswith("_no_decay") else 0.05)
    assert sorted(lr_by_depth) == list(range(num_layers))  # every block from stem 0 to L - 1 has a group
    lrs = [lr_by_depth[d] for d in sorted(lr_by_depth, reverse=True)]
    assert all(lower < higher for higher, lower in zip(lrs, lrs[1:], strict=False))  # head -> stem
    stem = dict(model.named_parameters())[stem_weight]
    assert any(p is stem for g in groups if g["name"] == "depth0" for p in g["params"])


# ------------------------------------------------------------------------------------------------------
# Early stopping


def run_early_stopping(cfg: EarlyStoppingConfig, values: list[float]) -> list[tuple[bool, bool]]:
    stopper = EarlyStopping(cfg)
    return [(d.improved, d.stop) for d in (stopper.update(v, e) for e, v in enumerate(values))]


def test_early_stopping_max_with_patience_and_min_delta():
    cfg = EarlyStoppingConfig(mode="max", patience=2, min_delta=0.01)
    # 0.505 and 0.515 beat the best by <= 0.01 and do not count; 0.52 does (by 0.02).
    decisions = run_early_stopping(cfg, [0.5, 0.505, 0.52, 0.525, 0.529])
    assert decisions == [(True, False), (False, False), (True, False), (False, False), (False, True)]


def test_early_stopping_min_mode_and_nan():
    cfg = EarlyStoppingConfig(metric="val/loss", mode="min", patience=3)
    decisions = run_early_stopping(cfg, [1.0, 0.9, 0.95, float("nan"), 0.8, 0.85, 0.81, 0.8])
    assert [d[0] for d in decisions] == [True, True, False, False, True, False, False, False]
    assert [d[1] for d in decisions] == [False] * 7 + [True]  # 0.8 equals the best: not an improvement


def test_early_stopping_disabled_never_stops_but_tracks_best():
    stopper = EarlyStopping(EarlyStoppingConfig(patience=1, enabled=False))
    assert not any(stopper.update(v, e).stop for e, v in enumerate([0.5, 0.4, 0.3, 0.2]))
    assert (stopper.best_value, stopper.best_epoch, stopper.bad_epochs) == (0.5, 0, 3)


def test_early_stopping_state_round_trip():
    cfg = EarlyStoppingConfig(patience=3)
    uninterrupted, first = EarlyStopping(cfg), EarlyStopping(cfg)
    for e, v in enumerate([0.3, 0.5, 0.4]):
        uninterrupted.update(v, e)
        first.update(v, e)
    resumed = EarlyStopping(cfg)
    resumed.load_state_dict(first.state_dict())
    assert resumed.state_dict() == {"best_value": 0.5, "best_epoch": 1, "bad_epochs": 1}
    for e, v in [(3, 0.45), (4, 0.5)]:
        assert resumed.update(v, e) == uninterrupted.update(v, e)
    assert resumed.update(0.1, 5).stop


def test_agree_without_process_group_returns_input():
    assert not dist.is_initialized()
    assert agree(True) is True and agree(False) is False


def _agree_worker(rank: int, port: int, result_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=30)
    )
    try:
        decisions = [agree(rank == 1), agree(False)]  # only rank 1 wants to stop, then nobody does
        with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as handle:
            handle.write(repr(decisions))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(90)
def test_agree_in_two_process_gloo_group(tmp_path):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.start_processes(
        _agree_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "[True, False]"


# ------------------------------------------------------------------------------------------------------
# Checkpoint and resume

RESUME_CFG = OptimConfig(
    name="adamw", lr=0.05, weight_decay=0.05, warmup_epochs=1, schedule="cosine", label_smoothing=0.1
)
STEPS_PER_EPOCH, EPOCHS = 3, 4


def build_run(seed: int):
    model = tiny_model(seed)
    optimizer = build_optimizer(model, RESUME_CFG, global_batch_size=128)
    scheduler = build_scheduler(optimizer, RESUME_CFG, steps_per_epoch=STEPS_PER_EPOCH, epochs=EPOCHS)
    stopper = EarlyStopping(EarlyStoppingConfig(metric="val/loss", mode="min", patience=3))
    return model, optimizer, scheduler, stopper


def train_epochs(model, optimizer, scheduler, stopper, epochs: range) -> None:
    """A miniature loop drawing from all three RNGs (torch data + dropout, numpy noise, random flips)."""
    for epoch in epochs:
        model.train()
        for _ in range(STEPS_PER_EPOCH):
            x = torch.randn(8, 3, 6, 6) + float(np.random.normal())
            if random.random() < 0.5:
                x = x.flip(-1)
            y = torch.randint(0, 3, (8,))
            optimizer.zero_grad()
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y, label_smoothing=RESUME_CFG.label_smoothing)
            (loss + regularization_loss(model, RESUME_CFG)).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
        stopper.update(loss.item(), epoch)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def test_resume_from_checkpoint_is_bitwise_identical(tmp_path):
    seed_everything(123)
    reference = build_run(seed=0)
    train_epochs(*reference, range(EPOCHS))

    seed_everything(123)
    model, optimizer, scheduler, stopper = build_run(seed=0)
    train_epochs(model, optimizer, scheduler, stopper, range(2))
    state = capture_state(
        epoch=2,
        global_step=2 * STEPS_PER_EPOCH,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        early_stopping=stopper,
        best_metric=stopper.best_value,
        tracking_run_id="run-abc",
    )
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(state, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporary file left behind

    seed_everything(999)  # a fresh process: other RNG states and another init, all to be overwritten
    resumed = build_run(seed=7)
    checkpoint = load_checkpoint(path)  # weights_only=True: RNG states are tensors and plain types
    assert isinstance(checkpoint["rng"]["numpy"]["keys"], torch.Tensor)
    torch.save({"numpy_state": np.random.get_state()}, tmp_path / "raw.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        torch.load(tmp_path / "raw.pt", weights_only=True)  # what the conversion avoids
    loaded = restore_state(
        checkpoint, model=resumed[0], optimizer=resumed[1], scheduler=resumed[2], early_stopping=resumed[3]
    )
    assert (loaded.epoch, loaded.global_step, loaded.tracking_run_id) == (2, 6, "run-abc")
    assert loaded.best_metric == stopper.best_value
    train_epochs(*resumed, range(loaded.epoch, EPOCHS))

    for (name, expected), actual in zip(
        reference[0].state_dict().items(), resumed[0].state_dict().values(), strict=True
    ):
        assert torch.equal(expected, actual), name  # parameters and BatchNorm running stats
    for expected, actual in zip(
        reference[1].state_dict()["state"].values(), resumed[1].state_dict()["state"].values(), strict=True
    ):
        assert torch.equal(expected["exp_avg"], actual["exp_avg"])
        assert torch.equal(expected["exp_avg_sq"], actual["exp_avg_sq"])
    assert reference[2].get_last_lr() == resumed[2].get_last_lr()
    assert reference[3].state_dict() == resumed[3].state_dict()


# ------------------------------------------------------------------------------------------------------
# Config validation


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["weight_decay=1.0"], "optim.weight_decay"),
        (["weight_decay=-0.001"], "optim.weight_decay"),
        (["name=adam"], "optim.regularization"),
        (["name=adamw", "regularization=l2"], "optim.regularization"),
        (["nesterov=true", "momentum=0"], "optim.nesterov"),
        (["label_smoothing=1.0"], "optim.label_smoothing"),
        (["schedule=step", "warmup_epochs=5", "step_milestones=[3, 10]"], "optim.step_milestones"),
    ],
)
def test_optim_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_config(OptimConfig, None, overrides)


def test_adam_with_weight_decay_points_to_adamw():
    with pytest.raises(ConfigError, match="use name=adamw"):
        OptimConfig(name="adam", regularization="weight_decay")


@pytest.mark.parametrize(
    "kwargs,field",
    [({"patience": 0}, "early_stopping.patience"), ({"min_delta": -0.1}, "early_stopping.min_delta")],
)
def test_early_stopping_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        EarlyStoppingConfig(**kwargs)

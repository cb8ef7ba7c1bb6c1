"""Optimizer, regularization (L2 penalty vs decoupled weight decay), layer-wise lr decay and lr schedules.

Two ways to regularize with strength delta, never on biases or normalization parameters (see
``pipeline.models.heads.split_parameters``):

* ``weight_decay``: the optimizer shrinks the weights. For AdamW this is decoupled: ``w <- (1 - lr*delta) w``
  before the Adam step, whatever the gradient's scale. SGD's own ``weight_decay`` adds ``delta*w`` to the
  gradient, which for SGD *is* L2 regularization (identical without momentum; with momentum the decay term
  goes through the momentum buffer just as an L2 gradient would).
* ``l2``: the optimizer gets ``weight_decay=0`` and the loss gets ``delta/2 * sum ||w||^2`` (gradient
  ``delta*w``, as in the lecture). With Adam the per-coordinate RMS normalization cancels that gradient's scale:
  with no data gradient every weight moves by ~lr per step whatever delta is - the reason AdamW exists.

The learning rate follows the linear scaling rule, ``lr * global_batch_size / reference_batch_size``;
``layer_decay`` < 1 scales it down block by block from the head to the stem (``pipeline.models.layers``).

Schedules are torch's own (``LinearLR``/``ConstantLR`` warm-up, then ``CosineAnnealingLR``, ``StepLR``,
``MultiStepLR``, ``ExponentialLR`` or a constant, joined by ``SequentialLR``), and the loop calls
``scheduler.step()`` once per optimizer step whatever ``schedule_unit`` says:

* ``schedule_unit=step``: the schedulers count optimizer steps. Warm-up ramps step by step, cosine reaches 0
  after the last step, exponential is continuous (``gamma**(steps / steps_per_epoch)``); step and multistep
  still change at epoch boundaries, their periods and milestones being whole epochs of steps.
* ``schedule_unit=epoch``: the same schedulers built in epochs, as torchvision's reference scripts step them
  once per epoch; their per-epoch factors feed a ``LambdaLR`` over ``step // steps_per_epoch``, so the lr
  is constant within an epoch. Cosine then ends at ``(1 + cos(pi (E-1-W)/(E-W)))/2`` in the last epoch,
  not at 0, as in torchvision.

As in torchvision, the schedule after warm-up counts from the end of warm-up: cosine spans the remaining
``epochs - warmup_epochs``, ``step`` decays every ``step_size`` epochs after warm-up and ``exponential``
counts epochs after warm-up. ``multistep``'s milestones are instead epochs counted from the start of
training (what a recipe's "x0.1 at epochs 30, 60, 80" means), so the warm-up does not shift them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim import lr_scheduler

from pipeline.config import OptimConfig
from pipeline.models.heads import param_groups, split_parameters


def scaled_lr(cfg: OptimConfig, *, global_batch_size: int) -> float:
    """The linear scaling rule: cfg.lr is the peak lr at cfg.reference_batch_size samples per step."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    return cfg.lr * global_batch_size / cfg.reference_batch_size


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, *, global_batch_size: int, backbone_lr_factor: float = 1.0
) -> torch.optim.Optimizer:
    """The optimizer over ``model``'s trainable parameters, with no decay on biases and normalization params.

    Groups are those of :func:`pipeline.models.heads.param_groups` (head/backbone x decay/no-decay, each with
    a ``name``; per block depth when ``cfg.layer_decay`` < 1); the head gets the scaled lr, the backbone
    that times ``backbone_lr_factor`` times ``layer_decay**(L - depth)``. In ``l2`` mode every group has
    weight_decay 0 and the loss must add :func:`regularization_loss`.
    """
    lr = scaled_lr(cfg, global_batch_size=global_batch_size)
    optimizer_decay = cfg.weight_decay if cfg.regularization == "weight_decay" else 0.0
    # backbone_lr_factor < 1: discriminative fine-tuning (pre-trained features move slower than the new head).
    # layer_decay < 1 (Clark et al., BEiT): generic early features move least, on top of that factor.
    groups = param_groups(
        model,
        lr_head=lr,
        lr_backbone=lr * backbone_lr_factor,
        weight_decay=optimizer_decay,
        layer_decay=cfg.layer_decay,
    )
    if cfg.name == "sgd":
        # SGD's weight_decay adds delta*w to the gradient: for SGD, "weight decay" and L2 are the same thing.
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    # OptimConfig only lets name=adam through with regularization=l2, so its weight_decay is 0 here.
    assert cfg.name == "adam" and cfg.regularization == "l2", cfg
    return torch.optim.Adam(groups, lr=lr)


def l2_penalty(model: nn.Module, *, weight_decay: float) -> torch.Tensor:
    """``weight_decay/2 * sum ||w||^2`` over the trainable decayed parameters (no biases, no norms)."""
    split = split_parameters(model)
    decayed = split.head_decay + split.backbone_decay
    assert decayed, "a model with a classifier always has at least one decayed weight"
    return weight_decay / 2 * sum(parameter.pow(2).sum() for parameter in decayed)


def regularization_loss(model: nn.Module, cfg: OptimConfig) -> torch.Tensor:
    """The term to add to the data loss: the L2 penalty in ``l2`` mode, a zero scalar in ``weight_decay`` mode."""
    if cfg.regularization == "l2" and cfg.weight_decay > 0:
        return l2_penalty(model, weight_decay=cfg.weight_decay)
    reference = next(model.parameters())
    return torch.zeros((), device=reference.device, dtype=reference.dtype)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, *, steps_per_epoch: int, epochs: int
) -> lr_scheduler.LRScheduler:
    """cfg's warm-up and schedule (module docstring); call ``step()`` after every ``optimizer.step()``.

    The state_dict round-trips through a checkpoint: with ``schedule_unit=epoch`` the per-epoch factors are
    rebuilt from cfg, not saved, so resume with the same config.
    """
    if steps_per_epoch < 1 or epochs < 1:
        raise ValueError(f"steps_per_epoch and epochs must be >= 1, got {steps_per_epoch} and {epochs}")
    if cfg.warmup_epochs >= epochs:
        raise ValueError(f"optim.warmup_epochs ({cfg.warmup_epochs}) must be smaller than epochs ({epochs})")
    if cfg.schedule_unit == "step":
        return _schedule(optimizer, cfg, steps_per_epoch=steps_per_epoch, epochs=epochs)
    factors = _epoch_factors(cfg, epochs=epochs)
    # Past the last epoch (a loader yielding more batches than its len) the final factor holds.
    return lr_scheduler.LambdaLR(
        optimizer, lambda step: factors[min(step // steps_per_epoch, len(factors) - 1)]
    )


def _epoch_factors(cfg: OptimConfig, *, epochs: int) -> list[float]:
    """lr / peak lr in each epoch 0..epochs (the last after the final epoch) with the schedule stepped per
    epoch, read from torch's schedulers driving a one-parameter probe optimizer at lr 1."""
    probe = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = _schedule(probe, cfg, steps_per_epoch=1, epochs=epochs)
    factors = [probe.param_groups[0]["lr"]]
    for _ in range(epochs):
        probe.step()  # no gradient, so a no-op; keeps torch's "scheduler before optimizer" check quiet
        scheduler.step()
        factors.append(probe.param_groups[0]["lr"])
    return factors


def _schedule(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, *, steps_per_epoch: int, epochs: int
) -> lr_scheduler.LRScheduler:
    """Warm-up then the main schedule, counted in steps of 1/steps_per_epoch epoch (1: per epoch)."""
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    main_steps = epochs * steps_per_epoch - warmup_steps
    if cfg.schedule == "cosine":
        main: lr_scheduler.LRScheduler = lr_scheduler.CosineAnnealingLR(optimizer, T_max=main_steps)
    elif cfg.schedule == "step":
        main = lr_scheduler.StepLR(optimizer, step_size=cfg.step_size * steps_per_epoch, gamma=cfg.step_gamma)
    elif cfg.schedule == "multistep":
        # The main scheduler counts from the end of warm-up, so shift the milestones by the warm-up length.
        milestones = [m * steps_per_epoch - warmup_steps for m in cfg.step_milestones]
        main = lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=cfg.step_gamma)
    elif cfg.schedule == "exponential":
        # gamma per epoch is gamma**(1/steps_per_epoch) per step: a continuous decay, gamma**k after k epochs.
        gamma = cfg.exponential_gamma ** (1.0 / steps_per_epoch)
        main = lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
    else:
        main = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup_steps == 0:
        return main
    warmup: lr_scheduler.LRScheduler
    if cfg.warmup_method == "linear":
        warmup = lr_scheduler.LinearLR(
            optimizer, start_factor=cfg.warmup_factor, end_factor=1.0, total_iters=warmup_steps
        )
    else:
        warmup = lr_scheduler.ConstantLR(optimizer, factor=cfg.warmup_factor, total_iters=warmup_steps)
    return lr_scheduler.SequentialLR(optimizer, schedulers=[warmup, main], milestones=[warmup_steps])

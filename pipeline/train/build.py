"""Assemble one rank's training run from the config: model, loaders, optimizer and schedule.

Ray-free: the launcher calls :func:`build_run` inside each Ray Train worker with that worker's rank and
device, then wraps the model for DDP itself. Tests and the benchmark call it in a plain process.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel

from pipeline.config import FinetuneConfig, ModelConfig, PretrainConfig
from pipeline.data.loader import ShardLoader, build_loader
from pipeline.data.manifest import Manifest, load_manifest
from pipeline.models import build_model, freeze_backbone, replace_classifier, unfreeze_backbone
from pipeline.train.ema import build_ema, ema_decay
from pipeline.train.loop import fit
from pipeline.train.metrics import class_weights
from pipeline.train.optim import build_optimizer, build_scheduler


@dataclass
class RunParts:
    model: nn.Module
    """The plain model on ``device`` (channels_last if configured), not yet DDP-wrapped or compiled."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: ShardLoader | Any
    """The rank's ShardLoader, or any loader with its interface (set_epoch, len, skipped; Ray Data's)."""
    val_loader: ShardLoader
    train_manifest: Manifest
    on_epoch_start: Callable[[int], None] | None = None
    """Fine-tuning stages: freezes or unfreezes the backbone by epoch (so a resumed run is in the right one)."""
    class_weights: torch.Tensor | None = None
    """Per-class training-loss weights (fine-tuning on imbalanced data)."""
    find_unused_parameters: bool = False
    """DDP must tolerate parameters without gradients: two_stage freezes the backbone after wrapping."""
    ema: AveragedModel | None = None
    """The weight average (train.ema), on the model's device."""


def build_classifier(cfg: ModelConfig, *, num_classes: int) -> nn.Module:
    """The configured architecture with random weights (also used by the driver to count FLOPs)."""
    return build_model(
        cfg.name,
        num_classes=num_classes,
        dropout=cfg.dropout,
        stochastic_depth=cfg.stochastic_depth,
        **cfg.scaling,
    )


def model_export_config(cfg: ModelConfig, *, num_classes: int, classes: list[str], resolution: int) -> dict:
    """Everything needed to rebuild the architecture for an exported state_dict (plain JSON types)."""
    return {
        "name": cfg.name,
        "num_classes": num_classes,
        "dropout": cfg.dropout,
        "stochastic_depth": cfg.stochastic_depth,
        "scaling": dict(cfg.scaling),
        "classes": list(classes),
        "resolution": resolution,
    }


def adapt_pretrained(cfg: FinetuneConfig, source: dict | None, *, num_classes: int) -> nn.Module:
    """The source architecture with the source's weights and a new ``num_classes`` head (random init for
    strategy=scratch). ``source`` = {"state_dict", "model_config"} as exported by pre-training."""
    if cfg.finetune.strategy == "scratch":
        return build_classifier(cfg.model, num_classes=num_classes)
    assert source is not None, "fine-tuning needs the source weights"
    model = build_classifier(cfg.model, num_classes=source["model_config"]["num_classes"])
    model.load_state_dict(source["state_dict"])
    replace_classifier(model, num_classes)
    return model


def two_stage_hook(model: nn.Module, head_epochs: int) -> Callable[[int], None]:
    """Stage 1 (epochs < head_epochs): only the head trains and frozen BatchNorm stays in eval mode;
    stage 2: everything trains (the optimizer already holds the backbone at its lower learning rate)."""

    def on_epoch_start(epoch: int) -> None:
        if epoch < head_epochs:
            freeze_backbone(model)
        else:
            unfreeze_backbone(model)

    return on_epoch_start


def build_run(
    cfg: PretrainConfig,
    *,
    rank: int,
    world_size: int,
    device: torch.device,
    source: dict | None = None,
    train_loader: Any = None,
) -> RunParts:
    """One rank's parts. Seeds torch with ``train.seed`` first, so every rank starts from the same weights
    (DDP broadcasts rank 0's anyway; this also makes a 1-worker run reproducible). A
    :class:`FinetuneConfig` starts from ``source`` with a new head, its strategy and class weights.
    ``train_loader``: training batches from elsewhere (Ray Data's shard, data.backend: ray_data) instead of
    this rank's shard loader."""
    torch.manual_seed(cfg.train.seed)
    train_manifest = load_manifest(cfg.data.train_manifest)
    val_manifest = load_manifest(cfg.data.val_manifest)
    num_classes = cfg.model.num_classes or train_manifest.num_classes
    fine = cfg.finetune if isinstance(cfg, FinetuneConfig) else None
    if fine is None:
        model = build_classifier(cfg.model, num_classes=num_classes)
    else:
        model = adapt_pretrained(cfg, source, num_classes=num_classes)
    if cfg.train.sync_batchnorm and world_size > 1:
        # Statistics over the global batch rather than each rank's few images (detection-size batches).
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    splits = dict(rank=rank, world_size=world_size, device=device)
    if train_loader is None:
        train_loader = build_loader(train_manifest, cfg.data, train=True, **splits)
    val_loader = build_loader(val_manifest, cfg.data, train=False, **splits)
    # One optimizer step sees accumulate_steps batches of every rank: that is the batch the lr scales with.
    global_batch = cfg.data.batch_size_per_worker * world_size * cfg.train.accumulate_steps
    optimizer_steps = math.ceil(len(train_loader) / cfg.train.accumulate_steps)
    strategy = fine.strategy if fine is not None else "pretrain"
    if strategy == "linear":
        freeze_backbone(model)  # before the optimizer: it only ever holds the head
    factor = fine.backbone_lr_factor if fine is not None and strategy in ("full", "two_stage") else 1.0
    optimizer = build_optimizer(model, cfg.optim, global_batch_size=global_batch, backbone_lr_factor=factor)
    scheduler = build_scheduler(
        optimizer, cfg.optim, steps_per_epoch=optimizer_steps, epochs=cfg.train.epochs
    )
    ema = None
    if cfg.train.ema.enabled:
        decay = ema_decay(cfg.train.ema, global_batch_size=global_batch, epochs=cfg.train.epochs)
        ema = build_ema(model, decay=decay)
    return RunParts(
        model,
        optimizer,
        scheduler,
        train_loader,
        val_loader,
        train_manifest,
        on_epoch_start=two_stage_hook(model, fine.head_epochs) if strategy == "two_stage" else None,
        class_weights=(
            class_weights(train_manifest.counts(), fine.class_weights, beta=fine.effective_beta)
            if fine is not None
            else None
        ),
        find_unused_parameters=strategy == "two_stage",
        ema=ema,
    )


def fit_run(
    parts: RunParts,
    cfg: PretrainConfig,
    *,
    device: torch.device,
    model: nn.Module | None = None,
    **hooks,
):
    """``fit`` with everything ``build_run`` prepared (loaders, optimizer, stages, class weights, class
    names); ``model`` is the wrapped one to train (DDP, compiled) when not ``parts.model`` itself, ``hooks``
    the caller's own (tracker, resume, on_epoch_end)."""
    return fit(
        parts.model if model is None else model,
        optimizer=parts.optimizer,
        scheduler=parts.scheduler,
        train_loader=parts.train_loader,
        val_loader=parts.val_loader,
        optim_cfg=cfg.optim,
        train_cfg=cfg.train,
        device=device,
        on_epoch_start=parts.on_epoch_start,
        class_weights=parts.class_weights,
        class_names=parts.train_manifest.classes,
        system_metrics=cfg.tracking.system_metrics,
        ema=parts.ema,
        **hooks,
    )


def parameter_digest(model: nn.Module) -> str:
    """SHA-1 of every parameter's bytes in logical (row-major) order: equal digests mean bit-identical
    replicas, whatever each replica's memory format.

    ``reshape(-1)`` rather than ``contiguous()``: a channels_last 1x1 conv weight of shape (64, 64, 1, 1)
    has strides (64, 1, 64, 64) and counts as contiguous (size-1 dims are ignored), so ``contiguous()``
    keeps it as is and the byte view fails on its last stride; flattening yields stride 1 for every layout
    and dtype (a copy only where the layout is not row-major), so bf16/fp16 weights hash by their bits too."""
    digest = hashlib.sha1()
    for parameter in model.parameters():
        flat = parameter.detach().cpu().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def replica_digests(model: nn.Module) -> list[str]:
    """Every rank's :func:`parameter_digest` (one all_gather); raises if the DDP replicas diverged, which
    would otherwise go unnoticed until a rank-0-only checkpoint silently drops the others' state."""
    mine = parameter_digest(model)
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    digests: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, mine)
    if len(set(digests)) != 1:
        raise RuntimeError(f"DDP replicas diverged: parameter digests per rank {digests}")
    return [str(d) for d in digests]

"""Assemble one rank's training run from the config: model, loaders, optimizer and schedule.

Ray-free: the launcher calls :func:`build_run` inside each Ray Train worker with that worker's rank and
device, then wraps the model for DDP itself. Tests and the benchmark call it in a plain process.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import ModelConfig, PretrainConfig
from pipeline.data.loader import ShardLoader, build_loader
from pipeline.data.manifest import Manifest, load_manifest
from pipeline.models import build_model
from pipeline.train.optim import build_optimizer, build_scheduler


@dataclass
class RunParts:
    model: nn.Module
    """The plain model on ``device`` (channels_last if configured), not yet DDP-wrapped or compiled."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: ShardLoader
    val_loader: ShardLoader
    train_manifest: Manifest


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


def build_run(cfg: PretrainConfig, *, rank: int, world_size: int, device: torch.device) -> RunParts:
    """One rank's parts. Seeds torch with ``train.seed`` first, so every rank starts from the same weights
    (DDP broadcasts rank 0's anyway; this also makes a 1-worker run reproducible)."""
    torch.manual_seed(cfg.train.seed)
    train_manifest = load_manifest(cfg.data.train_manifest)
    val_manifest = load_manifest(cfg.data.val_manifest)
    num_classes = cfg.model.num_classes or train_manifest.num_classes
    model = build_classifier(cfg.model, num_classes=num_classes).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_loader = build_loader(train_manifest, cfg.data, train=True, rank=rank, world_size=world_size)
    val_loader = build_loader(val_manifest, cfg.data, train=False, rank=rank, world_size=world_size)
    global_batch = cfg.data.batch_size_per_worker * world_size
    optimizer = build_optimizer(model, cfg.optim, global_batch_size=global_batch)
    scheduler = build_scheduler(
        optimizer, cfg.optim, steps_per_epoch=len(train_loader), epochs=cfg.train.epochs
    )
    return RunParts(model, optimizer, scheduler, train_loader, val_loader, train_manifest)


def parameter_digest(model: nn.Module) -> str:
    """SHA-1 of every parameter's bytes in order: equal digests mean bit-identical replicas."""
    digest = hashlib.sha1()
    for parameter in model.parameters():
        digest.update(parameter.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
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

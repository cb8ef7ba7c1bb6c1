"""One arm trained in-process: the same ``build_run`` + ``fit`` every Ray worker runs, on one rank and one
device, plus the per-epoch measurements the claims need and the run's summary.

Per epoch, next to fit's own metrics (logged by fit into the arm's tracker), this adds: ``train/error`` and
``val/error`` (1 - top-1), ``weights/l2_norm`` (all weights but biases and normalization parameters, the ones
decay acts on), ``val/minority_recall`` (recall of the class with the fewest training samples, on imbalanced
data) and, with ``eval_train_set``, ``train_eval/top1`` and ``gap/top1``: the training set evaluated like the
validation set (eval mode: no augmentation, no dropout), so the train-val gap measures overfitting and not the
regularizers' own noise.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.config import FinetuneConfig, PretrainConfig
from pipeline.data.loader import build_loader
from pipeline.models.heads import NORM_TYPES
from pipeline.models.profile import count_macs, count_parameters
from pipeline.tracking.base import NullTracker, Tracker
from pipeline.train.build import build_run, fit_run
from pipeline.train.loop import FitResult, evaluate

# Per-epoch keys left out of the summary: one series per class, and timings that depend on the machine's load.
_NOT_SUMMARIZED = ("/recall/", "/precision/", "system/", "train/lr", "data/skipped")


@dataclass
class Trained:
    model: nn.Module
    """The model with the best epoch's weights (fit restores them)."""
    result: FitResult
    history: list[dict[str, float]]
    """fit's per-epoch metrics plus the ones added here, each with its ``epoch``."""
    seconds: float


@dataclass
class ArmRun:
    """One finished (arm, seed) run as the report and the verdict see it."""

    arm: str
    seed: int
    overrides: dict[str, Any]
    history: list[dict[str, float]]
    summary: dict[str, float]
    run_id: str | None = None
    """The MLflow child run (None without tracking)."""


def weight_norm(model: nn.Module) -> float:
    """L2 norm of every weight that decay acts on: all parameters but biases and normalization parameters
    (the split of ``pipeline.models.heads``, here including frozen ones)."""
    squares = 0.0
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if name != "bias" and not isinstance(module, NORM_TYPES):
                squares += float(parameter.detach().double().pow(2).sum())
    return math.sqrt(squares)


def resolve_source(cfg: PretrainConfig, *, tracking_uri: str | None) -> tuple[PretrainConfig, dict | None]:
    """A fine-tuning arm's weights and its config with the source's architecture (None for scratch)."""
    if not isinstance(cfg, FinetuneConfig) or cfg.finetune.strategy == "scratch":
        return cfg, None
    from pipeline.finetune import fetch_source, resolve_architecture

    fetched = fetch_source(cfg, tracking_uri=tracking_uri)
    return resolve_architecture(cfg, fetched), fetched.payload


def train_arm(
    cfg: PretrainConfig,
    *,
    device: torch.device,
    source: dict | None = None,
    tracker: Tracker | None = None,
    eval_train_set: bool = False,
) -> Trained:
    """Train one (arm, seed) config to the end (or to early stopping) and return the best epoch's model."""
    tracker = tracker or NullTracker()
    started = time.perf_counter()
    parts = build_run(cfg, rank=0, world_size=1, device=device, source=source)
    classes = parts.train_manifest.classes
    counts = parts.train_manifest.counts()
    minority = classes[counts.index(min(counts))] if max(counts) > min(counts) else None
    train_eval = (
        build_loader(parts.train_manifest, cfg.data, train=False, device=device) if eval_train_set else None
    )
    added: dict[int, dict[str, float]] = {}

    def on_epoch_end(state: Any, metrics: dict[str, float]) -> None:
        epoch = state.epoch - 1  # the state names the next epoch
        extra = {
            "train/error": 1.0 - metrics["train/top1"],
            "val/error": 1.0 - metrics["val/top1"],
            "weights/l2_norm": weight_norm(parts.model),
        }
        if minority is not None:
            extra["val/minority_recall"] = metrics.get(f"val/recall/{minority}", math.nan)
        if train_eval is not None:
            clean = evaluate(parts.model, train_eval, device=device, cfg=cfg.train)
            extra.update(
                {
                    "train_eval/top1": clean.top1,
                    "train_eval/loss": clean.loss,
                    "gap/top1": clean.top1 - metrics["val/top1"],
                    "gap/loss": metrics["val/loss"] - clean.loss,
                }
            )
        tracker.log_metrics(extra, step=epoch)
        added[epoch] = extra

    result = fit_run(parts, cfg, device=device, tracker=tracker, on_epoch_end=on_epoch_end)
    history = [{**entry, **added[int(entry["epoch"])]} for entry in result.history]
    return Trained(model=parts.model, result=result, history=history, seconds=time.perf_counter() - started)


def summarize(trained: Trained, cfg: PretrainConfig) -> dict[str, float]:
    """One run's numbers for the table and the verdict: ``last/<metric>`` (final epoch) and ``best/<metric>``
    (the restored best epoch, by the early-stopping metric) of every per-epoch metric, plus epochs, the gain of
    restoring the best epoch over keeping the last, MACs and parameters."""
    history = trained.history
    last = history[-1]
    best_epoch = trained.result.best_epoch
    best = next((entry for entry in history if int(entry["epoch"]) == best_epoch), last)
    keys = [k for k in last if k != "epoch" and not any(part in k for part in _NOT_SUMMARIZED)]
    summary = {f"last/{k}": float(last[k]) for k in keys}
    summary.update({f"best/{k}": float(best[k]) for k in keys if k in best})
    watched = cfg.train.watched_metric
    sign = 1.0 if cfg.train.early_stopping.mode == "max" else -1.0
    model = trained.model
    summary.update(
        {
            "epochs_run": float(len(history)),
            "epochs_saved": float(cfg.train.epochs - len(history)),
            "best_epoch": float(best["epoch"]),
            "stopped_early": float(trained.result.stopped_early),
            "restored_gain": sign * (best[watched] - last[watched]),
            # Top-1 of the weights fit restores and exports: the EMA's when train.ema.select is ema.
            "restored/top1": float(best["val_ema/top1" if cfg.train.ema.select == "ema" else "val/top1"]),
            "model/mmacs": count_macs(model, resolution=cfg.data.resolution) / 1e6,
            "model/params_m": count_parameters(model) / 1e6,
            "seconds": trained.seconds,
        }
    )
    return summary

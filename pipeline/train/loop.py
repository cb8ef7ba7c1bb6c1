"""The training loop: a plain ``fit()`` over epochs and steps, and an exact distributed ``evaluate()``.

No Ray and no MLflow in here: the launcher hands in a (possibly DDP-wrapped) model, loaders, a tracker
(``NullTracker`` on ranks other than 0) and an ``on_epoch_end`` callback that checkpoints. The same loop
runs in a unit test in a plain process.

Per epoch it logs ``train/loss``, ``train/top1``, ``train/lr``, ``val/loss``, ``val/top1``, ``val/top5``,
``system/images_per_s``, ``system/data_wait`` and ``system/epoch_s`` with ``step=epoch``. Train and val
metrics are sums all-reduced once per epoch, so every rank sees the same numbers and early stopping takes
the same decision everywhere (and ``agree`` makes sure of it).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

from pipeline.config import OptimConfig, TrainConfig
from pipeline.data.loader import DataWait
from pipeline.data.transforms import batch_mixer, normalize
from pipeline.models.heads import get_classifier, set_train_mode
from pipeline.tracking.base import NullTracker, Tracker
from pipeline.train.early_stopping import EarlyStopping, agree
from pipeline.train.ema import update_ema
from pipeline.train.metrics import classification_metrics, confusion_matrix
from pipeline.train.optim import regularization_loss
from pipeline.train.progress import StepProgress, epoch_line
from pipeline.train.state import TrainState, capture_state, restore_state
from pipeline.train.system import SystemSampler

# Per-class recall/precision are logged up to this many classes (ImageNet's 1000 would be 2000 series).
PER_CLASS_METRICS_MAX = 50


@dataclass(frozen=True)
class EvalResult:
    loss: float
    top1: float
    top5: float
    count: int
    """Samples evaluated (over all ranks when reduced)."""
    confusion: torch.Tensor | None = None
    """``[true, predicted]`` counts (int64, CPU), summed over ranks when reduced."""

    def metrics(self, class_names: list[str] | None = None) -> dict[str, float]:
        """``val/...`` metrics: loss, top-1/5, balanced accuracy, macro-F1 and (few classes) per-class."""
        out = {"val/loss": self.loss, "val/top1": self.top1, "val/top5": self.top5}
        if self.confusion is not None:
            balanced = classification_metrics(self.confusion, class_names)
            per_class = self.confusion.shape[0] <= PER_CLASS_METRICS_MAX
            out.update({f"val/{k}": v for k, v in balanced.items() if per_class or "/" not in k})
        return {k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}


@dataclass
class FitResult:
    history: list[dict[str, float]]
    """Metrics of the epochs run by this call, each with its ``epoch``."""
    best_epoch: int | None
    best_metric: float | None
    stopped_early: bool
    state: TrainState
    """The final state (``epoch`` = epochs completed), best weights already loaded into the model."""


def _layers(model: nn.Module):
    """``model``, then each module it wraps (DDP's ``module``, torch.compile's ``_orig_mod``), outermost first."""
    while model is not None:
        yield model
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and/or torch.compile wrappers."""
    *_, inner = _layers(model)
    return inner


def _reduce_sums(values: list[float], device: torch.device) -> list[float]:
    """Sum per-rank totals over all ranks (one collective); identity without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def autocast_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device``; None = full precision. ``auto`` takes bf16 on a
    GPU that has it (Ampere and later), fp16 (with loss scaling) on an older one, and nothing on CPU, where
    reduced-precision convolutions are slower than float32."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def _autocast(device: torch.device, cfg: TrainConfig):
    dtype = autocast_dtype(device, cfg.amp)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def _no_sync(model: nn.Module, skip: bool):
    """DDP's ``no_sync`` (no gradient all-reduce) for the micro-batches before the last of an accumulation
    group: their gradients only add up locally, and the last backward all-reduces the sum once."""
    ddp = next((m for m in _layers(model) if isinstance(m, DistributedDataParallel)), None) if skip else None
    return ddp.no_sync() if ddp is not None else contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches,
    *,
    device: torch.device,
    cfg: TrainConfig,
    max_batches: int | None = None,
    reduce: bool = True,
) -> EvalResult:
    """Loss, top-1 and top-5 over ``batches``. Runs the unwrapped model: DDP's forward would sync
    buffers per step, and ranks may hold different numbers of eval batches (see the loader)."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    loss_sum = correct1 = correct5 = count = 0.0
    confusion = None
    for index, (images, labels) in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            break
        x = normalize(images, device=device, channels_last=cfg.channels_last)
        y = labels.to(device, non_blocking=True)
        with _autocast(device, cfg):
            logits = net(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        count += len(y)
        batch_confusion = confusion_matrix(top[:, 0], y, logits.shape[1])
        confusion = batch_confusion if confusion is None else confusion + batch_confusion
    set_train_mode(net, was_training)
    if reduce:
        loss_sum, correct1, correct5, count = _reduce_sums([loss_sum, correct1, correct5, count], device)
        confusion = _reduce_confusion(confusion, net, device)
    if count == 0:
        raise ValueError("evaluation saw no samples: is the validation manifest empty?")
    return EvalResult(
        loss_sum / count,
        correct1 / count,
        correct5 / count,
        int(count),
        None if confusion is None else confusion.cpu(),
    )


def _reduce_confusion(
    confusion: torch.Tensor | None, net: nn.Module, device: torch.device
) -> torch.Tensor | None:
    """Sum the confusion matrices of all ranks; a rank without eval batches contributes zeros."""
    if not (dist.is_available() and dist.is_initialized()):
        return confusion
    if confusion is None:
        num_classes = get_classifier(net).out_features
        confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    dist.all_reduce(confusion)
    return confusion


def _ema_metrics(result: EvalResult) -> dict[str, float]:
    """The EMA model's loss, top-1/5, balanced accuracy and macro-F1 as ``val_ema/...`` (not per class)."""
    return {
        "val_ema/" + key.split("/", 1)[1]: value
        for key, value in result.metrics().items()
        if key.count("/") == 1
    }


def fit(
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train_loader,
    val_loader,
    optim_cfg: OptimConfig,
    train_cfg: TrainConfig,
    device: torch.device,
    tracker: Tracker | None = None,
    resume: dict | None = None,
    on_epoch_end: Callable[[TrainState, dict[str, float]], None] | None = None,
    on_epoch_start: Callable[[int], None] | None = None,
    class_weights: torch.Tensor | None = None,
    class_names: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
    system_metrics: bool = False,
    ema: AveragedModel | None = None,
) -> FitResult:
    """Train ``model`` (possibly DDP-wrapped) for up to ``train_cfg.epochs`` epochs.

    ``resume`` is a checkpoint dict (``load_checkpoint``): training continues at its epoch with its
    optimizer, scheduler, early-stopping and RNG state. ``on_epoch_end(state, metrics)`` is called on every
    rank after each epoch with the resumable state, e.g. to report a checkpoint. ``on_epoch_start(epoch)``
    runs before each epoch, also the first one after a resume, e.g. to freeze or unfreeze the backbone by
    epoch (fine-tuning stages). ``class_weights`` weight the training loss per class (imbalanced data; the
    validation loss stays unweighted); ``class_names`` name the per-class validation metrics. ``progress``
    receives the human-readable lines (one per epoch, and one every ``train_cfg.progress_interval_s`` inside
    an epoch): give it on one rank only. ``system_metrics`` adds the node's CPU, memory and GPU figures to
    every epoch's metrics (:mod:`pipeline.train.system`). ``ema`` (:func:`pipeline.train.ema.build_ema`) is
    updated every ``train_cfg.ema.every_steps`` optimizer steps and evaluated every epoch beside the raw model
    (``val_ema/...``); with ``train_cfg.ema.select: ema`` early stopping watches it and its best weights are
    the ones restored at the end.

    ``train_cfg.accumulate_steps`` > 1 sums the gradients of that many batches (each loss divided by the
    group's size, so the step equals one over the concatenated batch) before each optimizer and scheduler
    step; the epoch's last group may be shorter. ``train_cfg.amp: fp16`` scales the loss with a GradScaler,
    whose state is checkpointed with the rest.
    """
    tracker = tracker or NullTracker()
    net = unwrap(model)
    stopper = EarlyStopping(train_cfg.early_stopping)
    # fp16's 5 exponent bits underflow small gradients; the scaler multiplies the loss up and skips steps
    # whose gradients overflowed. bf16 has float32's range and needs none (a disabled scaler is a no-op).
    fp16 = autocast_dtype(device, train_cfg.amp) == torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    start_epoch, global_step, best_model, best_confusion = 0, 0, None, None
    history: list[dict[str, float]] = []  # all epochs, restored ones included (they go into the state)
    if resume is not None:
        state = restore_state(
            resume,
            model=net,
            optimizer=optimizer,
            scheduler=scheduler,
            early_stopping=stopper,
            scaler=scaler if fp16 else None,
            ema=ema,
        )
        start_epoch, global_step, best_model = state.epoch, state.global_step, state.best_model
        best_confusion = state.best_confusion
        history = list(state.history)
        for entry in history:
            # Steps the tracker already holds are skipped: this only fills epochs it missed (server down).
            tracker.log_metrics({k: v for k, v in entry.items() if k != "epoch"}, step=int(entry["epoch"]))
    restored = len(history)
    # A run that had already stopped early (e.g. killed while saving its last epoch) must not train on.
    end_epoch = start_epoch if stopper.should_stop else train_cfg.epochs
    if resume is not None and end_epoch > start_epoch:
        # Visible in the tracking UI: where a restart (or --resume) picked the run up again with work left.
        tracker.log_metrics({"system/resumed": 1.0}, step=start_epoch)
    if train_cfg.sanity_val_batches:
        # Local only (no collective): ranks may hold fewer eval batches than asked for.
        evaluate(
            model,
            val_loader,
            device=device,
            cfg=train_cfg,
            max_batches=train_cfg.sanity_val_batches,
            reduce=False,
        )

    def snapshot(next_epoch: int) -> TrainState:
        return capture_state(
            epoch=next_epoch,
            global_step=global_step,
            model=net,
            optimizer=optimizer,
            scheduler=scheduler,
            early_stopping=stopper,
            best_metric=stopper.best_value,
            tracking_run_id=tracker.run_id,
            best_model=best_model,
            history=history,
            best_confusion=best_confusion,
            scaler=scaler if fp16 else None,
            ema=ema,
        )

    stopped_early = False
    select_ema = ema is not None and train_cfg.ema.select == "ema"
    watched = train_cfg.watched_metric
    accumulate = train_cfg.accumulate_steps
    state = None
    weight = None if class_weights is None else class_weights.to(device)
    steps = StepProgress(
        interval_s=train_cfg.progress_interval_s,
        emit=progress,
        # The step-level loss, with the global step, at the same interval as the lines.
        log_step_loss=lambda value, step: tracker.log_metrics({"train/loss_step": value}, step=step),
        epochs=train_cfg.epochs,
    )
    epoch_seconds: list[float] = []
    sampler = SystemSampler(device) if system_metrics else None
    mixer = batch_mixer(train_cfg, get_classifier(net).out_features)
    for epoch in range(start_epoch, end_epoch):
        started = time.perf_counter()
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        set_train_mode(model)
        train_loader.set_epoch(epoch)
        meter = DataWait()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        train_started = time.perf_counter()
        batches = len(train_loader)
        steps.start_epoch(epoch, batches)
        optimizer.zero_grad(set_to_none=True)
        for step_in_epoch, (images, labels) in enumerate(meter.iterate(train_loader), start=1):
            x = normalize(images, device=device, channels_last=train_cfg.channels_last)
            y = labels.to(device, non_blocking=True)
            # MixUp/CutMix on the device: the loss takes the mixed class probabilities, while train/top1 below
            # still compares with the hard labels (the dominant image's class).
            x, target = mixer(x, y) if mixer is not None else (x, y)
            group_start = (step_in_epoch - 1) // accumulate * accumulate
            group_size = min(accumulate, batches - group_start)
            last_of_group = step_in_epoch - group_start >= group_size
            with _no_sync(model, not last_of_group):
                with _autocast(device, train_cfg):
                    logits = model(x)
                    loss = F.cross_entropy(
                        logits, target, weight=weight, label_smoothing=optim_cfg.label_smoothing
                    )
                # The L2 mode's delta/2 ||w||^2 (else 0), once per group like the data loss's mean.
                total = (loss + regularization_loss(net, optim_cfg)) / group_size
                scaler.scale(total).backward()
            if last_of_group:
                if optim_cfg.grad_clip_norm is not None:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                    torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.grad_clip_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                global_step += 1
                if ema is not None and global_step % train_cfg.ema.every_steps == 0:
                    update_ema(ema, net, in_warmup=epoch < optim_cfg.warmup_epochs)
            # Accumulated on the device: .item() every step would synchronize a GPU each step.
            loss_sum += loss.detach().double() * len(y)
            correct += (logits.detach().argmax(dim=1) == y).sum()
            seen += len(y)
            steps.step(step_in_epoch=step_in_epoch, global_step=global_step, loss=loss, images=len(y))
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # queued GPU work belongs to this epoch's training time
        train_seconds = max(time.perf_counter() - train_started, 1e-9)
        train_loss, train_correct, train_seen, images_per_s = _reduce_sums(
            [loss_sum.item(), correct.item(), float(seen), seen / train_seconds], device
        )
        val = evaluate(model, val_loader, device=device, cfg=train_cfg)
        # Corrupt samples the loaders skipped (data.on_corrupt=skip) in this epoch's training and evaluation.
        (skipped,) = _reduce_sums(
            [float(getattr(train_loader, "skipped", 0) + getattr(val_loader, "skipped", 0))], device
        )
        ema_val = None if ema is None else evaluate(ema.module, val_loader, device=device, cfg=train_cfg)
        metrics = {
            "train/loss": train_loss / train_seen,
            "train/top1": train_correct / train_seen,
            "train/lr": optimizer.param_groups[0]["lr"],
            **val.metrics(class_names),
            **({} if ema_val is None else _ema_metrics(ema_val)),
            "data/skipped": skipped,
            "system/images_per_s": images_per_s,  # summed over ranks: the job's throughput
            "system/data_wait": meter.wait_seconds / train_seconds,
            "system/epoch_s": time.perf_counter() - started,
            **(sampler.sample() if sampler is not None else {}),
        }
        if not math.isfinite(metrics["train/loss"]):
            raise FloatingPointError(
                f"epoch {epoch}: training loss is {metrics['train/loss']}; lower optim.lr"
            )
        decision = stopper.update(metrics[watched], epoch)
        if decision.improved:
            chosen, chosen_val = (ema.module, ema_val) if select_ema else (net, val)
            best_model = {k: v.detach().to("cpu", copy=True) for k, v in chosen.state_dict().items()}
            if chosen_val.confusion is not None and chosen_val.confusion.shape[0] <= PER_CLASS_METRICS_MAX:
                best_confusion = chosen_val.confusion.tolist()
        stop = agree(decision.stop)
        tracker.log_metrics(metrics, step=epoch)
        history.append({"epoch": epoch, **metrics})
        epoch_seconds.append(metrics["system/epoch_s"])
        if progress is not None:
            left = 0 if stop else train_cfg.epochs - epoch - 1
            progress(
                epoch_line(
                    epoch, train_cfg.epochs, metrics, eta_s=left * sum(epoch_seconds) / len(epoch_seconds)
                )
            )
        state = snapshot(epoch + 1)
        if on_epoch_end is not None:
            # early_stop tells a caller (e.g. a search) why the run ended; it is not a tracked metric.
            on_epoch_end(state, {**metrics, "early_stop": float(stop)})
        if stop:
            stopped_early = True
            break
    if state is None:  # resumed after the last epoch: nothing left to run
        state = snapshot(start_epoch)
    if best_model is not None:
        net.load_state_dict(best_model)  # the best epoch's weights are what gets saved and registered
    return FitResult(
        history=history[restored:],
        best_epoch=stopper.best_epoch,
        best_metric=stopper.best_value,
        stopped_early=stopped_early,
        state=state,
    )


__all__ = ["EvalResult", "FitResult", "autocast_dtype", "evaluate", "fit", "unwrap"]

"""Progress a person can read while a run trains: one line per epoch, and inside long epochs one line every
``train.progress_interval_s`` seconds. Ray-free and print-free: the loop hands the lines to an ``emit``
callable, which the launcher gives rank 0 only (so a 16-rank job prints one line per epoch, not 16 dicts).

    epoch 4/10  loss 2.13  top1 0.21 | val top1 0.188  bal 0.188 | 530 img/s  data 13%  6.6 s  eta 0:38
      epoch 5/10  step 120/500  loss 2.05  512 img/s
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def epoch_line(epoch: int, epochs: int, metrics: dict[str, float], *, eta_s: float | None) -> str:
    """The per-epoch line; ``epoch`` counts from 0 like the tracked steps, the line from 1."""
    parts = [
        f"epoch {epoch + 1}/{epochs}",
        f"loss {metrics['train/loss']:.3f}",
        f"top1 {metrics['train/top1']:.3f}",
    ]
    val = [f"val top1 {metrics['val/top1']:.3f}"]
    if "val/balanced_acc" in metrics:
        val.append(f"bal {metrics['val/balanced_acc']:.3f}")
    if "val_ema/top1" in metrics:
        val.append(f"ema {metrics['val_ema/top1']:.3f}")
    system = [
        f"{metrics['system/images_per_s']:.0f} img/s",
        f"data {metrics['system/data_wait']:.0%}",
        f"{metrics['system/epoch_s']:.1f} s",
    ]
    if metrics.get("data/skipped"):
        system.append(f"{metrics['data/skipped']:.0f} corrupt skipped")
    if eta_s is not None:
        system.append(f"eta {_duration(eta_s)}")
    return "  ".join(parts) + " | " + "  ".join(val) + " | " + "  ".join(system)


class StepProgress:
    """Emits a line at most every ``interval_s`` seconds within an epoch (0: never), and the step loss that
    goes with it to ``log_step_loss(value, global_step)``. The loss stays on the device between lines:
    reading it every step would synchronize a GPU every step."""

    def __init__(
        self,
        *,
        interval_s: float,
        emit: Callable[[str], None] | None,
        log_step_loss: Callable[[float, int], None],
        epochs: int,
    ) -> None:
        self.interval_s = interval_s
        self.emit = emit
        self.log_step_loss = log_step_loss
        self.epochs = epochs
        self._due = float("inf")

    def start_epoch(self, epoch: int, steps: int) -> None:
        self.epoch, self.steps = epoch, steps
        self._images, self._since = 0, time.perf_counter()
        self._due = self._since + self.interval_s if self.interval_s > 0 else float("inf")

    def step(self, *, step_in_epoch: int, global_step: int, loss: torch.Tensor, images: int) -> None:
        self._images += images
        now = time.perf_counter()
        if now < self._due:
            return
        value = float(loss.detach())
        self.log_step_loss(value, global_step)
        if self.emit is not None:
            rate = self._images / max(now - self._since, 1e-9)
            self.emit(
                f"  epoch {self.epoch + 1}/{self.epochs}  step {step_in_epoch}/{self.steps}  loss {value:.3f}  {rate:.0f} img/s"
            )
        self._images, self._since, self._due = 0, now, now + self.interval_s

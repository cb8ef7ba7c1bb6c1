"""Early stopping on a validation metric, and the cross-rank agreement that keeps all workers in step.

Every rank computes the same metric after an all-reduced evaluation, but a stop decision taken locally is a
deadlock risk: if one rank leaves the epoch loop while the others enter the next all-reduce, they wait until
the collective timeout (30 minutes by default). :func:`agree` all-reduces the flag with MAX, so if any rank
says stop, every rank stops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pipeline.config import EarlyStoppingConfig


@dataclass(frozen=True)
class Decision:
    """Outcome of one epoch's update."""

    improved: bool
    """The value beat the best so far by more than min_delta (it is the new best)."""
    stop: bool
    """patience epochs in a row without improvement (never true when early stopping is disabled)."""


class EarlyStopping:
    """Tracks the best value of ``cfg.metric`` and the epochs since it last improved."""

    def __init__(self, cfg: EarlyStoppingConfig) -> None:
        self.cfg = cfg
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0

    def _improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best_value is None:
            return True
        if self.cfg.mode == "max":
            return value > self.best_value + self.cfg.min_delta
        return value < self.best_value - self.cfg.min_delta

    def update(self, value: float, epoch: int) -> Decision:
        """Record the metric of ``epoch``; a NaN value never improves."""
        value = float(value)
        improved = self._improves(value)
        if improved:
            self.best_value, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        return Decision(improved=improved, stop=self.should_stop)

    @property
    def should_stop(self) -> bool:
        """patience epochs in a row without improvement (a run resumed in this state trains no further)."""
        return self.cfg.enabled and self.bad_epochs >= self.cfg.patience

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values only, so a checkpoint loads with ``torch.load(weights_only=True)``."""
        return {"best_value": self.best_value, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_value = state["best_value"]
        self.best_epoch = state["best_epoch"]
        self.bad_epochs = int(state["bad_epochs"])


def agree(stop: bool) -> bool:
    """True on every rank if any rank passes True (all-reduce MAX); the input itself outside a process group.

    Every rank must call it at the same point of the loop, as with any collective.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return stop
    # NCCL only reduces CUDA tensors; gloo takes CPU tensors.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([1 if stop else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())

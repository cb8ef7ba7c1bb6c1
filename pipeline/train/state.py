"""Everything needed to resume a run, saved and loaded in one place.

A checkpoint is one ``torch.save`` file holding a :class:`TrainState` as plain data: state dicts, ints,
floats, strings and tensors only, so it loads with ``torch.load(weights_only=True)`` (no arbitrary
unpickling of a file that may come from shared storage). RNG states are converted to tensors and lists for
the same reason: numpy's state tuple holds an ndarray, which the weights-only unpickler refuses.

Writes are atomic (temporary file in the same directory, then ``os.replace``): a worker killed mid-save leaves
the previous checkpoint intact rather than a truncated file.

Pass the unwrapped model (``ddp_model.module``), so the keys carry no ``module.`` prefix and the checkpoint
loads into a plain model too.
"""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.train.early_stopping import EarlyStopping


@dataclass
class TrainState:
    """A resumable snapshot of a run (plain data; see :func:`capture_state` / :func:`restore_state`)."""

    epoch: int
    """The next epoch to run (0-based), i.e. the number of completed epochs."""
    global_step: int
    """Optimizer steps taken so far."""
    model: dict[str, torch.Tensor]
    """Model state_dict (unwrapped, no DDP ``module.`` prefix)."""
    optimizer: dict[str, Any]
    """Optimizer state_dict."""
    scheduler: dict[str, Any]
    """LR scheduler state_dict."""
    early_stopping: dict[str, Any]
    """EarlyStopping state_dict."""
    rng: dict[str, Any]
    """RNG states from :func:`capture_rng`."""
    scaler: dict[str, Any] | None = None
    """GradScaler state_dict when mixed precision is used, else None."""
    best_metric: float | None = None
    """Best value of the watched validation metric so far."""
    tracking_run_id: str | None = None
    """Experiment-tracking run to continue logging into, so a resumed run is not a new run."""
    best_model: dict[str, torch.Tensor] | None = None
    """Weights of the best epoch so far, restored at the end of training (survives restarts)."""
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    """Every completed epoch's metrics ({"epoch": e, ...}): a resumed run re-logs the epochs its tracker
    missed (e.g. while the tracking server was down), so the record is complete once it is back."""
    best_confusion: list[list[int]] | None = None
    """The best epoch's validation confusion matrix ([true][predicted] counts, up to 50 classes): the driver
    plots it for the registered model, even when that epoch came before a restart."""
    ema: dict[str, torch.Tensor] | None = None
    """The weight average's state_dict (``AveragedModel``: ``n_averaged`` and ``module.*``) when
    train.ema is enabled, else None."""


def capture_rng() -> dict[str, Any]:
    """torch (CPU and every CUDA device), numpy and Python ``random`` states as tensors and plain types."""
    np_kind, np_keys, np_pos, np_has_gauss, np_cached_gaussian = np.random.get_state()
    py_version, py_internal, py_gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached_gaussian),
        },
        # Python's Mersenne Twister state is 625 ints below 2**32 plus the cached gauss (float or None).
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss_next},
    }


def restore_rng(rng: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = rng["numpy"]
    np.random.set_state(
        (
            state["kind"],
            state["keys"].numpy().astype(np.uint32),
            state["pos"],
            state["has_gauss"],
            state["cached_gaussian"],
        )
    )
    python = rng["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))


def capture_state(
    *,
    epoch: int,
    global_step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    early_stopping: EarlyStopping,
    scaler: torch.amp.GradScaler | None = None,
    best_metric: float | None = None,
    tracking_run_id: str | None = None,
    best_model: dict[str, torch.Tensor] | None = None,
    history: list[dict[str, float]] | None = None,
    best_confusion: list[list[int]] | None = None,
    ema: nn.Module | None = None,
) -> TrainState:
    """Snapshot the live objects and the RNGs (call it at an epoch boundary, ``epoch`` = next epoch).

    Like ``state_dict()``, the model and optimizer entries share storage with the live tensors: save the
    state (or copy it) before training continues.
    """
    return TrainState(
        epoch=epoch,
        global_step=global_step,
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        early_stopping=early_stopping.state_dict(),
        rng=capture_rng(),
        scaler=scaler.state_dict() if scaler is not None else None,
        best_metric=best_metric,
        tracking_run_id=tracking_run_id,
        best_model=best_model,
        history=list(history or []),
        best_confusion=best_confusion,
        ema=ema.state_dict() if ema is not None else None,
    )


def restore_state(
    checkpoint: dict[str, Any],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    early_stopping: EarlyStopping,
    scaler: torch.amp.GradScaler | None = None,
    ema: nn.Module | None = None,
) -> TrainState:
    """Load a checkpoint (from :func:`load_checkpoint`) into freshly built objects and restore the RNGs.

    Build the objects exactly as for a new run (same config, same global batch size) first. Returns the
    state, whose ``epoch``, ``global_step``, ``best_metric`` and ``tracking_run_id`` tell the loop where to go on.
    """
    state = TrainState(**checkpoint)
    model.load_state_dict(state.model)
    optimizer.load_state_dict(state.optimizer)
    scheduler.load_state_dict(state.scheduler)
    early_stopping.load_state_dict(state.early_stopping)
    if scaler is not None:
        assert state.scaler is not None, "the checkpoint was written without a GradScaler"
        scaler.load_state_dict(state.scaler)
    if ema is not None:
        if state.ema is None:
            raise ValueError("the checkpoint was written without train.ema: resume with the run's own config")
        ema.load_state_dict(state.ema)
    restore_rng(state.rng)
    return state


def save_checkpoint(state: TrainState, path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same directory + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            # Shallow: dataclasses.asdict would deep-copy every tensor of the state dicts first.
            torch.save({f.name: getattr(state, f.name) for f in dataclasses.fields(state)}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint as a dict of TrainState fields, loaded with ``weights_only=True``."""
    return torch.load(Path(path), map_location=map_location, weights_only=True)


def read_state(url: str) -> dict[str, Any]:
    """A torch file (a checkpoint's state, exported weights) from a local path or ``s3://`` URL, loaded with
    ``weights_only=True`` onto the CPU."""
    import io

    from pipeline.data import storage

    return torch.load(io.BytesIO(storage.read_bytes(url)), map_location="cpu", weights_only=True)


def retarget_state(
    checkpoint: dict[str, Any], *, lr_factor: float, weight_decay_factor: float
) -> dict[str, Any]:
    """A copy of a checkpoint (from :func:`load_checkpoint`) whose optimizer and lr schedule run at
    ``lr_factor`` times the learning rate and ``weight_decay_factor`` times the weight decay from here on.

    For Population Based Training: a trial continues from another trial's state with perturbed optim.lr and
    optim.weight_decay, but :func:`restore_state` loads the saved param groups (lr, weight decay) and the
    schedulers' base lrs over the ones built from the new config. Every schedule here is linear in the peak
    lr (warm-up and main schedule factors times ``base_lrs``; cosine's recursive form too, with eta_min 0), so
    scaling the current lr, ``initial_lr``, ``base_lrs`` and ``_last_lr`` by one factor gives the schedule the
    new peak would have had, at the same position. Weight decay scales only where it is non-zero: the
    no-decay groups (norms, biases) and L2 mode's optimizer (decay in the loss, from the config) stay at 0.
    The model, moments and RNG states are untouched: the moments are in gradient units."""

    def scaled(tree: Any) -> Any:
        if isinstance(tree, dict):
            return {
                key: [v * lr_factor for v in value] if key in ("base_lrs", "_last_lr") else scaled(value)
                for key, value in tree.items()
            }
        if isinstance(tree, list):
            return [scaled(value) for value in tree]
        return tree

    optimizer = dict(checkpoint["optimizer"])
    groups = []
    for group in optimizer["param_groups"]:
        group = dict(group)
        for key in ("lr", "initial_lr"):
            if key in group:
                group[key] = group[key] * lr_factor
        if group.get("weight_decay"):
            group["weight_decay"] = group["weight_decay"] * weight_decay_factor
        groups.append(group)
    optimizer["param_groups"] = groups
    return {**checkpoint, "optimizer": optimizer, "scheduler": scaled(checkpoint["scheduler"])}

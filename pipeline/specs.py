"""What crosses the Ray boundary: typed, frozen specs, never dicts read with ``.get``.

A driver builds one spec and Ray pickles it with the worker (or trial) function. Everything a spec holds is
usable on any node of a cluster: configs, names, and URLs in storage that every node reads (``s3://`` or a
declared shared mount, checked by the driver before anything starts). No tracking address travels: workers
never talk to MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import FinetuneConfig, PretrainConfig


@dataclass(frozen=True)
class StartFrom:
    """Another run's saved state to continue from (Population Based Training's exploit), read by every rank
    when Ray hands the run no checkpoint of its own."""

    state_url: str
    """The state file (local path on a shared mount, or ``s3://``)."""
    lr: float
    """optim.lr the state was trained with: the run's own optim.lr rescales the saved schedule."""
    weight_decay: float
    """optim.weight_decay the state was trained with, likewise."""


@dataclass(frozen=True)
class WorkerSpec:
    """One DDP rank of a pre-training or fine-tuning run."""

    config: PretrainConfig
    """The resolved config (a :class:`FinetuneConfig` for fine-tuning), manifest paths made absolute."""
    run_name: str
    """Names the run's progress lines (several trials of a search print side by side)."""
    source_url: str | None = None
    """Fine-tuning: the exported weights to start from (``model.pt``), which the driver copied beside the
    run's checkpoints; each worker loads them from there."""
    start_from: StartFrom | None = None
    """A state to continue from instead of starting afresh (its lr and weight decay retargeted to the
    config's); the run's own checkpoint, when Ray hands one after a restart, wins."""

    @property
    def finetune(self) -> bool:
        return isinstance(self.config, FinetuneConfig)


@dataclass(frozen=True)
class TrialSpec:
    """What every trial of a search shares; each trial adds its own candidate (Tune's trial config)."""

    base: PretrainConfig
    """The search's pre-training recipe, manifest paths made absolute."""
    train_storage: str
    """Where each trial's Ray Train run keeps its checkpoints (``{search}/trials``), read by the driver to
    register the best trial's model."""
    perturbation_interval: int | None = None
    """Population Based Training: trials hand Tune a copy of their state every this many epochs, for other
    trials to continue from (None: no PBT; trials report through Ray's TuneReportCallback)."""

"""Ray-free, MLflow-free training core: optimizer and schedule, early stopping, resumable state.

The launcher (the only Ray Train import) and the tracking module call into this package; nothing here imports
either, so every piece runs in a plain process in unit tests.
"""

from pipeline.train.early_stopping import Decision, EarlyStopping, agree
from pipeline.train.optim import (
    build_optimizer,
    build_scheduler,
    l2_penalty,
    regularization_loss,
    scaled_lr,
)
from pipeline.train.state import (
    TrainState,
    capture_rng,
    capture_state,
    load_checkpoint,
    restore_rng,
    restore_state,
    save_checkpoint,
)

__all__ = [
    "Decision",
    "EarlyStopping",
    "TrainState",
    "agree",
    "build_optimizer",
    "build_scheduler",
    "capture_rng",
    "capture_state",
    "l2_penalty",
    "load_checkpoint",
    "regularization_loss",
    "restore_rng",
    "restore_state",
    "save_checkpoint",
    "scaled_lr",
]

"""Experiment tracking behind one door.

``pipeline.tracking.mlflow_tracker`` is the only module in the code base that imports mlflow; importing this
package does not import it, so code that never tracks never pays mlflow's import time. The MLflow names below
are loaded on first use.
"""

from __future__ import annotations

from typing import Any

from pipeline.tracking.base import NullTracker, Tracker

_MLFLOW_NAMES = (
    "MlflowTracker",
    "Registration",
    "TrackingError",
    "open_tracker",
    "redact_uri",
    "register_model",
    "resolve_tracking_uri",
    "run_tags",
)

__all__ = ["NullTracker", "Tracker", *_MLFLOW_NAMES]


def __getattr__(name: str) -> Any:
    if name in _MLFLOW_NAMES:
        from pipeline.tracking import mlflow_tracker

        return getattr(mlflow_tracker, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

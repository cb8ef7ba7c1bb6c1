"""The tracking interface the training loop talks to, and the do-nothing tracker.

The loop never asks whether tracking is on: it always has a tracker. Rank 0 gets the real one (MLflow),
every other rank and every run with tracking off gets :class:`NullTracker`, so only rank 0 logs.
"""

from __future__ import annotations

from typing import Any, Protocol


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None: ...

    def log_artifact(self, local_path: str, *, artifact_path: str | None = None) -> None: ...

    def log_history(self, history: list[dict[str, float]]) -> int: ...

    def log_dataset(
        self, *, name: str, url: str, digest: str, context: str, profile: dict[str, Any]
    ) -> None: ...

    def close(self, *, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Accepts everything, records nothing."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        pass

    def log_artifact(self, local_path: str, *, artifact_path: str | None = None) -> None:
        pass

    def log_history(self, history: list[dict[str, float]]) -> int:
        return 0

    def log_dataset(self, *, name: str, url: str, digest: str, context: str, profile: dict[str, Any]) -> None:
        pass

    def close(self, *, status: str = "FINISHED") -> None:
        pass

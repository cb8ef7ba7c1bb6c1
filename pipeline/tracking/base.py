"""The tracking interface the training loop talks to, and the do-nothing tracker.

The loop never asks whether tracking is on: it always has a tracker. Rank 0 gets the real one (MLflow),
every other rank and every run with tracking off gets :class:`NullTracker`, so only rank 0 logs.
"""

from __future__ import annotations

from typing import Any, Protocol


class Tracker(Protocol):
    """Everything the drivers and the loop use of a run's record (the MLflow adapter implements it)."""

    run_id: str | None
    tracking_uri: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None: ...

    def log_artifact(self, local_path: str, *, artifact_path: str | None = None) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def log_history(self, history: list[dict[str, float]]) -> int: ...

    def log_dataset(
        self, *, name: str, url: str, digest: str, context: str, profile: dict[str, Any]
    ) -> None: ...

    def close(self, *, status: str = "FINISHED") -> None: ...


def exit_status(kind: type[BaseException] | None) -> str:
    """The status a run ends with when its block exits with ``kind`` (None: no exception): a Ctrl-C or a
    job stop is KILLED, any other error FAILED."""
    if kind is None:
        return "FINISHED"
    return "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED"


class NullTracker:
    """Accepts everything, records nothing."""

    run_id: str | None = None
    tracking_uri: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        pass

    def log_artifact(self, local_path: str, *, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_history(self, history: list[dict[str, float]]) -> int:
        return 0

    def log_dataset(self, *, name: str, url: str, digest: str, context: str, profile: dict[str, Any]) -> None:
        pass

    def close(self, *, status: str = "FINISHED") -> None:
        pass


class MetricBuffer(NullTracker):
    """The tracker of a training worker: it keeps the metric points the loop logs until the next report
    carries them to the driver's side, the only place that talks to MLflow (workers on a cluster may not
    reach the tracking store: a local sqlite file exists only on the driver's node)."""

    def __init__(self) -> None:
        self._points: list[tuple[str, int, float]] = []

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        self._points.extend((key, int(step), float(value)) for key, value in metrics.items())

    def drain(self) -> list[tuple[str, int, float]]:
        """The points logged since the last call, oldest first."""
        points, self._points = self._points, []
        return points


def points_by_step(points: list[tuple[str, int, float]] | list[list]) -> dict[int, dict[str, float]]:
    """``[(key, step, value), ...]`` -> ``{step: {key: value}}``, for ``Tracker.log_metrics``."""
    grouped: dict[int, dict[str, float]] = {}
    for key, step, value in points:
        grouped.setdefault(int(step), {})[str(key)] = float(value)
    return grouped

"""MLflow, the only module that imports it: one run's logging, and reading results back by tag.

Everything goes through ``MlflowClient`` with an explicit tracking URI and run id, never mlflow's global
"active run", so a library call cannot pick up or end somebody else's run (and no ``MLFLOW_RUN_ID`` leaks).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param


class MlflowTracker:
    """One MLflow run in experiment ``experiment`` (created if missing); use as a context manager."""

    def __init__(
        self, *, tracking_uri: str, experiment: str, run_name: str, tags: Mapping[str, str] | None = None
    ) -> None:
        self._client = MlflowClient(tracking_uri)
        found = self._client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self._client.create_experiment(experiment)
        run = self._client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
        self.run_id: str = run.info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._client.log_batch(self.run_id, params=[Param(key, str(value)) for key, value in params.items()])

    def log_metrics(self, metrics: Mapping[str, float], *, step: int = 0) -> None:
        timestamp = int(time.time() * 1000)
        entries = [Metric(key, float(value), timestamp, step) for key, value in metrics.items()]
        self._client.log_batch(self.run_id, metrics=entries)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, path: str | Path) -> None:
        self._client.log_artifact(self.run_id, str(path))

    def close(self, *, failed: bool = False) -> None:
        self._client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")

    def __enter__(self) -> MlflowTracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ):
        self.close(failed=exc_type is not None)


def best_metric_by_tag(
    *, tracking_uri: str, tag: str, metric: str, experiments: Sequence[str] | None = None
) -> dict[str, float]:
    """``{tag value: highest final value of metric}`` over the runs that carry both the tag and the metric.

    A run's value is the last one it logged (``run.data.metrics``); runs of all experiments are searched unless
    ``experiments`` names some. Used by the profiler to plot accuracy (e.g. ``val_acc``) per ``arch`` tag.
    """
    client = MlflowClient(tracking_uri)
    if experiments is None:
        experiment_ids = [e.experiment_id for e in _all_pages(client.search_experiments)]
    else:
        experiment_ids = [
            e.experiment_id for name in experiments if (e := client.get_experiment_by_name(name))
        ]
    best: dict[str, float] = {}
    if not experiment_ids:
        return best
    for run in _all_pages(client.search_runs, experiment_ids):
        value = run.data.metrics.get(metric)
        key = run.data.tags.get(tag)
        if key is not None and value is not None and not math.isnan(value):
            best[key] = max(value, best.get(key, -math.inf))
    return best


def _all_pages(search: Callable[..., Any], *args: Any) -> Iterator[Any]:
    """Every item of a paged MLflow search (stores cap a page at 1000 items)."""
    page_token = None
    while True:
        page = search(*args, page_token=page_token)
        yield from page
        page_token = page.token
        if not page_token:
            return

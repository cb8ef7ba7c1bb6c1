"""The Ray Train callbacks that run in Train's controller actor, kept out of :mod:`pipeline.launch`.

Ray unpickles a run's callbacks in its controller, a fresh process per run: defined in ``pipeline.launch``,
they made every controller import the training stack behind it (torchvision, webdataset, the models and the
loop), about 1-2 s of imports on the critical path of each run's start, ahead of its workers. This module
imports only Ray Train, torch (which ``ray.train.torch`` loads there anyway) and light project modules.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Callable
from typing import Any

import ray.train
import torch

from pipeline.errors import LoaderError

WORKER_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0"}
"""Offline and quiet in every worker (and the controller), whatever the environment of the node's raylet."""


PBT_STATES = "pbt-states"
"""Folder beside a search's Train runs holding the states Population Based Training trials continue from."""

TRACKED_KEY = "tracked_points"
"""Report key of the JSON list of [metric, step, value] points rank 0 logged since the previous report."""


class TrackingCallback(ray.train.UserCallback):
    """Logs what the workers report into the run's MLflow record, from Ray Train's controller.

    The controller runs on the node of the process that called ``fit()`` (Ray pins it there), i.e. beside the
    driver, so a tracking URI the driver can use - a local sqlite file included - works here too, and no
    worker ever needs to reach the store. A report arrives once its checkpoint is stored, so an epoch is
    logged exactly when it can no longer be re-run by a restart; points a resumed run already holds are
    skipped. Tracking failures never end training: the tracker drops calls while the server is away (the
    driver back-fills the epochs from the checkpoint's history at the end, or on ``--resume``).
    """

    def __init__(self, *, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._tracker = None

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        points = json.loads(metrics[0].get(TRACKED_KEY) or "[]") if metrics else []
        if not points:
            return
        # An exception here would end the run (Ray makes it a controller error): never for tracking.
        try:
            log_points(self._open(), points)
        except Exception as error:
            print(
                f"tracking: could not log epoch metrics ({type(error).__name__}: {error}); training goes on"
            )

    def _open(self):
        if self._tracker is None:
            from pipeline.provenance import redact_uri
            from pipeline.tracking.mlflow_tracker import MlflowTracker, TolerantTracker

            os.environ.update(WORKER_ENV)
            self._tracker = TolerantTracker(
                _LazyRun(
                    lambda: MlflowTracker(
                        tracking_uri=self.tracking_uri, experiment="", run_name="", run_id=self.run_id
                    )
                ),
                where=redact_uri(self.tracking_uri),
            )
        return self._tracker


class _LazyRun:
    """Opens the tracker on first use and again after a failed open (the server may be down at first)."""

    def __init__(self, open_run: Callable[[], Any]) -> None:
        self._open_run, self._inner = open_run, None

    @property
    def run_id(self) -> str | None:
        return None if self._inner is None else self._inner.run_id

    def __getattr__(self, name: str) -> Any:
        if self._inner is None:
            self._inner = self._open_run()
        return getattr(self._inner, name)


def log_points(tracker: Any, points: list[list]) -> None:
    """Log reported ``[metric, step, value]`` points, one ``log_metrics`` call per step."""
    from pipeline.tracking.base import points_by_step

    for step, values in sorted(points_by_step(points).items()):
        tracker.log_metrics(values, step=step)


class ReportRelay(ray.train.UserCallback):
    """Hands each report to the process that started the run, through a Ray queue of one item, for a
    Population Based Training trial to relay to Tune with a checkpoint of its own (Ray's
    ``TuneReportCallback`` forwards metrics only, so PBT would find nothing to clone).

    Every ``keep_every`` epochs it first copies the epoch's state file (``state_file`` in the reported
    checkpoint) to ``{run storage}/pbt-states/{run name}/epoch-NNNN.pt``, inside the storage's own
    filesystem (a server-side copy on S3): Train keeps only ``num_to_keep`` checkpoints of a run, while another
    trial may continue from this state later. The item carries rank 0's metrics and that copy's file name.
    The queue's size makes training wait until the trial took the report, as Tune's own callback does."""

    def __init__(self, queue: Any, *, keep_every: int, state_file: str) -> None:
        self.queue, self.keep_every, self.state_file = queue, keep_every, state_file

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        report = dict(metrics[0])
        kept = None
        if checkpoint is not None and (int(report["epoch"]) + 1) % self.keep_every == 0:
            # {storage}/{run}/epoch-NNNN -> {storage}/pbt-states/{run}/epoch-NNNN.pt, in the filesystem's paths.
            run_dir, epoch_dir = posixpath.split(checkpoint.path.rstrip("/"))
            storage_dir, run_name = posixpath.split(run_dir)
            target_dir = posixpath.join(storage_dir, PBT_STATES, run_name)
            checkpoint.filesystem.create_dir(target_dir, recursive=True)
            kept = f"{epoch_dir}.pt"
            checkpoint.filesystem.copy_file(
                posixpath.join(checkpoint.path, self.state_file), posixpath.join(target_dir, kept)
            )
        self.queue.put({"metrics": report, "state": kept})


class DeterministicErrorGuard(ray.train.UserCallback):
    """Stops a run at once when a worker raised an error that a restart would only repeat.

    Ray Train restarts the worker group on any worker error, up to ``max_failures`` times. That is right for
    a lost worker (a dead process or node: Ray reports a failed health check) and for what its peers see
    then (a torch.distributed error in the collective they were in), and for I/O that may succeed next
    time (``OSError``, which covers connection errors, timeouts and our storage errors). Any other Python
    exception raised by a live worker - a bug, a bad config value, an unsupported layer - happens again at
    the same step after every restart: the seen case was a channels_last recipe that lost its first epoch
    and then every restart. Raising here, in the controller, ends the run (Ray treats a callback error as a
    controller error, which it does not retry), and the job fails with the worker's error.
    """

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        # A damaged shard (the loader names it) fails the same way after a restart, and its peers' broken
        # collectives would otherwise look like a lost worker: stop on it whatever the others raised.
        data = {rank: e for rank, e in worker_exceptions.items() if isinstance(e, LoaderError)}
        if not data and (not worker_exceptions or any(_retryable(e) for e in worker_exceptions.values())):
            return
        rank, error = min((data or worker_exceptions).items())
        # Raised as the ControllerError Ray would wrap it in: the controller then logs it once (its failure
        # decision) instead of adding an "Error in control loop iteration" traceback first.
        raise ray.train.ControllerError(
            DeterministicWorkerError(
                f"rank {rank} raised {type(error).__name__}: {str(error).strip()[:400]} "
                "(an error in the training code or config, not a lost worker: not retried)"
            )
        )


class DeterministicWorkerError(RuntimeError):
    """A worker's error that a restart would repeat (see :class:`DeterministicErrorGuard`)."""


def _retryable(error: BaseException) -> bool:
    from ray.exceptions import RayActorError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    return isinstance(
        error, WorkerHealthCheckFailedError | RayActorError | torch.distributed.DistError | OSError
    ) or any(mark in str(error) for mark in _COLLECTIVE_FAILURE_MARKS)


# A peer that died mid-collective: gloo raises a plain RuntimeError naming its transport, not a DistError.
_COLLECTIVE_FAILURE_MARKS = (
    "gloo/transport",
    "Connection closed by peer",
    "Connection reset by peer",
    "NCCL",
)

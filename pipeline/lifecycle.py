"""One run lifecycle for every driver (pre-training, fine-tuning, search, experiments):
prepare -> run -> settle -> publish, and the tracking run closed exactly once with the outcome.

* ``prepare``: everything that can fail on bad input or an unreachable service, before resources are taken
  (validation, names, the cluster-storage check); :func:`execute` then opens the tracking run;
* ``run``: the work (Ray Train workers, Tune trials, or arms in this process);
* ``settle``: make the record match what happened (missed epochs back-filled, trials' statuses);
* ``publish``: what users take away (exported and registered model, best config, report pages).

The run closes FINISHED when publish returns, KILLED on Ctrl-C (or a job stop), FAILED on any error; a
driver whose tracking store failed mid-way detaches it instead (:meth:`TrackedRun.detach`), since a run
that cannot be written cannot be closed either, and its ``--resume`` completes it later.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, TypeVar

from pipeline.tracking.base import NullTracker, Tracker, exit_status


class TrackedRun:
    """The driver's tracking run, closed once on exit with the status the exit implies."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id

    @property
    def tracking_uri(self) -> str | None:
        return self.tracker.tracking_uri

    def detach(self) -> Tracker:
        """The tracking store failed: stop writing to the run and leave it open; returns the tracker to use
        from now on (it records nothing)."""
        self.tracker = NullTracker()
        return self.tracker

    def __enter__(self) -> TrackedRun:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self.tracker.run_id is not None:
            self.tracker.close(status=exit_status(kind))


@dataclass(frozen=True)
class RunTarget:
    """The tracking run a driver records into: opened by :func:`execute` once ``prepare`` has passed."""

    uri: str | None
    experiment: str
    run_name: str
    required: bool
    run_id: str | None = None
    """An existing run to continue (``--resume``), else a new one."""

    @classmethod
    def of(cls, tracking: Any, *, run_name: str, run_id: str | None = None) -> RunTarget:
        """The target a config's ``tracking`` section names (:class:`pipeline.config.TrackingConfig`)."""
        return cls(
            uri=tracking.uri,
            experiment=tracking.experiment,
            run_name=run_name,
            required=tracking.required,
            run_id=run_id,
        )


P = TypeVar("P")
R = TypeVar("R")
S = TypeVar("S")
O_co = TypeVar("O_co", covariant=True)


class Job(Protocol[P, R, S, O_co]):
    """A driver, as the steps :func:`execute` calls in order. ``prepare`` opens nothing and takes no
    resources; the others get the open run (``run.tracker``: a NullTracker when tracking is off)."""

    def prepare(self) -> P: ...

    def target(self, prepared: P) -> RunTarget: ...

    def run(self, prepared: P, run: TrackedRun) -> R: ...

    def settle(self, prepared: P, run: TrackedRun, ran: R) -> S: ...

    def publish(self, prepared: P, run: TrackedRun, settled: S) -> O_co: ...


def execute(job: Job[Any, Any, Any, O_co]) -> O_co:
    """prepare -> open the tracking run -> run -> settle -> publish; the run closes with the outcome."""
    from pipeline.tracking.mlflow_tracker import open_tracker

    prepared = job.prepare()
    target = job.target(prepared)
    tracker = open_tracker(
        uri=target.uri,
        experiment=target.experiment,
        run_name=target.run_name,
        required=target.required,
        run_id=target.run_id,
    )
    with TrackedRun(tracker) as run:
        ran = job.run(prepared, run)
        settled = job.settle(prepared, run, ran)
        return job.publish(prepared, run, settled)

"""MLflow, the only module that imports it: one run's logging, opening a tracker, registering models, and
reading results back by tag.

Everything goes through ``MlflowClient`` with an explicit tracking URI and run id, never mlflow's global
"active run", so a library call cannot pick up or end somebody else's run (and no ``MLFLOW_RUN_ID`` leaks).

A run survives worker restarts: the checkpoint stores ``tracker.run_id`` and the restarted rank 0 passes it
back as ``run_id=``. Params already logged with the same value are skipped (MLflow params are immutable) and
metric steps already in the store are skipped, so a re-run epoch is not logged twice.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from pipeline.errors import PipelineError
from pipeline.provenance import flatten_params, redact_uri
from pipeline.tracking.base import NullTracker, Tracker, exit_status

TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
# A healthy local server answers /health in milliseconds; 3 s tolerates a loaded machine without making an
# unreachable server cost minutes (MLflow's own client retries with backoff for ~2 minutes by default).
HEALTH_TIMEOUT_S = 3.0


# MLflow's client retries a failing request 7 times with exponential backoff: ~2 minutes per call to a dead
# server, per epoch. Fail in seconds instead (a user's own setting wins): the tolerant tracker below keeps
# training going and a resumed run back-fills what was missed.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

# What a tracking call raises when the server or its store is unreachable (or answers 5xx).
TRACKING_FAILURES: tuple[type[BaseException], ...] = (MlflowException, OSError)


class TrackingError(PipelineError, ValueError):
    """The tracking server cannot be used; the message names the (redacted) URI and how to fix it."""


class MlflowTracker:
    """One MLflow run in experiment ``experiment`` (created if missing); use as a context manager.

    With ``run_id`` the existing run is continued (set back to RUNNING) instead of a new one created; the
    experiment, run name and ``artifact_location`` are then ignored. ``artifact_location`` only applies when
    the experiment is created (the sqlite store's default is ``./mlruns`` under the current directory).
    """

    def __init__(
        self,
        *,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        tags: Mapping[str, str] | None = None,
        run_id: str | None = None,
        artifact_location: str | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self._client = MlflowClient(tracking_uri)
        # (metric key, step) pairs already in the store when a run is resumed: logging them again is skipped
        self._stored_steps: dict[str, set[int]] = {}
        if run_id is None:
            found = self._client.get_experiment_by_name(experiment)
            if found:
                experiment_id = found.experiment_id
            else:
                experiment_id = self._client.create_experiment(
                    experiment, artifact_location=artifact_location
                )
            run = self._client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
            self._params: dict[str, str] = {}
        else:
            run = self._client.get_run(run_id)
            self._client.update_run(run_id, status="RUNNING")
            if tags:
                self.set_tags(dict(tags))
            self._params = dict(run.data.params)
            for key in run.data.metrics:
                history = self._client.get_metric_history(run_id, key)
                self._stored_steps[key] = {entry.step for entry in history}
        self.run_id: str | None = run.info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log ``params`` flattened to dotted keys (``optim.lr``) with string values.

        Keys already logged with the same value are skipped, so re-logging the config after a resume is
        harmless; a different value raises ``ValueError`` naming the key (MLflow params cannot change).
        """
        new: dict[str, str] = {}
        for key, value in flatten_params(params).items():
            old = self._params.get(key)
            if old is None:
                new[key] = value
            elif old != value:
                raise ValueError(
                    f"param {key!r} was logged as {old!r} in run {self.run_id}, cannot change it to {value!r} "
                    "(MLflow params are immutable: resume with the same config or start a new run)"
                )
        if new:
            self._client.log_batch(self._run(), params=[Param(key, value) for key, value in new.items()])
            self._params.update(new)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self._client.set_tag(self._run(), key, str(value))

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        """Log ``metrics`` at ``step`` (the epoch); a step the run already has for a key is skipped - from
        before a resume, or re-sent after a worker restart - so each (key, step) is logged once, first value
        kept."""
        timestamp = int(time.time() * 1000)
        entries = [
            Metric(key, float(value), timestamp, step)
            for key, value in metrics.items()
            if step not in self._stored_steps.get(key, ())
        ]
        if entries:
            self._client.log_batch(self._run(), metrics=entries)
            for entry in entries:
                self._stored_steps.setdefault(entry.key, set()).add(step)

    def log_history(self, history: Sequence[Mapping[str, float]]) -> int:
        """Log the epochs of ``history`` ({"epoch": e, metric: value, ...}) that the run does not hold yet,
        e.g. those dropped while the server was down; returns how many metric values were added."""
        keys = {key for entry in history for key in entry if key != "epoch"}
        stored = {key: {m.step for m in self._client.get_metric_history(self._run(), key)} for key in keys}
        timestamp = int(time.time() * 1000)
        missing = [
            Metric(key, float(value), timestamp, int(entry["epoch"]))
            for entry in history
            for key, value in entry.items()
            if key != "epoch" and int(entry["epoch"]) not in stored[key]
        ]
        for start in range(0, len(missing), 1000):  # MLflow's log_batch limit
            self._client.log_batch(self._run(), metrics=missing[start : start + 1000])
        return len(missing)

    def log_dataset(self, *, name: str, url: str, digest: str, context: str, profile: dict[str, Any]) -> None:
        """Dataset lineage (``mlflow.log_input``'s record, for a run we hold by id): the UI's Datasets
        column shows ``name`` and ``digest``, with the source URL and ``profile`` (counts) one click away.
        Logging the same dataset again (a resumed run) adds nothing."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(
            name=name,
            digest=digest,
            source_type="s3" if url.startswith("s3://") else "local",
            source=json.dumps({"uri": url}),
            profile=json.dumps(profile),
        )
        self._client.log_inputs(
            self._run(), datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])]
        )

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self._run(), text, artifact_file)

    def log_artifact(self, local_path: str | Path, *, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self._run(), str(local_path), artifact_path)

    def close(self, *, status: str = "FINISHED") -> None:
        """End the run with ``status`` (FINISHED, FAILED or KILLED); a resumed run can be closed again."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"status must be one of {TERMINAL_STATUSES}, got {status!r}")
        self._client.set_terminated(self._run(), status=status)

    def _run(self) -> str:
        assert self.run_id is not None
        return self.run_id

    def __enter__(self) -> MlflowTracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(status=exit_status(exc_type))


class TolerantTracker:
    """A tracker whose failed calls are dropped instead of raised, so that losing the tracking server
    mid-run never stops training (checkpoints do not depend on it). The first failure prints one line
    naming the server and the error; recovery prints another; ``failures`` counts the dropped calls.
    Epoch metrics dropped here are in the checkpoint's history and re-logged by a resumed run."""

    def __init__(self, inner: Tracker, *, where: str) -> None:
        self.inner = inner
        self.where = where
        self.failures = 0
        self._down_since: str | None = None

    @property
    def run_id(self) -> str | None:
        return self.inner.run_id

    @property
    def tracking_uri(self) -> str | None:
        return self.inner.tracking_uri

    def _call(self, what: str, call: Callable[[], None]) -> None:
        try:
            call()
        except TRACKING_FAILURES as error:
            self.failures += 1
            if self._down_since is None:
                self._down_since = what
                reason = (
                    str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
                )
                print(
                    f"tracking: MLflow at {self.where} failed at {what} ({reason}); training goes on and "
                    "checkpoints are unaffected; records are dropped until it answers again (resume the run "
                    "later to back-fill the epoch metrics)",
                    file=sys.stderr,
                    flush=True,
                )
            return
        if self._down_since is not None:
            print(
                f"tracking: MLflow at {self.where} answers again ({self.failures} calls dropped since "
                f"{self._down_since})",
                file=sys.stderr,
                flush=True,
            )
            self._down_since = None

    def log_params(self, params: dict[str, Any]) -> None:
        self._call("log_params", lambda: self.inner.log_params(params))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._call("set_tags", lambda: self.inner.set_tags(tags))

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        self._call(f"epoch {step}'s metrics", lambda: self.inner.log_metrics(metrics, step=step))

    def log_artifact(self, local_path: str, *, artifact_path: str | None = None) -> None:
        self._call(
            f"artifact {Path(local_path).name}",
            lambda: self.inner.log_artifact(local_path, artifact_path=artifact_path),
        )

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call(f"artifact {artifact_file}", lambda: self.inner.log_text(text, artifact_file))

    def log_history(self, history: list[dict[str, float]]) -> int:
        added: list[int] = []
        self._call("back-filling epochs", lambda: added.append(self.inner.log_history(history)))
        return added[0] if added else 0

    def log_dataset(self, *, name: str, url: str, digest: str, context: str, profile: dict[str, Any]) -> None:
        self._call(
            f"dataset {name}",
            lambda: self.inner.log_dataset(
                name=name, url=url, digest=digest, context=context, profile=profile
            ),
        )

    def close(self, *, status: str = "FINISHED") -> None:
        self._call("closing the run", lambda: self.inner.close(status=status))


def default_tracking_uri(root: Path | None = None) -> str:
    """The embedded store ``sqlite:///<root>/.cache/mlflow/mlflow.db`` (root: the current directory).

    Ray workers run in their own working directory: resolve the URI once on the driver and pass it down.
    """
    directory = (root or Path.cwd()).resolve() / ".cache" / "mlflow"
    directory.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{directory / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None) -> str:
    """Explicit ``uri`` > ``MLFLOW_TRACKING_URI`` > the embedded sqlite default."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def check_reachable(uri: str, *, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
    """Raise :class:`TrackingError` unless the http(s) server at ``uri`` answers ``/health``; other schemes
    (sqlite, file, databricks) are not checked."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    health_url = redact_uri(uri).rstrip("/") + "/health"
    request = urllib.request.Request(health_url)
    if parts.username is not None:
        credentials = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise TrackingError(_unreachable_message(uri, f"cannot connect ({reason})")) from None
    if status != 200:
        raise TrackingError(_unreachable_message(uri, f"/health answered HTTP {status}"))


def _unreachable_message(uri: str, problem: str) -> str:
    return (
        f"MLflow tracking server {redact_uri(uri)} is unreachable: {problem}. Start the server "
        "(see infra/), point tracking.uri (or MLFLOW_TRACKING_URI) at a running one, or set "
        "tracking.required=false to train without tracking."
    )


def ensure_reachable(uri: str | None, *, required: bool) -> None:
    """:func:`open_tracker`'s reachability check alone (TrackingError when a required server is down), for
    drivers that must fail before they connect to Ray or take resources."""
    if required and (uri is None or uri.lower() != "none"):
        check_reachable(resolve_tracking_uri(uri))


def open_tracker(
    *,
    uri: str | None,
    experiment: str,
    run_name: str,
    required: bool,
    run_id: str | None = None,
    rank: int = 0,
) -> Tracker:
    """The tracker for this process: :class:`NullTracker` off rank 0 or with ``uri="none"``, else MLflow.

    An unreachable server raises :class:`TrackingError`, or with ``required=False`` warns and returns a
    :class:`NullTracker` so training goes on untracked.
    """
    if rank != 0 or (uri is not None and uri.lower() == "none"):
        return NullTracker()
    resolved = resolve_tracking_uri(uri)
    try:
        check_reachable(resolved)
    except TrackingError as error:
        if required:
            raise
        warnings.warn(f"{error} Continuing without tracking.", RuntimeWarning, stacklevel=2)
        return NullTracker()
    artifact_location = None
    if resolved.startswith("sqlite:///"):  # keep artifacts next to the database, not in ./mlruns
        artifact_location = Path(resolved.removeprefix("sqlite:///")).parent.joinpath("artifacts").as_uri()
    return MlflowTracker(
        tracking_uri=resolved,
        experiment=experiment,
        run_name=run_name,
        run_id=run_id,
        artifact_location=artifact_location,
    )


@dataclasses.dataclass(frozen=True)
class Registration:
    """The outcome of :func:`register_model`."""

    name: str
    version: str
    alias: str
    alias_moved: bool
    """True when ``alias`` now points at ``version``."""
    value: float
    """The new version's run's best ``metric``."""
    previous_version: str | None
    """The version that held ``alias`` before (None if none did)."""
    previous_value: float | None


def register_model(
    tracker_or_run_id: MlflowTracker | str,
    *,
    artifact_path: str,
    name: str,
    alias: str,
    metric: str,
    mode: Literal["max", "min"],
    tracking_uri: str | None = None,
) -> Registration:
    """Register the run's artifact ``artifact_path`` as a new version of model ``name`` and move ``alias``
    to it if no version holds the alias or its run's best ``metric`` beats the holder's (ties keep the holder).

    A run's value is the best over its metric history (``mode``), which is the epoch of the best checkpoint.
    With a run id instead of a tracker, ``tracking_uri`` is resolved as in :func:`resolve_tracking_uri`.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    if isinstance(tracker_or_run_id, MlflowTracker):
        run_id, uri = tracker_or_run_id._run(), tracker_or_run_id.tracking_uri
    else:
        run_id, uri = tracker_or_run_id, resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    value = _best_metric(client, run_id, metric, mode)
    if value is None:
        raise ValueError(f"run {run_id} has no metric {metric!r} to rank model {name!r} by")
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    version = client.create_model_version(name, source, run_id=run_id).version

    previous_version = previous_value = None
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        holder = None
    if holder is not None:
        previous_version = str(holder.version)
        previous_value = _best_metric(client, holder.run_id, metric, mode) if holder.run_id else None
    better = previous_value is None or (value > previous_value if mode == "max" else value < previous_value)
    if better:
        client.set_registered_model_alias(name, alias, version)
    return Registration(
        name=name,
        version=str(version),
        alias=alias,
        alias_moved=better,
        value=value,
        previous_version=previous_version,
        previous_value=previous_value,
    )


def _best_metric(client: MlflowClient, run_id: str, metric: str, mode: str) -> float | None:
    values = [m.value for m in client.get_metric_history(run_id, metric) if not math.isnan(m.value)]
    if not values:
        return None
    return max(values) if mode == "max" else min(values)


def best_metric_by_tag(
    *, tracking_uri: str, tag: str, metric: str, experiments: Sequence[str] | None = None
) -> dict[str, float]:
    """``{tag value: highest final value of metric}`` over the runs that carry both the tag and the metric.

    A run's value is the last one it logged (``run.data.metrics``); runs of all experiments are searched unless
    ``experiments`` names some. Used by the profiler to plot accuracy (``val/top1``) per ``model.arch`` tag.
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


PARENT_TAG = "mlflow.parentRunId"  # what makes MLflow's UI nest a run under another


def child_tracker(
    *, tracking_uri: str, parent_run_id: str, key_tag: str, key: str, run_name: str
) -> MlflowTracker:
    """The child run of ``parent_run_id`` tagged ``key_tag=key``: found if it exists (a restarted or resumed
    trial), else created nested under the parent. One child per key, however often its trial restarts."""
    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    found = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{key_tag}` = '{key}'",
        max_results=2,
    )
    if found:
        return MlflowTracker(
            tracking_uri=tracking_uri, experiment="", run_name=run_name, run_id=found[0].info.run_id
        )
    experiment = client.get_experiment(parent.info.experiment_id).name
    return MlflowTracker(
        tracking_uri=tracking_uri,
        experiment=experiment,
        run_name=run_name,
        tags={PARENT_TAG: parent_run_id, key_tag: key},
    )


def child_runs(tracking_uri: str, parent_run_id: str) -> list[Any]:
    """Every run nested directly under ``parent_run_id``."""
    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    return list(
        _all_pages(
            lambda ids, page_token=None: client.search_runs(
                ids, filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", page_token=page_token
            ),
            [parent.info.experiment_id],
        )
    )


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """``[(step, value)]`` of one metric of a run, by step (the first value where a step repeats)."""
    by_step: dict[int, float] = {}
    for entry in sorted(
        MlflowClient(tracking_uri).get_metric_history(run_id, key), key=lambda m: m.timestamp
    ):
        by_step.setdefault(entry.step, entry.value)
    return sorted(by_step.items())


def download_model(uri: str, dst: Path, *, tracking_uri: str | None = None) -> tuple[Path, dict[str, str]]:
    """Download ``models:/name@alias``, ``models:/name/version`` or ``runs:/<id>/<path>`` into ``dst``.

    Returns the local directory and lineage tags (source model name, version and run). A missing model,
    alias, version or run raises :class:`TrackingError` naming it.
    """
    import mlflow.artifacts

    resolved = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(resolved, registry_uri=resolved)
    try:
        if uri.startswith("models:/"):
            reference = uri.removeprefix("models:/")
            if "@" in reference:
                name, alias = reference.split("@", 1)
                version = client.get_model_version_by_alias(name, alias)
            else:
                name, number = reference.rsplit("/", 1)
                version = client.get_model_version(name, number)
            lineage = {
                "source.model_name": name,
                "source.model_version": str(version.version),
                "source.run_id": version.run_id or "",
            }
            artifact_uri = version.source
        elif uri.startswith("runs:/"):
            lineage = {"source.run_id": uri.removeprefix("runs:/").split("/", 1)[0]}
            artifact_uri = uri
        else:
            raise TrackingError(f"{uri}: not a models:/ or runs:/ URI")
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=artifact_uri, dst_path=str(dst), tracking_uri=resolved, registry_uri=resolved
        )
    except MlflowException as error:
        raise TrackingError(f"{uri} in {redact_uri(resolved)}: {error.message}") from None
    lineage["source.uri"] = uri
    return Path(local), lineage


def tag_model_version(tracking_uri: str, name: str, version: str, tags: Mapping[str, str]) -> None:
    """Set ``tags`` on a registered model version (e.g. the evaluation runs that measured it)."""
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)

"""Ray Train, the only module that imports it: start or join Ray, run a training function on N DDP workers
with per-epoch checkpoints and automatic restarts, and the per-worker glue around ``pipeline.train.fit``.

What Ray Train provides here and is not re-implemented:

* ``TorchTrainer`` + ``ScalingConfig``: one process per rank, the process group (nccl on GPU, gloo on CPU),
  ``prepare_model`` for device placement and DDP;
* ``ray.train.report(metrics, checkpoint)`` every epoch: rank 0 writes the :class:`TrainState` file, Ray
  copies it to ``{storage_path}/{name}/`` (local or ``s3://``) and keeps ``num_to_keep`` of them ranked by
  the monitored metric (the latest is always kept);
* ``FailureConfig(max_failures)``: when a worker dies, Ray restarts the whole group and
  ``ray.train.get_checkpoint()`` hands the last reported checkpoint to the new workers;
* resuming a stopped job = running again with the same ``RunConfig(storage_path, name)``.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import ray.train
import ray.train.torch
import torch

from pipeline.config import CheckpointConfig, ConfigError, ScalingConfig, replace_fields
from pipeline.data.manifest import load_manifest
from pipeline.errors import PipelineError
from pipeline.launch_callbacks import (
    TRACKED_KEY,
    WORKER_ENV,
    DeterministicErrorGuard,
    DeterministicWorkerError,
    TrackingCallback,
)
from pipeline.specs import WorkerSpec
from pipeline.tracking.base import MetricBuffer

if TYPE_CHECKING:
    from pipeline.train.state import TrainState

STATE_FILE = "state.pt"


class LaunchError(PipelineError, RuntimeError):
    """Training failed after Ray exhausted its restarts; the message carries the workers' error."""


@dataclass(frozen=True)
class LaunchResult:
    checkpoint_dir: str | None
    """The latest checkpoint, copied to a new local temporary directory (holds :data:`STATE_FILE`), which the
    caller removes; None when launched with ``fetch_checkpoint=False``."""
    metrics: dict[str, Any]
    """Metrics reported with the latest checkpoint (rank 0's)."""
    run_path: str
    """``{storage_path}/{name}`` where Ray keeps the run's checkpoints."""


# --------------------------------------------------------------------------------------------------------
# Driver side


LOCAL_RUN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
"""Ray Train settings of every run on a local one-node instance; a value already in the environment wins. The
controller polls its workers every 0.5 s instead of 2 s (a run's start and its end each wait for a poll, ~2 s
per run on 2 cores), and skips the preemption watcher, an actor that watches for other nodes being drained (a
one-node instance has none). Ray Train hands these variables from the process that calls ``fit()`` to its
controller. On a cluster, Ray's defaults stay."""


def local_run_env() -> dict[str, str]:
    """:data:`LOCAL_RUN_ENV` when this process drives a local one-node Ray instance (no ``RAY_ADDRESS``, one
    alive node), else nothing."""
    local = not os.environ.get("RAY_ADDRESS") and len([n for n in ray.nodes() if n.get("Alive")]) == 1
    return dict(LOCAL_RUN_ENV) if local else {}


def ensure_ray(scaling: ScalingConfig, *, concurrent: int = 1, trial_drivers: bool = False) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (set for ``ray job submit`` entrypoints) or start a private
    local instance (``address="local"``: a bare ``ray.init()`` would join any cluster on the machine).

    A local instance must fit the workers, or Ray would wait for resources forever: checked first.
    ``trial_drivers``: Tune's trial functions each reserve 0.01 CPU next to their Train workers, so N
    one-CPU workers on N cores would leave the last worker 0.99 CPU short and waiting; the local instance
    then offers one more logical CPU for those idle driver processes.
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=_state_api_env("RAY_ADDRESS", address))
        return
    cpus = os.cpu_count() or 1
    needed = concurrent * scaling.num_workers * scaling.cpus_per_worker
    if needed > cpus:
        runs = f"{concurrent} concurrent runs x " if concurrent > 1 else ""
        raise ConfigError(
            f"scaling.num_workers: {runs}{scaling.num_workers} workers x scaling.cpus_per_worker="
            f"{scaling.cpus_per_worker} need {needed:g} CPUs, this machine has {cpus}; lower them or submit "
            "to a cluster with `ray job submit`"
        )
    if scaling.use_gpu and torch.cuda.device_count() < concurrent * scaling.num_workers:
        raise ConfigError(
            f"scaling.use_gpu: {scaling.num_workers} GPU workers requested, this machine has "
            f"{torch.cuda.device_count()} GPUs; set scaling.use_gpu=false or lower scaling.num_workers"
        )
    from pipeline.ports import free_port

    # The dashboard (on 127.0.0.1 only) serves the state API that Train's placement-group cleaner polls.
    dashboard_port = free_port()
    ray.init(
        address="local",
        num_cpus=cpus + (1 if trial_drivers else 0),
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        log_to_driver=True,
        runtime_env=_state_api_env("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{dashboard_port}"),
    )


def require_cluster_storage(
    locations: dict[str, str], scaling: ScalingConfig, *, concurrent: int = 1, trial_drivers: bool = False
) -> None:
    """Refuse (ConfigError naming the field) a local path that a worker on another node would need.

    Nodes of a real cluster share no disk: a checkpoint written to a local path stays on the GPU node that
    wrote it (the driver on the head then finds none), and a local manifest exists only where it was made.
    Such a path is accepted only when no worker can land elsewhere - one node that fits every worker - or
    when it lies under ``scaling.shared_paths`` (a mount every node has). Runs right after connecting to
    Ray, before any worker, trial or MLflow run is started.
    """
    from pipeline.data import storage

    ensure_ray(scaling, concurrent=concurrent, trial_drivers=trial_drivers)
    reason = _other_nodes_reason(scaling, concurrent=concurrent)
    if reason is None:
        return
    for field_name, url in locations.items():
        local = bool(url) and not storage.backend_for(url).shared_by_cluster
        if local and not storage.under_any(url, scaling.shared_paths):
            raise ConfigError(
                f"{field_name}: {url} is a local path, but {reason}, and nodes do not share this node's disk; "
                "use an s3:// URL (or set PIPELINE_STORAGE_ROOT=s3://... for the default locations), or "
                "declare the shared mount it is on in scaling.shared_paths"
            )


def _other_nodes_reason(scaling: ScalingConfig, *, concurrent: int) -> str | None:
    """Why workers may run on another node than this process (None when they cannot)."""
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) > 1:
        return f"this Ray cluster has {len(nodes)} nodes"
    resources = nodes[0].get("Resources", {}) if nodes else {}
    cpus = concurrent * scaling.num_workers * scaling.cpus_per_worker
    gpus = concurrent * scaling.num_workers if scaling.use_gpu else 0
    if resources.get("CPU", 0) < cpus or resources.get("GPU", 0) < gpus:
        # The autoscaler will add nodes for the workers (the AWS launcher's head has no GPU).
        return (
            f"this node cannot hold the {concurrent * scaling.num_workers} workers, so the cluster adds nodes"
        )
    return None


def _state_api_env(variable: str, value: str) -> dict[str, Any] | None:
    """Tell every worker of this job which cluster Ray's state API should ask.

    Ray Train's placement-group cleaner (an actor) asks the state API whether the controller is alive, with
    no address: with none in its environment Ray scans the machine for GCS processes, and with a second Ray
    instance on the machine (a local stack, another user's job) that fails with "Found multiple active Ray
    instances"; the cleaner dies and every stopped Tune trial keeps its CPUs, so a search stalls (seen).
    Skipped where the submitted job's own runtime env already sets the variable (Ray refuses the clash).
    """
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
    if variable in (job_env.get("env_vars") or {}):
        return None
    return {"env_vars": {variable: value}}


def launch(
    train_fn: Callable[[Any], Any],
    *,
    spec: Any,
    scaling: ScalingConfig,
    checkpoint: CheckpointConfig,
    storage_path: str,
    name: str,
    metric: str,
    mode: str,
    callbacks: list[Any] | None = None,
    tracking: TrackingCallback | None = None,
    datasets: dict[str, Any] | None = None,
    fetch_checkpoint: bool = True,
) -> LaunchResult:
    """Run ``train_fn(spec)`` on ``scaling.num_workers`` DDP workers and wait for it.

    ``spec`` is the typed, frozen spec the workers need (:class:`pipeline.specs.WorkerSpec`); it travels
    bound to the function (Ray pickles both), not as Ray's ``train_loop_config`` dict.

    ``storage_path`` must already be absolute (or ``s3://``): workers do not share the driver's cwd.
    ``callbacks`` are Ray Train user callbacks, e.g. Tune's ``TuneReportCallback`` inside a trial;
    ``tracking`` logs the reported metrics to the run's MLflow record from the driver's side. ``datasets``:
    Ray Datasets split across the workers (``data.backend: ray_data``, :mod:`pipeline.data.ray_ingest`).
    ``fetch_checkpoint``: copy the latest checkpoint to a local directory for the caller (a search's trials
    do not: the driver reads the best trial's state from storage).
    """
    from ray.train import CheckpointConfig as RayCheckpointConfig
    from ray.train import FailureConfig, RunConfig
    from ray.train import ScalingConfig as RayScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    local = scaling.num_workers == 0
    if not local:  # local mode runs in this process: no cluster to start or join
        ensure_ray(scaling)
        for key, value in local_run_env().items():
            os.environ.setdefault(key, value)
    trainer = TorchTrainer(
        functools.partial(train_fn, spec),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=list(datasets)) if datasets else None,
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=RayScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=None
            if local
            else {"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=RayCheckpointConfig(
                num_to_keep=checkpoint.num_to_keep,
                checkpoint_score_attribute=metric,
                checkpoint_score_order=mode,
            ),
            failure_config=FailureConfig(max_failures=checkpoint.max_failures),
            callbacks=[DeterministicErrorGuard(), *([tracking] if tracking else []), *(callbacks or [])],
        ),
    )
    _local_callbacks[:] = [tracking] if local and tracking else []
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        raise LaunchError(_failure_text(error)) from None
    except Exception as error:  # local mode raises the training function's own exception
        if not local:
            raise
        raise LaunchError(f"{type(error).__name__}: {error}") from None
    if result.error is not None:
        raise LaunchError(_failure_text(result.error))
    run_path = str(result.path) if result.path else f"{storage_path.rstrip('/')}/{name}"
    if result.checkpoint is None:
        raise LaunchError(f"training under {run_path} finished without reporting a checkpoint")
    local_dir = None
    if fetch_checkpoint:
        local_dir = tempfile.mkdtemp(prefix="pipeline-ckpt-")
        result.checkpoint.to_directory(local_dir)
    if local:  # Ray kept only a reference to report_epoch's directory (copied above when asked for)
        shutil.rmtree(result.checkpoint.path, ignore_errors=True)
    return LaunchResult(checkpoint_dir=local_dir, metrics=dict(result.metrics or {}), run_path=run_path)


def _failure_text(error: BaseException) -> str:
    """What the job prints for a failed run: the guard's one line (without Ray's "controller error:" header),
    else the workers' error shortened."""
    failure = getattr(error, "controller_failure", None)
    return str(failure) if isinstance(failure, DeterministicWorkerError) else _short_error(error)


def _short_error(error: BaseException) -> str:
    """The workers' error in a few lines instead of Ray's nested traceback wall."""
    text = str(error).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    tail = [line for line in lines if not line.startswith((" ", "Traceback", "File "))][-6:]
    return "\n".join(tail) or type(error).__name__


# --------------------------------------------------------------------------------------------------------
# Worker side


def restore_checkpoint() -> dict[str, Any] | None:
    """The state of the checkpoint Ray hands this worker (after a restart or on resume), else None."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        from pipeline.train.state import load_checkpoint

        return load_checkpoint(Path(directory) / STATE_FILE)


_local_report_dir: list[str] = []
"""Local mode's last reported checkpoint directory: Ray keeps only a reference to it (launch copies it)."""


_local_callbacks: list[Any] = []
"""Local mode calls no Ray Train callbacks: :func:`report_epoch` hands its reports to these itself."""


def report_epoch(
    state: TrainState,
    metrics: dict[str, Any],
    *,
    rank: int,
    tracked: list[tuple[str, int, float]] | None = None,
) -> None:
    """``ray.train.report`` on every rank (it is a barrier); only rank 0 writes the state file. Ray copies
    the directory to storage during the call, so it is removed after; in local mode (no storage, Ray only
    keeps a reference) the newest one stays until :func:`launch` has copied it. ``tracked``: the metric
    points rank 0's loop logged since the last report, for the driver side to log (:data:`TRACKED_KEY`)."""
    from ray.train.v2.api.context import LocalTrainContext

    local = isinstance(ray.train.get_context(), LocalTrainContext)
    epoch = state.epoch - 1
    report = {**metrics, "epoch": epoch}
    if tracked:
        report[TRACKED_KEY] = json.dumps(tracked)  # a string: Tune's loggers choke on nested lists
    directory = tempfile.mkdtemp(prefix="pipeline-report-")
    try:
        checkpoint = None
        if rank == 0:
            from pipeline.train.state import save_checkpoint

            save_checkpoint(state, Path(directory) / STATE_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(report, checkpoint=checkpoint, checkpoint_dir_name=f"epoch-{epoch:04d}")
    finally:
        if not local:
            shutil.rmtree(directory, ignore_errors=True)
    if local:
        while _local_report_dir:
            shutil.rmtree(_local_report_dir.pop(), ignore_errors=True)
        _local_report_dir.append(directory)
        for callback in _local_callbacks:
            callback.after_report(None, [report], None)


def _progress_printer(run_name: str) -> Callable[[str], None]:
    """Rank 0's progress lines, named after the run: in a search, several trials print side by side."""

    def emit(line: str) -> None:
        # Not print(): Ray Train patches it in workers to log through the root logger *and* echo to the
        # redirected stdout, so every line showed twice in `ray job logs`.
        sys.stdout.write(f"[{run_name}] {line}\n")
        sys.stdout.flush()

    return emit


def _quiet_ray_reports() -> None:
    """Ray Train logs every rank's every ``report`` at INFO, as a dict of all ~40 metrics
    ("Reporting training result N: TrainingReport(...)"); the progress lines say what a person needs.
    The logger is named after its file (``logging.getLogger(__file__)`` in Ray 2.60)."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def pretrain_worker(spec: WorkerSpec) -> None:
    """One DDP rank of a pre-training or fine-tuning run (the same loop). No tracking address: what the run
    records travels with its reports."""
    # The training stack (torchvision, the models, the loop) is imported here, in the worker, and not at the
    # module's top: the processes that only launch a run (a search's trial drivers, one per trial) then skip
    # ~1.7 s of imports on 2 cores.
    from pipeline.train.build import build_run, fit_run, replica_digests
    from pipeline.train.loop import unwrap
    from pipeline.train.state import read_state, retarget_state

    os.environ.update(WORKER_ENV)
    os.environ.pop("MLFLOW_RUN_ID", None)  # would make MLflow resume a foreign run
    # Workers never talk to the tracking store (on a cluster it may be a file on the driver's node): any
    # import of mlflow in a worker process now fails at once, naming itself. In local mode the worker is the
    # driver's own process, where mlflow is already imported and stays usable.
    sys.modules.setdefault("mlflow", None)
    _quiet_ray_reports()
    cfg = spec.config
    if cfg.data.multiprocessing_context == "fork" and cfg.data.loader_workers > 0:
        # A Ray actor runs gRPC and gloo threads; forking it can leave a DataLoader worker deadlocked on a
        # lock some thread held at fork time (seen here: rank 1's loader child hung, rank 0 waited forever).
        cfg = replace_fields(cfg, data=replace_fields(cfg.data, multiprocessing_context="forkserver"))
        # The fork server (a fresh, thread-free process) imports torch and the loader once; every epoch's
        # loader workers fork from it instead of importing torch again.
        multiprocessing.set_forkserver_preload(["pipeline.data.loader"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    # Every rank reads the source weights from storage the whole cluster sees (the driver put them there).
    source = read_state(spec.source_url) if spec.source_url else None
    resume = restore_checkpoint()
    if resume is None and spec.start_from is not None:
        start = spec.start_from
        resume = retarget_state(
            read_state(start.state_url),
            lr_factor=cfg.optim.lr / start.lr,
            weight_decay_factor=cfg.optim.weight_decay / start.weight_decay if start.weight_decay else 1.0,
        )
    train_loader = None
    if cfg.data.backend == "ray_data":
        from pipeline.data.ray_ingest import shard_loader

        num_samples = load_manifest(cfg.data.train_manifest).num_samples
        train_loader = shard_loader(cfg.data, num_samples=num_samples, world_size=world_size)
    parts = build_run(
        cfg, rank=rank, world_size=world_size, device=device, source=source, train_loader=train_loader
    )
    model = ray.train.torch.prepare_model(
        parts.model,
        move_to_device=False,
        parallel_strategy_kwargs={"find_unused_parameters": True} if parts.find_unused_parameters else None,
    )
    if cfg.train.compile:
        model = torch.compile(model)
    # Workers never talk to MLflow: rank 0's loop logs into a buffer that each report carries to the
    # driver's side (TrackingCallback in Ray Train's controller, or the search's Tune callback).
    buffer = MetricBuffer() if rank == 0 else None

    def on_epoch_end(state: TrainState, metrics: dict[str, float]) -> None:
        # Every epoch: replicas must be bit-identical, or rank 0's checkpoint is not the model that trained.
        digests = replica_digests(unwrap(model))
        # A string, not a list: Tune's TensorBoard logger warns about list values.
        report_epoch(
            state,
            {**metrics, "param_digests": ",".join(d[:16] for d in digests)},
            rank=rank,
            tracked=buffer.drain() if buffer is not None else None,
        )

    result = fit_run(
        parts,
        cfg,
        device=device,
        model=model,
        tracker=buffer,
        resume=resume,
        on_epoch_end=on_epoch_end,
        progress=_progress_printer(spec.run_name) if rank == 0 else None,
    )
    if not result.history and result.state.history:
        # Restored after its last epoch (killed while that epoch's checkpoint was being registered): nothing
        # trains, so the final epoch's metrics are reported once more. A search would otherwise see this
        # trial end without reporting its objective, and fail it (seen after a killed search was resumed).
        ray.train.report({**result.state.history[-1], "resumed_after_end": 1.0})

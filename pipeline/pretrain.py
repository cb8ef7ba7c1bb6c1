"""The pre-training job's driver: validate, open the MLflow run, launch the DDP workers, then export, plot
and register the best weights.

Order matters: :func:`validate` touches only the config, the model registry and the manifests, so every bad
input (unknown architecture, missing manifest, impossible batch) fails in seconds with a message naming the
field, before Ray is even imported. The MLflow run is created here, on the driver, and its id is passed to
the workers and written beside the checkpoints (``pipeline_run.json``): a restarted worker group and a
``--resume`` both log into the same run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import ConfigError, FinetuneConfig, PretrainConfig, dump_yaml, replace_fields, to_dict
from pipeline.data import storage
from pipeline.data.manifest import Manifest, ManifestError, load_manifest, manifest_url, verify_shards
from pipeline.publish import EXPORT_DIR, EXPORT_WEIGHTS, publish_model

if TYPE_CHECKING:
    from pipeline.lifecycle import RunTarget, TrackedRun

RUN_MARKER = "pipeline_run.json"


@dataclass(frozen=True)
class Validated:
    """What validation learned on the way, reused by the driver."""

    train_manifest: Manifest
    val_manifest: Manifest
    num_classes: int
    arch: str
    """The architecture's full name including scaling (e.g. efficientnet_compound_phi1)."""


@dataclass(frozen=True)
class PretrainOutcome:
    run_name: str
    run_url: str
    """``{checkpoint.storage_path}/{run_name}``: checkpoints, the run marker and the exported model."""
    export_url: str
    """Directory holding ``model.pt`` (state_dict + model config) and ``model_config.json``."""
    epochs_completed: int
    best_epoch: int | None
    best_metric: float | None
    final_metrics: dict[str, Any]
    mlflow_run_id: str | None
    tracking_uri: str | None
    registration: Any | None
    """A :class:`pipeline.tracking.mlflow_tracker.Registration` when the model was registered."""


def ray_datasets(cfg: PretrainConfig) -> dict[str, Any] | None:
    """Ray Train's datasets for data.backend: ray_data (built on the driver), else None."""
    if cfg.data.backend != "ray_data":
        return None
    from pipeline.data.manifest import load_manifest
    from pipeline.data.ray_ingest import datasets_for

    return datasets_for(load_manifest(cfg.data.train_manifest), cfg.data)


def _check_ray_data(cfg: PretrainConfig) -> None:
    """What data.backend: ray_data does not do (pipeline.data.ray_ingest), refused before anything starts."""
    unsupported = {
        "data.oversample": cfg.data.oversample,
        "data.repeated_augment": cfg.data.repeated_augment > 1,
        "data.on_corrupt": cfg.data.on_corrupt == "skip",
        "data.decode": cfg.data.decode == "gpu",
        "scaling.num_workers": cfg.scaling.num_workers == 0,
    }
    for field_name, used in unsupported.items():
        if used:
            raise ConfigError(
                f"{field_name}: not available with data.backend: ray_data (Ray Train workers stream Ray Data "
                "shards; local mode has none); use data.backend: webdataset"
            )


def validate_model(cfg: PretrainConfig) -> str:
    """The architecture's full name; ConfigError for an unknown name, scaling knob or stochastic depth."""
    from pipeline.models import UnknownModelError, get_spec

    try:
        spec = get_spec(cfg.model.name)
    except UnknownModelError as error:
        raise ConfigError(f"model.name: {error}") from None
    try:
        arch = spec.info(**cfg.model.scaling).name
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model.scaling: {error}") from None
    if cfg.model.stochastic_depth is not None and spec.stochastic_depth is None:
        raise ConfigError(
            f"model.stochastic_depth: the {spec.family} family has no residual branches to drop "
            "(no stochastic depth); remove it"
        )
    if cfg.train.sync_batchnorm and not cfg.scaling.use_gpu:
        # torch's SyncBatchNorm has no CPU kernel: every worker would fail at its first forward pass.
        raise ConfigError("train.sync_batchnorm: needs GPU workers (scaling.use_gpu: true); remove it on CPU")
    if cfg.data.backend == "ray_data":
        _check_ray_data(cfg)
    if cfg.data.decode == "gpu" and not cfg.scaling.use_gpu:
        raise ConfigError(
            "data.decode: gpu decodes on the training workers' GPUs (nvJPEG); set scaling.use_gpu: true, "
            "or data.decode: cpu"
        )
    _check_resolution(cfg, arch)
    return arch


def _check_resolution(cfg: PretrainConfig, arch: str) -> None:
    """One forward pass on the meta device (shapes only, no arithmetic, ~0.1 s): an image too small for the
    architecture's downsampling fails here with a clear message, not in every worker after Ray started."""
    import torch

    from pipeline.data.transforms import eval_sizes
    from pipeline.train.build import build_classifier

    # Training's crop and validation's (FixRes) both go through the network: the smaller one must fit.
    crop = eval_sizes(cfg.data).crop
    field, resolution = (
        ("data.eval_crop", crop) if crop < cfg.data.resolution else ("data.resolution", cfg.data.resolution)
    )
    with torch.device("meta"):
        model = build_classifier(cfg.model, num_classes=cfg.model.num_classes or 2).eval()
        try:
            model(torch.empty(1, 3, resolution, resolution))
        except RuntimeError as error:
            raise ConfigError(
                f"{field}: {resolution} px is too small for {arch} ({str(error).splitlines()[0]}); raise it"
            ) from None


def validate(cfg: PretrainConfig) -> Validated:
    """Everything that can be checked without Ray: raises :class:`ConfigError` naming the field."""
    arch = validate_model(cfg)
    manifests = {}
    for field_name in ("train_manifest", "val_manifest"):
        url = getattr(cfg.data, field_name)
        try:
            manifests[field_name] = load_manifest(url)
        except (ManifestError, storage.StorageError, OSError, ValueError) as error:
            raise ConfigError(f"data.{field_name}: {error}") from None
    train, val = manifests["train_manifest"], manifests["val_manifest"]
    if cfg.data.verify_shards != "off":
        for field_name, manifest in manifests.items():
            try:
                verify_shards(manifest, checksum=cfg.data.verify_shards == "checksum")
            except (ManifestError, storage.StorageError, OSError) as error:
                raise ConfigError(f"data.{field_name}: {error}") from None
    if val.classes != train.classes:
        raise ConfigError(
            f"data.val_manifest: its classes differ from the training manifest's ({len(val.classes)} vs "
            f"{len(train.classes)}); shard val with --classes-from the train manifest"
        )
    num_classes = cfg.model.num_classes or train.num_classes
    if num_classes != train.num_classes:
        raise ConfigError(
            f"model.num_classes: {num_classes} but {train.url} has {train.num_classes} classes; "
            "set it to null to follow the manifest"
        )
    if isinstance(cfg, FinetuneConfig) and cfg.finetune.class_weights != "none":
        _check_weighted_classes(train, cfg.finetune.class_weights)
    global_batch = cfg.data.batch_size_per_worker * cfg.scaling.world_size
    if train.num_samples < global_batch:
        raise ConfigError(
            f"data.batch_size_per_worker: {cfg.scaling.world_size} workers x {cfg.data.batch_size_per_worker} "
            f"= {global_batch} exceeds the {train.num_samples} training samples; lower it"
        )
    return Validated(train_manifest=train, val_manifest=val, num_classes=num_classes, arch=arch)


def _check_weighted_classes(train: Manifest, mode: str) -> None:
    """Class weights divide by each class's training count: a class without training samples would fail in
    every worker (metrics.class_weights raises), so it is refused here, naming the classes."""
    empty = [name for name, count in zip(train.classes, train.counts(), strict=True) if count == 0]
    if empty:
        shown = ", ".join(repr(name) for name in empty[:10])
        shown += f" and {len(empty) - 10} more" if len(empty) > 10 else ""
        raise ConfigError(
            f"finetune.class_weights: {mode} needs training samples of every class, but {train.url} has none "
            f"of {shown}; add training images of them, drop them from the class list and reshard, or set "
            "finetune.class_weights=none"
        )


def absolute_storage(path: str) -> str:
    """``s3://`` as is; a local path made absolute, because Ray workers do not run in the driver's cwd."""
    return storage.absolute(path)


def localize(cfg: PretrainConfig) -> PretrainConfig:
    """Absolute local manifest paths: workers do not run in the driver's directory."""
    return replace_fields(
        cfg,
        data=replace_fields(
            cfg.data,
            train_manifest=absolute_storage(cfg.data.train_manifest),
            val_manifest=absolute_storage(cfg.data.val_manifest),
        ),
    )


def _run_exists(storage_path: str, name: str, markers: tuple[str, ...]) -> bool:
    return any(storage.exists(storage.join(storage_path, name, marker)) for marker in markers)


def resolve_run_name(
    storage_path: str,
    base: str,
    *,
    resume: bool,
    markers: tuple[str, ...] = (RUN_MARKER, "checkpoint_manager_snapshot.json"),
) -> str:
    """A new run takes the first free name of ``base``, ``base-2``, ``base-3``...; ``resume`` takes the last
    existing one. Names are deterministic (no timestamps) because resuming means reusing the name."""
    existing = []
    for index in range(1, 10_000):
        name = base if index == 1 else f"{base}-{index}"
        if not _run_exists(storage_path, name, markers):
            break
        existing.append(name)
    if resume:
        if not existing:
            raise ConfigError(
                f"--resume: no run named {base!r} under {storage_path}; check checkpoint.storage_path and "
                "checkpoint.name, or drop --resume to start a new run"
            )
        return existing[-1]
    return base if not existing else f"{base}-{len(existing) + 1}"


def manifest_digest(manifest: Manifest) -> str:
    """sha256 of the manifest file as stored: names the exact shards (each listed with its own sha256)."""
    return hashlib.sha256(storage.read_bytes(manifest_url(manifest.url))).hexdigest()


def log_datasets(tracker: Any, validated: Validated) -> dict[str, str]:
    """Both splits as the run's dataset inputs (MLflow's Datasets column): named after the manifest's
    folder (``imagenet/train``), the manifest's sha256 as digest (first 16 hex digits; the full one is the
    ``dataset.manifest_digest`` tag), its URL and counts. Returns the full digests by context."""
    from pipeline.provenance import redact_uri

    digests = {}
    for context, manifest in (("training", validated.train_manifest), ("validation", validated.val_manifest)):
        digests[context] = manifest_digest(manifest)
        tracker.log_dataset(
            name="/".join(manifest_url(manifest.url).rstrip("/").split("/")[-3:-1]),
            url=redact_uri(manifest_url(manifest.url)),
            digest=digests[context][:16],
            context=context,
            profile={
                "num_samples": manifest.num_samples,
                "num_classes": manifest.num_classes,
                "num_shards": len(manifest.shards),
                "skipped": len(manifest.skipped),
            },
        )
    return digests


def _run_params(cfg: PretrainConfig, validated: Validated) -> dict[str, Any]:
    from pipeline.provenance import redact_uri
    from pipeline.train.optim import scaled_lr

    params = to_dict(cfg)
    if params["tracking"]["uri"]:
        params["tracking"]["uri"] = redact_uri(params["tracking"]["uri"])
    global_batch = cfg.data.batch_size_per_worker * cfg.scaling.world_size
    params["derived"] = {
        "global_batch_size": global_batch,
        "scaled_lr": scaled_lr(cfg.optim, global_batch_size=global_batch),
        "num_classes": validated.num_classes,
        "train_samples": validated.train_manifest.num_samples,
        "val_samples": validated.val_manifest.num_samples,
    }
    return params


def _record_run(tracker: Any, plan: TrainingPlan) -> None:
    """The run's setup in its record: lineage and model tags, dataset inputs, params and the resolved config."""
    if tracker.run_id is None:
        return
    from pipeline.models.profile import count_macs, count_parameters
    from pipeline.provenance import run_tags
    from pipeline.train.build import build_classifier

    cfg, validated = plan.cfg, plan.validated
    model = build_classifier(cfg.model, num_classes=validated.num_classes)
    digests = log_datasets(tracker, validated)
    tags = run_tags(
        cfg.data.train_manifest,
        manifest_digest=digests["training"],
        arch=validated.arch,
        params=count_parameters(model),
        macs=count_macs(model, resolution=cfg.data.resolution),
    )
    tags.update({"pipeline.job": plan.kind, "pipeline.run_url": plan.run_url, "model.family": model.family})
    tracker.set_tags({**tags, **plan.tags})
    tracker.log_params(_run_params(cfg, validated))
    tracker.log_text(dump_yaml(cfg), "config/resolved.yaml")


def _write_marker(run_url: str, run_id: str | None, tracking_uri: str | None, cfg: PretrainConfig) -> None:
    from pipeline.provenance import flatten_params, redact_uri

    storage.makedirs(run_url)
    marker = {
        "mlflow_run_id": run_id,
        "tracking_uri": redact_uri(tracking_uri or ""),
        "config": flatten_params(_comparable(cfg)),
    }
    storage.write_bytes_atomic(storage.join(run_url, RUN_MARKER), json.dumps(marker, indent=2).encode())


def _read_marker(run_url: str) -> dict[str, Any]:
    url = storage.join(run_url, RUN_MARKER)
    return json.loads(storage.read_bytes(url)) if storage.exists(url) else {}


def _comparable(cfg: PretrainConfig) -> dict[str, Any]:
    """The config as resumed runs must repeat it (the tracking URI may carry credentials: not compared)."""
    tree = to_dict(cfg)
    tree["tracking"].pop("uri")
    return tree


def check_resumable(cfg: PretrainConfig, marker: dict[str, Any]) -> None:
    """A resumed run must use the config it started with: the schedule, the data order and the MLflow params
    all derive from it. Raises ConfigError listing the fields that differ."""
    from pipeline.provenance import flatten_params

    before, now = marker.get("config") or {}, flatten_params(_comparable(cfg))
    changed = [
        f"{key} ({before.get(key)} -> {now.get(key)})"
        for key in sorted(set(before) | set(now))
        if before.get(key) != now.get(key)
    ]
    if before and changed:
        raise ConfigError(
            f"--resume: the config differs from the stopped run's in {', '.join(changed)}; resume with the "
            "same recipe and overrides, or drop --resume to start a new run"
        )


def preflight(
    cfg: PretrainConfig, locations: dict[str, str], *, concurrent: int = 1, search: bool = False
) -> None:
    """The last checks before a driver takes cluster resources: a required tracking server answers (checked
    before Ray is imported, so it fails like bad input), then every location in ``locations`` (field ->
    URL) is one the workers' nodes can reach (:func:`pipeline.launch.require_cluster_storage`)."""
    from pipeline.tracking.mlflow_tracker import ensure_reachable

    ensure_reachable(cfg.tracking.uri, required=cfg.tracking.required)
    from pipeline.launch import require_cluster_storage

    require_cluster_storage(locations, cfg.scaling, concurrent=concurrent, trial_drivers=search)


def run_pretrain(cfg: PretrainConfig, *, resume: bool = False) -> PretrainOutcome:
    """Validate, track, train on Ray, export, register. Raises ConfigError for bad input (nothing started),
    ``TrackingError`` for an unreachable required server, ``LaunchError`` when training failed."""
    from pipeline.lifecycle import execute

    return execute(TrainingJob(cfg, resume=resume))


@dataclass(frozen=True)
class TrainingPlan:
    """What :meth:`TrainingJob.prepare` settled before anything started."""

    cfg: PretrainConfig
    """Localized: absolute manifest paths."""
    validated: Validated
    kind: str
    run_name: str
    run_url: str
    storage_path: str
    previous_run_id: str | None
    """The stopped run's MLflow run (``--resume``)."""
    tags: dict[str, str]
    source: dict[str, Any] | None


class TrainingJob:
    """The driver shared by pre-training and fine-tuning (``kind="finetune"``, ``source`` = the exported
    weights to start from, ``tags`` = lineage): one loop, one launcher, one way to track and publish,
    run by :func:`pipeline.lifecycle.execute`."""

    def __init__(
        self,
        cfg: PretrainConfig,
        *,
        resume: bool = False,
        kind: str = "pretrain",
        source: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        self.cfg, self.resume, self.kind, self.source, self.tags = cfg, resume, kind, source, dict(tags or {})

    def prepare(self) -> TrainingPlan:
        validated = validate(self.cfg)
        cfg = localize(self.cfg)
        storage_path = absolute_storage(
            cfg.checkpoint.storage_path or storage.default_location("checkpoints")
        )
        run_name = resolve_run_name(
            storage_path, cfg.checkpoint.name or f"{self.kind}-{cfg.model.name}", resume=self.resume
        )
        run_url = storage.join(storage_path, run_name)
        previous = _read_marker(run_url) if self.resume else {}
        check_resumable(cfg, previous)
        if cfg.scaling.num_workers > 0:  # local mode trains in this process: nothing leaves this machine
            preflight(
                cfg,
                {
                    "data.train_manifest": cfg.data.train_manifest,
                    "data.val_manifest": cfg.data.val_manifest,
                    "checkpoint.storage_path": storage_path,
                },
            )
        return TrainingPlan(
            cfg=cfg,
            validated=validated,
            kind=self.kind,
            run_name=run_name,
            run_url=run_url,
            storage_path=storage_path,
            previous_run_id=previous.get("mlflow_run_id"),
            tags=self.tags,
            source=self.source,
        )

    def target(self, plan: TrainingPlan) -> RunTarget:
        from pipeline.lifecycle import RunTarget

        tracking = plan.cfg.tracking
        return RunTarget.of(
            tracking, run_name=tracking.run_name or plan.run_name, run_id=plan.previous_run_id
        )

    def run(self, plan: TrainingPlan, run: TrackedRun) -> tuple[dict[str, Any], dict[str, Any]]:
        """Train on Ray; returns the last checkpoint's state and the metrics reported with it."""
        from pipeline.launch import STATE_FILE, TrackingCallback, launch, pretrain_worker
        from pipeline.specs import WorkerSpec
        from pipeline.train.state import load_checkpoint

        cfg = plan.cfg
        _record_run(run.tracker, plan)
        _write_marker(plan.run_url, run.run_id, run.tracking_uri, cfg)
        finished = _finished_state(plan) if self.resume else None
        if finished is not None:
            # --resume of a run that trained to the end (e.g. stopped by a tracking outage after training):
            # nothing to train, so no workers are started; settle and publish complete the record.
            print(
                f"[{plan.run_name}] resume: training had finished ({finished['epoch']} epochs); no workers "
                "started, completing the record",
                flush=True,
            )
            history = finished.get("history") or [{}]
            return finished, {k: v for k, v in history[-1].items() if k != "epoch"}
        result = launch(
            pretrain_worker,
            spec=WorkerSpec(config=cfg, run_name=plan.run_name, source_url=_stage_source(plan)),
            scaling=cfg.scaling,
            checkpoint=cfg.checkpoint,
            storage_path=plan.storage_path,
            name=plan.run_name,
            metric=cfg.train.watched_metric,
            mode=cfg.train.early_stopping.mode,
            tracking=TrackingCallback(tracking_uri=run.tracking_uri, run_id=run.run_id)
            if run.run_id is not None
            else None,
            datasets=ray_datasets(cfg),
        )
        assert result.checkpoint_dir is not None
        try:
            return load_checkpoint(Path(result.checkpoint_dir) / STATE_FILE), dict(result.metrics)
        finally:
            shutil.rmtree(result.checkpoint_dir, ignore_errors=True)

    def settle(self, plan: TrainingPlan, run: TrackedRun, ran: tuple[dict, dict]) -> tuple[dict, dict]:
        """Epochs the driver side could not log (server down for a while) are in the state: fill them in."""
        state, _ = ran
        self._tracked(plan, run, state, lambda: run.tracker.log_history(state.get("history", [])))
        return ran

    def publish(self, plan: TrainingPlan, run: TrackedRun, settled: tuple[dict, dict]) -> PretrainOutcome:
        state, metrics = settled
        export_url = storage.join(plan.run_url, EXPORT_DIR)
        registration = self._tracked(
            plan,
            run,
            state,
            lambda: publish_model(
                state, plan.cfg, plan.validated, tracker=run.tracker, export_url=export_url
            ),
        )
        stopper = state["early_stopping"]
        return PretrainOutcome(
            run_name=plan.run_name,
            run_url=plan.run_url,
            export_url=export_url,
            epochs_completed=int(state["epoch"]),
            best_epoch=stopper["best_epoch"],
            best_metric=stopper["best_value"],
            final_metrics=metrics,
            mlflow_run_id=run.run_id,
            tracking_uri=run.tracking_uri,
            registration=registration,
        )

    @staticmethod
    def _tracked(plan: TrainingPlan, run: TrackedRun, state: dict[str, Any], call: Callable[[], Any]) -> Any:
        """``call()``; when the tracking store fails, export the model anyway and raise a TrackingError that
        says nothing is lost and how ``--resume`` completes the record."""
        from pipeline.provenance import redact_uri
        from pipeline.tracking.mlflow_tracker import TRACKING_FAILURES, TrackingError

        try:
            return call()
        except TRACKING_FAILURES as error:
            tracking_uri = run.tracking_uri
            export_url = storage.join(plan.run_url, EXPORT_DIR)
            run.detach()  # the run cannot be closed either; its status stays RUNNING
            publish_model(state, plan.cfg, plan.validated, tracker=run.tracker, export_url=export_url)
            stopper = state["early_stopping"]
            raise TrackingError(
                f"training finished ({int(state['epoch'])} epochs, best {plan.cfg.train.watched_metric} "
                f"{stopper['best_value']}) and nothing is lost: checkpoints in {plan.run_url}, the model "
                f"exported to {export_url}. But MLflow at {redact_uri(tracking_uri or '')} failed "
                f"({str(error).strip().splitlines()[0][:200]}), so the run's record is incomplete and the "
                "model is not registered. Once the server is back, run the same command with --resume: it "
                "trains nothing more, fills in the missing epochs and registers the model."
            ) from None


def _finished_state(plan: TrainingPlan) -> dict[str, Any] | None:
    """The latest checkpoint's state when it says training is over (every epoch run, or early stopping's
    patience spent), else None. Checkpoints are ``{run_url}/epoch-NNNN/state.pt``."""
    from pipeline.launch import STATE_FILE
    from pipeline.train.state import read_state

    try:
        epochs = sorted(name for name in storage.list_names(plan.run_url) if name.startswith("epoch-"))
    except storage.StorageError:
        return None
    for name in reversed(epochs):
        url = storage.join(plan.run_url, name, STATE_FILE)
        if storage.exists(url):
            state = read_state(url)
            stopping = plan.cfg.train.early_stopping
            patience_spent = stopping.enabled and state["early_stopping"]["bad_epochs"] >= stopping.patience
            return state if state["epoch"] >= plan.cfg.train.epochs or patience_spent else None
    return None


SOURCE_DIR = "source"


def _stage_source(plan: TrainingPlan) -> str | None:
    """Fine-tuning: the source weights, which the driver fetched (a registry may be reachable only from
    here), written beside the run's checkpoints, where every worker's node can read them."""
    if plan.source is None:
        return None
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(plan.source, buffer)
    url = storage.join(plan.run_url, SOURCE_DIR, EXPORT_WEIGHTS)
    storage.makedirs(storage.join(plan.run_url, SOURCE_DIR))
    storage.write_bytes_atomic(url, buffer.getvalue())
    return url

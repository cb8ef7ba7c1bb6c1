"""The prediction job's driver: a model's labels for a folder, an S3 prefix or a shard manifest, written as
Parquet or CSV, and where the images carry labels, the model's evaluation in an MLflow run linked to the
model version.

The work is three steps over batches of rows, Ray-free here so one code path serves both ways of running:
read bytes (files, or shard members), decode and preprocess (CPU), predict (the model). With
``replicas >= 1`` :mod:`pipeline.batch_inference` runs them as a Ray Data pipeline across the cluster (CPU
tasks for the first two, an actor pool of model copies for the third); with ``replicas=0`` they run in this
process. The driver fetches the model (only it may reach the registry) and streams the rows to the output.

A file that is not a readable image (zero bytes, truncated, text named .jpg) is a row with an ``error`` and
no label, counted and listed in ``skipped.csv``, never a crash.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config import ConfigError, PredictConfig, to_dict
from pipeline.data import storage
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    import pandas as pd

    from pipeline.lifecycle import RunTarget, TrackedRun
    from pipeline.predictor import Predictor, Preprocessing

NO_LABEL = -1
TOP5 = 5
SKIPPED_FILE = "skipped.csv"
SUMMARY_FILE = "summary.json"
PROGRESS_INTERVAL_S = 10.0
PREVIEW_ROWS = 20


@dataclass(frozen=True)
class Inputs:
    """What to read: files (``rows`` of path + label), or shards (``shards``: URLs of tar files)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    shard_labels: list[int] | None = None
    """Manifest class index -> model class index."""
    labelled: bool = False
    expected: int = 0
    """Images (files, or samples in the shards)."""

    @property
    def description(self) -> str:
        what = f"{len(self.shards)} shards" if self.shards else "files"
        return f"{self.expected} images ({what}{', labelled' if self.labelled else ''})"


@dataclass(frozen=True)
class PredictPlan:
    cfg: PredictConfig
    payload: dict[str, Any]
    lineage: dict[str, str]
    inputs: Inputs
    classes: list[str]
    run_name: str


@dataclass
class PredictOutcome:
    images: int
    predicted: int
    skipped: list[dict[str, str]]
    images_per_s: float
    output: str
    metrics: dict[str, float]
    """The evaluation (empty without labels): eval/top1, eval/top5, eval/balanced_acc, ..."""
    mlflow_run_id: str | None
    tracking_uri: str | None
    preview: list[dict[str, Any]] = field(default_factory=list)
    """The first rows (path, label, score, ...), up to 20."""


# -- Inputs ---------------------------------------------------------------------------------------------


def _is_manifest(url: str) -> bool:
    from pipeline.data.manifest import MANIFEST_NAME

    return url.endswith(".json") or storage.exists(storage.join(url, MANIFEST_NAME))


def _list_files(url: str) -> list[str]:
    if not storage.is_directory(url):
        raise ConfigError(f"input: {url} is not a directory, an s3:// prefix or a manifest.json")
    return storage.list_files(url)


def list_inputs(cfg: PredictConfig, classes: list[str]) -> Inputs:
    """The images ``cfg.input`` names and their labels (model class indexes) where there are any."""
    if _is_manifest(cfg.input):
        from pipeline.data.manifest import ManifestError, load_manifest

        try:
            manifest = load_manifest(cfg.input)
        except ManifestError as error:
            raise ConfigError(f"input: {error}") from None
        labelled = cfg.labels != "none"
        unknown = [name for name in manifest.classes if name not in classes]
        if labelled and unknown:
            raise ConfigError(
                f"input: the manifest's classes {unknown[:5]} are not among the model's {len(classes)} classes; "
                "evaluate on a split of the task it was trained for, or set labels=none"
            )
        mapping = [classes.index(name) if name in classes else NO_LABEL for name in manifest.classes]
        return Inputs(
            shards=manifest.shard_urls(),
            shard_labels=mapping if labelled else None,
            labelled=labelled,
            expected=manifest.num_samples,
        )
    root = cfg.input.rstrip("/")
    files = _list_files(root)
    if not files:
        raise ConfigError(f"input: no files under {cfg.input}")
    relative = [url[len(root) + 1 :] for url in files]
    folders = [rel.split("/")[0] if rel.count("/") == 1 else None for rel in relative]
    by_folder = all(folder in classes for folder in folders)
    if cfg.labels == "folders" and not by_folder:
        bad = next(rel for rel, folder in zip(relative, folders, strict=True) if folder not in classes)
        raise ConfigError(
            f"labels: folders, but {bad} is not in a folder named after one of the model's classes "
            f"({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})"
        )
    labelled = cfg.labels != "none" and by_folder
    rows = [
        {"path": url, "label": classes.index(folder) if labelled else NO_LABEL}
        for url, folder in zip(files, folders, strict=True)
    ]
    return Inputs(rows=rows, labelled=labelled, expected=len(rows))


# -- The three steps, on batches of columns (dict of lists / arrays) ---------------------------------------


def read_files(batch: dict[str, Any]) -> dict[str, Any]:
    """Adds ``image`` (the file's bytes) and ``error`` (why it could not be read, else "")."""
    images, errors = [], []
    for url in batch["path"]:
        try:
            images.append(storage.read_bytes(str(url)))
            errors.append("")
        except (storage.StorageError, OSError) as error:
            images.append(b"")
            errors.append(f"unreadable file ({str(error).strip()[:160]})")
    return {**batch, "image": images, "error": errors}


def shard_rows(shard_url: str, labels: list[int] | None) -> Iterator[dict[str, Any]]:
    """One row per sample of a tar shard: ``path`` = shard key, ``image``, ``label``, ``error``."""
    from pipeline.data.loader import read_samples

    for sample in read_samples([shard_url]):
        label = NO_LABEL if labels is None else labels[int(sample["cls"])]
        yield {
            "path": f"{shard_url}#{sample['__key__']}",
            "image": sample["jpg"],
            "label": label,
            "error": "",
        }


def decode_batch(batch: dict[str, Any], preprocess: Preprocessing) -> dict[str, Any]:
    """Replaces ``image`` with ``pixels`` (uint8 N x 3 x crop x crop; zeros where ``error`` is set)."""
    from pipeline.data.transforms import ImageDecodeError

    pixels = np.zeros((len(batch["path"]), 3, preprocess.crop, preprocess.crop), dtype=np.uint8)
    errors = list(batch["error"])
    for i, data in enumerate(batch["image"]):
        if errors[i]:
            continue
        try:
            pixels[i] = preprocess(bytes(data)).numpy()
        except ImageDecodeError as error:
            errors[i] = str(error)
        except Exception as error:  # a decoder bug must cost one image, not the job: keep the reason
            errors[i] = f"cannot decode ({type(error).__name__}: {str(error)[:120]})"
    out = {key: value for key, value in batch.items() if key != "image"}
    return {**out, "pixels": pixels, "error": errors}


def predict_batch(predictor: Predictor, batch: dict[str, Any], top_k: int) -> dict[str, Any]:
    """Columns ``path``, ``label``, ``score``, ``top_k_labels``, ``top_k_scores``, ``error``, and for
    labelled rows ``true_label``, ``correct``, ``in_top5`` (plus indexes the evaluation counts with)."""
    import torch

    n = len(batch["path"])
    errors = [str(e) for e in batch["error"]]
    good = [i for i in range(n) if not errors[i]]
    labels: list[str | None] = [None] * n
    scores = [float("nan")] * n
    top_labels: list[list[str]] = [[] for _ in range(n)]
    top_scores: list[list[float]] = [[] for _ in range(n)]
    predicted = [NO_LABEL] * n
    in_top5 = [False] * n
    truth = [int(t) for t in batch["label"]]
    if good:
        probabilities = predictor.probabilities(torch.from_numpy(np.asarray(batch["pixels"])[good]))
        ranked_scores, ranked = predictor.ranked(probabilities, max(top_k, TOP5))
        for row, i in enumerate(good):
            indices = ranked[row].tolist()
            predicted[i] = indices[0]
            labels[i] = predictor.classes[indices[0]]
            scores[i] = float(ranked_scores[row, 0])
            top_labels[i] = [predictor.classes[j] for j in indices[:top_k]]
            top_scores[i] = ranked_scores[row, :top_k].tolist()
            in_top5[i] = truth[i] in indices[:TOP5]
    classes = predictor.classes
    return {
        "path": [str(p) for p in batch["path"]],
        "label": labels,
        "score": scores,
        "top_k_labels": top_labels,
        "top_k_scores": top_scores,
        "error": [e or None for e in errors],
        "true_label": [classes[t] if t != NO_LABEL else None for t in truth],
        "true_index": truth,
        "predicted_index": predicted,
        "in_top5": in_top5,
    }


ROW_KEYS = ("path", "image", "label", "error")


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {key: [row[key] for row in rows] for key in ROW_KEYS}


def stream_rows(inputs: Inputs, *, read_batch: int) -> Iterator[dict[str, Any]]:
    """The inputs' rows (``path``, ``image``, ``label``, ``error``) in order, read in this process."""
    if inputs.shards:
        for url in inputs.shards:
            yield from shard_rows(url, inputs.shard_labels)
        return
    for start in range(0, len(inputs.rows), read_batch):
        chunk = inputs.rows[start : start + read_batch]
        batch = read_files({"path": [r["path"] for r in chunk], "label": [r["label"] for r in chunk]})
        for i in range(len(chunk)):
            yield {key: batch[key][i] for key in ROW_KEYS}


def _in_process_batches(plan: PredictPlan) -> Iterator[dict[str, Any]]:
    """The three steps in this process (``replicas=0``): no Ray, the model on this process's device."""
    from pipeline.predictor import Predictor

    predictor = Predictor.from_payload(plan.payload)
    size = plan.cfg.batch_size
    chunk: list[dict[str, Any]] = []
    for row in stream_rows(plan.inputs, read_batch=size):
        chunk.append(row)
        if len(chunk) == size:
            yield predict_batch(
                predictor, decode_batch(_columns(chunk), predictor.preprocess), plan.cfg.top_k
            )
            chunk = []
    if chunk:
        yield predict_batch(predictor, decode_batch(_columns(chunk), predictor.preprocess), plan.cfg.top_k)


def load_images(url: str, preprocess: Preprocessing, *, limit: int) -> tuple[Any, list[dict[str, str]]]:
    """Up to ``limit`` readable images of a folder, S3 prefix or manifest, preprocessed (uint8 tensor
    (N, 3, crop, crop)), and the files skipped on the way (export parity checks use real images)."""
    import torch

    if _is_manifest(url):
        from pipeline.data.manifest import load_manifest

        inputs = Inputs(shards=load_manifest(url).shard_urls())
    else:
        inputs = Inputs(rows=[{"path": path, "label": NO_LABEL} for path in _list_files(url.rstrip("/"))])
    images, skipped = [], []
    for row in stream_rows(inputs, read_batch=1):  # one at a time: no file read past the limit
        decoded = decode_batch(_columns([row]), preprocess)
        if decoded["error"][0]:
            skipped.append({"path": row["path"], "reason": decoded["error"][0]})
            continue
        images.append(torch.from_numpy(decoded["pixels"][0]))
        if len(images) == limit:
            break
    if not images:
        return torch.zeros(0, 3, preprocess.crop, preprocess.crop, dtype=torch.uint8), skipped
    return torch.stack(images), skipped


# -- Results: output files and the evaluation --------------------------------------------------------------

OUTPUT_COLUMNS = ("path", "label", "score", "top_k_labels", "top_k_scores", "error")


class Results:
    """Streams prediction batches to ``part-NNNNN`` files and counts the evaluation as they pass."""

    def __init__(self, cfg: PredictConfig, classes: list[str], *, labelled: bool) -> None:
        import torch

        self.cfg = cfg
        self.classes = classes
        self.labelled = labelled
        self.parts = 0
        self.images = 0
        self.skipped: list[dict[str, str]] = []
        self.confusion = torch.zeros(len(classes), len(classes), dtype=torch.int64)
        self.top5_hits = 0
        self.preview: list[dict[str, Any]] = []
        """The first rows, printed by the summary when the job saw only a few images."""
        storage.makedirs(cfg.output)

    def add(self, batch: dict[str, Any]) -> None:
        import pandas as pd

        frame = pd.DataFrame(batch)
        self.images += len(frame)
        failed = frame["error"].notna()
        self.skipped += [
            {"path": path, "reason": reason}
            for path, reason in zip(frame["path"][failed], frame["error"][failed], strict=True)
        ]
        if self.labelled:
            import torch

            from pipeline.train.metrics import confusion_matrix

            ok = frame[~failed & (frame["true_index"] != NO_LABEL)]
            self.confusion += confusion_matrix(
                torch.tensor(ok["predicted_index"].to_numpy(dtype=np.int64)),
                torch.tensor(ok["true_index"].to_numpy(dtype=np.int64)),
                len(self.classes),
            )
            self.top5_hits += int(ok["in_top5"].sum())
        columns = [*OUTPUT_COLUMNS, "true_label"] if self.labelled else list(OUTPUT_COLUMNS)
        if len(self.preview) < PREVIEW_ROWS:
            self.preview += frame[columns].head(PREVIEW_ROWS - len(self.preview)).to_dict("records")
        self._write(frame[columns])

    def _write(self, frame: pd.DataFrame) -> None:
        import io

        name = f"part-{self.parts:05d}.{self.cfg.format}"
        buffer = io.BytesIO()
        if self.cfg.format == "parquet":
            frame.to_parquet(buffer, index=False)
        else:  # lists as "a|b|c" in CSV cells
            flat = frame.assign(
                top_k_labels=frame["top_k_labels"].map("|".join),
                top_k_scores=frame["top_k_scores"].map(lambda s: "|".join(f"{v:.6g}" for v in s)),
            )
            flat.to_csv(buffer, index=False)
        storage.write_bytes_atomic(storage.join(self.cfg.output, name), buffer.getvalue())
        self.parts += 1

    def evaluation(self) -> dict[str, float]:
        from pipeline.train.metrics import classification_metrics

        total = int(self.confusion.sum())
        if not self.labelled or total == 0:
            return {}
        metrics = {
            "eval/top1": float(self.confusion.diagonal().sum()) / total,
            "eval/top5": self.top5_hits / total,
            "eval/images": float(total),
        }
        metrics.update(
            {f"eval/{k}": v for k, v in classification_metrics(self.confusion, self.classes).items()}
        )
        return metrics


# -- The job -----------------------------------------------------------------------------------------------


class PredictJob:
    """Prediction and evaluation as a :func:`pipeline.lifecycle.execute` job."""

    def __init__(self, cfg: PredictConfig) -> None:
        self.cfg = cfg

    def prepare(self) -> PredictPlan:
        from pipeline.publish import ModelSourceError, fetch_model
        from pipeline.tracking.mlflow_tracker import TrackingError, ensure_reachable, resolve_tracking_uri

        cfg = self.cfg
        ensure_reachable(cfg.tracking.uri, required=cfg.tracking.required)
        tracking_uri = (
            None if (cfg.tracking.uri or "").lower() == "none" else resolve_tracking_uri(cfg.tracking.uri)
        )
        try:
            payload, lineage = fetch_model(cfg.model, tracking_uri=tracking_uri)
        except (ModelSourceError, TrackingError) as error:
            raise ConfigError(f"model: {error}") from None
        classes = list(payload["model_config"]["classes"])
        inputs = list_inputs(cfg, classes)
        if cfg.replicas > 0:
            from pipeline.config import ScalingConfig
            from pipeline.launch import require_cluster_storage

            scaling = ScalingConfig(  # GPUs are checked against the cluster below, naming this job's field
                num_workers=cfg.replicas,
                cpus_per_worker=cfg.cpus_per_replica,
                shared_paths=list(cfg.shared_paths),
            )
            require_cluster_storage({"input": cfg.input}, scaling)
            from pipeline.batch_inference import check_capacity

            check_capacity(cfg.replicas, cfg.cpus_per_replica, cfg.gpus_per_replica)
        name = lineage.get("source.model_name") or payload["model_config"]["name"]
        version = lineage.get("source.model_version")
        run_name = f"{'evaluate' if inputs.labelled else 'predict'}-{name}" + (
            f"-v{version}" if version else ""
        )
        return PredictPlan(cfg, payload, lineage, inputs, classes, run_name)

    def target(self, plan: PredictPlan) -> RunTarget:
        from pipeline.lifecycle import RunTarget

        return RunTarget.of(plan.cfg.tracking, run_name=plan.cfg.tracking.run_name or plan.run_name)

    def run(self, plan: PredictPlan, run: TrackedRun) -> tuple[Results, float]:
        from pipeline.provenance import git_revision, package_versions, redact_uri

        cfg = plan.cfg
        tags = {
            "git.revision": git_revision(),
            "dataset.url": redact_uri(cfg.input),
            "model.arch": plan.payload["model_config"]["name"],
            **{f"version.{package}": version for package, version in package_versions().items()},
        }
        run.tracker.set_tags({**tags, **plan.lineage, "pipeline.job": "predict", "model.uri": cfg.model})
        run.tracker.log_params(
            {k: v for k, v in to_dict(cfg).items() if k not in ("tracking", "shared_paths")}
        )
        print(f"predict: {plan.inputs.description} from {cfg.input} with {cfg.model}", flush=True)
        results = Results(cfg, plan.classes, labelled=plan.inputs.labelled)
        if cfg.replicas == 0:
            batches = _in_process_batches(plan)
        else:
            from pipeline.batch_inference import predict_on_ray

            batches = predict_on_ray(plan)
        start = last = time.perf_counter()
        for batch in batches:
            results.add(batch)
            now = time.perf_counter()
            if now - last >= PROGRESS_INTERVAL_S:
                last = now
                rate = results.images / (now - start)
                print(
                    f"predict: {results.images}/{plan.inputs.expected} images  {rate:.0f} img/s", flush=True
                )
        return results, time.perf_counter() - start

    def settle(self, plan: PredictPlan, run: TrackedRun, ran: tuple[Results, float]) -> tuple[Results, float]:
        return ran

    def publish(self, plan: PredictPlan, run: TrackedRun, settled: tuple[Results, float]) -> PredictOutcome:
        import io
        import tempfile
        from pathlib import Path

        import pandas as pd

        results, seconds = settled
        cfg = plan.cfg
        if results.images == 0:
            raise PipelineError(f"no images were read from {cfg.input}")
        rate = results.images / max(seconds, 1e-9)
        metrics = results.evaluation()
        buffer = io.StringIO()
        pd.DataFrame(results.skipped, columns=["path", "reason"]).to_csv(buffer, index=False)
        storage.write_bytes_atomic(storage.join(cfg.output, SKIPPED_FILE), buffer.getvalue().encode())
        summary = {
            "model": cfg.model,
            "input": cfg.input,
            "images": results.images,
            "predicted": results.images - len(results.skipped),
            "skipped": len(results.skipped),
            "images_per_s": round(rate, 2),
            "parts": results.parts,
            "metrics": metrics,
            "mlflow_run_id": run.run_id,
        }
        storage.write_bytes_atomic(
            storage.join(cfg.output, SUMMARY_FILE), json.dumps(summary, indent=2).encode()
        )
        run.tracker.log_metrics(
            {
                "predict/images": results.images,
                "predict/skipped": len(results.skipped),
                "predict/images_per_s": rate,
                **metrics,
            },
            step=0,
        )
        if results.skipped:
            run.tracker.log_text(buffer.getvalue(), SKIPPED_FILE)
        if metrics and run.run_id is not None:
            from pipeline.train.metrics import plot_confusion_matrix

            with tempfile.TemporaryDirectory(prefix="pipeline-eval-") as scratch:
                figure = plot_confusion_matrix(
                    results.confusion,
                    plan.classes,
                    Path(scratch) / "confusion_matrix.png",
                    title=f"{plan.run_name}: top-1 {metrics['eval/top1']:.3f}, "
                    f"balanced accuracy {metrics['eval/balanced_acc']:.3f}",
                )
                run.tracker.log_artifact(figure, artifact_path="plots")
            name, version = plan.lineage.get("source.model_name"), plan.lineage.get("source.model_version")
            if name and version and run.tracking_uri:
                from pipeline.tracking.mlflow_tracker import tag_model_version

                tag_model_version(
                    run.tracking_uri,
                    name,
                    version,
                    {f"evaluation.{run.run_id}.top1": f"{metrics['eval/top1']:.6f}"},
                )
        return PredictOutcome(
            images=results.images,
            predicted=results.images - len(results.skipped),
            skipped=results.skipped,
            images_per_s=rate,
            output=cfg.output,
            metrics=metrics,
            mlflow_run_id=run.run_id,
            tracking_uri=run.tracking_uri,
            preview=sorted(results.preview, key=lambda row: row["path"]),
        )


def run_predict(cfg: PredictConfig) -> PredictOutcome:
    from pipeline.lifecycle import execute

    return execute(PredictJob(cfg))


def summarize(cfg: PredictConfig, outcome: PredictOutcome) -> None:
    print(
        f"\n=== predict: {outcome.images} images, {outcome.predicted} predicted, {len(outcome.skipped)} skipped ==="
    )
    print(f"{outcome.images_per_s:.1f} img/s; predictions in {outcome.output}")
    if outcome.images <= PREVIEW_ROWS:
        for row in outcome.preview:
            if not isinstance(row.get("error"), str):  # None, or NaN once a column went through pandas
                truth = f"  (true: {row['true_label']})" if row.get("true_label") else ""
                print(f"  image {row['path']}: {row['label']} {row['score']:.3f}{truth}")
    for item in outcome.skipped[:10]:
        print(f"  skipped {item['path']}: {item['reason']}")
    if len(outcome.skipped) > 10:
        print(f"  ... and {len(outcome.skipped) - 10} more (all in {SKIPPED_FILE})")
    if outcome.metrics:
        m = outcome.metrics
        print(
            f"evaluation: top-1 {m['eval/top1']:.4f}  top-5 {m['eval/top5']:.4f}  balanced accuracy "
            f"{m['eval/balanced_acc']:.4f}  macro-F1 {m['eval/macro_f1']:.4f} on {int(m['eval/images'])} images"
        )
    if outcome.mlflow_run_id:
        print(f"MLflow run {outcome.mlflow_run_id} in {outcome.tracking_uri}")
    sys.stdout.flush()

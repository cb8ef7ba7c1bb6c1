"""A trained model as users take it away: exported, packaged as an MLflow model, logged and registered; and
read back from any of those places. Shared by pre-training, fine-tuning, the search and prediction.

Two formats, one directory:

* the **export format**: ``model.pt`` = {"state_dict", "model_config"} (tensors and plain types only: it
  loads with ``torch.load(weights_only=True)``) and ``model_config.json``. ``model_config`` names the
  architecture, the classes and the evaluation preprocessing (resize, crop, mean, std), so the weights are
  usable without this repository's configs. Fine-tuning sources and the experiments' caches use it.
* the **MLflow model** that every registered version is: the same two files plus ``MLmodel`` with a
  ``pytorch`` flavor (``mlflow.pytorch.load_model`` gives the ``nn.Module`` in eval mode) and a
  ``python_function`` flavor served by :mod:`pipeline.predictor` (encoded image bytes in, label, score,
  top-k and per-class probabilities out). Written by :mod:`pipeline.tracking.mlflow_models`.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.data import storage

if TYPE_CHECKING:
    from torch import nn

    from pipeline.config import PretrainConfig
    from pipeline.pretrain import Validated

EXPORT_DIR = "model"
EXPORT_WEIGHTS = "model.pt"
EXPORT_CONFIG = "model_config.json"
CURVES = ("loss", "top1")


class ModelSourceError(ValueError):
    """A model reference that names nothing loadable; the message says what was tried."""


def export_payload(state: dict[str, Any], cfg: PretrainConfig, validated: Validated) -> dict[str, Any]:
    """``{"state_dict", "model_config"}`` of the state's best weights (the model's own when no best)."""
    from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_sizes
    from pipeline.train.build import model_export_config

    weights = state.get("best_model") or state["model"]  # the best epoch's, as restored at the end of fit
    model_config = model_export_config(
        cfg.model,
        num_classes=validated.num_classes,
        classes=validated.train_manifest.classes,
        resolution=cfg.data.resolution,
    )
    sizes = eval_sizes(cfg.data)  # validation's sizes (FixRes: may differ from the training crop)
    model_config["preprocessing"] = {
        "decode": "RGB uint8",
        "resize_short_side": sizes.resize,
        "center_crop": sizes.crop,
        "scale": "1/255",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }
    return {"state_dict": weights, "model_config": model_config}


def write_export(payload: dict[str, Any], directory: Path) -> Path:
    """``model.pt`` and ``model_config.json`` of ``payload`` into ``directory`` (created if missing)."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    torch.save(payload, directory / EXPORT_WEIGHTS)
    (directory / EXPORT_CONFIG).write_text(json.dumps(payload["model_config"], indent=2))
    return directory


def export_model(state: dict[str, Any], cfg: PretrainConfig, validated: Validated, directory: Path) -> Path:
    """The export format of the state's best weights in ``directory``."""
    return write_export(export_payload(state, cfg, validated), directory)


def model_from_payload(payload: dict[str, Any]) -> nn.Module:
    """The architecture ``payload["model_config"]`` names, with its weights, in eval mode, on the CPU."""
    from pipeline.config import ModelConfig
    from pipeline.train.build import build_classifier

    config = payload["model_config"]
    model_cfg = ModelConfig(
        name=config["name"],
        num_classes=config["num_classes"],
        dropout=config["dropout"],
        stochastic_depth=config["stochastic_depth"],
        scaling=config["scaling"],
    )
    model = build_classifier(model_cfg, num_classes=config["num_classes"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def load_weights(data: bytes, where: str) -> Any:
    """A torch file's content, loaded weights-only (no code from a file that may come from anywhere)."""
    import torch

    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated file, a pickle with code, not a torch file at all
        raise ModelSourceError(f"{where} is not a loadable weights file ({error})") from None


def read_payload(data: bytes, where: str) -> dict[str, Any]:
    """A ``model.pt`` file's ``{"state_dict", "model_config"}``, loaded weights-only."""
    payload = load_weights(data, where)
    if not isinstance(payload, dict) or "state_dict" not in payload or "model_config" not in payload:
        raise ModelSourceError(f"{where} holds no exported model (a dict with state_dict and model_config)")
    return payload


def find_export(url: str) -> str | None:
    """The ``model.pt`` that ``url`` names: the file itself, ``url/model.pt`` or ``url/model/model.pt``."""
    for candidate in (url, storage.join(url, EXPORT_WEIGHTS), storage.join(url, EXPORT_DIR, EXPORT_WEIGHTS)):
        if candidate.endswith((".pt", ".pth")) and storage.exists(candidate):
            return candidate
    return None


def fetch_model(uri: str, *, tracking_uri: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    """``(payload, lineage tags)`` of a registered model (``models:/name@alias``, ``models:/name/version``),
    a run's artifact (``runs:/<id>/model``) or an export on disk or S3 (a run directory, its ``model/`` or
    ``model.pt``). Raises :class:`ModelSourceError` (or the tracking layer's TrackingError) naming it."""
    if uri.startswith(("models:/", "runs:/")):
        from pipeline.tracking.mlflow_tracker import download_model

        with tempfile.TemporaryDirectory(prefix="pipeline-model-") as scratch:
            local, lineage = download_model(uri, Path(scratch), tracking_uri=tracking_uri)
            found = find_export(str(local))
            if found is None:
                raise ModelSourceError(
                    f"{uri} holds no {EXPORT_WEIGHTS}: it was not registered by this pipeline"
                )
            return read_payload(Path(found).read_bytes(), uri), lineage
    found = find_export(uri)
    if found is None:
        raise ModelSourceError(
            f"no exported model at {uri} (looked for the file itself, {EXPORT_WEIGHTS} and "
            f"{EXPORT_DIR}/{EXPORT_WEIGHTS} under it); point it at a pre-training run directory, its "
            "model/ directory or model.pt, or a models:/ or runs:/ URI"
        )
    return read_payload(storage.read_bytes(found), found), {"source.uri": uri}


def load_exported(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """``(model in eval mode with the exported weights, model_config)`` from an export directory, its
    ``model.pt``, a registered MLflow model directory, or the same on S3."""
    found = find_export(str(path))
    if found is None:
        raise ModelSourceError(f"no exported model at {path}")
    payload = read_payload(storage.read_bytes(found), found)
    return model_from_payload(payload), payload["model_config"]


def package_model(payload: dict[str, Any], directory: Path) -> Path:
    """``directory`` (which must not exist yet) as an MLflow model holding the export format too."""
    from pipeline.tracking.mlflow_models import save_model

    save_model(
        directory,
        model=model_from_payload(payload),
        classes=list(payload["model_config"]["classes"]),
        weights_file=EXPORT_WEIGHTS,
    )
    return write_export(payload, directory)


def plot_learning_curves(tracking_uri: str, run_id: str, path: Path) -> Path:
    """Train and val loss and top-1 per epoch, read back from the MLflow run (all epochs, across restarts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.tracking.mlflow_tracker import metric_history

    figure, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.6))
    for axis, name in zip(axes, CURVES, strict=True):
        for split in ("train", "val"):
            history = metric_history(tracking_uri, run_id, f"{split}/{name}")
            if history:
                axis.plot(*zip(*history, strict=True), marker="o", label=split)
        axis.set_xlabel("epoch")
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def publish_model(
    state: dict[str, Any], cfg: PretrainConfig, validated: Validated, *, tracker: Any, export_url: str | None
) -> Any | None:
    """Package the state's best weights as an MLflow model, copy it to ``export_url`` (if given) and, when
    ``tracker`` has a run, log it with a learning-curve plot and the best epoch's confusion matrix and
    register it under ``cfg.tracking.register_as``. Returns the Registration or None."""
    with tempfile.TemporaryDirectory(prefix="pipeline-export-") as scratch:
        export_dir = package_model(export_payload(state, cfg, validated), Path(scratch) / EXPORT_DIR)
        files = sorted(p for p in export_dir.rglob("*") if p.is_file())
        if export_url is not None:
            storage.makedirs(export_url)
            for file in files:
                relative = file.relative_to(export_dir).as_posix()
                if "/" in relative:
                    storage.makedirs(storage.join(export_url, relative.rsplit("/", 1)[0]))
                storage.put_file(str(file), storage.join(export_url, relative))
        if tracker.run_id is None:
            return None
        for file in files:
            parent = file.parent.relative_to(export_dir).as_posix()
            tracker.log_artifact(
                file, artifact_path=EXPORT_DIR if parent == "." else f"{EXPORT_DIR}/{parent}"
            )
        plot = plot_learning_curves(
            tracker.tracking_uri, tracker.run_id, Path(scratch) / "learning_curves.png"
        )
        tracker.log_artifact(plot, artifact_path="plots")
        if state.get("best_confusion"):  # the registered weights' evaluation, kept in the checkpoint
            import torch

            from pipeline.train.metrics import classification_metrics, plot_confusion_matrix

            confusion = torch.tensor(state["best_confusion"])
            balanced = classification_metrics(confusion)["balanced_acc"]
            figure = plot_confusion_matrix(
                confusion,
                validated.train_manifest.classes,
                Path(scratch) / "confusion_matrix.png",
                title=f"best epoch, balanced accuracy {balanced:.3f}",
            )
            tracker.log_artifact(figure, artifact_path="plots")
        if not cfg.tracking.register_as:
            return None
        from pipeline.tracking.mlflow_tracker import register_model

        return register_model(
            tracker,
            artifact_path=EXPORT_DIR,
            name=cfg.tracking.register_as,
            alias=cfg.tracking.alias,
            metric=cfg.train.watched_metric,
            mode=cfg.train.early_stopping.mode,
        )

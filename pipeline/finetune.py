"""The fine-tuning job's driver: fetch the pre-trained weights, take the architecture from them, then run the
same driver, launcher and loop as pre-training (``TrainingJob(kind="finetune")``).

Sources (``finetune.source``): a registered model (``models:/name@alias``, ``models:/name/version``), a run's
artifact (``runs:/<id>/model``), an export on disk or S3 (``model.pt``, its directory, or a pre-training run
directory holding ``model/``), or with ``finetune.source_format=torchvision`` a plain torchvision state_dict
file of ``model.name``. Everything loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from pipeline.config import ConfigError, FinetuneConfig, ModelConfig, replace_fields
from pipeline.data import storage
from pipeline.pretrain import PretrainOutcome, TrainingJob


@dataclass(frozen=True)
class Source:
    payload: dict[str, Any]
    """{"state_dict", "model_config"} as exported by pre-training."""
    lineage: dict[str, str]
    """Tags naming where the weights came from (model name, version, run, URI)."""


def fetch_source(cfg: FinetuneConfig, *, tracking_uri: str | None) -> Source:
    """Download or read the source weights; ConfigError naming ``finetune.source`` when they are missing."""
    source = cfg.finetune.source
    if cfg.finetune.source_format == "torchvision":
        if not storage.exists(source):
            raise ConfigError(f"finetune.source: {source} does not exist")
        from pipeline.publish import ModelSourceError, load_weights

        try:
            state_dict = load_weights(storage.read_bytes(source), source)
        except ModelSourceError as error:
            raise ConfigError(f"finetune.source: {error}") from None
        heads = [k for k in state_dict if k.endswith(".weight") and state_dict[k].dim() == 2]
        if cfg.model.name == "source" or not heads:
            raise ConfigError(
                "model.name: a torchvision state_dict does not name its architecture; set model.name"
            )
        payload = {
            "state_dict": state_dict,
            "model_config": {
                "name": cfg.model.name,
                "num_classes": int(state_dict[heads[-1]].shape[0]),
                "dropout": cfg.model.dropout,
                "stochastic_depth": cfg.model.stochastic_depth,
                "scaling": dict(cfg.model.scaling),
            },
        }
        return Source(payload, {"source.uri": source, "source.format": "torchvision"})
    from pipeline.publish import ModelSourceError, fetch_model, find_export
    from pipeline.tracking.mlflow_tracker import TrackingError

    registry = source.startswith(("models:/", "runs:/"))
    if not registry and find_export(source) is None and not storage.exists(source):
        raise ConfigError(f"finetune.source: {source} does not exist; check the path or URI")
    try:
        payload, lineage = fetch_model(source, tracking_uri=tracking_uri)
    except (ModelSourceError, TrackingError) as error:
        raise ConfigError(f"finetune.source: {error}") from None
    return Source(payload, lineage)


def resolve_architecture(cfg: FinetuneConfig, source: Source) -> FinetuneConfig:
    """``model.name: source`` takes the source's architecture; a different explicit one is an error."""
    built = source.payload["model_config"]
    if cfg.model.name not in ("source", built["name"]):
        raise ConfigError(
            f"model.name: {cfg.model.name!r} but the source {cfg.finetune.source} is a {built['name']!r}; set "
            "model.name to it (or to 'source')"
        )
    if cfg.model.name != "source" and cfg.model.scaling and dict(cfg.model.scaling) != dict(built["scaling"]):
        raise ConfigError(
            f"model.scaling: {dict(cfg.model.scaling)} but the source was built with {built['scaling']}"
        )
    model = ModelConfig(
        name=built["name"],
        num_classes=cfg.model.num_classes,
        dropout=cfg.model.dropout if cfg.model.dropout is not None else built["dropout"],
        stochastic_depth=cfg.model.stochastic_depth
        if cfg.model.stochastic_depth is not None
        else built["stochastic_depth"],
        scaling=dict(built["scaling"]),
    )
    return replace_fields(cfg, model=model)


def run_finetune(cfg: FinetuneConfig, *, resume: bool = False) -> PretrainOutcome:
    """Fetch the source, adapt the config, warn about double imbalance correction, train, publish."""
    from pipeline.tracking.mlflow_tracker import resolve_tracking_uri

    tags = {"finetune.strategy": cfg.finetune.strategy, "finetune.class_weights": cfg.finetune.class_weights}
    source = None
    if cfg.finetune.strategy != "scratch":
        uri = None if (cfg.tracking.uri or "").lower() == "none" else resolve_tracking_uri(cfg.tracking.uri)
        fetched = fetch_source(cfg, tracking_uri=uri)
        cfg = resolve_architecture(cfg, fetched)
        source = fetched.payload
        tags.update(fetched.lineage)
    if cfg.data.oversample and cfg.finetune.class_weights != "none":
        message = (
            f"data.oversample=true together with finetune.class_weights={cfg.finetune.class_weights} corrects "
            "the imbalance twice (balanced batches, then weights that favour rare classes again); use one"
        )
        warnings.warn(message, UserWarning, stacklevel=2)
        tags["warning.double_correction"] = "true"
    from pipeline.lifecycle import execute

    return execute(TrainingJob(cfg, resume=resume, kind="finetune", source=source, tags=tags))

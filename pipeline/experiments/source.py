"""The pre-trained source of a fine-tuning experiment: the user's (``source.uri``), or a recipe pre-trained
in-process on the embedded pretrain task and exported exactly as ``jobs/pretrain.py`` exports a model.

The export is cached under ``cache_dir/sources/<hash of the resolved config>/model``: the source takes ~45 s
on 2 cores (toy_resnet20, 8 epochs) and every later run of the experiment, at any seed, reuses it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.config import ConfigError, ExperimentConfig, PretrainConfig, dump_yaml
from pipeline.experiments.data import ExperimentData
from pipeline.experiments.spec import dotted, recipe_config
from pipeline.tracking.base import Tracker


def source_config(cfg: ExperimentConfig, data: ExperimentData) -> PretrainConfig:
    """The source's pre-training config: ``source.recipe`` on the embedded pretrain task plus
    ``source.overrides``, one in-process worker."""
    if data.pretrain_train_manifest is None or data.pretrain_val_manifest is None:
        raise ConfigError(
            "source.uri: is required with data.source=manifests (fine-tune from your own pre-trained model, "
            "e.g. models:/resnet50-imagenet@champion)"
        )
    changes = {
        "data.train_manifest": data.pretrain_train_manifest,
        "data.val_manifest": data.pretrain_val_manifest,
        **dotted(cfg.source.overrides),
        "scaling.num_workers": 1,
    }
    return recipe_config(PretrainConfig, cfg.source.recipe, changes, where="source")


def cached_source_dir(cfg: ExperimentConfig, source_cfg: PretrainConfig) -> Path:
    key = hashlib.sha1(dump_yaml(source_cfg).encode()).hexdigest()[:12]
    return Path(cfg.cache_dir) / "sources" / key / "model"


def ensure_source(
    cfg: ExperimentConfig, data: ExperimentData, *, device: torch.device, open_tracker: Callable[[], Tracker]
) -> tuple[str, bool]:
    """``(finetune.source, trained_now)``: the user's URI, or the cached in-process source, pre-training it
    first when it is not cached (tracked in the run ``open_tracker()`` opens, closed here)."""
    if cfg.source.uri:
        return cfg.source.uri, False
    from pipeline.experiments.arm import train_arm
    from pipeline.pretrain import validate
    from pipeline.provenance import flatten_params
    from pipeline.publish import EXPORT_WEIGHTS, export_model

    source_cfg = source_config(cfg, data)
    directory = cached_source_dir(cfg, source_cfg)
    if (directory / EXPORT_WEIGHTS).is_file():
        return str(directory), False
    validated = validate(source_cfg)
    tracker = open_tracker()
    status = "FAILED"
    try:
        tracker.log_params({"source.recipe": cfg.source.recipe, **flatten_params(source_cfg)})
        trained = train_arm(source_cfg, device=device, tracker=tracker)
        # fit has loaded the best epoch's weights into the model: those are exported.
        weights = {k: v.detach().cpu() for k, v in trained.model.state_dict().items()}
        export_model({"model": weights, "best_model": None}, source_cfg, validated, directory)
        status = "FINISHED"
    finally:
        tracker.close(status=status)
    return str(directory), True

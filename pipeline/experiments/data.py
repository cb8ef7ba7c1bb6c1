"""The data of an experiment: the embedded dataset at the experiment's sizes, generated and sharded once under
``cache_dir/data/toy-<hash of the sizes>`` (later runs and other experiments with the same sizes reuse it), or
the user's own manifests."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ExperimentConfig, ShardConfig, replace_fields, to_dict


@dataclass(frozen=True)
class ExperimentData:
    train_manifest: str
    """The arms' training split."""
    val_manifest: str
    """The arms' validation split."""
    pretrain_train_manifest: str | None = None
    """The embedded pretrain task, on which an in-process fine-tuning source is pre-trained (None: user data)."""
    pretrain_val_manifest: str | None = None


def toy_key(cfg: ExperimentConfig) -> str:
    """Short hash of the embedded data's sizes (root excluded): the cache directory's name."""
    sizes = {k: v for k, v in to_dict(cfg.data.toy).items() if k != "root"}
    return hashlib.sha1(json.dumps(sizes, sort_keys=True).encode()).hexdigest()[:10]


def prepare_data(cfg: ExperimentConfig) -> ExperimentData:
    """Manifests of the arms' data, generating and sharding the embedded dataset if it is not cached yet."""
    if cfg.data.source == "manifests":
        return ExperimentData(cfg.data.train_manifest, cfg.data.val_manifest)
    from pipeline.data.prepare import prepare_embedded

    directory = Path(cfg.cache_dir) / "data" / f"toy-{toy_key(cfg)}"
    toy = replace_fields(cfg.data.toy, root=str(directory / "raw"))
    # One conversion process: this runs next to training on small machines, and the shards are tiny.
    shards = ShardConfig(dest=str(directory / "shards"), samples_per_shard=500, workers=1)
    manifests = prepare_embedded(toy, shards).manifests
    task = manifests[cfg.data.task]
    return ExperimentData(
        train_manifest=task["train"],
        val_manifest=task["val"],
        pretrain_train_manifest=manifests["pretrain"]["train"],
        pretrain_val_manifest=manifests["pretrain"]["val"],
    )

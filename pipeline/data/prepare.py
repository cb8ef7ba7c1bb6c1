"""Turn the embedded dataset into shards: the data preparation shared by the demo, recipes and tests."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import ShardConfig, ToyConfig
from pipeline.data import storage
from pipeline.data.shards import ShardOptions, ShardSummary, write_shards
from pipeline.data.toy import generate

TASKS = ("pretrain", "downstream")
SPLITS = ("train", "val")


@dataclass(frozen=True)
class EmbeddedShards:
    """Manifest URLs of every task and split, plus what writing them reported."""

    manifests: dict[str, dict[str, str]]
    """manifests[task][split] -> URL of manifest.json."""
    summaries: list[ShardSummary]


def prepare_embedded(toy: ToyConfig, shards: ShardConfig, *, progress: bool = False) -> EmbeddedShards:
    """Generate the embedded dataset (skipped if already there) and shard every task and split into
    ``shards.dest/<task>/<split>``. Val uses train's class list so indices agree even if a class were
    missing from val. Reruns reuse unchanged shards."""
    dataset = generate(toy)
    manifests: dict[str, dict[str, str]] = {}
    summaries = []
    for task in TASKS:
        manifests[task] = {}
        for split in SPLITS:
            dest = storage.join(shards.dest, task, split)
            options = ShardOptions(
                samples_per_shard=shards.samples_per_shard,
                seed=toy.seed,
                workers=shards.workers,
                classes_from=manifests[task]["train"] if split == "val" else None,
            )
            summary = write_shards(dataset.split_dir(task, split), dest, options, progress=progress)
            manifests[task][split] = summary.manifest.url
            summaries.append(summary)
    return EmbeddedShards(manifests=manifests, summaries=summaries)

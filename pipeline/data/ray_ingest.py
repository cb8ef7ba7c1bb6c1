"""Ray Data ingest for training (``data.backend: ray_data``): the training split's shards read, decoded and
augmented by Ray Data CPU tasks, which may run on any node with CPUs (CPU-only nodes included), and streamed
to each training worker through Ray Train's dataset shards.

For clusters whose GPU nodes have too few cores to decode at the GPUs' pace: the decoding moves to other
nodes instead of to the GPU (``data.decode: gpu``). The webdataset loader (:mod:`pipeline.data.loader`) stays
the default: it needs no spare CPUs and keeps shuffling and augmentation reproducible from ``data.seed``.

* **Driver side** (:func:`training_dataset`): one read task per shard (the project's tar reader, local or
  s3://), then ``map_batches`` of decode + the training transform into uint8 ``image`` [n, 3, R, R] and
  int64 ``label`` columns, in CPU tasks of their own (``num_cpus=1``, so Ray Data does not fuse them into
  the training workers' processes). Ray Train splits it across the workers with ``streaming_split(equal=True)``
  (``ray.train.DataConfig``): every rank receives the same number of rows.
* **Worker side** (:class:`RayDataLoader`): the loader interface ``fit`` uses (``set_epoch``, ``len``,
  ``skipped``) over the rank's shard: exactly ``num_samples // (world_size * batch)`` full batches per epoch
  on every rank, the contract the webdataset loader keeps, since equal rows per rank give equal counts of
  full batches. Each epoch iterates the shard again, which re-runs the pipeline with a new block order and
  new augmentation draws; a local shuffle buffer mixes samples across shards.
* Evaluation does not go through Ray Data: each rank reads its validation shards with the webdataset loader,
  which covers every sample exactly once (``streaming_split(equal=True)`` would drop the remainder).

Not offered with this backend (refused when the config is validated): oversampling, repeated augmentation,
``data.on_corrupt: skip`` and ``data.decode: gpu``. A corrupt sample fails the run with the loader's
``LoaderError`` naming it, as on the default backend. Randomness comes from Ray Data's task scheduling, so a
run is not bit-reproducible from ``data.seed``.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray
import ray.data
import torch

from pipeline.config import DataConfig
from pipeline.data import transforms
from pipeline.data.loader import Batch, LoaderError, read_samples
from pipeline.data.manifest import Manifest

DATASET = "train"
"""The name of the training dataset in Ray Train's ``datasets`` and ``get_dataset_shard``."""
DECODE_BATCH = 32
"""Samples per decode task call: enough to amortize a call, few enough to spread an epoch over the nodes."""
DECODE_MEMORY_BYTES = 640 * 2**20
"""Logical memory per decode task: a task process with torch and a batch in flight peaks near 570 MiB
(Ray Data's own measurement); requesting less draws its out-of-memory warning."""


def _shard_samples(row: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for sample in read_samples([row["shard"]]):
        name = f"{sample['__url__']}#{sample['__key__']}"
        yield {"jpg": sample["jpg"], "cls": int(sample["cls"]), "name": name}


@functools.cache
def _train_transform(cfg: DataConfig) -> Any:
    """Built once per task process (DataConfig is frozen, so hashable)."""
    return transforms.train_transform(
        cfg.resolution,
        augment=cfg.augment,
        min_crop_scale=cfg.min_crop_scale,
        randaugment_magnitude=cfg.randaugment_magnitude,
        random_erasing=cfg.random_erasing,
    )


def _decode_augment(batch: dict[str, np.ndarray], cfg: DataConfig) -> dict[str, np.ndarray]:
    """Decode + the training transform of one batch of samples, in a Ray Data task."""
    torch.set_num_threads(1)  # one core per task: Ray Data runs as many tasks as there are CPUs
    transform = _train_transform(cfg)
    images = np.empty((len(batch["jpg"]), 3, cfg.resolution, cfg.resolution), dtype=np.uint8)
    for i, (jpeg, name) in enumerate(zip(batch["jpg"], batch["name"], strict=True)):
        try:
            image = transforms.decode(bytes(jpeg))
        except RuntimeError as error:
            raise LoaderError(f"cannot decode sample {name}: {transforms.decoder_message(error)}") from None
        images[i] = transform(image).numpy()
    return {"image": images, "label": np.asarray(batch["cls"], dtype=np.int64)}


def training_dataset(manifest: Manifest, cfg: DataConfig) -> ray.data.Dataset:
    """The training split as a Ray Dataset of augmented ``image``/``label`` rows (see the module docstring)."""
    urls = manifest.shard_urls()
    dataset = ray.data.from_items([{"shard": url} for url in urls], override_num_blocks=len(urls))
    return (
        dataset.randomize_block_order()
        .flat_map(_shard_samples)
        .map_batches(
            _decode_augment,
            fn_kwargs={"cfg": cfg},
            batch_size=DECODE_BATCH,
            batch_format="numpy",
            num_cpus=1,
            memory=DECODE_MEMORY_BYTES,
        )
    )


def datasets_for(manifest: Manifest, cfg: DataConfig) -> dict[str, ray.data.Dataset]:
    """Ray Train's ``datasets`` for a run with ``data.backend: ray_data``."""
    context = ray.data.DataContext.get_current()
    # One line per epoch is the job's to print; Ray Data's progress bars are for a person at a terminal.
    context.print_on_execution_start = False
    context.enable_progress_bars = sys.stdout.isatty()
    return {DATASET: training_dataset(manifest, cfg)}


class RayDataLoader:
    """One rank's training batches from its Ray Data shard, with the webdataset loader's batch contract."""

    def __init__(self, shard: Any, cfg: DataConfig, *, num_samples: int, world_size: int) -> None:
        self.shard = shard
        self.batch_size = cfg.batch_size_per_worker
        self.num_batches = num_samples // (world_size * self.batch_size)
        if self.num_batches == 0:
            raise LoaderError(
                f"{num_samples} samples are fewer than one global batch ({world_size} workers x "
                f"data.batch_size_per_worker={self.batch_size}); lower the batch size"
            )
        self.shuffle_buffer = min(cfg.shuffle_buffer, self.num_batches * self.batch_size)
        self.epoch = 0
        self.skipped = 0  # corrupt samples are not skipped on this backend (refused at validation)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        count = 0
        batches = self.shard.iter_torch_batches(
            batch_size=self.batch_size,
            drop_last=True,
            local_shuffle_buffer_size=self.shuffle_buffer,
            dtypes={"image": torch.uint8, "label": torch.int64},
            device="cpu",  # normalize() moves uint8 to the device: 4x less traffic than float
        )
        for batch in batches:
            count += 1
            yield batch["image"], batch["label"]
            if count == self.num_batches:
                break
        if count != self.num_batches:
            raise LoaderError(f"the Ray Data shard gave {count} batches, planned {self.num_batches}")


def shard_loader(cfg: DataConfig, *, num_samples: int, world_size: int) -> RayDataLoader:
    """In a Ray Train worker: this rank's training loader over its shard of the training dataset."""
    import ray.train

    return RayDataLoader(
        ray.train.get_dataset_shard(DATASET), cfg, num_samples=num_samples, world_size=world_size
    )

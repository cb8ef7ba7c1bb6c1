"""Streaming batches from WebDataset shards (local or s3://) for one rank of a DDP job.

The contract the training loop relies on:

* **Training: every rank yields exactly ``num_batches`` batches per epoch**, whatever the shard sizes. DDP
  all-reduces gradients every step, so one rank with a batch more than the others hangs the job at epoch
  end (facts.md: 5 vs 3 batches timed out). ``num_batches = num_samples // (world_size * batch_size)``,
  i.e. one epoch sees (almost) every sample once in expectation. Each loader slot (rank x DataLoader
  worker) streams its share of shards, cycling into a reshuffled next pass when its shards run short, and
  stops at its exact quota of batches.
* **Shard order changes every epoch** (seed + epoch; every k epochs with repeated augmentation, below):
  webdataset's own ``shardshuffle`` repeats the same order every epoch, so the shuffling of the shard list
  is done here. Samples are shuffled in a buffer.
* **Evaluation covers every sample exactly once across ranks**: no shuffle, no cycling, no padding, and
  the last batch of each slot may be short. Ranks may therefore differ in batch count (``num_batches`` is
  per rank); the evaluation loop must not run collectives per step, only one all-reduce of its sums at
  the end. ``num_samples`` is this rank's exact share.
* Shards are split between slots when there are at least as many shards as slots; otherwise (tiny data,
  many workers) every slot reads all shards and keeps every n-th sample, which is exact but reads more.
* Class-balanced **oversampling** (with replacement): each sample is repeated floor(r) or ceil(r) times
  with r = N / (C * n_class), so classes become equally frequent in expectation and the epoch length stays
  N. Copies are augmented independently because decoding happens after the repeat.
* **Repeated augmentation** (k = ``data.repeated_augment`` > 1; Hoffer et al. 2020, torchvision's
  RASampler): each slot's stream is the round-robin of k *group streams*, copy c coming from the group
  stream that rank (rank - c) mod world_size reads at k=1 (same worker index). A group stream is a pure
  function of (seed, epoch, group), so every rank that takes it sees the same samples in the same order:
  sample m of group g lands at position m*k + c on rank g + c (mod world_size), for c = 0..k-1. That is
  RASampler's layout: the k copies go to k different ranks when k <= world_size (else some share a rank and
  sit next to each other in one batch), at the same step when k divides the batch size, each augmented by
  its own slot's RNG. Every sample of an epoch thus comes in exactly k copies, except the last one of a slot
  when k does not divide its quota of samples, and a multiple of k when a group stream wraps into its next
  pass and meets a shard another group read (uneven shards, as at k=1). The batch count per rank is
  unchanged, so an epoch takes 1/k of each group stream, ~N/k distinct samples: epoch e reads part
  (e mod k) of streams seeded by (seed, e // k), so k consecutive epochs sweep every sample about once (the
  shuffle buffer's read-ahead makes neighbouring epochs overlap by a few percent), where RASampler draws a
  fresh random 1/k each epoch. Whole shards in the skipped parts are not opened. Each slot holds k shuffle
  buffers of shuffle_buffer / k samples (memory unchanged) and reads as many samples as at k=1 (each group
  stream is read by k ranks, 1/k of it per epoch). Evaluation is never repeated.

Batches are ``(images uint8 [B, 3, R, R], labels int64 [B])``, R = ``data.resolution`` in training and the
evaluation crop (``transforms.eval_sizes``, FixRes) in evaluation; normalize on the device with
``pipeline.data.transforms.normalize``.
"""

from __future__ import annotations

import collections
import itertools
import math
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import DataConfig
from pipeline.data import storage, transforms
from pipeline.data.manifest import Manifest


class LoaderError(ValueError):
    """The data cannot feed the requested configuration (e.g. fewer samples than one global batch)."""


@dataclass(frozen=True)
class SlotPlan:
    """Which shards a loader slot reads in one pass, and which of their samples it keeps."""

    shard_indices: list[int]
    keep_every: int
    """1 when the slot owns whole shards; n_slots when it keeps sample j iff j % n_slots == keep_offset."""
    keep_offset: int


def plan_slot(shard_order: list[int], *, slot: int, n_slots: int) -> SlotPlan:
    if len(shard_order) >= n_slots:
        return SlotPlan(shard_order[slot::n_slots], 1, 0)
    return SlotPlan(list(shard_order), n_slots, slot)


def plan_length(plan: SlotPlan, shard_sizes: list[int]) -> int:
    """Number of samples a slot gets from one pass of ``plan`` (shard_sizes: samples per shard)."""
    if plan.keep_every == 1:
        return sum(shard_sizes[i] for i in plan.shard_indices)
    return len(range(plan.keep_offset, sum(shard_sizes), plan.keep_every))


def slot_sample_count(manifest: Manifest, *, slot: int, n_slots: int) -> int:
    """Exact number of samples a slot sees in one unshuffled pass (used for evaluation counts)."""
    plan = plan_slot(list(range(len(manifest.shards))), slot=slot, n_slots=n_slots)
    return plan_length(plan, [shard.num_samples for shard in manifest.shards])


def split_quota(total: int, parts: int, index: int) -> int:
    """Share ``index`` of ``total`` items dealt as evenly as possible over ``parts``."""
    return total // parts + (1 if index < total % parts else 0)


def repeat_factors(manifest: Manifest) -> list[float]:
    """Per-class repeat factor N / (C * n_c) that makes classes equally frequent at unchanged epoch length."""
    counts = manifest.counts()
    present = sum(1 for n in counts if n > 0)
    return [manifest.num_samples / (present * n) if n > 0 else 0.0 for n in counts]


LOADER_TIMEOUT_S = 600


def _seed(*parts: int) -> int:
    """A stable integer seed from parts (Python's hash of tuples is salted per process for str, not int,
    but spelling it out keeps the stream identical across Python versions)."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part)) % (2**63)
    return value


def read_samples(urls: list[str]) -> Iterator[dict]:
    """Raw samples (dicts of bytes) from tar shards, in order, via webdataset's tar iterators."""
    for backend in {storage.backend_for(u) for u in urls}:
        # Re-registered here because spawn/forkserver workers do not inherit the parent's registration.
        backend.register_webdataset_opener()
    opened = wds.tariterators.url_opener({"url": u} for u in urls)
    yield from wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander(opened))


def _stack(images: list[torch.Tensor], *, shared: bool) -> torch.Tensor:
    """Stack a batch; in a DataLoader worker, directly into shared memory. Sending a tensor to the main
    process otherwise copies it into a new shared segment first (9.6 MB per 64x224x224 uint8 batch)."""
    if not shared:
        return torch.stack(images)
    out = torch.empty((len(images), *images[0].shape), dtype=images[0].dtype).share_memory_()
    return torch.stack(images, out=out)


class _SlotStream(IterableDataset):
    """The per-epoch stream of one rank; DataLoader workers each take their slot of it."""

    def __init__(
        self,
        *,
        manifest: Manifest,
        cfg: DataConfig,
        train: bool,
        rank: int,
        world_size: int,
        epoch: int,
        batches_per_rank: int,
    ) -> None:
        super().__init__()
        self.urls = manifest.shard_urls()
        self.shard_sizes = [shard.num_samples for shard in manifest.shards]
        self.cfg = cfg
        self.train = train
        self.rank = rank
        self.world_size = world_size
        self.epoch = epoch
        self.batches_per_rank = batches_per_rank
        self.factors = repeat_factors(manifest) if (train and cfg.oversample) else None
        self.transform = (
            transforms.train_transform(
                cfg.resolution,
                augment=cfg.augment,
                min_crop_scale=cfg.min_crop_scale,
                randaugment_magnitude=cfg.randaugment_magnitude,
                random_erasing=cfg.random_erasing,
            )
            if train
            else transforms.eval_transform(transforms.eval_sizes(cfg))
        )

    def _pass(self, plan: SlotPlan, *, skip: int = 0) -> Iterator[dict]:
        """The plan's samples in order, less the first ``skip``."""
        shard_indices = plan.shard_indices
        if plan.keep_every == 1:
            while shard_indices and self.shard_sizes[shard_indices[0]] <= skip:
                skip -= self.shard_sizes[shard_indices[0]]  # a whole shard skipped is never opened
                shard_indices = shard_indices[1:]
        samples = read_samples([self.urls[i] for i in shard_indices])
        kept = (s for j, s in enumerate(samples) if j % plan.keep_every == plan.keep_offset)
        yield from itertools.islice(kept, skip, None)

    def _train_samples(self, group: int, n_groups: int, rng: random.Random, *, skip: int) -> Iterator[dict]:
        """Endless raw samples of one group (the slot itself at k=1), passes of shards seeded by
        (seed, epoch // k, pass), from the ``skip``-th on."""
        cycle = self.epoch // self.cfg.repeated_augment
        for pass_index in range(1_000_000):
            order = list(range(len(self.urls)))
            # Same order on every slot (the seed has no slot in it), so slots partition the shards.
            random.Random(_seed(self.cfg.seed, cycle, pass_index)).shuffle(order)
            plan = plan_slot(order, slot=group, n_slots=n_groups)
            length = plan_length(plan, self.shard_sizes)
            if 0 < length <= skip:
                skip -= length
                continue
            produced = 0
            for sample in self._pass(plan, skip=skip):
                produced += 1
                if self.factors is None:
                    yield sample
                    continue
                r = self.factors[int(sample["cls"])]
                for _ in range(int(r) + (rng.random() < r - int(r))):
                    yield sample
            skip = 0
            if produced == 0:
                raise LoaderError(
                    f"loader slot {group} of {n_groups} got no samples from {len(self.urls)} shards"
                )
        raise AssertionError("unreachable: the consumer stops at its batch quota")

    def _group_stream(self, group: int, n_groups: int, *, buffer: int, skip: int) -> Iterator[dict]:
        """One group's shuffled stream: the same on every rank that reads it (no rank in any seed)."""
        rng = random.Random(_seed(self.cfg.seed, self.epoch, group, 1))
        return wds.filters.shuffle(buffer, initial=buffer, rng=rng)(
            self._train_samples(group, n_groups, rng, skip=skip)
        )

    def _decode(self, sample: dict) -> tuple[torch.Tensor, int]:
        try:
            image = transforms.decode(sample["jpg"])
            label = int(sample["cls"])
        except Exception as err:  # a corrupt member: name it instead of a bare decoder traceback
            raise LoaderError(
                f"cannot decode sample {sample.get('__key__')} in {sample.get('__url__')}: {err}"
            ) from err
        return self.transform(image), label

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slot, n_slots = self.rank * num_workers + worker, self.world_size * num_workers
        batch_size = self.cfg.batch_size_per_worker
        if self.train:
            quota = split_quota(self.batches_per_rank, num_workers, worker)
            if quota == 0:
                return
            torch.manual_seed(_seed(self.cfg.seed, self.epoch, slot, 2))  # augmentation randomness
            # Repeated augmentation (module docstring): copy c comes from rank (rank - c)'s group stream.
            # At k=1 the one group is this slot and the stream is the plain per-slot stream.
            k = self.cfg.repeated_augment
            groups = [((self.rank - c) % self.world_size) * num_workers + worker for c in range(k)]
            per_stream = -(-quota * batch_size // k)  # samples this slot takes from each group stream
            # The buffer's content at the quota is read but never used, so a buffer as large as the quota
            # doubles the reads (measured: 1,652 samples read for 1,152 used at buffer 500). A quarter of
            # the slot's epoch bounds that waste at 25%; the per-epoch shard shuffle supplies the rest of
            # the randomness. ImageNet slots read ~20k samples an epoch, so the configured buffer applies.
            # With k streams each gets 1/k of the buffer: the same memory as k=1.
            buffer = max(1, min(self.cfg.shuffle_buffer // k, per_stream // 4))
            skip = (self.epoch % k) * per_stream  # this epoch's part of the streams (0 at k=1)
            copies = collections.Counter(groups)  # k > world size: a group taken twice by this slot
            teed = {
                group: iter(itertools.tee(self._group_stream(group, n_slots, buffer=buffer, skip=skip), n))
                for group, n in copies.items()
            }
            per_copy = [next(teed[group]) for group in groups]  # round-robin over the copies:
            samples = (sample for row in zip(*per_copy, strict=True) for sample in row)
        else:
            quota = None
            samples = self._pass(plan_slot(list(range(len(self.urls))), slot=slot, n_slots=n_slots))
        produced = 0
        images, labels = [], []
        for sample in samples:
            image, label = self._decode(sample)
            images.append(image)
            labels.append(label)
            if len(images) == batch_size:
                yield _stack(images, shared=info is not None), torch.tensor(labels, dtype=torch.int64)
                images, labels = [], []
                produced += 1
                if produced == quota:
                    return
        if images and not self.train:
            yield _stack(images, shared=info is not None), torch.tensor(labels, dtype=torch.int64)


class ShardLoader:
    """Batches of one split for one rank. Re-iterable; call ``set_epoch`` before each training epoch."""

    def __init__(
        self, manifest: Manifest, cfg: DataConfig, *, train: bool, rank: int = 0, world_size: int = 1
    ) -> None:
        if not 0 <= rank < world_size:
            raise LoaderError(f"rank {rank} is outside world size {world_size}")
        self.manifest = manifest
        self.cfg = cfg
        self.train = train
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        batch = cfg.batch_size_per_worker
        self.num_workers = cfg.loader_workers
        if train:
            self.num_batches = manifest.num_samples // (world_size * batch)
            if self.num_batches == 0:
                raise LoaderError(
                    f"{manifest.url}: {manifest.num_samples} samples are fewer than one global batch "
                    f"({world_size} workers x data.batch_size_per_worker={batch}); lower the batch size"
                )
            self.num_samples = self.num_batches * batch
        else:
            n_slots = world_size * max(1, self.num_workers)
            workers = range(max(1, self.num_workers))
            counts = [
                slot_sample_count(manifest, slot=rank * len(workers) + w, n_slots=n_slots) for w in workers
            ]
            self.num_samples = sum(counts)
            self.num_batches = sum(math.ceil(c / batch) for c in counts)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stream = _SlotStream(
            manifest=self.manifest,
            cfg=self.cfg,
            train=self.train,
            rank=self.rank,
            world_size=self.world_size,
            epoch=self.epoch,
            batches_per_rank=self.num_batches,
        )
        if self.num_workers == 0:
            batches: Iterable = stream
        else:
            batches = DataLoader(
                stream,
                batch_size=None,  # batches are assembled in the workers: one IPC message per batch
                num_workers=self.num_workers,
                multiprocessing_context=self.cfg.multiprocessing_context,
                prefetch_factor=4,
                pin_memory=torch.cuda.is_available(),
                persistent_workers=False,  # workers are re-forked per epoch and so see the new epoch
                # A worker that produces nothing for 10 minutes is stuck (a deadlock, a dead mount): raise, so
                # the run fails and restarts from its checkpoint instead of hanging every rank in a collective.
                timeout=LOADER_TIMEOUT_S,
            )
        count = 0
        for batch in batches:
            count += 1
            yield batch
        assert count == self.num_batches, (
            f"rank {self.rank} produced {count} batches, planned {self.num_batches}"
        )


def build_loader(
    manifest: Manifest, cfg: DataConfig, *, train: bool, rank: int = 0, world_size: int = 1
) -> ShardLoader:
    """The loader of one split for one rank (see the module docstring for the guarantees)."""
    return ShardLoader(manifest, cfg, train=train, rank=rank, world_size=world_size)


class DataWait:
    """Fraction of a loop's wall time spent blocked waiting for the next batch.

    ``wait_fraction`` near 0 means the model is the bottleneck; near 1 means the loader starves it (add
    loader workers, or shard with --resize-short). Wrap the batches: ``for b in meter.iterate(loader)``.
    """

    def __init__(self) -> None:
        self.wait_seconds = 0.0
        self.total_seconds = 0.0
        self.batches = 0

    def iterate(self, batches: Iterable) -> Iterator:
        iterator = iter(batches)
        start = time.perf_counter()
        try:
            while True:
                t0 = time.perf_counter()
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
                self.wait_seconds += time.perf_counter() - t0
                self.batches += 1
                yield batch
        finally:
            self.total_seconds += time.perf_counter() - start

    @property
    def wait_fraction(self) -> float:
        return self.wait_seconds / self.total_seconds if self.total_seconds > 0 else 0.0

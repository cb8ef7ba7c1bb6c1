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

What a batch costs beyond decoding + augmenting its images (docs/performance.md, ``make bench-data``): tar
shards are read by a small header parser (webdataset's tarfile path cost ~6x more); DataLoader workers are
forked once and kept across epochs, the epoch reaching them through shared memory; each worker writes its
images straight into shared-memory batch buffers that it reuses once the main process has copied a batch
out (``_BatchRing``); remote shards are read ahead in a thread (``_ReadAhead``).
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import multiprocessing
import queue
import random
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import DataConfig
from pipeline.data import storage, transforms
from pipeline.data.manifest import Manifest
from pipeline.errors import LoaderError

Batch = tuple[torch.Tensor, torch.Tensor]
"""(images uint8 [B, 3, R, R], labels int64 [B])."""

log = logging.getLogger(__name__)

CORRUPT_WARNINGS_PER_EPOCH = 3
"""Under data.on_corrupt=skip, each loader slot names this many skipped samples per epoch; the rest are
only counted (``data/skipped``)."""


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
    """Raw samples (dicts of bytes, plus ``__key__`` and ``__url__``) from tar shards, in order."""
    for backend in {storage.backend_for(u) for u in urls}:
        # Re-registered here because spawn/forkserver workers do not inherit the parent's registration.
        backend.register_webdataset_opener()
    for url in urls:
        with wds.gopen(url, "rb") as stream:
            if storage.local_path(url) is not None:
                yield from _tar_samples(stream, url)
                continue
            with _ReadAhead(stream) as ahead:
                yield from _tar_samples(ahead, url)


READ_AHEAD_CHUNK_BYTES = 1 << 20
READ_AHEAD_CHUNKS = 4


class _ReadAhead:
    """A remote stream read ahead by a thread, up to READ_AHEAD_CHUNKS chunks of READ_AHEAD_CHUNK_BYTES, so a
    loader worker decodes while the next bytes arrive instead of waiting for each chunk in turn (a moto
    server on 127.0.0.1 kept the reader waiting ~50 us per 30 KB sample, ~5% of decoding it; real object
    stores take longer per request). Socket reads release the GIL, so the thread costs the decoder little.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._chunks: queue.Queue[bytes | BaseException] = queue.Queue(READ_AHEAD_CHUNKS)
        self._stop = threading.Event()
        self._chunk, self._position, self._ended = b"", 0, False
        threading.Thread(target=self._fill, args=(stream,), name="shard-read-ahead", daemon=True).start()

    def _fill(self, stream: BinaryIO) -> None:
        try:
            while not self._stop.is_set():
                chunk = stream.read(READ_AHEAD_CHUNK_BYTES)
                self._put(chunk)
                if not chunk:
                    return
        except BaseException as error:  # handed over: the reading thread raises it
            self._put(error)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():  # a reader that stopped early takes nothing more
            try:
                self._chunks.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    def read(self, size: int) -> bytes:
        end = self._position + size
        if end <= len(self._chunk):
            data, self._position = self._chunk[self._position : end], end
            return data
        parts, missing = [self._chunk[self._position :]], size - (len(self._chunk) - self._position)
        self._chunk, self._position = b"", 0
        while missing > 0 and not self._ended:
            chunk = self._chunks.get()
            if isinstance(chunk, BaseException):
                raise chunk
            self._ended = not chunk
            parts.append(chunk[:missing])
            self._chunk, self._position = chunk, min(missing, len(chunk))
            missing -= self._position
        return b"".join(parts)

    def __enter__(self) -> _ReadAhead:
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()


_TAR_BLOCK = 512
_TAR_END = bytes(_TAR_BLOCK)
_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset skips these (e.g. __index__): so do we


def _tar_samples(stream: BinaryIO, url: str) -> Iterator[dict]:
    """The samples of one uncompressed tar stream: members grouped by key as webdataset groups them (key =
    the name up to the first dot of its last component, extension lower-cased).

    A header parser instead of ``tarfile``: webdataset's tarfile-based iterators cost ~140 us per sample of
    three members here, ~15% of decoding + augmenting a 256 px JPEG; this parser ~20 us (docs/performance.md).
    It reads plain files, directories, POSIX pax and GNU long names, i.e. what tarfile and TarWriter write.
    """
    sample: dict | None = None
    long_name: str | None = None
    offset = 0
    while True:
        header = stream.read(_TAR_BLOCK)
        if not header or header == _TAR_END:
            break
        if len(header) < _TAR_BLOCK:
            raise LoaderError(f"{url}: truncated tar header at byte {offset}; the shard is incomplete")
        # Every writer here (tarfile's pax/GNU/ustar, webdataset's TarWriter) stamps the ustar magic, so a
        # header without it means a corrupt shard or a parse out of step. (The header checksum would cost
        # 5 us a member in Python; the manifest's sha256 covers the whole shard.)
        if header[257:262] != b"ustar":
            raise LoaderError(f"{url}: no tar header at byte {offset}; the shard is corrupt, rewrite it")
        size = _tar_size(header[124:136], url=url, offset=offset)
        data = stream.read(size)
        padding = -size % _TAR_BLOCK
        if len(data) < size or len(stream.read(padding)) < padding:
            raise LoaderError(f"{url}: tar member at byte {offset} is cut short; the shard is incomplete")
        offset += _TAR_BLOCK + size + padding
        kind = header[156:157]
        if kind == b"x":  # pax extended header: "<length> <key>=<value>\n" records for the next member
            for record in data.split(b"\n"):
                key, _, value = record.partition(b" ")[2].partition(b"=")
                if key == b"path":
                    long_name = value.decode("utf-8", "surrogateescape")
            continue
        if kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if kind in (b"g", b"K"):  # a global pax header, a GNU long link target: no member of their own
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if header[257:263] == b"ustar\0" and header[345]:  # POSIX ustar: a directory prefix
                prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                name = f"{prefix}/{name}"
        if kind not in (b"0", b"\0", b"7") or _META_MEMBER.match(name):
            continue  # directories, links, metadata members
        start = name.rfind("/") + 1
        dot = name.find(".", start)
        if dot <= start:
            continue  # no extension, or a dot file: not part of any sample (webdataset skips them too)
        key, extension = name[:dot], name[dot + 1 :].lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        if extension in sample:
            raise LoaderError(f"{url}: sample {key} has two {extension!r} members")
        sample[extension] = data
    if sample is not None:
        yield sample


def _tar_size(field: bytes, *, url: str, offset: int) -> int:
    """A header's size field: octal text, or base-256 with the high bit set (members over 8 GiB)."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise LoaderError(f"{url}: unreadable tar member size at byte {offset}; rewrite the shard") from None


PREFETCH_BATCHES = 4
"""Batches the DataLoader requests ahead from each worker (its prefetch_factor)."""
RING_SLOTS = PREFETCH_BATCHES + 2  # + the batch the main process is copying out, + the one being filled
RING_RELEASE_WAIT_S = 0.02


def _empty_batch(batch_size: int, image_shape: tuple[int, ...], *, shared: bool, pinned: bool) -> Batch:
    images = torch.empty((batch_size, *image_shape), dtype=torch.uint8, pin_memory=pinned)
    labels = torch.empty(batch_size, dtype=torch.int64, pin_memory=pinned)
    return (images.share_memory_(), labels.share_memory_()) if shared else (images, labels)


class _BatchRing:
    """The shared-memory batches one DataLoader worker fills, reused once the main process is done with them.

    A fresh shared-memory batch costs 150-220 us per 224 px image here (tmpfs pages allocated and zeroed on
    first touch, 9.6 MB per batch of 64), ~20% of decoding + augmenting the image; refilling one costs
    nothing. The main process never hands these tensors to the training loop: it copies each batch out (the
    DataLoader's pin thread with CUDA, a clone without) and then counts it in ``released[worker]``. Slot
    ``seq % RING_SLOTS`` is refilled only once batch ``seq - RING_SLOTS`` is released, which in steady state it
    always is: a worker runs at most PREFETCH_BATCHES batches ahead of the main process. A batch the main
    process never took (an epoch left early: the DataLoader drains and drops it) is waited for only
    RING_RELEASE_WAIT_S; its slot then gets a fresh tensor. The ring lives as long as the (persistent) worker:
    RING_SLOTS batches of /dev/shm per worker.
    """

    def __init__(self, released: Any, worker: int) -> None:
        self.released = released
        self.worker = worker
        self.slots: list[Batch] = []
        self.sent = 0  # sequence number of the next batch

    def take(self, batch_size: int, image_shape: tuple[int, ...]) -> tuple[int, Batch]:
        seq, self.sent = self.sent, self.sent + 1
        index = seq % RING_SLOTS
        if index == len(self.slots):
            self.slots.append(_empty_batch(batch_size, image_shape, shared=True, pinned=False))
        elif not self._wait_released(seq - RING_SLOTS):
            self.slots[index] = _empty_batch(batch_size, image_shape, shared=True, pinned=False)
        return seq, self.slots[index]

    def _wait_released(self, seq: int) -> bool:
        deadline = time.monotonic() + RING_RELEASE_WAIT_S
        while self.released[self.worker] <= seq:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.0005)
        return True


class _SlotStream(IterableDataset):
    """The stream of one rank, one epoch per iteration; DataLoader workers each take their slot of it.

    The epoch is read when an iteration starts, from shared memory when there are loader workers: they
    persist across epochs (forked once), so an attribute set later in the parent would not reach them. In a
    worker an iteration yields ``(images, labels, worker, seq)`` (the batch in the worker's _BatchRing);
    in the training process ``(images, labels)``.
    """

    def __init__(
        self,
        *,
        manifest: Manifest,
        cfg: DataConfig,
        train: bool,
        rank: int,
        world_size: int,
        batches_per_rank: int,
        loader_workers: int,
    ) -> None:
        super().__init__()
        self.urls = manifest.shard_urls()
        self.shard_sizes = [shard.num_samples for shard in manifest.shards]
        self.cfg = cfg
        self.train = train
        self.rank = rank
        self.world_size = world_size
        # Shared with the DataLoader workers (which are forked once and persist): the epoch to stream, and
        # per worker the number of its batches the main process has copied out (_BatchRing).
        context = multiprocessing.get_context(cfg.multiprocessing_context)
        self._epoch = context.RawValue("q", 0) if loader_workers > 0 else None
        self._released = context.RawArray("q", loader_workers) if loader_workers > 0 else None
        # Per worker, the samples it skipped this epoch (data.on_corrupt=skip); [0] in the training process.
        self._skipped = context.RawArray("q", loader_workers) if loader_workers > 0 else [0]
        self._corrupt_budget = 0.0  # the current epoch's limit for this slot, set when an iteration starts
        # data.decode=gpu: what the training process itself skipped, and its limit (set by ShardLoader).
        self.main_skipped, self.main_budget = 0, 0.0
        self._ring: _BatchRing | None = None  # in a worker, made at its first iteration
        self.epoch = 0
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
        crop = cfg.resolution if train else transforms.eval_sizes(cfg).crop
        self.image_size = (crop, crop)
        self.encoded = cfg.decode == "gpu"  # batches of JPEG bytes, decoded by the training process

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next iteration, in this process and in the DataLoader workers."""
        self.epoch = epoch
        if self._epoch is not None:
            self._epoch.value = epoch

    def skipped(self) -> int:
        """Samples skipped in the last iteration, over all workers (read once the iteration has ended)."""
        return sum(self._skipped) + self.main_skipped

    def _corrupt(self, worker: int | None, what: str, error: Exception, *, lost: int = 1) -> None:
        """A sample (or the rest of a shard: ``lost`` samples) that cannot be read, ``what`` naming it:
        LoaderError under data.on_corrupt=fail, else counted, and LoaderError once the slot's epoch budget is
        spent. ``worker`` None: found by the training process (data.decode=gpu), counted on its own."""
        if self.cfg.on_corrupt == "fail":
            raise LoaderError(what) from None  # ``what`` carries the decoder's message: no chained traceback
        if worker is None:
            self.main_skipped += lost
            count, budget = self.main_skipped, self.main_budget
        else:
            self._skipped[worker] += lost
            count, budget = self._skipped[worker], self._corrupt_budget
        if count > budget:
            raise LoaderError(
                f"{count} corrupt samples on one loader slot this epoch exceed "
                f"data.max_corrupt_fraction={self.cfg.max_corrupt_fraction:g} of its samples; last: {what}. "
                "Rewrite the damaged shards with jobs/make_shards.py"
            ) from error
        if count - lost < CORRUPT_WARNINGS_PER_EPOCH:
            log.warning("skipped %d corrupt sample(s): %s", lost, what)

    def release(self, worker: int, seq: int) -> None:
        """Main process: batch ``seq`` of ``worker`` and all before it are copied out (_BatchRing)."""
        assert self._released is not None
        self._released[worker] = seq + 1

    def _read(self, shard_indices: list[int], worker: int, keep_every: int) -> Iterator[dict]:
        """The raw samples of these shards in order; a shard whose tar structure breaks ends there, its
        remaining samples (by the manifest) handed to ``_corrupt``. Read errors of the storage itself (a
        connection reset) are not corruption: they propagate and the run is retried."""
        for index in shard_indices:
            read = 0
            try:
                for sample in read_samples([self.urls[index]]):
                    read += 1
                    yield sample
            except LoaderError as error:
                # The sample being grouped when the structure broke is lost too (its members may be cut).
                # When every slot reads every shard (keep_every > 1), each loses its share of the rest.
                lost = max(1, -(-(self.shard_sizes[index] - read) // keep_every))
                self._corrupt(worker, f"{error} (the shard's last {lost} samples)", error, lost=lost)

    def _pass(self, plan: SlotPlan, worker: int, *, skip: int = 0) -> Iterator[dict]:
        """The plan's samples in order, less the first ``skip``."""
        shard_indices = plan.shard_indices
        if plan.keep_every == 1:
            while shard_indices and self.shard_sizes[shard_indices[0]] <= skip:
                skip -= self.shard_sizes[shard_indices[0]]  # a whole shard skipped is never opened
                shard_indices = shard_indices[1:]
        samples = self._read(shard_indices, worker, plan.keep_every)
        if plan.keep_every > 1:
            samples = (s for j, s in enumerate(samples) if j % plan.keep_every == plan.keep_offset)
        yield from itertools.islice(samples, skip, None)

    def _train_samples(
        self, group: int, n_groups: int, rng: random.Random, worker: int, *, skip: int
    ) -> Iterator[dict]:
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
            for sample in self._pass(plan, worker, skip=skip):
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

    def _group_stream(
        self, group: int, n_groups: int, worker: int, *, buffer: int, skip: int
    ) -> Iterator[dict]:
        """One group's shuffled stream: the same on every rank that reads it (no rank in any seed)."""
        rng = random.Random(_seed(self.cfg.seed, self.epoch, group, 1))
        return wds.filters.shuffle(buffer, initial=buffer, rng=rng)(
            self._train_samples(group, n_groups, rng, worker, skip=skip)
        )

    def _decode(self, sample: dict, worker: int) -> tuple[torch.Tensor, int] | None:
        """The sample's transformed image and label; None for a corrupt one skipped (``_corrupt``)."""
        try:
            image = transforms.decode(sample["jpg"])
            label = int(sample["cls"])
        except Exception as err:  # a corrupt member: name it instead of a bare decoder traceback
            what = f"cannot decode sample {sample.get('__key__')} in {sample.get('__url__')}"
            self._corrupt(worker, f"{what}: {transforms.decoder_message(err)}", err)
            return None
        return self.transform(image), label

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        if self._epoch is not None:
            self.epoch = self._epoch.value
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slot, n_slots = self.rank * num_workers + worker, self.world_size * num_workers
        batch_size = self.cfg.batch_size_per_worker
        self._skipped[worker] = 0
        if self.train:
            quota = split_quota(self.batches_per_rank, num_workers, worker)
            if quota == 0:
                return
            self._corrupt_budget = self.cfg.max_corrupt_fraction * quota * batch_size
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
                group: iter(
                    itertools.tee(self._group_stream(group, n_slots, worker, buffer=buffer, skip=skip), n)
                )
                for group, n in copies.items()
            }
            per_copy = [next(teed[group]) for group in groups]  # round-robin over the copies:
            samples = (sample for row in zip(*per_copy, strict=True) for sample in row)
        else:
            quota = None
            plan = plan_slot(list(range(len(self.urls))), slot=slot, n_slots=n_slots)
            self._corrupt_budget = self.cfg.max_corrupt_fraction * plan_length(plan, self.shard_sizes)
            samples = self._pass(plan, worker)
        if self.encoded:
            yield from self._encoded_batches(samples, worker, batch_size, quota)
            return
        image_shape = (3, *self.image_size)
        if info is not None and self._ring is None:
            self._ring = _BatchRing(self._released, worker)
        produced = filled = 0
        batch: Batch | None = None
        for sample in samples:
            decoded = self._decode(sample, worker)
            if decoded is None:
                continue
            image, label = decoded
            if batch is None:
                if self._ring is not None:
                    seq, batch = self._ring.take(batch_size, image_shape)
                else:  # in the training process: pinned with CUDA, so the host-to-device copy is async
                    batch = _empty_batch(
                        batch_size, image_shape, shared=False, pinned=torch.cuda.is_available()
                    )
            assert image.shape == image_shape, f"{image.shape} from the transform, batch of {image_shape}"
            # Copied in while the image is still in cache; the batch tensor is the only copy.
            batch[0][filled] = image
            batch[1][filled] = label
            filled += 1
            if filled == batch_size:
                yield (*batch, worker, seq) if self._ring is not None else batch
                batch, filled = None, 0
                produced += 1
                if produced == quota:
                    return
        if filled and not self.train:
            images, labels = batch[0][:filled], batch[1][:filled]
            yield (images, labels, worker, seq) if self._ring is not None else (images, labels)

    def _encoded_batches(
        self, samples: Iterator[dict], worker: int, batch_size: int, quota: int | None
    ) -> Iterator[EncodedBatch]:
        """data.decode=gpu: batches of undecoded JPEGs, ``quota`` of them in training."""
        produced = 0
        jpegs: list[bytes] = []
        labels: list[int] = []
        names: list[str] = []
        for sample in samples:
            name = f"sample {sample.get('__key__')} in {sample.get('__url__')}"
            try:
                jpeg, label = sample["jpg"], int(sample["cls"])
            except (KeyError, ValueError) as err:
                self._corrupt(worker, f"{name} has no jpg or class: {err!r}", err)
                continue
            jpegs.append(jpeg)
            labels.append(label)
            names.append(name)
            if len(jpegs) == batch_size:
                yield _encode_batch(jpegs, labels, names)
                jpegs, labels, names = [], [], []
                produced += 1
                if produced == quota:
                    return
        if jpegs and not self.train:
            yield _encode_batch(jpegs, labels, names)

    def decoding_epoch(self, samples: int) -> None:
        """data.decode=gpu: the training process starts an epoch of ``samples`` to decode (its skip count
        and budget)."""
        self.main_skipped, self.main_budget = 0, self.cfg.max_corrupt_fraction * samples

    def decode_batch(self, batch: EncodedBatch, device: torch.device) -> Batch:
        """data.decode=gpu, in the training process: one batch decoded on ``device`` (nvJPEG on CUDA) and
        transformed there image by image (sizes differ until the crop); a JPEG that does not decode is
        handled as in the workers (``_corrupt``) and leaves the batch one image short."""
        data, offsets, labels, names = batch
        jpegs = [data[offsets[i] : offsets[i + 1]] for i in range(len(labels))]
        try:
            images: list[torch.Tensor | None] = list(transforms.decode_batch(jpegs, device))
        except RuntimeError:  # one bad JPEG fails the whole call: find it
            images = [self._decode_one(jpeg, device, name) for jpeg, name in zip(jpegs, names, strict=True)]
        keep = [i for i, image in enumerate(images) if image is not None]
        if not keep:  # an empty batch would be a NaN loss, or a rank a step short
            raise LoaderError(f"no image of a batch of {len(jpegs)} decodes; rewrite the shards")
        return torch.stack([self.transform(images[i]) for i in keep]), labels[keep]

    def _decode_one(self, jpeg: torch.Tensor, device: torch.device, what: str) -> torch.Tensor | None:
        try:
            return transforms.decode_batch([jpeg], device)[0]
        except RuntimeError as err:
            self._corrupt(None, f"cannot decode {what}: {transforms.decoder_message(err)}", err)
            return None


EncodedBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]
"""data.decode=gpu: (JPEG bytes of a batch back to back uint8 [N], offsets int64 [B + 1], labels int64 [B],
the samples' names for error messages)."""


def _encode_batch(jpegs: list[bytes], labels: list[int], names: list[str]) -> EncodedBatch:
    """One tensor for the whole batch's bytes: one shared-memory segment to hand over, not B of them."""
    offsets = torch.tensor([0, *itertools.accumulate(len(j) for j in jpegs)], dtype=torch.int64)
    data = torch.frombuffer(bytearray(b"".join(jpegs)), dtype=torch.uint8)
    return data, offsets, torch.tensor(labels, dtype=torch.int64), names


class ShardLoader:
    """Batches of one split for one rank. Re-iterable; call ``set_epoch`` before each training epoch.

    Its DataLoader workers start at the first iteration and serve every later one, until the loader is
    garbage-collected."""

    def __init__(
        self,
        manifest: Manifest,
        cfg: DataConfig,
        *,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise LoaderError(f"rank {rank} is outside world size {world_size}")
        if cfg.decode == "gpu" and (device is None or device.type != "cuda"):
            raise LoaderError(
                f"data.decode=gpu: this worker trains on {device or 'no device'}, not a CUDA GPU; set "
                "scaling.use_gpu: true on GPU nodes, or data.decode: cpu"
            )
        self.device = device
        self.manifest = manifest
        self.cfg = cfg
        self.train = train
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skipped = 0
        """Corrupt samples skipped in the last complete iteration (data.on_corrupt=skip), over its workers."""
        batch = cfg.batch_size_per_worker
        self.num_workers = cfg.loader_workers
        self._stream: _SlotStream | None = None
        self._batches: Iterable | None = None  # built at the first iteration, then kept
        self._mapped: dict[tuple[int, int], Batch] = {}  # (worker, ring slot) -> the last batch received
        self._pinned = torch.cuda.is_available()
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

    def _copied_out(self, stream: _SlotStream, batches: Iterable) -> Iterator[Batch]:
        """The workers' batches, each copied out of its worker's ring (_BatchRing) before it is released."""
        for images, labels, worker, seq in batches:
            if not self._pinned:  # with pinning, the DataLoader's pin thread has copied it out already
                # Holding the ring's tensors keeps them mapped here: a received tensor whose mapping is gone is
                # mapped anew, and the clone then page-faults through it (clone 30 -> 18 us per 224 px image).
                self._mapped[worker, seq % RING_SLOTS] = images, labels
                images, labels = images.clone(), labels.clone()
            stream.release(worker, seq)
            yield images, labels

    def _decoded(self, stream: _SlotStream, batches: Iterable) -> Iterator[Batch]:
        """data.decode=gpu: the workers' JPEG batches decoded and augmented on this loader's device."""
        assert self.device is not None
        # Augmentation draws from torch's global generator in this process: seeded per epoch and rank as the
        # workers' are per slot, so a resumed epoch sees the same crops.
        torch.manual_seed(_seed(self.cfg.seed, self.epoch, self.rank, 3))
        stream.decoding_epoch(self.num_samples)
        for batch in batches:
            yield stream.decode_batch(batch, self.device)

    def __len__(self) -> int:
        return self.num_batches

    def _source(self) -> tuple[_SlotStream, Iterable]:
        if self._stream is None:
            self._stream = _SlotStream(
                manifest=self.manifest,
                cfg=self.cfg,
                train=self.train,
                rank=self.rank,
                world_size=self.world_size,
                batches_per_rank=self.num_batches,
                loader_workers=self.num_workers,
            )
            self._batches = self._stream
            if self.num_workers > 0:
                self._batches = DataLoader(
                    self._stream,
                    batch_size=None,  # batches are assembled in the workers: one IPC message per batch
                    num_workers=self.num_workers,
                    multiprocessing_context=self.cfg.multiprocessing_context,
                    prefetch_factor=PREFETCH_BATCHES,
                    pin_memory=self._pinned,
                    # Forking and tearing down workers every epoch cost ~75 ms per epoch here (plus their
                    # copy-on-write page faults), ~6% of a 1,200-image epoch; the epoch reaches the persistent
                    # workers through shared memory (_SlotStream.set_epoch).
                    persistent_workers=True,
                    # A worker that produces nothing for 10 minutes is stuck (a deadlock, a dead mount): raise,
                    # so the run fails and restarts from its checkpoint instead of hanging every rank in a
                    # collective.
                    timeout=LOADER_TIMEOUT_S,
                )
        assert self._batches is not None
        return self._stream, self._batches

    def __iter__(self) -> Iterator[Batch]:
        stream, batches = self._source()
        stream.set_epoch(self.epoch)
        if stream.encoded:
            batches = self._decoded(stream, batches)
        elif self.num_workers > 0:
            batches = self._copied_out(stream, batches)
        count = 0
        for batch in batches:
            count += 1
            yield batch
        self.skipped = stream.skipped()
        # Training streams run on past a skipped sample; evaluation covers what is readable, so may come short.
        short = not self.train and self.skipped > 0 and count <= self.num_batches
        assert count == self.num_batches or short, (
            f"rank {self.rank} produced {count} batches, planned {self.num_batches}"
        )


def build_loader(
    manifest: Manifest,
    cfg: DataConfig,
    *,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
) -> ShardLoader:
    """The loader of one split for one rank (see the module docstring for the guarantees). ``device`` is the
    training device, where data.decode=gpu decodes."""
    return ShardLoader(manifest, cfg, train=train, rank=rank, world_size=world_size, device=device)


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

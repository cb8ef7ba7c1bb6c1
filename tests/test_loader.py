"""Streaming loader: equal batch counts on uneven shards, exact evaluation coverage, per-epoch shard order,
oversampling, repeated augmentation, persistent workers with reused batch memory, the tar reader, S3 with
spawned workers, and a real 2-process gloo DDP run that must not hang."""

from __future__ import annotations

import collections
import os

import pytest
import torch
from imgtree import corrupt_in_place, write_imbalanced_shards, write_sized_shards

from pipeline.config import DataConfig
from pipeline.data.loader import DataWait, LoaderError, build_loader, plan_slot
from pipeline.data.manifest import load_manifest
from pipeline.stack import free_port

UNEVEN = [13, 2, 9, 1, 7, 11, 3]  # 46 samples; rank 0 gets shards 0,2,4,6 (32), rank 1 gets 1,3,5 (14)


def _cfg(**kw) -> DataConfig:
    base = dict(
        resolution=16, batch_size_per_worker=4, loader_workers=0, shuffle_buffer=8, min_crop_scale=0.5
    )
    return DataConfig(**{**base, **kw})


@pytest.fixture
def uneven(tmp_path):
    return write_sized_shards(tmp_path / "uneven", UNEVEN, num_classes=3)


def test_fixture_shards_really_are_uneven_per_rank(uneven):
    per_rank = [
        sum(UNEVEN[i] for i in plan_slot(list(range(7)), slot=r, n_slots=2).shard_indices) for r in (0, 1)
    ]
    assert per_rank == [32, 14], "without equalization rank 0 would run 8 batches and rank 1 only 3"


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_every_rank_yields_the_same_number_of_batches(uneven, loader_workers):
    cfg = _cfg(loader_workers=loader_workers)
    for epoch in range(2):
        counts = []
        for rank in range(2):
            loader = build_loader(uneven, cfg, train=True, rank=rank, world_size=2)
            loader.set_epoch(epoch)
            batches = list(loader)
            assert all(x.shape == (4, 3, 16, 16) and x.dtype == torch.uint8 for x, _ in batches)
            counts.append(len(batches))
        assert counts == [46 // 8] * 2


def test_shard_order_changes_every_epoch_and_is_reproducible(tmp_path):
    manifest = write_sized_shards(tmp_path / "s", [4] * 8, num_classes=32, labels="cycle")
    cfg = _cfg(shuffle_buffer=1, batch_size_per_worker=4)  # buffer 1: the stream order is the shard order

    def first_labels(epoch):
        loader = build_loader(manifest, cfg, train=True)
        loader.set_epoch(epoch)
        return [y.tolist() for _, y in loader]

    assert first_labels(0) == first_labels(0)
    assert first_labels(0) != first_labels(1)


@pytest.mark.parametrize("world_size,loader_workers", [(2, 2), (3, 1), (2, 0)])
def test_evaluation_covers_every_sample_exactly_once(tmp_path, world_size, loader_workers):
    sizes = [5, 1, 8, 3, 6]
    manifest = write_sized_shards(tmp_path / "v", sizes, num_classes=sum(sizes), labels="unique")
    cfg = _cfg(loader_workers=loader_workers, batch_size_per_worker=4)
    seen = []
    for rank in range(world_size):
        loader = build_loader(manifest, cfg, train=False, rank=rank, world_size=world_size)
        labels = [y for _, y in loader]
        assert len(labels) == loader.num_batches
        assert sum(len(y) for y in labels) == loader.num_samples
        seen += torch.cat(labels).tolist()
    assert sorted(seen) == list(range(sum(sizes)))


def test_tiny_data_with_more_slots_than_shards_still_splits_exactly(tmp_path):
    manifest = write_sized_shards(tmp_path / "t", [7], num_classes=7, labels="unique")
    cfg = _cfg(loader_workers=2, batch_size_per_worker=2)
    seen = []
    for rank in range(2):
        seen += [
            v
            for _, y in build_loader(manifest, cfg, train=False, rank=rank, world_size=2)
            for v in y.tolist()
        ]
    assert sorted(seen) == list(range(7))
    train_counts = [
        len(list(build_loader(manifest, cfg, train=True, rank=r, world_size=2))) for r in range(2)
    ]
    assert train_counts == [1, 1]


def test_oversampling_balances_class_frequencies(tmp_path):
    counts = [400, 100, 60, 40]  # 10:1
    manifest = write_imbalanced_shards(tmp_path / "imb", counts)
    cfg = _cfg(resolution=8, batch_size_per_worker=20, oversample=True, shuffle_buffer=100)
    freq = collections.Counter()
    plain = collections.Counter()
    for epoch in range(4):
        for oversample, counter in ((True, freq), (False, plain)):
            loader = build_loader(
                manifest, DataConfig(**{**cfg.__dict__, "oversample": oversample}), train=True
            )
            loader.set_epoch(epoch)
            for _, y in loader:
                counter.update(y.tolist())
    total = sum(freq.values())
    assert total == 4 * 600, "oversampling keeps the epoch length"
    shares = [freq[c] / total for c in range(4)]
    assert max(abs(s - 0.25) for s in shares) < 0.03, shares
    assert plain[0] / sum(plain.values()) > 0.6, "without oversampling the majority class dominates"


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """48 samples in 6 shards of 8, each sample its own label, so a label names the sample."""
    return write_sized_shards(tmp_path_factory.mktemp("numbered"), [8] * 6, num_classes=48, labels="unique")


def _epoch_copies(
    manifest, cfg, *, world_size: int, epoch: int
) -> dict[int, list[tuple[int, int, torch.Tensor]]]:
    """{sample id: [(rank, batch index, image), ...]} of one training epoch over all ranks."""
    copies = collections.defaultdict(list)
    for rank in range(world_size):
        loader = build_loader(manifest, cfg, train=True, rank=rank, world_size=world_size)
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == loader.num_batches == manifest.num_samples // (world_size * 6)
        for step, (images, labels) in enumerate(batches):
            for image, sample in zip(images, labels.tolist(), strict=True):
                copies[sample].append((rank, step, image))
    return copies


@pytest.mark.parametrize("k", [2, 3])
def test_repeated_augmentation_spreads_k_differently_augmented_copies_over_the_ranks(numbered, k):
    world_size = 2  # k=3: more copies than ranks, so one rank holds two of them
    cfg = _cfg(batch_size_per_worker=6, repeated_augment=k)
    assert len(build_loader(numbered, cfg, train=True)) == len(
        build_loader(numbered, _cfg(batch_size_per_worker=6), train=True)
    ), "the epoch keeps its length"
    seen = []
    for epoch in range(2):
        copies = _epoch_copies(numbered, cfg, world_size=world_size, epoch=epoch)
        assert {len(c) for c in copies.values()} == {k}, "every sample of the epoch comes k times"
        assert len(copies) == 48 // k, "so the epoch covers 1/k of the distinct samples"
        assert all({rank for rank, _, _ in c} == {0, 1} for c in copies.values()), "copies on both ranks"
        assert all(len({step for _, step, _ in c}) == 1 for c in copies.values()), "in the same step"
        different = sum(not torch.equal(c[0][2], c[1][2]) for c in copies.values())
        assert different >= 0.9 * len(copies), "each copy is augmented on its own"
        seen.append(set(copies))
    assert len(seen[0] & seen[1]) <= len(seen[0]) // 4, "the next epoch takes other samples"
    if k == 2:
        assert len(seen[0] | seen[1]) >= 0.85 * 48, "k epochs sweep (almost) the whole data set"


def test_persistent_workers_follow_the_epoch_and_batches_stay_intact(numbered):
    """Workers are forked once and reuse their shared-memory batches (loader._BatchRing): each epoch must
    still be the epoch asked for, bit for bit what a fresh loader gives, also after an epoch left early, and
    batches the caller keeps must not change while later ones are produced."""
    cfg = _cfg(loader_workers=2, batch_size_per_worker=3)

    def fresh(epoch):
        loader = build_loader(numbered, cfg, train=True)
        loader.set_epoch(epoch)
        return list(loader)

    reused = build_loader(numbered, cfg, train=True)
    kept = []
    for epoch in (0, 1, 0):
        reused.set_epoch(epoch)
        kept.append(list(reused))  # 16 batches kept: more than the workers' rings hold (2 x 6)
        next(iter(reused))  # and an epoch left after one batch before the next one starts
    for epoch, batches in zip((0, 1, 0), kept, strict=True):
        expected = fresh(epoch)
        assert len(batches) == len(expected) == 48 // 3
        assert all(
            torch.equal(x, ex) and torch.equal(y, ey)
            for (x, y), (ex, ey) in zip(batches, expected, strict=True)
        )
    assert [y.tolist() for _, y in kept[0]] != [y.tolist() for _, y in kept[1]], "epoch 1 is another order"


def test_tar_reader_reads_what_webdataset_reads_and_names_a_cut_shard(tmp_path):
    """The loader's own tar parser against webdataset's tarfile-based one: long names (pax, GNU), directory
    prefixes, directories, metadata members, names without an extension; and a truncated shard."""
    import io
    import tarfile

    import webdataset as wds

    from pipeline.data.loader import read_samples

    def member(tar, name, data=b"", kind=tarfile.REGTYPE):
        info = tarfile.TarInfo(name)
        info.size, info.type, info.mtime = len(data), kind, 0
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

    for tar_format in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        path = tmp_path / f"{tar_format}.tar"
        with tarfile.open(path, "w", format=tar_format) as tar:
            member(tar, "dir", kind=tarfile.DIRTYPE)
            member(tar, "__index__", b"meta")
            member(tar, "a.JPG", b"x" * 1000)
            member(tar, "a.cls", b"1")
            member(tar, "sub/b.jpg", b"y" * 512)
            member(tar, "noext", b"z")
            member(tar, "p" * 90 + "/" + "k" * 60 + ".seg.png", b"w")  # ustar splits it into prefix + name
            if tar_format != tarfile.USTAR_FORMAT:
                member(tar, "l" * 150 + "/key.jpg", b"q" * 3)
                member(tar, "\u00fc" + "m" * 120 + ".jpg", b"q")
        opened = wds.tariterators.url_opener([{"url": str(path)}])
        expected = list(wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander(opened)))
        assert list(read_samples([str(path)])) == expected
        assert len(expected) == (5 if tar_format != tarfile.USTAR_FORMAT else 3)

    whole = (tmp_path / f"{tarfile.PAX_FORMAT}.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    inside_a_jpg = whole.index(b"x" * 1000) + 500
    for end in (700, 2000, inside_a_jpg):  # in a pax header's data, in a header, in an image
        cut.write_bytes(whole[:end])
        with pytest.raises(LoaderError, match=r"cut\.tar: .* at byte \d+.*the shard is incomplete"):
            list(read_samples([str(cut)]))


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_a_corrupt_sample_fails_the_epoch_or_is_skipped_and_counted(tmp_path, loader_workers):
    """Shards damaged in place (same size, so the size check passes): one JPEG that no longer decodes, and a
    tar header broken inside its shard's fifth sample of 7. on_corrupt=fail names the shard; skip drops the
    undecodable sample and the shard's last 3 (counted from the manifest), keeps the training batch count
    and evaluates every readable sample exactly once; past max_corrupt_fraction the epoch fails."""
    sizes = [6, 5, 7]
    manifest = write_sized_shards(tmp_path / "v", sizes, num_classes=sum(sizes), labels="unique")
    shards = sorted((tmp_path / "v").glob("*.tar"))
    corrupt_in_place(shards[0], image=3)  # sample 3
    # Header 10 = sample 5's jpg (2 members a sample): 5 and 6 lost, and 4, still being grouped (15-17).
    corrupt_in_place(shards[2], header=10)
    lost = {3, 15, 16, 17}

    fail = _cfg(loader_workers=loader_workers)
    with pytest.raises(LoaderError, match=r"shard-00000[02]\.tar"):
        list(build_loader(manifest, fail, train=False))

    # A slot that reads the broken shard alone meets 3 lost samples per 4 good ones in every pass.
    skip = _cfg(loader_workers=loader_workers, on_corrupt="skip", max_corrupt_fraction=0.9)
    evaluation = build_loader(manifest, skip, train=False)
    seen = torch.cat([y for _, y in evaluation]).tolist()
    assert sorted(seen) == sorted(set(range(sum(sizes))) - lost)
    assert evaluation.skipped == len(lost)

    training = build_loader(manifest, skip, train=True)
    for epoch in range(2):
        training.set_epoch(epoch)
        labels = torch.cat([y for _, y in training]).tolist()
        assert len(labels) == training.num_batches * 4 and not lost & set(labels)
        assert training.skipped >= 1, "16 of 14 readable samples: the epoch read a damaged one"

    strict = _cfg(loader_workers=loader_workers, on_corrupt="skip", max_corrupt_fraction=0.1)
    with pytest.raises(LoaderError, match=r"exceed data\.max_corrupt_fraction=0\.1 .*make_shards"):
        list(build_loader(manifest, strict, train=False))


@pytest.mark.parametrize("loader_workers", [0, 1])
def test_encoded_batches_decode_in_the_training_process_to_the_cpu_paths_pixels(tmp_path, loader_workers):
    """data.decode=gpu's path with the CPU standing in for the GPU (libjpeg instead of nvJPEG, same calls):
    the workers hand over undecoded batches, the training process decodes each in one call and transforms it,
    and evaluation gives exactly the CPU path's pixels; a JPEG that does not decode is skipped and counted
    there. Without a CUDA device the loader refuses the setting, naming it."""
    from torch.utils.data import DataLoader

    from pipeline.data.loader import _SlotStream

    manifest = write_sized_shards(tmp_path / "v", [5, 6], num_classes=11, labels="unique")
    cpu = _cfg(loader_workers=loader_workers, on_corrupt="skip", max_corrupt_fraction=0.5)
    gpu = _cfg(loader_workers=loader_workers, on_corrupt="skip", max_corrupt_fraction=0.5, decode="gpu")
    with pytest.raises(LoaderError, match="data.decode=gpu: this worker trains on cpu, not a CUDA GPU"):
        build_loader(manifest, gpu, train=False, device=torch.device("cpu"))
    expected = list(build_loader(manifest, cpu, train=False))

    def decoded(train: bool):
        stream = _SlotStream(
            manifest=manifest,
            cfg=gpu,
            train=train,
            rank=0,
            world_size=1,
            batches_per_rank=2,
            loader_workers=loader_workers,
        )
        source = DataLoader(stream, batch_size=None, num_workers=loader_workers) if loader_workers else stream
        stream.decoding_epoch(11)
        return [stream.decode_batch(batch, torch.device("cpu")) for batch in source], stream

    batches, _ = decoded(train=False)
    assert len(batches) == len(expected) and all(
        torch.equal(x, ex) and torch.equal(y, ey) for (x, y), (ex, ey) in zip(batches, expected, strict=True)
    )
    train, _ = decoded(train=True)
    assert [tuple(x.shape) for x, _ in train] == [(4, 3, 16, 16)] * 2

    corrupt_in_place(sorted((tmp_path / "v").glob("*.tar"))[1], image=2)  # sample 7
    batches, stream = decoded(train=False)
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == [i for i in range(11) if i != 7]
    assert stream.skipped() == 1


def test_read_ahead_returns_the_stream_and_its_errors(monkeypatch):
    """Remote shards are read ahead in a thread (loader._ReadAhead): reads of any size across chunk ends give
    the stream's bytes, a reader error reaches the reader, and a reader that stops early stops the thread."""
    import io
    import random
    import threading

    from pipeline.data import loader

    monkeypatch.setattr(loader, "READ_AHEAD_CHUNK_BYTES", 7)
    data = bytes(random.Random(0).randrange(256) for _ in range(1000))
    reads = random.Random(1)
    with loader._ReadAhead(io.BytesIO(data)) as ahead:
        got = [ahead.read(reads.choice([0, 1, 5, 7, 8, 30])) for _ in range(200)]
        assert b"".join(got) == data and ahead.read(10) == b""

    class Broken(io.BytesIO):
        def read(self, size=-1):
            if self.tell() >= 20:
                raise ConnectionResetError("peer went away")
            return super().read(size)

    with loader._ReadAhead(Broken(data)) as ahead:
        assert ahead.read(14) == data[:14]
        with pytest.raises(ConnectionResetError, match="peer went away"):
            ahead.read(100)

    before = threading.active_count()
    with loader._ReadAhead(io.BytesIO(data)) as ahead:
        ahead.read(3)  # the thread is now blocked on a full queue of chunks
        assert threading.active_count() == before + 1
    for _ in range(50):
        if threading.active_count() == before:
            break
        threading.Event().wait(0.05)
    assert threading.active_count() == before, "the read-ahead thread ended with its reader"


def test_fewer_samples_than_a_global_batch_is_a_clear_error(tmp_path):
    manifest = write_sized_shards(tmp_path / "s", [3], num_classes=1)
    with pytest.raises(LoaderError, match="batch_size_per_worker"):
        build_loader(manifest, _cfg(batch_size_per_worker=4), train=True)


def test_loader_streams_from_s3_in_spawned_workers(tmp_path, s3_bucket):
    from pipeline.data import storage

    sizes = [6, 5]
    local = write_sized_shards(tmp_path / "v", sizes, num_classes=11, labels="unique")
    prefix = f"s3://{s3_bucket}/val"
    for shard in local.shards:
        storage.put_file(str(tmp_path / "v" / shard.name), f"{prefix}/{shard.name}")
    storage.write_bytes_atomic(f"{prefix}/manifest.json", (tmp_path / "v" / "manifest.json").read_bytes())
    manifest = load_manifest(prefix)
    cfg = _cfg(loader_workers=2, multiprocessing_context="spawn", batch_size_per_worker=4)
    labels = torch.cat([y for _, y in build_loader(manifest, cfg, train=False)]).tolist()
    assert sorted(labels) == list(range(11))
    # Training from S3 with fork workers (spawn start-up, ~8 s a worker here, was exercised above).
    fork_cfg = _cfg(loader_workers=2, batch_size_per_worker=4)
    assert len(list(build_loader(manifest, fork_cfg, train=True))) == 11 // 4


def test_data_wait_meter_measures_blocking():
    import time

    def slow():
        for i in range(3):
            time.sleep(0.05)
            yield i

    meter = DataWait()
    for _ in meter.iterate(slow()):
        pass
    assert meter.batches == 3 and 0.9 < meter.wait_fraction <= 1.0
    meter = DataWait()
    for _ in meter.iterate(range(3)):
        time.sleep(0.05)
    assert meter.wait_fraction < 0.1


# ------------------------------------------------------------------------------------------------------
# A real 2-process DDP run over uneven shards: with unequal batch counts it would hang at epoch end.


def _ddp_worker(rank: int, world_size: int, port: int, manifest_url: str, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist

    from pipeline.data.transforms import normalize

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)
    )
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    loader = build_loader(
        load_manifest(manifest_url), _cfg(loader_workers=1), train=True, rank=rank, world_size=world_size
    )
    steps = 0
    for epoch in range(2):
        loader.set_epoch(epoch)
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(ddp(normalize(x)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world_size)]
    dist.all_gather(gathered, flat)
    torch.save(
        {"steps": steps, "same": all(torch.equal(gathered[0], g) for g in gathered)},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


def test_two_process_gloo_ddp_over_uneven_shards_finishes(uneven, tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _ddp_worker,
        args=(2, free_port(), uneven.url, str(tmp_path)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    import time

    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP run over uneven shards hung")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["steps"] for r in results] == [2 * (46 // 8)] * 2
    assert all(r["same"] for r in results), "weights identical across ranks after training"

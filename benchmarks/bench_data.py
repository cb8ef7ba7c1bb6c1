"""Data-loading benchmark (`make bench-data`): img/s of every way to feed a training loop, side by side.

All rows do RandomResizedCrop(R) + flip on the same JPEG bytes:

* **single-process limit**: decode + augment of the JPEGs held in memory, one process, one thread: what one
  core can do (``torchvision.io.decode_jpeg`` + v2 on uint8, as the loader does);
* **loader, local shards** (``pipeline.data.loader``) at N = 1 .. max loader workers; ratio to N x the limit;
* the **compared paths** (``COMPARED``) at N = 1 and max: our loader from an S3-compatible endpoint (a moto
  server on 127.0.0.1, started here, in this process), torchvision ``ImageFolder`` + ``DataLoader`` on the
  same files (PIL, float output as in torchvision's reference scripts), the loader with ``data.decode: gpu``
  (workers read tar bytes, nvJPEG decodes and the crop runs on the GPU; ``n/a`` without CUDA), and a row for
  the Ray Data path (``data.backend: ray_data``: read and decode tasks on a local Ray instance limited to
  N CPUs, batches iterated here).

Each loader row also reports the host CPU it used (the process and its loader workers, CPU seconds per
1,000 images): what data.decode=gpu is for is freeing those cores.

Timing: every row is timed once per round, rounds back to back (3 by default); a row's img/s is the median
over rounds and a ratio the median of the per-round ratios, so both sides of a ratio ran seconds apart under
the same machine load. A loader row builds its loader, runs one untimed epoch (workers start, caches warm),
then times ``--epochs`` epochs: the steady state of a training run, which keeps its loaders for all epochs
(start-up, ~0.1-0.5 s per run, is printed apart). The machine's load average is printed with the results.

    python benchmarks/bench_data.py [--images N] [--workers N] [--worker-counts 1,2,4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision import datasets
from torchvision import transforms as T

from pipeline.config import DataConfig, ToyConfig
from pipeline.data import storage
from pipeline.data.loader import build_loader
from pipeline.data.manifest import Manifest, load_manifest
from pipeline.data.shards import ShardOptions, write_shards
from pipeline.data.toy import generate
from pipeline.data.transforms import decode, train_transform

WORK = Path(".cache/bench")
SAMPLES_PER_SHARD = 100


@dataclass(frozen=True)
class Timed:
    images: int
    seconds: float
    startup_s: float = 0.0
    """Loader rows: from building the loader to its first batch (worker start-up and the first fill)."""
    cpu_s: float | None = None
    """Loader rows: CPU seconds of this process and its children over the timed epochs (None: no psutil)."""

    @property
    def rate(self) -> float:
        return self.images / self.seconds


Run = Callable[[], Timed]


@dataclass(frozen=True)
class Setup:
    """What every path reads: the same JPEGs as files, as local shards and as shards behind S3."""

    jpegs: list[bytes]
    train_dir: Path
    local: Manifest
    remote: Manifest | None
    """None where moto is not installed (the GPU machine's image): the S3 row prints n/a."""
    args: argparse.Namespace

    def data_config(self, workers: int) -> DataConfig:
        return DataConfig(
            resolution=self.args.resolution,
            batch_size_per_worker=self.args.batch_size,
            loader_workers=workers,
            shuffle_buffer=500,
            min_crop_scale=0.08,
        )


def single_process_limit(setup: Setup) -> Run:
    augment = train_transform(setup.args.resolution)
    for data in setup.jpegs[:64]:  # warm-up: allocator, first-call dispatch
        augment(decode(data))

    def run() -> Timed:
        t0 = time.perf_counter()
        for data in setup.jpegs:
            augment(decode(data))
        return Timed(len(setup.jpegs), time.perf_counter() - t0)

    return run


def _cpu_seconds() -> float | None:
    """CPU time of this process and its live children (loader workers are not reaped until they exit)."""
    try:
        import psutil
    except ImportError:
        return None
    me = psutil.Process()
    total = 0.0
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:  # a child that exited in between
            continue
        total += times.user + times.system
    return total


def _timed_epochs(
    batches: Callable[[int], object], *, epochs: int, sync: Callable[[], None] = lambda: None
) -> Timed:
    """Epoch 0 untimed (start-up), then ``epochs`` timed ones; ``batches(epoch)`` iterates one epoch.
    ``sync`` waits for queued device work (CUDA decoding) before a clock is read."""
    t0 = time.perf_counter()
    iterator = iter(batches(0))
    next(iterator)
    startup = time.perf_counter() - t0
    for _ in iterator:
        pass
    sync()
    images, cpu0, t1 = 0, _cpu_seconds(), time.perf_counter()
    for epoch in range(1, epochs + 1):
        for x, _ in batches(epoch):
            images += len(x)
    sync()
    seconds, cpu1 = time.perf_counter() - t1, _cpu_seconds()
    return Timed(images, seconds, startup, None if cpu0 is None or cpu1 is None else cpu1 - cpu0)


def shard_loader(manifest: Manifest, *, decode: str = "cpu") -> Callable[[Setup, int], Run | None]:
    def build(setup: Setup, workers: int) -> Run | None:
        device = torch.device("cuda") if decode == "gpu" else None
        if decode == "gpu" and not torch.cuda.is_available():
            return None

        def run() -> Timed:
            cfg = dataclasses.replace(setup.data_config(workers), decode=decode)
            loader = build_loader(manifest, cfg, train=True, device=device)

            def epoch(e: int):
                loader.set_epoch(e)
                return loader

            sync = torch.cuda.synchronize if device is not None else (lambda: None)
            return _timed_epochs(epoch, epochs=setup.args.epochs, sync=sync)

        return run

    return build


def s3_loader(setup: Setup, workers: int) -> Run | None:
    return None if setup.remote is None else shard_loader(setup.remote)(setup, workers)


def image_folder(setup: Setup, workers: int) -> Run:
    folder = datasets.ImageFolder(
        str(setup.train_dir),
        transform=T.Compose(
            [
                T.RandomResizedCrop(setup.args.resolution),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ]
        ),
    )

    def run() -> Timed:
        loader = torch.utils.data.DataLoader(
            folder,
            batch_size=setup.args.batch_size,
            shuffle=True,
            num_workers=workers,
            drop_last=True,
            persistent_workers=True,  # as ours: a training run keeps its workers for all epochs
        )
        return _timed_epochs(lambda _epoch: loader, epochs=setup.args.epochs)

    return run


def gpu_decode(setup: Setup, workers: int) -> Run | None:
    return shard_loader(setup.local, decode="gpu")(setup, workers)


def ray_data(setup: Setup, workers: int) -> Run | None:
    """``data.backend: ray_data``'s pipeline (pipeline.data.ray_ingest) read by this process, with Ray Data
    limited to ``workers`` CPUs for its read and decode tasks, on a local Ray instance started here once."""
    import ray
    import ray.data

    from pipeline.data.ray_ingest import training_dataset

    if not ray.is_initialized():
        # One CPU more than the most workers: this process's iteration (the training worker's place).
        ray.init(num_cpus=setup.args.workers + 1, include_dashboard=False, log_to_driver=False)
    cfg = dataclasses.replace(setup.data_config(workers), backend="ray_data")

    def run() -> Timed:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        context.execution_options.resource_limits = ray.data.ExecutionResources(cpu=workers)
        dataset = training_dataset(setup.local, cfg)

        def epoch(_e: int):
            batches = dataset.iter_torch_batches(batch_size=setup.args.batch_size, drop_last=True)
            return ((b["image"], b["label"]) for b in batches)

        # Ray's task processes are the raylet's children, not this process's: their CPU is not measured.
        return dataclasses.replace(_timed_epochs(epoch, epochs=setup.args.epochs), cpu_s=None)

    return run


@dataclass(frozen=True)
class Compared:
    """A path measured against our loader from local shards at the same number of workers."""

    name: str
    build: Callable[[Setup, int], Run | None]
    """One timed call at N workers, or None where the path is not available (the row prints n/a)."""
    ours_over_it: bool
    """The ratio printed: ours / this path (a baseline to beat) instead of this path / ours."""
    goal: float | None = None


COMPARED = [
    Compared("loader, S3 endpoint (moto)", s3_loader, ours_over_it=False, goal=0.85),
    Compared("ImageFolder + DataLoader (PIL)", image_folder, ours_over_it=True, goal=1.5),
    Compared("loader, decode on the GPU (data.decode: gpu)", gpu_decode, ours_over_it=False),
    Compared("Ray Data (data.backend: ray_data)", ray_data, ours_over_it=False),
]
LOADER_GOAL = 0.9  # the loader at N = 1 against the single-process limit


def _prepare(args: argparse.Namespace) -> tuple[Setup, Callable[[], None]]:
    """Generate the JPEGs, shard them locally, copy the shards behind a moto S3 server on 127.0.0.1."""
    tag = f"{args.images}x{args.image_size}"
    toy = ToyConfig(
        root=str(WORK / f"toy-{tag}"),
        image_size=args.image_size,
        pretrain_train_per_class=args.images // 10,
        pretrain_val_per_class=1,
        downstream_train_max=2,
        downstream_imbalance=1.0,
        downstream_val_per_class=1,
    )
    cores = os.cpu_count() or 1
    train_dir = generate(toy, workers=min(cores, 16)).split_dir("pretrain", "train")
    shards_dir = WORK / f"shards-{tag}"
    options = ShardOptions(samples_per_shard=SAMPLES_PER_SHARD, workers=min(cores, 16))
    local = write_shards(train_dir, str(shards_dir), options, progress=False).manifest
    jpegs = [path.read_bytes() for path in sorted(train_dir.rglob("*.jpg"))]
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        print("moto is not installed: no S3 row", file=sys.stderr)
        return Setup(jpegs, train_dir, local, None, args), lambda: None

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per shard GET otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL_S3=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    for shard in local.shards:
        storage.put_file(str(shards_dir / shard.name), f"s3://bench/train/{shard.name}")
    storage.write_bytes_atomic("s3://bench/train/manifest.json", local.to_json().encode())
    setup = Setup(jpegs, train_dir, local, load_manifest("s3://bench/train"), args)
    return setup, server.stop


def _worker_counts(args: argparse.Namespace) -> list[int]:
    if args.worker_counts:
        return sorted({int(n) for n in args.worker_counts.split(",")})
    n = args.workers
    if n <= 4:
        return list(range(1, n + 1))
    return sorted({*(2**i for i in range(n.bit_length()) if 2**i <= n), n})  # 1, 2, 4, 8, ..., N


def _table(rows: list[list[str]], align: str) -> str:
    """A Markdown table; ``align`` has one letter per column, l or r."""
    head, *body = rows
    rule = "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"
    return "\n".join(
        ["| " + " | ".join(row) + " |" for row in [head]]
        + [rule]
        + ["| " + " | ".join(row) + " |" for row in body]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cores = os.cpu_count() or 2
    p.add_argument("--workers", type=int, default=cores, help="the most loader workers N (default: cores)")
    p.add_argument("--worker-counts", default="", help="loader worker counts to measure, e.g. 1,2,3 "
                   "(default: 1..N up to 4 workers, else 1, 2, 4, ..., N)")  # fmt: skip
    p.add_argument("--images", type=int, default=0, help="training images, 10 classes (default: "
                   "max(1200, 320 x N), so that every worker gets several batches an epoch)")  # fmt: skip
    p.add_argument("--image-size", type=int, default=256, help="side of the generated JPEGs")
    p.add_argument("--resolution", type=int, default=224, help="crop fed to the network")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="rounds; medians are taken over them")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per loader call (after one untimed)")
    p.add_argument("--json", default=str(WORK / "data.json"))
    args = p.parse_args(argv)
    if args.workers < 1 or args.repeats < 1 or args.epochs < 1:
        p.error("--workers, --repeats and --epochs must be >= 1")
    args.images = args.images or max(1200, 320 * args.workers)
    torch.set_num_threads(1)
    counts = _worker_counts(args)
    compare_at = sorted({1, args.workers})
    setup, stop_server = _prepare(args)
    load_before = os.getloadavg()

    rows: dict[str, Run | None] = {"limit": single_process_limit(setup)}
    for n in counts:
        rows[f"local/{n}"] = shard_loader(setup.local)(setup, n)
    for path in COMPARED:
        for n in compare_at:
            rows[f"{path.name}/{n}"] = path.build(setup, n)
    timings: dict[str, list[Timed]] = {key: [] for key, run in rows.items() if run is not None}
    try:
        for round_index in range(args.repeats):
            for key, run in rows.items():
                if run is not None:
                    timings[key].append(run())
            print(f"round {round_index + 1}/{args.repeats} done", file=sys.stderr)
    finally:
        stop_server()
        if "ray" in sys.modules:
            sys.modules["ray"].shutdown()
    load_after = os.getloadavg()

    def rate(key: str) -> float | None:
        return statistics.median(t.rate for t in timings[key]) if key in timings else None

    def ratio(key: str, reference: str, *, scale: float = 1.0, invert: bool = False) -> float | None:
        if key not in timings or reference not in timings:
            return None
        pairs = zip(timings[key], timings[reference], strict=True)
        values = [(r.rate / (t.rate * scale)) if invert else t.rate / (r.rate * scale) for t, r in pairs]
        return statistics.median(values)

    def fmt(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    def cpu_per_1k(key: str) -> float | None:
        values = [t.cpu_s / t.images * 1000 for t in timings.get(key, []) if t.cpu_s is not None]
        return statistics.median(values) if values else None

    table = [["path", "workers", "img/s", "start-up s", "ratio", "ratio of", "host CPU s / 1k img"]]
    table.append(
        ["single-process limit (decode + augment in memory)", "1", fmt(rate("limit"), ",.0f"), "", "", "", ""]
    )
    results: dict[str, dict] = {"limit": {"img_s": rate("limit")}}
    for n in counts:
        key = f"local/{n}"
        startup = statistics.median(t.startup_s for t in timings[key])
        value = ratio(key, "limit", scale=n)
        table.append(
            [
                "loader, local shards",
                str(n),
                fmt(rate(key), ",.0f"),
                f"{startup:.2f}",
                fmt(value, ".2f"),
                f"{n} x limit",
                fmt(cpu_per_1k(key), ".2f"),
            ]
        )
        results[key] = {
            "img_s": rate(key),
            "ratio_to_n_x_limit": value,
            "startup_s": startup,
            "cpu_s_per_1k": cpu_per_1k(key),
        }
    goals = [
        [f"loader >= {LOADER_GOAL} x limit at N = 1", fmt(ratio("local/1", "limit"), ".2f"), LOADER_GOAL]
    ]
    for path in COMPARED:
        for n in compare_at:
            key = f"{path.name}/{n}"
            value = ratio(key, f"local/{n}", invert=path.ours_over_it)
            label = "local / this" if path.ours_over_it else "this / local"
            cpu = cpu_per_1k(key)
            table.append(
                [path.name, str(n), fmt(rate(key), ",.0f"), "", fmt(value, ".2f"), label, fmt(cpu, ".2f")]
            )
            results[key] = {"img_s": rate(key), "ratio": value, "ratio_of": label, "cpu_s_per_1k": cpu}
            if path.goal is not None:
                goals.append([f"{path.name}, N = {n}: {label} >= {path.goal}", fmt(value, ".2f"), path.goal])
    print(
        f"\n{len(setup.jpegs)} JPEGs of {args.image_size}px -> RandomResizedCrop({args.resolution}) + flip, "
        f"batch {args.batch_size}, {os.cpu_count()} CPU cores, median of {args.repeats} rounds, "
        f"{args.epochs} timed epochs per loader call; load average (1/5/15 min) "
        f"before {'/'.join(f'{x:.2f}' for x in load_before)}, after {'/'.join(f'{x:.2f}' for x in load_after)}\n"
    )  # fmt: skip
    print(_table(table, "lrrrrlr"))
    goal_rows = [["goal", "measured", "target", "met"]]
    for name, value, target in goals:
        met = "n/a" if value == "n/a" else ("yes" if float(value) >= target else "NO")
        goal_rows.append([name, value, str(target), met])
    print("\n" + _table(goal_rows, "lrrl"))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {
                "results": results,
                "rounds": {key: [t.rate for t in values] for key, values in timings.items()},
                "images": len(setup.jpegs),
                "image_size": args.image_size,
                "resolution": args.resolution,
                "cpu_count": os.cpu_count(),
                "load_average_before": load_before,
                "load_average_after": load_after,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

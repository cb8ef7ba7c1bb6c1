"""Training-loop benchmark (`make bench-train`): our Ray Train loop on 1 worker vs a bare PyTorch loop, and
our loop fed by synthetic batches vs by real WebDataset shards.

Both loops train the same model (``build_classifier``), with the same optimizer and lr schedule
(``build_optimizer`` / ``build_scheduler``), batch size and torch thread count:

* **bare**: a plain loop in this process on synthetic uint8 batches (a fixed set generated once and cycled,
  so data costs nothing): normalize + forward + cross-entropy + backward + optimizer and scheduler step per
  batch, timed per epoch of ``--steps`` steps (synchronized on CUDA);
* **ours**: ``pipeline.launch.launch`` starts one Ray Train worker that runs ``pipeline.train.loop.fit``
  with the same glue as ``pretrain_worker`` (``prepare_model``, optional ``torch.compile``, per-epoch
  parameter digests and ``report_epoch`` checkpoints). Its img/s is the loop's own
  ``system/images_per_s`` metric and its data wait the loop's ``system/data_wait`` (the fraction of the
  epoch's training time spent waiting for the next batch). ``--data`` picks what feeds it:

  - ``synthetic`` (default): the bare side's synthetic batches, so ours / bare is the cost of our loop;
  - ``shards``: real shards through the project's loader (``pipeline.data.loader.build_loader``: JPEG decode
    + RandomResizedCrop + flip in ``--loader-workers`` DataLoader processes, batches pinned on CUDA), the
    cost of the data pipeline. The shards are the embedded toy dataset (``pipeline.data.toy``, 10 classes)
    rendered at ``--shard-image-size`` px (default resolution / 0.875: 256 px JPEGs for a 224 crop, so the
    decode is ImageNet-like: ImageNet resized to a short side of 256 is ~1.3x those pixels), enough for one
    epoch of ``--steps`` steps, generated once into ``--shards DIR`` and reused; the model keeps its
    ``--num-classes`` head (labels 0-9 of 1000), so both feeds train the identical network;
  - ``both``: synthetic, then shards, in the same run (and the same Ray instance): the ratio shards /
    synthetic is only meaningful within one run.

Epoch 0 of each side is warm-up (allocator, cuDNN autotuning, compilation); a run's img/s is the median
of its later epochs. The sides run interleaved ``--repeats`` times, in a rotating order, and each goal is
judged on the median of the per-repeat ratios: the machine is shared and noisy, so only ratios measured in
the same run are meaningful. Goals: ours (synthetic) / bare >= 0.95, and shards / synthetic >= 0.95.

The shard loader re-forks its DataLoader workers every epoch (``persistent_workers=False``), so each epoch
starts with an empty pipeline; in an ImageNet epoch (5,000 steps) that is noise, in a benchmark epoch of
100 steps it is several percent. Every "ours" epoch is therefore also timed in steady state: from the
delivery of batch ``--steady-skip`` to the end of the epoch (synchronized), with the wait for batches in
that window as the steady data wait; the epoch's time to its first batch is printed too. The
shards / synthetic goal is judged on the steady-state rates; the loop's whole-epoch rates are printed
beside them. The per-epoch costs outside the timed steps (validation, state capture, digests, checkpoint +
report) are printed separately; they do not count in the loop's img/s.

    python benchmarks/bench_train.py [--model cifar_resnet20] [--resolution 32] [--batch-size 64]
        [--steps 30] [--epochs 4] [--repeats 3] [--device cpu|cuda] [--channels-last] [--amp auto|bf16|off]
        [--compile] [--cpus-per-worker N] [--threads N] [--data synthetic|shards|both]
        [--loader-workers N] [--shards DIR] [--shard-image-size PX] [--augment basic|trivialaugment|...]
        [--steady-skip K] [--json PATH]

On a GPU, e.g. (``make gpu-check`` runs this): --model resnet50 --resolution 224 --batch-size 256
--device cuda --channels-last --amp bf16 --data both [--compile].
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.config import (
    CheckpointConfig,
    EarlyStoppingConfig,
    ModelConfig,
    OptimConfig,
    ScalingConfig,
    TrainConfig,
)
from pipeline.data.transforms import normalize
from pipeline.train.build import build_classifier
from pipeline.train.optim import build_optimizer, build_scheduler

GOAL = 0.95
DISTINCT_BATCHES = 8
"""Synthetic batches generated per side and cycled through."""
TOY_CLASSES = 10
"""Classes of the embedded dataset the shards are made of."""


@dataclass(frozen=True)
class Settings:
    model: str
    resolution: int
    batch_size: int
    steps: int
    epochs: int
    device: str
    channels_last: bool
    amp: str
    compile: bool
    threads: int
    num_classes: int

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs,
            early_stopping=EarlyStoppingConfig(enabled=False),
            amp=self.amp,  # type: ignore[arg-type]
            channels_last=self.channels_last,
            compile=self.compile,
            sanity_val_batches=0,
        )


@dataclass(frozen=True)
class ShardSource:
    """The shards an "ours" side streams, and how the loader decodes them."""

    train_manifest: str
    val_manifest: str
    loader_workers: int
    augment: str
    image_size: int
    """Side of the stored JPEGs, px."""


@dataclass(frozen=True)
class WorkerPlan:
    """What the Ray worker of an "ours" side needs: the shared settings and its feed."""

    settings: Settings
    shards: ShardSource | None
    """None: the synthetic batches."""
    steady_skip: int


# --------------------------------------------------------------------------------------------------------
# Shared by both sides


class SyntheticLoader:
    """What ``fit`` needs from a loader: ``set_epoch``, ``len`` and batches of (uint8 NCHW, int64 labels)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], steps: int) -> None:
        self.batches = batches
        self.steps = steps

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for index in range(self.steps):
            yield self.batches[index % len(self.batches)]


class StepClock:
    """Wraps a training loader and times each epoch from the loop's side: when each batch was handed over
    and how long the loop waited for it. The epoch ends at :meth:`finish`, which the validation loader
    (wrapped by :meth:`marking_end`) calls when ``fit`` starts evaluating: ``fit`` synchronizes the GPU
    right after the last step, so that is when the epoch's GPU work is done. (Synchronizing in here, at
    the loader's exhaustion, would count the queued GPU work as the loop's data wait.)

    Each epoch appends ``first_batch_s`` (iteration start to the first batch: the loader's start-up),
    ``steady_images_per_s`` and ``steady_data_wait`` (from the delivery of batch ``skip`` to the end) to
    ``epochs``."""

    def __init__(self, inner, *, skip: int) -> None:
        self.inner = inner
        self.skip = skip
        self.epochs: list[dict[str, float]] = []
        self._pending: tuple[float, list[float], list[float], list[int]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        started = time.perf_counter()
        delivered: list[float] = []
        waits: list[float] = []
        sizes: list[int] = []
        iterator = iter(self.inner)
        while True:
            asked = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                break
            now = time.perf_counter()
            delivered.append(now)
            waits.append(now - asked)
            sizes.append(len(batch[1]))
            yield batch
        self._pending = (started, delivered, waits, sizes)

    def finish(self) -> None:
        """End the epoch just iterated (no-op when there is none)."""
        if self._pending is None:
            return
        ended = time.perf_counter()
        started, delivered, waits, sizes = self._pending
        self._pending = None
        k = min(self.skip, len(delivered) - 1)
        window = max(ended - delivered[k], 1e-9)
        self.epochs.append(
            {
                "first_batch_s": delivered[0] - started,
                "steady_images_per_s": sum(sizes[k:]) / window,
                "steady_data_wait": sum(waits[k + 1 :]) / window,
            }
        )

    def marking_end(self, val_loader) -> _EndMarker:
        return _EndMarker(val_loader, self)


class _EndMarker:
    """A validation loader whose iteration first ends the clock's training epoch."""

    def __init__(self, inner, clock: StepClock) -> None:
        self.inner = inner
        self.clock = clock

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        self.clock.finish()
        yield from self.inner


def synthetic_batches(s: Settings, count: int = DISTINCT_BATCHES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed random batches in the shard loader's format; pinned on CUDA, as its DataLoader pins them."""
    generator = torch.Generator().manual_seed(0)
    shape = (s.batch_size, 3, s.resolution, s.resolution)
    pin = s.device == "cuda"
    batches = []
    for _ in range(count):
        images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, s.num_classes, (s.batch_size,), dtype=torch.int64, generator=generator)
        batches.append((images.pin_memory(), labels.pin_memory()) if pin else (images, labels))
    return batches


def build_parts(s: Settings, device: torch.device, *, steps_per_epoch: int):
    """Model (on ``device``, channels_last if asked), optimizer and schedule, as ``build_run`` makes them."""
    torch.manual_seed(0)
    model = build_classifier(ModelConfig(name=s.model), num_classes=s.num_classes).to(device)
    if s.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optim_cfg = OptimConfig()
    optimizer = build_optimizer(model, optim_cfg, global_batch_size=s.batch_size)
    scheduler = build_scheduler(optimizer, optim_cfg, steps_per_epoch=steps_per_epoch, epochs=s.epochs)
    return model, optimizer, scheduler, optim_cfg


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------------
# Shards: the embedded dataset at the benchmark's image size


def shard_counts(*, steps: int, batch_size: int) -> tuple[int, int]:
    """(train, val) images per class: one epoch of at least ``steps`` batches, about one val batch."""
    return math.ceil(steps * batch_size / TOY_CLASSES), math.ceil(batch_size / TOY_CLASSES)


def ensure_shards(
    root: Path, *, image_size: int, steps: int, batch_size: int, loader_workers: int, augment: str
) -> ShardSource:
    """The toy dataset's pre-training task at ``image_size`` px, sharded under ``root``; generated in
    parallel processes the first time, reused afterwards (``generate`` and ``write_shards`` skip what is
    already there and unchanged)."""
    from pipeline.config import ShardConfig, ToyConfig
    from pipeline.data.prepare import prepare_embedded
    from pipeline.data.toy import generate

    train_per_class, val_per_class = shard_counts(steps=steps, batch_size=batch_size)
    # Absolute: the Ray worker that reads the manifests does not run in this process's directory.
    directory = root.resolve() / f"{image_size}px-{train_per_class}x{TOY_CLASSES}"
    toy = ToyConfig(
        root=str(directory / "raw"),
        image_size=image_size,
        pretrain_train_per_class=train_per_class,
        pretrain_val_per_class=val_per_class,
        downstream_train_max=2,
        downstream_imbalance=1.0,
        downstream_val_per_class=1,
    )
    cpus = os.cpu_count() or 1
    started = time.perf_counter()
    generate(toy, workers=cpus)  # one process per class folder (10 + val + downstream)
    # At least 4 shards per loader worker, so workers own whole shards (fewer: every worker reads them all).
    per_shard = max(1, min(1000, train_per_class * TOY_CLASSES // (4 * max(1, loader_workers))))
    prepared = prepare_embedded(
        toy, ShardConfig(dest=str(directory / "shards"), samples_per_shard=per_shard, workers=cpus)
    )
    print(
        f"shards: {train_per_class * TOY_CLASSES} train / {val_per_class * TOY_CLASSES} val {image_size} px "
        f"JPEGs in {directory} ({time.perf_counter() - started:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    urls = prepared.manifests["pretrain"]
    return ShardSource(
        train_manifest=urls["train"],
        val_manifest=urls["val"],
        loader_workers=loader_workers,
        augment=augment,
        image_size=image_size,
    )


def shard_loaders(s: Settings, source: ShardSource):
    """(train, val) loaders of one rank, configured as a recipe's ``data`` section would configure them."""
    import multiprocessing

    from pipeline.config import DataConfig
    from pipeline.data.loader import build_loader
    from pipeline.data.manifest import load_manifest

    if source.loader_workers > 0:
        # As pretrain_worker does in a Ray actor (threads: a forked loader child can deadlock): fork server.
        multiprocessing.set_forkserver_preload(["pipeline.data.loader"])
    cfg = DataConfig(
        train_manifest=source.train_manifest,
        val_manifest=source.val_manifest,
        resolution=s.resolution,
        batch_size_per_worker=s.batch_size,
        loader_workers=source.loader_workers,
        augment=source.augment,  # type: ignore[arg-type]
        min_crop_scale=0.08,  # the ImageNet recipes' RandomResizedCrop scale
        multiprocessing_context="forkserver" if source.loader_workers > 0 else "fork",
    )
    return (
        build_loader(load_manifest(source.train_manifest), cfg, train=True),
        build_loader(load_manifest(source.val_manifest), cfg, train=False),
    )


# --------------------------------------------------------------------------------------------------------
# Bare PyTorch


def run_bare(s: Settings) -> dict[str, Any]:
    """Per-epoch img/s of a plain loop in this process."""
    torch.set_num_threads(s.threads)
    device = torch.device("cuda", torch.cuda.current_device()) if s.device == "cuda" else torch.device("cpu")
    model, optimizer, scheduler, optim_cfg = build_parts(s, device, steps_per_epoch=s.steps)
    if s.compile:
        model = torch.compile(model)
    model.train()
    batches = synthetic_batches(s)
    amp = s.amp == "bf16" or (s.amp == "auto" and device.type == "cuda")  # the loop's rule
    rates = []
    for _ in range(s.epochs):
        _synchronize(device)
        started = time.perf_counter()
        for step in range(s.steps):
            images, labels = batches[step % len(batches)]
            x = normalize(images, device=device, channels_last=s.channels_last)
            y = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=optim_cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        _synchronize(device)
        rates.append(s.steps * s.batch_size / (time.perf_counter() - started))
    if not torch.isfinite(loss):
        raise FloatingPointError(f"bare loop: loss is {loss.item()}")
    del model, optimizer, scheduler, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()  # leave the GPU's memory to the Ray worker
    return {"epoch_rates": rates}


# --------------------------------------------------------------------------------------------------------
# Ours: Ray Train worker (pickled by value with this module's globals, as the script runs as __main__)


def bench_worker(plan: WorkerPlan) -> None:
    """``pretrain_worker`` with the plan's loaders and no MLflow, timing the epoch end."""
    import ray.train
    import ray.train.torch

    from pipeline.launch import report_epoch
    from pipeline.train.build import replica_digests
    from pipeline.train.loop import fit, unwrap

    s = plan.settings
    torch.set_num_threads(s.threads)
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    if plan.shards is None:
        batches = synthetic_batches(s)
        train_inner, val_loader = SyntheticLoader(batches, s.steps), SyntheticLoader(batches[:1], 1)
    else:
        train_inner, val_loader = shard_loaders(s, plan.shards)
    train_loader = StepClock(train_inner, skip=plan.steady_skip)
    val_loader = train_loader.marking_end(val_loader)
    model, optimizer, scheduler, optim_cfg = build_parts(s, device, steps_per_epoch=len(train_loader))
    model = ray.train.torch.prepare_model(model, move_to_device=False)
    if s.compile:
        model = torch.compile(model)
    history: list[dict[str, float]] = []
    last_exit = [time.perf_counter()]

    def on_epoch_end(state, metrics: dict[str, float]) -> None:
        entered = time.perf_counter()
        train_loader.finish()  # already done by validation; kept in case fit ever skips it
        digests = replica_digests(unwrap(model))
        digested = time.perf_counter()
        report_epoch(state, {**metrics, "param_digests": digests}, rank=rank)
        done = time.perf_counter()
        history.append(
            {
                "images_per_s": metrics["system/images_per_s"],
                "data_wait": metrics["system/data_wait"],
                "epoch_s": metrics["system/epoch_s"],  # train + validation
                "wall_s": done - last_exit[0],  # epoch boundary to epoch boundary, everything included
                "digest_s": digested - entered,
                "report_s": done - digested,  # save_checkpoint + ray.train.report (copy to storage)
                "steps": len(train_loader),
                **train_loader.epochs[-1],
            }
        )
        last_exit[0] = done

    result = fit(
        model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_loader=train_loader,
        val_loader=val_loader,
        optim_cfg=optim_cfg,
        train_cfg=s.train_config(),
        device=device,
        on_epoch_end=on_epoch_end,
    )
    # One more report carries the whole history (launch() returns the latest checkpoint's metrics).
    with tempfile.TemporaryDirectory(prefix="bench-train-") as directory:
        checkpoint = None
        if rank == 0:
            Path(directory, "history.json").write_text(json.dumps(history))
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(
            {"val/top1": result.history[-1]["val/top1"], "bench_history": history},
            checkpoint=checkpoint,
            checkpoint_dir_name="bench-summary",
        )


def run_ours(plan: WorkerPlan, *, cpus_per_worker: float, storage: str, name: str) -> dict[str, Any]:
    from pipeline.launch import launch

    started = time.perf_counter()
    result = launch(
        bench_worker,
        spec=plan,
        scaling=ScalingConfig(
            num_workers=1, use_gpu=plan.settings.device == "cuda", cpus_per_worker=cpus_per_worker
        ),
        checkpoint=CheckpointConfig(num_to_keep=1, max_failures=0),
        storage_path=storage,
        name=name,
        metric="val/top1",
        mode="max",
    )
    history = result.metrics["bench_history"]
    return {
        "epoch_rates": [h["images_per_s"] for h in history],
        "history": history,
        "launch_s": time.perf_counter() - started,
    }


# --------------------------------------------------------------------------------------------------------
# Driver


def timed_rate(epoch_rates: list[float]) -> float:
    """The median of the timed epochs (epoch 0 is warm-up): robust to a burst of foreign load."""
    return statistics.median(epoch_rates[1:])


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat; None where there is none."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + fields[4], sum(fields)  # idle + iowait


def wait_for_quiet(*, idle: float = 0.85, timeout_s: float = 10.0) -> float:
    """Wait (at most ``timeout_s``) until the CPUs were >= ``idle`` idle over half a second, so a side does
    not start while Ray is still starting or tearing down processes; returns the seconds waited."""
    started = time.perf_counter()
    before = _cpu_times()
    while before is not None and time.perf_counter() - started < timeout_s:
        time.sleep(0.5)
        after = _cpu_times()
        assert after is not None
        if (after[0] - before[0]) / max(after[1] - before[1], 1) >= idle:
            break
        before = after
    return time.perf_counter() - started


def side_line(result: dict[str, Any]) -> str:
    """One side's figures as soon as it finished (the tables come at the end, and a run may be cut short)."""
    line = f"{timed_rate(result['epoch_rates']):,.0f} img/s"
    if "history" in result:
        timed = result["history"][1:]
        steady = statistics.median(h["steady_images_per_s"] for h in timed)
        wait = statistics.median(h["data_wait"] for h in timed)
        line += f" (steady state {steady:,.0f}), data wait {wait:.3f}"
    return line


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar_resnet20")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="steps per epoch (shards: images for one epoch)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per run; the first one is warm-up")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs of every side; medians judged")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto", help="as train.amp")
    p.add_argument("--compile", action="store_true", help="torch.compile the model on every side")
    p.add_argument("--num-classes", type=int, help="default: 10 for cifar_*, else 1000")
    p.add_argument(
        "--cpus-per-worker", type=float, help="CPUs Ray reserves for the worker (default: all, at most 8)"
    )
    p.add_argument("--threads", type=int, help="torch threads on both sides (default: cpus-per-worker)")
    p.add_argument(
        "--data",
        choices=["synthetic", "shards", "both"],
        default="synthetic",
        help="what feeds our loop: synthetic batches, real shards, or both in turn",
    )
    p.add_argument(
        "--loader-workers", type=int, help="shards: DataLoader processes (default: CPUs - 2, 1..12)"
    )
    p.add_argument("--shards", default=".cache/bench/train-shards", help="shards: where they are made/reused")
    p.add_argument("--shard-image-size", type=int, help="shards: stored JPEG side (default resolution/0.875)")
    p.add_argument(
        "--augment",
        choices=["basic", "trivialaugment", "randaugment", "autoaugment", "augmix"],
        default="basic",
        help="shards: data.augment after RandomResizedCrop + flip",
    )
    p.add_argument(
        "--steady-skip", type=int, help="batches each epoch's steady-state window skips (default: steps/10)"
    )
    p.add_argument("--json", default=".cache/bench/train.json")
    args = p.parse_args(argv)
    if args.epochs < 2 or args.steps < 1 or args.repeats < 1:
        p.error("--epochs must be >= 2 (the first is warm-up), --steps and --repeats >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    cpus = os.cpu_count() or 1
    if args.cpus_per_worker is None:
        args.cpus_per_worker = float(min(cpus, 8))
    if args.cpus_per_worker > cpus:
        p.error(f"--cpus-per-worker {args.cpus_per_worker:g} exceeds this machine's {cpus} CPUs")
    if args.threads is None:
        args.threads = max(1, int(args.cpus_per_worker))
    if args.num_classes is None:
        args.num_classes = 10 if args.model.startswith("cifar_") else 1000
    if args.loader_workers is None:
        args.loader_workers = max(1, min(12, cpus - 2))
    if args.shard_image_size is None:
        args.shard_image_size = round(args.resolution / 0.875)
    if args.shard_image_size < args.resolution:
        p.error(f"--shard-image-size {args.shard_image_size} is below --resolution {args.resolution}")
    if args.steady_skip is None:
        args.steady_skip = args.steps // 10
    if not 0 <= args.steady_skip < args.steps:
        p.error("--steady-skip must be in [0, --steps)")
    return args


SIDE_LABELS = {"bare": "bare PyTorch loop", "synthetic": "ours, synthetic", "shards": "ours, shards"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/bench_train.py", *(sys.argv[1:] if argv is None else argv)])
    s = Settings(
        model=args.model,
        resolution=args.resolution,
        batch_size=args.batch_size,
        steps=args.steps,
        epochs=args.epochs,
        device=args.device,
        channels_last=args.channels_last,
        amp=args.amp,
        compile=args.compile,
        threads=args.threads,
        num_classes=args.num_classes,
    )
    feeds = {"synthetic": ["synthetic"], "shards": ["shards"], "both": ["synthetic", "shards"]}[args.data]
    sides = ["bare", *feeds]
    t0 = time.perf_counter()
    source = None
    if "shards" in feeds:
        # Before Ray: generation uses every CPU.
        source = ensure_shards(
            Path(args.shards),
            image_size=args.shard_image_size,
            steps=args.steps,
            batch_size=args.batch_size,
            loader_workers=args.loader_workers,
            augment=args.augment,
        )
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    # A private local instance (a bare ray.init, or ensure_ray with RAY_ADDRESS set, would join a cluster).
    ray_started = time.perf_counter()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - ray_started

    runs: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-train-storage-") as storage:
            for repeat in range(args.repeats):
                # Rotate the order, so a drift in the machine's load does not favour one side.
                order = sides[repeat % len(sides) :] + sides[: repeat % len(sides)]
                run: dict[str, Any] = {}
                for side in order:
                    waited = wait_for_quiet()
                    print(
                        f"[{time.perf_counter() - t0:5.0f} s] repeat {repeat + 1}/{args.repeats}: "
                        f"{SIDE_LABELS[side]} (waited {waited:.1f} s for idle CPUs) ...",
                        file=sys.stderr,
                        flush=True,
                    )
                    if side == "bare":
                        run["bare"] = run_bare(s)
                    else:
                        plan = WorkerPlan(
                            settings=s,
                            shards=source if side == "shards" else None,
                            steady_skip=args.steady_skip,
                        )
                        run[side] = run_ours(
                            plan,
                            cpus_per_worker=args.cpus_per_worker,
                            storage=storage,
                            name=f"bench-train-{os.getpid()}-{repeat}-{side}",
                        )
                    print(f"    {SIDE_LABELS[side]}: {side_line(run[side])}", file=sys.stderr, flush=True)
                runs.append(run)
    finally:
        ray.shutdown()
    summary = summarize(runs, s=s, args=args, feeds=feeds, source=source, ray_init_s=ray_init_s)
    summary["command"] = command
    print(f"command: {command}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


def summarize(
    runs: list[dict[str, Any]],
    *,
    s: Settings,
    args: argparse.Namespace,
    feeds: list[str],
    source: ShardSource | None,
    ray_init_s: float,
) -> dict[str, Any]:
    """Print the tables and verdicts; returns what goes into the JSON file."""

    def per_repeat(side: str, key: str) -> list[float]:
        """A history key of one "ours" side, per repeat: the median of its timed epochs."""
        return [timed_rate([h[key] for h in r[side]["history"]]) for r in runs]

    def ratios(top: list[float], bottom: list[float]) -> list[float]:
        return [a / b for a, b in zip(top, bottom, strict=True)]

    bare = [timed_rate(r["bare"]["epoch_rates"]) for r in runs]
    rates = {side: per_repeat(side, "images_per_s") for side in feeds}
    steady = {side: per_repeat(side, "steady_images_per_s") for side in feeds}
    waits = {side: per_repeat(side, "data_wait") for side in feeds}
    steady_waits = {side: per_repeat(side, "steady_data_wait") for side in feeds}
    first_batch = {side: per_repeat(side, "first_batch_s") for side in feeds}
    # End to end: train images over epoch-boundary-to-boundary wall time (validation, state capture,
    # digests and checkpoint reports included), same timed epochs.
    end_to_end = {
        side: [
            timed_rate([h["steps"] * s.batch_size / h["wall_s"] for h in r[side]["history"]]) for r in runs
        ]
        for side in feeds
    }

    cols = " | ".join(f"repeat {i + 1}" for i in range(len(runs)))
    sep = "---:|" * len(runs)
    feed_text = ""
    if source is not None:
        feed_text = (
            f"; shards: {source.image_size} px JPEGs, {source.loader_workers} loader workers, "
            f"augment={source.augment}"
        )
    print(
        f"\n{s.model} at {s.resolution}px, batch {s.batch_size}, {s.steps} steps x {s.epochs} epochs "
        f"(epoch 0 = warm-up), device {s.device}, amp={s.amp}, channels_last={s.channels_last}, "
        f"compile={s.compile}, {s.threads} torch threads, Ray worker with {args.cpus_per_worker:g} CPUs, "
        f"{os.cpu_count()} CPU cores; ray.init {ray_init_s:.1f} s{feed_text}; steady state from batch "
        f"{args.steady_skip}"
    )
    rows: dict[str, list[float]] = {"bare PyTorch loop (synthetic)": bare}
    for side in feeds:
        rows[f"{SIDE_LABELS[side]}: loop's system/images_per_s"] = rates[side]
        rows[f"{SIDE_LABELS[side]}: steady state"] = steady[side]
        rows[f"{SIDE_LABELS[side]}: end to end (+ val, state, digest, checkpoint)"] = end_to_end[side]
    print(f"\n| img/s | {cols} | median |\n|---|{sep}---:|")
    for label, values in rows.items():
        cells = " | ".join(f"{v:,.0f}" for v in values)
        print(f"| {label} | {cells} | {statistics.median(values):,.0f} |")

    fractions: dict[str, list[float]] = {}
    for side in feeds:
        fractions[f"{SIDE_LABELS[side]}: data wait (loop's system/data_wait)"] = waits[side]
        fractions[f"{SIDE_LABELS[side]}: data wait, steady state"] = steady_waits[side]
        fractions[f"{SIDE_LABELS[side]}: time to first batch, s"] = first_batch[side]
    judged: dict[str, tuple[list[float], bool]] = {}  # ratio rows; True: a goal is judged on it
    first = feeds[0]
    judged[f"{SIDE_LABELS[first]} / bare (loop's img/s)"] = (ratios(rates[first], bare), first == "synthetic")
    judged[f"{SIDE_LABELS[first]} end to end / bare"] = (ratios(end_to_end[first], bare), False)
    if feeds == ["synthetic", "shards"]:
        judged["shards / synthetic, steady state"] = (ratios(steady["shards"], steady["synthetic"]), True)
        judged["shards / synthetic, loop's img/s"] = (ratios(rates["shards"], rates["synthetic"]), False)
    print(f"\n| ratio, fraction | {cols} | median |\n|---|{sep}---:|")
    for label, (values, _) in judged.items():
        print(f"| {label} | {' | '.join(f'{v:.3f}' for v in values)} | {statistics.median(values):.3f} |")
    for label, values in fractions.items():
        print(f"| {label} | {' | '.join(f'{v:.3f}' for v in values)} | {statistics.median(values):.3f} |")

    overheads: dict[str, dict[str, list[float]]] = {}
    for side in feeds:

        def timed(key: str, side: str = side) -> list[float]:
            return [_mean([h[key] for h in r[side]["history"][1:]]) for r in runs]

        overheads[side] = {
            "validation + metrics, s/epoch": [
                _mean(
                    [
                        h["epoch_s"] - h["steps"] * s.batch_size / h["images_per_s"]
                        for h in r[side]["history"][1:]
                    ]
                )
                for r in runs
            ],
            "state capture + best-weights copy, s/epoch": [
                _mean(
                    [
                        h["wall_s"] - h["epoch_s"] - h["digest_s"] - h["report_s"]
                        for h in r[side]["history"][1:]
                    ]
                )
                for r in runs
            ],
            "parameter digests, s/epoch": timed("digest_s"),
            "checkpoint save + ray.train.report, s/epoch": timed("report_s"),
            "launch() wall incl. worker start, s": [r[side]["launch_s"] for r in runs],
        }
        print(f"\n| {SIDE_LABELS[side]}: per-epoch costs outside the timed steps | {cols} |\n|---|{sep}")
        for label, values in overheads[side].items():
            print(f"| {label} | {' | '.join(f'{v:.3f}' for v in values)} |")

    verdicts = {}
    print()
    for label, (values, is_goal) in judged.items():
        if is_goal:
            median = statistics.median(values)
            verdicts[label] = median
            print(
                f"ratio {label} (median of {len(runs)} interleaved repeats): {median:.3f}; goal >= {GOAL}: "
                f"{'met' if median >= GOAL else 'NOT met'}"
            )
    return {
        "settings": dataclasses.asdict(s),
        "data": args.data,
        "shards": None if source is None else dataclasses.asdict(source),
        "steady_skip": args.steady_skip,
        "cpus_per_worker": args.cpus_per_worker,
        "cpu_count": os.cpu_count(),
        "bare_images_per_s": bare,
        "ours_images_per_s": rates[first],  # the first feed (synthetic unless --data shards)
        "ours_end_to_end_images_per_s": end_to_end[first],
        "ratio_median": statistics.median(judged[f"{SIDE_LABELS[first]} / bare (loop's img/s)"][0]),
        "ratio_end_to_end_median": statistics.median(judged[f"{SIDE_LABELS[first]} end to end / bare"][0]),
        "images_per_s": rates,
        "steady_images_per_s": steady,
        "end_to_end_images_per_s": end_to_end,
        "data_wait": waits,
        "steady_data_wait": steady_waits,
        "first_batch_s": first_batch,
        "ratios": {label: values for label, (values, _) in judged.items()},
        "goals": {"ratio": GOAL, "judged": verdicts},
        "overheads": overheads,
        "runs": runs,
        "ray_init_s": ray_init_s,
    }


if __name__ == "__main__":
    sys.exit(main())

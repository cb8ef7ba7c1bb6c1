"""Training-loop benchmark (`make bench-train`): our Ray Train loop on 1 worker vs a bare PyTorch loop.

Both sides train the same model (``build_classifier``), with the same optimizer and lr schedule
(``build_optimizer`` / ``build_scheduler``), batch size, torch thread count and synthetic uint8 batches
(a fixed set generated once per side and cycled, so data costs nothing on either side):

* **bare**: a plain loop in this process: normalize + forward + cross-entropy + backward + optimizer and
  scheduler step per batch, timed per epoch of ``--steps`` steps (synchronized on CUDA);
* **ours**: ``pipeline.launch.launch`` starts one Ray Train worker that runs ``pipeline.train.loop.fit``
  with the same glue as ``pretrain_worker`` (``prepare_model``, optional ``torch.compile``, per-epoch
  parameter digests and ``report_epoch`` checkpoints). Its img/s is the loop's own
  ``system/images_per_s`` metric.

Epoch 0 of each side is warm-up (allocator, cuDNN autotuning, compilation); a run's img/s is the median
of its later epochs. The sides run interleaved ``--repeats`` times and the goal, ratio ours / bare >= 0.95, is judged on
the median of the per-repeat ratios: the machine is shared and noisy, so only ratios measured in the same
run are meaningful. The per-epoch costs outside the timed steps (validation, state capture, digests,
checkpoint + report) are printed separately; they do not count in the loop's img/s.

    python benchmarks/bench_train.py [--model cifar_resnet20] [--resolution 32] [--batch-size 64]
        [--steps 30] [--epochs 4] [--repeats 3] [--device cpu|cuda] [--channels-last] [--amp auto|bf16|off]
        [--compile] [--cpus-per-worker N] [--threads N]

On a GPU, e.g.: --model resnet50 --resolution 224 --batch-size 256 --device cuda --channels-last --amp bf16
[--compile].
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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


# --------------------------------------------------------------------------------------------------------
# Shared by both sides


class SyntheticLoader:
    """What ``fit`` needs from a loader: ``set_epoch``, ``len`` and batches of (uint8 NCHW, int64 labels).

    With ``sync_device`` (CUDA) it waits for the device before reporting exhaustion: the loop's timer stops
    when the loader is exhausted, before anything synchronizes, so without this the last steps' queued GPU
    work would not count in ``system/images_per_s`` (it shows up as data wait instead).
    """

    def __init__(
        self,
        batches: list[tuple[torch.Tensor, torch.Tensor]],
        steps: int,
        sync_device: torch.device | None = None,
    ) -> None:
        self.batches = batches
        self.steps = steps
        self.sync_device = sync_device

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for index in range(self.steps):
            yield self.batches[index % len(self.batches)]
        if self.sync_device is not None:
            _synchronize(self.sync_device)


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


def build_parts(s: Settings, device: torch.device):
    """Model (on ``device``, channels_last if asked), optimizer and schedule, as ``build_run`` makes them."""
    torch.manual_seed(0)
    model = build_classifier(ModelConfig(name=s.model), num_classes=s.num_classes).to(device)
    if s.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optim_cfg = OptimConfig()
    optimizer = build_optimizer(model, optim_cfg, global_batch_size=s.batch_size)
    scheduler = build_scheduler(optimizer, optim_cfg, steps_per_epoch=s.steps, epochs=s.epochs)
    return model, optimizer, scheduler, optim_cfg


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------------
# Bare PyTorch


def run_bare(s: Settings) -> dict[str, Any]:
    """Per-epoch img/s of a plain loop in this process."""
    torch.set_num_threads(s.threads)
    device = torch.device("cuda", torch.cuda.current_device()) if s.device == "cuda" else torch.device("cpu")
    model, optimizer, scheduler, optim_cfg = build_parts(s, device)
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


def bench_worker(s: Settings) -> None:
    """``pretrain_worker`` with synthetic loaders instead of shards and no MLflow, timing the epoch end."""
    import ray.train
    import ray.train.torch

    from pipeline.launch import report_epoch
    from pipeline.train.build import replica_digests
    from pipeline.train.loop import fit, unwrap

    torch.set_num_threads(s.threads)
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    model, optimizer, scheduler, optim_cfg = build_parts(s, device)
    model = ray.train.torch.prepare_model(model, move_to_device=False)
    if s.compile:
        model = torch.compile(model)
    batches = synthetic_batches(s)
    history: list[dict[str, float]] = []
    last_exit = [time.perf_counter()]

    def on_epoch_end(state, metrics: dict[str, float]) -> None:
        entered = time.perf_counter()
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
            }
        )
        last_exit[0] = done

    result = fit(
        model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_loader=SyntheticLoader(batches, s.steps, sync_device=device),
        val_loader=SyntheticLoader(batches[:1], 1),
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


def run_ours(s: Settings, *, cpus_per_worker: float, storage: str, name: str) -> dict[str, Any]:
    from pipeline.launch import launch

    started = time.perf_counter()
    result = launch(
        bench_worker,
        spec=s,
        scaling=ScalingConfig(num_workers=1, use_gpu=s.device == "cuda", cpus_per_worker=cpus_per_worker),
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
    """The median img/s of the timed epochs (epoch 0 is warm-up): robust to a burst of foreign load."""
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


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar_resnet20")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="steps per epoch")
    p.add_argument("--epochs", type=int, default=4, help="epochs per run; the first one is warm-up")
    p.add_argument("--repeats", type=int, default=3, help="interleaved bare/ours runs; the median is judged")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto", help="as train.amp")
    p.add_argument("--compile", action="store_true", help="torch.compile the model on both sides")
    p.add_argument("--num-classes", type=int, help="default: 10 for cifar_*, else 1000")
    p.add_argument(
        "--cpus-per-worker", type=float, help="CPUs Ray reserves for the worker (default: all, at most 8)"
    )
    p.add_argument("--threads", type=int, help="torch threads on both sides (default: cpus-per-worker)")
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
    return args


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
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    # A private local instance (a bare ray.init, or ensure_ray with RAY_ADDRESS set, would join a cluster).
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - t0

    runs: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-train-storage-") as storage:
            for repeat in range(args.repeats):
                # Alternate the order, so a drift in the machine's load does not favour one side.
                order = ("ours", "bare") if repeat % 2 == 0 else ("bare", "ours")
                run: dict[str, Any] = {}
                for side in order:
                    waited = wait_for_quiet()
                    print(
                        f"[{time.perf_counter() - t0:5.0f} s] repeat {repeat + 1}/{args.repeats}: {side} "
                        f"(waited {waited:.1f} s for idle CPUs) ...",
                        file=sys.stderr,
                        flush=True,
                    )
                    if side == "bare":
                        run["bare"] = run_bare(s)
                    else:
                        run["ours"] = run_ours(
                            s,
                            cpus_per_worker=args.cpus_per_worker,
                            storage=storage,
                            name=f"bench-train-{os.getpid()}-{repeat}",
                        )
                runs.append(run)
    finally:
        ray.shutdown()

    bare = [timed_rate(r["bare"]["epoch_rates"]) for r in runs]
    ours = [timed_rate(r["ours"]["epoch_rates"]) for r in runs]
    # End to end: train images over epoch-boundary-to-boundary wall time (validation, state capture,
    # digests and checkpoint reports included), same timed epochs.
    images = s.steps * s.batch_size
    ours_e2e = [timed_rate([images / h["wall_s"] for h in r["ours"]["history"]]) for r in runs]
    ratios = [o / b for o, b in zip(ours, bare, strict=True)]
    ratios_e2e = [o / b for o, b in zip(ours_e2e, bare, strict=True)]
    ratio = statistics.median(ratios)

    def timed(key: str) -> list[float]:
        return [_mean([h[key] for h in r["ours"]["history"][1:]]) for r in runs]

    overheads = {
        "validation (1 batch) + metrics, s/epoch": [
            _mean([h["epoch_s"] - images / h["images_per_s"] for h in r["ours"]["history"][1:]]) for r in runs
        ],
        "state capture + best-weights copy, s/epoch": [
            _mean(
                [h["wall_s"] - h["epoch_s"] - h["digest_s"] - h["report_s"] for h in r["ours"]["history"][1:]]
            )
            for r in runs
        ],
        "parameter digests, s/epoch": timed("digest_s"),
        "checkpoint save + ray.train.report, s/epoch": timed("report_s"),
        "data wait fraction (loop metric)": timed("data_wait"),
        "launch() wall incl. worker start, s": [r["ours"]["launch_s"] for r in runs],
    }

    cols = " | ".join(f"repeat {i + 1}" for i in range(len(runs)))
    sep = "---:|" * len(runs)
    print(
        f"\n{s.model} at {s.resolution}px, batch {s.batch_size}, {s.steps} steps x {s.epochs} epochs "
        f"(epoch 0 = warm-up), device {s.device}, amp={s.amp}, channels_last={s.channels_last}, "
        f"compile={s.compile}, {s.threads} torch threads, Ray worker with {args.cpus_per_worker:g} CPUs, "
        f"{os.cpu_count()} CPU cores; ray.init {ray_init_s:.1f} s"
    )
    print(f"\n| side, img/s | {cols} | median |\n|---|{sep}---:|")
    rows = {
        "bare PyTorch loop": bare,
        "ours: Ray Train + fit (system/images_per_s)": ours,
        "ours end to end (+ val, state, digest, checkpoint)": ours_e2e,
    }
    for label, values in rows.items():
        cells = " | ".join(f"{v:,.0f}" for v in values)
        print(f"| {label} | {cells} | {statistics.median(values):,.0f} |")
    for label, values in {"ratio ours / bare": ratios, "ratio end to end / bare": ratios_e2e}.items():
        cells = " | ".join(f"{v:.3f}" for v in values)
        print(f"| {label} | {cells} | {statistics.median(values):.3f} |")
    print(f"\n| ours, per-epoch costs outside the timed steps | {cols} |\n|---|{sep}")
    for label, values in overheads.items():
        print(f"| {label} | {' | '.join(f'{v:.3f}' for v in values)} |")
    print(
        f"\nratio ours / bare (median of {len(runs)} interleaved repeats): {ratio:.3f}; goal >= {GOAL}: "
        f"{'met' if ratio >= GOAL else 'NOT met'}\ncommand: {command}"
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {
                "command": command,
                "settings": dataclasses.asdict(s),
                "cpus_per_worker": args.cpus_per_worker,
                "cpu_count": os.cpu_count(),
                "bare_images_per_s": bare,
                "ours_images_per_s": ours,
                "ours_end_to_end_images_per_s": ours_e2e,
                "ratios": ratios,
                "ratio_median": ratio,
                "ratio_end_to_end_median": statistics.median(ratios_e2e),
                "overheads": overheads,
                "runs": runs,
                "ray_init_s": ray_init_s,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

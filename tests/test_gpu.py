"""GPU checks, run by ``make gpu-check`` on a CUDA machine; skipped as a whole where torch sees no CUDA device,
so the CPU suite pays only this module's import.

* The pre-training worker on GPU workers: ``pipeline.launch.pretrain_worker`` launched as
  ``pipeline.pretrain.TrainingJob.run`` launches it, on the toy recipe with bf16 autocast, channels_last,
  EMA and MixUp, with ``torch.compile`` off and on. It must finish with identical replicas (the per-epoch
  ``param_digests``), val top-1 above chance, an nccl process group, a compiled model when asked, a
  channels_last checkpoint, and ``val_ema/top1`` reported every epoch.
* ``train.amp: auto`` means bf16 on a GPU that has it; ``train.amp: fp16`` trains in float16 with a
  GradScaler whose state is checkpointed.

Ranks and GPUs: NCCL refuses two ranks on one device (``ncclInvalidUsage: Duplicate GPU detected``), and
``launch`` gives each GPU worker a whole GPU (``ensure_ray`` refuses more GPU workers than GPUs). So the
run has 2 DDP ranks where there are 2 GPUs or more, and 1 rank on a one-GPU machine: an nccl process group
of one (nccl collectives, the replica digest, no DDP wrapper, as Ray's ``prepare_model`` wraps only world
sizes above one).

Left out: the job's MLflow side (run, export, registration). It is device-independent and covered on CPU
(tests/test_recipes.py, tests/test_multinode.py), and the GPU machine's image has no MLflow to carry it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "pretrain" / "toy_resnet20.yaml"
EPOCHS = 6
CHANCE = 0.1  # 10 classes


# --------------------------------------------------------------------------------------------------------
# Mixed precision, in this process


def test_amp_auto_is_bf16_on_a_gpu_that_has_it():
    from pipeline.train.loop import autocast_dtype

    device = torch.device("cuda")
    major, _ = torch.cuda.get_device_capability(device)
    assert torch.cuda.is_bf16_supported() == (major >= 8)  # Ampere and later
    expected = torch.bfloat16 if major >= 8 else torch.float16
    assert autocast_dtype(device, "auto") == expected
    assert autocast_dtype(device, "bf16") == torch.bfloat16
    assert autocast_dtype(device, "off") is None


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_gpu_decode_gives_the_cpu_paths_batches_on_the_gpu(tmp_path, loader_workers):
    """data.decode=gpu: nvJPEG decodes whole batches on the GPU and the crop runs there. Evaluation's pixels
    are the CPU path's up to decoder rounding (nvJPEG's IDCT is not libjpeg's), training keeps its batch
    count and shapes, and a JPEG that does not decode is skipped and counted as on the CPU path."""
    from imgtree import corrupt_in_place, write_sized_shards

    from pipeline.config import DataConfig
    from pipeline.data.loader import build_loader

    manifest = write_sized_shards(tmp_path / "v", [9, 8], num_classes=17, labels="unique", image_size=48)
    base = dict(resolution=32, batch_size_per_worker=4, loader_workers=loader_workers, min_crop_scale=0.5)
    cpu = DataConfig(**base)
    gpu = DataConfig(**base, decode="gpu", on_corrupt="skip", max_corrupt_fraction=0.2)
    device = torch.device("cuda")
    expected = list(build_loader(manifest, cpu, train=False))
    batches = list(build_loader(manifest, gpu, train=False, device=device))
    assert [len(y) for _, y in batches] == [len(y) for _, y in expected]
    for (x, y), (ex, ey) in zip(batches, expected, strict=True):
        assert x.device.type == "cuda" and x.dtype == torch.uint8 and x.shape == ex.shape
        assert torch.equal(y.cpu(), ey)
        assert (x.cpu().float() - ex.float()).abs().mean() < 2.0  # of 255 levels

    train = build_loader(manifest, gpu, train=True, device=device)
    for epoch in range(2):
        train.set_epoch(epoch)
        shapes = [(tuple(x.shape), x.device.type) for x, _ in train]
        assert shapes == [((4, 3, 32, 32), "cuda")] * len(train)

    corrupt_in_place(sorted((tmp_path / "v").glob("*.tar"))[0], image=4)
    evaluation = build_loader(manifest, gpu, train=False, device=device)
    seen = sorted(torch.cat([y.cpu() for _, y in evaluation]).tolist())
    assert seen == [i for i in range(17) if i != 4] and evaluation.skipped == 1


class _MemoryLoader:
    """The loader interface ``fit`` uses, over fixed batches: class 1 images are brighter than class 0."""

    def __init__(self, batches: int, batch_size: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.batches = []
        for _ in range(batches):
            labels = torch.randint(0, 2, (batch_size,), generator=generator)
            images = torch.randint(0, 128, (batch_size, 3, 16, 16), dtype=torch.uint8, generator=generator)
            self.batches.append((images + (labels * 100).to(torch.uint8)[:, None, None, None], labels))

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        yield from self.batches


def test_fp16_trains_in_float16_with_a_checkpointed_grad_scaler():
    from pipeline.config import EarlyStoppingConfig, OptimConfig, TrainConfig
    from pipeline.train.loop import fit
    from pipeline.train.optim import build_optimizer, build_scheduler

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 2),
    ).to(device)
    before = [p.detach().clone() for p in model.parameters()]
    dtypes = set()
    model[0].register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    loader = _MemoryLoader(batches=8, batch_size=32)
    optim_cfg = OptimConfig(lr=0.05, reference_batch_size=32, weight_decay=0.0, schedule="constant")
    optimizer = build_optimizer(model, optim_cfg, global_batch_size=32)
    result = fit(
        model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, optim_cfg, steps_per_epoch=len(loader), epochs=3),
        train_loader=loader,
        val_loader=loader,
        optim_cfg=optim_cfg,
        train_cfg=TrainConfig(
            epochs=3, amp="fp16", early_stopping=EarlyStoppingConfig(enabled=False), sanity_val_batches=0
        ),
        device=device,
    )
    assert dtypes == {torch.float16}, "the convolutions ran outside fp16 autocast"
    scaler = result.state.scaler
    assert scaler is not None, "fp16 must train with a GradScaler, checkpointed in the state"
    assert 0 < scaler["scale"] < float("inf")
    assert result.state.global_step == 3 * len(loader)
    losses = [entry["train/loss"] for entry in result.history]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    # Overflowing steps are skipped by the scaler; not all of them may be.
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


# --------------------------------------------------------------------------------------------------------
# The pre-training worker on GPU workers, through Ray Train


def gpu_workers() -> int:
    """2 DDP ranks where there are 2 GPUs or more; 1 on a one-GPU machine (see the module docstring)."""
    return min(2, torch.cuda.device_count())


def probing_worker(record_dir: str):
    """``pretrain_worker``, recording what only the worker sees in ``record_dir/rank-N.json``: the process
    group's backend and size (set up by Ray Train before the function runs) and the graphs torch.compile
    built. A closure, so Ray pickles it by value (the test module is not importable in workers)."""
    from pipeline.launch import pretrain_worker

    def worker(spec) -> None:
        import json
        from pathlib import Path

        import ray.train
        import ray.train.torch
        import torch
        import torch.distributed as dist
        from torch._dynamo.utils import counters

        rank = ray.train.get_context().get_world_rank()
        record = {
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "device": str(ray.train.torch.get_device()),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        }
        pretrain_worker(spec)
        # Graphs dynamo captured; the frames it compiled as a second witness, should either key be renamed.
        record["compiled_graphs"] = max(counters["stats"]["unique_graphs"], counters["frames"]["ok"])
        Path(record_dir, f"rank-{rank}.json").write_text(json.dumps(record))

    return worker


def run_worker_job(tmp_path: Path, *, overrides: list[str], num_workers: int, use_gpu: bool):
    """Shards, config and ``launch`` as the pre-training job does them, with the probing worker; returns
    (config, launch result, last checkpoint's state, per-rank records). ``use_gpu=False`` runs the same on
    CPU workers with gloo (how this test was tried without a GPU; amp must then be 'off')."""
    from conftest import pretrain_shards

    from pipeline.config import PretrainConfig, load_config
    from pipeline.launch import STATE_FILE, launch
    from pipeline.pretrain import localize, validate
    from pipeline.specs import WorkerSpec
    from pipeline.train.state import load_checkpoint

    manifests = pretrain_shards(
        tmp_path / "raw",
        str(tmp_path / "shards"),
        train_per_class=200,
        val_per_class=40,
        samples_per_shard=250,
    )
    cfg = load_config(
        PretrainConfig,
        str(RECIPE),
        [
            f"data.train_manifest={manifests['train']}",
            f"data.val_manifest={manifests['val']}",
            "data.batch_size_per_worker=50",
            "data.loader_workers=2",
            f"scaling.num_workers={num_workers}",
            f"scaling.use_gpu={str(use_gpu).lower()}",
            "scaling.cpus_per_worker=1",
            f"train.epochs={EPOCHS}",
            "train.early_stopping.enabled=false",
            "train.progress_interval_s=0",
            "train.ema.enabled=true",
            "train.ema.every_steps=4",
            "train.mixup_alpha=0.2",
            "train.channels_last=true",
            "tracking.uri=none",
            *overrides,
        ],
    )
    validate(cfg)  # the job's checks before Ray
    cfg = localize(cfg)
    records = tmp_path / "records"
    records.mkdir()
    result = launch(
        probing_worker(str(records)),
        spec=WorkerSpec(config=cfg, run_name="gpu-check"),
        scaling=cfg.scaling,
        checkpoint=cfg.checkpoint,
        storage_path=str(tmp_path / "ray_results"),
        name="gpu-check",
        metric=cfg.train.watched_metric,
        mode=cfg.train.early_stopping.mode,
    )
    state = load_checkpoint(Path(result.checkpoint_dir) / STATE_FILE)
    shutil.rmtree(result.checkpoint_dir, ignore_errors=True)
    ranks = [json.loads(p.read_text()) for p in sorted(records.glob("rank-*.json"))]
    return cfg, result, state, ranks


@pytest.fixture(scope="module")
def ray_for_this_module():
    """The runs share one local Ray instance (started by ``launch``), shut down after the module."""
    yield
    import ray

    ray.shutdown()


@pytest.mark.ray
@pytest.mark.timeout(480)
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_pretrain_worker_on_gpu_with_nccl_bf16_channels_last_ema_and_mixup(
    compile, ray_for_this_module, tmp_path
):
    workers = gpu_workers()
    cfg, result, state, ranks = run_worker_job(
        tmp_path,
        overrides=["train.amp=bf16", f"train.compile={str(compile).lower()}"],
        num_workers=workers,
        use_gpu=True,
    )
    print(f"\n{workers} rank(s) on {ranks[0]['gpu'] if ranks else '?'}; records {ranks}")

    assert state["epoch"] == EPOCHS
    assert len(ranks) == workers, "every rank records itself after pretrain_worker returns"
    assert all(r["backend"] == "nccl" and r["world_size"] == workers for r in ranks), ranks
    assert all(r["device"].startswith("cuda") for r in ranks), ranks
    if compile:
        assert all(r["compiled_graphs"] > 0 for r in ranks), ranks
    else:
        assert all(r["compiled_graphs"] == 0 for r in ranks), ranks

    digests = result.metrics["param_digests"].split(",")
    assert len(digests) == workers and len(set(digests)) == 1, digests
    history = state["history"]
    assert [entry["epoch"] for entry in history] == list(range(EPOCHS))
    best = max(entry["val/top1"] for entry in history)
    assert best > CHANCE + 0.1, f"val top-1 {best:.3f} is not above chance ({CHANCE})"
    for entry in history:
        assert 0.0 <= entry["val_ema/top1"] <= 1.0 and torch.isfinite(torch.tensor(entry["train/loss"]))
    assert "val_ema/top1" in result.metrics
    # channels_last reached the model: its 3x3 convolution weights are stored NHWC (state_dict keeps strides).
    convs = [v for v in state["model"].values() if v.dim() == 4 and v.shape[1] > 1 and v.shape[2] > 1]
    assert convs and all(v.is_contiguous(memory_format=torch.channels_last) for v in convs)
    assert cfg.train.mixup_alpha > 0 and cfg.train.ema.enabled and cfg.train.amp == "bf16"

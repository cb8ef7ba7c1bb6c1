"""The plain training loop on the embedded data: it learns, early stopping restores the best epoch, and a
resumed run continues exactly where a checkpoint left off."""

from __future__ import annotations

import pytest
import torch
from conftest import pretrain_shards

from pipeline.config import DataConfig, EarlyStoppingConfig, OptimConfig, ShardConfig, ToyConfig, TrainConfig
from pipeline.data.loader import build_loader
from pipeline.data.manifest import load_manifest
from pipeline.data.prepare import prepare_embedded
from pipeline.models import build_model
from pipeline.train import build_optimizer, build_scheduler, load_checkpoint, save_checkpoint
from pipeline.train.loop import evaluate, fit

BATCH = 50


@pytest.fixture(scope="module")
def toy_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    urls = pretrain_shards(
        root / "raw", str(root / "shards"), train_per_class=100, val_per_class=20, samples_per_shard=250
    )
    return {split: load_manifest(url) for split, url in urls.items()}


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    """A fifth of the data, for tests whose assertion does not depend on how much is learned (restoring the
    best epoch, bit-identical resume, frozen stages): 200 train / 100 val images."""
    root = tmp_path_factory.mktemp("toy-small")
    urls = pretrain_shards(
        root / "raw", str(root / "shards"), train_per_class=20, val_per_class=10, samples_per_shard=100
    )
    return {split: load_manifest(url) for split, url in urls.items()}


def _setup(toy_shards, *, epochs, optim=None, early=None, seed=0):
    torch.manual_seed(seed)
    data = DataConfig(
        resolution=32, batch_size_per_worker=BATCH, loader_workers=0, shuffle_buffer=200, min_crop_scale=0.5
    )
    optim = optim or OptimConfig(
        name="sgd", lr=0.1, reference_batch_size=BATCH, weight_decay=5e-4, warmup_epochs=0, schedule="cosine"
    )
    train = TrainConfig(epochs=epochs, early_stopping=early or EarlyStoppingConfig(enabled=False))
    model = build_model("cifar_resnet20", num_classes=10)
    optimizer = build_optimizer(model, optim, global_batch_size=BATCH)
    scheduler = build_scheduler(optimizer, optim, steps_per_epoch=1000 // BATCH, epochs=epochs)
    loaders = dict(
        train_loader=build_loader(toy_shards["train"], data, train=True),
        val_loader=build_loader(toy_shards["val"], data, train=False),
    )
    return model, dict(
        optimizer=optimizer,
        scheduler=scheduler,
        optim_cfg=optim,
        train_cfg=train,
        device=torch.device("cpu"),
        **loaders,
    )


def test_mixup_and_cutmix_train_on_soft_targets_in_the_loop(small_shards):
    """One epoch with MixUp + CutMix against the same epoch without: the same data order and initial weights,
    so only the batch mixing can make the losses differ; train top-1 is still measured on hard labels."""
    from dataclasses import replace

    torch.set_num_threads(1)
    losses = {}
    for name, changes in {"plain": {}, "mixed": {"mixup_alpha": 0.2, "cutmix_alpha": 1.0}}.items():
        model, kw = _setup(small_shards, epochs=1)
        kw["train_cfg"] = replace(kw["train_cfg"], **changes)
        torch.manual_seed(0)
        history = fit(model, **kw).history
        losses[name] = history[0]["train/loss"]
        assert 0.0 <= history[0]["train/top1"] <= 1.0
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert losses["mixed"] != losses["plain"], losses


def test_early_stopping_restores_the_best_epoch(small_shards):
    torch.set_num_threads(1)
    # Accuracy cannot rise by min_delta=2, so nothing after the first epoch counts as an improvement: epoch 0
    # stays the best and patience 1 stops the run after epoch 1.
    early = EarlyStoppingConfig(metric="val/top1", mode="max", patience=1, min_delta=2.0)
    model, kw = _setup(small_shards, epochs=5, early=early)
    snapshots = {}

    def snapshot(state, metrics):  # state.model shares storage with the live weights: copy it
        snapshots[state.epoch - 1] = {k: v.clone() for k, v in state.model.items()}

    result = fit(model, **kw, on_epoch_end=snapshot)
    assert result.stopped_early and [h["epoch"] for h in result.history] == [0, 1]
    assert result.best_epoch == 0
    final = model.state_dict()
    assert all(torch.equal(final[k], snapshots[0][k]) for k in final), "best (epoch 0) weights restored"
    assert not all(torch.equal(final[k], snapshots[1][k]) for k in final)


def test_resume_from_checkpoint_matches_an_uninterrupted_run(small_shards, tmp_path):
    torch.set_num_threads(1)
    # Two epochs, killed after the first one's checkpoint: the resumed second epoch must be bit-identical.
    model, kw = _setup(small_shards, epochs=2, seed=1)
    straight = fit(model, **kw)

    model, kw = _setup(small_shards, epochs=2, seed=1)
    path = tmp_path / "ckpt.pt"

    class Interrupt(Exception):
        pass

    def checkpoint_then_die(state, metrics):
        save_checkpoint(state, path)
        if state.epoch == 1:
            raise Interrupt  # as if the worker were killed after epoch 0's checkpoint

    with pytest.raises(Interrupt):
        fit(model, **kw, on_epoch_end=checkpoint_then_die)
    model, kw = _setup(small_shards, epochs=2, seed=99)  # different init: everything must come from the file
    resumed = fit(model, **kw, resume=load_checkpoint(path))
    assert [h["epoch"] for h in resumed.history] == [1], "no duplicated or missing epochs"
    assert resumed.history[0]["val/loss"] == straight.history[1]["val/loss"]
    assert all(
        torch.equal(a, b)
        for a, b in zip(straight.state.model.values(), resumed.state.model.values(), strict=True)
    )


def test_stage_one_trains_the_head_only_then_the_backbone_at_a_lower_lr(small_shards):
    """Two-stage fine-tuning through the epoch-start hook: during stage 1 the backbone's weights are
    bitwise unchanged and its BatchNorm running statistics do not move; stage 2 trains everything."""
    from pipeline.models import freeze_backbone, get_classifier, unfreeze_backbone
    from pipeline.models.heads import classifier_name

    torch.set_num_threads(1)
    model, kw = _setup(small_shards, epochs=2)
    kw["optimizer"] = build_optimizer(model, kw["optim_cfg"], global_batch_size=BATCH, backbone_lr_factor=0.1)
    kw["scheduler"] = build_scheduler(
        kw["optimizer"], kw["optim_cfg"], steps_per_epoch=1000 // BATCH, epochs=2
    )
    lrs = {group["name"]: group["lr"] for group in kw["optimizer"].param_groups}
    assert lrs["backbone"] == pytest.approx(0.1 * lrs["head"])
    head = classifier_name(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    after_stage_one = {}

    def stages(epoch):
        if epoch == 0:
            freeze_backbone(model)
        else:
            after_stage_one.update({k: v.clone() for k, v in model.state_dict().items()})
            unfreeze_backbone(model)

    trained = {}

    def snapshot(state, metrics):  # the live weights after each epoch (fit restores the best at the end)
        trained[state.epoch - 1] = {k: v.clone() for k, v in state.model.items()}

    fit(model, **kw, on_epoch_start=stages, on_epoch_end=snapshot)
    backbone = [k for k in before if not k.startswith(head)]
    assert any("running_mean" in k for k in backbone)
    assert all(torch.equal(before[k], after_stage_one[k]) for k in backbone), (
        "stage 1 left the backbone alone"
    )
    assert not torch.equal(before[f"{head}.weight"], after_stage_one[f"{head}.weight"]), "the head trained"
    final = trained[1]
    assert not all(torch.equal(after_stage_one[k], final[k]) for k in backbone), (
        "stage 2 trained the backbone"
    )
    assert get_classifier(model).weight.requires_grad


def test_inverse_class_weights_raise_minority_recall(tmp_path_factory):
    """Imbalanced 10:1 downstream data: the rarest class is found more often with inverse weights."""
    from pipeline.train.metrics import class_weights

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("imbalanced")
    toy = ToyConfig(
        root=str(root / "raw"),
        image_size=32,
        pretrain_train_per_class=1,
        pretrain_val_per_class=1,
        downstream_classes=4,
        downstream_train_max=200,
        downstream_imbalance=10.0,
        downstream_val_per_class=50,
    )
    prepared = prepare_embedded(toy, ShardConfig(dest=str(root / "shards"), samples_per_shard=500, workers=1))
    train, val = (load_manifest(prepared.manifests["downstream"][split]) for split in ("train", "val"))
    counts = train.counts()
    rarest = train.classes[counts.index(min(counts))]
    assert max(counts) / min(counts) == pytest.approx(10.0, rel=0.1)
    data = DataConfig(
        resolution=32, batch_size_per_worker=32, loader_workers=0, shuffle_buffer=200, min_crop_scale=0.5
    )
    optim = OptimConfig(name="adamw", lr=3e-3, reference_batch_size=32, weight_decay=0.05, warmup_epochs=1)
    recalls = {}
    for mode in ("none", "inverse"):
        torch.manual_seed(0)
        model = build_model("cifar_resnet20", num_classes=4)
        optimizer = build_optimizer(model, optim, global_batch_size=32)
        loader = build_loader(train, data, train=True)
        result = fit(
            model,
            optimizer=optimizer,
            scheduler=build_scheduler(optimizer, optim, steps_per_epoch=len(loader), epochs=6),
            train_loader=loader,
            val_loader=build_loader(val, data, train=False),
            optim_cfg=optim,
            train_cfg=TrainConfig(epochs=6, early_stopping=EarlyStoppingConfig(enabled=False)),
            device=torch.device("cpu"),
            class_weights=class_weights(counts, mode),
            class_names=train.classes,
        )
        recalls[mode] = result.history[-1][f"val/recall/{rarest}"]
    # Measured (seeded, deterministic): recall of the rarest class 0.00 without weights, 0.48 with inverse.
    assert recalls["inverse"] > recalls["none"], recalls


def test_progress_is_one_readable_line_per_epoch_plus_interval_lines(toy_shards):
    import re
    from dataclasses import replace

    from pipeline.tracking.base import NullTracker

    class Recorder(NullTracker):
        def __init__(self):
            self.logged: list[tuple[str, int]] = []
            self.values: dict[tuple[str, int], float] = {}

        def log_metrics(self, metrics, step):
            self.logged += [(key, step) for key in metrics]
            self.values.update({(key, step): value for key, value in metrics.items()})

    torch.set_num_threads(1)
    model, kw = _setup(toy_shards, epochs=2)
    kw["train_cfg"] = replace(kw["train_cfg"], progress_interval_s=1e-6)  # a line after every step
    lines: list[str] = []
    tracker = Recorder()
    fit(model, **kw, tracker=tracker, progress=lines.append)

    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    shape = (
        r"epoch (\d)/2  loss \d+\.\d{3}  top1 \d\.\d{3} \| val top1 \d\.\d{3}  bal \d\.\d{3} \| "
        r"\d+ img/s  data \d+%  \d+\.\d s  eta \d+:\d\d"
    )
    assert [re.fullmatch(shape, line).group(1) for line in epoch_lines] == ["1", "2"], epoch_lines
    assert epoch_lines[-1].endswith("eta 0:00")
    steps = [line for line in lines if line.startswith("  epoch ")]
    assert steps and all(
        re.fullmatch(r"  epoch [12]/2  step \d+/20  loss \d+\.\d{3}  \d+ img/s", s) for s in steps
    )
    step_losses = [step for key, step in tracker.logged if key == "train/loss_step"]
    assert step_losses == sorted(set(step_losses)) and step_losses[-1] == 40, "the global step, once each"
    assert not any(key.startswith("system/cpu") for key, _ in tracker.logged), "system metrics are opt-in"

    # What an epoch reports. (That the loop learns is checked where it trains long enough: the fine-tuning
    # source's pre-training in test_finetune.py, 8 epochs in-process, and the 3-node DDP job.)
    result_keys = {key for key, step in tracker.logged if step == 1}
    for key in ("system/images_per_s", "system/data_wait", "train/lr", "system/epoch_s", "val/macro_f1"):
        assert key in result_keys, key
    final = {key: value for key, value in tracker.values.items() if key[1] == 1}
    # The validation split is balanced (20 per class), so balanced accuracy equals top-1 exactly.
    assert final[("val/balanced_acc", 1)] == pytest.approx(final[("val/top1", 1)], abs=1e-12)
    assert final[("val/top5", 1)] >= final[("val/top1", 1)]
    assert sum(1 for key in result_keys if key.startswith("val/recall/")) == 10
    # The validation pass covers the whole split exactly once.
    assert evaluate(model, kw["val_loader"], device=torch.device("cpu"), cfg=kw["train_cfg"]).count == 200

    # 0 turns the interval lines (and step losses) off.
    from pipeline.train.progress import StepProgress

    quiet = StepProgress(
        interval_s=0, emit=lines.append, log_step_loss=lambda *a: lines.append("x"), epochs=1
    )
    lines.clear()
    quiet.start_epoch(0, 20)
    for step in range(1, 21):
        quiet.step(step_in_epoch=step, global_step=step, loss=torch.tensor(1.0), images=50)
    assert lines == []


# ------------------------------------------------------------------------------------------------------
# Gradient accumulation, fp16 loss scaling and the weight average, on in-memory batches (milliseconds each)


class MemoryLoader:
    """The loader interface ``fit`` uses (len, set_epoch, iteration) over fixed uint8 batches."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int):
        self.images, self.labels, self.batch_size = images, labels, batch_size

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        for start in range(0, len(self.labels), self.batch_size):
            yield self.images[start : start + self.batch_size], self.labels[start : start + self.batch_size]


def _memory_run(*, batch_size, epochs=2, optim=None, samples=24, **train_changes):
    """A BatchNorm-free conv net (so a batch's split cannot change its forward pass) on fixed random data."""
    from dataclasses import replace

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (samples, 3, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 3, (samples,), generator=generator)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 3),
    )
    optim = optim or OptimConfig(lr=0.5, reference_batch_size=samples, weight_decay=0.0, schedule="constant")
    train = replace(
        TrainConfig(epochs=epochs, early_stopping=EarlyStoppingConfig(enabled=False), sanity_val_batches=0),
        **train_changes,
    )
    loader = MemoryLoader(images, labels, batch_size)
    optimizer = build_optimizer(model, optim, global_batch_size=samples)
    steps = -(-len(loader) // train.accumulate_steps)
    kw = dict(
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, optim, steps_per_epoch=steps, epochs=epochs),
        train_loader=loader,
        val_loader=loader,
        optim_cfg=optim,
        train_cfg=train,
        device=torch.device("cpu"),
    )
    return model, kw


def test_gradient_accumulation_matches_the_larger_batch_to_1e_6():
    """Three batches of 8 accumulated (one optimizer step per epoch) against one batch of 24: the same
    weights to 1e-6 (float32 summation order is all that differs). Without accumulation the 8-batches would
    take three steps per epoch and end far away."""
    big, big_kw = _memory_run(batch_size=24)
    fit(big, **big_kw)
    small, small_kw = _memory_run(batch_size=8, accumulate_steps=3)
    result = fit(small, **small_kw)
    assert result.state.global_step == 2, "one optimizer step per 3 batches, 2 epochs"
    for (name, a), b in zip(big.state_dict().items(), small.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
    plain, plain_kw = _memory_run(batch_size=8)
    fit(plain, **plain_kw)
    assert not torch.allclose(big[-1].weight, plain[-1].weight, atol=1e-3), "three steps differ from one"


def test_a_short_last_group_weighs_its_batches_as_one_batch():
    """3 batches with accumulate_steps=2: groups of 2 and 1, i.e. a step on the first 16 samples' mean loss,
    then one on the last 8's (the short group is not halved)."""
    import torch.nn.functional as F

    from pipeline.data.transforms import normalize
    from pipeline.train.loop import autocast_dtype

    model, kw = _memory_run(batch_size=8, accumulate_steps=2, epochs=1)
    assert fit(model, **kw).state.global_step == 2
    manual, manual_kw = _memory_run(batch_size=8, epochs=1)
    loader, optimizer = manual_kw["train_loader"], manual_kw["optimizer"]
    for rows in (slice(0, 16), slice(16, 24)):
        optimizer.zero_grad()
        F.cross_entropy(manual(normalize(loader.images[rows])), loader.labels[rows]).backward()
        optimizer.step()
    for (name, a), b in zip(manual.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, "auto") is None and autocast_dtype(cpu, "fp16") == torch.float16


def test_fp16_scales_the_loss_and_the_scaler_state_is_checkpointed():
    model, kw = _memory_run(batch_size=8, amp="fp16", epochs=1)
    before = model[-1].weight.detach().clone()
    result = fit(model, **kw)
    scaler = result.state.scaler
    assert scaler is not None and scaler["scale"] == 2.0**16, "GradScaler at its initial 2^16 scale"
    assert torch.isfinite(model[-1].weight).all() and not torch.equal(before, model[-1].weight)
    bf16, bf16_kw = _memory_run(batch_size=8, amp="bf16", epochs=1)
    assert fit(bf16, **bf16_kw).state.scaler is None, "bf16 needs no loss scaling"


def test_ema_decay_is_adjusted_as_torchvision_adjusts_it():
    from pipeline.config import EmaConfig
    from pipeline.train.ema import ema_decay

    cfg = EmaConfig(enabled=True, decay=0.99998, every_steps=32)
    # torchvision's ResNet-50 V2 run: 8 GPUs x 128, 600 epochs.
    assert ema_decay(cfg, global_batch_size=1024, epochs=600) == pytest.approx(1 - 2e-5 * 1024 * 32 / 600)
    assert ema_decay(cfg, global_batch_size=10**6, epochs=1) == 0.0, "alpha is capped at 1"


def test_ema_is_reset_in_warm_up_evaluated_checkpointed_resumed_and_exported_when_selected(tmp_path):
    """The average copies the weights during warm-up, is evaluated every epoch beside the raw model, resumes
    bit-identically from a checkpoint, and with select=ema its best epoch's weights are what fit returns."""
    from pipeline.config import EmaConfig
    from pipeline.train.ema import build_ema

    warm = OptimConfig(
        lr=0.5, reference_batch_size=24, weight_decay=0.0, schedule="constant", warmup_epochs=1
    )
    ema_cfg = EmaConfig(enabled=True, decay=0.5, every_steps=1, select="ema")

    def run(**hooks):
        model, kw = _memory_run(batch_size=8, epochs=3, optim=warm, ema=ema_cfg)
        ema = build_ema(model, decay=0.5)
        return model, ema, fit(model, **kw, ema=ema, **hooks)

    states = {}

    def keep(state, metrics):
        copy = lambda tensors: {k: v.clone() for k, v in tensors.items()}  # noqa: E731 - live storage
        states[state.epoch - 1] = (copy(state.model), copy(state.ema), metrics)

    model, ema, straight = run(on_epoch_end=keep)
    raw0, ema0, metrics0 = states[0]
    assert int(ema0["n_averaged"]) == 0, "reset after every warm-up update"
    assert torch.equal(ema0["module.4.weight"], raw0["4.weight"]), "in warm-up the average is the weights"
    assert {"val_ema/top1", "val_ema/loss", "val/top1"} <= set(metrics0)
    assert int(states[2][1]["n_averaged"]) == 6, "averaging after warm-up: 2 epochs x 3 steps"
    assert not torch.equal(states[2][1]["module.4.weight"], states[2][0]["4.weight"])
    best = straight.best_epoch
    assert straight.best_metric == straight.history[best]["val_ema/top1"], "early stopping watched the EMA"
    assert torch.equal(model.state_dict()["4.weight"], states[best][1]["module.4.weight"]), "EMA exported"

    path = tmp_path / "ckpt.pt"

    class Interrupt(Exception):
        pass

    def checkpoint_then_die(state, metrics):
        save_checkpoint(state, path)
        if state.epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(on_epoch_end=checkpoint_then_die)
    _, resumed_ema, resumed = run(resume=load_checkpoint(path))
    assert [h["epoch"] for h in resumed.history] == [2]
    for (name, a), b in zip(ema.state_dict().items(), resumed_ema.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

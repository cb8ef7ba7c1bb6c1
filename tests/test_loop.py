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

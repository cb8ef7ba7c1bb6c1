"""Fine-tuning on the embedded downstream task (4 new classes, imbalanced 10:1, balanced validation), from a
toy_resnet20 pre-trained on the embedded pretrain task."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import FinetuneConfig, load_config

FINETUNE_RECIPE = "configs/finetune/toy_two_stage.yaml"


@pytest.fixture(scope="module")
def toy(toy_manifests):
    """Pretrain shards (10 classes, 200/class) and downstream shards (4 classes, 40..4 per class in training:
    the few-label regime fine-tuning exists for; val 100/class, balanced)."""
    return toy_manifests


@pytest.fixture(scope="module")
def pretrained(toy_model):
    """The session's toy_resnet20 (8 epochs in-process), as the export directory jobs/pretrain.py writes."""
    assert toy_model.best_val_top1 > 0.2, (
        toy_model.history
    )  # chance is 0.10: it learned something to transfer
    return toy_model.export_dir


def _finetune_cfg(toy, *overrides: str) -> FinetuneConfig:
    return load_config(
        FinetuneConfig,
        FINETUNE_RECIPE,
        [
            f"data.train_manifest={toy['downstream']['train']}",
            f"data.val_manifest={toy['downstream']['val']}",
            "data.loader_workers=0",
            "scaling.num_workers=1",
            *overrides,
        ],
    )


@pytest.mark.ray
def test_finetune_job_from_a_registered_model_with_ddp(toy, pretrained, toy_model, local_ray, tmp_path):
    """models:/name@alias against a real MLflow store, 2 DDP workers, two stages: stage 1 leaves the
    backbone and its BatchNorm statistics bitwise unchanged under DDP too; lineage, metrics, figure, model."""
    from mlflow import MlflowClient

    from pipeline.finetune import run_finetune
    from pipeline.train.state import read_state

    uri = toy_model.tracking_uri
    cfg = _finetune_cfg(
        toy,
        f"finetune.source={toy_model.uri}",
        "scaling.num_workers=2",
        "data.batch_size_per_worker=16",
        "train.epochs=2",
        "finetune.head_epochs=1",
        f"tracking.uri={uri}",
        "tracking.register_as=toy-down",
        f"checkpoint.storage_path={tmp_path}/ray_results",
    )
    outcome = run_finetune(cfg)

    client = MlflowClient(uri)
    run = client.get_run(outcome.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert (
        run.data.tags["source.model_name"] == "toy-resnet20" and run.data.tags["source.model_version"] == "1"
    )
    assert run.data.tags["source.run_id"] == toy_model.run_id
    assert run.data.tags["finetune.strategy"] == "two_stage" and run.data.tags["pipeline.job"] == "finetune"
    assert run.data.tags["dataset.manifest_url"] == toy["downstream"]["train"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/balanced_acc")] == [0, 1]
    assert any(key.startswith("val/recall/") for key in run.data.metrics)
    assert "plots/confusion_matrix.png" in {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert client.get_model_version_by_alias("toy-down", "champion").run_id == run.info.run_id
    assert len(outcome.final_metrics["param_digests"].split(",")) == 2

    # Stage 1 (epoch 0) under DDP: every backbone tensor, BatchNorm running statistics included, is the source's.
    source = torch.load(Path(pretrained) / "model.pt", weights_only=True)["state_dict"]
    after_stage_one = read_state(str(tmp_path / "ray_results" / "toy-finetune" / "epoch-0000" / "state.pt"))[
        "model"
    ]
    backbone = [k for k in source if not k.startswith("fc.") and "num_batches_tracked" not in k]
    assert any("running_var" in k for k in backbone)
    assert all(torch.equal(source[k], after_stage_one[k]) for k in backbone)
    assert not torch.equal(source["fc.weight"][:4], after_stage_one["fc.weight"])


def _best_balanced_accuracy(cfg: FinetuneConfig) -> float:
    """One fine-tuning run in-process: the build_run + fit every Ray worker runs, on one rank."""
    from pipeline.finetune import fetch_source, resolve_architecture
    from pipeline.train.build import build_run, fit_run

    source = None
    if cfg.finetune.strategy != "scratch":
        fetched = fetch_source(cfg, tracking_uri=None)
        cfg, source = resolve_architecture(cfg, fetched), fetched.payload
    parts = build_run(cfg, rank=0, world_size=1, device=torch.device("cpu"), source=source)
    result = fit_run(parts, cfg, device=torch.device("cpu"))
    return result.best_metric


def test_two_stage_from_the_pretrained_model_beats_scratch_on_balanced_accuracy(toy, pretrained):
    """The lecture's fine-tuning claim on the 10:1 imbalanced downstream task with 40..4 labels per class:
    the same architecture, budget (20 epochs, no early stop) and class weights. Measured (docs/finetuning.md):
    two_stage 0.38-0.40 vs scratch 0.27-0.31 balanced accuracy on 400 val images over two seeds, so one seed
    each is compared here with a margin (the experiment finetune_vs_scratch runs three seeds per arm)."""
    torch.set_num_threads(2)
    scores: dict[str, list[float]] = {"two_stage": [], "scratch": []}
    for strategy in scores:
        for seed in (0,):
            cfg = _finetune_cfg(
                toy,
                f"finetune.source={pretrained}",
                f"finetune.strategy={strategy}",
                "model.name=cifar_resnet20",
                "train.epochs=20",
                "train.early_stopping.enabled=false",
                f"train.seed={seed}",
            )
            scores[strategy].append(_best_balanced_accuracy(cfg))
    # By twice the standard error of one score on 400 images (~0.024) and more than the two-seed spread.
    assert min(scores["two_stage"]) > max(scores["scratch"]) + 0.05, scores


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.name=cifar_resnet32"], "model.name: 'cifar_resnet32' but the source"),
        (["finetune.source=/nonexistent/run"], "finetune.source: /nonexistent/run does not exist"),
        (
            ["finetune.source=models:/no-such-model@champion"],
            "finetune.source: models:/no-such-model@champion",
        ),
        (["finetune.strategy=two_stage", "finetune.head_epochs=10"], "finetune.head_epochs: must be smaller"),
    ],
)
def test_bad_sources_exit_2_naming_the_field(overrides, message, toy, pretrained, tmp_path, capsys):
    import jobs.finetune

    argv = [
        "--config",
        FINETUNE_RECIPE,
        f"data.train_manifest={toy['downstream']['train']}",
        f"data.val_manifest={toy['downstream']['val']}",
        f"finetune.source={pretrained}",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"checkpoint.storage_path={tmp_path}/ray_results",
        *overrides,
    ]
    assert jobs.finetune.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ray_results").exists()

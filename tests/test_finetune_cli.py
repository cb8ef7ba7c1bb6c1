"""jobs/finetune.py rejects bad data for its settings with exit code 2 and one line naming the field, before
Ray starts (conftest's ``no_ray`` makes any import of Ray fail). Kept out of test_finetune.py, whose module
runs with the shared local Ray instance and shuts it down after its last test."""

from __future__ import annotations

import pytest
from imgtree import write_imbalanced_shards

from pipeline.config import FinetuneConfig, load_config

FINETUNE_RECIPE = "configs/finetune/toy_two_stage.yaml"


@pytest.mark.parametrize("weights", ["inverse", "effective_number"])
def test_class_weights_with_an_empty_training_class_exit_2_before_ray(weights, no_ray, tmp_path, capsys):
    """A class with no training sample cannot be weighted (the weights divide by its count): validation
    refuses it, naming the classes, instead of every worker failing after Ray started."""
    import jobs.finetune
    from pipeline.pretrain import validate

    manifest = write_imbalanced_shards(tmp_path / "train", [6, 0, 4, 0], per_shard=5)
    overrides = [
        f"data.train_manifest={manifest.url}",
        f"data.val_manifest={manifest.url}",
        "data.batch_size_per_worker=2",
        "finetune.strategy=scratch",
        "model.name=cifar_resnet20",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"checkpoint.storage_path={tmp_path}/ray_results",
    ]
    capsys.readouterr()
    code = jobs.finetune.main(["--config", FINETUNE_RECIPE, *overrides, f"finetune.class_weights={weights}"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert f"finetune.class_weights: {weights} needs training samples of every class" in err
    assert "none of 'c1', 'c3';" in err and "finetune.class_weights=none" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()
    # The check is about the weights: unweighted, the same data passes validation.
    validate(load_config(FinetuneConfig, FINETUNE_RECIPE, [*overrides, "finetune.class_weights=none"]))

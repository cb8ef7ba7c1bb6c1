"""Config tree: every shipped recipe parses; bad input names the field and says how to fix it."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import (
    ConfigError,
    DataConfig,
    DataDemoConfig,
    ExperimentConfig,
    FinetuneConfig,
    PretrainConfig,
    TuneConfig,
    field_docs,
    load_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Each configs/ subdirectory holds recipes of one config type. A new directory must be added here, so that
# no shipped recipe goes untested.
RECIPE_TYPES = {
    "data": DataDemoConfig,
    "pretrain": PretrainConfig,
    "tune": TuneConfig,
    "finetune": FinetuneConfig,
    "experiments": ExperimentConfig,
}


def test_every_config_directory_has_a_type():
    assert {p.name for p in CONFIGS.iterdir() if p.is_dir()} <= set(RECIPE_TYPES)


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_parses(path):
    kind = path.relative_to(CONFIGS).parts[0]
    assert kind in RECIPE_TYPES, f"{path}: no config type registered for configs/{kind}/"
    load_config(RECIPE_TYPES[kind], path)


def test_overrides_are_typed(tmp_path):
    cfg = load_config(
        DataDemoConfig,
        CONFIGS / "data" / "toy_demo.yaml",
        ["data.batch_size_per_worker=8", "toy.downstream_imbalance=5", "data.augment=trivialaugment"],
    )
    assert cfg.data.batch_size_per_worker == 8
    assert cfg.toy.downstream_imbalance == 5.0 and isinstance(cfg.toy.downstream_imbalance, float)


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.batch_size=8", "data.batch_size: unknown key; did you mean 'batch_size_per_worker'"),
        ("data.batch_size_per_worker=0", "data.batch_size_per_worker: must be a positive integer"),
        ("data.batch_size_per_worker=eight", "data.batch_size_per_worker: expected an integer"),
        ("data.augment=cutout", "data.augment: must be one of 'basic', 'trivialaugment', 'randaugment'"),
        ("data.oversample=maybe", "data.oversample: expected true or false"),
        ("toy.downstream_classes=7", "toy.downstream_classes: must be between 2 and 5"),
        ("toy=3", "toy: expected a mapping"),
        ("nonsense", "expected key=value"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(DataDemoConfig, CONFIGS / "data" / "toy_demo.yaml", [override])
    assert message in str(err.value)


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(DataDemoConfig, tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("data: [1, 2")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(DataDemoConfig, tmp_path / "bad.yaml")


def test_every_field_is_documented():
    import dataclasses

    for cls in (DataConfig, DataDemoConfig):
        docs = field_docs(cls)
        assert {f.name for f in dataclasses.fields(cls)} == set(docs), cls


def test_demo_job_bad_config_exits_2(capsys):
    import jobs.demo

    assert jobs.demo.main(["data.resolution=2"]) == 2
    assert "data.resolution: must be >= 8" in capsys.readouterr().err


def test_scientific_notation_is_a_number_in_yaml_and_overrides(tmp_path):
    # PyYAML (YAML 1.1) alone reads 5e-4 as the string "5e-4"; recipes and the docs write it that way.
    from pipeline.config import OptimConfig

    recipe = tmp_path / "r.yaml"
    recipe.write_text("weight_decay: 5e-4\nlr: 1e-1\n")
    cfg = load_config(OptimConfig, recipe, ["label_smoothing=1e-1"])
    assert (cfg.weight_decay, cfg.lr, cfg.label_smoothing) == (5e-4, 0.1, 0.1)


def test_only_true_and_false_are_booleans_so_amp_off_stays_a_word(tmp_path):
    # YAML 1.1 reads off/on/yes/no as booleans: `train.amp=off` was False and failed the Literal check.
    from pipeline.config import TrainConfig

    recipe = tmp_path / "t.yaml"
    recipe.write_text("amp: off\nchannels_last: true\n")
    cfg = load_config(TrainConfig, recipe, ["compile=false"])
    assert (cfg.amp, cfg.channels_last, cfg.compile) == ("off", True, False)
    assert load_config(TrainConfig, recipe, ["amp=fp16"]).amp == "fp16"


def test_one_storage_root_sets_every_default_location(monkeypatch, tmp_path):
    from pipeline.data.storage import STORAGE_ROOT_ENV, default_location, under_any

    # The ImageNet recipes leave their locations to the root: a cluster user sets one value.
    assert (
        load_config(PretrainConfig, "configs/pretrain/resnet50_imagenet.yaml").checkpoint.storage_path is None
    )
    assert load_config(TuneConfig, "configs/tune/efficientnet_compound.yaml").search.storage_path is None
    monkeypatch.delenv(STORAGE_ROOT_ENV, raising=False)
    assert default_location("checkpoints") == ".cache/ray_results"
    monkeypatch.setenv(STORAGE_ROOT_ENV, "s3://team-bucket/pipeline/")
    assert default_location("checkpoints") == "s3://team-bucket/pipeline/checkpoints"
    assert default_location("tune") == "s3://team-bucket/pipeline/tune"

    (tmp_path / "efs" / "ckpt").mkdir(parents=True)
    assert under_any(str(tmp_path / "efs" / "ckpt"), [str(tmp_path / "efs")])
    assert under_any(str(tmp_path / "efs"), [str(tmp_path / "efs") + "/"])
    assert not under_any(str(tmp_path / "efs-other"), [str(tmp_path / "efs")]), "a prefix is not a parent"
    assert not under_any(str(tmp_path / "local"), [])


def test_the_demo_streams_progress_lines_without_rays_prefix():
    from pipeline.demo import _RAY_PREFIX, _SHOWN

    line = "(RayTrainWorker pid=812, ip=10.0.3.7) [toy-resnet20] epoch 3/10  loss 2.101  top1 0.214 | val top1 0.2"
    shown = _RAY_PREFIX.sub("", line)
    assert shown.startswith("[toy-resnet20] epoch 3/10") and _SHOWN.match(shown)
    assert _SHOWN.match("[trial-001]   epoch 1/3  step 40/120  loss 2.250  480 img/s")
    colored = "\x1b[36m(RayTrainWorker pid=11015)\x1b[0m [demo-pretrain] epoch 1/10  loss 2.390"
    assert _RAY_PREFIX.sub("", colored) == "[demo-pretrain] epoch 1/10  loss 2.390"
    assert not _SHOWN.match(_RAY_PREFIX.sub("", "(RayTrainWorker pid=812) Reporting training result 3: ..."))


@pytest.mark.parametrize(
    "override,message",
    [
        ("scaling.cpus_per_worker=0", "scaling.cpus_per_worker: must be > 0"),
        ("scaling.num_workers=-1", "scaling.num_workers: must be >= 0"),
        ("scaling.use_gpu=true", "scaling.use_gpu: needs Ray workers"),
    ],
)
def test_bad_scaling_names_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, "configs/pretrain/toy_resnet20.yaml", ["scaling.num_workers=0", override])
    assert message in str(err.value)

"""jobs/pretrain.py rejects bad input with exit code 2 and a message naming the field, before Ray starts.

Each case runs the job's real ``main`` with Ray made unimportable (conftest's ``no_ray``): every ``ray``
module and the project's two Ray adapters (``pipeline.launch``, ``pipeline.search.tuner``) are ``None`` in
``sys.modules``, so any import of them raises. If validation let a bad config through to the launcher, the
job would die of that ImportError instead of exiting 2 with the expected message. In-process: a subprocess
per case cost ~5 s of interpreter and torch start-up, 17 times.
"""

from __future__ import annotations

import pytest
from conftest import toy_pretrain_overrides

RECIPE = "configs/pretrain/toy_resnet20.yaml"

CASES = {
    "unknown architecture": (["model.name=resnet51"], "model.name: unknown model 'resnet51'; did you mean"),
    "zero batch size": (["data.batch_size_per_worker=0"], "data.batch_size_per_worker: must be a positive"),
    "negative batch size": (
        ["data.batch_size_per_worker=-8"],
        "data.batch_size_per_worker: must be a positive",
    ),
    "weight decay above 1": (["optim.weight_decay=1.5"], "optim.weight_decay: must be in [0, 1)"),
    "negative weight decay": (["optim.weight_decay=-1e-4"], "optim.weight_decay: must be in [0, 1)"),
    "dropout of 1": (["model.dropout=1.0"], "model.dropout: must be in [0, 1)"),
    "missing manifest": (
        ["data.train_manifest=/nonexistent/train/manifest.json"],
        "data.train_manifest: manifest",
    ),
    "unknown key": (
        ["optim.weight_decya=1e-4"],
        "optim.weight_decya: unknown key; did you mean 'weight_decay'?",
    ),
    "unknown section": (["optimizer.lr=0.1"], "optimizer: unknown key; did you mean 'optim'?"),
    "wrong type": (["train.epochs=ten"], "train.epochs: expected an integer, got 'ten'"),
    "nested range": (
        ["train.early_stopping.patience=0"],
        "train.early_stopping.patience: must be an integer >= 1",
    ),
    "bad regularization": (["optim.regularization=l1"], "optim.regularization: must be one of"),
    "adamw with l2": (
        ["optim.name=adamw", "optim.regularization=l2"],
        "optim.regularization: adamw is decoupled",
    ),
    "sync batchnorm on cpu": (["train.sync_batchnorm=true"], "train.sync_batchnorm: needs GPU workers"),
    "ema selected but off": (["train.ema.select=ema"], "train.ema.select: ema needs train.ema.enabled"),
    "ray data with oversampling": (
        ["data.backend=ray_data", "data.oversample=true"],
        "data.oversample: not available with data.backend: ray_data",
    ),
    "gpu decode on cpu workers": (
        ["data.decode=gpu"],
        "data.decode: gpu decodes on the training workers' GPUs",
    ),
    "skip limit of 1": (
        ["data.on_corrupt=skip", "data.max_corrupt_fraction=1"],
        "data.max_corrupt_fraction: must be in (0, 1)",
    ),
    "unknown scaling knob": (
        ["model.scaling={depth_mult: 2}"],
        "model.scaling: cifar_resnet20: unknown scaling",
    ),
}


def _run(capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``python jobs/pretrain.py --config RECIPE *args``."""
    from jobs.pretrain import main

    capsys.readouterr()
    code = main(["--config", RECIPE, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_guard_stops_an_import_of_ray(no_ray):
    with pytest.raises(ImportError):
        import ray.train  # noqa: F401
    with pytest.raises(ImportError):
        from pipeline.launch import launch  # noqa: F401


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_exits_2_naming_the_field(case, no_ray, toy_pretrain_manifests, tmp_path, capsys):
    overrides, expected = CASES[case]
    code, _, err = _run(capsys, *toy_pretrain_overrides(toy_pretrain_manifests, tmp_path), *overrides)
    assert code == 2, err[-2000:]
    assert expected in err, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, "one clear line, not a wall"
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()


def test_resume_without_a_stopped_run_exits_2(no_ray, toy_pretrain_manifests, tmp_path, capsys):
    code, _, err = _run(capsys, *toy_pretrain_overrides(toy_pretrain_manifests, tmp_path), "--resume")
    assert code == 2
    assert "--resume: no run named 'toy'" in err


def test_print_config_shows_the_resolved_tree(no_ray, capsys):
    code, out, err = _run(capsys, "--print-config", "optim.weight_decay=1e-3")
    assert code == 0, err
    assert "weight_decay: 0.001" in out and "regularization: weight_decay" in out


def test_unreachable_tracking_server_fails_before_ray(no_ray, toy_pretrain_manifests, tmp_path, capsys):
    from pipeline.ports import free_port

    port = free_port()  # nobody listens on it once the probe socket is closed
    overrides = toy_pretrain_overrides(toy_pretrain_manifests, tmp_path)
    code, _, err = _run(capsys, *overrides, f"tracking.uri=http://user:secret@127.0.0.1:{port}")
    assert code == 1, err[-2000:]
    assert f"MLflow tracking server http://127.0.0.1:{port} is unreachable" in err
    assert "tracking.required=false" in err
    assert "secret" not in err
    assert "Traceback" not in err


def test_a_truncated_or_rewritten_shard_is_refused_before_ray(
    no_ray, toy_pretrain_manifests, tmp_path, capsys
):
    """A partial upload (the shard cut to half) exits 2 naming the shard before Ray starts; a shard corrupted
    in place (same size) passes the size check and is caught by data.verify_shards=checksum."""
    import shutil
    from pathlib import Path

    source = Path(toy_pretrain_manifests["train"]).parent
    damaged = tmp_path / "train"
    shutil.copytree(source, damaged)
    shard = sorted(damaged.glob("*.tar"))[0]
    data = shard.read_bytes()
    manifests = {**toy_pretrain_manifests, "train": str(damaged / "manifest.json")}
    overrides = toy_pretrain_overrides(manifests, tmp_path)

    shard.write_bytes(data[: len(data) // 2])
    code, _, err = _run(capsys, *overrides)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"data.train_manifest: {shard} is {len(data) // 2:,} bytes but the manifest says" in err
    assert "jobs/make_shards.py" in err and not (tmp_path / "ray_results").exists()

    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    code, _, err = _run(capsys, *overrides, "data.verify_shards=checksum")
    assert code == 2 and f"{shard} does not match its sha256" in err, err

"""jobs/pretrain.py rejects bad input with exit code 2 and a message naming the field, before Ray starts.

Each case runs the real job in a subprocess whose ``import ray`` fails loudly (a shim package first on
PYTHONPATH): if validation let a bad config through to the launcher, the job would die of that ImportError
instead of exiting 2 with the expected message.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import toy_pretrain_overrides

REPO = Path(__file__).resolve().parents[1]
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
    "unknown scaling knob": (
        ["model.scaling={depth_mult: 2}"],
        "model.scaling: cifar_resnet20: unknown scaling",
    ),
}


@pytest.fixture(scope="module")
def no_ray_env(tmp_path_factory):
    shim = tmp_path_factory.mktemp("shim") / "ray"
    shim.mkdir()
    (shim / "__init__.py").write_text("raise ImportError('test shim: validation must finish before Ray')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shim.parent), str(REPO)]))
    env.pop("RAY_ADDRESS", None)
    return env


def _run(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "jobs/pretrain.py", "--config", RECIPE, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_exits_2_naming_the_field(case, no_ray_env, toy_pretrain_manifests, tmp_path):
    overrides, expected = CASES[case]
    result = _run(no_ray_env, *toy_pretrain_overrides(toy_pretrain_manifests, tmp_path), *overrides)
    assert result.returncode == 2, result.stderr[-2000:]
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, "one clear line, not a wall"
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()


def test_resume_without_a_stopped_run_exits_2(no_ray_env, toy_pretrain_manifests, tmp_path):
    result = _run(no_ray_env, *toy_pretrain_overrides(toy_pretrain_manifests, tmp_path), "--resume")
    assert result.returncode == 2
    assert "--resume: no run named 'toy'" in result.stderr


def test_print_config_shows_the_resolved_tree(no_ray_env):
    result = _run(no_ray_env, "--print-config", "optim.weight_decay=1e-3")
    assert result.returncode == 0, result.stderr
    assert "weight_decay: 0.001" in result.stdout and "regularization: weight_decay" in result.stdout


def test_unreachable_tracking_server_fails_before_ray(no_ray_env, toy_pretrain_manifests, tmp_path):
    from pipeline.stack import free_port

    port = free_port()  # nobody listens on it once the probe socket is closed
    overrides = toy_pretrain_overrides(toy_pretrain_manifests, tmp_path)
    result = _run(no_ray_env, *overrides, f"tracking.uri=http://user:secret@127.0.0.1:{port}")
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"MLflow tracking server http://127.0.0.1:{port} is unreachable" in result.stderr
    assert "tracking.required=false" in result.stderr
    assert "secret" not in result.stderr
    assert "Traceback" not in result.stderr

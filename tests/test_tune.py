"""A real search on a real local Ray: 4 trials of 1 DDP worker each under ASHA, the search driver SIGKILLed
mid-way and resumed with --resume. One search carries the assertions because each costs minutes here."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from pipeline.config import PretrainConfig, ShardConfig, ToyConfig, load_config

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
TRIALS, EPOCHS = 4, 3


@pytest.fixture(scope="module")
def tiny_manifests(tmp_path_factory):
    from pipeline.data.prepare import prepare_embedded

    root = tmp_path_factory.mktemp("tiny")
    toy = ToyConfig(
        root=str(root / "raw"),
        image_size=32,
        pretrain_train_per_class=50,
        pretrain_val_per_class=15,
        downstream_train_max=4,
        downstream_val_per_class=2,
        downstream_imbalance=2.0,
    )
    prepared = prepare_embedded(toy, ShardConfig(dest=str(root / "shards"), samples_per_shard=250, workers=1))
    return prepared.manifests["pretrain"]


def _processes_with(marker: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in process.info["cmdline"] or ()):
                found.append(process)
        except psutil.Error:
            continue
    return found


def _kill_all(processes: list[psutil.Process]) -> None:
    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(processes, timeout=20)


def test_asha_search_killed_and_resumed(tiny_manifests, tmp_path):
    from mlflow import MlflowClient

    from pipeline.pretrain import validate

    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths are length-limited
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("RAY_ADDRESS", None)
    db = tmp_path / "mlflow.db"
    args = [
        sys.executable,
        "jobs/tune.py",
        "--config",
        "configs/tune/toy_asha.yaml",
        f"pretrain.data.train_manifest={tiny_manifests['train']}",
        f"pretrain.data.val_manifest={tiny_manifests['val']}",
        "pretrain.data.batch_size_per_worker=50",
        f"pretrain.train.epochs={EPOCHS}",
        f"pretrain.tracking.uri=sqlite:///{db}",
        "pretrain.tracking.experiment=tune-test",
        "pretrain.tracking.register_as=tuned-test",
        f"search.num_trials={TRIALS}",
        # A continuous objective: early top-1 values tie at chance level, and ASHA never stops a tie.
        "search.metric=val/loss",
        "search.mode=min",
        f"search.storage_path={tmp_path}/ray_results",
        "search.name=search",
    ]
    trials_dir = tmp_path / "ray_results" / "search" / "trials"

    # 1. Start the search; once one trial has finished all its epochs, SIGKILL the driver and its local Ray.
    first = subprocess.Popen(
        args,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    finished_before_kill: set[str] = set()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and first.poll() is None:
            # Finished = Ray Train registered the last epoch's checkpoint (its directory alone may still be
            # uploading, and the trial would then rerun that epoch).
            finished_before_kill = {
                p.parent.name
                for p in trials_dir.glob("train-*/checkpoint_manager_snapshot.json")
                if f"epoch-{EPOCHS - 1:04d}" in p.read_text()
            }
            if finished_before_kill:
                break
            time.sleep(0.5)
        assert first.poll() is None, (
            f"the search ended before it could be killed:\n{first.stdout.read()[-3000:]}"
        )
        assert finished_before_kill, "no trial finished within 300 s"
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        _kill_all(_processes_with(ray_tmp))  # the killed driver's Ray: raylet, GCS, workers
    assert first.returncode == -signal.SIGKILL

    # 2. Resume: finished trials are not rerun, unfinished ones continue, the search completes.
    try:
        resumed = subprocess.run(
            [*args, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
        )
    finally:
        _kill_all(_processes_with(ray_tmp))
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    assert f"=== search search: {TRIALS} trials ===" in resumed.stdout

    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("tune-test")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, "one parent run across the kill and the resume"
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(int(c.data.params["trial.index"]) for c in children) == list(range(TRIALS)), (
        "every trial exactly once"
    )
    assert parent.info.status == "FINISHED"
    reasons = {}
    for child in children:
        assert child.info.status == "FINISHED", (child.info.run_name, child.info.status)
        reason = child.data.tags["stop_reason"]
        reasons[int(child.data.params["trial.index"])] = reason
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val/top1")]
        assert sorted(steps) == list(range(len(steps))) and len(steps) >= 1, f"no duplicated epochs: {steps}"
        assert reason in ("completed", "scheduler:asha", "early_stopping")
        assert (reason == "completed") == (len(steps) == EPOCHS)
        if f"train-{child.data.tags['tune.trial_id']}" in finished_before_kill:
            assert not client.get_metric_history(child.info.run_id, "system/resumed"), "finished: not rerun"
    assert "scheduler:asha" in reasons.values(), f"ASHA stopped no trial: {reasons}"

    metrics = parent.data.metrics
    assert metrics["search/epochs_budget"] == TRIALS * EPOCHS
    assert metrics["search/epochs_used"] < TRIALS * EPOCHS
    assert metrics["search/trials"] == TRIALS
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best_config.yaml", "trials", "plots", "config"} <= artifacts
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "trials")} >= {"trials/trials.csv"}

    # The best config is a pretrain recipe as is, and it is the best trial's.
    best_config = tmp_path / "ray_results" / "search" / "best_config.yaml"
    best = load_config(PretrainConfig, best_config)
    validate(best)
    best_index = int(metrics["best/trial"])
    best_child = next(c for c in children if int(c.data.params["trial.index"]) == best_index)
    assert f"{best.optim.weight_decay}" == best_child.data.params["optim.weight_decay"]
    assert f"{best.optim.lr}" == best_child.data.params["optim.lr"]
    version = client.get_model_version_by_alias("tuned-test", "champion")
    assert version.run_id == best_child.info.run_id

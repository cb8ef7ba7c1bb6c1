"""The cluster path: ``ray start --head`` on 127.0.0.1, ``ray job submit`` of the toy recipe, ``ray job stop``
half-way, then a second submission with ``--resume`` that finishes the same MLflow run.

The head node gets its own short temp dir and free ports; teardown kills exactly the processes of that
session (never ``ray stop``, which would kill every Ray process on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from conftest import toy_pretrain_overrides

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _session_processes(marker: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in process.info["cmdline"] or ()):
                found.append(process)
        except psutil.Error:
            continue
    return found


@pytest.fixture(scope="module")
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # short: Ray's socket paths are length-limited
    dashboard_port = _free_port()
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # the job's `python`
        RAY_AUTH_MODE="disabled",  # loopback-only test cluster; real clusters keep token auth
        RAY_USAGE_STATS_ENABLED="0",
        MLFLOW_DISABLE_TELEMETRY="true",
    )
    env.pop("RAY_ADDRESS", None)
    ray_cli = str(Path(sys.executable).parent / "ray")
    started = subprocess.run(
        [
            ray_cli,
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={_free_port()}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            "--include-dashboard=true",
            f"--ray-client-server-port={_free_port()}",
            "--num-cpus=2",
            "--num-gpus=0",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
    try:
        yield {"address": f"http://127.0.0.1:{dashboard_port}", "env": env, "cli": ray_cli}
    finally:
        for process in _session_processes(temp_dir):
            try:
                process.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(_session_processes(temp_dir), timeout=15)
        for process in alive:
            try:
                process.kill()
            except psutil.Error:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(
    head,
    job_id: str,
    args: list[str],
    *,
    script: str = "jobs/pretrain.py",
    config: str = "configs/pretrain/toy_resnet20.yaml",
) -> None:
    excludes = json.dumps({"excludes": [".venv", ".cache", ".git", "*.egg-info"]})
    deadline = time.monotonic() + 90
    while True:
        result = subprocess.run(
            [
                head["cli"],
                "job",
                "submit",
                "--address",
                head["address"],
                "--working-dir",
                str(REPO),
                "--runtime-env-json",
                excludes,
                "--submission-id",
                job_id,
                "--no-wait",
                "--",
                "python",
                script,
                "--config",
                config,
                *args,
            ],
            env=head["env"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        # Right after `ray start` the job agent may not be up yet: the server says so and asks to retry.
        if result.returncode == 0 or "No available agent" not in result.stderr or time.monotonic() > deadline:
            break
        time.sleep(2.0)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def test_job_submit_stop_and_resume(ray_head, toy_pretrain_manifests, tmp_path):
    from mlflow import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    jobs = JobSubmissionClient(ray_head["address"])
    args = [
        *toy_pretrain_overrides(toy_pretrain_manifests, tmp_path),
        f"train.epochs={EPOCHS}",
        "train.early_stopping.patience=10",
    ]
    run_dir = tmp_path / "ray_results" / "toy"

    # 1. Submit, let it checkpoint epoch 0, then stop the whole job (driver and workers).
    _submit(ray_head, "pretrain-first", args)
    _wait_for(
        lambda: (run_dir / "epoch-0000").exists() or jobs.get_job_status("pretrain-first").is_terminal(),
        240,
        "the first epoch's checkpoint",
    )
    assert not jobs.get_job_status("pretrain-first").is_terminal(), jobs.get_job_logs("pretrain-first")[
        -3000:
    ]
    stopped = subprocess.run(
        [ray_head["cli"], "job", "stop", "--address", ray_head["address"], "pretrain-first"],
        env=ray_head["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert _wait_for(lambda: jobs.get_job_status("pretrain-first").is_terminal(), 60, "the stop")
    assert jobs.get_job_status("pretrain-first") == JobStatus.STOPPED
    # The stopped job's training workers are gone, so they hold no CPUs the resumed job needs.
    _wait_for(
        lambda: (
            not any(
                "RayTrainWorker" in " ".join(p.info["cmdline"] or ())
                for p in psutil.process_iter(["cmdline"])
            )
        ),
        60,
        "the old workers to exit",
    )

    # 2. Resume: same run directory, same MLflow run, remaining epochs only.
    _submit(ray_head, "pretrain-resume", [*args, "--resume"])
    status = _wait_for(
        lambda: (s := jobs.get_job_status("pretrain-resume")).is_terminal() and s, 300, "the resumed job"
    )
    logs = jobs.get_job_logs("pretrain-resume")
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert "=== pretrain toy:" in logs

    marker = json.loads((run_dir / "pipeline_run.json").read_text())
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("pretrain-test")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [marker["mlflow_run_id"]], "one MLflow run across stop and resume"
    run = runs[0]
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/top1"))
    assert steps == list(range(EPOCHS)), f"each epoch exactly once, got {steps}"
    resumed = [m.step for m in client.get_metric_history(run.info.run_id, "system/resumed")]
    assert resumed and min(resumed) >= 1
    version = client.get_model_version_by_alias("toy-test", "champion")
    assert version.run_id == run.info.run_id
    assert (run_dir / "model" / "model.pt").is_file()


def test_search_job_submit(ray_head, toy_pretrain_manifests, tmp_path):
    """jobs/tune.py as a Ray job: 2 trials of 1 worker, no scheduler, on the running head node."""
    from mlflow import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    jobs = JobSubmissionClient(ray_head["address"])
    args = [
        f"pretrain.data.train_manifest={toy_pretrain_manifests['train']}",
        f"pretrain.data.val_manifest={toy_pretrain_manifests['val']}",
        "pretrain.data.batch_size_per_worker=50",
        "pretrain.train.epochs=2",
        f"pretrain.tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        "pretrain.tracking.register_as=null",
        "search.num_trials=2",
        "search.scheduler=none",
        f"search.storage_path={tmp_path}/ray_results",
        "search.name=job-search",
    ]
    _submit(ray_head, "tune-job", args, script="jobs/tune.py", config="configs/tune/toy_asha.yaml")
    status = _wait_for(
        lambda: (s := jobs.get_job_status("tune-job")).is_terminal() and s, 300, "the search job"
    )
    logs = jobs.get_job_logs("tune-job")
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert "=== search job-search: 2 trials ===" in logs
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tune-toy").experiment_id])
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)  # the parent and 2 trials
    assert (tmp_path / "ray_results" / "job-search" / "best_config.yaml").is_file()

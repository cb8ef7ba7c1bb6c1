"""The real local stack (Ray head + MLflow server + moto S3 endpoint on 127.0.0.1, free ports): lifecycle,
token authentication on every Ray port, a job sent with ``ray job submit`` and the token, two Ray instances
on one machine, and the S3 endpoint restarting between epochs. The training jobs' own paths on a cluster
(S3, restarts, MLflow outages, searches) run in test_multinode.py on a three-node cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import wait_for as _wait_for

from pipeline.stack import Stack, StackConfig, free_port

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stack():
    """A stack of its own (short state dir: Ray's socket paths are length-limited), torn down at the end."""
    state_dir = tempfile.mkdtemp(prefix="stk-", dir="/tmp")
    cfg = StackConfig(
        state_dir=state_dir,
        s3_port=free_port(),
        mlflow_port=free_port(),
        ray_port=free_port(),
        dashboard_port=free_port(),
        bucket="stack-test",
    )
    stack = Stack(cfg)
    try:
        stack.up()
        yield stack
    finally:
        stack.down()


@pytest.fixture
def stack_env(stack, monkeypatch):
    """This process talks to the stack's S3 endpoint (shards, checks) like the demo does."""
    from pipeline.data import s3

    for key, value in stack.cfg.client_env().items():
        monkeypatch.setenv(key, value)
    s3.reset_clients()
    yield stack.cfg.client_env()
    s3.reset_clients()


def _pids(stack: Stack) -> dict[str, int]:
    services = json.loads((stack.state_dir / "stack.json").read_text())["services"]
    return {name: record["pid"] for name, record in services.items() if "pid" in record}


def test_up_is_idempotent_and_restarts_only_what_died(stack):
    before = _pids(stack)
    assert set(before) == {"s3", "mlflow"} and all(stack.status().values())
    stack.up()
    assert _pids(stack) == before, "a healthy stack is left alone"
    stack.stop("mlflow")
    assert not stack.status()["mlflow"] and stack.status()["s3"]
    stack.up()
    after = _pids(stack)
    assert after["s3"] == before["s3"] and after["mlflow"] != before["mlflow"]
    assert all(stack.status().values())


def test_the_stack_ray_refuses_clients_without_its_token(stack):
    """Ray listens on non-loopback interfaces too (GCS, raylet, agent, client server): the token is the door.
    The accepted path, `ray job submit` with the token, is the state-probe job below."""
    token_file = stack.cfg.ray_token_path
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert token_file.read_text().strip() not in json.dumps(stack.cfg.client_env()), (
        "the token stays in its file"
    )

    jobs_api = f"{stack.cfg.dashboard_url}/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(jobs_api, timeout=10)  # noqa: S310 (loopback)
    assert refused.value.code in (401, 403)
    request = urllib.request.Request(jobs_api, headers=stack.cfg.ray_auth_headers())
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback)
        assert response.status == 200

    # The GCS port, as a driver would connect: a wrong token and no token are both refused.
    address = f"127.0.0.1:{stack.cfg.ray_port}"
    connect = f"import ray; ray.init(address='{address}', log_to_driver=False); print('connected')"
    # A refused ray.init leaves the node agents it started running: mark them to stop them afterwards.
    mark = f"refused-client-{os.getpid()}"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # On 127.0.0.1 itself (Ray would otherwise dial the machine's routable address), and 3 connection
    # attempts instead of Ray's 20 (one per second): a refused client fails at once, it only retries.
    clean.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_NUM_REDIS_GET_RETRIES": "3"})
    try:
        for env in ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, {"RAY_AUTH_MODE": "disabled"}):
            result = subprocess.run(
                [sys.executable, "-c", connect],
                env={**clean, **env, "PIPELINE_TEST_MARK": mark},
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert result.returncode != 0 and "connected" not in result.stdout, (env, result.stdout[-1000:])
        # The same client with the stack's token connects: the refusals above were the token's doing.
        accepted = subprocess.run(
            [sys.executable, "-c", connect],
            env={**clean, **stack.cfg.ray_auth_env(), "PIPELINE_TEST_MARK": mark},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert accepted.returncode == 0 and "connected" in accepted.stdout, accepted.stderr[-2000:]
    finally:
        leftovers = []
        for process in psutil.process_iter():
            try:
                if process.environ().get("PIPELINE_TEST_MARK") == mark:
                    leftovers.append(process)
            except psutil.Error:
                continue
        for process in leftovers:
            process.kill()
        psutil.wait_procs(leftovers, timeout=10)


def test_port_taken_by_someone_else_is_a_clear_error(tmp_path):
    from pipeline.stack import StackError

    taken = free_port()
    blocker = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(taken)])
    try:
        _wait_for(lambda: not _port_is_free(taken), 10, "the blocker")
        with pytest.raises(StackError, match=rf"port {taken} .* --mlflow-port"):
            Stack(StackConfig(state_dir=str(tmp_path), s3_port=free_port(), mlflow_port=taken)).up()
    finally:
        Stack(StackConfig(state_dir=str(tmp_path))).down()
        blocker.kill()
        blocker.wait()
    assert blocker.returncode is not None


def _port_is_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _submit(
    stack: Stack,
    job_id: str,
    args: list[str],
    *,
    script: str = "jobs/pretrain.py",
    config: str | None = "configs/pretrain/toy_resnet20.yaml",
) -> None:
    excludes = json.dumps({"excludes": [".venv", ".cache", ".git", "*.egg-info", "docs"]})
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "job",
        "submit",
        "--address",
        stack.cfg.dashboard_url,
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
        *(["--config", config] if config else []),
        *args,
    ]
    deadline = time.monotonic() + 90
    while True:
        result = subprocess.run(
            cmd, capture_output=True, text=True, timeout=120, env={**os.environ, **stack.cfg.ray_auth_env()}
        )
        if result.returncode == 0 or "No available agent" not in result.stderr or time.monotonic() > deadline:
            break
        time.sleep(2.0)  # right after `ray start` the job agent may not be up yet
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_workers_query_their_own_cluster_with_a_second_ray_instance_on_the_machine(stack, tmp_path):
    """Ray Train's placement-group cleaner asks the state API with no address; with two Ray instances on the
    machine Ray's auto-detection fails ("Found multiple active Ray instances"), the cleaner dies and stopped
    Tune trials keep their CPUs (a demo search stalled). Both ways of starting Ray must point workers at their
    own cluster: a local instance next to the stack's head, and a job on the head next to a local instance."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    release = tmp_path / "release"
    local = subprocess.Popen(
        [sys.executable, "tests/ray_state_probe.py", "--hold", str(release)],
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert local.stdout is not None
        lines = []
        for line in local.stdout:  # ends when the probe prints its result (or exits)
            lines.append(line)
            if line.startswith("probe:"):
                break
        assert lines and lines[-1].strip() == "probe: ok", "".join(lines)[-3000:]
        jobs = JobSubmissionClient(stack.cfg.dashboard_url, headers=stack.cfg.ray_auth_headers())
        _submit(stack, "state-probe", [], script="tests/ray_state_probe.py", config=None)
        status = _wait_job(jobs, "state-probe", 120)
        logs = jobs.get_job_logs("state-probe")
        assert status == JobStatus.SUCCEEDED and "probe: ok" in logs, logs[-3000:]
    finally:
        release.touch()
        try:
            local.communicate(timeout=60)  # drains the pipe: a probe blocked writing would never exit
        finally:
            local.kill()
    assert local.returncode == 0


def _wait_job(jobs, job_id: str, timeout_s: float):
    """The job's final status; on a timeout the assertion carries the tail of the job's log."""
    try:
        return _wait_for(lambda: _finished(jobs, job_id), timeout_s, f"job {job_id}")
    except AssertionError as error:
        raise AssertionError(f"{error}\n{jobs.get_job_logs(job_id)[-4000:]}") from None


def _finished(jobs, job_id: str):
    status = jobs.get_job_status(job_id)
    return status if status.is_terminal() else None


def test_down_stops_only_what_the_stack_started(tmp_path):
    """A second stack's moto server (same program, other state dir) survives the first one's `down`."""
    mine = Stack(StackConfig(state_dir=str(tmp_path / "mine"), s3_port=free_port(), mlflow_port=free_port()))
    other_port = free_port()
    other = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(other_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        mine._start_s3(mine._read())  # the S3 service alone: enough to check what `down` touches
        pid = _pids(mine)["s3"]
        assert mine.down() == ["s3"]
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert other.poll() is None, "a process the stack did not start was stopped"
    finally:
        other.kill()
        other.wait()


def _loader(manifest_url: str):
    from pipeline.config import DataConfig
    from pipeline.data.loader import build_loader
    from pipeline.data.manifest import load_manifest

    cfg = DataConfig(
        train_manifest=manifest_url,
        val_manifest=manifest_url,
        resolution=32,
        batch_size_per_worker=50,
        loader_workers=0,
    )
    manifest = load_manifest(manifest_url)
    return build_loader(manifest, cfg, train=True), manifest


def _epoch(loader, epoch: int) -> int:
    loader.set_epoch(epoch)
    return sum(len(labels) for _images, labels in loader)


def _tiny_shards(dest: str, root: Path) -> str:
    from pipeline.config import ShardConfig, ToyConfig
    from pipeline.data.prepare import prepare_embedded

    toy = ToyConfig(
        root=str(root),
        image_size=32,
        pretrain_train_per_class=20,
        pretrain_val_per_class=2,
        downstream_train_max=4,
        downstream_val_per_class=1,
        downstream_imbalance=2.0,
    )
    return prepare_embedded(toy, ShardConfig(dest=dest, samples_per_shard=50, workers=1)).manifests[
        "pretrain"
    ]["train"]


def test_loader_recovers_when_the_s3_endpoint_restarts_between_epochs(tmp_path, monkeypatch):
    """An S3 service that restarts with its data (any real one): the next epoch reads everything again."""
    import boto3
    from moto.server import ThreadedMotoServer

    from pipeline.data import s3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    s3.reset_clients()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="restart")
        loader, manifest = _loader(_tiny_shards("s3://restart/shards", tmp_path / "raw"))
        expected = loader.num_batches * 50
        assert _epoch(loader, 0) == expected
        server.stop()  # moto's in-process store outlives its HTTP server, like a real service's disks
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        assert _epoch(loader, 1) == expected, "the loader reconnects on its own"
    finally:
        server.stop()
        s3.reset_clients()


def test_predict_job_from_s3_to_s3_as_a_ray_job(stack, stack_env, toy_model, toy_manifests):
    """`ray job submit` of jobs/predict.py on the stack: the model from the stack's registry (artifacts in
    its S3), images from an S3 prefix, predictions, skips and summary back to S3."""
    import io

    import pandas as pd
    from mlflow import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    from pipeline.data import storage
    from pipeline.data.loader import read_samples
    from pipeline.data.manifest import load_manifest

    client = MlflowClient(stack.cfg.mlflow_uri)
    experiment = client.get_experiment_by_name("pretrain") or client.get_experiment(
        client.create_experiment("pretrain")
    )
    run = client.create_run(experiment.experiment_id, run_name="toy-for-predict")
    client.log_metric(run.info.run_id, "val/top1", toy_model.best_val_top1, step=0)
    client.log_artifacts(run.info.run_id, str(toy_model.export_dir), "model")
    client.set_terminated(run.info.run_id)
    from pipeline.tracking.mlflow_tracker import register_model

    register_model(
        run.info.run_id,
        artifact_path="model",
        name="toy-stack",
        alias="champion",
        metric="val/top1",
        mode="max",
        tracking_uri=stack.cfg.mlflow_uri,
    )

    prefix = f"s3://{stack.cfg.bucket}/predict-in"
    manifest = load_manifest(toy_manifests["pretrain"]["val"])
    for index, sample in zip(range(12), read_samples(manifest.shard_urls()), strict=False):
        storage.write_bytes_atomic(f"{prefix}/img-{index:02d}.jpg", sample["jpg"])
    storage.write_bytes_atomic(f"{prefix}/broken.jpg", b"not an image")
    output = f"s3://{stack.cfg.bucket}/predict-out"
    args = ["--model", "models:/toy-stack@champion", "--input", prefix, "--output", output]
    _submit(
        stack,
        "predict-s3",
        [*args, f"tracking.uri={stack.cfg.mlflow_uri}"],
        script="jobs/predict.py",
        config=None,
    )
    jobs = JobSubmissionClient(stack.cfg.dashboard_url, headers=stack.cfg.ray_auth_headers())
    status = _wait_job(jobs, "predict-s3", 180)
    logs = jobs.get_job_logs("predict-s3")
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert "=== predict: 13 images, 12 predicted, 1 skipped ===" in logs, logs[-3000:]
    assert "img/s" in logs
    parts = [name for name in storage.list_names(output) if name.startswith("part-")]
    frame = pd.concat(pd.read_parquet(io.BytesIO(storage.read_bytes(f"{output}/{name}"))) for name in parts)
    assert len(frame) == 13 and frame["label"].notna().sum() == 12
    skipped = pd.read_csv(io.BytesIO(storage.read_bytes(f"{output}/skipped.csv")))
    assert skipped["path"].tolist() == [f"{prefix}/broken.jpg"]
    summary = json.loads(storage.read_bytes(f"{output}/summary.json"))
    assert summary["predicted"] == 12 and summary["images_per_s"] > 0


def test_loader_fails_clearly_when_the_restarted_s3_endpoint_lost_the_shards(stack, stack_env, tmp_path):
    """The stack's moto restarts empty: the next epoch fails with an error naming the shard, no hang."""
    from pipeline.data.storage import StorageError

    loader, _ = _loader(_tiny_shards(f"s3://{stack.cfg.bucket}/restart-shards", tmp_path / "raw"))
    assert _epoch(loader, 0) > 0
    stack.stop("s3")
    stack.up()  # a new, empty endpoint (the bucket is created again, its objects are gone)
    started = time.monotonic()
    with pytest.raises(StorageError, match=rf"s3://{stack.cfg.bucket}/restart-shards/.*\.tar"):
        _epoch(loader, 1)
    assert time.monotonic() - started < 60

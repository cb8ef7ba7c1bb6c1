"""The real local stack (Ray head + MLflow server + moto S3 endpoint on 127.0.0.1, free ports): lifecycle,
``ray job submit`` of the toy pre-training recipe with shards and checkpoints in the S3 endpoint, ``ray job
stop`` then ``--resume``, a Tune search as a Ray job, and the faults users hit: the MLflow server dying
mid-run and the S3 endpoint restarting between epochs. One module, one Ray head: Ray tests run serially.
"""

from __future__ import annotations

import json
import os
import re
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
from conftest import toy_pretrain_overrides

from pipeline.stack import Stack, StackConfig, free_port

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3


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


def _rest(cfg: StackConfig, path: str, **query) -> dict:
    """MLflow's REST API, as any client of the server would read it."""
    url = f"{cfg.mlflow_uri}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (loopback)
        return json.loads(response.read())


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


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
    The accepted path, `ray job submit` with the token, is every job test below."""
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


JOB_EPOCHS = 2


def test_job_submit_stop_and_resume(stack, toy_pretrain_manifests, tmp_path):
    """`ray job stop` half-way, then a second submission with `--resume` finishes the same MLflow run."""
    from mlflow import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    jobs = JobSubmissionClient(stack.cfg.dashboard_url, headers=stack.cfg.ray_auth_headers())
    args = [
        *toy_pretrain_overrides(toy_pretrain_manifests, tmp_path),
        f"train.epochs={JOB_EPOCHS}",
        "train.early_stopping.patience=10",
    ]
    run_dir = tmp_path / "ray_results" / "toy"

    # 1. Submit, let it checkpoint epoch 0, then stop the whole job (driver and workers).
    _submit(stack, "pretrain-first", args)
    _wait_for(
        lambda: (run_dir / "epoch-0000").exists() or jobs.get_job_status("pretrain-first").is_terminal(),
        240,
        "the first epoch's checkpoint",
    )
    assert not jobs.get_job_status("pretrain-first").is_terminal(), jobs.get_job_logs("pretrain-first")[
        -3000:
    ]
    stopped = subprocess.run(
        [
            str(Path(sys.executable).parent / "ray"),
            "job",
            "stop",
            "--address",
            stack.cfg.dashboard_url,
            "pretrain-first",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **stack.cfg.ray_auth_env()},
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
    _submit(stack, "pretrain-resume", [*args, "--resume"])
    status = _wait_job(jobs, "pretrain-resume", 240)
    logs = jobs.get_job_logs("pretrain-resume")
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert "=== pretrain toy:" in logs
    # Progress a person can read in `ray job logs`: rank 0's line per epoch, no per-rank metric dicts.
    assert re.search(
        rf"\[toy\] epoch {JOB_EPOCHS}/{JOB_EPOCHS}  loss \d+\.\d+  top1 .* \| val top1 .* eta 0:00", logs
    ), logs[-3000:]
    assert "TrainingReport(" not in logs

    marker = json.loads((run_dir / "pipeline_run.json").read_text())
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("pretrain-test")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [marker["mlflow_run_id"]], "one MLflow run across stop and resume"
    run = runs[0]
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/top1"))
    assert steps == list(range(JOB_EPOCHS)), f"each epoch exactly once, got {steps}"
    resumed = [m.step for m in client.get_metric_history(run.info.run_id, "system/resumed")]
    assert resumed and min(resumed) >= 1
    version = client.get_model_version_by_alias("toy-test", "champion")
    assert version.run_id == run.info.run_id
    assert (run_dir / "model" / "model.pt").is_file()


def test_search_job_submit(stack, toy_pretrain_manifests, tmp_path):
    """jobs/tune.py as a Ray job: 2 trials of 1 worker, no scheduler, on the running head node."""
    from mlflow import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    jobs = JobSubmissionClient(stack.cfg.dashboard_url, headers=stack.cfg.ray_auth_headers())
    args = [
        f"pretrain.data.train_manifest={toy_pretrain_manifests['train']}",
        f"pretrain.data.val_manifest={toy_pretrain_manifests['val']}",
        "pretrain.data.batch_size_per_worker=50",
        "pretrain.train.epochs=1",
        "pretrain.optim.warmup_epochs=0",
        f"pretrain.tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        "pretrain.tracking.register_as=null",
        "search.num_trials=2",
        "search.scheduler=none",
        f"search.storage_path={tmp_path}/ray_results",
        "search.name=job-search",
    ]
    _submit(stack, "tune-job", args, script="jobs/tune.py", config="configs/tune/toy_asha.yaml")
    status = _wait_job(jobs, "tune-job", 300)
    logs = jobs.get_job_logs("tune-job")
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert "=== search job-search: 2 trials ===" in logs
    assert {f"[trial-00{i}] epoch 1/1" for i in range(2)} <= set(
        re.findall(r"\[trial-00\d\] epoch 1/1", logs)
    )
    assert "TrainingReport(" not in logs
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tune-toy").experiment_id])
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)  # the parent and 2 trials
    assert (tmp_path / "ray_results" / "job-search" / "best_config.yaml").is_file()


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


def test_pretrain_job_on_the_stack_survives_mlflow_going_down(stack, stack_env, tmp_path):
    """Shards in S3, `ray job submit`, MLflow killed after epoch 0: training finishes and says what it could
    not record, every checkpoint is in S3; with MLflow back, `--resume` trains nothing more, back-fills the
    missing epochs and registers the model. Checked through MLflow's REST API and the bucket itself."""
    import boto3
    from ray.job_submission import JobStatus, JobSubmissionClient

    from pipeline.config import ShardConfig, ToyConfig
    from pipeline.data.prepare import prepare_embedded

    cfg = stack.cfg
    toy = ToyConfig(
        root=str(tmp_path / "raw"),
        image_size=32,
        pretrain_train_per_class=100,
        pretrain_val_per_class=20,
        downstream_train_max=10,
        downstream_val_per_class=2,
        downstream_imbalance=2.0,
    )
    shards = prepare_embedded(
        toy, ShardConfig(dest=f"s3://{cfg.bucket}/shards", samples_per_shard=250, workers=1)
    )
    manifests = shards.manifests["pretrain"]
    assert manifests["train"].startswith("s3://")
    args = [
        f"data.train_manifest={manifests['train']}",
        f"data.val_manifest={manifests['val']}",
        "data.batch_size_per_worker=50",
        f"train.epochs={EPOCHS}",
        "train.early_stopping.patience=10",
        f"tracking.uri={cfg.mlflow_uri}",
        "tracking.experiment=stack-test",
        "tracking.register_as=toy-stack",
        f"checkpoint.storage_path=s3://{cfg.bucket}/ray_results",
        "checkpoint.name=toy-stack",
    ]
    jobs = JobSubmissionClient(cfg.dashboard_url, headers=cfg.ray_auth_headers())

    # 1. Submit; once epoch 0's metrics are in MLflow, kill the server.
    _submit(stack, "stack-pretrain", args)

    def first_epoch_logged():
        try:
            experiment = _rest(cfg, "experiments/get-by-name", experiment_name="stack-test")["experiment"]
        except urllib.error.HTTPError:  # 404 until the job's driver has created it
            return None
        runs = _rest_post(cfg, "runs/search", {"experiment_ids": [experiment["experiment_id"]]}).get(
            "runs", []
        )
        for run in runs:
            if any(m["key"] == "val/top1" for m in run["data"].get("metrics", [])):
                return run["info"]["run_id"]
        return None

    run_id = _wait_for(
        lambda: _finished(jobs, "stack-pretrain") or first_epoch_logged(), 240, "epoch 0's metrics in MLflow"
    )
    assert isinstance(run_id, str), jobs.get_job_logs("stack-pretrain")[-3000:]
    stack.stop("mlflow")

    status = _wait_job(jobs, "stack-pretrain", 300)
    logs = jobs.get_job_logs("stack-pretrain")
    # Training went on to the end; the failure is reported once, clearly, and says nothing is lost.
    assert status == JobStatus.FAILED, logs[-3000:]
    assert "tracking: MLflow at" in logs and "training goes on" in logs, logs[-3000:]
    assert f"training finished ({EPOCHS} epochs" in logs and "nothing is lost" in logs, logs[-3000:]
    assert "Traceback" not in logs.split("training finished")[-1], "one clear message, not a traceback wall"
    s3 = boto3.client("s3", endpoint_url=cfg.s3_endpoint)
    keys = {
        o["Key"] for o in s3.list_objects_v2(Bucket=cfg.bucket, Prefix="ray_results/toy-stack/")["Contents"]
    }
    assert f"ray_results/toy-stack/epoch-{EPOCHS - 1:04d}/state.pt" in keys, sorted(keys)
    assert "ray_results/toy-stack/model/model.pt" in keys, "the model is exported even without MLflow"

    # 2. MLflow back (stack up restarts only it, same sqlite store), then --resume publishes.
    stack.up()
    _submit(stack, "stack-pretrain-resume", [*args, "--resume"])
    status = _wait_job(jobs, "stack-pretrain-resume", 300)
    logs = jobs.get_job_logs("stack-pretrain-resume")
    assert status == JobStatus.SUCCEEDED, logs[-3000:]

    run = _rest(cfg, "runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "FINISHED"
    history = _rest(cfg, "metrics/get-history", run_id=run_id, metric_key="val/top1")["metrics"]
    assert sorted(m["step"] for m in history) == list(range(EPOCHS)), (
        "every epoch once, the missed ones back-filled"
    )
    version = _rest(cfg, "registered-models/alias", name="toy-stack", alias="champion")["model_version"]
    assert version["run_id"] == run_id
    # The registered model's files live in the bucket, proxied there by the MLflow server.
    mlflow_keys = [o["Key"] for o in s3.list_objects_v2(Bucket=cfg.bucket, Prefix="mlflow/")["Contents"]]
    assert any(k.endswith(f"{run_id}/artifacts/model/model.pt") for k in mlflow_keys), mlflow_keys[:20]


def _rest_post(cfg: StackConfig, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"{cfg.mlflow_uri}/api/2.0/mlflow/{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback)
        return json.loads(response.read())


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

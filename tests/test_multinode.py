"""A simulated three-node Ray cluster (``ray.cluster_utils.Cluster``, loopback only): a head with the job
server and two worker nodes, which share no storage with the jobs but S3 (the local stack's moto server) and
no tracking store (the local stack's MLflow server, or a sqlite file beside the job's driver).

Each worker node has 2 CPUs and each training worker asks for 1.5, so the two DDP ranks land on the two
worker nodes and never on the head; the tests check the node ids instead of trusting the arithmetic. The
simulated nodes share one IP, so Ray reports ``node_rank=0`` on all: the loader shards by world rank.

* the loaders on two nodes read disjoint shards and evaluate every sample once (an observing function run
  through ``pipeline.launch.launch``);
* the user's path, as jobs sent with the job SDK (``ray job submit --working-dir``): pre-training tracked
  to a sqlite file on the driver's side with a training worker SIGKILLed on a worker node; pre-training
  tracked to the MLflow server while the server goes down, then ``--resume``; a 4-trial ASHA search of
  2-worker trials stopped with ``ray job stop`` and resumed. A watch over every training worker process
  asserts that none opens the sqlite file or connects to the server;
* local paths are refused on this cluster before anything starts.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import pretrain_shards, toy_pretrain_overrides
from conftest import wait_for as _wait_for
from imgtree import write_sized_shards

from pipeline.data import storage
from pipeline.ports import free_port

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

RECIPE = "configs/pretrain/toy_resnet20.yaml"
BATCH = 20
SAMPLES_PER_SHARD = 25
# 10 classes: 400 samples in 16 shards of 25; each rank's 8 shards hold exactly its 10 batches of 20.
TRAIN_PER_CLASS = 40
VAL_PER_CLASS = 13  # 130 samples in shards of 25,25,25,25,25,5: ranks hold 75 and 55 (odd, short last batch)
ODD_VAL_SIZES = [37]  # one shard for two ranks: the interleaved split, 19 and 18 samples
# Per-rank evaluation shares: uneven, with odd counts and a short last batch.
EVAL_SHARES = {"val": [75, 55], "odd_val": [19, 18]}
NUM_CLASSES = 10
EPOCHS_OBSERVED = 2
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


# --------------------------------------------------------------------------------------------------------
# Data and cluster


@pytest.fixture(scope="module")
def multinode_data(tmp_path_factory) -> dict[str, str]:
    """Manifest URLs: toy ``train`` and ``val`` (several shards each, uneven val) and a one-shard ``odd_val``."""
    root = tmp_path_factory.mktemp("multinode-data")
    pretrain = pretrain_shards(
        root / "raw",
        str(root / "shards"),
        train_per_class=TRAIN_PER_CLASS,
        val_per_class=VAL_PER_CLASS,
        samples_per_shard=SAMPLES_PER_SHARD,
    )
    odd = write_sized_shards(root / "odd-val", ODD_VAL_SIZES, num_classes=NUM_CLASSES, image_size=32)
    return {"train": pretrain["train"], "val": pretrain["val"], "odd_val": odd.url}


@pytest.fixture(scope="module")
def services():
    """The local stack's S3 endpoint (moto) and MLflow server, without its Ray: the cluster below is the Ray."""
    from pipeline.stack import Stack, StackConfig

    stack = Stack(
        StackConfig(
            state_dir=tempfile.mkdtemp(prefix="mn-", dir="/tmp"),
            s3_port=free_port(),
            mlflow_port=free_port(),
            bucket="cluster",
        )
    )
    try:
        stack.up(with_ray=False)
        yield stack
    finally:
        stack.down()


@pytest.fixture(scope="module")
def cluster_env(services):
    """What every process of a job needs (and this one, to write shards and read results): the S3 endpoint,
    and the storage root that gives every job its checkpoint and search locations in that bucket."""
    from pipeline.data import s3
    from pipeline.stack import DUMMY_S3_ENV

    env = {
        "AWS_ENDPOINT_URL": services.cfg.s3_endpoint,
        "AWS_ENDPOINT_URL_S3": services.cfg.s3_endpoint,
        **DUMMY_S3_ENV,
        "PIPELINE_STORAGE_ROOT": f"s3://{services.cfg.bucket}/pipeline",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "RAY_USAGE_STATS_ENABLED": "0",
        # An operator's setting, as on a local instance (pipeline.launch.LOCAL_RUN_ENV): the controllers poll
        # their workers every 0.5 s instead of 2 s, so each run's start, end, report and restart after a lost
        # worker waits less on these three nodes sharing 2 cores. What the tests assert does not change.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        s3.reset_clients()
        yield env
    s3.reset_clients()


@pytest.fixture(scope="module")
def two_node_cluster(cluster_env):
    """A head node (1 CPU, the dashboard and job server) and two worker nodes of 2 CPUs on 127.0.0.1; this
    process connected to it. Training workers ask for 1.5 CPUs, so each worker node holds exactly one and
    the head none: the two DDP ranks always run on the two worker nodes, never beside the job's driver."""
    import ray
    import ray._private.ray_constants as ray_constants
    from ray import cloudpickle
    from ray.cluster_utils import Cluster

    # The train function below lives in this test module, which Ray workers cannot import: ship it by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.shutdown()  # the session's shared local instance (conftest.local_ray), if up: it restarts on next use
    loopback = {"node_ip_address": "127.0.0.1", "dashboard_host": "127.0.0.1"}
    cluster = Cluster(shutdown_at_exit=True)
    try:
        with pytest.MonkeyPatch.context() as patch:
            # ray.init turns a loopback address into the machine's routable IP before connecting
            # (services.resolve_ip_for_localhost), where nothing of this cluster listens; this switch makes
            # it keep 127.0.0.1: here, and (through the environment the nodes inherit) in every process of
            # the cluster that connects to it, such as the job agent and the jobs' drivers.
            patch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
            patch.setenv(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")
            # Its own dashboard port: 8265 may belong to another Ray instance on the machine.
            port = free_port()
            cluster.add_node(**loopback, num_cpus=1, include_dashboard=True, dashboard_port=port)
            for index in (1, 2):
                # Each node unpacks a job's working_dir into its own directory, as separate machines do:
                # sharing the head's, a node re-creating it would pull it from under the job's driver.
                cluster.add_node(
                    **loopback,
                    num_cpus=2,
                    include_dashboard=False,
                    runtime_env_dir_name=f"runtime_resources_node{index}",
                )
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
        cluster.dashboard_url = f"http://127.0.0.1:{port}"  # the job server, as `ray job submit` reaches it
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _cluster_pids(cluster) -> set[int]:
    import psutil

    pids = set()
    for node in [cluster.head_node, *cluster.worker_nodes]:
        for infos in node.all_processes.values():
            for info in infos:
                pids.add(info.process.pid)
                with contextlib.suppress(psutil.Error):
                    pids.update(c.pid for c in psutil.Process(info.process.pid).children(recursive=True))
    return pids


def _listening_addresses(pids: set[int]) -> set[str]:
    import psutil

    addresses = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            for conn in psutil.Process(pid).net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    addresses.add(conn.laddr.ip)
    return addresses


def _alive_nodes() -> dict[str, float]:
    import ray

    return {n["NodeID"]: n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]}


def _shard_keys(urls: list[str]) -> list[str]:
    """Sample keys of local tar shards, read with tarfile (not with the loader under test)."""
    keys = []
    for url in urls:
        with tarfile.open(url) as tar:
            members = [m.name for m in tar.getmembers() if m.isfile()]
        # webdataset's key: the path up to the first dot of the file name.
        keys.extend(dict.fromkeys(re.match(r"^((?:.*/|)[^.]+)[.]", name).group(1) for name in members))
    return keys


# --------------------------------------------------------------------------------------------------------
# The observing train function (runs in the Ray workers)


@contextlib.contextmanager
def _observe_loader(opened: list[dict], decoded: list[str]):
    """Record the shard lists the loader opens (one per pass, with the keys read from them) and the key of
    every sample it decodes, i.e. every sample that ends up in a batch. The loader itself is unchanged."""
    from pipeline.data import loader

    pass_, decode = loader._SlotStream._pass, loader._SlotStream._decode

    def passing(self, plan, worker, *, skip=0):
        record = {"urls": [self.urls[i] for i in plan.shard_indices], "keys": []}
        opened.append(record)
        for sample in pass_(self, plan, worker, skip=skip):
            record["keys"].append(sample["__key__"])
            yield sample

    def decoding(self, sample, worker):
        decoded.append(sample["__key__"])
        return decode(self, sample, worker)

    loader._SlotStream._pass, loader._SlotStream._decode = passing, decoding
    try:
        yield
    finally:
        loader._SlotStream._pass, loader._SlotStream._decode = pass_, decode


def _report_records(record: dict, *, rank: int, world_size: int) -> None:
    """In a Train worker: every rank's ``record`` gathered over gloo (between the two nodes) and reported in
    rank 0's checkpoint as records.json (read back by :func:`_launch_observer`)."""
    import ray.train
    import torch.distributed as dist

    records: list = [None] * world_size
    dist.all_gather_object(records, record)
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            Path(directory, "records.json").write_text(json.dumps(records))
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report({"epoch": 0}, checkpoint=checkpoint)


def _launch_observer(worker, spec, tmp_path: Path, name: str, datasets=None) -> list[dict]:
    """Run an observing Train worker on the two worker nodes; every rank's record, by rank."""
    from pipeline.config import CheckpointConfig
    from pipeline.launch import launch

    result = launch(
        worker,
        spec=spec,
        scaling=_two_worker_scaling(),
        checkpoint=CheckpointConfig(storage_path=str(tmp_path), name=name, num_to_keep=1, max_failures=0),
        storage_path=str(tmp_path / "ray_results"),
        name=name,
        metric="epoch",
        mode="max",
        datasets=datasets,
    )
    try:
        return json.loads(Path(result.checkpoint_dir, "records.json").read_text())
    finally:
        shutil.rmtree(result.checkpoint_dir, ignore_errors=True)


def _observe_worker(config: dict) -> None:
    import ray
    import ray.train
    import torch

    from pipeline.config import DataConfig, TrainConfig
    from pipeline.data.loader import build_loader
    from pipeline.data.manifest import load_manifest
    from pipeline.models import build_model
    from pipeline.train.loop import evaluate

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    # loader_workers=0: the stream runs in this process, where the observer sees it. shuffle_buffer=1: batches
    # come in stream order, so the samples a rank trains on in an epoch are exactly its first pass.
    data = DataConfig(resolution=32, batch_size_per_worker=BATCH, loader_workers=0, shuffle_buffer=1)
    record = {
        "rank": rank,
        "world_size": world_size,
        "node_id": ray.get_runtime_context().get_node_id(),
        "train": [],
        "eval": {},
    }
    opened: list[dict] = []
    decoded: list[str] = []
    with _observe_loader(opened, decoded):
        train = build_loader(
            load_manifest(config["train"]), data, train=True, rank=rank, world_size=world_size
        )
        for epoch in range(EPOCHS_OBSERVED):
            opened.clear()
            decoded.clear()
            train.set_epoch(epoch)
            batch_sizes = [len(labels) for _, labels in train]
            record["train"].append(
                {"batch_sizes": batch_sizes, "passes": [dict(p) for p in opened], "decoded": list(decoded)}
            )
        torch.manual_seed(0)
        model = build_model("cifar_resnet20", num_classes=NUM_CLASSES)
        cfg = TrainConfig(amp="off")
        for name in ("val", "odd_val"):
            val = build_loader(
                load_manifest(config[name]), data, train=False, rank=rank, world_size=world_size
            )
            decoded.clear()
            reduced = evaluate(model, val, device=torch.device("cpu"), cfg=cfg)  # all-reduced over ranks
            keys = list(decoded)
            local = evaluate(model, val, device=torch.device("cpu"), cfg=cfg, reduce=False)
            record["eval"][name] = {
                "keys": keys,
                "count_reduced": reduced.count,
                "confusion_reduced": int(reduced.confusion.sum()),
                "count_local": local.count,
                "planned_samples": val.num_samples,
                "planned_batches": len(val),
            }
    _report_records(record, rank=rank, world_size=world_size)


def _ray_data_worker(spec: dict) -> None:
    """A Train worker that records the batches its Ray Data shard gives (data.backend: ray_data), 2 epochs."""
    import ray
    import ray.train

    from pipeline.config import DataConfig
    from pipeline.data.ray_ingest import shard_loader

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    data = DataConfig(**spec["data"])
    loader = shard_loader(data, num_samples=spec["num_samples"], world_size=world_size)
    record = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "epochs": []}
    for epoch in range(EPOCHS_OBSERVED):
        loader.set_epoch(epoch)
        batches = [(list(images.shape), str(images.dtype), labels.tolist()) for images, labels in loader]
        record["epochs"].append({"batches": batches, "length": len(loader)})
    _report_records(record, rank=rank, world_size=world_size)


# --------------------------------------------------------------------------------------------------------
# Tests


def _two_worker_scaling():
    from pipeline.config import ScalingConfig

    return ScalingConfig(num_workers=2, use_gpu=False, cpus_per_worker=1.5)


def test_ray_data_ingest_decodes_on_a_node_without_training_workers(
    two_node_cluster, multinode_data, tmp_path
):
    """data.backend: ray_data on the cluster: the two DDP ranks hold 1.5 of their node's 2 CPUs, so every
    decode task (1 CPU) runs on the 1-CPU head, a node with no training worker. Each rank gets exactly
    num_samples // (world_size x batch) full uint8 batches every epoch (the webdataset loader's contract),
    and the order changes between epochs."""
    from ray.util.state import list_tasks

    from pipeline.config import DataConfig, to_dict
    from pipeline.data.manifest import load_manifest
    from pipeline.data.ray_ingest import datasets_for

    data = DataConfig(resolution=32, batch_size_per_worker=BATCH, shuffle_buffer=40, backend="ray_data")
    manifest = load_manifest(multinode_data["train"])
    spec = {"data": to_dict(data), "num_samples": manifest.num_samples}
    datasets = datasets_for(manifest, data)
    records = _launch_observer(_ray_data_worker, spec, tmp_path, "ray-data", datasets=datasets)
    planned = manifest.num_samples // (2 * BATCH)
    orders = []
    for epoch in range(EPOCHS_OBSERVED):
        per_rank = [r["epochs"][epoch] for r in records]
        for observed in per_rank:
            assert observed["length"] == planned
            assert [(b[0], b[1]) for b in observed["batches"]] == [
                ([BATCH, 3, 32, 32], "torch.uint8")
            ] * planned
        labels = [[label for b in observed["batches"] for label in b[2]] for observed in per_rank]
        orders.append(labels[0])
    assert orders[0] != orders[1], "each epoch re-runs the pipeline in a new order"

    nodes = _alive_nodes()
    (head,) = [node for node, cpus in nodes.items() if cpus == 1.0]
    training_nodes = {r["node_id"] for r in records}
    assert head not in training_nodes and len(training_nodes) == 2
    decoded_on = {
        t.node_id for t in list_tasks(filters=[("name", "=", "MapBatches(_decode_augment)")], limit=1000)
    }
    assert decoded_on == {head}, (
        f"decode tasks ran on {decoded_on}; the training workers are on {training_nodes}"
    )


def test_ranks_on_two_nodes_read_disjoint_shards_and_evaluate_each_sample_once(
    two_node_cluster, multinode_data, tmp_path
):
    from pipeline.data.manifest import load_manifest

    nodes = _alive_nodes()
    assert sorted(nodes.values()) == [1.0, 2.0, 2.0], (
        f"expected a 1-CPU head and two 2-CPU nodes, got {nodes}"
    )
    listening = _listening_addresses(_cluster_pids(two_node_cluster))
    assert listening and listening <= LOOPBACK, f"the cluster listens beyond loopback: {listening}"

    records = _launch_observer(_observe_worker, multinode_data, tmp_path, "observe")
    assert [r["rank"] for r in records] == [0, 1] and all(r["world_size"] == 2 for r in records)

    # One rank per node: two different, live Ray nodes. (Ray reports node_rank 0 on both, as the simulated
    # nodes share one IP: the loader's split by world rank is what the checks below rely on.)
    node_ids = [r["node_id"] for r in records]
    assert node_ids[0] != node_ids[1], f"both DDP workers ran on node {node_ids[0]}"
    assert set(node_ids) == {node for node, cpus in nodes.items() if cpus == 2.0}, "on the two worker nodes"

    # Training: every epoch, the ranks' first passes partition the shard files and the samples.
    train = load_manifest(multinode_data["train"])
    train_urls = train.shard_urls()
    all_train_keys = _shard_keys(train_urls)
    assert len(train_urls) >= 4 and len(set(all_train_keys)) == train.num_samples == len(all_train_keys)
    first_shards = []
    for epoch in range(EPOCHS_OBSERVED):
        per_rank = [r["train"][epoch] for r in records]
        batches = train.num_samples // (2 * BATCH)
        for observed in per_rank:
            assert observed["batch_sizes"] == [BATCH] * batches, "every rank yields the same full batches"
        shards = [p["passes"][0]["urls"] for p in per_rank]
        both = sorted(Path(u).name for u in set(shards[0]) & set(shards[1]))
        assert not both, f"epoch {epoch}: both ranks opened {both}"
        assert sorted(shards[0] + shards[1]) == sorted(train_urls), f"epoch {epoch}: shards not covered"
        read = [p["passes"][0]["keys"] for p in per_rank]
        assert sorted(read[0] + read[1]) == sorted(all_train_keys), (
            f"epoch {epoch}: first passes overlap or miss"
        )
        # What the ranks trained on (decoded into batches) in this epoch: disjoint, together the whole split.
        trained = [p["decoded"] for p in per_rank]
        assert [len(t) for t in trained] == [batches * BATCH] * 2
        assert set(trained[0]).isdisjoint(trained[1])
        assert sorted(trained[0] + trained[1]) == sorted(all_train_keys)
        first_shards.append(shards[0])
    assert first_shards[0] != first_shards[1], "the shard order should be reshuffled every epoch"

    # Evaluation: the ranks' shares are disjoint and uneven; the all-reduced count is the manifest's.
    for name in ("val", "odd_val"):
        manifest = load_manifest(multinode_data[name])
        expected = _shard_keys(manifest.shard_urls())
        assert len(set(expected)) == manifest.num_samples
        shares = [r["eval"][name] for r in records]
        for share in shares:
            assert share["count_reduced"] == manifest.num_samples, f"{name}: all-reduced eval count"
            assert share["confusion_reduced"] == manifest.num_samples
            assert share["count_local"] == len(share["keys"]) == share["planned_samples"]
            assert share["planned_batches"] == math.ceil(share["count_local"] / BATCH)
        keys = [s["keys"] for s in shares]
        assert len(set(keys[0])) == len(keys[0]) and len(set(keys[1])) == len(keys[1]), f"{name}: duplicates"
        assert set(keys[0]).isdisjoint(keys[1]), f"{name}: a sample evaluated on both ranks"
        assert sorted(keys[0] + keys[1]) == sorted(expected), f"{name}: not every sample evaluated"
        counts = [s["count_local"] for s in shares]
        assert counts == EVAL_SHARES[name], f"{name}: per-rank shares {counts}"
        assert any(c % BATCH for c in counts), f"{name}: no short last batch"


# --------------------------------------------------------------------------------------------------------
# The user's path on a cluster: `ray job submit` (job SDK), shards and checkpoints in S3, tracking from the
# driver's side only (a sqlite file, then an MLflow server), a worker SIGKILLed on a worker node, the MLflow
# server down mid-run, and an ASHA search of 2-worker trials stopped and resumed.

JOB_RECIPE_ARGS = ["--config", RECIPE]
RUN_EPOCHS = 5


@pytest.fixture(scope="module")
def s3_shards(cluster_env, tmp_path_factory) -> dict[str, str]:
    """Toy shards in the cluster's bucket (1,500 train / 300 val images of 10 classes)."""
    bucket = cluster_env["PIPELINE_STORAGE_ROOT"].split("/")[2]
    return pretrain_shards(
        tmp_path_factory.mktemp("s3-shards") / "raw",
        f"s3://{bucket}/shards",
        train_per_class=150,
        val_per_class=30,
        samples_per_shard=250,
    )


@pytest.fixture(scope="module")
def s3_small_shards(cluster_env, tmp_path_factory) -> dict[str, str]:
    """A third of that (500 / 150 images), for the search and the outage run: their assertions are about
    trials and records, not accuracy."""
    bucket = cluster_env["PIPELINE_STORAGE_ROOT"].split("/")[2]
    return pretrain_shards(
        tmp_path_factory.mktemp("s3-small-shards") / "raw",
        f"s3://{bucket}/small-shards",
        train_per_class=50,
        val_per_class=15,
        samples_per_shard=125,
    )


def _jobs(cluster):
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 60
    while True:  # the job agent may come up a little after the head
        try:
            return JobSubmissionClient(cluster.dashboard_url)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def _submit(cluster, job_id: str, script: str, args: list[str], env: dict[str, str]) -> None:
    """`ray job submit --working-dir <repo>` through the job SDK: the job gets its own copy of the code."""
    deadline = time.monotonic() + 60
    while True:
        try:
            _jobs(cluster).submit_job(
                submission_id=job_id,
                entrypoint=shlex.join([sys.executable, script, *args]),
                runtime_env={
                    "working_dir": str(REPO),
                    "excludes": [".venv", ".cache", ".git", "*.egg-info", "docs", "tests"],
                    "env_vars": env,
                },
            )
            return
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def _wait_job(cluster, job_id: str, timeout_s: float):
    jobs = _jobs(cluster)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = jobs.get_job_status(job_id)
        if status.is_terminal():
            return status, jobs.get_job_logs(job_id)
        time.sleep(1.0)
    jobs.stop_job(job_id)
    raise AssertionError(
        f"job {job_id} still running after {timeout_s:.0f} s:\n{jobs.get_job_logs(job_id)[-3000:]}"
    )


def _s3_keys(prefix: str) -> set[str]:
    import boto3

    bucket, _, key = prefix.removeprefix("s3://").partition("/")
    s3 = boto3.client("s3")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
    return {o["Key"].removeprefix(key) for page in pages for o in page.get("Contents", [])}


def _train_worker_actors() -> list[dict]:
    import ray._private.state

    return [
        a
        for a in ray._private.state.actors().values()
        if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE"
    ]


class StoreWatch:
    """Watches every Ray Train worker process while jobs run: none may open the tracking store (the sqlite
    file) or connect to the MLflow server. Workers are found by their process title; each is looked at
    every 0.3 s, so a worker that reached the store for longer than that is seen."""

    def __init__(self, sqlite_paths: list[str], mlflow_port: int) -> None:
        self.sqlite_paths, self.mlflow_port = sqlite_paths, mlflow_port
        self.seen: set[int] = set()
        self.violations: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> StoreWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            for process in psutil.process_iter(["cmdline"]):
                try:
                    if "ray::RayTrainWorker" not in " ".join(process.info["cmdline"] or ()):
                        continue
                    self.seen.add(process.pid)
                    opened = [f.path for f in process.open_files() if f.path in self.sqlite_paths]
                    talks = [
                        c
                        for c in process.net_connections(kind="inet")
                        if c.raddr and c.raddr.port == self.mlflow_port
                    ]
                except psutil.Error:
                    continue
                if opened or talks:
                    self.violations.append(f"worker {process.pid}: {opened or talks}")
            self._stop.wait(0.3)


def _history_steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.mark.timeout(600)
def test_job_on_three_nodes_survives_a_killed_worker_node_process_tracking_from_the_driver(
    two_node_cluster, cluster_env, services, s3_shards, tmp_path
):
    """Run A: sqlite tracking on the driver's side, a training worker SIGKILLed on a worker node after
    epoch 1's checkpoint: the group restarts from S3, finishes, logs every epoch once, registers the model."""
    import ray
    import torch
    from mlflow import MlflowClient

    from pipeline.train.state import read_state

    db = tmp_path / "mlflow.db"
    root = cluster_env["PIPELINE_STORAGE_ROOT"]
    run_url = f"{root}/checkpoints/toy-a"
    args = [
        *JOB_RECIPE_ARGS,
        f"data.train_manifest={s3_shards['train']}",
        f"data.val_manifest={s3_shards['val']}",
        "data.batch_size_per_worker=50",
        f"train.epochs={RUN_EPOCHS}",
        "train.early_stopping.patience=10",
        f"tracking.uri=sqlite:///{db}",
        "tracking.experiment=cluster",
        "tracking.register_as=toy-cluster",
        "checkpoint.storage_path=null",  # $PIPELINE_STORAGE_ROOT/checkpoints
        "checkpoint.name=toy-a",
        "checkpoint.max_failures=2",
        "scaling.cpus_per_worker=1.5",
    ]
    head = two_node_cluster.head_node.node_id
    killed: dict = {}
    with StoreWatch([str(db)], services.cfg.mlflow_port) as watch:
        _submit(two_node_cluster, "run-a", "jobs/pretrain.py", args, cluster_env)
        _wait_for(
            lambda: (
                "epoch-0001/state.pt" in _s3_keys(f"{run_url}/")
                or _jobs(two_node_cluster).get_job_status("run-a").is_terminal()
            ),
            240,
            "epoch 1's checkpoint in S3",
        )
        jobs = _jobs(two_node_cluster)
        assert not jobs.get_job_status("run-a").is_terminal(), jobs.get_job_logs("run-a")[-4000:]
        time.sleep(1.0)  # into epoch 2
        workers = _train_worker_actors()
        assert len(workers) == 2 and head not in {w["Address"]["NodeID"] for w in workers}, workers
        victim = workers[0]
        os.kill(victim["Pid"], signal.SIGKILL)
        killed = {"pid": victim["Pid"], "node": victim["Address"]["NodeID"]}
        status, logs = _wait_job(two_node_cluster, "run-a", 300)
    assert status.name == "SUCCEEDED", logs[-4000:]
    assert killed["node"] != head and killed["node"] in {n["NodeID"] for n in ray.nodes()}
    assert len(watch.seen) >= 4, f"the watch saw {len(watch.seen)} worker processes (2, then 2 restarted)"
    assert not watch.violations, watch.violations

    # Progress a person can read in `ray job logs`: rank 0's line per epoch, no per-rank metric dicts.
    assert re.search(
        rf"\[toy-a\] epoch {RUN_EPOCHS}/{RUN_EPOCHS}  loss \d+\.\d+  top1 .* \| val top1 .* eta 0:00", logs
    )
    assert "TrainingReport(" not in logs

    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("cluster").experiment_id])
    assert run.info.status == "FINISHED"
    for key in (
        "train/loss",
        "train/top1",
        "val/loss",
        "val/top1",
        "val/top5",
        "system/images_per_s",
        "train/lr",
    ):
        assert _history_steps(client, run.info.run_id, key) == list(range(RUN_EPOCHS)), (
            f"{key}: each epoch once"
        )
    resumed = _history_steps(client, run.info.run_id, "system/resumed")
    # The kill comes ~1 s after epoch 1's checkpoint is in S3; Ray may not have registered it yet, so the
    # group resumes at epoch 1 or 2 - either way from a checkpoint, not from scratch.
    assert resumed and set(resumed) <= {1, 2}, resumed
    val_top1 = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/top1")}
    # It learned across nodes: the training loss fell, and validation top-1 rose above chance (0.10; 0.15
    # is 3 sd above it on 300 images).
    train_loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert train_loss[RUN_EPOCHS - 1] < train_loss[0] - 0.05, train_loss
    assert max(val_top1.values()) > 0.15, val_top1

    # Replicas bit-identical; the export (in S3) is the best epoch's weights; registered from this run.
    final = read_state(f"{run_url}/epoch-{RUN_EPOCHS - 1:04d}/state.pt")
    best_epoch = max(val_top1, key=val_top1.get)
    assert final["early_stopping"]["best_epoch"] == best_epoch
    export = read_state(f"{run_url}/model/model.pt")
    assert all(torch.equal(export["state_dict"][k], v) for k, v in final["best_model"].items())
    assert export["model_config"]["name"] == "cifar_resnet20"
    # Every kept checkpoint's report (Ray's snapshot in S3) carries both ranks' parameter digests: equal.
    snapshot = storage.read_bytes(f"{run_url}/checkpoint_manager_snapshot.json").decode()
    digests = re.findall(r'param_digests\\?"\s*:\s*\\?"([0-9a-f,]+)', snapshot)
    assert digests and all(len(set(d.split(","))) == 1 and d.count(",") == 1 for d in digests), digests
    version = client.get_model_version_by_alias("toy-cluster", "champion")
    assert version.run_id == run.info.run_id
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {
        "plots/learning_curves.png",
        "plots/confusion_matrix.png",
    }
    for tag in ("git.revision", "dataset.manifest_digest", "model.arch", "model.params", "version.ray"):
        assert run.data.tags.get(tag), tag


def _mlflow_rest(services, path: str, **query) -> dict:
    """MLflow's REST API, as any client of the server reads it."""
    import urllib.parse
    import urllib.request

    url = f"{services.cfg.mlflow_uri}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (loopback)
        return json.loads(response.read())


@pytest.mark.timeout(600)
def test_job_tracked_by_a_server_that_goes_down_finishes_and_resume_backfills(
    two_node_cluster, cluster_env, services, s3_small_shards, tmp_path
):
    """Run B: tracking to an MLflow server, which is killed once epoch 0 is logged. Training goes on to the
    end, the job fails with one clear message saying nothing is lost (checkpoints and export in S3); with the
    server back, a second job with --resume trains nothing, back-fills the missing epochs and registers."""
    from mlflow import MlflowClient

    # 3 short epochs: the server is stopped once epoch 0 is logged, and epoch 1 may be logged before the stop
    # lands (epochs take ~2.5 s here), so at least epoch 2 is reported while the server is down.
    epochs = 3
    run_url = f"{cluster_env['PIPELINE_STORAGE_ROOT']}/checkpoints/toy-b"
    args = [
        *JOB_RECIPE_ARGS,
        f"data.train_manifest={s3_small_shards['train']}",
        f"data.val_manifest={s3_small_shards['val']}",
        "data.batch_size_per_worker=50",
        "data.loader_workers=0",
        f"train.epochs={epochs}",
        "train.early_stopping.patience=10",
        f"tracking.uri={services.cfg.mlflow_uri}",
        "tracking.experiment=cluster-server",
        "tracking.register_as=toy-cluster-server",
        "checkpoint.storage_path=null",
        "checkpoint.name=toy-b",
        "scaling.cpus_per_worker=1.5",
    ]
    client = MlflowClient(services.cfg.mlflow_uri)

    def first_epoch_logged() -> str | None:
        experiment = client.get_experiment_by_name("cluster-server")
        if experiment is None:
            return None
        for run in client.search_runs([experiment.experiment_id]):
            if "val/top1" in run.data.metrics:
                return run.info.run_id
        return None

    with StoreWatch([], services.cfg.mlflow_port) as watch:
        _submit(two_node_cluster, "run-b", "jobs/pretrain.py", args, cluster_env)
        run_id = _wait_for(
            lambda: first_epoch_logged() or _jobs(two_node_cluster).get_job_status("run-b").is_terminal(),
            240,
            "epoch 0's metrics in MLflow",
        )
        assert isinstance(run_id, str), _jobs(two_node_cluster).get_job_logs("run-b")[-3000:]
        services.stop("mlflow")
        status, logs = _wait_job(two_node_cluster, "run-b", 300)
        assert status.name == "FAILED", logs[-3000:]
        assert "tracking: MLflow at" in logs and "training goes on" in logs, logs[-3000:]
        assert f"training finished ({epochs} epochs" in logs and "nothing is lost" in logs, logs[-3000:]
        assert "Traceback" not in logs.split("training finished")[-1], (
            "one clear message, not a traceback wall"
        )
        keys = _s3_keys(f"{run_url}/")
        assert f"epoch-{epochs - 1:04d}/state.pt" in keys and "model/model.pt" in keys, sorted(keys)

        services.up(with_ray=False)  # the same store: the server restarts on its sqlite file
        _submit(two_node_cluster, "run-b-resume", "jobs/pretrain.py", [*args, "--resume"], cluster_env)
        status, logs = _wait_job(two_node_cluster, "run-b-resume", 300)
    assert status.name == "SUCCEEDED", logs[-3000:]
    assert f"resume: training had finished ({epochs} epochs); no workers started" in logs, logs[-3000:]
    assert not watch.violations, watch.violations

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert _history_steps(client, run_id, "val/top1") == list(range(epochs)), "every epoch once, back-filled"
    assert client.get_model_version_by_alias("toy-cluster-server", "champion").run_id == run_id
    # The registered files are in the bucket, proxied there by the server (clients need only its URL).
    bucket = cluster_env["PIPELINE_STORAGE_ROOT"].split("/")[2]
    assert any(k.endswith(f"{run_id}/artifacts/model/model.pt") for k in _s3_keys(f"s3://{bucket}/mlflow/"))


@pytest.mark.timeout(600)
def test_asha_search_of_two_worker_trials_stopped_and_resumed_on_the_cluster(
    two_node_cluster, cluster_env, services, s3_small_shards
):
    """A 4-trial ASHA search as a job, each trial a DDP run on both worker nodes, checkpoints in S3, tracked
    to the MLflow server from the search's driver. `ray job stop` once a trial has finished, then a second
    job with --resume: finished trials are not rerun, every trial is one nested run with each epoch once,
    ASHA stopped some, and the best trial's model is registered from its S3 checkpoint."""
    import yaml
    from mlflow import MlflowClient

    from pipeline.config import PretrainConfig, from_dict

    trials, epochs = 4, 2
    search_url = f"{cluster_env['PIPELINE_STORAGE_ROOT']}/tune/search"
    args = [
        "--config",
        "configs/tune/toy_asha.yaml",
        f"pretrain.data.train_manifest={s3_small_shards['train']}",
        f"pretrain.data.val_manifest={s3_small_shards['val']}",
        "pretrain.data.batch_size_per_worker=50",
        "pretrain.data.loader_workers=0",
        f"pretrain.train.epochs={epochs}",
        f"pretrain.tracking.uri={services.cfg.mlflow_uri}",
        "pretrain.tracking.experiment=cluster-tune",
        "pretrain.tracking.register_as=toy-cluster-tuned",
        "pretrain.scaling.num_workers=2",
        # Two trials at a time on the two worker nodes' 4 CPUs: most of a trial is start-up wait, not compute.
        "pretrain.scaling.cpus_per_worker=1",
        f"search.num_trials={trials}",
        "search.max_concurrent_trials=2",
        # A continuous objective: early top-1 values tie at chance level, and ASHA never stops a tie.
        "search.metric=val/loss",
        "search.mode=min",
        "search.storage_path=null",  # $PIPELINE_STORAGE_ROOT/tune
        "search.name=search",
    ]

    def finished_trials() -> set[str]:
        found = set()
        for key in _s3_keys(f"{search_url}/trials/"):
            if key.endswith("checkpoint_manager_snapshot.json"):
                text = storage.read_bytes(f"{search_url}/trials/{key}").decode()
                if f"epoch-{epochs - 1:04d}" in text:
                    found.add(key.split("/")[0])
        return found

    jobs = _jobs(two_node_cluster)
    with StoreWatch([], services.cfg.mlflow_port) as watch:
        _submit(two_node_cluster, "search", "jobs/tune.py", args, cluster_env)
        finished_before_stop = _wait_for(
            lambda: finished_trials() or jobs.get_job_status("search").is_terminal(), 300, "a finished trial"
        )
        assert isinstance(finished_before_stop, set), jobs.get_job_logs("search")[-3000:]
        jobs.stop_job("search")
        _wait_for(lambda: jobs.get_job_status("search").is_terminal(), 60, "the stop")
        assert jobs.get_job_status("search").name == "STOPPED"
        _wait_for(lambda: not _train_worker_actors(), 60, "the stopped job's workers to exit")
        _submit(two_node_cluster, "search-resume", "jobs/tune.py", [*args, "--resume"], cluster_env)
        status, logs = _wait_job(two_node_cluster, "search-resume", 500)
    assert status.name == "SUCCEEDED", logs[-4000:]
    assert not watch.violations, watch.violations
    assert f"=== search search: {trials} trials ===" in logs

    client = MlflowClient(services.cfg.mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("cluster-tune").experiment_id], max_results=100)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(int(c.data.params["trial.index"]) for c in children) == list(range(trials)), (
        "each trial once"
    )
    assert parent.info.status == "FINISHED"
    reasons = {}
    for child in children:
        assert child.info.status == "FINISHED", (child.info.run_name, child.info.status)
        steps = _history_steps(client, child.info.run_id, "val/top1")
        assert steps == list(range(len(steps))) and steps, f"no duplicated or missing epochs: {steps}"
        reason = reasons[int(child.data.params["trial.index"])] = child.data.tags["stop_reason"]
        assert (reason == "completed") == (len(steps) == epochs), (reason, steps)
        if f"train-{child.data.tags['tune.trial_id']}" in finished_before_stop:
            assert not client.get_metric_history(child.info.run_id, "system/resumed"), "finished: not rerun"
    assert "scheduler:asha" in reasons.values(), f"ASHA stopped no trial: {reasons}"
    assert parent.data.metrics["search/epochs_used"] < trials * epochs

    # The best config (in S3) is the best trial's and a pre-training recipe as is; its model is registered.
    best_index = int(parent.data.metrics["best/trial"])
    best_child = next(c for c in children if int(c.data.params["trial.index"]) == best_index)
    text = storage.read_bytes(f"{search_url}/best_config.yaml").decode()
    best = from_dict(PretrainConfig, yaml.safe_load(text))
    assert f"trial {best_index}," in text.splitlines()[0]
    assert str(best.optim.weight_decay) == best_child.data.params["optim.weight_decay"]
    assert str(best.optim.lr) == best_child.data.params["optim.lr"]
    version = client.get_model_version_by_alias("toy-cluster-tuned", "champion")
    assert version.run_id == best_child.info.run_id
    assert {"model.pt", "model_config.json"} <= _s3_keys(f"{search_url}/best_model/")


# --------------------------------------------------------------------------------------------------------
# Storage the whole cluster sees: local paths are refused on a multi-node cluster before anything starts


def _refused(capsys, main, argv: list[str], field: str, tmp_path: Path) -> None:
    import ray._private.state

    actors_before = len(ray._private.state.actors())
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    line = next(line for line in err.splitlines() if "config error" in line)
    assert line.split("config error: ")[1].startswith(f"{field}: "), line
    assert "this Ray cluster has 3 nodes" in line and "s3://" in line and "scaling.shared_paths" in line
    assert not (tmp_path / "mlflow.db").exists(), "refused before an MLflow run was opened"
    assert len(ray._private.state.actors()) == actors_before, "refused before any worker or trial started"


@pytest.mark.parametrize("field", ["data.train_manifest", "data.val_manifest", "checkpoint.storage_path"])
def test_local_pretrain_paths_are_refused_on_a_multinode_cluster(
    field, two_node_cluster, multinode_data, tmp_path, capsys
):
    from jobs.pretrain import main

    # Declared shared: nothing, then only the training shards' folder, then all the data (so that the
    # field under test is the first local path the check meets).
    shared = {
        "data.train_manifest": [],
        "data.val_manifest": [str(Path(multinode_data["train"]).parent)],
        "checkpoint.storage_path": [str(Path(multinode_data["train"]).parents[2])],
    }[field]
    argv = [
        "--config",
        RECIPE,
        *toy_pretrain_overrides(multinode_data, tmp_path),
        f"scaling.shared_paths=[{', '.join(shared)}]",
    ]
    _refused(capsys, main, argv, field, tmp_path)


def test_local_search_storage_is_refused_on_a_multinode_cluster(
    two_node_cluster, multinode_data, tmp_path, capsys
):
    from jobs.tune import main

    data_root = str(Path(multinode_data["train"]).parents[2])
    argv = [
        "--config",
        "configs/tune/toy_asha.yaml",
        f"pretrain.data.train_manifest={multinode_data['train']}",
        f"pretrain.data.val_manifest={multinode_data['val']}",
        f"pretrain.scaling.shared_paths=[{data_root}]",
        f"pretrain.tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        "search.max_concurrent_trials=1",
        f"search.storage_path={tmp_path}/tune",
    ]
    _refused(capsys, main, argv, "search.storage_path", tmp_path)

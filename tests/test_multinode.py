"""Multi-node DDP on a simulated two-node Ray cluster (``ray.cluster_utils.Cluster``), loopback only.

Each node has exactly one CPU and each worker asks for one (``scaling.cpus_per_worker=1``), so the two DDP
ranks must land on different Ray nodes; the test checks the node ids the workers report instead of trusting
the arithmetic. The simulated nodes share one IP, so Ray reports ``node_rank=0`` on both: the loader shards
by world rank, which is what is checked here.

* ``test_ranks_on_two_nodes_read_disjoint_shards_and_evaluate_each_sample_once`` runs a small function
  through ``pipeline.launch.launch`` that streams the real loaders (``build_loader``) on each rank while
  observing which shard files the loader opens and which samples it decodes, and runs the real
  ``evaluate`` (all-reduced) over two validation sets whose per-rank shares are uneven (75/55 from six
  shards, 19/18 from a single 37-sample shard) and end in short batches.
* ``test_two_epoch_pretrain_run_finishes_with_identical_replicas`` runs the toy recipe for 2 epochs through
  ``pipeline.pretrain.run_pretrain`` (``launch(pretrain_worker, ...)``) on the same cluster.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
from conftest import toy_pretrain_overrides
from imgtree import write_sized_shards

from pipeline.stack import free_port

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
    from pipeline.config import ShardConfig, ToyConfig
    from pipeline.data.prepare import prepare_embedded

    root = tmp_path_factory.mktemp("multinode-data")
    toy = ToyConfig(
        root=str(root / "raw"),
        image_size=32,
        pretrain_train_per_class=TRAIN_PER_CLASS,
        pretrain_val_per_class=VAL_PER_CLASS,
        downstream_train_max=2,
        downstream_val_per_class=1,
        downstream_imbalance=1.0,
    )
    shards = ShardConfig(dest=str(root / "shards"), samples_per_shard=SAMPLES_PER_SHARD, workers=1)
    pretrain = prepare_embedded(toy, shards).manifests["pretrain"]
    odd = write_sized_shards(root / "odd-val", ODD_VAL_SIZES, num_classes=NUM_CLASSES, image_size=32)
    return {"train": pretrain["train"], "val": pretrain["val"], "odd_val": odd.url}


@pytest.fixture(scope="module")
def two_node_cluster():
    """Two Ray nodes with one CPU each on 127.0.0.1; the driver connected to them."""
    import ray
    import ray._private.ray_constants as ray_constants
    from ray import cloudpickle
    from ray.cluster_utils import Cluster

    # The train function below lives in this test module, which Ray workers cannot import: ship it by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    assert not ray.is_initialized(), "another test left Ray connected"
    node_args = {
        "num_cpus": 1,
        "node_ip_address": "127.0.0.1",
        "include_dashboard": False,  # no dashboard; Ray's remaining API server binds dashboard_host
        "dashboard_host": "127.0.0.1",
    }
    cluster = Cluster(shutdown_at_exit=True)
    try:
        with pytest.MonkeyPatch.context() as patch:
            # ray.init turns a loopback address into the machine's routable IP before connecting
            # (services.resolve_ip_for_localhost), where nothing of this cluster listens; this switch makes
            # it keep 127.0.0.1.
            patch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
            # Its own API server port: 8265 may belong to another Ray instance on the machine.
            cluster.add_node(**node_args, dashboard_port=free_port())
            cluster.add_node(**node_args)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
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

    read, decode = loader._read_samples, loader._SlotStream._decode

    def reading(urls):
        record = {"urls": list(urls), "keys": []}
        opened.append(record)
        for sample in read(urls):
            record["keys"].append(sample["__key__"])
            yield sample

    def decoding(self, sample):
        decoded.append(sample["__key__"])
        return decode(self, sample)

    loader._read_samples, loader._SlotStream._decode = reading, decoding
    try:
        yield
    finally:
        loader._read_samples, loader._SlotStream._decode = read, decode


def _observe_worker(config: dict) -> None:
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

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
    records: list = [None] * world_size
    dist.all_gather_object(records, record)  # over gloo, between the two nodes
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            Path(directory, "records.json").write_text(json.dumps(records))
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report({"epoch": 0}, checkpoint=checkpoint)


# --------------------------------------------------------------------------------------------------------
# Tests


def _two_worker_scaling():
    from pipeline.config import ScalingConfig

    return ScalingConfig(num_workers=2, use_gpu=False, cpus_per_worker=1)


def test_ranks_on_two_nodes_read_disjoint_shards_and_evaluate_each_sample_once(
    two_node_cluster, multinode_data, tmp_path
):
    from pipeline.config import CheckpointConfig
    from pipeline.data.manifest import load_manifest
    from pipeline.launch import launch

    nodes = _alive_nodes()
    assert sorted(nodes.values()) == [1.0, 1.0], f"expected two 1-CPU nodes, got {nodes}"
    listening = _listening_addresses(_cluster_pids(two_node_cluster))
    assert listening and listening <= LOOPBACK, f"the cluster listens beyond loopback: {listening}"

    result = launch(
        _observe_worker,
        spec=multinode_data,
        scaling=_two_worker_scaling(),
        checkpoint=CheckpointConfig(
            storage_path=str(tmp_path), name="observe", num_to_keep=1, max_failures=0
        ),
        storage_path=str(tmp_path / "ray_results"),
        name="observe",
        metric="epoch",
        mode="max",
    )
    records = json.loads(Path(result.checkpoint_dir, "records.json").read_text())
    assert [r["rank"] for r in records] == [0, 1] and all(r["world_size"] == 2 for r in records)

    # One rank per node: two different, live Ray nodes. (Ray reports node_rank 0 on both, as the simulated
    # nodes share one IP: the loader's split by world rank is what the checks below rely on.)
    node_ids = [r["node_id"] for r in records]
    assert node_ids[0] != node_ids[1], f"both DDP workers ran on node {node_ids[0]}"
    assert set(node_ids) == set(nodes)

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


def test_two_epoch_pretrain_run_finishes_with_identical_replicas(two_node_cluster, multinode_data, tmp_path):
    import ray._private.state

    from pipeline.config import PretrainConfig, load_config
    from pipeline.pretrain import run_pretrain

    manifests = {"train": multinode_data["train"], "val": multinode_data["val"]}
    cfg = load_config(
        PretrainConfig,
        RECIPE,
        [
            *toy_pretrain_overrides(manifests, tmp_path),
            f"data.batch_size_per_worker={BATCH}",
            "tracking.uri=none",
            "train.epochs=2",
            "checkpoint.max_failures=0",
            "checkpoint.name=multinode",
            # The simulated nodes run on one machine, so pytest's temporary directory is a mount they
            # share; declared, the local manifests and checkpoints are accepted on this 2-node cluster.
            f"scaling.shared_paths=[{tmp_path.parent}]",
        ],
    )
    assert (cfg.scaling.num_workers, cfg.scaling.cpus_per_worker) == (2, 1)
    assert sorted(_alive_nodes().values()) == [1.0, 1.0]

    def train_workers() -> dict[str, str]:
        # The GCS actor table (kept for dead actors too); ray.util.state would need the full dashboard.
        actors = ray._private.state.actors().values()
        return {
            a["ActorID"]: a["Address"]["NodeID"] for a in actors if a["ActorClassName"] == "RayTrainWorker"
        }

    before = train_workers()
    outcome = run_pretrain(cfg)

    assert outcome.epochs_completed == 2
    metrics = outcome.final_metrics
    assert metrics["epoch"] == 1
    digests = metrics["param_digests"].split(",")
    assert len(digests) == 2 and digests[0] == digests[1], f"replicas differ: {digests}"
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
    assert Path(outcome.export_url, "model.pt").is_file()

    ran = {k: v for k, v in train_workers().items() if k not in before}
    assert len(ran) == 2 and len(set(ran.values())) == 2, f"workers' nodes: {ran}"


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
    assert "this Ray cluster has 2 nodes" in line and "s3://" in line and "scaling.shared_paths" in line
    assert not (tmp_path / "mlflow.db").exists(), "refused before an MLflow run was opened"
    assert len(ray._private.state.actors()) == actors_before, "refused before any worker or trial started"


@pytest.mark.parametrize("field", ["data.train_manifest", "checkpoint.storage_path"])
def test_local_pretrain_paths_are_refused_on_a_multinode_cluster(
    field, two_node_cluster, multinode_data, tmp_path, capsys
):
    from jobs.pretrain import main

    data_root = str(Path(multinode_data["train"]).parents[2])
    shared = [] if field == "data.train_manifest" else [data_root]  # then only the checkpoints are local
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

"""Shared fixtures: a real S3-compatible HTTP server (moto) on 127.0.0.1, and offline switches.

The moto server is started once per session on a free port (never its default 0.0.0.0:5000, which collides
with MLflow). Tests get a fresh, empty bucket through ``s3_bucket``; boto3 finds the endpoint through the
standard ``AWS_ENDPOINT_URL_S3`` variable, exactly as it would for any S3-compatible store on a cluster.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

# Offline and quiet: no telemetry, no usage stats. Set before anything imports mlflow or ray.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train's controller polls its workers every 2 s by default: each run's start, end and restart waits for
# the next poll. The suite runs dozens of tiny runs, so it polls every 0.5 s (inherited by every Ray instance
# the tests start); the product keeps Ray's default.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def s3_server():
    """Start moto's threaded server on 127.0.0.1:<free port>; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(
        {
            "AWS_ENDPOINT_URL_S3": endpoint,
            # Dummy credentials for the local test server only; real ones come from the AWS environment.
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    os.environ.pop("AWS_PROFILE", None)
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_S3_ENV = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
)


@pytest.fixture
def s3_bucket(s3_server):
    """A new empty bucket on the moto server; yields its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def toy_manifests(tmp_path_factory):
    """The embedded tasks once per session: ``pretrain`` (10 classes of 32 px images, 2,000 train / 400 val)
    and ``downstream`` (4 new classes, 40..4 training images per class: 10:1 imbalanced; 100 per class in
    val), each {"train": url, "val": url}."""
    from pipeline.config import ShardConfig, ToyConfig
    from pipeline.data.prepare import prepare_embedded

    root = tmp_path_factory.mktemp("toy")
    toy = ToyConfig(
        root=str(root / "raw"),
        image_size=32,
        pretrain_train_per_class=200,
        pretrain_val_per_class=40,
        downstream_classes=4,
        downstream_train_max=40,
        downstream_imbalance=10.0,
        downstream_val_per_class=100,
    )
    prepared = prepare_embedded(toy, ShardConfig(dest=str(root / "shards"), samples_per_shard=500, workers=1))
    return prepared.manifests


@pytest.fixture(scope="session")
def toy_pretrain_manifests(toy_manifests):
    """The embedded pre-training task's shards: {"train": url, "val": url}."""
    return toy_manifests["pretrain"]


@dataclass(frozen=True)
class ToyModel:
    """A trained toy_resnet20, published as a pre-training job publishes it."""

    tracking_uri: str
    run_id: str
    uri: str
    """models:/toy-resnet20@champion in ``tracking_uri``."""
    export_dir: Path
    """The run's model/ directory: an MLflow model holding the export format (model.pt, model_config.json)."""
    history: list[dict[str, float]]
    best_val_top1: float


@pytest.fixture(scope="session")
def toy_model(toy_manifests, tmp_path_factory) -> ToyModel:
    """toy_resnet20 pre-trained in-process for 8 epochs on the embedded task (the build_run + fit the Ray
    workers run, ~50 s), tracked into a sqlite store and published with the job's own publish_model:
    packaged as an MLflow model, copied to an export directory, logged and registered. Shared by the
    learnability, fine-tuning and prediction tests."""
    import torch

    from pipeline.config import PretrainConfig, load_config
    from pipeline.pretrain import validate
    from pipeline.publish import publish_model
    from pipeline.tracking.mlflow_tracker import MlflowTracker
    from pipeline.train.build import build_run, fit_run

    root = tmp_path_factory.mktemp("toy-model")
    uri = f"sqlite:///{root}/mlflow.db"
    cfg = load_config(
        PretrainConfig,
        "configs/pretrain/toy_resnet20.yaml",
        [
            f"data.train_manifest={toy_manifests['pretrain']['train']}",
            f"data.val_manifest={toy_manifests['pretrain']['val']}",
            "data.batch_size_per_worker=50",
            "data.loader_workers=0",
            "train.epochs=8",
            "tracking.register_as=toy-resnet20",
            "tracking.system_metrics=false",
        ],
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parts = build_run(cfg, rank=0, world_size=1, device=torch.device("cpu"))
        with MlflowTracker(
            tracking_uri=uri,
            experiment="pretrain",
            run_name="toy-resnet20",
            artifact_location=(root / "artifacts").as_uri(),
        ) as tracker:
            result = fit_run(parts, cfg, device=torch.device("cpu"), tracker=tracker)
            # fit has loaded the best epoch's weights into the model: those are published.
            state = {"model": parts.model.state_dict(), "best_model": None}
            registration = publish_model(
                state, cfg, validate(cfg), tracker=tracker, export_url=str(root / "model")
            )
    finally:
        torch.set_num_threads(threads)
    assert registration is not None and registration.alias_moved
    return ToyModel(
        tracking_uri=uri,
        run_id=tracker.run_id,
        uri="models:/toy-resnet20@champion",
        export_dir=root / "model",
        history=result.history,
        best_val_top1=float(result.best_metric),
    )


def pretrain_shards(
    raw: Path, dest: str, *, train_per_class: int, val_per_class: int, samples_per_shard: int
) -> dict[str, str]:
    """The embedded pre-training task at 32 px (10 classes; a token downstream task beside it) sharded into
    ``dest`` (a directory or s3:// prefix): {"train": url, "val": url}. Each image is drawn from its own
    seed, so the pre-training images do not depend on the downstream sizes."""
    from pipeline.config import ShardConfig, ToyConfig
    from pipeline.data.prepare import prepare_embedded

    toy = ToyConfig(
        root=str(raw),
        image_size=32,
        pretrain_train_per_class=train_per_class,
        pretrain_val_per_class=val_per_class,
        downstream_train_max=2,
        downstream_val_per_class=1,
        downstream_imbalance=1.0,
    )
    shards = ShardConfig(dest=dest, samples_per_shard=samples_per_shard, workers=1)
    return prepare_embedded(toy, shards).manifests["pretrain"]


def toy_pretrain_overrides(manifests: dict[str, str], workdir) -> list[str]:
    """Overrides that point the toy_resnet20 recipe at test shards and keep every output under ``workdir``."""
    return [
        f"data.train_manifest={manifests['train']}",
        f"data.val_manifest={manifests['val']}",
        "data.batch_size_per_worker=50",
        f"tracking.uri=sqlite:///{workdir}/mlflow.db",
        "tracking.experiment=pretrain-test",
        "tracking.register_as=toy-test",
        f"checkpoint.storage_path={workdir}/ray_results",
        "checkpoint.name=toy",
    ]


RAY_ADAPTERS = ("pipeline.launch", "pipeline.search.tuner")


@pytest.fixture
def no_ray(monkeypatch):
    """Ray and the project's modules that import it cannot be imported while the test runs (they are None in
    ``sys.modules``), and the working directory is the repository root, as for a job started there: a job
    whose validation lets bad input through dies of an ImportError instead of exiting 2."""
    for name in [n for n in sys.modules if n == "ray" or n.startswith("ray.")] + ["ray", *RAY_ADAPTERS]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(Path(__file__).resolve().parents[1])


@pytest.fixture(scope="session")
def _ray_session():
    """Shuts the shared local Ray instance down at the end of the session (if one is up)."""
    yield
    import ray

    ray.shutdown()


@pytest.fixture
def local_ray(_ray_session):
    """A local Ray instance shared by the tests that need one (fine-tuning, searches, batch prediction),
    started as the jobs start it (``ensure_ray``: 2 CPUs plus one for Tune's idle trial drivers) on first
    use. A module that needs its own cluster shuts it down first; the next user starts it again."""
    from pipeline.config import ScalingConfig
    from pipeline.launch import ensure_ray

    ensure_ray(ScalingConfig(num_workers=1, cpus_per_worker=1), concurrent=2, trial_drivers=True)


def wait_for(predicate, timeout_s: float, what: str, *, every_s: float = 0.5):
    """``predicate()``'s first truthy value, polled every ``every_s``; AssertionError naming ``what`` after
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


# Modules that use Ray in this process, in the order they run, before all others: the multi-node cluster
# first (it needs this process free of the shared local instance), then the users of ``local_ray``, which
# start it once. After the last of them it is shut down, so the CPU-bound tests that follow do not share the
# two cores with an idle Ray instance's daemons.
RAY_MODULES = ("test_multinode.py", "test_finetune.py", "test_predict.py", "test_recipes.py")


def _ray_rank(item) -> int:
    name = item.nodeid.split("::")[0].rsplit("/", 1)[-1]
    return RAY_MODULES.index(name) if name in RAY_MODULES else len(RAY_MODULES)


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=_ray_rank)


@pytest.hookimpl(trylast=True)  # after the test's fixtures are finalized: no_ray has put Ray back by then
def pytest_runtest_teardown(item, nextitem):
    if nextitem is not None and _ray_rank(item) < len(RAY_MODULES) <= _ray_rank(nextitem):
        import ray

        ray.shutdown()

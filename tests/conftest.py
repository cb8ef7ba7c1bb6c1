"""Shared fixtures: a real S3-compatible HTTP server (moto) on 127.0.0.1, and offline switches.

The moto server is started once per session on a free port (never its default 0.0.0.0:5000, which collides
with MLflow). Tests get a fresh, empty bucket through ``s3_bucket``; boto3 finds the endpoint through the
standard ``AWS_ENDPOINT_URL_S3`` variable, exactly as it would for any S3-compatible store on a cluster.
"""

from __future__ import annotations

import os
import time
import uuid

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
def toy_pretrain_manifests(tmp_path_factory):
    """Small embedded shards (10 classes of 32 px images, 2,000 train / 400 val): {"train": url, "val": url}."""
    from pipeline.config import ShardConfig, ToyConfig
    from pipeline.data.prepare import prepare_embedded

    root = tmp_path_factory.mktemp("toy-pretrain")
    toy = ToyConfig(
        root=str(root / "raw"),
        image_size=32,
        pretrain_train_per_class=200,
        pretrain_val_per_class=40,
        downstream_train_max=10,
        downstream_val_per_class=2,
        downstream_imbalance=2.0,
    )
    prepared = prepare_embedded(toy, ShardConfig(dest=str(root / "shards"), samples_per_shard=250, workers=1))
    return prepared.manifests["pretrain"]


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

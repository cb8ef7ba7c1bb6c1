"""Ray Data, the only module that uses it: the prediction job's three steps as a streaming pipeline across
the cluster.

* read: CPU tasks read file bytes (local files under a shared mount, or S3 objects) or whole tar shards;
* decode: CPU tasks decode and preprocess to uint8 pixels (any node with CPUs, GPU nodes included), kept
  apart from the model actors;
* predict: an actor pool of ``replicas`` model copies (``gpus_per_replica`` GPUs each, or CPU), fed
  batches of ``batch_size``.

The model goes to the actors through the object store (``ray.put`` of the weights the driver fetched), so
no worker needs the registry or a shared disk. Rows stream back to the driver, which writes them: the
output needs no cluster-wide filesystem either.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import ray

from pipeline.predict import decode_batch, predict_batch, read_files, shard_rows

if TYPE_CHECKING:
    from pipeline.predict import PredictPlan

# Files per read task: enough to amortize a task's start, few enough to spread a folder over the cluster.
READ_BATCH = 32
DECODE_MEMORY_BYTES = 256 * 2**20


class _Replica:
    """One model copy in the actor pool."""

    def __init__(self, payload: list[Any], top_k: int, threads: int) -> None:
        import torch

        from pipeline.predictor import Predictor

        torch.set_num_threads(threads)  # Ray starts an actor with one OpenMP thread per CPU it requested
        # The payload arrives as an object reference (wrapped in a list so Ray does not resolve it early).
        self.predictor = Predictor.from_payload(ray.get(payload[0]))
        self.top_k = top_k

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return predict_batch(self.predictor, batch, self.top_k)


def _shard(row: dict[str, Any], labels: list[int] | None) -> Iterator[dict[str, Any]]:
    yield from shard_rows(row["shard"], labels)


def check_capacity(replicas: int, cpus_per_replica: float, gpus_per_replica: float) -> None:
    """Refuse (ConfigError naming the field) replicas that would take every CPU of the cluster: the read
    and decode tasks would then wait forever for one, and the job would hang instead of failing."""
    from pipeline.config import ConfigError

    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    if replicas * gpus_per_replica > gpus:
        raise ConfigError(
            f"gpus_per_replica: {replicas} replicas x {gpus_per_replica:g} GPUs need "
            f"{replicas * gpus_per_replica:g}, this Ray cluster has {gpus:g}; lower replicas or gpus_per_replica"
        )
    if replicas * cpus_per_replica > cpus - 1:
        raise ConfigError(
            f"replicas: {replicas} replicas x cpus_per_replica={cpus_per_replica:g} leave "
            f"{max(cpus - replicas * cpus_per_replica, 0):g} of this Ray cluster's {cpus:g} CPUs for reading and "
            "decoding, which need at least 1; lower replicas or cpus_per_replica"
        )


def predict_on_ray(plan: PredictPlan) -> Iterator[dict[str, Any]]:
    """Prediction batches (dicts of columns) as they finish, in no particular order."""
    from pipeline.config import ScalingConfig
    from pipeline.launch import ensure_ray
    from pipeline.predictor import Preprocessing

    cfg = plan.cfg
    ensure_ray(ScalingConfig(num_workers=cfg.replicas, cpus_per_worker=cfg.cpus_per_replica, use_gpu=False))
    context = ray.data.DataContext.get_current()
    # Ray Data's progress bars are for a person at a terminal; in `ray job logs` they are noise.
    context.enable_progress_bars = sys.stdout.isatty()
    context.print_on_execution_start = False
    if plan.inputs.shards:
        dataset = ray.data.from_items([{"shard": url} for url in plan.inputs.shards]).flat_map(
            _shard, fn_kwargs={"labels": plan.inputs.shard_labels}
        )
    else:
        dataset = ray.data.from_items(plan.inputs.rows).map_batches(
            read_files, batch_size=READ_BATCH, batch_format="numpy"
        )
    preprocess = Preprocessing.of(plan.payload["model_config"])
    dataset = dataset.map_batches(
        decode_batch,
        fn_kwargs={"preprocess": preprocess},
        batch_size=READ_BATCH,
        batch_format="numpy",
        # Ray Data fuses consecutive steps whose resource requests match, which on CPU would run reading
        # and decoding inside the model actors, one image after another. A memory request of their own (a
        # batch of decoded images is a few MB) keeps them apart: decoding stays in CPU tasks beside the
        # replicas, on any node.
        num_cpus=1,
        memory=DECODE_MEMORY_BYTES,
    )
    dataset = dataset.map_batches(
        _Replica,
        fn_constructor_kwargs={
            "payload": [ray.put(plan.payload)],
            "top_k": cfg.top_k,
            "threads": max(1, int(cfg.cpus_per_replica)),
        },
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.replicas),
        num_gpus=cfg.gpus_per_replica or None,
        num_cpus=cfg.cpus_per_replica,
    )
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        yield {key: list(value) for key, value in batch.items()}

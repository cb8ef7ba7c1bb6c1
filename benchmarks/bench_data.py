"""Data-loading benchmark (`make bench-data`): img/s of four ways to feed a training loop, in one run.

(a) single-process decode + augment on the same JPEG bytes held in memory: the per-core limit;
(b) our shard loader from local shards with N loader workers;
(c) our shard loader from an S3-compatible endpoint (moto server on 127.0.0.1, started here);
(d) torchvision ImageFolder + DataLoader with N workers on the same JPEG files (PIL, the classic baseline).

Every path does RandomResizedCrop(R) + flip. (b)/(c) return uint8 batches and normalize on the device;
(d) returns normalized float32 from the workers, as the torchvision reference scripts do. The machine is
shared and noisy, so only ratios measured in the same run are meaningful.

    python benchmarks/bench_data.py [--images 1200] [--image-size 256] [--resolution 224] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torchvision import datasets
from torchvision import transforms as T

from pipeline.config import DataConfig, ToyConfig
from pipeline.data import storage
from pipeline.data.loader import build_loader
from pipeline.data.manifest import load_manifest
from pipeline.data.shards import ShardOptions, write_shards
from pipeline.data.toy import generate
from pipeline.data.transforms import decode, train_transform


def _rate(fn, images_per_call: int, repeats: int) -> float:
    """Median img/s over repeats (after one warm-up call)."""
    fn()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        rates.append(images_per_call / (time.perf_counter() - t0))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1200, help="training images (10 classes)")
    p.add_argument("--image-size", type=int, default=256, help="side of the generated JPEGs")
    p.add_argument("--resolution", type=int, default=224, help="crop fed to the network")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="loader workers N")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3, help="epochs per timed loader run (amortizes start-up)")
    p.add_argument("--json", default=".cache/bench/data.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(".cache/bench")
    toy = ToyConfig(
        root=str(work / "toy"),
        image_size=args.image_size,
        pretrain_train_per_class=args.images // 10,
        pretrain_val_per_class=1,
        downstream_train_max=2,
        downstream_imbalance=1.0,
        downstream_val_per_class=1,
    )
    train_dir = generate(toy).split_dir("pretrain", "train")
    local = write_shards(
        train_dir, str(work / "shards"), ShardOptions(samples_per_shard=100, workers=2), progress=False
    ).manifest
    n = local.num_samples

    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per shard GET otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL_S3=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    for shard in local.shards:
        storage.put_file(str(work / "shards" / shard.name), f"s3://bench/train/{shard.name}")
    storage.write_bytes_atomic("s3://bench/train/manifest.json", local.to_json().encode())
    remote = load_manifest("s3://bench/train")

    jpegs = [path.read_bytes() for path in sorted(train_dir.rglob("*.jpg"))]
    augment = train_transform(args.resolution)

    def single_process():
        for data in jpegs:
            augment(decode(data))

    cfg = DataConfig(
        resolution=args.resolution,
        batch_size_per_worker=args.batch_size,
        loader_workers=args.workers,
        shuffle_buffer=500,
        min_crop_scale=0.08,
    )

    def ours(manifest):
        def run():
            loader = build_loader(manifest, cfg, train=True)
            for epoch in range(args.epochs):
                loader.set_epoch(epoch)
                for _ in loader:
                    pass

        return run

    folder = datasets.ImageFolder(
        str(train_dir),
        transform=T.Compose(
            [
                T.RandomResizedCrop(args.resolution),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ]
        ),
    )

    def image_folder():
        loader = torch.utils.data.DataLoader(
            folder, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, drop_last=True
        )
        for _ in range(args.epochs):
            for _ in loader:
                pass

    per_epoch = (n // args.batch_size) * args.batch_size * args.epochs
    try:
        rates = {
            "a_single_process_limit": _rate(single_process, len(jpegs), args.repeats),
            "b_shards_local": _rate(ours(local), per_epoch, args.repeats),
            "c_shards_s3": _rate(ours(remote), per_epoch, args.repeats),
            "d_imagefolder": _rate(image_folder, per_epoch, args.repeats),
        }
    finally:
        server.stop()
    a, b, c, d = rates.values()
    N = args.workers
    goals = {
        f"(b) >= 0.9 x (a) x N (N={N})": (b / (a * N), 0.9),
        "(c) >= 0.85 x (b)": (c / b, 0.85),
        "(b) >= 1.5 x (d)": (b / d, 1.5),
    }
    print(
        f"\n{n} JPEGs of {args.image_size}px -> RandomResizedCrop({args.resolution}), batch {args.batch_size}, "
        f"N={N} loader workers, {os.cpu_count()} CPU cores"
    )
    print("| path | img/s |\n|---|---:|")
    for name, value in rates.items():
        print(f"| {name} | {value:,.0f} |")
    print("\n| goal | measured ratio | target | met |\n|---|---:|---:|---|")
    for name, (ratio, target) in goals.items():
        print(f"| {name} | {ratio:.2f} | {target} | {'yes' if ratio >= target else 'NO'} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {
                "rates": rates,
                "ratios": {k: v[0] for k, v in goals.items()},
                "images": n,
                "workers": N,
                "cpu_count": os.cpu_count(),
                "resolution": args.resolution,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

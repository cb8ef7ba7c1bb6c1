"""Convert one split of an ImageNet-style folder tree into WebDataset shards plus manifest.json.

    python jobs/make_shards.py --src /data/imagenet/train --dest s3://bucket/imagenet/train \
        --resize-short 256 --samples-per-shard 1000 --workers 16
    python jobs/make_shards.py --src /data/imagenet/val --labels val_labels.csv \
        --classes-from s3://bucket/imagenet/train/manifest.json --dest s3://bucket/imagenet/val

Exit codes: 0 done, 1 storage failure, 2 bad arguments or source (empty, no class folders, --strict hit a
bad file).
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.data.shards import ShardError, ShardOptions, write_shards
from pipeline.data.storage import StorageError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--src", required=True, help="one split: DIR/<class>/<image>, or flat with --labels")
    parser.add_argument("--dest", required=True, help="local directory or s3://bucket/prefix")
    parser.add_argument("--labels", help="CSV of filename,class for a flat split (e.g. ImageNet val)")
    parser.add_argument("--classes-from", help="manifest (e.g. of train) or text file fixing the class list")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument(
        "--resize-short", type=int, default=None, help="downscale short side to this (e.g. 256)"
    )
    parser.add_argument("--jpeg-quality", type=int, default=95)
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle before sharding")
    parser.add_argument("--workers", type=int, default=1, help="parallel conversion processes")
    parser.add_argument(
        "--strict", action="store_true", help="fail on the first bad file instead of skipping"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        options = ShardOptions(
            samples_per_shard=args.samples_per_shard,
            seed=args.seed,
            resize_short=args.resize_short,
            jpeg_quality=args.jpeg_quality,
            workers=args.workers,
            strict=args.strict,
            labels_csv=args.labels,
            classes_from=args.classes_from,
        )
        summary = write_shards(args.src, args.dest, options, progress=not args.quiet)
    except ShardError as err:
        print(f"make_shards: error: {err}", file=sys.stderr)
        return 2
    except StorageError as err:
        print(f"make_shards: storage error: {err}", file=sys.stderr)
        return 1
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Convert one split of an ImageNet-style folder tree into WebDataset shards plus manifest.json, or split
one unsplit tree into train and val shard sets.

    python jobs/make_shards.py --src /data/imagenet/train --dest s3://bucket/imagenet/train \
        --resize-short 256 --samples-per-shard 1000 --workers 16
    python jobs/make_shards.py --src /data/imagenet/val --labels val_labels.csv \
        --classes-from s3://bucket/imagenet/train/manifest.json --dest s3://bucket/imagenet/val
    python jobs/make_shards.py --src /data/flowers --dest s3://bucket/flowers --val-fraction 0.1 --split-seed 0

With --val-fraction, DEST/train and DEST/val each get shards and a manifest: val holds round(fraction x n)
images of every class of n images (at least 1 if n >= 2, never all; a single-image class stays in train,
with a warning), drawn per class by a generator seeded with --split-seed; both manifests record the split.

Exit codes: 0 done, 1 storage failure, 2 bad arguments or source (empty, no class folders, --strict hit a
bad file, a fraction outside (0, 1)).
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.data.shards import ShardError, ShardOptions, SplitOptions, write_shards, write_split_shards
from pipeline.data.storage import StorageError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--src",
        required=True,
        help="one split (or a tree to split with --val-fraction): DIR/<class>/<image>, or flat with --labels",
    )
    parser.add_argument("--dest", required=True, help="local directory or s3://bucket/prefix")
    parser.add_argument("--labels", help="CSV of filename,class for a flat split (e.g. ImageNet val)")
    parser.add_argument("--classes-from", help="manifest (e.g. of train) or text file fixing the class list")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument(
        "--resize-short", type=int, default=None, help="downscale short side to this (e.g. 256)"
    )
    parser.add_argument("--jpeg-quality", type=int, default=95)
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle before sharding")
    parser.add_argument(
        "--val-fraction",
        type=float,
        help="split --src into DEST/train and DEST/val; val's share of each class",
    )
    parser.add_argument("--split-seed", type=int, help="seed of the --val-fraction draw (default 0)")
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
        if args.val_fraction is None:
            if args.split_seed is not None:
                raise ShardError("--split-seed needs --val-fraction (it seeds the train/val split)")
            summaries = {"": write_shards(args.src, args.dest, options, progress=not args.quiet)}
        else:
            split = SplitOptions(val_fraction=args.val_fraction, seed=args.split_seed or 0)
            summaries = write_split_shards(args.src, args.dest, options, split, progress=not args.quiet)
    except ShardError as err:
        print(f"make_shards: error: {err}", file=sys.stderr)
        return 2
    except StorageError as err:
        print(f"make_shards: storage error: {err}", file=sys.stderr)
        return 1
    for role, summary in summaries.items():
        print(f"{role}: {summary.line()}" if role else summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())

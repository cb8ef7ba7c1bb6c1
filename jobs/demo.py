"""The main job (``make demo``): the whole product end to end on the embedded data, offline, on a laptop CPU.

    python jobs/demo.py             # local stack: shards into its S3 endpoint, `ray job submit` of pre-training,
                                    # a Tune search and a fine-tune from the registered model, MLflow server
    python jobs/demo.py --local     # the same jobs without servers: in-process Ray, sqlite (make demo-local)
    python jobs/demo.py --data-only [--config configs/data/toy_demo.yaml] [key=value ...]
                                    # the data part: generate, shard, stream one epoch, print a summary

Each step's output goes to .cache/demo/logs/<step>.log; a failing step says which and where its log is.
Exit codes: 0 done; 2 bad config; 1 a step failed.
"""

from __future__ import annotations

import argparse
import sys
import time

from pipeline.config import ConfigError, DataDemoConfig, load_config, replace_fields
from pipeline.data.loader import DataWait, build_loader
from pipeline.data.manifest import load_manifest
from pipeline.data.prepare import prepare_embedded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--local", action="store_true", help="no servers: in-process Ray and sqlite")
    parser.add_argument("--data-only", action="store_true", help="only the data part")
    parser.add_argument("--config", default="configs/data/toy_demo.yaml", help="the data part's config")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. toy.image_size=32")
    args = parser.parse_args(argv)
    if args.data_only or args.overrides:
        return data_demo(args.config, args.overrides)
    from pipeline.demo import Demo, DemoError, DemoOptions

    try:
        Demo(DemoOptions(local=args.local)).run()
    except DemoError as err:
        print(f"\n{err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo: interrupted; the stack keeps running (make stack-down stops it)", file=sys.stderr)
        return 130
    return 0


def data_demo(config: str, overrides: list[str]) -> int:
    try:
        cfg = load_config(DataDemoConfig, config, overrides)
    except ConfigError as err:
        print(f"demo: config error: {err}", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    prepared = prepare_embedded(cfg.toy, cfg.shards, progress=True)
    for summary in prepared.summaries:
        print(summary.line())
    t_prepare = time.perf_counter() - t0

    urls = prepared.manifests["pretrain"]
    data_cfg = replace_fields(cfg.data, train_manifest=urls["train"], val_manifest=urls["val"])
    train, val = load_manifest(data_cfg.train_manifest), load_manifest(data_cfg.val_manifest)
    meter = DataWait()
    loader = build_loader(train, data_cfg, train=True)
    labels_seen: list[int] = []
    t1 = time.perf_counter()
    for _images, labels in meter.iterate(loader):
        labels_seen += labels.tolist()
    epoch_s = time.perf_counter() - t1
    val_seen = sum(len(y) for _x, y in build_loader(val, data_cfg, train=False))

    print("\n=== embedded data demo ===")
    print(f"prepare (generate + shard): {t_prepare:.1f} s")
    print(f"pretrain: {train.num_classes} classes, {train.num_samples} train / {val.num_samples} val samples")
    print(
        f"one training epoch: {loader.num_batches} batches of {data_cfg.batch_size_per_worker} "
        f"({len(labels_seen)} images) in {epoch_s:.1f} s = {len(labels_seen) / epoch_s:.0f} img/s "
        f"with {data_cfg.loader_workers} loader workers"
    )
    print(
        f"classes seen in the epoch: {len(set(labels_seen))}/{train.num_classes}; "
        f"validation pass covered {val_seen}/{val.num_samples} samples"
    )
    print(f"manifests: {urls['train']}  {urls['val']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

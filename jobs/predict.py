"""Predictions of a registered model over a folder, an S3 prefix or a shard manifest, on Ray Data; with
labels (a manifest, or class-named folders) also its evaluation, tracked in MLflow beside the model.

    python jobs/predict.py --model models:/toy-resnet20@champion --input photos/ --output predictions/
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/predict.py --model models:/NAME@champion --input s3://BUCKET/val/manifest.json \\
        --output s3://BUCKET/predictions/val replicas=2 gpus_per_replica=1

Options are PredictConfig fields as key=value (format=csv, top_k=3, replicas=0 for no Ray, labels=none,
tracking.uri=...); --print-config shows the resolved tree and exits.

Exit codes: 0 done (unreadable images are listed skips); 2 bad input (nothing started); 1 the job failed.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.cli import execute
from pipeline.config import PredictConfig, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model"
    )
    parser.add_argument("--input", required=True, help="folder, s3://prefix or manifest.json")
    parser.add_argument("--output", required=True, help="directory or s3://prefix for the predictions")
    parser.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. replicas=2 top_k=3")
    args = parser.parse_args(argv)
    flags = [f"model={args.model}", f"input={args.input}", f"output={args.output}", f"format={args.format}"]

    def run(cfg: PredictConfig):
        # Imported after the typed config validated: bad input never imports Ray.
        from pipeline.predict import run_predict

        return run_predict(cfg)

    def summarize(cfg: PredictConfig, outcome) -> None:
        from pipeline.predict import summarize

        summarize(cfg, outcome)

    return execute(
        "predict",
        load=lambda: load_config(PredictConfig, None, [*flags, *args.overrides]),
        run=run,
        summarize=summarize,
        print_config=args.print_config,
    )


if __name__ == "__main__":
    sys.exit(main())

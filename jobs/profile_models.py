"""Profile registered models: parameters, MACs, predictions/s and training images/s.

    python jobs/profile_models.py --models resnet50 efficientnet_b0 [--resolution R] [--batch-size B]
        [--json OUT.json] [--csv OUT.csv] [--plot OUT.png] [--metric val/top1] [--no-timing]

Prints a Markdown table. With MLFLOW_TRACKING_URI (or --tracking-uri) set, the table (md/json/csv) and the
plot are logged to a run in experiment ``profiling``, and ``--plot`` draws accuracy against MACs from the
runs tagged ``model.arch=<model>`` that logged ``--metric``; without accuracies it draws MACs against predictions/s.
Exit code 2: unknown model name or bad argument.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from pipeline.models import get_spec, list_models
from pipeline.models import profile as model_profile


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="profile_models.py", description=__doc__, formatter_class=formatter)
    parser.add_argument("--models", nargs="+", required=True, help=f"names from: {', '.join(list_models())}")
    parser.add_argument("--resolution", type=int, help="input side in pixels (default: each model's own)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per timed batch (>= 2)")
    parser.add_argument(
        "--num-classes", type=int, help="classifier outputs (default: 10 for cifar_*, else 1000)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's, one per core)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches before timing")
    parser.add_argument("--repeats", type=int, default=5, help="timed batches; the median is reported")
    parser.add_argument("--no-timing", action="store_true", help="count parameters and MACs only")
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    parser.add_argument("--csv", type=Path, help="write the rows as CSV here")
    parser.add_argument("--plot", type=Path, help="draw accuracy vs MACs (or MACs vs predictions/s) here")
    parser.add_argument("--metric", default="val/top1", help="MLflow metric holding the accuracy")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    args = parser.parse_args(argv)
    if args.batch_size < 2 or (args.resolution is not None and args.resolution < 8):
        parser.error("--batch-size must be >= 2 and --resolution >= 8")
    for name in args.models:
        try:
            get_spec(name)
        except ValueError as err:
            parser.error(str(err))  # exit code 2, with close matches in the message
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {"resolution": args.resolution, "batch_size": args.batch_size, "num_classes": args.num_classes}
    settings |= {
        "device": args.device,
        "timing": not args.no_timing,
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    profiles = []
    for name in args.models:
        print(f"profiling {name} ...", file=sys.stderr, flush=True)
        profiles.append(model_profile.profile_model(name, **settings))
    outputs = {
        "profile.md": model_profile.markdown_table(profiles),
        "profile.json": model_profile.to_json(profiles),
    }
    outputs["profile.csv"] = model_profile.to_csv(profiles)
    print(outputs["profile.md"])
    for path, key in ((args.json, "profile.json"), (args.csv, "profile.csv")):
        if path is not None:
            path.write_text(outputs[key])
    if args.plot is not None:
        accuracies = {}
        if args.tracking_uri:
            from pipeline.tracking.mlflow_tracker import best_metric_by_tag

            accuracies = best_metric_by_tag(
                tracking_uri=args.tracking_uri, tag="model.arch", metric=args.metric
            )
        kind = model_profile.plot(profiles, args.plot, accuracies=accuracies, accuracy_label=args.metric)
        print(f"plot ({kind}) written to {args.plot}", file=sys.stderr)
    if args.tracking_uri:
        from pipeline.tracking.mlflow_tracker import MlflowTracker

        run_name = "profile-" + "-".join(args.models)[:200]
        with MlflowTracker(
            tracking_uri=args.tracking_uri, experiment="profiling", run_name=run_name
        ) as tracker:
            tracker.log_params(
                {"batch_size": args.batch_size, "device": profiles[0].device, "models": args.models}
            )
            for artifact_file, text in outputs.items():
                tracker.log_text(text, artifact_file)
            if args.plot is not None:
                tracker.log_artifact(args.plot)
        print(f"logged to MLflow run {tracker.run_id} (experiment 'profiling')", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One claim of the lecture as a rerunnable experiment: its arms trained in-process (one MLflow child run per
arm and seed under one parent), the evidence written to docs/results/<name>.md and <name>.png.

    python jobs/experiment.py degradation                      # default size: the embedded data, 2 CPU cores
    python jobs/experiment.py degradation scale=gpu-cifar \\
        data.train_manifest=s3://bucket/cifar10/train/manifest.json \\
        data.val_manifest=s3://bucket/cifar10/val/manifest.json
    python jobs/experiment.py imbalance seeds=[0,1,2] --print-config

Experiments are configs/experiments/<name>.yaml; overrides are dotted fields of pipeline.config.ExperimentConfig
(shared.train.epochs=4, tracking.uri=none ...); scale=<preset> applies one of the file's presets.

Exit codes: 0 done; 2 bad name, preset or config (nothing was trained); 1 a run failed.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from pipeline.cli import execute


def _summarize(cfg, outcome) -> None:
    print(f"\n=== {outcome.name}: {len(outcome.runs)} runs in {outcome.seconds / 60:.1f} min ===")
    print(outcome.verdict.line)
    print(f"results: {outcome.markdown_path} and {outcome.plot_path}")
    if outcome.parent_run_id:
        print(f"MLflow parent run {outcome.parent_run_id} in {outcome.tracking_uri}")


def main(argv: list[str] | None = None) -> int:
    from pipeline.experiments.spec import list_experiments, load_experiment

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", help=f"one of: {', '.join(list_experiments())}")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="scale=<preset> and dotted key=value overrides")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "jobs/experiment.py", args.name, *args.overrides])

    def run(cfg):
        from pipeline.experiments.runner import run_experiment  # after validation: bad input imports no torch

        return run_experiment(cfg, command=command, log=lambda line: print(line, flush=True))

    return execute(
        "experiment",
        load=lambda: load_experiment(args.name, args.overrides),
        run=run,
        summarize=_summarize,
        print_config=args.print_config,
    )


if __name__ == "__main__":
    sys.exit(main())

"""Hyperparameter and scaling search on Ray Tune; every trial is a Ray Train DDP run, tracked as a nested
MLflow run under one parent run per search.

    python jobs/tune.py --config configs/tune/toy_asha.yaml [key=value ...] [--resume]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/tune.py --config configs/tune/efficientnet_compound.yaml

--resume continues an interrupted search (Ctrl-C, driver killed) without rerunning finished trials.
Exit codes: 0 done; 2 bad config (nothing was started); 1 the search failed.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError, TuneConfig, dump_yaml, load_config
from pipeline.errors import PipelineError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML search, e.g. configs/tune/toy_asha.yaml")
    parser.add_argument("--resume", action="store_true", help="continue the last search of search.name")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. search.num_trials=4")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(TuneConfig, args.config, args.overrides)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
        from pipeline.search.driver import run_search

        outcome = run_search(cfg, resume=args.resume)
    except ConfigError as error:
        print(f"tune: config error: {error}", file=sys.stderr)
        return 2
    except PipelineError as error:
        print(f"tune: failed: {error}", file=sys.stderr)
        return 1
    print(f"\n=== search {outcome.name}: {len(outcome.trials)} trials ===")
    for trial in outcome.trials:
        best = "n/a" if trial.best is None else f"{trial.best:.4f}"
        marker = "  <- best" if trial.index == outcome.best_index else ""
        print(f"trial {trial.index}: {trial.epochs} epochs, best {best}, {trial.stop_reason}{marker}")
    print(
        f"epochs used {outcome.epochs_used} of a full budget of {outcome.epochs_budget} "
        f"({outcome.epochs_used / outcome.epochs_budget:.0%}); rejected by the FLOPs budget: {outcome.rejected}"
    )
    print(f"best config: {outcome.best_config_path}")
    if outcome.parent_run_id:
        print(f"MLflow parent run {outcome.parent_run_id} in {outcome.tracking_uri}")
    if outcome.registration is not None:
        reg = outcome.registration
        print(f"registered {reg.name} version {reg.version} (alias '{reg.alias}' moved: {reg.alias_moved})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Hyperparameter and scaling search on Ray Tune; every trial is a Ray Train DDP run, tracked as a nested
MLflow run under one parent run per search.

    python jobs/tune.py --config configs/tune/toy_asha.yaml [key=value ...] [--resume]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/tune.py --config configs/tune/efficientnet_compound.yaml

--resume continues an interrupted search (Ctrl-C, driver killed) without rerunning finished trials.
Exit codes: 0 done; 2 bad config (nothing was started); 1 the search failed.
"""

from __future__ import annotations

import sys

from pipeline.cli import print_registration, run_job
from pipeline.config import TuneConfig


def _run(cfg: TuneConfig, resume: bool):
    from pipeline.search.driver import run_search  # after validation: bad input never imports Ray

    return run_search(cfg, resume=resume)


def _summarize(cfg: TuneConfig, outcome) -> None:
    print(f"\n=== search {outcome.name}: {len(outcome.trials)} trials ===")
    for trial in outcome.trials:
        best = "n/a" if trial.best is None else f"{trial.best:.4f}"
        marker = "  <- best" if trial.index == outcome.best_index else ""
        why = f": {trial.error}" if trial.error else ""
        print(f"trial {trial.index}: {trial.epochs} epochs, best {best}, {trial.stop_reason}{why}{marker}")
    if outcome.failed:
        print(
            f"{len(outcome.failed)} of {len(outcome.trials)} trials failed (never chosen as best); first: "
            f"trial {outcome.failed[0].index}: {outcome.failed[0].error}"
        )
    print(
        f"epochs used {outcome.epochs_used} of a full budget of {outcome.epochs_budget} "
        f"({outcome.epochs_used / outcome.epochs_budget:.0%}); rejected by the FLOPs budget: {outcome.rejected}"
    )
    print(f"best config: {outcome.best_config_path}")
    if outcome.parent_run_id:
        print(f"MLflow parent run {outcome.parent_run_id} in {outcome.tracking_uri}")
    print_registration(outcome.registration)


def main(argv: list[str] | None = None) -> int:
    return run_job(
        argv,
        name="tune",
        doc=__doc__,
        config_type=TuneConfig,
        example="configs/tune/toy_asha.yaml",
        run=_run,
        summarize=_summarize,
    )


if __name__ == "__main__":
    sys.exit(main())

"""The command line shared by the job scripts: parse, build the typed config, run, print one clear line on
failure (exit 2 for bad input, 1 for a failed run) and a summary on success. The jobs stay a few lines."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from pipeline.config import ConfigError, dump_yaml, load_config
from pipeline.errors import PipelineError


def run_job(
    argv: list[str] | None,
    *,
    name: str,
    doc: str,
    config_type: type,
    example: str,
    run: Callable[[Any, bool], Any],
    summarize: Callable[[Any, Any], None],
) -> int:
    """``run(cfg, resume) -> outcome`` (imported lazily by the caller, so bad input never imports Ray) and
    ``summarize(cfg, outcome)`` prints the result."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help=f"YAML recipe, e.g. {example}")
    parser.add_argument("--resume", action="store_true", help="continue the stopped run of the same name")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=0.05")
    args = parser.parse_args(argv)
    return execute(
        name,
        load=lambda: load_config(config_type, args.config, args.overrides),
        run=lambda cfg: run(cfg, args.resume),
        summarize=summarize,
        print_config=args.print_config,
    )


def execute(
    name: str,
    *,
    load: Callable[[], Any],
    run: Callable[[Any], Any],
    summarize: Callable[[Any, Any], None],
    print_config: bool = False,
) -> int:
    """The exit-code contract of every job: ``load()`` builds the typed config, then it is printed
    (``print_config``) or ``run(cfg)`` and ``summarize(cfg, outcome)``; bad input exits 2 and a failed run 1,
    each with one line naming the job."""
    try:
        cfg = load()
        if print_config:
            print(dump_yaml(cfg), end="")
            return 0
        outcome = run(cfg)
    except ConfigError as error:
        print(f"{name}: config error: {error}", file=sys.stderr)
        return 2
    except PipelineError as error:  # one clear line, not a traceback wall; details are in the logs above
        print(f"{name}: failed: {error}", file=sys.stderr)
        return 1
    summarize(cfg, outcome)
    return 0


def summarize_training(job: str) -> Callable[[Any, Any], None]:
    """The summary of a pre-training or fine-tuning run (a PretrainOutcome)."""

    def summarize(cfg: Any, outcome: Any) -> None:
        best = "n/a" if outcome.best_metric is None else f"{outcome.best_metric:.4f}"
        print(f"\n=== {job} {outcome.run_name}: {outcome.epochs_completed} epochs ===")
        print(f"best {cfg.train.watched_metric} = {best} at epoch {outcome.best_epoch}")
        last = outcome.final_metrics
        if last:
            print(
                f"last epoch: val/top1 {last.get('val/top1', float('nan')):.4f}  val/balanced_acc "
                f"{last.get('val/balanced_acc', float('nan')):.4f}  val/loss {last.get('val/loss', float('nan')):.4f}"
                f"  {last.get('system/images_per_s', 0):.0f} img/s  data wait {last.get('system/data_wait', 0):.0%}"
            )
        print(f"checkpoints and exported model: {outcome.run_url}")
        if outcome.mlflow_run_id:
            print(f"MLflow run {outcome.mlflow_run_id} in {outcome.tracking_uri}")
        print_registration(outcome.registration)

    return summarize


def print_registration(reg: Any) -> None:
    """The registry line every job summary ends with (a Registration, or None when nothing was registered)."""
    if reg is None:
        return
    moved = "moved to it" if reg.alias_moved else f"stays with version {reg.previous_version} (better)"
    print(f"registered {reg.name} version {reg.version}; alias '{reg.alias}' {moved}")

"""Distributed pre-training on Ray Train (DDP), tracked in MLflow.

    python jobs/pretrain.py --config configs/pretrain/toy_resnet20.yaml [key=value ...] [--resume]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/pretrain.py --config configs/pretrain/resnet50_imagenet.yaml

Run directly, it starts a private local Ray instance; as a Ray job it joins the cluster. Overrides are
dotted field names (optim.weight_decay=5e-4); --print-config shows the resolved tree and exits.

Exit codes: 0 done; 2 bad config or input (nothing was started); 1 training or tracking failed.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError, PretrainConfig, dump_yaml, load_config
from pipeline.errors import PipelineError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", required=True, help="YAML recipe, e.g. configs/pretrain/toy_resnet20.yaml"
    )
    parser.add_argument("--resume", action="store_true", help="continue the last run of checkpoint.name")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=0.05")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(PretrainConfig, args.config, args.overrides)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
        from pipeline.pretrain import run_pretrain

        outcome = run_pretrain(cfg, resume=args.resume)
    except ConfigError as error:
        print(f"pretrain: config error: {error}", file=sys.stderr)
        return 2
    except PipelineError as error:  # one clear line, not a traceback wall; details are in the logs above
        print(f"pretrain: failed: {error}", file=sys.stderr)
        return 1
    best = "n/a" if outcome.best_metric is None else f"{outcome.best_metric:.4f}"
    print(f"\n=== pretrain {outcome.run_name}: {outcome.epochs_completed} epochs ===")
    print(f"best {cfg.train.early_stopping.metric} = {best} at epoch {outcome.best_epoch}")
    last = outcome.final_metrics
    if last:
        print(
            f"last epoch: val/top1 {last.get('val/top1', float('nan')):.4f}  val/loss "
            f"{last.get('val/loss', float('nan')):.4f}  {last.get('system/images_per_s', 0):.0f} img/s  "
            f"data wait {last.get('system/data_wait', 0):.0%}"
        )
    print(f"checkpoints and exported model: {outcome.run_url}")
    if outcome.mlflow_run_id:
        print(f"MLflow run {outcome.mlflow_run_id} in {outcome.tracking_uri}")
    if outcome.registration is not None:
        reg = outcome.registration
        moved = "now holds" if reg.alias_moved else f"stays with version {reg.previous_version}, which"
        print(f"registered {reg.name} version {reg.version}; alias '{reg.alias}' {moved} the best value")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Distributed pre-training on Ray Train (DDP), tracked in MLflow.

    python jobs/pretrain.py --config configs/pretrain/toy_resnet20.yaml [key=value ...] [--resume]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/pretrain.py --config configs/pretrain/resnet50_imagenet.yaml

Run directly, it starts a private local Ray instance; as a Ray job it joins the cluster. Overrides are
dotted field names (optim.weight_decay=5e-4); --print-config shows the resolved tree and exits.

Exit codes: 0 done; 2 bad config or input (nothing was started); 1 training or tracking failed.
"""

from __future__ import annotations

import sys

from pipeline.cli import run_job, summarize_training
from pipeline.config import PretrainConfig


def _run(cfg: PretrainConfig, resume: bool):
    # Imported after the typed config validated: bad input never imports Ray.
    from pipeline.pretrain import run_pretrain

    return run_pretrain(cfg, resume=resume)


def main(argv: list[str] | None = None) -> int:
    return run_job(
        argv,
        name="pretrain",
        doc=__doc__,
        config_type=PretrainConfig,
        example="configs/pretrain/toy_resnet20.yaml",
        run=_run,
        summarize=summarize_training("pretrain"),
    )


if __name__ == "__main__":
    sys.exit(main())

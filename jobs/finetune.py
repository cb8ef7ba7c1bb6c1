"""Fine-tuning a pre-trained model on Ray Train (DDP, the same loop as pre-training), tracked in MLflow.

    python jobs/finetune.py --config configs/finetune/toy_two_stage.yaml [key=value ...] [--resume]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/finetune.py --config configs/finetune/<recipe>.yaml finetune.source=models:/name@champion

Run directly, it starts a private local Ray instance; as a Ray job it joins the cluster. Overrides are
dotted field names (finetune.strategy=linear); --print-config shows the resolved tree and exits.

Exit codes: 0 done; 2 bad config or input (nothing was started); 1 training or tracking failed.
"""

from __future__ import annotations

import sys

from pipeline.cli import run_job, summarize_training
from pipeline.config import FinetuneConfig


def _run(cfg: FinetuneConfig, resume: bool):
    # Imported after the typed config validated: bad input never imports Ray.
    from pipeline.finetune import run_finetune

    return run_finetune(cfg, resume=resume)


def main(argv: list[str] | None = None) -> int:
    return run_job(
        argv,
        name="finetune",
        doc=__doc__,
        config_type=FinetuneConfig,
        example="configs/finetune/toy_two_stage.yaml",
        run=_run,
        summarize=summarize_training("finetune"),
    )


if __name__ == "__main__":
    sys.exit(main())

"""A registered model as TorchScript or ONNX, checked against PyTorch on real images.

    python jobs/export.py --model models:/toy-resnet20@champion --format onnx --output exports/onnx \\
        --images data/toy/shards/pretrain/val/manifest.json

The export takes normalized float32 images (N, 3, crop, crop) as model_config.json (written beside it)
describes, and returns logits. The largest absolute logit difference to PyTorch on up to --max-images of
--images (a folder, s3:// prefix or manifest) is printed; above --tolerance the export fails. ONNX needs
the export extra: pip install -e '.[export]'.

Exit codes: 0 written and checked; 2 bad input; 1 the export failed or does not match.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from pipeline.convert import DEFAULT_TOLERANCE

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="models:/NAME@ALIAS, runs:/ID/model or an export path")
    parser.add_argument("--format", required=True, choices=("torchscript", "onnx"))
    parser.add_argument("--output", required=True, help="local directory for the exported model")
    parser.add_argument("--images", required=True, help="folder, s3:// prefix or manifest.json to check on")
    parser.add_argument("--max-images", type=int, default=64)
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI of the registry")
    args = parser.parse_args(argv)

    from pathlib import Path

    from pipeline.errors import PipelineError
    from pipeline.publish import ModelSourceError, fetch_model

    try:
        payload, _ = fetch_model(args.model, tracking_uri=args.tracking_uri)
    except (ModelSourceError, PipelineError) as error:
        print(f"export: config error: model: {error}", file=sys.stderr)
        return 2
    from pipeline.convert import export
    from pipeline.predict import load_images
    from pipeline.predictor import Preprocessing

    images, skipped = load_images(
        args.images, Preprocessing.of(payload["model_config"]), limit=args.max_images
    )
    try:
        done = export(payload, images, Path(args.output), args.format, tolerance=args.tolerance)
    except PipelineError as error:
        print(f"export: failed: {error}", file=sys.stderr)
        return 1
    opset = f" (opset {done.opset})" if done.opset else ""
    print(f"{done.format}{opset} written to {done.path}")
    print(
        f"parity on {done.images} images of {args.images}: max abs logit difference {done.max_abs_diff:.3g} "
        f"(tolerance {args.tolerance:g}); {len(skipped)} unreadable files skipped"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

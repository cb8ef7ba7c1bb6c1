"""Batch-prediction benchmark (`make bench-predict`): img/s of the predict job against a plain loop, in one run.

(a) a plain single-process PyTorch loop: read each file, ``decode_jpeg``, resize + centre crop, batch,
    normalize, model, softmax, top-k (what a user writes by hand; the baseline);
(b) the predict job in-process (``replicas=0``): the same steps through the job's code, plus the output
    files;
(c) the predict job on Ray Data with one model replica (a local Ray instance: reading and decoding in CPU
    tasks beside the model actor), plus the output files.

Same JPEG files, same model (random weights of ``--model`` at ``--resolution``), same batch size, tracking
off. The machine is shared and noisy: only ratios to (a) measured in the same run are meaningful.

    python benchmarks/bench_predict.py [--images 512] [--model resnet18] [--resolution 160] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def _images(directory: Path, count: int, size: int) -> list[Path]:
    """Random-texture JPEGs of ``size`` px (an ImageNet-like file size), written once."""
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        noise = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
        image = Image.fromarray(noise).resize((size, size), Image.BILINEAR)
        path = directory / f"img-{index:05d}.jpg"
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


def _plain_loop(paths: list[Path], payload: dict, batch_size: int) -> float:
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import v2

    from pipeline.publish import model_from_payload

    model = model_from_payload(payload)
    # The sizes the export recorded (those of validation), applied by hand: the baseline uses no project code.
    sizes = payload["model_config"]["preprocessing"]
    transform = v2.Compose(
        [v2.Resize(sizes["resize_short_side"], antialias=True), v2.CenterCrop(sizes["center_crop"])]
    )
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(paths), batch_size):
            batch = []
            for path in paths[first : first + batch_size]:
                data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
                batch.append(transform(decode_jpeg(data, mode=ImageReadMode.RGB)))
            logits = model((torch.stack(batch).float() - mean) / std)
            logits.softmax(dim=1).topk(5, dim=1)
    return len(paths) / (time.perf_counter() - start)


def _job(folder: Path, export: Path, output: Path, batch_size: int, replicas: int) -> float:
    from pipeline.config import PredictConfig, load_config
    from pipeline.predict import run_predict

    cfg = load_config(
        PredictConfig,
        None,
        [
            f"model={export}",
            f"input={folder}",
            f"output={output}",
            f"batch_size={batch_size}",
            f"replicas={replicas}",
            "labels=none",
            "tracking.uri=none",
        ],
    )
    outcome = run_predict(cfg)
    assert outcome.predicted == outcome.images, outcome.skipped[:3]
    return outcome.images_per_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--resolution", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    from pipeline.config import ModelConfig
    from pipeline.publish import write_export
    from pipeline.train.build import build_classifier, model_export_config

    classes = [f"class{i:02d}" for i in range(10)]
    model = build_classifier(ModelConfig(name=args.model), num_classes=len(classes))
    payload = {
        "state_dict": model.state_dict(),
        "model_config": model_export_config(
            ModelConfig(name=args.model),
            num_classes=len(classes),
            classes=classes,
            resolution=args.resolution,
        ),
    }
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as scratch:
        root = Path(scratch)
        (root / "images").mkdir()
        paths = _images(root / "images", args.images, args.image_size)
        export = write_export(payload, root / "model")
        _plain_loop(paths[: args.batch_size], payload, args.batch_size)  # warm-up
        rates = {
            "plain loop": _plain_loop(paths, payload, args.batch_size),
            "predict job, in-process": _job(root / "images", export, root / "out0", args.batch_size, 0),
            "predict job, Ray Data, 1 replica": _job(
                root / "images", export, root / "out1", args.batch_size, 1
            ),
        }
    base = rates["plain loop"]
    print(
        f"\n{args.images} JPEGs of {args.image_size} px, {args.model} at {args.resolution} px, batch "
        f"{args.batch_size}, {torch.get_num_threads()} torch threads"
    )
    for name, rate in rates.items():
        print(f"  {name:34s} {rate:8.1f} img/s  {rate / base:5.2f}x")
    print(json.dumps({name: round(rate, 1) for name, rate in rates.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

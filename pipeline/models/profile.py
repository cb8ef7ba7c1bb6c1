"""Model cost: parameters, multiply-accumulates, inference and training throughput, and their tables/plots.

MACs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (one MAC = 2 FLOPs in its convention), on
the meta device: shapes only, no arithmetic, so even EfficientNet-B7 at 600 px costs well under a second.
They match torchvision's published "GFLOPS" (which are multiply-adds) to 0.1 %. Only convolutions and matrix
products are counted; BatchNorm, activations, pooling and additions (a few % of real work) are not.

Throughput is the median over ``repeats`` timed batches after ``warmup`` untimed ones, on one device:
inference in eval mode under ``torch.inference_mode``; training as forward + cross-entropy + backward + SGD step.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.models.heads import get_classifier
from pipeline.models.registry import build_model, get_spec


@dataclass(frozen=True)
class ModelProfile:
    """One row of the profiler's table."""

    name: str
    """Architecture name (the model's ``arch_name``)."""
    family: str
    """Architecture family."""
    resolution: int
    """Square input side, in pixels, of the counts and timings."""
    parameters: int
    """Number of parameters (at the profiled num_classes)."""
    macs: int
    """Multiply-accumulates of one image's forward pass."""
    batch_size: int
    """Images per timed batch."""
    device: str
    """Device the timings ran on, e.g. cpu or cuda:0 (NVIDIA H100)."""
    predictions_per_second: float | None = None
    """Inference throughput in images/s (None when timing was skipped)."""
    training_images_per_second: float | None = None
    """Training throughput in images/s (None when timing was skipped)."""


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def count_macs(model: nn.Module, *, resolution: int) -> int:
    """MACs of one ``resolution`` x ``resolution`` image, counted by FlopCounterMode on the model's device."""
    parameter = next(model.parameters())
    image = torch.empty(1, 3, resolution, resolution, device=parameter.device, dtype=parameter.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(image)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_predictions_per_second(
    model: nn.Module, *, resolution: int, batch_size: int, warmup: int = 2, repeats: int = 5
) -> float:
    """Median images/s of eval-mode forward passes at ``batch_size`` on the model's device."""
    device = next(model.parameters()).device
    images = torch.randn(batch_size, 3, resolution, resolution, device=device)
    model.eval()
    seconds = []
    with torch.inference_mode():
        for step in range(warmup + repeats):
            _synchronize(device)
            start = time.perf_counter()
            model(images)
            _synchronize(device)
            if step >= warmup:
                seconds.append(time.perf_counter() - start)
    return batch_size / statistics.median(seconds)


def measure_training_images_per_second(
    model: nn.Module, *, resolution: int, batch_size: int, warmup: int = 2, repeats: int = 5
) -> float:
    """Median images/s of SGD training steps (forward, loss, backward, update); changes the weights."""
    if batch_size < 2:
        raise ValueError("training throughput needs batch_size >= 2 (BatchNorm on 1x1 maps needs 2 values)")
    device = next(model.parameters()).device
    images = torch.randn(batch_size, 3, resolution, resolution, device=device)
    num_classes = get_classifier(model).out_features
    labels = torch.randint(0, num_classes, (batch_size,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    model.train()
    seconds = []
    for step in range(warmup + repeats):
        _synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        _synchronize(device)
        if step >= warmup:
            seconds.append(time.perf_counter() - start)
    return batch_size / statistics.median(seconds)


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    threads = torch.get_num_threads()
    return f"{device} ({threads} thread{'s' if threads > 1 else ''})"


def profile_model(
    name: str,
    *,
    resolution: int | None = None,
    batch_size: int = 32,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    timing: bool = True,
    warmup: int = 2,
    repeats: int = 5,
    **scaling: Any,
) -> ModelProfile:
    """Count and (with ``timing``) time one registered model.

    ``resolution`` defaults to the model's own, ``num_classes`` to its dataset's (10 for the CIFAR nets, 1000
    for the ImageNet families, so the counts are the published ones).
    """
    num_classes = num_classes or get_spec(name).published_num_classes  # unknown names fail here
    with torch.device("meta"):
        meta_model = build_model(name, num_classes=num_classes, **scaling)
    resolution = resolution or meta_model.default_resolution
    profile = ModelProfile(
        name=meta_model.arch_name,
        family=meta_model.family,
        resolution=resolution,
        parameters=count_parameters(meta_model),
        macs=count_macs(meta_model, resolution=resolution),
        batch_size=batch_size,
        device=_device_label(torch.device(device)),
    )
    if not timing:
        return profile
    model = build_model(name, num_classes=num_classes, **scaling).to(device)
    kwargs = {"resolution": resolution, "batch_size": batch_size, "warmup": warmup, "repeats": repeats}
    return dataclasses.replace(
        profile,
        predictions_per_second=measure_predictions_per_second(model, **kwargs),
        training_images_per_second=measure_training_images_per_second(model, **kwargs),
    )


# --------------------------------------------------------------------------------------------------------
# Output


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def markdown_table(profiles: Sequence[ModelProfile]) -> str:
    lines = [
        "| model | family | resolution | params (M) | MACs (G) | predictions/s | training images/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for p in profiles:
        lines.append(
            f"| {p.name} | {p.family} | {p.resolution} | {p.parameters / 1e6:.2f} | {p.macs / 1e9:.3f} "
            f"| {_rate(p.predictions_per_second)} | {_rate(p.training_images_per_second)} |"
        )
    if any(p.predictions_per_second is not None for p in profiles):
        lines.append(f"\nTimings: batch size {profiles[0].batch_size}, device {profiles[0].device}.")
    return "\n".join(lines) + "\n"


def to_json(profiles: Sequence[ModelProfile]) -> str:
    return json.dumps([dataclasses.asdict(p) for p in profiles], indent=2) + "\n"


def to_csv(profiles: Sequence[ModelProfile]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[f.name for f in dataclasses.fields(ModelProfile)])
    writer.writeheader()
    writer.writerows(dataclasses.asdict(p) for p in profiles)
    return buffer.getvalue()


def plot(
    profiles: Sequence[ModelProfile],
    path: str | Path,
    *,
    accuracies: dict[str, float] | None = None,
    accuracy_label: str = "accuracy",
) -> str:
    """Accuracy vs GMACs for the models in ``accuracies`` (if any), else GMACs vs predictions/s.

    Returns which plot was drawn: ``"accuracy"`` or ``"speed"``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracies = {p.name: accuracies[p.name] for p in profiles if accuracies and p.name in accuracies}
    figure, axes = plt.subplots(figsize=(7, 5))
    if accuracies:
        points = [(p.macs / 1e9, accuracies[p.name], p.name) for p in profiles if p.name in accuracies]
        axes.set_xlabel("GMACs per image at each model's resolution (1 MAC = 2 FLOPs)")
        axes.set_ylabel(accuracy_label)
        kind = "accuracy"
    else:
        points = [
            (p.predictions_per_second, p.macs / 1e9, p.name) for p in profiles if p.predictions_per_second
        ]
        if not points:
            raise ValueError(
                "nothing to plot: no accuracies from MLflow and no timings (was --no-timing given?)"
            )
        axes.set_xlabel(f"predictions/s (batch {profiles[0].batch_size}, {profiles[0].device})")
        axes.set_ylabel("GMACs per image (1 MAC = 2 FLOPs)")
        axes.set_yscale("log")
        kind = "speed"
    axes.scatter([x for x, _, _ in points], [y for _, y, _ in points])
    for x, y, label in points:
        axes.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xscale("log")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return kind

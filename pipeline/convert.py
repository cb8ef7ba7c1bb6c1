"""A registered model as TorchScript or ONNX, each checked against the PyTorch model on real images.

The exported graph takes what the model takes: float32 images (N, 3, crop, crop), already preprocessed and
normalized as ``model_config.json`` describes (:mod:`pipeline.predictor`), and returns logits; the batch
dimension is dynamic. ONNX uses the installed exporter (``torch.onnx.export(dynamo=True)``) at its default
opset and needs the ``export`` extra (onnx, onnxscript, onnxruntime for the check).

Parity: the largest absolute difference between the exported model's logits and PyTorch's on the given
images is printed and must stay within ``tolerance``; otherwise the export fails and nothing is kept.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from pipeline.errors import PipelineError

Format = Literal["torchscript", "onnx"]
FILES = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx"}
DEFAULT_TOLERANCE = 1e-4


class ExportError(PipelineError):
    """The export could not be written or does not match the PyTorch model."""


@dataclass(frozen=True)
class Exported:
    path: Path
    format: Format
    max_abs_diff: float
    images: int
    opset: int | None


def _torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> Any:
    with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export, and still works
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.trace(model, example).save(str(path))
        loaded = torch.jit.load(str(path))
    return lambda x: loaded(x).detach()


def _onnx(model: nn.Module, example: torch.Tensor, path: Path) -> tuple[Any, int]:
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise ExportError(
            f"ONNX export needs the export extra ({error.name} is missing): pip install -e '.[export]'"
        ) from None
    batch = torch.export.Dim("batch")
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
        dynamo=True,
        verbose=False,
    )
    opset = next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return (lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])), opset


def export(
    payload: dict[str, Any],
    images: torch.Tensor,
    directory: Path,
    fmt: Format,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
) -> Exported:
    """Write ``payload``'s model as ``fmt`` into ``directory`` with its ``model_config.json``, and check it
    on ``images`` (uint8, preprocessed: (N, 3, crop, crop))."""
    from pipeline.data.transforms import normalize
    from pipeline.publish import EXPORT_CONFIG, model_from_payload

    if len(images) == 0:
        raise ExportError("no readable images to check the export on")
    model = model_from_payload(payload)
    inputs = normalize(images)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILES[fmt]
    opset = None
    with torch.inference_mode():
        expected = model(inputs)
    if fmt == "torchscript":
        run = _torchscript(model, inputs[:2], path)
    else:
        run, opset = _onnx(model, inputs[:2], path)
    with torch.inference_mode():
        got = run(inputs)
    difference = float((got.float() - expected.float()).abs().max())
    if not difference <= tolerance:  # NaN fails too
        path.unlink(missing_ok=True)
        raise ExportError(
            f"{fmt} export differs from the PyTorch model by {difference:.3g} (max abs logit) on "
            f"{len(images)} images, above the tolerance {tolerance:g}; it was not kept"
        )
    (directory / EXPORT_CONFIG).write_text(json.dumps(payload["model_config"], indent=2))
    return Exported(path, fmt, difference, len(images), opset)

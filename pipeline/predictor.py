"""A registered model as a function from encoded images to labels: decoding of any common format, the
evaluation preprocessing the model was validated with, the model in eval mode, top-k.

Ray-free and MLflow-free. The MLflow pyfunc flavor (``_load_pyfunc``, named in every registered model's
``MLmodel``), the batch prediction job's actors and the export parity checks all use it, so what is served,
what is batch-predicted and what was validated cannot drift apart.

The preprocessing, written in each model's ``model_config.json``: decode to RGB uint8 (grayscale, CMYK and
palette images converted, alpha dropped); resize the short side to ``resize_short_side`` (bilinear,
antialiased); centre-crop ``center_crop`` pixels; scale to [0, 1]; normalize with ImageNet mean and std.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.data.transforms import (
    EvalSizes,
    ImageDecodeError,
    decode_any,
    eval_sizes,
    eval_transform,
    normalize,
)

DEFAULT_TOP_K = 5


@dataclass(frozen=True)
class Preprocessing:
    resize: int
    crop: int

    @classmethod
    def of(cls, model_config: dict[str, Any]) -> Preprocessing:
        """From ``model_config["preprocessing"]``; exports made before it was recorded use the default
        evaluation sizes of their ``resolution`` (they predate separate evaluation sizes)."""
        from pipeline.config import DataConfig

        spec = model_config.get("preprocessing")
        if spec:
            return cls(int(spec["resize_short_side"]), int(spec["center_crop"]))
        sizes = eval_sizes(DataConfig(resolution=int(model_config["resolution"])))
        return cls(sizes.resize, sizes.crop)

    def __call__(self, data: bytes) -> torch.Tensor:
        """Encoded bytes -> uint8 (3, crop, crop); :class:`ImageDecodeError` for unreadable bytes."""
        return eval_transform(EvalSizes(resize=self.resize, crop=self.crop))(decode_any(data))


class Predictor:
    """Class probabilities and top-k for batches of images, on ``device`` (CUDA when available)."""

    def __init__(self, model: nn.Module, model_config: dict[str, Any], *, device: str | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)
        self.classes: list[str] = list(model_config["classes"])
        self.preprocess = Preprocessing.of(model_config)

    @classmethod
    def from_payload(cls, payload: dict[str, Any], *, device: str | None = None) -> Predictor:
        from pipeline.publish import model_from_payload

        return cls(model_from_payload(payload), payload["model_config"], device=device)

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) preprocessed images -> float32 (N, classes) softmax probabilities on the CPU."""
        logits = self.model(normalize(images, device=self.device))
        return logits.float().softmax(dim=1).cpu()

    @staticmethod
    def ranked(probabilities: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores, class indexes)`` of each row's ``k`` most probable classes (all, if fewer)."""
        return probabilities.topk(min(k, probabilities.shape[1]), dim=1)

    def predict_bytes(self, blobs: Sequence[bytes], *, top_k: int = DEFAULT_TOP_K) -> list[dict[str, Any]]:
        """One row per input: ``label``, ``score``, ``top_k_labels``, ``top_k_scores``, ``prob_<class>``
        and ``error`` (None, or why the image was skipped: its other fields are then empty)."""
        images: list[torch.Tensor] = []
        rows: list[dict[str, Any]] = []
        for blob in blobs:
            try:
                images.append(self.preprocess(blob))
                rows.append({"error": None})
            except ImageDecodeError as error:
                rows.append(self.skipped(str(error)))
        good = [row for row in rows if row["error"] is None]
        if good:
            probabilities = self.probabilities(torch.stack(images))
            ranked_scores, ranked = self.ranked(probabilities, top_k)
            labels = [[self.classes[i] for i in row] for row in ranked.tolist()]
            scores = ranked_scores.tolist()
            for row, p, row_labels, row_scores in zip(
                good, probabilities.tolist(), labels, scores, strict=True
            ):
                row.update(
                    label=row_labels[0], score=row_scores[0], top_k_labels=row_labels, top_k_scores=row_scores
                )
                row.update({f"prob_{name}": value for name, value in zip(self.classes, p, strict=True)})
        return rows

    def skipped(self, reason: str) -> dict[str, Any]:
        row: dict[str, Any] = {"label": None, "score": math.nan, "top_k_labels": [], "top_k_scores": []}
        row.update({f"prob_{name}": math.nan for name in self.classes})
        row["error"] = reason
        return row


class PyfuncModel:
    """What ``mlflow.pyfunc.load_model`` returns the ``predict`` of: a DataFrame with a column ``image`` of
    encoded bytes (or base64 text) in, one row per image out (see :meth:`Predictor.predict_bytes`)."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        import pandas as pd

        if not isinstance(model_input, pd.DataFrame) or "image" not in model_input.columns:
            raise ValueError("input must be a DataFrame with a column 'image' of encoded image bytes")
        blobs = [_as_bytes(value) for value in model_input["image"]]
        top_k = int((params or {}).get("top_k") or DEFAULT_TOP_K)
        return pd.DataFrame(self.predictor.predict_bytes(blobs, top_k=top_k))


def _as_bytes(value: Any) -> bytes:
    """Bytes as given; text as base64 (a client that sent JSON without the model's schema applied)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            return b""
    return b""


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> PyfuncModel:
    """MLflow's ``python_function`` loader for models registered by this pipeline: ``path`` is the model's
    ``model.pt`` (the flavor's ``data``), read weights-only."""
    from pathlib import Path

    from pipeline.publish import read_payload

    return PyfuncModel(Predictor.from_payload(read_payload(Path(path).read_bytes(), path)))

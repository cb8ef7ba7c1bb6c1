"""A trained classifier as an MLflow model directory: the ``pytorch`` flavor and a ``python_function`` flavor
whose loader is :mod:`pipeline.predictor` (the whole preprocessing, class names and top-k).

The pytorch flavor pickles the module (``serialization_format="pickle"``): MLflow's default, torch.export,
loads back as a GraphModule rather than the model's class, and needs an input example. Its weights are
read by ``mlflow.pytorch.load_model``; this project itself reads only ``model.pt``, weights-only.

Explicit ``pip_requirements`` keep MLflow from inferring them by importing the model in a subprocess (9 s
instead of 0.5 s). They describe the environment for MLflow's own env managers; served with
``--env-manager local`` (the documented way, offline) the current environment is used, which must have
this project installed: the pyfunc's loader module is part of it.
"""

from __future__ import annotations

import logging
from importlib import metadata
from pathlib import Path

from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array
from torch import nn

PYFUNC_LOADER = "pipeline.predictor"
DEFAULT_TOP_K = 5


def signature(classes: list[str]) -> ModelSignature:
    """Input: one binary column ``image`` (base64 in MLflow's JSON scoring protocol). Output: the predicted
    class name and its probability, the top-k, every class's probability and an ``error`` for an image that
    could not be read. Param ``top_k`` (default 5)."""
    outputs = [
        ColSpec("string", "label", required=False),
        ColSpec("double", "score", required=False),
        ColSpec(Array("string"), "top_k_labels", required=False),
        ColSpec(Array("double"), "top_k_scores", required=False),
        *(ColSpec("double", f"prob_{name}", required=False) for name in classes),
        ColSpec("string", "error", required=False),
    ]
    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema(outputs),
        params=ParamSchema([ParamSpec("top_k", "long", DEFAULT_TOP_K)]),
    )


def _requirements() -> list[str]:
    packages = ("torch", "torchvision", "pillow", "pandas", "mlflow")
    return [f"{name}=={metadata.version(name)}" for name in packages]


def save_model(path: Path, *, model: nn.Module, classes: list[str], weights_file: str) -> Path:
    """Write the MLflow model for ``model`` at ``path`` (must not exist). The pyfunc flavor loads
    ``weights_file``, which the caller writes into ``path`` (the export format's ``model.pt``)."""
    import mlflow.pytorch

    # MLflow warns on every pickled save; the module docstring says why this one is pickled.
    flavor_logger = logging.getLogger("mlflow.pytorch")
    level = flavor_logger.level
    flavor_logger.setLevel(logging.ERROR)
    try:
        mlflow.pytorch.save_model(
            model.eval(),
            str(path),
            serialization_format="pickle",
            signature=signature(classes),
            pip_requirements=_requirements(),
            metadata={"classes": ",".join(classes), "weights": weights_file},
        )
    finally:
        flavor_logger.setLevel(level)
    mlmodel = Model.load(str(path / "MLmodel"))
    pyfunc = mlmodel.flavors["python_function"]
    pyfunc["loader_module"] = PYFUNC_LOADER
    pyfunc["data"] = weights_file
    mlmodel.save(str(path / "MLmodel"))
    return path

"""Model zoo: the registry of architectures, fine-tuning utilities, feature extraction and profiling.

Importing this package registers every architecture (CIFAR nets and the torchvision families). See
docs/models.md for the list, the scaling rule and where dropout sits in each family.
"""

from pipeline.models import cifar as _cifar  # noqa: F401  (registers the CIFAR nets)
from pipeline.models import torchvision_families as _torchvision_families  # noqa: F401  (registers the rest)
from pipeline.models.features import FeatureStage, build_feature_extractor, feature_stages
from pipeline.models.heads import (
    ParameterSplit,
    classifier_name,
    freeze_backbone,
    get_classifier,
    param_groups,
    replace_classifier,
    set_train_mode,
    split_parameters,
    unfreeze_backbone,
)
from pipeline.models.registry import (
    ModelInfo,
    ModelSpec,
    UnknownModelError,
    build_model,
    get_spec,
    list_models,
    model_info,
)
from pipeline.models.torchvision_families import compound_multipliers

__all__ = [
    "FeatureStage",
    "ModelInfo",
    "ModelSpec",
    "ParameterSplit",
    "UnknownModelError",
    "build_feature_extractor",
    "build_model",
    "classifier_name",
    "compound_multipliers",
    "feature_stages",
    "freeze_backbone",
    "get_classifier",
    "get_spec",
    "list_models",
    "model_info",
    "param_groups",
    "replace_classifier",
    "set_train_mode",
    "split_parameters",
    "unfreeze_backbone",
]

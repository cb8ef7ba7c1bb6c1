"""Transfer learning beyond classification: a classification network as a backbone of stage feature maps.

:func:`build_feature_extractor` wraps a (trained) model with torchvision's ``create_feature_extractor``; the
result returns an ordered dict ``{"stage1": tensor, ...}`` from high to low resolution, which is what a
detection neck such as ``torchvision.ops.FeaturePyramidNetwork`` takes. The stage nodes per family are below:
the last node of each resolution (stride 4, 8, 16, 32 for the ImageNet families; 1, 2, 4 for the CIFAR nets).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

# Node names of the stage outputs. MobileNetV2: features.3/6/13 end the 24/32/96-channel groups and features.18
# is the 1x1 conv to 1280 channels; EfficientNet: features.2/3/5 end the stride-4/8/16 stages and features.8 is
# the head conv; ConvNeXt: odd indices are stages, even ones the downsampling layers between them.
STAGE_NODES: dict[str, tuple[str, ...]] = {
    "baseline": ("layer1", "layer2", "layer3"),
    "cifar_plain": ("layer1", "layer2", "layer3"),
    "cifar_resnet": ("layer1", "layer2", "layer3"),
    "resnet": ("layer1", "layer2", "layer3", "layer4"),
    "mobilenet_v2": ("features.3", "features.6", "features.13", "features.18"),
    "efficientnet": ("features.2", "features.3", "features.5", "features.8"),
    "convnext": ("features.1", "features.3", "features.5", "features.7"),
}


@dataclass(frozen=True)
class FeatureStage:
    """One stage output of a backbone."""

    name: str
    """Key in the extractor's output dict: stage1, stage2, ..."""
    node: str
    """Node (module path) in the classification model it is taken from."""
    channels: int
    """Channels of the feature map."""
    stride: int
    """Input side divided by the map's side (at an input side divisible by 32)."""


def build_feature_extractor(model: nn.Module, *, stages: Sequence[int] | None = None) -> nn.Module:
    """A module returning ``{"stage<i>": feature map}`` for the model's stages (1-based; default all).

    ``model`` must come from :func:`pipeline.models.build_model` (it reads ``model.family``). Weights are
    shared with ``model``, so freezing or loading a checkpoint into either affects both.
    """
    nodes = STAGE_NODES[model.family]
    selected = list(range(1, len(nodes) + 1)) if stages is None else list(stages)
    for index in selected:
        if not 1 <= index <= len(nodes):
            raise ValueError(f"{model.arch_name} has stages 1..{len(nodes)}, got {index}")
    extractor = create_feature_extractor(model, return_nodes={nodes[i - 1]: f"stage{i}" for i in selected})
    extractor.arch_name = model.arch_name
    extractor.family = model.family
    extractor.default_resolution = model.default_resolution
    return extractor


def feature_stages(model: nn.Module, *, resolution: int = 64) -> list[FeatureStage]:
    """Channels and strides of every stage, from one eval-mode forward pass of a single image.

    The model's train/eval flags (frozen BatchNorm layers included) are restored afterwards.
    """
    nodes = STAGE_NODES[model.family]
    modes = {module: module.training for module in model.modules()}
    parameter = next(model.parameters())
    extractor = build_feature_extractor(model).eval()  # shares (and so switches) the model's submodules
    try:
        with torch.no_grad():
            image = torch.zeros(1, 3, resolution, resolution, device=parameter.device, dtype=parameter.dtype)
            outputs = extractor(image)
    finally:
        for module, training in modes.items():
            module.training = training
    return [
        FeatureStage(name=name, node=node, channels=value.shape[1], stride=resolution // value.shape[-1])
        for node, (name, value) in zip(nodes, outputs.items(), strict=True)
    ]

"""The ImageNet families, built with torchvision's builders (never copies of them), plus compound scaling.

What this module adds to torchvision's builders:
- dropout before the final linear layer for every family. ResNet and ConvNeXt have none in torchvision; we add
  it so that the state_dict keys stay torchvision's and ImageNet weights load unchanged (ResNet: inside
  ``avgpool``, after the pooling; ConvNeXt: a ``classifier.dropout`` entry between ``classifier.1`` and
  ``classifier.2``). ``dropout=0`` replaces MobileNetV2's/EfficientNet's Dropout with an Identity, so no
  Dropout module is left;
- stochastic depth: EfficientNet and ConvNeXt have it in torchvision (``stochastic_depth_prob``); ResNet and
  MobileNetV2 get it from block subclasses that pass the residual branch through torchvision's
  ``StochasticDepth`` before the add (Huang et al. 2016). With ``stochastic_depth=0`` (their default) these
  models come from torchvision's builders unchanged, so no StochasticDepth module exists;
- EfficientNet compound scaling from (phi, alpha, beta, gamma) on B0.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops import StochasticDepth

from pipeline.models.registry import ModelSpec, register

# Resolutions: torchvision's evaluation crops of its ImageNet weights. They equal the EfficientNet paper's except
# B2 (torchvision 288, paper 260); using torchvision's keeps the MACs comparable with its published figures.
EFFICIENTNET_RESOLUTIONS = {
    "b0": 224,
    "b1": 240,
    "b2": 288,
    "b3": 300,
    "b4": 380,
    "b5": 456,
    "b6": 528,
    "b7": 600,
}
# torchvision's default classifier dropout per variant (used when build_model gets dropout=None).
EFFICIENTNET_DROPOUT = {
    "b0": 0.2,
    "b1": 0.2,
    "b2": 0.3,
    "b3": 0.3,
    "b4": 0.4,
    "b5": 0.4,
    "b6": 0.5,
    "b7": 0.5,
}
# torchvision's default stochastic depth (final block's drop probability; linear in depth from 0).
CONVNEXT_STOCHASTIC_DEPTH = {"tiny": 0.1, "small": 0.4, "base": 0.5}


def _drop_classifier_dropout(model: nn.Module, dropout: float) -> nn.Module:
    """MobileNetV2/EfficientNet: classifier = Sequential(Dropout, Linear); p = 0 leaves no Dropout module."""
    assert isinstance(model.classifier[0], nn.Dropout)
    if dropout == 0:
        model.classifier[0] = nn.Identity()  # keeps the key "classifier.1" of the Linear
    return model


# --------------------------------------------------------------------------------------------------------
# Stochastic depth for the residual families torchvision builds without it (Huang et al. 2016): block l of L
# drops its whole residual branch per sample with probability p_l = l / L * p_L in training (the survivors are
# scaled by 1 / (1 - p_l)); in eval mode the block is torchvision's. StochasticDepth has no parameters or
# buffers, so the state_dict keys stay torchvision's and ImageNet weights load unchanged.


class _StochasticDepthBasicBlock(BasicBlock):
    """torchvision's BasicBlock; the residual branch passes through ``self.stochastic_depth`` before the add."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stochastic_depth = StochasticDepth(0.0, "row")  # p: _decay_linearly, once the depth is known

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(self.stochastic_depth(out) + identity)


class _StochasticDepthBottleneck(Bottleneck):
    """torchvision's Bottleneck; the residual branch passes through ``self.stochastic_depth`` before the add."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stochastic_depth = StochasticDepth(0.0, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(self.relu(self.bn2(self.conv2(out)))))
        return self.relu(self.stochastic_depth(out) + identity)


class _StochasticDepthInvertedResidual(InvertedResidual):
    """torchvision's InvertedResidual; where it has a shortcut (stride 1, same channels) the branch passes
    through ``self.stochastic_depth`` before the add. Blocks without a shortcut have no branch to drop."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.use_res_connect:
            self.stochastic_depth = StochasticDepth(0.0, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.stochastic_depth(self.conv(x))
        return self.conv(x)


# torchvision's resnet18/34/50 builders take no block class, so with stochastic depth ResNet is built from
# their (block, blocks per stage) directly; a test checks that the state_dict equals the builder's.
RESNET_LAYOUTS = {
    "resnet18": (_StochasticDepthBasicBlock, [2, 2, 2, 2]),
    "resnet34": (_StochasticDepthBasicBlock, [3, 4, 6, 3]),
    "resnet50": (_StochasticDepthBottleneck, [3, 4, 6, 3]),
}


def _decay_linearly(blocks: list[nn.Module], final_probability: float) -> None:
    """Block l of L (1-based, in depth order) drops with l / L * final_probability (Huang et al.'s rule)."""
    for depth, block in enumerate(blocks, start=1):
        if hasattr(block, "stochastic_depth"):
            block.stochastic_depth.p = final_probability * depth / len(blocks)


def _build_resnet(arch: str):
    def build(*, num_classes: int, dropout: float, stochastic_depth: float) -> nn.Module:
        if stochastic_depth > 0:
            block, layers = RESNET_LAYOUTS[arch]
            model = ResNet(block, layers, num_classes=num_classes)
            stages = (model.layer1, model.layer2, model.layer3, model.layer4)
            _decay_linearly([block for stage in stages for block in stage], stochastic_depth)
        else:
            model = getattr(tvm, arch)(num_classes=num_classes)
        if dropout > 0:
            # (N, C, 1, 1) after pooling: element-wise dropout here equals dropout on fc's input.
            model.avgpool = nn.Sequential(OrderedDict(pool=model.avgpool, dropout=nn.Dropout(dropout)))
        return model

    return build


def _build_mobilenet_v2(
    *, num_classes: int, dropout: float, stochastic_depth: float, width_mult: float
) -> nn.Module:
    if width_mult <= 0:
        raise ValueError(f"mobilenet_v2: width_mult must be > 0, got {width_mult}")
    block = {"block": _StochasticDepthInvertedResidual} if stochastic_depth > 0 else {}
    model = tvm.mobilenet_v2(num_classes=num_classes, dropout=dropout, width_mult=width_mult, **block)
    if stochastic_depth > 0:
        # Depth counts all 17 inverted-residual blocks (features[0] is the stem conv, features[-1] the 1x1
        # head conv), as torchvision's EfficientNet counts its MBConv blocks; the 7 without a shortcut (the
        # first of each stage, the last block among them) drop nothing, so the largest p applied is 16/17 p_L
        # (features.16).
        _decay_linearly(list(model.features[1:-1]), stochastic_depth)
    return _drop_classifier_dropout(model, dropout)


def _build_efficientnet(variant: str):
    def build(*, num_classes: int, dropout: float, stochastic_depth: float) -> nn.Module:
        builder = getattr(tvm, f"efficientnet_{variant}")
        model = builder(num_classes=num_classes, dropout=dropout, stochastic_depth_prob=stochastic_depth)
        return _drop_classifier_dropout(model, dropout)

    return build


def _build_convnext(size: str):
    def build(*, num_classes: int, dropout: float, stochastic_depth: float) -> nn.Module:
        model = getattr(tvm, f"convnext_{size}")(
            num_classes=num_classes, stochastic_depth_prob=stochastic_depth
        )
        if dropout > 0:
            norm, flatten, linear = model.classifier
            model.classifier = nn.Sequential(
                OrderedDict([("0", norm), ("1", flatten), ("dropout", nn.Dropout(dropout)), ("2", linear)])
            )
        return model

    return build


# --------------------------------------------------------------------------------------------------------
# EfficientNet compound scaling (Tan & Le 2019, eq. 3)


def compound_multipliers(*, phi: float, alpha: float, beta: float, gamma: float) -> tuple[float, float, int]:
    """(depth multiplier alpha^phi, width multiplier beta^phi, resolution round(224 gamma^phi)) from B0.

    FLOPs scale with depth x width^2 x resolution^2, so alpha beta^2 gamma^2 = 2 doubles them per unit of phi
    (before torchvision rounds layers up and channels to multiples of 8; see docs/models.md).
    """
    if phi < 0:
        raise ValueError(f"efficientnet_compound: phi must be >= 0, got {phi}")
    for key, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        if value < 1:
            raise ValueError(f"efficientnet_compound: {key} must be >= 1, got {value}")
    return alpha**phi, beta**phi, round(EFFICIENTNET_RESOLUTIONS["b0"] * gamma**phi)


def _describe_compound(*, phi: float, alpha: float, beta: float, gamma: float) -> tuple[str, int]:
    _, _, resolution = compound_multipliers(phi=phi, alpha=alpha, beta=beta, gamma=gamma)
    return f"efficientnet_compound_phi{phi:g}_alpha{alpha:g}_beta{beta:g}_gamma{gamma:g}", resolution


def _build_efficientnet_compound(
    *,
    num_classes: int,
    dropout: float,
    stochastic_depth: float,
    phi: float,
    alpha: float,
    beta: float,
    gamma: float,
) -> nn.Module:
    depth_mult, width_mult, _ = compound_multipliers(phi=phi, alpha=alpha, beta=beta, gamma=gamma)
    return _build_efficientnet_scaled(
        num_classes=num_classes,
        dropout=dropout,
        stochastic_depth=stochastic_depth,
        width_mult=width_mult,
        depth_mult=depth_mult,
    )


def _build_efficientnet_scaled(
    *, num_classes: int, dropout: float, stochastic_depth: float, width_mult: float, depth_mult: float
) -> nn.Module:
    """EfficientNet-B0's blocks with direct width and depth multipliers (resolution is data.resolution)."""
    for key, value in (("width_mult", width_mult), ("depth_mult", depth_mult)):
        if value <= 0:
            raise ValueError(f"efficientnet_scaled: {key} must be > 0, got {value}")
    setting, last_channel = _efficientnet_conf(
        "efficientnet_b0", width_mult=width_mult, depth_mult=depth_mult
    )
    model = EfficientNet(
        setting,
        dropout=dropout,
        stochastic_depth_prob=stochastic_depth,
        num_classes=num_classes,
        last_channel=last_channel,
    )
    return _drop_classifier_dropout(model, dropout)


# --------------------------------------------------------------------------------------------------------
# Registration

for _arch, _description in (
    ("resnet18", "ResNet-18, basic blocks"),
    ("resnet34", "ResNet-34, basic blocks (the lecture's ImageNet example)"),
    ("resnet50", "ResNet-50, bottleneck blocks"),
):
    register(
        ModelSpec(
            name=_arch,
            family="resnet",
            resolution=224,
            builder=_build_resnet(_arch),
            default_dropout=0.0,
            stochastic_depth=0.0,
            description=_description,
        )
    )

register(
    ModelSpec(
        name="mobilenet_v2",
        family="mobilenet_v2",
        resolution=224,
        builder=_build_mobilenet_v2,
        default_dropout=0.2,
        stochastic_depth=0.0,
        scaling={"width_mult": 1.0},
        description="MobileNetV2: inverted residuals with depth-wise convs; width_mult scales channels",
    )
)

for _variant, _resolution in EFFICIENTNET_RESOLUTIONS.items():
    register(
        ModelSpec(
            name=f"efficientnet_{_variant}",
            family="efficientnet",
            resolution=_resolution,
            builder=_build_efficientnet(_variant),
            default_dropout=EFFICIENTNET_DROPOUT[_variant],
            stochastic_depth=0.2,
            description=f"EfficientNet-{_variant.upper()} (torchvision's published scaling)",
        )
    )

register(
    ModelSpec(
        name="efficientnet_compound",
        family="efficientnet",
        resolution=EFFICIENTNET_RESOLUTIONS["b0"],
        builder=_build_efficientnet_compound,
        default_dropout=0.2,
        stochastic_depth=0.2,
        scaling={"phi": 0.0, "alpha": 1.2, "beta": 1.1, "gamma": 1.15},
        describe=_describe_compound,
        description="EfficientNet-B0 compound-scaled: depth alpha^phi, width beta^phi, resolution gamma^phi",
    )
)

register(
    ModelSpec(
        name="efficientnet_scaled",
        family="efficientnet",
        resolution=EFFICIENTNET_RESOLUTIONS["b0"],
        builder=_build_efficientnet_scaled,
        default_dropout=0.2,
        stochastic_depth=0.2,
        scaling={"width_mult": 1.0, "depth_mult": 1.0},
        description="EfficientNet-B0 with direct width_mult and depth_mult (the search's direct scaling mode)",
    )
)

for _size, _sd in CONVNEXT_STOCHASTIC_DEPTH.items():
    register(
        ModelSpec(
            name=f"convnext_{_size}",
            family="convnext",
            resolution=224,
            builder=_build_convnext(_size),
            default_dropout=0.0,
            stochastic_depth=_sd,
            description=f"ConvNeXt-{_size[0].upper()} (Liu et al. 2022)",
        )
    )

"""CIFAR-style networks for 32-64 px inputs: the depth-10 baseline, plain nets and the CIFAR ResNets.

The plain nets and ResNets share one layout (He et al. 2015, section 4.2), so the degradation experiment
compares like with like: a 3x3 conv with 16 filters, then 3 stages of n blocks of two 3x3 convs with 16, 32
and 64 filters (stages 2 and 3 start with a stride-2 conv), global average pooling and one linear layer:
depth = 6n + 2 weighted layers. A plain net is the same network with the shortcuts removed.

Shortcuts where a block halves H, W and doubles C:
- ``"A"`` (the paper's CIFAR choice, the default): identity on every second pixel, the new channels zero-padded;
  no parameters, so the counts equal the paper's table (ResNet-20 0.27M ... ResNet-1202 19.4M).
- ``"B"`` (the lecture's projection variant): a 1x1 conv with stride 2 (+ BatchNorm) before the sum.

Stochastic depth (Huang et al. 2016, introduced on these CIFAR ResNets): with ``stochastic_depth=p_L`` > 0,
block l of the L = 3n blocks drops its whole residual branch per sample with probability p_l = l / L * p_L
in training (torchvision's ``StochasticDepth``, row mode: the kept branches are scaled by 1 / (1 - p_l)), so
only the shortcut passes; in eval mode every block is whole. p_L = 0 (the default) adds no module at all.
Plain nets have no branch to drop and refuse it.

The depth-10 baseline is the previous lecture's plain design: 3 stages of 3 conv-BN-ReLU layers (32, 64, 128
filters, 2x2 max-pooling between stages), global average pooling and a linear layer: 9 conv + 1 linear.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

Shortcut = Literal["A", "B"]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """Option A: subsample by 2 and zero-pad the extra channels (no parameters)."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, self.extra_channels))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers; with ``residual`` the input (or its shortcut) is added before the last ReLU.

    ``stochastic_depth`` > 0 (residual blocks only) drops the two-conv branch per sample with that probability
    in training; 0 leaves no StochasticDepth module.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        *,
        residual: bool,
        shortcut: Shortcut,
        stochastic_depth: float = 0.0,
    ):
        super().__init__()
        assert residual or stochastic_depth == 0, "a plain block has no residual branch to drop"
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.residual = residual
        self.shortcut: nn.Module = nn.Identity()
        if residual and (stride != 1 or in_channels != out_channels):
            if shortcut == "A":
                assert stride == 2 and out_channels >= in_channels, "option A only halves H, W and widens C"
                self.shortcut = PadShortcut(out_channels - in_channels)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(out_channels),
                )
        self.stochastic_depth = StochasticDepth(stochastic_depth, "row") if stochastic_depth > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.stochastic_depth is not None:
            out = self.stochastic_depth(out)
        if self.residual:
            out = out + self.shortcut(x)
        return F.relu(out)


def _init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class CifarNet(nn.Module):
    """Plain net or CIFAR ResNet of depth 6n + 2; ``layer1..layer3`` are the stages (feature nodes).

    ``stochastic_depth`` is the last block's drop probability p_L (ResNets only; see the module docstring).
    """

    def __init__(
        self,
        depth: int,
        *,
        residual: bool,
        num_classes: int,
        dropout: float = 0.0,
        shortcut: Shortcut = "A",
        stochastic_depth: float = 0.0,
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, 1202), got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(
                f"shortcut must be 'A' (zero-padding identity) or 'B' (1x1 projection), got {shortcut!r}"
            )
        if not residual and stochastic_depth != 0:
            raise ValueError(
                f"stochastic_depth must be 0 for a plain net (no residual branch to drop), "
                f"got {stochastic_depth}"
            )
        if not 0.0 <= stochastic_depth < 1.0:
            raise ValueError(f"stochastic_depth must be in [0, 1), got {stochastic_depth}")
        blocks_per_stage = (depth - 2) // 6
        num_blocks = 3 * blocks_per_stage
        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        in_channels = widths[0]
        for index, width in enumerate(widths):
            blocks = []
            for block_index in range(blocks_per_stage):
                stride = 2 if index > 0 and block_index == 0 else 1
                depth_index = index * blocks_per_stage + block_index + 1  # l = 1 .. L over all stages
                blocks.append(
                    BasicBlock(
                        in_channels,
                        width,
                        stride,
                        residual=residual,
                        shortcut=shortcut,
                        stochastic_depth=stochastic_depth * depth_index / num_blocks,
                    )
                )
                in_channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


class BaselineNet(nn.Module):
    """The lecture's depth-10 plain baseline (module docstring); ``layer1..layer3`` are the stages."""

    def __init__(
        self, *, num_classes: int, dropout: float = 0.0, widths: tuple[int, int, int] = (32, 64, 128)
    ):
        super().__init__()
        stages = []
        in_channels = 3
        for width in widths:
            layers: list[nn.Module] = []
            for _ in range(3):
                layers += [_conv3x3(in_channels, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                in_channels = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.MaxPool2d(2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.layer1(x))
        x = self.pool(self.layer2(x))
        x = torch.flatten(self.avgpool(self.layer3(x)), 1)
        return self.fc(self.dropout(x))


# --------------------------------------------------------------------------------------------------------
# Registration

from pipeline.models.registry import ModelSpec, register  # noqa: E402


def _build_baseline(*, num_classes: int, dropout: float) -> nn.Module:
    return BaselineNet(num_classes=num_classes, dropout=dropout)


def _cifar_builder(depth: int, *, residual: bool):
    # The registry passes stochastic_depth only to the ResNets (the plain nets' spec has None: no branches).
    def build(
        *, num_classes: int, dropout: float, stochastic_depth: float = 0.0, shortcut: Shortcut = "A"
    ) -> nn.Module:
        return CifarNet(
            depth,
            residual=residual,
            num_classes=num_classes,
            dropout=dropout,
            shortcut=shortcut,
            stochastic_depth=stochastic_depth,
        )

    return build


register(
    ModelSpec(
        name="cifar_baseline10",
        family="baseline",
        resolution=32,
        builder=_build_baseline,
        default_dropout=0.0,
        published_num_classes=10,
        description="lecture's depth-10 plain baseline: 9 conv (32/64/128) + 1 linear, max-pooling",
    )
)
for _depth in (20, 32, 44, 56):
    register(
        ModelSpec(
            name=f"cifar_plain{_depth}",
            family="cifar_plain",
            resolution=32,
            builder=_cifar_builder(_depth, residual=False),
            default_dropout=0.0,
            published_num_classes=10,
            description=f"CIFAR ResNet-{_depth} layout without shortcuts (degradation experiment)",
        )
    )
for _depth in (20, 32, 44, 56, 110, 1202):
    register(
        ModelSpec(
            name=f"cifar_resnet{_depth}",
            family="cifar_resnet",
            resolution=32,
            builder=_cifar_builder(_depth, residual=True),
            default_dropout=0.0,
            published_num_classes=10,
            scaling={"shortcut": "A"},
            stochastic_depth=0.0,
            description=f"CIFAR ResNet-{_depth} (He et al. 2015), 16/32/64 filters, option-A shortcuts",
        )
    )

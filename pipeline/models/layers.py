"""Layer depths for layer-wise learning-rate decay: which block of the network each parameter belongs to.

One rule for every architecture in the registry, read off the module tree (no per-family table):

1. Walk the model's children in registration order, which is forward order for every registered model.
   A plain ``nn.Sequential`` (exact type) is opened and its children walked in turn; torchvision's
   ``Conv2dNormActivation`` subclasses ``nn.Sequential`` and so stays one block.
2. Any other module with submodules (a residual block, an ``InvertedResidual``, an ``MBConv``, a ``CNBlock``,
   a ``Conv2dNormActivation``) is one **block**: one depth.
3. Consecutive single layers (modules without submodules: ``Conv2d``, ``BatchNorm2d``, ``LayerNorm2d`` ...)
   in the same container form one block together, so a stem of loose layers (ResNet's ``conv1``/``bn1``)
   or ConvNeXt's downsampling norm + conv is one depth, not two.
4. Blocks without parameters take no depth; the backbone's blocks get depths 0..L-1 and the head (the final
   ``nn.Linear``, see :mod:`pipeline.models.heads`) gets L. Parameters registered directly on the model
   (none in the registry) count as the stem, depth 0.

What that gives: ResNet-18 stem 0, its 8 residual blocks 1..8, ``fc`` 9 (ResNet-50: 16 blocks, head 17);
CIFAR ResNet-20 stem 0, 9 blocks, head 10; the depth-10 baseline's three stages (``layer1..3`` hold loose
layers only) 0..2, head 3; MobileNetV2 ``features.0..18`` 0..18, head 19; EfficientNet-B0 stem 0, its 16
MBConv blocks 1..16, the 1x1 head conv 17, head 18; ConvNeXt-T stem 0, 18 blocks and 3 downsampling layers
1..21, the pre-head LayerNorm 22, head 23.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LayerDepths:
    """Depth of every parameter (trainable or not, so freezing does not renumber the blocks)."""

    depth: dict[str, int]
    """Qualified parameter name (as in ``model.named_parameters()``) -> depth in 0..num_layers."""
    num_layers: int
    """L: the head's depth; the backbone's blocks are 0..L-1."""


def layer_depths(model: nn.Module, *, head: str) -> LayerDepths:
    """Depths by the module docstring's rule; ``head`` is the qualified name of the final linear layer."""
    blocks: list[list[str]] = []  # parameter names per block, in forward order

    def visit(container: nn.Module, prefix: str) -> None:
        loose: list[str] = []  # parameters of consecutive single layers, one block once closed

        def close_loose() -> None:
            if loose:
                blocks.append(list(loose))
                loose.clear()

        for child_name, child in container.named_children():
            name = f"{prefix}{child_name}"
            parameters = [f"{name}.{p}" for p, _ in child.named_parameters()]
            if name == head:
                close_loose()
            elif type(child) is nn.Sequential:
                close_loose()
                visit(child, f"{name}.")
            elif next(child.children(), None) is None:
                loose += parameters
            else:
                close_loose()
                blocks.append(parameters)
        close_loose()

    visit(model, "")
    blocks = [block for block in blocks if block]
    depth = {name: index for index, block in enumerate(blocks) for name in block}
    head_parameters = {f"{head}.{p}" for p, _ in model.get_submodule(head).named_parameters()}
    assert not head_parameters & set(depth), f"the head {head} sits inside a block; the rule cannot split it"
    depth |= {name: len(blocks) for name in head_parameters}
    depth |= {name: 0 for name, _ in model.named_parameters(recurse=False)}
    missing = {name for name, _ in model.named_parameters()} - set(depth)
    assert not missing, f"parameters outside every block: {sorted(missing)}"
    return LayerDepths(depth=depth, num_layers=len(blocks))

"""Fine-tuning utilities: find and replace the classifier, freeze the backbone, build optimizer param groups.

The split is the same for every family: the **head** is the final ``nn.Linear`` (the last one registered in
the module tree: ``fc`` for ResNets and the CIFAR nets, ``classifier.1`` for MobileNetV2/EfficientNet,
``classifier.2`` for ConvNeXt); the **backbone** is every other parameter, ConvNeXt's pre-head LayerNorm
included. A frozen backbone has ``requires_grad=False``; its BatchNorm layers must also stay in eval mode or
their running statistics keep moving although no weight changes. ``model.train()`` switches them back to
train mode, so the training loop calls :func:`set_train_mode` instead (it is ``model.train()`` plus that fix,
and does nothing more when nothing is frozen).

:func:`param_groups` splits the trainable parameters into optimizer groups: head/backbone x decay/no-decay,
and with ``layer_decay`` < 1 the backbone further by block depth (the rule is in :mod:`pipeline.models.layers`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pipeline.models.layers import layer_depths

# Parameters of these modules get no weight decay (with every bias): shrinking a norm's scale towards 0 only
# rescales the activations it normalizes, it does not regularize.
NORM_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def classifier_name(model: nn.Module) -> str:
    """Qualified name of the final linear layer (the head), e.g. ``fc`` or ``classifier.2``."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier")
    return names[-1]


def get_classifier(model: nn.Module) -> nn.Linear:
    return model.get_submodule(classifier_name(model))


def replace_classifier(model: nn.Module, num_classes: int) -> nn.Linear:
    """Put a freshly initialized ``Linear(in_features, num_classes)`` in place of the head; returns it.

    The dropout before it is kept. The new layer is trainable even when the backbone is frozen.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    name = classifier_name(model)
    old = model.get_submodule(name)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new)
    return new


def _head_parameter_names(model: nn.Module) -> set[str]:
    prefix = classifier_name(model)
    return {f"{prefix}.{name}" for name, _ in model.get_submodule(prefix).named_parameters()}


def freeze_backbone(model: nn.Module) -> None:
    """No gradient for anything but the head, and the backbone's BatchNorm layers in eval mode (see module)."""
    head = _head_parameter_names(model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in head)
    set_train_mode(model, model.training)


def unfreeze_backbone(model: nn.Module) -> None:
    """Make every parameter trainable again; BatchNorm layers follow the model's mode from now on."""
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    set_train_mode(model, model.training)


def set_train_mode(model: nn.Module, mode: bool = True) -> nn.Module:
    """``model.train(mode)``, then BatchNorm layers whose parameters are all frozen go back to eval mode.

    Call it wherever the loop would call ``model.train()`` (each epoch, after evaluation). Works on a DDP
    wrapper too: its ``modules()`` include the wrapped model's.
    """
    model.train(mode)
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            parameters = list(module.parameters(recurse=False))
            if parameters and not any(p.requires_grad for p in parameters):
                module.eval()
    return model


@dataclass(frozen=True)
class ParameterSplit:
    """Trainable parameters by role; ``no_decay`` holds biases and normalization parameters."""

    head_decay: list[nn.Parameter]
    head_no_decay: list[nn.Parameter]
    backbone_decay: list[nn.Parameter]
    backbone_no_decay: list[nn.Parameter]


def _trainable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, bool, bool]]:
    """``(qualified name, parameter, in_head, decayed)`` for every trainable parameter, in module order."""
    head = _head_parameter_names(model)
    for module_name, module in model.named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.requires_grad:
                qualified = f"{module_name}.{name}" if module_name else name
                yield (
                    qualified,
                    parameter,
                    qualified in head,
                    not (name == "bias" or isinstance(module, NORM_TYPES)),
                )


def split_parameters(model: nn.Module) -> ParameterSplit:
    """Trainable (``requires_grad``) parameters split into head/backbone x decay/no-decay."""
    split = ParameterSplit(head_decay=[], head_no_decay=[], backbone_decay=[], backbone_no_decay=[])
    for _, parameter, in_head, decay in _trainable(model):
        if in_head:
            (split.head_decay if decay else split.head_no_decay).append(parameter)
        else:
            (split.backbone_decay if decay else split.backbone_no_decay).append(parameter)
    return split


def param_groups(
    model: nn.Module,
    *,
    lr_head: float,
    lr_backbone: float,
    weight_decay: float,
    layer_decay: float = 1.0,
) -> list[dict[str, Any]]:
    """Optimizer param groups: head and backbone learning rates, no weight decay on biases and norms.

    Frozen parameters are left out, empty groups dropped; each group carries a ``name`` for logging, e.g.
    ``torch.optim.AdamW(param_groups(model, lr_head=1e-3, lr_backbone=1e-4, weight_decay=0.05))`` gives
    ``head``, ``head_no_decay``, ``backbone``, ``backbone_no_decay``. With ``layer_decay`` < 1 the backbone
    groups are per block instead, ``depth<d>`` and ``depth<d>_no_decay`` with lr ``lr_backbone *
    layer_decay**(L - d)`` for block depth d of L (:func:`pipeline.models.layers.layer_depths`), so a
    backbone factor and the layer decay multiply. Groups run from the head down to the stem.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    depths = layer_depths(model, head=classifier_name(model)) if layer_decay < 1.0 else None
    groups: dict[tuple[int, bool], dict[str, Any]] = {}  # (blocks below the head, no_decay) -> group
    for name, parameter, in_head, decay in _trainable(model):
        if in_head:
            label, distance, lr = "head", 0, lr_head
        elif depths is None:
            label, distance, lr = "backbone", 1, lr_backbone
        else:
            distance = depths.num_layers - depths.depth[name]
            label, lr = f"depth{depths.depth[name]}", lr_backbone * layer_decay**distance
        group = groups.setdefault(
            (distance, not decay),
            {
                "name": label if decay else f"{label}_no_decay",
                "params": [],
                "lr": lr,
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        group["params"].append(parameter)
    return [groups[key] for key in sorted(groups)]

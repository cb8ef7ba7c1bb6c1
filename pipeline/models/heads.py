"""Fine-tuning utilities: find and replace the classifier, freeze the backbone, build optimizer param groups.

The split is the same for every family: the **head** is the final ``nn.Linear`` (the last one registered in
the module tree: ``fc`` for ResNets and the CIFAR nets, ``classifier.1`` for MobileNetV2/EfficientNet,
``classifier.2`` for ConvNeXt); the **backbone** is every other parameter, ConvNeXt's pre-head LayerNorm
included. A frozen backbone has ``requires_grad=False``; its BatchNorm layers must also stay in eval mode or
their running statistics keep moving although no weight changes. ``model.train()`` switches them back to
train mode, so the training loop calls :func:`set_train_mode` instead (it is ``model.train()`` plus that fix,
and does nothing more when nothing is frozen).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

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


def split_parameters(model: nn.Module) -> ParameterSplit:
    """Trainable (``requires_grad``) parameters split into head/backbone x decay/no-decay."""
    head = _head_parameter_names(model)
    split = ParameterSplit(head_decay=[], head_no_decay=[], backbone_decay=[], backbone_no_decay=[])
    for module_name, module in model.named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad:
                continue
            in_head = (f"{module_name}.{name}" if module_name else name) in head
            decay = not (name == "bias" or isinstance(module, NORM_TYPES))
            if in_head:
                (split.head_decay if decay else split.head_no_decay).append(parameter)
            else:
                (split.backbone_decay if decay else split.backbone_no_decay).append(parameter)
    return split


def param_groups(
    model: nn.Module, *, lr_head: float, lr_backbone: float, weight_decay: float
) -> list[dict[str, Any]]:
    """Optimizer param groups: head and backbone learning rates, no weight decay on biases and norms.

    Frozen parameters are left out, empty groups dropped; each group carries a ``name`` for logging, e.g.
    ``torch.optim.AdamW(param_groups(model, lr_head=1e-3, lr_backbone=1e-4, weight_decay=0.05))``.
    """
    split = split_parameters(model)
    groups = [
        {"name": "head", "params": split.head_decay, "lr": lr_head, "weight_decay": weight_decay},
        {"name": "head_no_decay", "params": split.head_no_decay, "lr": lr_head, "weight_decay": 0.0},
        {"name": "backbone", "params": split.backbone_decay, "lr": lr_backbone, "weight_decay": weight_decay},
        {
            "name": "backbone_no_decay",
            "params": split.backbone_no_decay,
            "lr": lr_backbone,
            "weight_decay": 0.0,
        },
    ]
    return [group for group in groups if group["params"]]

"""The model registry: architectures by name, and the one entry point that builds them.

Every builder is registered with a :class:`ModelSpec` (family, default input resolution, the scaling keywords it
accepts). :func:`build_model` validates the request, calls the builder and stamps the built module with its
metadata, so code that only holds the module can read it:

- ``model.arch_name``: the registry name, plus any non-default scaling (``mobilenet_v2_width_mult0.5``); used
  as the MLflow ``arch`` tag and in the profiler's table.
- ``model.family``: one of :data:`Family` (selects the stage nodes of the feature extractor).
- ``model.default_resolution``: the square input side, in pixels, the architecture was designed for (what
  ``data.resolution`` should be set to when training at the native resolution).

:func:`model_info` gives the same metadata without building anything, e.g. to fill in a data config first.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

Family = Literal[
    "baseline", "cifar_plain", "cifar_resnet", "resnet", "mobilenet_v2", "efficientnet", "convnext"
]


class UnknownModelError(ValueError):
    """The requested architecture is not registered; the message lists close matches."""


@dataclass(frozen=True)
class ModelInfo:
    """What a built model carries (see the module docstring); returned by :func:`model_info`."""

    name: str
    """Registry name plus non-default scaling, e.g. ``efficientnet_compound_phi1_alpha1.2_beta1.1_gamma1.15``."""
    family: Family
    """Architecture family."""
    resolution: int
    """Expected square input side in pixels."""


@dataclass(frozen=True)
class ModelSpec:
    """A registered architecture."""

    name: str
    """Registry name, e.g. ``resnet50``."""
    family: Family
    """Architecture family."""
    resolution: int
    """Default input side in pixels (for scaled families, the side at the default scaling)."""
    builder: Callable[..., nn.Module]
    """``builder(num_classes=, dropout=, stochastic_depth=, **scaling) -> nn.Module``."""
    default_dropout: float
    """Dropout probability before the final linear layer when the caller passes ``dropout=None``."""
    published_num_classes: int = 1000
    """Classes of the dataset the architecture was published on (CIFAR-10: 10); the profiler's default."""
    scaling: Mapping[str, Any] = field(default_factory=dict)
    """Accepted scaling keywords and their defaults (e.g. ``{"width_mult": 1.0}``)."""
    stochastic_depth: float | None = None
    """Default final-block stochastic-depth probability (0: off); None for nets without residual branches."""
    describe: Callable[..., tuple[str, int]] | None = None
    """``describe(**scaling) -> (arch name, resolution)`` where scaling changes them (compound scaling)."""
    description: str = ""
    """One line for help texts and the docs."""

    def info(self, **scaling: Any) -> ModelInfo:
        values = self.resolve_scaling(scaling)
        if self.describe is not None:
            name, resolution = self.describe(**values)
            return ModelInfo(name=name, family=self.family, resolution=resolution)
        changed = [(key, value) for key, value in values.items() if value != self.scaling[key]]
        name = "_".join([self.name, *(f"{key}{_format(value)}" for key, value in changed)])
        return ModelInfo(name=name, family=self.family, resolution=self.resolution)

    def resolve_scaling(self, scaling: Mapping[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(scaling) - set(self.scaling))
        if unknown:
            accepted = ", ".join(sorted(self.scaling)) or "none"
            raise ValueError(
                f"{self.name}: unknown scaling keyword(s) {', '.join(unknown)}; accepted: {accepted}"
            )
        return {**self.scaling, **scaling}


def _format(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    assert spec.name not in _REGISTRY, f"model {spec.name} registered twice"
    _REGISTRY[spec.name] = spec
    return spec


def list_models(family: Family | None = None) -> list[str]:
    """Registered names (in registration order), optionally of one family."""
    return [name for name, spec in _REGISTRY.items() if family is None or spec.family == family]


def get_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(_REGISTRY)}"
        raise UnknownModelError(f"unknown model {name!r}; {hint}")
    return _REGISTRY[name]


def model_info(name: str, **scaling: Any) -> ModelInfo:
    """Name, family and expected resolution of ``name`` built with ``scaling``, without building it."""
    return get_spec(name).info(**scaling)


def build_model(
    name: str,
    *,
    num_classes: int,
    dropout: float | None = None,
    stochastic_depth: float | None = None,
    **scaling: Any,
) -> nn.Module:
    """Build a registered architecture with random weights.

    ``dropout`` is the probability of the Dropout layer placed directly before the final linear layer; None
    keeps the family's default (torchvision's 0.2-0.5 for MobileNetV2/EfficientNet, 0 elsewhere) and 0 means
    no Dropout module at all. ``stochastic_depth`` is the final block's probability of dropping its residual
    branch, earlier blocks' growing linearly with depth, for the residual families: EfficientNet and ConvNeXt
    (None: torchvision's default), the ResNets and MobileNetV2 (None: 0, no StochasticDepth module at all);
    the plain nets reject it. ``scaling`` holds the family's knobs (``width_mult``,
    ``phi``/``alpha``/``beta``/``gamma``, ``shortcut``).
    """
    spec = get_spec(name)
    if num_classes < 1:
        raise ValueError(f"{name}: num_classes must be >= 1, got {num_classes}")
    dropout = spec.default_dropout if dropout is None else dropout
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout}")
    if stochastic_depth is not None:
        if spec.stochastic_depth is None:
            raise ValueError(
                f"{name}: stochastic_depth must be None: the {spec.family} family has no residual branches "
                "to drop (no stochastic depth)"
            )
        if not 0.0 <= stochastic_depth < 1.0:
            raise ValueError(f"{name}: stochastic_depth must be in [0, 1), got {stochastic_depth}")
    else:
        stochastic_depth = spec.stochastic_depth
    info = spec.info(**scaling)
    kwargs = spec.resolve_scaling(scaling)
    if spec.stochastic_depth is not None:
        kwargs["stochastic_depth"] = stochastic_depth
    model = spec.builder(num_classes=num_classes, dropout=dropout, **kwargs)
    model.arch_name = info.name
    model.family = info.family
    model.default_resolution = info.resolution
    return model

"""A strict name -> builder registry, in the spirit of torchvision's register_model/get_model."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from qrun.errors import choice_error

ModelBuilder = Callable[..., nn.Module]
_BUILDERS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def decorator(builder: ModelBuilder) -> ModelBuilder:
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} is already registered")
        _BUILDERS[name] = builder
        return builder

    return decorator


def available_models() -> list[str]:
    return sorted(_BUILDERS)


def get_model(name: str, num_classes: int, in_channels: int, **options: Any) -> nn.Module:
    """Build a model; every builder takes the class count and input channels the dataset dictates."""
    if name not in _BUILDERS:
        raise choice_error("model", name, list(_BUILDERS))
    return _BUILDERS[name](num_classes=num_classes, in_channels=in_channels, **options)

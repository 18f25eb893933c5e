"""Model registry: ``build_model(name, num_classes, in_channels)``."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from longtail.core.errors import LongtailError
from longtail.models import resnet_cifar, torchvision_nets
from longtail.models.autotune import resolve_mode

_MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet32": lambda num_classes, in_channels=3, weights_path=None, kernels="auto": (
        resnet_cifar.resnet32(num_classes, in_channels, kernels)
    ),
    "resnet10": torchvision_nets.resnet10,
    "resnet50": torchvision_nets.resnet50,
    "resnet152": torchvision_nets.resnet152,
    "resnext50_32x4d": torchvision_nets.resnext50_32x4d,
}


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return sorted(_MODELS)


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    *,
    weights_path: str | None = None,
    kernels: str | None = None,
) -> nn.Module:
    """A backbone + linear classifier; ``model.features(x)`` gives ``(B, model.feature_dim)``.

    ``kernels`` (``auto`` | ``on`` | ``off``; ``None``: auto), overridden by
    ``$LONGTAIL_KERNELS``: when longtail's C kernels replace PyTorch's ops (ResNet-32 on CPU;
    other backbones have none). ``auto`` uses a kernel only where it was timed faster here.
    """
    mode = resolve_mode(kernels)
    if name not in _MODELS:
        raise LongtailError(f"unknown model {name!r}; known: {', '.join(available_models())}")
    if weights_path and name == "resnet32":
        raise LongtailError("weights_path is only supported for torchvision backbones")
    if name == "resnet32":
        return _MODELS[name](num_classes, in_channels, weights_path, mode)
    return _MODELS[name](num_classes, in_channels=in_channels, weights_path=weights_path)

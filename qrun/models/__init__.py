"""Model registry: `get_model(name, num_classes, in_channels)` builds any registered family member."""

from qrun.models.registry import available_models, get_model, register_model
from qrun.models import cnn, nin, resnet_cifar, resnet_imagenet  # noqa: F401  (register)

__all__ = ["available_models", "get_model", "register_model"]

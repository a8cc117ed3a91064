"""Backbones with the exact topology and numerics of their PyTorch originals (torchvision's ResNets and
MobileNetV2, the efficientnet-lite-pytorch package's EfficientNet-Lite): create_model(arch, ...) and feature_dim(arch).
"""
import flax.linen as nn
import jax.numpy as jnp

from kdep_jax.models import efficientnet
from kdep_jax.models.layers import BatchNorm
from kdep_jax.models.mobilenet_v2 import MobileNetV2, last_channel
from kdep_jax.models.resnet import ResNet

TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "mobilenet_v2")
ARCHS = TORCHVISION_ARCHS + efficientnet.ARCHS

_RESNET_STAGE_SIZES = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3)}
_BOTTLENECK_ARCHS = ("resnet50",)


def check_arch(arch: str) -> None:
    """Raises ValueError naming the known archs."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known archs: {', '.join(ARCHS)}")


def _resnet_base_width(width: float) -> int:
    return round(64 * width)


def create_model(arch: str, num_classes: int | None = 1000, dtype=jnp.float32, width: float = 1.0) -> nn.Module:
    """A Flax backbone; `model.apply(variables, nhwc_images, train=False)` returns (logits, features).

    width scales the channel counts (1.0 is the original architecture): ResNet's base width 64 * width,
    MobileNetV2's width_mult with torchvision's rounding, EfficientNet-Lite's width coefficient (its stem and
    head stay fixed). dtype is the computation dtype; parameters and BatchNorm statistics stay float32.
    """
    check_arch(arch)
    if arch in efficientnet.ARCHS:
        return efficientnet.create(arch, num_classes=num_classes, dtype=dtype, width=width)
    if arch == "mobilenet_v2":
        return MobileNetV2(num_classes=num_classes, width=width, dtype=dtype)
    return ResNet(stage_sizes=_RESNET_STAGE_SIZES[arch], bottleneck=arch in _BOTTLENECK_ARCHS,
                  num_classes=num_classes, base_width=_resnet_base_width(width), dtype=dtype)


def feature_dim(arch: str, width: float = 1.0) -> int:
    """Width of features["pre_relu"] and features["pooled"]: 512/512/2048/1280 at width 1; EfficientNet-Lite's
    head is 1280 wide at every width."""
    check_arch(arch)
    if arch in efficientnet.ARCHS:
        return efficientnet.HEAD_CHANNELS
    if arch == "mobilenet_v2":
        return last_channel(width)
    expansion = 4 if arch in _BOTTLENECK_ARCHS else 1
    return _resnet_base_width(width) * 8 * expansion


__all__ = ["ARCHS", "TORCHVISION_ARCHS", "BatchNorm", "MobileNetV2", "ResNet", "check_arch", "create_model",
           "feature_dim"]

"""Backbones with the exact topology and numerics of their PyTorch originals (torchvision's ResNets, MobileNetV2,
ViTs, Swins and ConvNeXts, and the efficientnet-lite-pytorch package's EfficientNet-Lite): create_model(arch, ...)
and feature_dim(arch).

Every backbone is called alike: `model.apply(variables, nhwc_images, train=False)` returns (logits, features);
logits is None when num_classes is None; logits and every feature are float32 whatever the compute dtype;
parameters (and BatchNorm statistics) are float32. `features` holds:

- "pre_relu" (B, D): the pooled feature KDEP distils, the last one before the head's nonlinearity, or the
  head's own input where none follows:
  ResNet: the last block's residual sum before its ReLU, average-pooled; MobileNetV2 and EfficientNet-Lite: the
  final 1x1 conv + BN before ReLU6, pooled (the ReLU would zero the negative half that the SVD alignment needs).
  ViT: the class token after the final LayerNorm (encoder.ln), the token its head classifies; Swin: the
  average over positions of the final norm's output; ConvNeXt: the average-pooled last stage after its final
  LayerNorm (classifier.0, a LayerNorm2d that torchvision applies to the pooled 1x1 map). No activation
  follows these three, so "pre_relu" equals "pooled": the normalised feature the head was trained on (before
  the final norm the feature carries a per-image offset and scale that the head never sees).
- "pooled" (B, D): the usual penultimate feature, what the classifier sees (after the ReLU / ReLU6 for the CNNs).
- "stage1".."stage4" (B, H_i, W_i, C_i): per-stage NHWC maps at strides 4, 8, 16, 32 (ViT: all four on its
  patch grid, 14x14 for ViT-B/16 at 224 px), for stage-wise methods:
  ResNet: outputs of layer1..layer4 (after their ReLU); MobileNetV2: outputs of features.3, .6, .13 and .18
  (the last blocks at strides 4, 8, 16, and the final 1x1 conv after ReLU6); ViT: the patch tokens (class
  token dropped) after blocks L/4, L/2 and 3L/4 (1-based: 3, 6, 9 of 12; 6, 12, 18 of 24), and stage4 after
  the final LayerNorm; Swin: outputs of features.1, .3, .5 and .7, stage4 after the final norm; ConvNeXt:
  outputs of features.1, .3, .5 and .7 (its final LayerNorm acts on the pooled vector, not on a map);
  EfficientNet-Lite: the last block at each stride (Lite0: _blocks.2, .4, .10, .15; the head is not a stage).
  So stage4 is always the last stage as the head's feature is taken from it (for the CNNs and Swin, "pooled"
  is its spatial average). Unused maps cost nothing under jit: XLA drops outputs the caller does not use.

width scales the CNNs' channels (EfficientNet-Lite: its width coefficient); the transformers and ConvNeXt take
width 1.0 only. Keyword overrides set
fields of the family's module (kdep_jax.models.vit.VisionTransformer, ...), e.g. `image_size=384` for a ViT,
or fewer layers and smaller dims for a small model of the same code.
"""
import flax.linen as nn
import jax.numpy as jnp

from kdep_jax.models import convnext, efficientnet, swin, vit
from kdep_jax.models.convnext import ConvNeXt
from kdep_jax.models.efficientnet import EfficientNetLite
from kdep_jax.models.layers import BatchNorm
from kdep_jax.models.mobilenet_v2 import MobileNetV2
from kdep_jax.models.naming import TorchNaming
from kdep_jax.models.resnet import ResNet
from kdep_jax.models.swin import SwinTransformer
from kdep_jax.models.vit import VisionTransformer

_RESNET_STAGE_SIZES = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3)}
_BOTTLENECK_ARCHS = ("resnet50",)
_FIXED_WIDTH_FAMILIES = ((VisionTransformer, vit.CONFIGS), (SwinTransformer, swin.CONFIGS),
                         (ConvNeXt, convnext.CONFIGS))

TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", *vit.CONFIGS, *swin.CONFIGS,
                     *convnext.CONFIGS)
ARCHS = (*TORCHVISION_ARCHS, *efficientnet.ARCHS)


def check_arch(arch: str) -> None:
    """Raises ValueError naming the known archs."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known archs: {', '.join(ARCHS)}")


def _resnet_base_width(width: float) -> int:
    return round(64 * width)


def _family_and_config(arch: str, width: float) -> tuple[type[nn.Module], dict]:
    if arch in _RESNET_STAGE_SIZES:
        return ResNet, dict(stage_sizes=_RESNET_STAGE_SIZES[arch], bottleneck=arch in _BOTTLENECK_ARCHS,
                            base_width=_resnet_base_width(width))
    if arch == "mobilenet_v2":
        return MobileNetV2, dict(width=width)
    if arch in efficientnet.VARIANTS:
        variant = efficientnet.VARIANTS[arch]
        return EfficientNetLite, dict(width=variant.width * width, depth=variant.depth,
                                      dropout_rate=variant.dropout_rate)
    if width != 1.0:
        raise ValueError(f"{arch} has no width multiplier (width {width} was asked for): use width=1.0, or a "
                         f"ResNet or MobileNetV2 for a narrower network")
    return next((family, configs[arch]) for family, configs in _FIXED_WIDTH_FAMILIES if arch in configs)


def create_model(arch: str, num_classes: int | None = 1000, dtype=jnp.float32, width: float = 1.0,
                 **overrides) -> nn.Module:
    """A Flax backbone; `model.apply(variables, nhwc_images, train=False)` returns (logits, features).

    width scales the channel counts (1.0 is the original architecture): ResNet's base width 64 * width,
    MobileNetV2's width_mult with torchvision's rounding, EfficientNet-Lite's width coefficient (its stem and head
    stay fixed); the other families take 1.0 only. dtype is the
    computation dtype; parameters and BatchNorm statistics stay float32. overrides: fields of the family's
    module, e.g. image_size for a ViT.
    """
    check_arch(arch)
    family, config = _family_and_config(arch, width)
    return family(**{**config, **overrides}, num_classes=num_classes, dtype=dtype)


def feature_dim(arch: str, width: float = 1.0, **overrides) -> int:
    """Width of features["pre_relu"] and features["pooled"]: 512/512/2048/1280 for the torchvision CNNs at width 1,
    768 for ViT-B and Swin-T/S and ConvNeXt-T/S, 1024 for ViT-L, Swin-B and ConvNeXt-B, 1280 for EfficientNet-Lite."""
    return create_model(arch, num_classes=None, width=width, **overrides).feature_dim


__all__ = ["ARCHS", "TORCHVISION_ARCHS", "BatchNorm", "ConvNeXt", "EfficientNetLite", "MobileNetV2", "ResNet",
           "SwinTransformer", "TorchNaming", "VisionTransformer", "check_arch", "create_model", "feature_dim"]

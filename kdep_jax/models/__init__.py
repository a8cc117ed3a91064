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
import dataclasses
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdep_jax.models import convnext, efficientnet, swin, vit
from kdep_jax.models.convnext import ConvNeXt
from kdep_jax.models.efficientnet import EfficientNetLite
from kdep_jax.models.layers import BatchNorm
from kdep_jax.models.mobilenet_v2 import MobileNetV2
from kdep_jax.models.naming import TorchNaming
from kdep_jax.models.preprocessing import Preprocessing
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
    """Raises ValueError naming the known archs; "package.module:Class" must import."""
    if is_custom(arch):
        _custom_class(arch)
    elif arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known archs: {', '.join(ARCHS)}, or your own Flax module as "
                         f"'package.module:ClassName'")


def is_custom(arch: str) -> bool:
    """A user's own architecture, named by its import path: "my_package.my_module:MyNet"."""
    return ":" in arch


def _custom_class(arch: str) -> type[nn.Module]:
    module_name, _, class_name = arch.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"arch {arch!r}: cannot import {module_name} ({error}); the module must be importable from "
                         f"where you run (the working directory is on the path), e.g. examples.custom_student:TinyNet"
                         ) from None
    family = getattr(module, class_name, None)
    if not (isinstance(family, type) and issubclass(family, nn.Module)):
        raise ValueError(f"arch {arch!r}: {module_name} has no Flax module {class_name!r} (a flax.linen.Module "
                         f"subclass)")
    return family


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
    stay fixed); the other families take 1.0 only. dtype is the computation dtype; parameters and BatchNorm
    statistics stay float32. overrides: fields of the family's module, e.g. image_size for a ViT.

    A user's own module ("package.module:Class") is built as Class(num_classes=..., dtype=..., **overrides), and
    width=... when it has a width field; it must return (logits, features) as the built-ins do (check_outputs).
    """
    check_arch(arch)
    if is_custom(arch):
        family = _custom_class(arch)
        fields = {field.name for field in dataclasses.fields(family)}
        if width != 1.0 and "width" not in fields:
            raise ValueError(f"arch {arch!r} has no width field (width {width} was asked for): use width=1.0")
        return family(num_classes=num_classes, dtype=dtype, **({"width": width} if "width" in fields else {}),
                      **overrides)
    family, config = _family_and_config(arch, width)
    return family(**{**config, **overrides}, num_classes=num_classes, dtype=dtype)


def feature_dim(arch: str, width: float = 1.0, **overrides) -> int:
    """Width of features["pre_relu"] and features["pooled"]: 512/512/2048/1280 for the torchvision CNNs at width 1,
    768 for ViT-B and Swin-T/S and ConvNeXt-T/S, 1024 for ViT-L, Swin-B and ConvNeXt-B, 1280 for EfficientNet-Lite.
    A user's module says it with a `feature_dim` property, or is traced once on a 64 px image."""
    model = create_model(arch, num_classes=None, width=width, **overrides)
    if hasattr(model, "feature_dim"):
        return model.feature_dim
    return check_outputs(model)


def check_outputs(model: nn.Module, image_size: int = 64) -> int:
    """Traces the model once (no compute) and checks that it returns (logits, features) with the features every
    method reads; returns the width of features["pre_relu"]. Raises ValueError saying what is missing."""
    images = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
    try:
        outputs = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0], images)
    except Exception as error:  # noqa: BLE001 - any failure of a user's module at init is reported as such
        raise ValueError(f"{type(model).__name__} fails on a batch of {image_size} px images with train=False "
                         f"({type(error).__name__}: {error})") from None
    if not (isinstance(outputs, tuple) and len(outputs) == 2 and isinstance(outputs[1], dict)):
        raise ValueError(f"{type(model).__name__} must return (logits, features), features a dict; it returned "
                         f"{type(outputs).__name__}")
    features = outputs[1]
    missing = [name for name in ("pre_relu", "pooled") if name not in features]
    if missing:
        raise ValueError(f"{type(model).__name__} returns no features[{missing[0]!r}]: return the pooled (B, D) "
                         f"feature as features['pre_relu'] (the one KDEP distils) and features['pooled'] (what the "
                         f"classifier sees); see kdep_jax.models' docstring")
    if features["pre_relu"].ndim != 2:
        raise ValueError(f"{type(model).__name__}'s features['pre_relu'] has shape {features['pre_relu'].shape}; "
                         f"it must be pooled, (batch, D)")
    return int(features["pre_relu"].shape[-1])


def from_config(section, num_classes: int | None = None, dtype=jnp.float32) -> nn.Module:
    """The backbone a config section names (config.teacher, config.student, config.model): its arch, width and
    overrides (fields of the family's module, e.g. a smaller ViT)."""
    return create_model(section.arch, num_classes=num_classes, dtype=dtype, width=section.width,
                        **section.overrides.to_dict())


def dim_from_config(section) -> int:
    """feature_dim of the backbone a config section names."""
    return feature_dim(section.arch, section.width, **section.overrides.to_dict())


__all__ = ["ARCHS", "TORCHVISION_ARCHS", "BatchNorm", "ConvNeXt", "EfficientNetLite", "MobileNetV2", "Preprocessing",
           "ResNet", "SwinTransformer", "TorchNaming", "VisionTransformer", "check_arch", "check_outputs",
           "create_model", "dim_from_config", "feature_dim", "from_config", "is_custom"]

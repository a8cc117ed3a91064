"""How a model family's Flax variables are named and laid out in its PyTorch state_dict.

Every backbone class carries a `torch_naming` (a TorchNaming): the rules `kdep_jax.convert` applies to
convert its variables to and from a state_dict. The convert module holds the generic machinery (key and
shape checks, error messages, files); a family only says how one variable is spelled and laid out in torch.
The defaults here are the torchvision CNNs' rules; a family with other names (ViT's `encoder_layer_0`,
EfficientNet's `_blocks.0._depthwise_conv`) passes its own `torch_key`, and so on.
"""
import dataclasses
from collections.abc import Callable

import numpy as np

# Flax (collection, leaf name) -> torch name of the standard layers' variables. Any other leaf (class_token,
# in_proj_weight, relative_position_bias_table, layer_scale) is a parameter that carries its torch name and is
# stored in torch's layout, so that it converts as it is.
TORCH_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def torch_leaf(collection: str, leaf: str) -> str:
    """A variable's torch name: weight for a kernel or a norm's scale, running_mean for a BatchNorm mean, ..."""
    return TORCH_LEAF_NAMES.get((collection, leaf), leaf)


def flattened_torch_key(collection: str, path: tuple[str, ...]) -> str:
    """Module names are torch module paths with "." written as "_": `layer1_0/downsample_0/kernel` is
    `layer1.0.downsample.0.weight`. The rule of the torchvision CNNs, Swin and ConvNeXt."""
    *modules, leaf = path
    return ".".join([*(module.replace("_", ".") for module in modules), torch_leaf(collection, leaf)])


def kernel_to_torch(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
    """Conv kernels HWIO -> OIHW (a depthwise (kh, kw, 1, C) kernel becomes torch's (C, 1, kh, kw)), Dense
    kernels (in, out) -> (out, in); every other variable is already in torch's layout."""
    if path[-1] != "kernel":
        return array
    if array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    if array.ndim == 2:
        return array.T
    return array


def kernel_to_flax(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
    """The inverse of kernel_to_torch."""
    if path[-1] != "kernel":
        return array
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 2:
        return array.T
    return array


def batchnorm_buffers(key: str, array: np.ndarray) -> dict[str, np.ndarray]:
    """torch's BatchNorm also saves num_batches_tracked, after running_var; it is written as 0 (unused in eval)."""
    if key.endswith(".running_var"):
        return {key.removesuffix("running_var") + "num_batches_tracked": np.zeros((), np.int64)}
    return {}


def same_key(key: str) -> str:
    return key


@dataclasses.dataclass(frozen=True)
class TorchNaming:
    """One family's rules; kdep_jax.convert applies them (see its docstring).

    head: the torch module of the classifier ("fc", "heads.head"), whose rows give the number of classes.
    torch_key: (collection, Flax path without the collection) -> torch key.
    to_torch / to_flax: (Flax path, array) -> the array in the other framework's layout.
    buffers: (torch key, torch-layout array) -> state_dict entries that are not Flax variables, written right
        after that key on export (so that `load_state_dict(strict=True)` works) and ignored on import.
    current_key: renames a key of an older checkpoint to today's name on import (ViT's mlp.linear_1 -> mlp.0).
    """
    head: str
    torch_key: Callable[[str, tuple[str, ...]], str] = flattened_torch_key
    to_torch: Callable[[tuple[str, ...], np.ndarray], np.ndarray] = kernel_to_torch
    to_flax: Callable[[tuple[str, ...], np.ndarray], np.ndarray] = kernel_to_flax
    buffers: Callable[[str, np.ndarray], dict[str, np.ndarray]] = batchnorm_buffers
    current_key: Callable[[str], str] = same_key

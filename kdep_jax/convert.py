"""Checkpoint conversion between torchvision state_dicts and this project's Flax variables, both ways.

Flax module paths mirror torchvision keys with "." written as "_" (`layer1_0/downsample_0/kernel` is
`layer1.0.downsample.0.weight`), so the mapping is mechanical: conv kernels HWIO <-> OIHW (a depthwise
(kh, kw, 1, C) kernel is torch's (C, 1, kh, kw) under the same transpose), linear kernels transposed,
BatchNorm scale/bias/mean/var <-> weight/bias/running_mean/running_var. Families whose PyTorch names do not
follow that rule (EfficientNet-Lite's `_blocks.0._bn1`) name their keys with a function of their own.

CLI:
  python -m kdep_jax.convert import --arch resnet50 --input resnet50.pth --output DIR
  python -m kdep_jax.convert export --arch resnet18 --input DIR --output student.pth
  python -m kdep_jax.convert import --arch efficientnet_lite0 --input efficientnet-lite0-57934424.pth --output DIR

A converted directory holds `variables.msgpack` (flax.serialization) and `meta.json` (arch, num_classes,
sha256 of the msgpack bytes, source). torch is imported only where .pth files are read or written.
"""
import argparse
import functools
import hashlib
import json
import sys
import uuid

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import serialization, traverse_util

from kdep_jax.errors import UserError
from kdep_jax.models import ARCHS, create_model, efficientnet
from kdep_jax.models.layers import TORCH_LEAF_NAMES

VARIABLES_FILE = "variables.msgpack"
META_FILE = "meta.json"
STUDENT_SUBDIR = "student"  # where the distillation trainer puts the converted student inside its workdir

# (collection, Flax path) -> torch key, for the families whose names are not torchvision's "." written as "_".
_FAMILY_TORCH_KEY = {arch: efficientnet.torch_key for arch in efficientnet.ARCHS}
_HEAD = {"resnet18": "fc", "resnet34": "fc", "resnet50": "fc", "mobilenet_v2": "classifier.1",
         **{arch: "_fc" for arch in efficientnet.ARCHS}}
_LAST_BN = {"resnet18": "layer4.1.bn2", "resnet34": "layer4.2.bn2", "resnet50": "layer4.2.bn3",
            "mobilenet_v2": "features.18.1", **{arch: "_bn1" for arch in efficientnet.ARCHS}}
_INSTALL_TORCH = "pip install torch torchvision (or pip install kdep_jax[convert])"


class ConversionError(UserError):
    """Bad input to a conversion (file, checkpoint or arch); the message says what is wrong and what to do."""


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ConversionError(f"unknown arch {arch!r}; known archs: {', '.join(ARCHS)}")


def _torch_key(collection: str, path: tuple[str, ...], arch: str) -> str:
    if arch in _FAMILY_TORCH_KEY:
        return _FAMILY_TORCH_KEY[arch](collection, path)
    *modules, leaf = path
    return ".".join(module.replace("_", ".") for module in modules) + "." + TORCH_LEAF_NAMES[(collection, leaf)]


def _to_torch_layout(array: np.ndarray) -> np.ndarray:
    if array.ndim == 4:  # HWIO -> OIHW
        return array.transpose(3, 2, 0, 1)
    if array.ndim == 2:  # (in, out) -> (out, in)
        return array.T
    return array


def _to_flax_layout(array: np.ndarray) -> np.ndarray:
    if array.ndim == 4:  # OIHW -> HWIO
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 2:
        return array.T
    return array


@functools.cache
def _expected_layout(arch: str, num_classes: int | None, width: float = 1.0) -> dict[str, tuple]:
    """torch key -> (flat Flax key, torch-layout shape), in the PyTorch state_dict's order; from shapes alone.

    The order is the order in which layers are called, which for these models is the PyTorch module order.
    """
    model = create_model(arch, num_classes=num_classes, width=width)
    call_order = {}

    def record_call(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            call_order.setdefault(context.module.path, len(call_order))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record_call):
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    leaves = traverse_util.flatten_dict(shapes)
    leaf_order = list(TORCH_LEAF_NAMES)
    layout = {}
    for flat_key in sorted(leaves, key=lambda k: (call_order[k[1:-1]], leaf_order.index((k[0], k[-1])))):
        torch_shape = _to_torch_layout(np.empty(leaves[flat_key].shape, dtype=np.uint8)).shape
        layout[_torch_key(flat_key[0], flat_key[1:], arch)] = (flat_key, torch_shape)
    return layout


def _mismatch(arrays: dict[str, np.ndarray], layout: dict[str, tuple]) -> str | None:
    """Describes the first missing, unexpected and mis-shaped keys, or returns None when all match."""
    problems = []
    missing = [key for key in layout if key not in arrays]
    unexpected = [key for key in arrays if key not in layout]
    if missing:
        problems.append(f"{len(missing)} missing key(s), first {missing[0]!r} (expected shape {layout[missing[0]][1]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), first {unexpected[0]!r} "
                        f"(shape {tuple(arrays[unexpected[0]].shape)})")
    for key, (_, shape) in layout.items():
        if key in arrays and tuple(arrays[key].shape) != shape:
            problems.append(f"key {key!r} has shape {tuple(arrays[key].shape)}, expected {shape}")
            break
    return "; ".join(problems) or None


def _num_classes(arrays: dict[str, np.ndarray], arch: str) -> int | None:
    head = arrays.get(_HEAD[arch] + ".weight")
    return None if head is None else int(head.shape[0])


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; bfloat16/float16 go through float32, numpy lacks bfloat16
        value = value.detach().cpu()
        value = value.float() if value.is_floating_point() else value
        value = value.numpy()
    return np.asarray(value)


def from_torchvision(state_dict, arch: str, width: float = 1.0) -> dict:
    """torchvision state_dict (torch tensors or numpy arrays) -> Flax {"params", "batch_stats"} (numpy float32).

    For EfficientNet-Lite the state_dict is the efficientnet-lite-pytorch package's (`_blocks.0._bn1.weight`).
    num_batches_tracked is ignored. A state_dict without the head (fc / classifier.1) gives variables without
    a head, for create_model(arch, num_classes=None). Raises ConversionError naming the first missing,
    unexpected or mis-shaped key, and the arch the checkpoint looks like when it matches another one.
    """
    _check_arch(arch)
    arrays = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        if not (hasattr(value, "shape") and hasattr(value, "dtype")):
            raise ConversionError(f"not a state_dict: the value of key {key!r} is a {type(value).__name__}, "
                                  f"not a tensor")
        arrays[key] = _to_numpy(value)
    num_classes = _num_classes(arrays, arch)
    problem = _mismatch(arrays, _expected_layout(arch, num_classes, width))
    if problem:
        # The first arch that matches: checking one costs a trace of its model.
        matching = next((other for other in ARCHS if other != arch
                         and not _mismatch(arrays, _expected_layout(other, _num_classes(arrays, other)))), None)
        article = "an" if matching and matching[0] in "aeiou" else "a"
        hint = f" It looks like {article} {matching} checkpoint: pass --arch {matching}." if matching else ""
        raise ConversionError(f"the checkpoint is not a {arch} (width {width}) state_dict: {problem}.{hint}")
    flat = {}
    for key, (flat_key, _) in _expected_layout(arch, num_classes, width).items():
        # A copy: a torch model in train mode updates its buffers in place.
        flat[flat_key] = np.array(_to_flax_layout(arrays[key]), dtype=np.float32)
    return traverse_util.unflatten_dict(flat)


def to_torchvision(variables, arch: str) -> dict[str, np.ndarray]:
    """Flax variables -> state_dict of numpy arrays with torchvision's key names, num_batches_tracked included.

    `torchvision.models.<arch>().load_state_dict({k: torch.from_numpy(v) ...}, strict=True)` accepts it at
    width 1, as does the efficientnet-lite-pytorch package's model for EfficientNet-Lite. Variables without a head
    (a student built with num_classes=None) get a zero-filled 1000-class head (fc / classifier.1 / _fc), so that
    the strict load works; it outputs zeros and is meant to be replaced.
    """
    _check_arch(arch)
    state_dict = {}
    collections = {name: variables.get(name, {}) for name in ("params", "batch_stats")}
    for (collection, *path), value in traverse_util.flatten_dict(collections).items():
        if (collection, path[-1]) not in TORCH_LEAF_NAMES:
            raise ConversionError(f"unexpected Flax variable {'/'.join([collection, *path])} for {arch}")
        state_dict[_torch_key(collection, tuple(path), arch)] = np.array(_to_torch_layout(np.asarray(value)),
                                                                         dtype=np.float32, order="C")
    head = _HEAD[arch]
    if head + ".weight" not in state_dict:
        in_features = state_dict[_LAST_BN[arch] + ".weight"].shape[0]
        state_dict[head + ".weight"] = np.zeros((1000, in_features), np.float32)
        state_dict[head + ".bias"] = np.zeros((1000,), np.float32)
    expected = _expected_layout(arch, 1000)  # key names do not depend on width or the number of classes
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    if missing or unexpected:
        first = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise ConversionError(f"the variables are not a {arch}: {len(missing)} missing and {len(unexpected)} "
                              f"unexpected key(s), first {first}")
    ordered = {}
    for key in expected:  # torchvision's order, num_batches_tracked after each running_var
        ordered[key] = state_dict[key]
        if key.endswith(".running_var"):
            ordered[key.removesuffix("running_var") + "num_batches_tracked"] = np.zeros((), np.int64)
    return ordered


def _head_classes(variables, arch: str) -> int | None:
    _, *head_kernel_path = _expected_layout(arch, 1000)[_HEAD[arch] + ".weight"][0]
    head_kernel = traverse_util.flatten_dict(variables["params"]).get(tuple(head_kernel_path))
    return None if head_kernel is None else int(head_kernel.shape[-1])


def _atomic_write(path: epath.Path, write) -> None:
    """Calls write(temporary sibling path), then renames it to path; removes the temporary on failure."""
    temporary = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write(temporary)
        temporary.rename(path)
    except BaseException:
        if temporary.is_dir():
            temporary.rmtree()
        elif temporary.exists():
            temporary.unlink()
        raise


def save_converted(directory, variables, arch: str, source: str | None = None) -> dict:
    """Writes variables.msgpack + meta.json into directory atomically (a temporary sibling, then a rename).

    Returns the meta. An existing converted directory is replaced (the old one is removed only once the new
    one is in place); any other existing, non-empty path is left alone (ConversionError).
    """
    _check_arch(arch)
    directory = epath.Path(directory)
    if directory.exists() and not (directory / META_FILE).exists() and (
            not directory.is_dir() or any(directory.iterdir())):
        raise ConversionError(f"{directory} exists and is not a converted checkpoint directory; "
                              f"remove it or choose another output")
    payload = serialization.to_bytes({name: jax.tree.map(np.asarray, variables[name])
                                      for name in ("params", "batch_stats")})
    meta = {"arch": arch, "num_classes": _head_classes(variables, arch),
            "sha256": hashlib.sha256(payload).hexdigest(), "source": source}

    previous = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex}"

    def write(temporary: epath.Path) -> None:
        temporary.mkdir(parents=True)
        (temporary / VARIABLES_FILE).write_bytes(payload)
        (temporary / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if directory.exists():  # moved aside only once the new directory is complete
            directory.rename(previous)

    try:
        _atomic_write(directory, write)
    except BaseException:
        if previous.exists() and not directory.exists():
            previous.rename(directory)
        raise
    if previous.exists():
        previous.rmtree()
    return meta


def load_converted(directory, arch: str | None = None) -> tuple[dict, dict]:
    """Reads a save_converted directory -> (variables, meta), checking the content hash and, if given, the arch."""
    directory = epath.Path(directory)
    if not (directory / META_FILE).exists() or not (directory / VARIABLES_FILE).exists():
        raise ConversionError(f"{directory} is not a converted checkpoint directory "
                              f"(expected {META_FILE} and {VARIABLES_FILE}); create one with "
                              f"`python -m kdep_jax.convert import`")
    meta = json.loads((directory / META_FILE).read_text())
    payload = (directory / VARIABLES_FILE).read_bytes()
    digest = hashlib.sha256(payload).hexdigest()
    if digest != meta.get("sha256"):
        raise ConversionError(f"{directory / VARIABLES_FILE} is corrupted: its sha256 is {digest}, "
                              f"{META_FILE} records {meta.get('sha256')}; convert the checkpoint again")
    if arch is not None and meta.get("arch") != arch:
        raise ConversionError(f"{directory} holds a {meta.get('arch')} checkpoint, but arch {arch} was asked for")
    return serialization.msgpack_restore(payload), meta


def _import_torch():
    try:
        import torch
    except ImportError as error:
        raise ConversionError(f"reading and writing .pth files needs PyTorch ({error}): {_INSTALL_TORCH}") from None
    return torch


def _unwrap_state_dict(checkpoint, path) -> dict:
    """Accepts a plain state_dict or one under "state_dict" / "model", with optional "module." prefixes."""
    while isinstance(checkpoint, dict):
        inner = next((checkpoint[key] for key in ("state_dict", "model") if isinstance(checkpoint.get(key), dict)),
                     None)
        if inner is None:
            break
        checkpoint = inner
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ConversionError(f"{path} does not hold a state_dict (found a {type(checkpoint).__name__})")
    return {key.removeprefix("module."): value for key, value in checkpoint.items()}


def read_state_dict(path) -> dict:
    """Reads a .pth/.pt state_dict (torch) or a .safetensors file (no torch needed)."""
    path = epath.Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load

        try:
            return load(path.read_bytes())
        except Exception as error:  # noqa: BLE001 - any failure to parse means "not a checkpoint"
            raise ConversionError(f"{path} is not a safetensors checkpoint ({error})") from None
    torch = _import_torch()
    try:
        with path.open("rb") as file:
            checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch.load raises many types for a file it cannot read
        raise ConversionError(f"{path} is not a PyTorch checkpoint that torch.load(weights_only=True) can read "
                              f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
    return _unwrap_state_dict(checkpoint, path)


def write_state_dict(state_dict: dict[str, np.ndarray], path) -> None:
    """Writes .safetensors (no torch needed) or, for any other name, a torch.save'd state_dict; atomically."""
    path = epath.Path(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import save

        payload = save(state_dict)
        _atomic_write(path, lambda temporary: temporary.write_bytes(payload))
        return
    torch = _import_torch()
    tensors = {key: torch.from_numpy(value) for key, value in state_dict.items()}

    def write(temporary: epath.Path) -> None:
        with temporary.open("wb") as file:
            torch.save(tensors, file)

    _atomic_write(path, write)


def find_converted(path) -> epath.Path:
    """A converted directory, or a workdir holding one in `student/`."""
    path = epath.Path(path)
    for candidate in (path, path / STUDENT_SUBDIR):
        if (candidate / META_FILE).exists():
            return candidate
    raise ConversionError(f"no converted checkpoint in {path}: expected {path / META_FILE} or "
                          f"{path / STUDENT_SUBDIR / META_FILE}")


def import_checkpoint(arch: str, input_path, output_dir) -> dict:
    """torchvision .pth/.safetensors -> converted directory; returns its meta."""
    _check_arch(arch)
    state_dict = read_state_dict(input_path)
    try:
        variables = from_torchvision(state_dict, arch)
    except ConversionError as error:
        raise ConversionError(f"{input_path}: {error}") from None
    return save_converted(output_dir, variables, arch, source=str(input_path))


def export_checkpoint(arch: str, input_path, output_path) -> epath.Path:
    """Converted directory (or workdir with `student/`) -> torchvision .pth or .safetensors; returns its path."""
    _check_arch(arch)
    variables, _ = load_converted(find_converted(input_path), arch)
    state_dict = to_torchvision(variables, arch)
    write_state_dict(state_dict, output_path)
    return epath.Path(output_path)


def main(argv=None) -> int:
    """CLI entry point; returns the exit code (2 for bad input, with a one-paragraph message)."""
    parser = argparse.ArgumentParser(prog="python -m kdep_jax.convert", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    import_parser = commands.add_parser("import", help="torchvision .pth/.safetensors -> converted Flax directory")
    export_parser = commands.add_parser("export", help="converted Flax directory -> torchvision .pth/.safetensors")
    for command in (import_parser, export_parser):
        command.add_argument("--arch", required=True, help=f"one of {', '.join(ARCHS)}")
        command.add_argument("--input", required=True)
        command.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            meta = import_checkpoint(args.arch, args.input, args.output)
            print(f"wrote {args.output} ({meta['arch']}, num_classes={meta['num_classes']}, "
                  f"sha256 {meta['sha256'][:12]})")
        else:
            output = export_checkpoint(args.arch, args.input, args.output)
            print(f"wrote {output} (PyTorch {args.arch} state_dict)")
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

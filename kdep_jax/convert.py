"""Checkpoint conversion between torchvision state_dicts and this project's Flax variables, both ways.

The machinery here is generic; each model family says how its variables are spelled and laid out in torch
with a `kdep_jax.models.naming.TorchNaming`, set as the class attribute `torch_naming` of its Flax module:

  torch_key(collection, flax_path) -> torch key    e.g. ("params", ("layer1_0", "conv1", "kernel")) ->
                                                   "layer1.0.conv1.weight"
  to_torch(flax_path, array) / to_flax(...)        per-variable layout changes (default: conv kernels
                                                   HWIO <-> OIHW, a depthwise (kh, kw, 1, C) kernel being torch's
                                                   (C, 1, kh, kw) under the same transpose; Dense kernels
                                                   transposed; anything else as it is)
  buffers(torch_key, torch_array) -> {key: array}  entries that are not variables, written after that key on
                                                   export and ignored on import (BatchNorm's num_batches_tracked,
                                                   Swin's relative_position_index)
  current_key(key) -> key                          renames older checkpoints' keys on import (ViT's mlp.linear_1)
  head                                             the classifier's torch module ("fc", "heads.head")

The CNNs, Swin and ConvNeXt use the default torch_key (module names are torch paths with "." written as "_",
BatchNorm scale/bias/mean/var are weight/bias/running_mean/running_var); ViT spells out its own. A new family
(EfficientNet-Lite's `_blocks.0._depthwise_conv.weight`) sets `torch_naming = TorchNaming(head="_fc",
torch_key=its_function)` on its module and adds its archs to kdep_jax.models; from_torchvision,
to_torchvision and the CLI then work for it. Names and shapes are checked against the model itself
(`jax.eval_shape` of its init on 32 px images, or on its `image_size` when it has one), so a naming mistake
shows as a missing or unexpected key, never a silent swap. Exporting variables without a head writes a zero
head whose input width is the length of the variable just before it (each family here ends in a norm).

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
from kdep_jax.models import ARCHS, check_arch, create_model
from kdep_jax.models.naming import TorchNaming

VARIABLES_FILE = "variables.msgpack"
META_FILE = "meta.json"
STUDENT_SUBDIR = "student"  # where the distillation trainer puts the converted student inside its workdir

# torch saves a module's own parameters weight first, then bias, then BatchNorm's running statistics.
_LEAF_ORDER = ("weight", "bias", "running_mean", "running_var")
_INSTALL_TORCH = "pip install torch torchvision (or pip install kdep_jax[convert])"


class ConversionError(UserError):
    """Bad input to a conversion (file, checkpoint or arch); the message says what is wrong and what to do."""


def _check_arch(arch: str) -> None:
    try:
        check_arch(arch)
    except ValueError as error:
        raise ConversionError(str(error)) from None


def _naming(model: nn.Module) -> TorchNaming:
    naming = getattr(model, "torch_naming", None)
    if not isinstance(naming, TorchNaming):
        raise ConversionError(f"{type(model).__name__} has no torch_naming, so it cannot be converted to or from "
                              f"a PyTorch state_dict: give the class a kdep_jax.models.TorchNaming (see "
                              f"kdep_jax.convert)")
    return naming


def _leaf_rank(torch_key: str) -> int:
    name = torch_key.rsplit(".", 1)[-1]
    return next((rank for rank, suffix in enumerate(_LEAF_ORDER) if name.endswith(suffix)), len(_LEAF_ORDER))


@functools.cache
def _expected_layout(model: nn.Module) -> dict[str, tuple]:
    """torch key -> (flat Flax key, torch-layout shape) of model's variables, from shapes alone.

    In the order the model calls its layers, each module's own variables first (weight before bias): that is
    torchvision's state_dict order for every family here except Swin, whose PatchMerging torch lists reduction
    before norm (the order matters to no loader).
    """
    naming = _naming(model)
    call_order = {}

    def record_call(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            call_order.setdefault(context.module.path, len(call_order))
        return next_fun(*args, **kwargs)

    size = getattr(model, "image_size", 32)  # a ViT takes only the size it is built for; the others any
    with nn.intercept_methods(record_call):
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    leaves = traverse_util.flatten_dict(shapes)
    torch_keys = {flat_key: naming.torch_key(flat_key[0], flat_key[1:]) for flat_key in leaves}
    if len(set(torch_keys.values())) != len(torch_keys):
        raise ValueError(f"the torch_naming of {type(model).__name__} gives two variables the same torch key")
    layout = {}
    for flat_key in sorted(leaves, key=lambda k: (call_order[k[1:-1]], _leaf_rank(torch_keys[k]))):
        torch_shape = naming.to_torch(flat_key[1:], np.empty(leaves[flat_key].shape, dtype=np.uint8)).shape
        layout[torch_keys[flat_key]] = (flat_key, torch_shape)
    return layout


@functools.cache
def _buffer_keys(model: nn.Module) -> frozenset[str]:
    """The state_dict keys of model that are not variables (written on export, ignored on import)."""
    naming = _naming(model)
    return frozenset(buffer for key, (_, shape) in _expected_layout(model).items()
                     for buffer in naming.buffers(key, np.broadcast_to(np.float32(0), shape)))


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


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; bfloat16/float16 go through float32, numpy lacks bfloat16
        value = value.detach().cpu()
        value = value.float() if value.is_floating_point() else value
        value = value.numpy()
    return np.asarray(value)


def _numpy_state_dict(state_dict) -> dict[str, np.ndarray]:
    arrays = {}
    for key, value in state_dict.items():
        if not (hasattr(value, "shape") and hasattr(value, "dtype")):
            raise ConversionError(f"not a state_dict: the value of key {key!r} is a {type(value).__name__}, "
                                  f"not a tensor")
        arrays[key] = _to_numpy(value)
    return arrays


def _model_variables(arrays: dict[str, np.ndarray], model: nn.Module) -> tuple[dict[str, np.ndarray], str | None]:
    """(the checkpoint's variables under today's names, buffers dropped; what does not fit model, or None)."""
    naming, buffers = _naming(model), _buffer_keys(model)
    current = {naming.current_key(key): value for key, value in arrays.items()}
    current = {key: value for key, value in current.items() if key not in buffers}
    return current, _mismatch(current, _expected_layout(model))


def _to_flax(arrays: dict[str, np.ndarray], model: nn.Module) -> dict:
    """{"params", "batch_stats"}, batch_stats empty for a family without BatchNorm (so every backbone's
    variables have the same two collections)."""
    naming = _naming(model)
    # Copies: a torch model in train mode updates its buffers in place, which must not reach the variables.
    flat = {flat_key: np.array(naming.to_flax(flat_key[1:], arrays[key]), dtype=np.float32)
            for key, (flat_key, _) in _expected_layout(model).items()}
    return {"params": {}, "batch_stats": {}, **traverse_util.unflatten_dict(flat)}


def from_torch_state_dict(state_dict, model: nn.Module) -> dict:
    """A state_dict (torch tensors or numpy arrays) -> the Flax {"params", "batch_stats"} of model, any module
    with a torch_naming (e.g. a smaller configuration of a family); from_torchvision does it for a named arch."""
    arrays, problem = _model_variables(_numpy_state_dict(state_dict), model)
    if problem:
        raise ConversionError(f"the checkpoint does not fit this {type(model).__name__}: {problem}")
    return _to_flax(arrays, model)


def _arch_model(arrays: dict[str, np.ndarray], arch: str, width: float = 1.0) -> nn.Module:
    """arch's model with the checkpoint's number of classes (None when it has no head)."""
    try:
        head = _naming(create_model(arch, num_classes=None, width=width)).head + ".weight"
    except ValueError as error:  # a width the family does not have
        raise ConversionError(str(error)) from None
    num_classes = int(arrays[head].shape[0]) if head in arrays else None
    return create_model(arch, num_classes=num_classes, width=width)


def _matching_arch(arrays: dict[str, np.ndarray], arch: str) -> str | None:
    """Another arch at width 1 that the checkpoint fits, for the error message, or None.

    Each try traces a model, so only the archs whose head the checkpoint holds are tried (all when it holds none).
    """
    heads = {other: _naming(create_model(other, num_classes=None)).head + ".weight" for other in ARCHS}
    candidates = [other for other in ARCHS if heads[other] in arrays] or ARCHS
    return next((other for other in candidates
                 if other != arch and not _model_variables(arrays, _arch_model(arrays, other))[1]), None)


def from_torchvision(state_dict, arch: str, width: float = 1.0) -> dict:
    """torchvision state_dict (torch tensors or numpy arrays) -> Flax {"params", "batch_stats"} (numpy float32).

    Buffers (num_batches_tracked, Swin's relative_position_index) are ignored; older key names are accepted
    (ViT's mlp.linear_1/2). A state_dict without the head (fc, classifier.1, heads.head, ...) gives variables
    without a head, for create_model(arch, num_classes=None). A ViT is expected at its 224 px position embedding.
    Raises ConversionError naming the first missing, unexpected or mis-shaped key, and the arch the checkpoint
    looks like when it matches another one.
    """
    _check_arch(arch)
    arrays = _numpy_state_dict(state_dict)
    model = _arch_model(arrays, arch, width)
    current, problem = _model_variables(arrays, model)
    if problem:
        matching = _matching_arch(arrays, arch)
        article = "an" if matching and matching[0] in "aeiou" else "a"
        hint = f" It looks like {article} {matching} checkpoint: pass --arch {matching}." if matching else ""
        raise ConversionError(f"the checkpoint is not a {arch} (width {width}) state_dict: {problem}.{hint}")
    return _to_flax(current, model)


def _torch_state_dict(variables, model: nn.Module) -> tuple[dict[str, np.ndarray], str | None]:
    """(state_dict of variables in model's names and order, buffers included; what does not match, or None)."""
    naming, layout = _naming(model), _expected_layout(model)
    state_dict = {}
    collections = {name: variables.get(name, {}) for name in ("params", "batch_stats")}
    for (collection, *path), value in traverse_util.flatten_dict(collections).items():
        state_dict[naming.torch_key(collection, tuple(path))] = np.array(
            naming.to_torch(tuple(path), np.asarray(value)), dtype=np.float32, order="C")
    head = naming.head + ".weight"
    if head in layout and head not in state_dict:
        # Every family's head follows its final norm, whose length is the head's input width.
        keys = list(layout)
        in_features = state_dict[keys[keys.index(head) - 1]].shape[0]
        state_dict[head] = np.zeros((layout[head][1][0], in_features), np.float32)
        state_dict[naming.head + ".bias"] = np.zeros((layout[head][1][0],), np.float32)
    missing = [key for key in layout if key not in state_dict]
    unexpected = [key for key in state_dict if key not in layout]
    if missing or unexpected:
        first = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        return {}, f"{len(missing)} missing and {len(unexpected)} unexpected key(s), first {first}"
    ordered = {}
    for key in layout:
        ordered[key] = state_dict[key]
        ordered.update(naming.buffers(key, state_dict[key]))
    return ordered, None


def to_torch_state_dict(variables, model: nn.Module) -> dict[str, np.ndarray]:
    """Flax variables of model (any module with a torch_naming) -> its state_dict of numpy arrays, buffers
    included. Names are checked against model, shapes are not (the same names serve every width). Variables
    without a head get a zero-filled head of model.num_classes rows."""
    state_dict, problem = _torch_state_dict(variables, model)
    if problem:
        raise ConversionError(f"the variables are not this {type(model).__name__}'s: {problem}")
    return state_dict


def to_torchvision(variables, arch: str) -> dict[str, np.ndarray]:
    """Flax variables -> state_dict of numpy arrays with torchvision's key names, buffers included
    (num_batches_tracked as 0, Swin's relative_position_index).

    `torchvision.models.<arch>().load_state_dict({k: torch.from_numpy(v) ...}, strict=True)` accepts it at
    width 1. Variables without a head (a student built with num_classes=None) get a zero-filled 1000-class
    head, so that the strict load works; it outputs zeros and is meant to be replaced.
    """
    _check_arch(arch)
    state_dict, problem = _torch_state_dict(variables, create_model(arch, 1000))  # names do not depend on width
    if problem:
        raise ConversionError(f"the variables are not a {arch}: {problem}")
    return state_dict


def _head_classes(variables, arch: str) -> int | None:
    """The classifier's width, or None for a headless network. A family without a torch_naming (a user's own
    module): the parameters the headless module lacks are its classifier, and their last axis its width."""
    model = create_model(arch)
    naming = getattr(model, "torch_naming", None)
    if isinstance(naming, TorchNaming):
        for (collection, *path), value in traverse_util.flatten_dict(dict(variables)).items():
            if naming.torch_key(collection, tuple(path)) == naming.head + ".weight":
                return int(naming.to_torch(tuple(path), np.asarray(value)).shape[0])
        return None
    headless = set(traverse_util.flatten_dict(dict(_expected_variables(create_model(arch, num_classes=None)))))
    head = [value for key, value in traverse_util.flatten_dict(dict(variables)).items() if key not in headless]
    return int(np.shape(head[0])[-1]) if head else None


def _expected_variables(model: nn.Module) -> dict:
    image_size = getattr(model, "image_size", 32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                          jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))


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

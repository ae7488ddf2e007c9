"""Sparse deltas as files: save the ΔW of a model's ``SparseDeltaLinear`` modules, add it to (or subtract it from)
any model's weights.

    fastft.save_sparse_delta(model, "task.safetensors")         # indices + effective values + shapes
    fastft.apply_sparse_delta(plain_model, "lang.safetensors")   # W[idx] += v   (in place)
    fastft.apply_sparse_delta(plain_model, "task.safetensors")   # deltas compose by addition
    fastft.revert_sparse_delta(plain_model, "task.safetensors")  # W[idx] -= v

File format (safetensors, no pickle): for each module ``<name>`` (its qualified name in the model, e.g.
``model.layers.0.self_attn.q_proj``), ``<name>.delta_indices`` (int64 [k], flat row-major positions of the
out×in weight, sorted, unique), ``<name>.delta_values`` ([k], the *effective* values: after any value
transform such as Diff Pruning's gates, i.e. exactly what merging adds) and ``<name>.shape`` (int64 [2], the
weight's (out, in)); the metadata holds ``format = fastft-sparse-delta`` and the fastft version. A
transformers ``Conv1D`` (in×out storage) is addressed through its out×in view, as everywhere in fastft.

Applying is transactional: every module is looked up and every tensor checked (names, shapes, index range
and order, finite values) before any weight changes. The target may be a plain model or a patched one: a
fastft module's frozen base weight (``base_layer``, followed down) receives the delta, so a language delta
can be applied under a task delta being trained. A bitsandbytes 4-bit weight cannot take an exact delta and
is refused. Arithmetic: ``w + scale·v`` in float32 (float64 for float64 weights), rounded once to the
weight's dtype, so ``revert`` after ``apply`` restores a float32 weight up to that one rounding (exactly
for values the dtype represents exactly); two deltas applied in sequence equal their sum to the same
rounding.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ._version import __version__
from .bnb import is_linear4bit
from .distributed import full_tensor, is_writer, unwrap
from .nn.sparse_delta import SparseDeltaLinear
from .ops.sparse_delta_linear import check_indices
from .targets import is_conv1d, out_in_weight

FORMAT = "fastft-sparse-delta"
_FIELDS = ("delta_indices", "delta_values", "shape")


def sparse_delta_state(model: nn.Module) -> dict[str, Tensor]:
    """The tensors :func:`save_sparse_delta` writes: per ``SparseDeltaLinear`` of ``model``, its indices, its
    effective values and its base's (out, in) shape, on the CPU."""
    model = unwrap(model)
    tensors: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, SparseDeltaLinear):
            with torch.no_grad():
                values = module.effective_values().detach()
            tensors[f"{name}.delta_indices"] = full_tensor(module.delta_indices).cpu().contiguous()
            tensors[f"{name}.delta_values"] = full_tensor(values).cpu().contiguous()
            tensors[f"{name}.shape"] = torch.tensor(module.shape, dtype=torch.int64)
    if not tensors:
        raise ValueError("fastft.save_sparse_delta: the model holds no SparseDeltaLinear module (nothing to save).")
    return tensors


def save_sparse_delta(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the sparse deltas of ``model``'s ``SparseDeltaLinear`` modules to the safetensors file ``path``
    (see the module docstring). Under torch.distributed only rank 0 writes."""
    tensors = sparse_delta_state(model)
    if not is_writer():
        return
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, metadata={"format": FORMAT, "fastft_version": __version__})


def read_sparse_delta(path: str | os.PathLike) -> dict[str, dict[str, Tensor]]:
    """``{module name: {"delta_indices", "delta_values", "shape"}}`` from a file :func:`save_sparse_delta`
    wrote, each module's tensors checked (a ``ValueError`` names the file, the module and the problem)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"fastft sparse delta: {path} does not exist (or is not a file).")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises without the file name
        raise ValueError(f"fastft sparse delta: cannot read {path} as safetensors ({type(err).__name__}: {err}).") from err
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"fastft sparse delta: {path} is not a sparse-delta file (metadata format={metadata.get('format')!r}); "
            "write it with fastft.save_sparse_delta."
        )
    modules: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        name, _, field = key.rpartition(".")
        if field not in _FIELDS:
            raise ValueError(f"fastft sparse delta: {path} holds an unknown tensor {key!r}")
        modules.setdefault(name, {})[field] = value
    for name, entry in modules.items():
        missing = [f for f in _FIELDS if f not in entry]
        if missing:
            raise ValueError(f"fastft sparse delta: module {name!r} in {path} lacks {missing}")
        shape = entry["shape"]
        if shape.dtype != torch.int64 or tuple(shape.shape) != (2,):
            raise ValueError(f"fastft sparse delta: module {name!r} in {path}: shape must be int64 [2]")
        out_in = (int(shape[0]), int(shape[1]))
        check_indices(entry["delta_indices"], out_in, what=f"fastft sparse delta {path}: module {name!r}")
        values = entry["delta_values"]
        if not values.is_floating_point() or tuple(values.shape) != tuple(entry["delta_indices"].shape):
            raise ValueError(f"fastft sparse delta: module {name!r} in {path}: delta_values must be float, one per index")
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"fastft sparse delta: module {name!r} in {path} holds NaN or inf values")
    return modules


def _target_weight(model: nn.Module, name: str, shape: tuple[int, int], path: str) -> Tensor:
    """The out×in weight (a view for Conv1D) of module ``name`` that receives the delta."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"fastft sparse delta: {path} holds a delta for module {name!r}, which this model has not; it was "
            "saved from another architecture."
        ) from None
    while getattr(module, "base_layer", None) is not None and not isinstance(module, (nn.Linear,)):
        module = module.base_layer  # a fastft module: its frozen base takes the delta
    if is_linear4bit(module):
        raise ValueError(
            f"fastft sparse delta: module {name!r} is a bitsandbytes 4-bit layer, whose weight cannot take an exact "
            "delta; apply the delta to the unquantized model, then quantize it."
        )
    if not (isinstance(module, nn.Linear) or is_conv1d(module)) or not module.weight.is_floating_point():
        raise ValueError(f"fastft sparse delta: module {name!r} is a {type(module).__name__}, not a float linear layer")
    weight = out_in_weight(module)
    if tuple(weight.shape) != shape:
        raise ValueError(
            f"fastft sparse delta: module {name!r} has a {tuple(weight.shape)} weight but the delta in {path} is for "
            f"{shape}; it was saved from another model size."
        )
    return weight


def _add(model: nn.Module, path: str | os.PathLike, scale: float, what: str) -> list[str]:
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not torch.isfinite(torch.tensor(float(scale))):
        raise ValueError(f"fastft.{what}: scale must be a finite number, got {scale!r}")
    path = os.fspath(path)
    modules = read_sparse_delta(path)
    model = unwrap(model)
    targets = {name: _target_weight(model, name, tuple(int(s) for s in e["shape"]), path) for name, e in modules.items()}
    with torch.no_grad():  # every check passed: now write
        for name, entry in modules.items():
            weight = targets[name]
            in_features = weight.shape[1]
            idx = entry["delta_indices"].to(weight.device)
            rows = torch.div(idx, in_features, rounding_mode="floor")
            cols = idx - rows * in_features
            compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
            current = weight[rows, cols].to(compute)
            weight[rows, cols] = (current + float(scale) * entry["delta_values"].to(weight.device, compute)).to(weight.dtype)
    return sorted(modules)


def apply_sparse_delta(model: nn.Module, path: str | os.PathLike, scale: float = 1.0) -> list[str]:
    """Add the sparse delta in ``path`` (times ``scale``) to ``model``'s weights in place; returns the module
    names changed. Deltas compose by addition: applying two in sequence adds their sum."""
    return _add(model, path, scale, "apply_sparse_delta")


def revert_sparse_delta(model: nn.Module, path: str | os.PathLike, scale: float = 1.0) -> list[str]:
    """Subtract the sparse delta in ``path`` (times ``scale``) from ``model``'s weights: undoes
    :func:`apply_sparse_delta` with the same ``scale`` (up to one rounding per entry, see the module docstring)."""
    return _add(model, path, -scale, "revert_sparse_delta")


def sparse_delta_state_dict(base_state: dict[str, Tensor], path: str | os.PathLike,
                            scale: float = 1.0, model: Optional[nn.Module] = None) -> dict[str, Tensor]:
    """A new state dict: ``base_state`` with the delta in ``path`` added (for :func:`fastft.merge`). Each module's
    weight is ``<name>.weight`` (out×in, or in×out for a ``Conv1D`` of ``model``, when given)."""
    path = os.fspath(path)
    modules = read_sparse_delta(path)
    out = dict(base_state)
    for name, entry in modules.items():
        key = f"{name}.weight"
        if key not in base_state:
            raise ValueError(f"fastft.merge: the sparse delta {path} is for {key!r}, which the base has not")
        transposed = model is not None and is_conv1d(unwrap(model).get_submodule(name))
        weight = base_state[key]
        view = weight.t() if transposed else weight
        shape = tuple(int(s) for s in entry["shape"])
        if tuple(view.shape) != shape:
            raise ValueError(f"fastft.merge: {key!r} is {tuple(view.shape)}, the sparse delta {path} is for {shape}")
        compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
        dense = view.to(compute).clone(memory_format=torch.contiguous_format)
        dense.view(-1).index_add_(0, entry["delta_indices"].to(dense.device),
                                  float(scale) * entry["delta_values"].to(dense.device, compute))
        out[key] = (dense.t() if transposed else dense).to(weight.dtype).contiguous()
    return out

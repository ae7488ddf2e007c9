"""``fastft.save`` / ``fastft.load``: adapter weights (safetensors) and the configs (JSON), nothing else.

A saved directory holds ``fastft_adapter.safetensors`` (keys ``<qualified module name>.<tensor name>``)
and ``fastft_config.json`` (the configs, the patched module names per method, the fastft version).
``load`` onto a plain model patches it with the saved configs first; onto a patched model it checks
that the same modules are patched and copies the weights in.

Under torch.distributed (see :mod:`fastft.distributed`): ``save`` gathers FSDP2-sharded adapters to their
full values (every rank must call it then) and only rank 0 writes; ``load`` onto a sharded model copies
each rank's shard; a DDP wrapper is looked through.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import config_from_dict
from .distributed import full_tensor, is_writer
from ._version import __version__
from .patch import build_report, patch, patch_state, unpatch

WEIGHTS_NAME = "fastft_adapter.safetensors"
CONFIG_NAME = "fastft_config.json"


def _require_state(model: nn.Module, what: str):
    state = patch_state(model)
    if state is None:
        raise ValueError(f"fastft.{what}: this model is not patched by fastft; call fastft.patch(model, config) first.")
    return state


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors :func:`save` writes (keys ``<qualified module name>.<tensor name>``), whole and on
    the CPU. FSDP2-sharded adapters are gathered: under FSDP2 every rank must call this (an all-gather)."""
    state = _require_state(model, "adapter_state_dict")
    tensors = {}
    for plan in state.plans:
        for name, module in plan.swaps:
            for key, value in module.adapter_state_dict().items():
                tensors[f"{name}.{key}"] = full_tensor(value.detach()).contiguous().cpu()
        for edit in plan.edits:  # e.g. modules trained in full: "<module>.<parameter>" -> value
            for key, value in edit.adapter_tensors().items():
                tensors[key] = full_tensor(value.detach()).contiguous().cpu()
    return tensors


def save(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write the adapter weights and configs of a patched model to ``directory`` (created if needed).

    Under torch.distributed only rank 0 writes; with FSDP2-sharded adapters every rank must call it (the
    adapters are gathered first). Other ranks return without waiting for the write: put a
    ``torch.distributed.barrier()`` after it before they read the directory.
    """
    state = _require_state(model, "save")
    tensors = adapter_state_dict(model)
    modules: dict[str, list[str]] = {}
    for plan in state.plans:
        modules.setdefault(plan.config.method, []).extend(name for name, _ in plan.swaps)
    if not is_writer():
        return
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME))
    meta = {"fastft_version": __version__, "configs": [c.to_dict() for c in state.configs], "modules": modules}
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=2)


def _saved_before_modules_to_save(config: dict) -> dict:
    """A LoRA config saved before ``modules_to_save`` existed trained no module in full: keep it so."""
    if config.get("method") == "lora" and "modules_to_save" not in config:
        return {**config, "modules_to_save": []}
    return config


# ------------------------------------------------------------------------------------------ reading files
def read_json(path: str, what: str) -> dict:
    """The JSON object in ``path``; a ``ValueError`` naming the file when it is not one."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{what}: {path} is not valid JSON ({err}); the file is corrupted or not the one written by "
            "fastft.save / PEFT's save_pretrained. Write it again."
        ) from err
    if not isinstance(data, dict):
        raise ValueError(f"{what}: {path} holds a JSON {type(data).__name__}, not an object; write it again.")
    return data


def read_safetensors(path: str, what: str) -> dict[str, Tensor]:
    """The tensors of the safetensors file ``path`` (on the CPU). fastft reads adapters from safetensors
    only, never a pickle; a file that is not readable is a ``ValueError`` naming it."""
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises SafetensorError / OSError with no file name
        raise ValueError(
            f"{what}: cannot read {path} as safetensors ({type(err).__name__}: {err}). The file is truncated or "
            "corrupted (e.g. an interrupted copy or a Git LFS pointer); write or download it again."
        ) from err


def check_adapter_tensors(
    expected: dict[str, Tensor], found: dict[str, Tensor], path: str, what: str, hint: str = ""
) -> None:
    """Check ``found`` (read from ``path``) against ``expected`` (key -> the tensor it will be copied into):
    the same keys, shapes, kinds of dtype, and finite values. Raises ``ValueError`` naming the file, the
    module, the tensor, both values and the likely cause; changes nothing."""
    unknown = sorted(set(found) - set(expected))
    missing = sorted(set(expected) - set(found))
    if unknown:
        raise ValueError(
            f"{what}: {path} holds {len(unknown)} tensor(s) for which this model has no place: {unknown[:8]}"
            f"{' ...' if len(unknown) > 8 else ''}. {hint}".rstrip()
        )
    if missing:
        raise ValueError(
            f"{what}: {path} lacks {len(missing)} tensor(s) this patched model needs: {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}. {hint}".rstrip()
        )
    for key, target in expected.items():
        value = found[key]
        module, _, tensor_name = key.rpartition(".")
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"{what}: module {module!r}, tensor {tensor_name!r}: {path} holds shape {tuple(value.shape)} but "
                f"this model needs {tuple(target.shape)}. The adapter was most likely trained on another base model "
                "(a different size or architecture) or with another rank; load it onto the model it was trained on."
            )
        if target.is_floating_point() != value.is_floating_point():
            raise ValueError(
                f"{what}: module {module!r}, tensor {tensor_name!r}: {path} holds {value.dtype}, this model needs "
                f"{target.dtype}; the file was not written for this model. Write it again."
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(
                f"{what}: module {module!r}, tensor {tensor_name!r} in {path} holds NaN or inf (the training "
                "diverged, or the file is corrupted); it would make every output NaN. Use an earlier checkpoint."
            )


def adapter_targets(model: nn.Module) -> dict[str, Tensor]:
    """``key -> tensor`` of what :func:`load` writes into (the keys of :func:`adapter_state_dict`, the model's
    own tensors, local shards included: no communication)."""
    state = _require_state(model, "load")
    targets = {}
    for plan in state.plans:
        for name, module in plan.swaps:
            for key, value in module.adapter_state_dict().items():
                targets[f"{name}.{key}"] = value
        for edit in plan.edits:
            for key, value in getattr(edit, "adapter_tensors", dict)().items():
                targets[key] = value
    return targets


def touched_tensors(model: nn.Module) -> list[Tensor]:
    """Every tensor a load into the patched ``model`` may write: the adapter modules' own parameters and
    buffers, a PiSSA module's base weight (it holds the residual), and the edits' trainable tensors."""
    state = _require_state(model, "load")
    seen: dict[int, Tensor] = {}
    for plan in state.plans:
        for _, module in plan.swaps:
            for key, value in [*module.named_parameters(), *module.named_buffers()]:
                if not key.startswith("base_layer."):
                    seen[id(value)] = value
            if getattr(module, "holds_residual", False):
                weight = module.base_layer.weight
                seen[id(weight)] = weight
        for edit in plan.edits:
            for value in getattr(edit, "adapter_parameters", list)():
                seen[id(value)] = value
    return list(seen.values())


class Snapshot:
    """Copies of tensors (on their own device) to put back, bit for bit, when a multi-module write fails."""

    def __init__(self, tensors: list[Tensor]):
        with torch.no_grad():
            self.saved = [(t, t.detach().clone()) for t in tensors]

    def restore(self) -> None:
        with torch.no_grad():
            for tensor, value in self.saved:
                tensor.copy_(value)


def load(model: nn.Module, directory: str | os.PathLike):
    """Load what :func:`save` wrote; patches a plain model first. Returns the :class:`PatchReport`.

    Transactional: the files are read and every tensor checked (names, shapes, finite values) before any
    weight is written; on any failure the model is left as it was and the cause is raised.
    """
    directory = os.fspath(directory)
    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"fastft.load: {path} is missing; is {directory!r} a fastft.save directory?")
    meta = read_json(config_path, "fastft.load")
    for key, kind in (("configs", list), ("modules", dict)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(
                f"fastft.load: {config_path} has no {key!r} {kind.__name__} (it holds keys {sorted(meta)}); it was "
                "not written by fastft.save, or was edited. Write it again with fastft.save."
            )
    try:
        configs = [config_from_dict(_saved_before_modules_to_save(c)) for c in meta["configs"]]
    except (TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"fastft.load: {config_path} holds a config fastft cannot use: {err}") from err
    tensors = read_safetensors(weights_path, "fastft.load")
    state = patch_state(model)
    patched_here = state is None
    if not patched_here and [c.to_dict() for c in state.configs] != [c.to_dict() for c in configs]:
        raise ValueError(
            f"fastft.load: the model is patched with {state.configs} but {directory!r} holds {configs}; "
            "unpatch it first (fastft.unpatch) or load onto the plain model."
        )
    if patched_here:
        patch(model, configs)
        state = patch_state(model)
    snapshot = None
    try:
        for plan in state.plans:
            saved = meta["modules"].get(plan.config.method, [])
            names = [name for name, _ in plan.swaps]
            if names != saved:
                missing, extra = sorted(set(saved) - set(names)), sorted(set(names) - set(saved))
                raise ValueError(
                    f"fastft.load: the {plan.config.method} adapter in {directory!r} covers different modules than "
                    f"this model (saved but absent here: {missing[:5]}; here but not saved: {extra[:5]}); it was "
                    "saved from another model. Load it onto the model it was trained on."
                )
        check_adapter_tensors(
            adapter_targets(model), tensors, weights_path, "fastft.load",
            hint="The file does not match its fastft_config.json or this model; write it again with fastft.save.",
        )
        per_module = defaultdict(dict)
        for key, value in tensors.items():
            name, _, tensor_name = key.rpartition(".")
            per_module[name][tensor_name] = value
        if not patched_here:
            snapshot = Snapshot(touched_tensors(model))
        for plan in state.plans:
            for name, module in plan.swaps:
                param = next(module.parameters())
                module.load_adapter_state_dict({k: v.to(param.device) for k, v in per_module[name].items()})
            for edit in plan.edits:
                edit.load_adapter_tensors(tensors)
    except Exception:
        if patched_here:
            unpatch(model, merge=False)
        elif snapshot is not None:
            snapshot.restore()
        raise
    return build_report(model)

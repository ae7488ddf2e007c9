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


def load(model: nn.Module, directory: str | os.PathLike):
    """Load what :func:`save` wrote; patches a plain model first. Returns the :class:`PatchReport`."""
    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"fastft.load: {path} is missing; is {directory!r} a fastft.save directory?")
    with open(config_path) as f:
        meta = json.load(f)
    configs = [config_from_dict(_saved_before_modules_to_save(c)) for c in meta["configs"]]
    patched_here = patch_state(model) is None
    if patched_here:
        patch(model, configs)
    state = patch_state(model)
    try:
        if [c.to_dict() for c in state.configs] != [c.to_dict() for c in configs]:
            raise ValueError(
                f"fastft.load: the model is patched with {state.configs} but {directory!r} holds {configs}; "
                "unpatch it first or load onto the plain model."
            )
        tensors = load_file(weights_path)
        per_module = defaultdict(dict)
        for key, value in tensors.items():
            name, _, tensor_name = key.rpartition(".")
            per_module[name][tensor_name] = value
        for plan in state.plans:
            saved = meta["modules"].get(plan.config.method, [])
            names = [name for name, _ in plan.swaps]
            if names != saved:
                missing, extra = sorted(set(saved) - set(names)), sorted(set(names) - set(saved))
                raise ValueError(
                    f"fastft.load: the saved {plan.config.method} adapter covers different modules than this model "
                    f"(saved but absent here: {missing[:5]}; here but not saved: {extra[:5]})."
                )
            for name, module in plan.swaps:
                param = next(module.parameters())
                module.load_adapter_state_dict({k: v.to(param.device) for k, v in per_module[name].items()})
            for edit in plan.edits:
                edit.load_adapter_tensors(tensors)
    except Exception:
        if patched_here:
            unpatch(model, merge=False)
        raise
    return build_report(model)

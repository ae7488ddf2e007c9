"""fastft under torch.distributed: DDP and FSDP2 (``torch.distributed.fsdp.fully_shard``), launched with
torchrun or accelerate. fastft brings no engine of its own; these helpers let its functions work on the
modules those engines hand back.

The order that works, on every rank (SPMD):

    model = AutoModelForCausalLM.from_pretrained(...)   # the same weights on every rank
    torch.manual_seed(seed)                             # the same seed on every rank: adapters start equal
    fastft.patch(model, config)                         # patch the plain model ...
    model = DDP(model)  /  fully_shard(...)             # ... then wrap or shard it (or accelerator.prepare)
    ...train...
    fastft.save(model, dir)                             # every rank calls it; rank 0 writes

* DDP: ``fastft.save``, ``fastft.export_peft``, ``fastft.unpatch`` and the report look through the
  ``DistributedDataParallel`` wrapper (``model.module``).
* FSDP2: every parameter, the frozen base and the adapters alike, becomes a ``DTensor`` sharded on dim 0
  between steps; inside a forward FSDP2 has gathered them into plain tensors, so fastft's ops only ever see
  plain tensors. Buffers are not sharded (DoRA's cached row norms ``weight_sq_norm`` stay whole on every
  rank). ``fastft.save`` / ``fastft.export_peft`` / :func:`fastft.adapter_state_dict` gather each adapter
  tensor to its full value (an all-gather: call them on every rank); ``fastft.load`` onto a sharded model
  copies each rank's shard of the saved tensors into place.
* Refused with an error that says what to do: patching a model that is already wrapped (DDP) or sharded
  (its new adapters would never be synchronised), and unpatching a sharded model.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return None
    return DTensor


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter FSDP2 has sharded)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole value of ``tensor``: gathered from every rank for a ``DTensor`` (a collective: every rank of
    its mesh must call it), ``tensor`` itself otherwise."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def copy_full_(param: Tensor, value: Tensor) -> None:
    """``param.copy_(value)`` where ``value`` is the full tensor; for a sharded ``param`` each rank copies
    its own shard of ``value`` (no communication: every rank must hold the same ``value``)."""
    if not is_sharded(param):
        param.copy_(value)
        return
    from torch.distributed.tensor import distribute_tensor

    shard = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements,
                              src_data_rank=None)
    param.copy_(shard)


def _wrapper_types() -> tuple[type, ...]:
    types: tuple[type, ...] = (nn.DataParallel,)
    try:
        from torch.nn.parallel import DistributedDataParallel

        types += (DistributedDataParallel,)
    except ImportError:
        pass
    return types


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``DistributedDataParallel`` / ``DataParallel`` wrappers (``model.module``); the model
    itself otherwise (an FSDP2 model is sharded in place, not wrapped)."""
    wrappers = _wrapper_types()
    while isinstance(model, wrappers):
        model = model.module
    return model


def _fsdp_modules(model: nn.Module) -> list[str]:
    names = []
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        FSDPModule = ()  # noqa: N806
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule) or type(module).__name__ == "FullyShardedDataParallel":
            names.append(name or "<the model>")
    return names


def refuse_distributed(model: nn.Module, what: str) -> None:
    """Raise if ``model`` is wrapped by DDP or sharded by FSDP (fastft.patch must come first)."""
    wrappers = _wrapper_types()
    wrapped = [(name or "<the model>", type(m).__name__) for name, m in model.named_modules() if isinstance(m, wrappers)]
    if wrapped:
        raise ValueError(
            f"fastft.{what}: this model is wrapped in {wrapped[0][1]} ({wrapped[0][0]}); DDP synchronises only the "
            "parameters it saw when it was built, so adapters added now would drift apart between ranks. Patch the "
            "plain model first, then wrap it: fastft.patch(model, config); model = DDP(model) "
            "(or accelerator.prepare(model))."
        )
    sharded = _fsdp_modules(model) or [n for n, p in model.named_parameters() if is_sharded(p)]
    if sharded:
        raise ValueError(
            f"fastft.{what}: this model is sharded by FSDP ({sharded[:3]}); fastft must see the whole weights. "
            "Patch the plain model first, then shard it: fastft.patch(model, config); fully_shard(...) "
            "(or accelerator.prepare(model))."
        )


def is_fsdp_managed(module: nn.Module) -> bool:
    """Whether FSDP manages ``module``'s parameters (``fully_shard`` on it or on a module above it; torch marks
    each managed module with ``_is_fsdp_managed_module``)."""
    return bool(getattr(module, "_is_fsdp_managed_module", False))


def refuse_sharded_unpatch(model: nn.Module) -> None:
    """``fastft.unpatch`` cannot rewrite FSDP-sharded layers: say what to do instead."""
    sharded = _fsdp_modules(model) or [n for n, p in model.named_parameters() if is_sharded(p)]
    if sharded:
        raise ValueError(
            f"fastft.unpatch: this model is sharded by FSDP ({sharded[:3]}); its modules cannot be swapped back. "
            "Save the adapters on every rank with fastft.save(model, dir), then on rank 0 load them onto a plain "
            "copy of the base model (fastft.load(plain_model, dir)) and call fastft.unpatch(plain_model, merge=True)."
        )


def rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def is_writer() -> bool:
    """Whether this process writes files: rank 0, or the only process."""
    return rank() == 0

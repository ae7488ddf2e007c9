"""Chain of LoRA (COLA): every N steps, merge the low-rank adapters into the base weights and start fresh ones.

COLA (Xia et al., 2024) trains a chain of LoRA updates, ``W_final = W + Δ₁ + Δ₂ + …``: after each link the
update is folded into the frozen weight and a new adapter starts from its initialisation, so the chain
reaches updates of higher rank than one adapter can hold, at LoRA's memory cost.

:func:`merge_and_restart` does one link boundary on a ``fastft.patch``-ed model:

* each ``LoRALinear`` / ``DoRALinear`` folds its update into its base weight (DoRA:
  ``W ← m ⊙ (W + s·BA) / ‖W + s·BA‖``; under QAT the weight that is fake-quantized, ``W + s·BA``) and
  re-initialises its adapter as at patch time (A by ``init``'s rule, B zero; DoRA's magnitude to the new row
  norms; PiSSA from the SVD of the merged weight). The model computes the same function right before and
  right after (up to the rounding of the merge);
* the new adapters are the SAME ``nn.Parameter`` objects, re-initialised in place, so an optimizer (and an
  LR scheduler) built over them keeps working; their optimizer state is dropped
  (``optimizer.state.pop(p)``) and their ``.grad`` cleared, so the next step starts them as fresh
  parameters: AdamW's moments at zero and its step count (bias correction) at 0. This is right for every
  optimizer that creates a parameter's state lazily on its first step — all of ``torch.optim`` and
  bitsandbytes' 8-bit optimizers. Param groups and learning rates are untouched: the schedule goes on.
* the re-initialisation draws from a generator seeded with ``seed`` (``torch.random.fork_rng``), so every
  process of a data-parallel run draws the same adapters and the training RNG stream is not disturbed.

Refused, before anything changes: a model not patched by fastft, one with no LoRA/DoRA adapter, and any
adapter over a bitsandbytes 4-bit base (the merge would re-quantize the weight at every link, changing the
function each time). S²FT slices and QAT's own trained weights live in the weights already: they are left
as they are (and keep their optimizer state).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..nn.lora import LoRALinear
from ..patch import patch_state


def chain_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """The (name, module) pairs COLA restarts; raises a clear error when COLA cannot run on ``model``."""
    state = patch_state(model)
    if state is None:
        raise ValueError(
            "Chain of LoRA (COLA) needs a model patched by fastft with LoRA or DoRA adapters: call "
            "fastft.patch(model, fastft.LoRAConfig(...)) first."
        )
    modules = [(name, m) for name, m in state.modules() if isinstance(m, LoRALinear)]
    if not modules:
        methods = sorted({c.method for c in state.configs})
        raise ValueError(
            f"Chain of LoRA (COLA) merges LoRA/DoRA adapters into the base weights; this model is patched with "
            f"{methods} only, which hold no low-rank adapter to merge. Add a fastft.LoRAConfig, or drop COLA."
        )
    four_bit = [name for name, m in modules if m.is_4bit]
    if four_bit:
        raise ValueError(
            f"Chain of LoRA (COLA) would merge into 4-bit bases ({four_bit[:3]}{'...' if len(four_bit) > 3 else ''}): "
            "each merge dequantizes, adds and re-quantizes the weight, which rounds it to 4 bits again, so the "
            "model's function would change at every link and the error would accumulate. Run COLA on a float "
            "(or float16/bfloat16) base, or train QLoRA without COLA."
        )
    return modules


def _devices(modules: list[tuple[str, LoRALinear]]) -> list[int]:
    return sorted({p.device.index or 0 for _, m in modules for p in m.adapter_parameters().values() if p.device.type == "cuda"})


def merge_and_restart(model: nn.Module, optimizer: Any = None, seed: int = 0) -> list[str]:
    """One COLA link boundary (see the module docstring); returns the names of the restarted modules.

    Args:
        model: a ``fastft.patch``-ed model with LoRA/DoRA adapters on float bases.
        optimizer: the optimizer holding the adapters (a ``torch.optim`` optimizer, or one that wraps it as
            ``.optimizer``, like accelerate's); their state is dropped. None: only the model changes.
        seed: seeds the re-initialisation (use a different one per link, e.g. ``base_seed + step``).
    """
    modules = chain_modules(model)
    params = [p for _, m in modules for p in m.adapter_parameters().values()]
    inner = None if optimizer is None else _held_optimizer(optimizer, params)  # refuse before changing anything
    with torch.random.fork_rng(devices=_devices(modules)):
        torch.manual_seed(seed)
        for _, module in modules:
            module.merge_and_restart()
    for param in params:
        param.grad = None
    if inner is not None:
        _drop_state(inner, params)
    return [name for name, _ in modules]


def reset_optimizer_state(optimizer: Any, params: list[nn.Parameter]) -> int:
    """Drop the per-parameter state of ``params`` (moments, step counts); returns how many had state.

    Raises if none of ``params`` is held by the optimizer (it was built over other parameters, and the
    restarted adapters would never train).
    """
    return _drop_state(_held_optimizer(optimizer, params), params)


def _held_optimizer(optimizer: Any, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer inside ``optimizer``; raises unless it holds one of ``params``."""
    inner = optimizer
    while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    held = {id(p) for group in inner.param_groups for p in group["params"]}
    if params and not any(id(p) in held for p in params):
        raise ValueError(
            "Chain of LoRA: the optimizer holds none of the adapter parameters being restarted; build the "
            "optimizer over the patched model's trainable parameters (after fastft.patch)."
        )
    return inner


def _drop_state(inner: torch.optim.Optimizer, params: list[nn.Parameter]) -> int:
    dropped = 0
    for param in params:
        if inner.state.pop(param, None) is not None:
            dropped += 1
    return dropped

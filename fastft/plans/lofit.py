"""LoFiT on a model: select heads (a short training of per-head scaling vectors), then wrap the output
projection of every layer with a selected head in a :class:`fastft.nn.LoFiTLinear`.

The selection runs on the unpatched model through temporary forward pre-hooks on the output projections
(``z ← (1 + a) ⊙ z`` per query head); every model parameter is frozen while it runs and gets its
``requires_grad`` back afterwards, so the model ends exactly as it was (no weight, no ``.grad`` is touched).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from ..config import LoFiTConfig
from ..nn.lofit import LoFiTLinear
from ..targets import find_layer_stacks, resolve_targets, stack_of
from .registry import Plan, register_planner


def _num_heads(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int) or heads < 1:
        raise ValueError(f"LoFiT needs the model's number of attention heads (config.num_attention_heads); "
                         f"{type(model).__name__} has none.")
    return heads


def _loss(model: nn.Module, batch: Any) -> Tensor:
    loss = batch(model) if callable(batch) else getattr(model(**batch), "loss", None)
    if not isinstance(loss, Tensor) or loss.dim() != 0 or not loss.requires_grad:
        raise ValueError("LoFiT selection: calib must give a scalar loss that depends on the model (a dict of model "
                         "inputs with labels, or a callable model -> loss).")
    if not bool(torch.isfinite(loss)):
        raise ValueError(f"LoFiT selection: the calib loss is {loss.item()!r}; give calib finite targets.")
    return loss


def select_heads(model: nn.Module, layers: dict[int, tuple[str, nn.Module]], heads: int, head_dim: int,
                 config: LoFiTConfig, count: int) -> dict[int, tuple[int, ...]]:
    """LoFiT's step 1: ``{layer: heads}`` with the largest ``‖a‖₁`` after training the scaling vectors."""
    first = next(iter(layers.values()))[1].weight
    scales = {i: torch.zeros(heads, head_dim, device=first.device, dtype=torch.float32, requires_grad=True)
              for i in layers}

    def hook_for(index):
        def hook(module, args):
            x = args[0]
            return (x * (1 + scales[index]).reshape(-1).to(x.dtype),) + tuple(args[1:])
        return hook

    frozen = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    handles = [layer.register_forward_pre_hook(hook_for(i)) for i, (_, layer) in layers.items()]
    items = config.calib if isinstance(config.calib, (list, tuple)) else [config.calib]
    try:
        for p in frozen:
            p.requires_grad_(False)
        model.train()
        optimizer = torch.optim.Adam(list(scales.values()), lr=config.select_lr)
        for step in range(config.select_steps):
            loss = _loss(model, items[step % len(items)])
            penalty = sum(s.abs().sum() for s in scales.values())
            (loss + config.l1 * penalty).backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        model.train(was_training)
    order = list(layers)
    importance = torch.stack([scales[i].detach().abs().sum(1) for i in order])  # layers × heads
    if not bool(importance.any()):
        raise ValueError("LoFiT selection: no scaling vector moved (the calib loss does not depend on the heads' "
                         "outputs); check calib.")
    ranked = torch.sort(importance.flatten(), descending=True, stable=True).indices[:count]
    selected: dict[int, list[int]] = {}
    for flat in ranked.tolist():
        selected.setdefault(order[flat // heads], []).append(flat % heads)
    return {layer: tuple(sorted(hs)) for layer, hs in sorted(selected.items())}


def config_count(config: LoFiTConfig, total: int) -> int:
    """How many heads ``config.heads`` asks for out of ``total``."""
    if isinstance(config.heads, float):
        return max(1, round(config.heads * total))
    if config.heads > total:
        raise ValueError(f"LoFiTConfig.heads={config.heads}: the targeted layers have only {total} query heads.")
    return int(config.heads)


def plan_lofit(model: nn.Module, config: LoFiTConfig) -> Plan:
    targets = resolve_targets(model, [config.targets], config.layers, accept=lambda m: isinstance(m, nn.Linear),
                              what="nn.Linear attention output projection")
    stacks = find_layer_stacks(model)
    layers: dict[int, tuple[str, nn.Module]] = {}
    for name, layer in targets:
        place = stack_of(stacks, name)
        if place is None:
            raise ValueError(f"LoFiTConfig.targets: {name!r} is not inside a stack of decoder layers.")
        if place[1] in layers:
            raise ValueError(f"LoFiTConfig.targets={config.targets!r} matches two modules of layer {place[1]} "
                             f"({layers[place[1]][0]!r}, {name!r}); name the attention output projection exactly.")
        layers[place[1]] = (name, layer)
    heads = _num_heads(model)
    in_features = {layer.in_features for _, layer in layers.values()}
    if len(in_features) != 1 or next(iter(in_features)) % heads:
        raise ValueError(f"LoFiT: the output projections take {sorted(in_features)} features, not a multiple of "
                         f"the model's {heads} attention heads.")
    head_dim = next(iter(in_features)) // heads
    if config.selected is None:
        selected = select_heads(model, layers, heads, head_dim, config, config_count(config, heads * len(layers)))
        how = f"selected by {config.select_steps} steps of scaling vectors (l1={config.l1:g})"
    else:
        selected = config.selected
        bad = [i for i in selected if i not in layers]
        if bad:
            raise ValueError(f"LoFiTConfig.selected names layers {bad} that have no targeted {config.targets!r} "
                             f"(targeted layers: {sorted(layers)}).")
        how = "given"
    swaps = [(layers[i][0], LoFiTLinear(layers[i][1], hs, head_dim)) for i, hs in selected.items()]
    count = sum(len(hs) for hs in selected.values())
    note = (f"lofit: {count} of {heads * len(layers)} query heads ({how}) in {len(selected)} layers: "
            + ", ".join(f"{i}:{list(hs)}" for i, hs in selected.items()))
    resolved = dataclasses.replace(config, selected={i: list(hs) for i, hs in selected.items()}, calib=None)
    return Plan(resolved, swaps=swaps, notes=[note])


register_planner(LoFiTConfig, plan_lofit)

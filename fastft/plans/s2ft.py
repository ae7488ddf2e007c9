"""S²FT on a model: select heads/channels per layer, co-permute the blocks, train dense slices.

Planning (nothing in the model changes; the gradient probe restores every flag and gradient):
  1. the targeted ``o_proj`` / ``down_proj`` modules are found (``resolve_targets``: a name that is not in
     the model is an error listing the names that are) and their attention / FFN blocks checked to be
     Llama-style (``fastft.plans.s2ft_copermute``);
  2. per layer and part, unit scores are computed (``random`` / ``weight_norm`` / ``gradient``) and the
     selection made: the top channels; for heads, the best selection that a function-preserving
     permutation can make a prefix (whole key/value groups plus at most one partial group);
     or the selection is taken from ``config.indices``;
  3. the plan: an :class:`S2FTEdit` (the co-permutation, applied in place) and one ``S2FTLinear`` per
     trained projection, each training the first S columns (o_proj, down_proj) or rows (v_proj, up_proj).
The plan's config is the given config with ``indices`` filled in (``calib`` dropped), which is what
``fastft.save`` writes and ``fastft.load`` replays.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..config import S2FTConfig
from .s2ft_copermute import (
    ATTENTION_PROJECTIONS,
    FFN_PROJECTIONS,
    AttentionBlock,
    CoPermutation,
    FFNBlock,
    channel_order,
    expand_heads,
    head_orders,
)
from ..nn.s2ft import S2FTLinear
from .registry import Plan, register_planner
from ..targets import find_layer_stack, resolve_targets


def unit_count(ratio: float, total: int) -> int:
    """Heads or channels a ratio selects: ``max(1, round(ratio · total))`` (round half up)."""
    return max(1, min(total, math.floor(ratio * total + 0.5)))


# ------------------------------------------------------------------------------------------ the blocks


def find_blocks(model: nn.Module, config: S2FTConfig) -> dict[int, dict[str, Any]]:
    """{layer index: {"attn": AttentionBlock, "ffn": FFNBlock}} for the active parts, checked."""
    targets = [t for t in config.targets if S2FTConfig.PARTS[t.rsplit(".", 1)[-1]] in config.parts]
    named = resolve_targets(model, targets, config.layers)
    stack = find_layer_stack(model)
    blocks: dict[int, dict[str, Any]] = {}
    for name, _ in named:
        layer = stack.index_of(name) if stack is not None else None
        if layer is None:
            raise ValueError(f"S²FT target '{name}' is not inside the decoder layers; S²FT works per decoder block.")
        parent_name, _, leaf = name.rpartition(".")
        part = S2FTConfig.PARTS[leaf]
        parent = model.get_submodule(parent_name)
        block = AttentionBlock.of(parent, parent_name) if part == "attn" else FFNBlock.of(parent, parent_name)
        if part in blocks.setdefault(layer, {}):
            raise ValueError(f"decoder layer {layer} holds two '{leaf}' modules; S²FT expects one per block.")
        blocks[layer][part] = block
    for layer, parts in blocks.items():
        missing = [p for p in config.parts if p not in parts]
        if missing:
            raise ValueError(
                f"decoder layer {layer} has no {' or '.join(missing)} block matching targets={list(config.targets)}; "
                "restrict layers=... to the layers that have one."
            )
    return dict(sorted(blocks.items()))


# ---------------------------------------------------------------------------------------------- scores


def _column_energy(weight: Tensor) -> Tensor:
    return weight.detach().double().square().sum(0)


def _row_energy(weight: Tensor) -> Tensor:
    return weight.detach().double().square().sum(1)


def _attention_scores(block: AttentionBlock, rows: bool, energy: Callable[[nn.Linear, int], Tensor]) -> Tensor:
    """Per query head: energy of its o_proj columns (+ its key/value head's v_proj rows with ``rows``)."""
    scores = energy(block.o, 0).reshape(block.num_heads, block.head_dim).sum(1)
    if rows:
        kv = energy(block.v, 1).reshape(block.num_kv_heads, block.head_dim).sum(1)
        scores = scores + kv.repeat_interleave(block.group_size)
    return scores.cpu()


def _ffn_scores(block: FFNBlock, rows: bool, energy: Callable[[nn.Linear, int], Tensor]) -> Tensor:
    scores = energy(block.down, 0)
    if rows:
        scores = scores + energy(block.up, 1)
    return scores.cpu()


def _weight_energy(layer: nn.Linear, dim: int) -> Tensor:
    """Squared norms of the columns (``dim=0``) or rows (``dim=1``) of a weight."""
    return _column_energy(layer.weight) if dim == 0 else _row_energy(layer.weight)


def _probe_loss(model: nn.Module, calib: Any) -> Tensor:
    if callable(calib):
        loss = calib(model)
    else:
        output = model(**calib)
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, dict):
            loss = output.get("loss")
        if loss is None:
            raise ValueError(
                "S²FT selection='gradient': model(**calib) returned no loss; put labels in the calib batch "
                "(e.g. labels=input_ids) or pass calib=lambda model: <scalar loss>."
            )
    if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise ValueError(
            "S²FT selection='gradient': the calib probe must give a scalar loss tensor that depends on the model's "
            f"weights; got {type(loss).__name__}"
            + (f" of shape {tuple(loss.shape)}, requires_grad={loss.requires_grad}" if isinstance(loss, Tensor) else "")
        )
    if not bool(torch.isfinite(loss.detach()).all()):
        raise ValueError(
            f"S²FT selection='gradient': the calib probe's loss is {loss.item()!r}, so its gradients rank nothing "
            "(e.g. every label is -100, or the model overflows); give calib real targets, or use "
            "selection='weight_norm'."
        )
    return loss


def gradient_energy(model: nn.Module, calib: Any, wanted: list[tuple[nn.Linear, int]]) -> dict[int, Tensor]:
    """One backward pass of the calib loss; {id(layer): squared column (dim 0) / row (dim 1) norms of dW}.

    Only the wanted weights require a gradient during the probe, and each gradient is reduced and freed
    as soon as it is complete. Every ``requires_grad`` flag and ``.grad`` comes back as it was, and the
    global RNG state too (dropout in train mode draws from it).
    """
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    energy: dict[int, Tensor] = {}
    handles = []

    def reducer(layer: nn.Linear, dim: int):
        def hook(param: Tensor) -> None:
            energy[id(layer)] = (_column_energy if dim == 0 else _row_energy)(param.grad)
            param.grad = None

        return hook

    device = params[0].device if params else torch.device("cpu")
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for layer, dim in wanted:
            layer.weight.requires_grad_(True)
            handles.append(layer.weight.register_post_accumulate_grad_hook(reducer(layer, dim)))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            _probe_loss(model, calib).backward()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag, grad in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad
    missing = [layer for layer, _ in wanted if id(layer) not in energy]
    if missing:
        raise ValueError(
            f"S²FT selection='gradient': the calib loss gave no gradient for {len(missing)} of the targeted weights. "
            "Does the loss depend on every decoder layer? With reentrant gradient checkpointing, call "
            "model.enable_input_require_grads() first (or disable checkpointing for the probe)."
        )
    return energy


def unit_scores(model: nn.Module, config: S2FTConfig, blocks: dict[int, dict[str, Any]]) -> dict[tuple[int, str], Tensor]:
    """{(layer, part): float64 score per head / channel} under ``config.selection``."""
    if config.selection == "random":
        scores = {}
        for layer, parts in blocks.items():
            for part, block in parts.items():
                n = block.num_heads if part == "attn" else block.channels
                gen = torch.Generator().manual_seed(_stream_seed(config.seed, layer, part))
                scores[(layer, part)] = torch.rand(n, generator=gen, dtype=torch.float64)
        return scores
    if config.selection == "weight_norm":
        energy = _weight_energy
    else:
        wanted = []
        for parts in blocks.values():
            for part, block in parts.items():
                if part == "attn":
                    wanted += [(block.o, 0)] + ([(block.v, 1)] if config.rows else [])
                else:
                    wanted += [(block.down, 0)] + ([(block.up, 1)] if config.rows else [])
        probed = gradient_energy(model, config.calib, wanted)
        energy = lambda layer, dim: probed[id(layer)]  # noqa: E731
    scores = {}
    for layer, parts in blocks.items():
        for part, block in parts.items():
            score = _attention_scores if part == "attn" else _ffn_scores
            scores[(layer, part)] = score(block, config.rows, energy)
    return scores


def _stream_seed(seed: int, layer: int, part: str) -> int:
    """A seed per (seed, layer, part), so a layer's draw does not depend on which other layers are touched."""
    return (seed * 1_000_003 + layer * 7919 + (1 if part == "attn" else 2)) % (2**63)


# ------------------------------------------------------------------------------------------- selection


def _ranked(values: Tensor) -> list[int]:
    """Indices by descending value, ties by ascending index (deterministic)."""
    listed = values.tolist()
    return sorted(range(len(listed)), key=lambda i: (-listed[i], i))


def pick_channels(scores: Tensor, count: int) -> list[int]:
    """The ``count`` best channels, in ascending order."""
    return sorted(_ranked(scores)[:count])


def pick_heads(scores: Tensor, count: int, group_size: int) -> list[int]:
    """The best ``count`` query heads that a function-preserving permutation can make a prefix.

    They fill ``count // r`` whole groups plus ``count % r`` heads of one more group (r = group_size),
    maximising the summed score; returned in slot order: the whole groups in ascending order, then the
    partial group's heads, each group's heads ascending. With r = 1 this is the top ``count`` heads.
    """
    r = group_size
    groups = scores.reshape(-1, r)
    full, rest = divmod(count, r)
    group_order = _ranked(groups.sum(1))
    if rest == 0:
        chosen, partial = sorted(group_order[:full]), None
    else:
        best = None
        for candidate in range(groups.shape[0]):
            others = [g for g in group_order if g != candidate][:full]
            top = sorted(_ranked(groups[candidate])[:rest])
            value = groups[candidate, top].sum().item() + sum(groups[g].sum().item() for g in others)
            if best is None or value > best[0]:
                best = (value, candidate, others, top)
        _, partial, others, top = best
        chosen = sorted(others)
    heads = [g * r + i for g in chosen for i in range(r)]
    if partial is not None:
        heads += [partial * r + i for i in top]
    return heads


def _explicit_selection(config: S2FTConfig, blocks: dict[int, dict[str, Any]]) -> dict[int, dict[str, list[int]]]:
    given = config.indices
    if set(given) != set(blocks):
        raise ValueError(
            f"S2FTConfig.indices covers layers {sorted(given)} but the config touches layers {sorted(blocks)}; "
            "give a selection for exactly those layers."
        )
    selection = {}
    for layer, parts in blocks.items():
        selection[layer] = {}
        for part, block in parts.items():
            total = block.num_heads if part == "attn" else block.channels
            what = "attention heads" if part == "attn" else "FFN channels"
            ratio = config.attn_ratio if part == "attn" else config.ffn_ratio
            values = list(given[layer][part])
            expected = unit_count(ratio, total)
            if len(values) != expected:
                raise ValueError(
                    f"S2FTConfig.indices: layer {layer} lists {len(values)} {what}, but the model has {total} and "
                    f"{part}_ratio={ratio:g} selects {expected}."
                )
            selection[layer][part] = values
    return selection


def select(model: nn.Module, config: S2FTConfig, blocks: dict[int, dict[str, Any]]) -> dict[int, dict[str, list[int]]]:
    """{layer: {"attn": query heads in slot order, "ffn": channels in slot order}}."""
    if config.indices is not None:
        return _explicit_selection(config, blocks)
    scores = unit_scores(model, config, blocks)
    selection: dict[int, dict[str, list[int]]] = {}
    for layer, parts in blocks.items():
        selection[layer] = {}
        for part, block in parts.items():
            if part == "attn":
                count = unit_count(config.attn_ratio, block.num_heads)
                selection[layer][part] = pick_heads(scores[(layer, part)], count, block.group_size)
            else:
                count = unit_count(config.ffn_ratio, block.channels)
                selection[layer][part] = pick_channels(scores[(layer, part)], count)
    return selection


# ---------------------------------------------------------------------------------------------- the plan


class S2FTEdit(CoPermutation):
    """The co-permutation of the selected blocks, plus the initial slices of the S2FTLinear modules.

    ``apply`` permutes in place, then has every module remember its (permuted) initial slice;
    ``revert(merge=False)`` first writes those back (dropping the training), then un-permutes.
    ``revert(merge=True)`` un-permutes only: the plain model then holds the trained entries at their
    original positions.
    """

    def __init__(self, attention, ffn, modules: list[S2FTLinear]):
        super().__init__(attention, ffn)
        self.modules = modules

    def apply(self, model: nn.Module) -> None:
        if self.applied:
            return
        super().apply(model)
        for module in self.modules:
            module.snapshot()

    def revert(self, model: nn.Module, merge: bool) -> None:
        for module in self.modules:
            module.relink()
            if not merge:
                module.restore_initial()
        super().revert(model, merge)


def plan_s2ft(model: nn.Module, config: S2FTConfig) -> Plan:
    blocks = find_blocks(model, config)
    selection = select(model, config, blocks)
    swaps: list[tuple[str, nn.Module]] = []
    attention, ffn = [], []
    for layer, parts in blocks.items():
        if "attn" in parts:
            block: AttentionBlock = parts["attn"]
            heads = selection[layer]["attn"]
            q_order, kv_order = head_orders(heads, block.num_heads, block.num_kv_heads)
            attention.append((block, q_order, kv_order))
            kv_used = math.ceil(len(heads) / block.group_size)
            if config.rows:
                swaps.append((f"{block.name}.v_proj", S2FTLinear(
                    block.v, kv_used * block.head_dim, rows=True, index=expand_heads(kv_order[:kv_used], block.head_dim),
                    label=f"kv heads {kv_order[:kv_used]} of {block.num_kv_heads}", defer_attach=True)))
            swaps.append((f"{block.name}.o_proj", S2FTLinear(
                block.o, len(heads) * block.head_dim, index=expand_heads(heads, block.head_dim),
                label=f"heads {_short(heads)} of {block.num_heads}", defer_attach=True)))
        if "ffn" in parts:
            block: FFNBlock = parts["ffn"]
            channels = selection[layer]["ffn"]
            ffn.append((block, channel_order(channels, block.channels)))
            label = f"{len(channels)} of {block.channels} channels"
            if config.rows:
                swaps.append((f"{block.name}.up_proj", S2FTLinear(
                    block.up, len(channels), rows=True, index=channels, label=label, defer_attach=True)))
            swaps.append((f"{block.name}.down_proj", S2FTLinear(
                block.down, len(channels), index=channels, label=label, defer_attach=True)))
    modules = [module for _, module in swaps]
    edit = S2FTEdit(attention, ffn, modules)
    resolved = dataclasses.replace(config, indices=selection, calib=None)
    note = (
        f"S²FT co-permuted {len(attention)} attention and {len(ffn)} FFN blocks (selection={config.selection}); "
        "the trained slices are their leading columns/rows. unpatch(merge=True) restores the original order "
        "with the trained entries in place."
    )
    rewrites = [f"{block.name}.{p}" for block, _, _ in attention for p in ATTENTION_PROJECTIONS]
    rewrites += [f"{block.name}.{p}" for block, _ in ffn for p in FFN_PROJECTIONS]
    return Plan(resolved, swaps=swaps, edits=[edit], notes=[note], rewrites=rewrites)


def _short(values: list[int], limit: int = 6) -> str:
    if len(values) <= limit:
        return str(values)
    return "[" + ", ".join(map(str, values[:limit])) + f", ... {len(values)} in all]"


register_planner(S2FTConfig, plan_s2ft)

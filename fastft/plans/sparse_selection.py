"""Which entries of a weight a sparse fine-tuning trains: the selection rules of the sparse methods.

Every function returns *flat row-major indices* (``row * in_features + col``), int64, sorted ascending,
the form :class:`fastft.nn.sparse_delta.SparseDeltaLinear` takes. Ties are broken by the lower flat index
(stable sorts), so a selection is deterministic.

==========================  ==========================================================================
:func:`smallest_magnitude`  SaRA: the k entries of smallest |W| (the "ineffective" parameters)
:func:`largest_magnitude`   the k entries of largest |W| (the fixed "magnitude" support; MFT's default)
:func:`random_support`      k entries drawn uniformly without replacement (a seeded generator)
:func:`most_changed`        LT-SFT: the k entries of largest |W₁ − W₀| after phase 1
:func:`salient_channels`    SCT: the input channels with the largest calibration activation norms
:func:`column_support`      whole columns (input channels) as flat indices
:func:`activation_norms`    SCT's calibration pass: per-input-channel L2 norms of each layer's input
:func:`prune_slots`         SpIEL prune: the slots whose deltas changed least (smallest |Δ|)
:func:`regrow_indices`      SpIEL regrow: the candidates with the largest |accumulated gradient|
:func:`spiel_support`       one SpIEL cycle: the new support and its values
==========================  ==========================================================================
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn


def slot_count(density: float, out_features: int, in_features: int) -> int:
    """k = max(1, round(density · out · in)), at most out · in (round half up)."""
    total = out_features * in_features
    return max(1, min(total, math.floor(density * total + 0.5)))


def channel_count(density: float, in_features: int) -> int:
    """SCT's column count: max(1, round(density · in))."""
    return max(1, min(in_features, math.floor(density * in_features + 0.5)))


def _first(order_key: Tensor, k: int) -> Tensor:
    """Flat positions of the k smallest values of ``order_key`` (stable: ties by lower index), sorted."""
    order = torch.sort(order_key.flatten(), stable=True).indices[:k]
    return torch.sort(order).values.to(torch.int64)


def smallest_magnitude(weight: Tensor, k: int) -> Tensor:
    """SaRA's set: the k entries of smallest |W|."""
    return _first(weight.detach().abs().float(), k)


def largest_magnitude(weight: Tensor, k: int) -> Tensor:
    """The k entries of largest |W|."""
    return _first(-weight.detach().abs().float(), k)


def most_changed(before: Tensor, after: Tensor, k: int) -> Tensor:
    """LT-SFT's mask: the k entries of largest |after − before| (after phase 1 minus the pretrained weight)."""
    if before.shape != after.shape:
        raise ValueError(f"LT-SFT: the phase-1 weight has shape {tuple(after.shape)}, the model's {tuple(before.shape)}.")
    change = after.detach().to(before.device, torch.float64) - before.detach().double()
    return _first(-change.abs(), k)


def random_support(numel: int, k: int, generator: torch.Generator, exclude: Tensor | None = None) -> Tensor:
    """k distinct flat indices in [0, numel), none in ``exclude``, drawn uniformly; sorted.

    Draws with replacement and drops repeats (no ``randperm`` of the whole weight) unless k is over half of
    what is free, where a permutation is cheaper.
    """
    exclude = torch.empty(0, dtype=torch.int64) if exclude is None else exclude.detach().cpu().to(torch.int64)
    free = numel - exclude.numel()
    if k > free:
        raise ValueError(f"cannot draw {k} entries: only {free} of {numel} are free")
    if 2 * k > free:
        pool = torch.ones(numel, dtype=torch.bool)
        pool[exclude] = False
        candidates = pool.nonzero().flatten()
        return torch.sort(candidates[torch.randperm(free, generator=generator)[:k]]).values
    chosen = torch.empty(0, dtype=torch.int64)
    while chosen.numel() < k:
        need = k - chosen.numel()
        draw = torch.randint(0, numel, (2 * need + 16,), generator=generator)
        draw = draw[~torch.isin(draw, exclude) & ~torch.isin(draw, chosen)]
        uniq, inverse = torch.unique(draw, return_inverse=True)
        first = torch.full((uniq.numel(),), draw.numel(), dtype=torch.int64)
        first.scatter_reduce_(0, inverse, torch.arange(draw.numel()), reduce="amin")
        chosen = torch.cat([chosen, draw[torch.sort(first).values][:need]])
    return torch.sort(chosen).values


def salient_channels(norms: Tensor, count: int) -> Tensor:
    """SCT: the ``count`` input channels of largest activation norm (ties: lower channel), ascending."""
    return _first(-norms.detach().double(), count)


def column_support(channels: Tensor, out_features: int, in_features: int) -> Tensor:
    """Every entry of the given input columns: ``row · in + col`` for all rows, sorted."""
    rows = torch.arange(out_features, dtype=torch.int64).unsqueeze(1)
    return torch.sort((rows * in_features + channels.to(torch.int64).cpu().unsqueeze(0)).flatten()).values


def _run_calib(model: nn.Module, calib: Any) -> None:
    if callable(calib):
        calib(model)
        return
    batches = [calib] if isinstance(calib, dict) else list(calib)
    if not batches or not all(isinstance(b, dict) for b in batches):
        raise ValueError("SparseConfig.calib: a dict of model inputs, a non-empty list of them, or a callable calib(model).")
    device = next(model.parameters()).device
    for batch in batches:
        model(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()})


def activation_norms(model: nn.Module, layers: dict[str, nn.Module], calib: Any) -> dict[str, Tensor]:
    """SCT's calibration pass: {name: L2 norm of each input channel of that layer over every calibration
    token} (float64, on the CPU). Runs ``calib`` under ``torch.no_grad`` in eval mode with forward hooks on
    ``layers``; the model's mode, the hooks and the RNG state come back as they were."""
    sums: dict[str, Tensor] = {}

    def recorder(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0].detach()
            energy = x.reshape(-1, x.shape[-1]).double().square().sum(0)
            sums[name] = sums[name] + energy if name in sums else energy

        return hook

    handles = [module.register_forward_hook(recorder(name)) for name, module in layers.items()]
    modes = {m: m.training for m in model.modules()}
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            _run_calib(model, calib)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.train(mode)
    missing = [name for name in layers if name not in sums]
    if missing:
        raise ValueError(
            f"SCT calibration: {len(missing)} targeted layers saw no input (e.g. {missing[:3]}); the calibration "
            "forwards must run every targeted layer."
        )
    return {name: value.sqrt().cpu() for name, value in sums.items()}


def prune_slots(values: Tensor, count: int) -> Tensor:
    """SpIEL prune: the slot positions (into the k slots) of the ``count`` smallest |Δ|, ascending."""
    return _first(values.detach().abs().double().cpu(), count)


def regrow_indices(candidates: Tensor, gradients: Tensor, count: int) -> Tensor:
    """SpIEL regrow: the ``count`` candidate flat indices with the largest |accumulated gradient| (ties: the
    lower flat index), ascending."""
    if candidates.shape != gradients.shape:
        raise ValueError(f"{candidates.numel()} candidates but {gradients.numel()} candidate gradients")
    candidates = candidates.detach().cpu().to(torch.int64)
    order = torch.sort(candidates, stable=True).indices  # ties by lower flat index
    by_grad = torch.sort(-gradients.detach().abs().double().cpu()[order], stable=True).indices[:count]
    return torch.sort(candidates[order][by_grad]).values


def spiel_support(indices: Tensor, values: Tensor, candidates: Tensor, gradients: Tensor,
                  count: int) -> tuple[Tensor, Tensor]:
    """One SpIEL cycle on one layer: drop the ``count`` slots of smallest |Δ|, add the ``count`` candidates of
    largest |accumulated gradient| (candidates are never active indices). Returns (the new sorted indices,
    their values: a kept index keeps its delta, a regrown one starts at 0)."""
    count = min(count, candidates.numel())
    dropped = prune_slots(values, count)
    keep = torch.ones(indices.numel(), dtype=torch.bool)
    keep[dropped] = False
    grown = regrow_indices(candidates, gradients, count)
    new_indices = torch.cat([indices.detach().cpu()[keep], grown])
    new_values = torch.cat([values.detach().cpu()[keep], torch.zeros(count, dtype=values.dtype)])
    order = torch.sort(new_indices).indices
    return new_indices[order], new_values[order]

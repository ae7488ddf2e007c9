"""Sparse fine-tuning on a model: every targeted linear layer becomes a
:class:`fastft.nn.sparse_delta.SparseDeltaLinear` training k entries chosen by the config's method.

Planning (nothing in the model changes; SCT's calibration forwards restore the mode and the RNG):
  1. the targets are resolved (``nn.Linear``, ``Conv1D``, bitsandbytes ``Linear4bit``);
  2. per layer, the support is selected (``fastft.plans.sparse_selection``): random (SpIEL's start, "random",
     and by default Diff Pruning's / GMT's), largest |W| ("magnitude", MFT's default), smallest |W| (SaRA),
     the most changed weights of the phase-1 model (LT-SFT), whole salient input columns (SCT);
     with ``saved_support=True`` placeholder positions that ``fastft.load`` overwrites;
  3. the layers are built with their value transform (Diff Pruning's gates, MFT's masks, GMT's gradient
     mask, SaRA's nuclear norm; ``fastft.nn.sparse_gates``); Diff Pruning and SaRA with ``nuclear_weight``
     add a :class:`RegularizationEdit` (the L0 penalty / the nuclear norm joins ``output.loss``), SpIEL and a
     Diff Pruning with ``fix_at_step`` a :class:`ScheduleEdit` (their
     :class:`~fastft.plans.sparse_schedule.SparseSchedule`, found with :func:`sparse_schedules`).
The plan's config is the given one with ``saved_support=True`` (``phase1`` and ``calib`` dropped): what
``fastft.save`` writes, so ``fastft.load`` rebuilds the layers without re-selecting and loads the indices.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from ..bnb import four_bit_weight, is_linear4bit
from ..config import ALL_LINEAR, SparseConfig
from ..nn.sparse_delta import SparseDeltaLinear
from ..nn.sparse_gates import GradientMask, HardConcreteGate, NuclearNormPenalty, StraightThroughMask
from ..targets import describe_stacks, is_conv1d, is_linear, linear_features, out_in_weight, resolve_targets
from .registry import Edit, Plan, register_planner
from .regularization import RegularizationEdit
from .sparse_schedule import SCHEDULES_ATTR, SparseSchedule, sparse_schedules, stream
from .sparse_selection import (
    activation_norms,
    channel_count,
    column_support,
    largest_magnitude,
    most_changed,
    random_support,
    salient_channels,
    slot_count,
    smallest_magnitude,
)

__all__ = ["ScheduleEdit", "plan_sparse", "sparse_schedules"]


def dense_weight(layer: nn.Module) -> Tensor:
    """The layer's out×in weight as a float tensor (a 4-bit weight dequantized to float32)."""
    if is_linear4bit(layer):
        return four_bit_weight(layer).dequantize(torch.float32)
    return out_in_weight(layer).detach()


def _phase1_weight(config: SparseConfig, name: str, shape: tuple[int, int]) -> Tensor:
    source = config.phase1
    if isinstance(source, dict):
        for key in (name, f"{name}.weight"):
            if key in source:
                weight = source[key]
                if not isinstance(weight, Tensor):
                    raise ValueError(f"SparseConfig.phase1[{key!r}] is a {type(weight).__name__}, not a tensor")
                if tuple(weight.shape) == shape[::-1] and shape[0] != shape[1]:
                    raise ValueError(f"SparseConfig.phase1[{key!r}] has shape {tuple(weight.shape)}; give the out×in weight {shape}")
                return weight.detach()
        raise ValueError(f"SparseConfig.phase1 has no weight for {name!r} (keys tried: {name!r}, {name + '.weight'!r}).")
    try:
        layer = source.get_submodule(name)
    except AttributeError:
        raise ValueError(f"SparseConfig.phase1: the phase-1 model has no module {name!r}; it must be the same "
                         "architecture as the model being patched.") from None
    if isinstance(layer, SparseDeltaLinear):  # phase 1 was a (larger) sparse fine-tuning, still patched
        return dense_weight(layer.base_layer).float() + layer.delta_weight().to(layer.weight.device, torch.float32)
    if not is_linear(layer):
        raise ValueError(f"SparseConfig.phase1: module {name!r} of the phase-1 model is a {type(layer).__name__}, not a "
                         "linear layer (unpatch it with merge=True first)")
    return dense_weight(layer)


def select_support(name: str, layer: nn.Module, config: SparseConfig, norms: dict[str, Tensor]) -> Tensor:
    """The flat indices layer ``name`` trains under ``config`` (sorted, int64, on the CPU)."""
    in_features, out_features = linear_features(layer)
    method = config.method
    if method == "sct":
        channels = channel_count(config.density, in_features)
        if config.saved_support:
            return column_support(torch.arange(channels), out_features, in_features)
        return column_support(salient_channels(norms[name], channels), out_features, in_features)
    k = slot_count(config.density, out_features, in_features)
    if config.saved_support:
        return torch.arange(k, dtype=torch.int64)
    rule = {"sara": "smallest", "magnitude": "magnitude", "random": "random", "spiel": "random"}.get(method, config.support)
    if method == "lt-sft":
        before = dense_weight(layer)
        return most_changed(before, _phase1_weight(config, name, (out_features, in_features)), k)
    if rule == "random":
        return random_support(out_features * in_features, k, stream(config.seed, name))
    weight = dense_weight(layer)
    return (smallest_magnitude if rule == "smallest" else largest_magnitude)(weight, k).cpu()


def build_layer(layer: nn.Module, indices: Tensor, config: SparseConfig) -> SparseDeltaLinear:
    """The SparseDeltaLinear of one layer with the method's value transform."""
    module = SparseDeltaLinear(layer, indices.to(layer.weight.device))
    k = module.k
    if config.method == "diff-pruning":
        module.value_transform = HardConcreteGate(k, config.temperature, config.l0_weight, config.gate_init).to(
            module.delta_values.device)
    elif config.method == "mft":
        with torch.no_grad():
            module.delta_values.fill_(config.score_init)
        base = dense_weight(layer).reshape(-1)[module.delta_indices.to(layer.weight.device)]
        module.value_transform = StraightThroughMask(base.to(module.delta_values.dtype))
    elif config.method == "gmt":
        module.value_transform = GradientMask(config.keep_fraction)
    elif config.method == "sara" and config.nuclear_weight > 0:
        module.value_transform = NuclearNormPenalty(config.nuclear_weight)
    return module.train(layer.training)  # the mode of the layer it replaces (gates sample only in training)


class ScheduleEdit(Edit):
    """Makes a plan's :class:`SparseSchedule` findable on the model (``sparse_schedules(model)``) while patched
    and puts SpIEL's first candidates in place."""

    def __init__(self, schedule: SparseSchedule):
        self.schedule = schedule

    def apply(self, model: nn.Module) -> None:
        self.schedule.start()
        model.__dict__.setdefault(SCHEDULES_ATTR, []).append(self.schedule)

    def revert(self, model: nn.Module, merge: bool) -> None:
        schedules = model.__dict__.get(SCHEDULES_ATTR, [])
        if self.schedule in schedules:
            schedules.remove(self.schedule)
        if not schedules:
            model.__dict__.pop(SCHEDULES_ATTR, None)
        for _, module in self.schedule.modules:
            module.set_candidates(None)


def plan_sparse(model: nn.Module, config: SparseConfig) -> Plan:
    targets = resolve_targets(model, config.targets, config.layers, accept=is_linear, what="linear layer")
    meta = [name for name, layer in targets if layer.weight.is_meta]
    if meta and not (config.method == "random" or config.saved_support):
        raise ValueError(f"SparseConfig(method={config.method!r}) selects from the weights, but {meta[0]!r} is on the meta "
                         "device; load the weights first.")
    norms: dict[str, Tensor] = {}
    if config.method == "sct" and not config.saved_support:
        norms = activation_norms(model, dict(targets), config.calib)
    swaps = [(name, build_layer(layer, select_support(name, layer, config, norms), config)) for name, layer in targets]
    resolved = dataclasses.replace(config, saved_support=True, phase1=None, calib=None)
    plan = Plan(resolved, swaps=swaps)
    rule = {"spiel": "random, moved by prune/regrow", "lt-sft": "most changed in phase 1", "sara": "smallest |W|",
            "sct": "salient input columns", "magnitude": "largest |W|", "random": "random"}.get(
        config.method, {"random": "random", "magnitude": "largest |W|", "smallest": "smallest |W|"}.get(config.support))
    total = sum(module.k for _, module in swaps)
    plan.notes.append(f"sparse ({config.method}): {len(swaps)} layers, {total:,} trained entries; support: "
                      + ("loaded from a save" if config.saved_support else rule))
    if config.targets == ALL_LINEAR:
        plan.notes.extend(f"sparse ({config.method}) {line}" for line in describe_stacks(model, [n for n, _ in targets]))
    conv = [name for name, layer in targets if is_conv1d(layer)]
    if conv:
        plan.notes.append(f"sparse ({config.method}): Conv1D layers ({conv[:2]}...) index their out×in (transposed) view")
    if config.has_regularization:
        plan.edits.append(RegularizationEdit())
    if config.needs_schedule:
        plan.edits.append(ScheduleEdit(SparseSchedule(config, swaps)))
        what = (f"every {config.regrow_every} steps" if config.method == "spiel"
                else f"at step {config.fix_at_step}")
        plan.notes.append(f"sparse ({config.method}): runs {what}; the Trainer callback (fastft.integrations."
                          "FastFTCallback) calls it, a hand-written loop calls "
                          "fastft.plans.sparse.sparse_schedules(model)[i].step(model, step, optimizer)")
    return plan


register_planner(SparseConfig, plan_sparse)

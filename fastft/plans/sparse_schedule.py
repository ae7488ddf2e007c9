"""What the sparse methods do during training: SpIEL's prune/regrow cycles, Diff Pruning's fixing step.

A :class:`SparseSchedule` belongs to one :class:`fastft.SparseConfig` plan. Call ``step(model, global_step,
optimizer)`` after every optimizer step, with the number of optimizer steps done so far (the transformers
``Trainer``: :class:`fastft.integrations.FastFTCallback` does it; a hand-written loop: see
``fastft.plans.sparse.sparse_schedules``):

* SpIEL (Ansell et al. 2024), every ``regrow_every`` steps, per layer: the ``n = round(prune_fraction · k)``
  slots of smallest |Δ| are dropped (their deltas reset to 0: those weights go back to pretrained), the n
  candidates with the largest |accumulated gradient| take their place at Δ = 0, and a fresh random set of
  ``ceil(candidate_factor · n)`` candidates (never active positions) starts accumulating. The candidate
  gradients are the op's SDDMM at the candidate positions, summed over the cycle's steps: no dense gradient
  ever exists. Under torch.distributed they are summed over the processes first, so every rank picks the same.
* Diff Pruning (Guo et al. 2021), at ``fix_at_step``: the gates are replaced by a fixed mask keeping
  ``round(final_density · k)`` slots (largest |w·z|), the deltas become ``w·z`` at them and 0 elsewhere.

The optimizer state of ``delta_values`` follows the slots: a kept position's moments move with it to its new
slot, a new position starts at zero moments (the step count is shared by the tensor and left alone); at Diff
Pruning's fixing step the state of the layer's values and gates is dropped (the parametrization changed).
"""
from __future__ import annotations

import math
import zlib
from typing import Any

import torch
from torch import Tensor, nn

from ..config import SparseConfig
from ..distributed import is_sharded, unwrap
from ..nn.sparse_delta import SparseDeltaLinear
from ..nn.sparse_gates import HardConcreteGate
from .sparse_selection import random_support, spiel_support

SCHEDULES_ATTR = "_fastft_sparse_schedules"


def stream(seed: int, name: str, salt: int = 0) -> torch.Generator:
    """A generator per (seed, module name, salt): one layer's draws do not depend on which others are targeted."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode()) * 7919 + salt) % (2**63))


def inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a wrapper (accelerate's ``.optimizer``)."""
    inner = optimizer
    while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    return inner


def move_optimizer_slots(optimizer: Any, param: nn.Parameter, moves: Tensor) -> int:
    """Permute the per-slot state of ``param`` (every state tensor of its shape): new slot j takes old slot
    ``moves[j]``, or zeros where ``moves[j] == -1``. Returns the number of slots zeroed."""
    state = inner_optimizer(optimizer).state.get(param)
    if not state:
        return 0
    fresh = moves < 0
    source = moves.clamp(min=0)
    for key, value in state.items():
        if isinstance(value, Tensor) and value.shape == param.shape:
            moved = value[source.to(value.device)]
            moved[fresh.to(value.device)] = 0
            state[key] = moved
    return int(fresh.sum())


def drop_optimizer_state(optimizer: Any, params: list[Tensor]) -> None:
    state = inner_optimizer(optimizer).state
    for param in params:
        state.pop(param, None)


def _all_reduce(tensor: Tensor) -> Tensor:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


class SparseSchedule:
    """The training-time actions of one sparse plan (module docstring)."""

    def __init__(self, config: SparseConfig, modules: list[tuple[str, SparseDeltaLinear]]):
        self.config = config
        self.modules = modules
        self.cycle = 0
        self.events: list[tuple[int, str]] = []

    @property
    def fixed(self) -> bool:
        """Diff Pruning: whether the gates are fixed (read from the layers, so a loaded state counts)."""
        return any(getattr(m.value_transform, "fixed", False) for _, m in self.modules)

    # -------------------------------------------------------------------- SpIEL
    def regrow_count(self, module: SparseDeltaLinear) -> int:
        return max(1, math.floor(self.config.prune_fraction * module.k + 0.5))

    def sample_candidates(self, name: str, module: SparseDeltaLinear) -> None:
        numel = module.out_features * module.in_features
        count = min(math.ceil(self.config.candidate_factor * self.regrow_count(module)), numel - module.k)
        if count <= 0:
            module.set_candidates(None)
            return
        gen = stream(self.config.seed, name, salt=1 + self.cycle)
        module.set_candidates(random_support(numel, count, gen, exclude=module.delta_indices))

    def start(self) -> None:
        """Put the first candidates in place (SpIEL); called when the plan is applied."""
        if self.config.method == "spiel":
            for name, module in self.modules:
                self.sample_candidates(name, module)

    def regrow(self, optimizer: Any = None) -> int:
        """One SpIEL prune/regrow cycle on every layer; returns the number of positions that changed."""
        self.cycle += 1
        changed = 0
        for name, module in self.modules:
            grads = module.candidate_gradients()
            if grads is not None and module.candidate_indices is not None:
                grads = _all_reduce(grads.detach().clone())
                indices, values = spiel_support(module.delta_indices, module.delta_values, module.candidate_indices,
                                                grads, self.regrow_count(module))
                module.set_candidates(None)  # the regrown positions were candidates
                module.set_support(indices.to(module.delta_indices.device), values)
                changed += int((module.support_moves < 0).sum())
                if optimizer is not None:
                    move_optimizer_slots(optimizer, module.delta_values, module.support_moves)
            self.sample_candidates(name, module)
        return changed

    # ------------------------------------------------------------ Diff Pruning
    def fix_gates(self, optimizer: Any = None) -> None:
        """Diff Pruning's final fixed-sparsity step on every layer (module docstring)."""
        if self.fixed:
            raise ValueError("SparseSchedule.fix_gates: the gates are already fixed")
        for _, module in self.modules:
            gate = module.value_transform
            if not isinstance(gate, HardConcreteGate):
                raise ValueError("SparseSchedule.fix_gates: only Diff Pruning layers have gates to fix")
            keep = max(1, math.floor(self.config.final_density * module.k + 0.5))
            values = gate.fix(module.delta_values.detach(), keep)
            with torch.no_grad():
                module.delta_values.copy_(values)
            if optimizer is not None:
                drop_optimizer_state(optimizer, [module.delta_values, gate.log_alpha])

    # ------------------------------------------------------------------- step
    def step(self, model: nn.Module | None, global_step: int, optimizer: Any = None, final: bool = False) -> list[str]:
        """Run what is due after optimizer step number ``global_step`` (1-based); returns what was done.

        ``final``: this was the last step of the run. SpIEL does not cycle then (the pruned deltas would be lost
        and the regrown slots never train); Diff Pruning still fixes its gates if due.
        """
        done = []
        config = self.config
        if config.method == "spiel" and any(is_sharded(m.delta_values) for _, m in self.modules):
            raise ValueError(
                "SparseSchedule: SpIEL under FSDP2 is not supported: its cycles rewrite the support, the deltas and "
                "their optimizer state in place, which FSDP2 holds as shards. Train SpIEL under DDP (indices and "
                "values replicated; the candidate gradients are summed across processes), or use a fixed support "
                "(SparseConfig(method='random' or 'magnitude')), which FSDP2 shards like any parameter.")
        if config.method == "spiel" and global_step > 0 and global_step % config.regrow_every == 0 and not final:
            changed = self.regrow(optimizer)
            done.append(f"SpIEL cycle {self.cycle}: {changed} positions regrown")
        if (config.method == "diff-pruning" and config.fix_at_step is not None and not self.fixed
                and global_step >= config.fix_at_step):
            self.fix_gates(optimizer)
            done.append(f"Diff Pruning: gates fixed at density {config.final_density:g} of the support")
        self.events.extend((global_step, d) for d in done)
        return done


def sparse_schedules(model: nn.Module) -> list[SparseSchedule]:
    """The schedules of the sparse plans patched into ``model`` (looking through a DDP wrapper); [] if none."""
    return list(unwrap(model).__dict__.get(SCHEDULES_ATTR, []))

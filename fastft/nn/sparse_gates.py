"""Value transforms of a sparse delta: what the methods put between the trained slots and the op.

:class:`fastft.nn.sparse_delta.SparseDeltaLinear` trains ``delta_values`` (k slots at ``delta_indices``) and
feeds the op ``value_transform(delta_values)`` when a transform is set. The methods here are transforms:

* :class:`HardConcreteGate` (Diff Pruning; Louizos et al. 2018): ``Δ = w ⊙ z`` with ``z`` a hard-concrete gate
  per slot. Training draws ``u ~ U(0, 1)``, ``s = σ((log u − log(1 − u) + log α) / β)``,
  ``z = min(1, max(0, s (r − l) + l))`` with the stretch ``(l, r) = (−0.1, 1.1)``; eval uses the deterministic
  ``z = min(1, max(0, σ(log α)(r − l) + l))``. The expected L0 norm ``Σ σ(log α − β log(−l / r))`` times
  ``l0_weight`` is the layer's ``regularization()``. :meth:`HardConcreteGate.fix` replaces the gates by a fixed
  binary mask (Diff Pruning's final fixed-sparsity step); then ``Δ = w ⊙ mask`` and the penalty is gone.
* :class:`StraightThroughMask` (Mask Fine-Tuning): the slots hold mask scores; ``Δ = −W[idx] ⊙ (1 − m)`` with
  ``m = 1[score > 0]`` in the forward and ``∂m/∂score = 1`` in the backward (straight-through), so the
  effective weight at a slot is ``W[idx] ⊙ m``: the base weight kept or masked out.
* :class:`NuclearNormPenalty` (SaRA): the identity; its ``regularization(layer)`` is
  ``nuclear_weight · ‖ΔW‖_*`` of the layer's dense ΔW (built from the k effective values, differentiable).
  It costs one out×in matrix and its SVD per step: SaRA's low-rank constraint, off unless asked for.
* :class:`GradientMask` (Gradient-Mask Tuning): the identity in the forward; the backward keeps the
  ``keep_fraction`` of the slots' gradient entries of largest magnitude (exactly ``max(1, round(f · k))``) and
  zeroes the rest — a gradient hook on ``delta_values`` that lives in the module tree (moves, copies and
  unpatches with the layer). It masks within the support, not over a dense gradient: the point of the
  sparse layer is that no dense gradient exists.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

STRETCH = (-0.1, 1.1)  # (l, r) of the stretched concrete distribution


def hard_concrete_sample(log_alpha: Tensor, temperature: float, u: Tensor) -> Tensor:
    """z = clamp(σ((log u − log(1 − u) + log α)/β)·(r − l) + l, 0, 1) for given uniforms ``u``."""
    low, high = STRETCH
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / temperature)
    return torch.clamp(s * (high - low) + low, 0.0, 1.0)


def hard_concrete_mean_gate(log_alpha: Tensor) -> Tensor:
    """Louizos et al.'s test-time gate: clamp(σ(log α)·(r − l) + l, 0, 1)."""
    low, high = STRETCH
    return torch.clamp(torch.sigmoid(log_alpha) * (high - low) + low, 0.0, 1.0)


def expected_l0(log_alpha: Tensor, temperature: float) -> Tensor:
    """Σ P(z ≠ 0) = Σ σ(log α − β log(−l / r))."""
    low, high = STRETCH
    return torch.sigmoid(log_alpha - temperature * math.log(-low / high)).sum()


class HardConcreteGate(nn.Module):
    """Diff Pruning's gates over k slots (module docstring). ``log_alpha`` is trainable; after :meth:`fix` the
    buffer ``fixed_mask`` (1.0 kept, 0.0 pruned) replaces the gates."""

    def __init__(self, k: int, temperature: float = 2.0 / 3.0, l0_weight: float = 1e-4, init: float = 3.0,
                 eps: float = 1e-6):
        super().__init__()
        if k < 1:
            raise ValueError(f"HardConcreteGate: k={k} slots; need at least 1")
        self.temperature = float(temperature)
        self.l0_weight = float(l0_weight)
        self.eps = float(eps)
        self.log_alpha = nn.Parameter(torch.full((k,), float(init)))
        # after fix(): the mask (1.0 kept, 0.0 pruned) and the flag; buffers, so save / load carry them
        self.register_buffer("fixed_mask", torch.ones(k))
        self.register_buffer("fixed_flag", torch.zeros(()))

    @property
    def fixed(self) -> bool:
        return bool(self.fixed_flag)

    def gate(self) -> Tensor:
        """The gate values of this forward: a sample while training, the deterministic gate at eval, the fixed
        mask once fixed."""
        if self.fixed:
            return self.fixed_mask
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp(self.eps, 1.0 - self.eps)
            return hard_concrete_sample(self.log_alpha, self.temperature, u)
        return hard_concrete_mean_gate(self.log_alpha)

    def forward(self, values: Tensor) -> Tensor:
        return values * self.gate().to(values.dtype)

    def regularization(self, layer: nn.Module | None = None) -> Tensor | None:
        """``l0_weight · E[L0]`` while the gates learn; None once fixed. (``layer``: the calling layer, unused.)"""
        if self.fixed:
            return None
        return self.l0_weight * expected_l0(self.log_alpha, self.temperature)

    @torch.no_grad()
    def fix(self, values: Tensor, keep: int) -> Tensor:
        """Diff Pruning's fixed-sparsity step: keep the ``keep`` slots of largest |w · z| (deterministic gate),
        drop the rest. Returns the values to train from now on (``w · z`` at kept slots, 0 elsewhere); the
        caller writes them into the layer's ``delta_values``. The gates stop learning (``log_alpha`` no longer
        enters the forward)."""
        if self.fixed:
            raise ValueError("HardConcreteGate.fix: the gates are already fixed")
        effective = values.detach() * hard_concrete_mean_gate(self.log_alpha).to(values.dtype)
        order = torch.sort(-effective.abs().double().cpu(), stable=True).indices[: max(1, min(keep, values.numel()))]
        mask = torch.zeros(values.numel(), dtype=torch.float32)
        mask[order] = 1.0
        self.fixed_mask.copy_(mask)
        self.fixed_flag.fill_(1.0)
        self.log_alpha.requires_grad_(False)
        return effective * self.fixed_mask.to(values.dtype)

    def extra_repr(self) -> str:
        return f"k={self.log_alpha.numel()}, temperature={self.temperature:g}, l0_weight={self.l0_weight:g}, fixed={self.fixed}"


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: Tensor) -> Tensor:
        return (scores > 0).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def straight_through_mask(scores: Tensor) -> Tensor:
    """1[score > 0] in the forward, the identity in the backward."""
    return _StraightThrough.apply(scores)


class StraightThroughMask(nn.Module):
    """MFT: maps mask scores to the delta ``−W[idx] ⊙ (1 − 1[score > 0])`` (module docstring).

    ``base_values`` (a buffer) is ``W[idx]`` at the support, taken from the frozen base weight by
    :meth:`refresh` (the planner calls it when the support is set or loaded).
    """

    def __init__(self, base_values: Tensor):
        super().__init__()
        self.register_buffer("base_values", base_values.detach().clone())

    @torch.no_grad()
    def refresh(self, base_values: Tensor) -> None:
        if base_values.shape != self.base_values.shape:
            raise ValueError(f"StraightThroughMask: {base_values.numel()} base values for {self.base_values.numel()} slots")
        self.base_values.copy_(base_values)

    def forward(self, scores: Tensor) -> Tensor:
        mask = straight_through_mask(scores)
        return -self.base_values.to(scores.dtype) * (1.0 - mask)

    def kept_fraction(self, scores: Tensor) -> float:
        return float((scores > 0).float().mean())


def top_fraction_mask(grad: Tensor, keep_fraction: float) -> Tensor:
    """A {0, 1} mask keeping exactly ``max(1, round(f · k))`` entries of ``grad`` of largest magnitude."""
    count = max(1, min(grad.numel(), math.floor(keep_fraction * grad.numel() + 0.5)))
    mask = torch.zeros_like(grad)
    mask.view(-1)[torch.topk(grad.detach().abs().flatten(), count).indices] = 1
    return mask


class _MaskGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: Tensor, keep_fraction: float) -> Tensor:
        ctx.keep_fraction = keep_fraction
        return values.view_as(values)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * top_fraction_mask(grad, ctx.keep_fraction), None


class GradientMask(nn.Module):
    """GMT: identity forward; the backward keeps the top ``keep_fraction`` of the gradient by magnitude."""

    def __init__(self, keep_fraction: float):
        super().__init__()
        if not 0.0 < keep_fraction <= 1.0:
            raise ValueError(f"GradientMask.keep_fraction={keep_fraction!r}: must be in (0, 1]")
        self.keep_fraction = float(keep_fraction)

    def forward(self, values: Tensor) -> Tensor:
        return _MaskGradient.apply(values, self.keep_fraction)

    def extra_repr(self) -> str:
        return f"keep_fraction={self.keep_fraction:g}"


class NuclearNormPenalty(nn.Module):
    """SaRA's low-rank constraint: identity forward; ``regularization(layer) = weight · ‖ΔW‖_*``, with ΔW the
    layer's dense out×in delta scattered from its effective values (the gradient reaches the values through
    the scatter and the SVD)."""

    def __init__(self, weight: float):
        super().__init__()
        if not weight > 0:
            raise ValueError(f"NuclearNormPenalty.weight={weight!r}: must be > 0")
        self.weight = float(weight)

    def forward(self, values: Tensor) -> Tensor:
        return values

    def regularization(self, layer: nn.Module) -> Tensor:
        values = layer.delta_values  # the identity transform: the effective values are the trained ones
        dense = values.new_zeros(layer.out_features * layer.in_features)
        dense = dense.index_put((layer.delta_indices,), values)
        return self.weight * torch.linalg.matrix_norm(dense.view(layer.out_features, layer.in_features).float(), ord="nuc")

    def extra_repr(self) -> str:
        return f"weight={self.weight:g}"

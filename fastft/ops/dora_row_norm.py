"""The DoRA row-norm op: ‖W + s·BA‖ per output row, from the low-rank factors (the linear op: ``fastft.ops.dora``).

DoRA (weight-decomposed low-rank adaptation) replaces a frozen W (O×K, dense or bitsandbytes 4-bit) by::

    W' = diag(g) (W + s·BA),    g = m / n,    n_i = ‖W_i + s·B_i A‖    (one norm per output row i)

with trainable A (R×K), B (O×R) and magnitude m (O). The module (``fastft.nn.DoRALinear``) computes
``n = dora_row_norm(...)``, then ``g = m / n`` in plain PyTorch (an O-vector), then ``y = dora_linear(...)``;
autograd joins them, so ``∂L/∂m = ∂L/∂g / n`` and, when the norm is not detached, ``∂L/∂n = -∂L/∂g · m/n²``
flows into the row-norm op's backward.

``dora_row_norm(W, A, B, ‖W‖², s, eps) -> (n, P)``, n of O entries, P = W Aᵀ (O×R), both float32 (float64 for float64)::

    q_i = ‖W_i‖² + 2s·B_i·P_i + s²·B_i G B_iᵀ,     G = A Aᵀ (R×R)
    n_i = max(sqrt(max(q_i, 0)), eps)

``‖W_i‖²`` is a constant of the frozen weight that the caller computes once (for a 4-bit base from its
dequantized weight); per call the op does one O×K×R product (P) and O×R×R work: the O×K matrix
``W + s·BA`` is never formed. q is computed in float32 (float64 for float64 inputs) from P, B and G.
The expansion loses relative accuracy only where ``‖W_i + s·B_i A‖ ≪ ‖W_i‖`` (an update that nearly
cancels its row), which DoRA's small updates do not reach.
``eps`` (:data:`NORM_EPS`, 1e-6) guards a zero norm: an all-zero row of ``W + s·BA`` gets n = eps instead
of 0, so g = m/eps stays finite where PEFT divides 0 by 0. The clamp has zero gradient.
Backward (used only when the norm is not detached), for ``dn = ∂L/∂n``::

    dq = dn / (2n)   where sqrt(q) > eps, else 0
    dB = 2s · diag(dq) (P + s·B G)
    dA = 2s · (diag(dq) B)ᵀ W + 2s² · (Bᵀ diag(dq) B) A       (one more R×O×K product, W re-read)

Saved: n and P (O and O×R). W, A, B are the caller's tensors.

Registered as ``torch.library`` ops (``fastft::dora_row_norm`` and its backward op) with fake kernels. The
PyTorch implementation here is the reference and runs on every device; the Triton kernels in
``fastft.kernels.dora`` run on CUDA.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ..dispatch import implementation, lazy, register_op
from ..node_costs import custom_op_node
from .dequantize_4bit import FourBitWeight
from .lora import _dense_weight

NORM_EPS = 1e-6
"""Lower bound of a DoRA row norm: a zero row of ``W + s·BA`` divides by this instead of by 0."""


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype DoRA computes row norms in: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_norm_from_projection(
    weight_sq_norm: Tensor, proj: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, eps: float
) -> Tensor:
    """n from ‖W_i‖², P = W Aᵀ, A and B (see the module docstring), in ``weight_sq_norm``'s dtype."""
    dtype = weight_sq_norm.dtype
    A, B, P = lora_A.to(dtype), lora_B.to(dtype), proj.to(dtype)
    gram = A @ A.t()
    q = weight_sq_norm + 2.0 * scale * (B * P).sum(1) + scale * scale * ((B @ gram) * B).sum(1)
    return q.clamp_min(0.0).sqrt().clamp_min(eps)


def dora_row_norm_reference(
    weight: Tensor, absmax: Optional[Tensor], code: Optional[Tensor], blocksize: int, out_features: int,
    lora_A: Tensor, lora_B: Tensor, weight_sq_norm: Tensor, scale: float, eps: float,
) -> tuple[Tensor, Tensor]:
    """(n, P = W Aᵀ) in PyTorch, both in ``weight_sq_norm``'s dtype (P computed in A's)."""
    w = _dense_weight(weight, absmax, code, blocksize, (out_features, lora_A.shape[1]), lora_A.dtype)
    proj = (w @ lora_A.t()).to(weight_sq_norm.dtype)
    return row_norm_from_projection(weight_sq_norm, proj, lora_A, lora_B, scale, eps), proj


def _norm_backward_terms(grad_norm: Tensor, norm: Tensor, eps: float) -> Tensor:
    """dq = dn / (2n) where the norm is not clamped at eps, 0 where it is."""
    return torch.where(norm > eps, grad_norm.to(norm.dtype) / (2.0 * norm), torch.zeros_like(norm))


def dora_row_norm_backward_reference(
    grad_norm: Tensor, norm: Tensor, proj: Tensor, weight: Tensor, absmax: Optional[Tensor],
    code: Optional[Tensor], blocksize: int, lora_A: Tensor, lora_B: Tensor, scale: float, eps: float,
    need_dA: bool, need_dB: bool,
) -> tuple[Tensor, Tensor]:
    """(dA, dB) of the row norm, empty where not needed."""
    dA, dB = lora_A.new_empty(0), lora_B.new_empty(0)
    dq = _norm_backward_terms(grad_norm, norm, eps)
    dtype = norm.dtype
    A, B = lora_A.to(dtype), lora_B.to(dtype)
    if need_dB:
        dB = (2.0 * scale * dq[:, None] * (proj.to(dtype) + scale * (B @ (A @ A.t())))).to(lora_B.dtype)
    if need_dA:
        w = _dense_weight(weight, absmax, code, blocksize, (lora_B.shape[0], lora_A.shape[1]), lora_A.dtype)
        weighted_B = dq[:, None] * B
        dA = (weighted_B.t().to(lora_A.dtype) @ w).to(dtype)
        dA.addmm_(B.t() @ weighted_B, A, alpha=scale)
        dA = dA.mul_(2.0 * scale).to(lora_A.dtype)
    return dA, dB


def dora_row_norm_backward_flops(node, grad_shape):
    """FLOP formula of the backward (:mod:`fastft.node_costs`; only in graphs with
    ``LoRAConfig(dora_detach_norm=False)``): out O, in K, rank R::

        dB = 2s·diag(dq)(P + s·B(A Aᵀ))                 2·R·K·R + 2·O·R·R   when B trains
        dA = 2s·(diag(dq)B)ᵀ W + 2s²·(Bᵀ diag(dq) B) A   2·R·O·K + 2·R·O·R + 2·R·R·K   when A trains

    Tensor inputs: weight, [absmax, code], lora_A, lora_B, weight_sq_norm.
    """
    norm, _, _, absmax, _, lora_A, _ = node.saved_tensors
    out_features = norm.shape[0]
    rank, in_features = lora_A.shape
    a_edge = 1 + (2 if absmax is not None else 0)
    return [
        (2 * rank * in_features * rank + 2 * out_features * rank * rank, (a_edge + 1,)),
        (2 * rank * out_features * in_features + 2 * rank * out_features * rank + 2 * rank * rank * in_features,
         (a_edge,)),
    ]


register_op("dora_row_norm", {
    "torch": {"forward": dora_row_norm_reference, "backward": dora_row_norm_backward_reference},
    "triton": lazy("fastft.kernels.dora", forward="dora_row_norm", backward="dora_row_norm_backward"),
}, node_costs={custom_op_node("dora_row_norm"): dora_row_norm_backward_flops})


@torch.library.custom_op("fastft::dora_row_norm", mutates_args=())
def _dora_row_norm_op(
    weight: Tensor, absmax: Optional[Tensor], code: Optional[Tensor], blocksize: int, out_features: int,
    lora_A: Tensor, lora_B: Tensor, weight_sq_norm: Tensor, scale: float, eps: float,
) -> tuple[Tensor, Tensor]:
    args = (weight, absmax, code, blocksize, out_features, lora_A, lora_B, weight_sq_norm, scale, eps)
    return implementation("dora_row_norm", "forward", lora_A.device)(*args)


@_dora_row_norm_op.register_fake
def _(weight, absmax, code, blocksize, out_features, lora_A, lora_B, weight_sq_norm, scale, eps):
    return weight_sq_norm.new_empty(out_features), weight_sq_norm.new_empty(out_features, lora_A.shape[0])


@torch.library.custom_op("fastft::dora_row_norm_backward", mutates_args=())
def _dora_row_norm_backward_op(
    grad_norm: Tensor, norm: Tensor, proj: Tensor, weight: Tensor, absmax: Optional[Tensor],
    code: Optional[Tensor], blocksize: int, lora_A: Tensor, lora_B: Tensor, scale: float, eps: float,
    need_dA: bool, need_dB: bool,
) -> tuple[Tensor, Tensor]:
    args = (grad_norm, norm, proj, weight, absmax, code, blocksize, lora_A, lora_B, scale, eps, need_dA, need_dB)
    return implementation("dora_row_norm", "backward", lora_A.device)(*args)


@_dora_row_norm_backward_op.register_fake
def _(grad_norm, norm, proj, weight, absmax, code, blocksize, lora_A, lora_B, scale, eps, need_dA, need_dB):
    empty = lora_A.new_empty(0)
    return (lora_A.new_empty(lora_A.shape) if need_dA else empty,
            lora_B.new_empty(lora_B.shape) if need_dB else empty)


def _norm_setup_context(ctx, inputs, output):
    weight, absmax, code, blocksize, out_features, lora_A, lora_B, weight_sq_norm, scale, eps = inputs
    norm, proj = output
    ctx.save_for_backward(norm, proj, weight, absmax, code, lora_A, lora_B)
    ctx.meta = (blocksize, scale, eps, ctx.needs_input_grad[5], ctx.needs_input_grad[6])


def _norm_backward(ctx, grad_norm, _grad_proj):
    norm, proj, weight, absmax, code, lora_A, lora_B = ctx.saved_tensors
    blocksize, scale, eps, need_dA, need_dB = ctx.meta
    dA, dB = _dora_row_norm_backward_op(
        grad_norm.contiguous(), norm, proj, weight, absmax, code, blocksize, lora_A, lora_B, scale, eps,
        need_dA, need_dB,
    )
    return None, None, None, None, None, dA if need_dA else None, dB if need_dB else None, None, None, None


_dora_row_norm_op.register_autograd(_norm_backward, setup_context=_norm_setup_context)


def weight_parts(weight: Union[Tensor, FourBitWeight]):
    if isinstance(weight, FourBitWeight):
        return weight.packed, weight.absmax, weight.code, weight.blocksize, weight.shape[0]
    return weight, None, None, 0, weight.shape[0]


def dora_row_norm(
    weight: Union[Tensor, FourBitWeight], lora_A: Tensor, lora_B: Tensor, weight_sq_norm: Tensor, scale: float,
    eps: float = NORM_EPS,
) -> Tensor:
    """Row norms ``n_i = max(‖W_i + scale·B_i A‖, eps)`` from ``weight_sq_norm`` = ‖W_i‖² (module docstring).

    ``weight`` is dense (of ``lora_A``'s dtype) or a :class:`FourBitWeight`; ``lora_A`` and ``lora_B`` share
    a dtype. The result has ``weight_sq_norm``'s dtype (float32 or float64). Differentiable in A and B
    (call it on detached factors, or under ``torch.no_grad()``, for the detached norm).
    """
    packed, absmax, code, blocksize, out_features = weight_parts(weight)
    if weight_sq_norm.shape != (out_features,):
        raise ValueError(f"dora_row_norm: weight_sq_norm must have shape ({out_features},), "
                         f"got {tuple(weight_sq_norm.shape)}")
    norm, _ = _dora_row_norm_op(packed, absmax, code, blocksize, out_features, lora_A, lora_B, weight_sq_norm,
                                float(scale), float(eps))
    return norm

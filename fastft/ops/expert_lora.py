"""The expert LoRA op: each MoE expert's frozen GEMM plus its own low-rank update, over tokens sorted by expert.

For x (S×K) holding the routed (token, expert) pairs sorted by expert, ``offsets`` (E+1, int64: expert e owns
rows ``offsets[e]:offsets[e+1]``), frozen fused expert weights W (E×O×K, or E×K×O when ``transposed``, the
layout transformers' MoE classes store), trainable A (E×R×K), B (E×O×R) and scale s::

    xa[rows e] = x[rows e] A_eᵀ                              (S×R)
    y[rows e]  = x[rows e] W_eᵀ + s · xa[rows e] B_eᵀ         (S×O)

one GEMM per expert segment (a grouped GEMM): B_e A_e is never formed, for any expert. Backward, for g = ∂L/∂y::

    gb[rows e] = g[rows e] B_e                               (S×R)
    dx[rows e] = g[rows e] W_e + s · gb[rows e] A_e
    dA_e = s · gb[rows e]ᵀ x[rows e]        dB_e = s · g[rows e]ᵀ xa[rows e]

Saved for backward: x (when A trains), xa, and the parameters; never y (the caller may modify it in place).
W gets no gradient. The PyTorch implementation here is the reference and runs on every device (one segment GEMM
per expert that received tokens; on CUDA these are cuBLAS GEMMs); no Triton kernel yet.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..dispatch import implementation, register_op


def _expert_weight(weight: Tensor, e: int, transposed: bool) -> Tensor:
    """Expert e's weight as K×O (a view)."""
    return weight[e] if transposed else weight[e].t()


def expert_lora_forward_reference(
    x: Tensor, offsets: Tensor, weight: Tensor, transposed: bool, lora_A: Tensor, lora_B: Tensor, scale: float,
) -> tuple[Tensor, Tensor]:
    """(y, xa) of the formula above, one segment GEMM per expert."""
    out_features = weight.shape[2] if transposed else weight.shape[1]
    y = x.new_zeros(x.shape[0], out_features)
    xa = x.new_zeros(x.shape[0], lora_A.shape[1])
    bounds = offsets.tolist()
    for e in range(len(bounds) - 1):
        lo, hi = bounds[e], bounds[e + 1]
        if hi <= lo:
            continue
        torch.mm(x[lo:hi], lora_A[e].t(), out=xa[lo:hi])
        torch.addmm(torch.mm(x[lo:hi], _expert_weight(weight, e, transposed)), xa[lo:hi], lora_B[e].t(),
                    alpha=scale, out=y[lo:hi])
    return y, xa


def expert_lora_backward_reference(
    grad_y: Tensor, x: Tensor, xa: Tensor, offsets: Tensor, weight: Tensor, transposed: bool, lora_A: Tensor,
    lora_B: Tensor, scale: float, need_dx: bool, need_dA: bool, need_dB: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB) of the formula above, empty where not needed."""
    dx = grad_y.new_zeros(grad_y.shape[0], lora_A.shape[2]) if need_dx else grad_y.new_empty(0)
    dA = torch.zeros_like(lora_A) if need_dA else grad_y.new_empty(0)
    dB = torch.zeros_like(lora_B) if need_dB else grad_y.new_empty(0)
    bounds = offsets.tolist()
    for e in range(len(bounds) - 1):
        lo, hi = bounds[e], bounds[e + 1]
        if hi <= lo:
            continue
        g = grad_y[lo:hi]
        gb = g @ lora_B[e] if (need_dx or need_dA) else None
        if need_dx:
            torch.addmm(g @ _expert_weight(weight, e, transposed).t(), gb, lora_A[e], alpha=scale, out=dx[lo:hi])
        if need_dA:
            torch.mm(gb.t(), x[lo:hi], out=dA[e]).mul_(scale)
        if need_dB:
            torch.mm(g.t(), xa[lo:hi], out=dB[e]).mul_(scale)
    return dx, dA, dB


register_op("expert_lora", {
    "torch": {"forward": expert_lora_forward_reference, "backward": expert_lora_backward_reference},
})


@torch.library.custom_op("fastft::expert_lora", mutates_args=())
def _expert_lora_op(
    x: Tensor, offsets: Tensor, weight: Tensor, transposed: bool, lora_A: Tensor, lora_B: Tensor, scale: float,
) -> tuple[Tensor, Tensor]:
    return implementation("expert_lora", "forward", x.device)(x, offsets, weight, transposed, lora_A, lora_B, scale)


@_expert_lora_op.register_fake
def _(x, offsets, weight, transposed, lora_A, lora_B, scale):
    out_features = weight.shape[2] if transposed else weight.shape[1]
    return x.new_empty(x.shape[0], out_features), x.new_empty(x.shape[0], lora_A.shape[1])


@torch.library.custom_op("fastft::expert_lora_backward", mutates_args=())
def _expert_lora_backward_op(
    grad_y: Tensor, x: Tensor, xa: Tensor, offsets: Tensor, weight: Tensor, transposed: bool, lora_A: Tensor,
    lora_B: Tensor, scale: float, need_dx: bool, need_dA: bool, need_dB: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    args = (grad_y, x, xa, offsets, weight, transposed, lora_A, lora_B, scale, need_dx, need_dA, need_dB)
    return implementation("expert_lora", "backward", grad_y.device)(*args)


@_expert_lora_backward_op.register_fake
def _(grad_y, x, xa, offsets, weight, transposed, lora_A, lora_B, scale, need_dx, need_dA, need_dB):
    empty = grad_y.new_empty(0)
    return (grad_y.new_empty(grad_y.shape[0], lora_A.shape[2]) if need_dx else empty,
            lora_A.new_empty(lora_A.shape) if need_dA else grad_y.new_empty(0),
            lora_B.new_empty(lora_B.shape) if need_dB else grad_y.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, offsets, weight, transposed, lora_A, lora_B, scale = inputs
    _, xa = output
    need_dx, need_dA, need_dB = ctx.needs_input_grad[0], ctx.needs_input_grad[4], ctx.needs_input_grad[5]
    ctx.save_for_backward(x if need_dA else None, xa, offsets, weight, lora_A, lora_B)
    ctx.meta = (transposed, scale, need_dx, need_dA, need_dB)


def _backward(ctx, grad_y, _grad_xa):
    x, xa, offsets, weight, lora_A, lora_B = ctx.saved_tensors
    transposed, scale, need_dx, need_dA, need_dB = ctx.meta
    dx, dA, dB = _expert_lora_backward_op(
        grad_y.contiguous(), xa.new_empty(0) if x is None else x, xa, offsets, weight, transposed, lora_A, lora_B,
        scale, need_dx, need_dA, need_dB)
    return (dx if need_dx else None, None, None, None, dA if need_dA else None, dB if need_dB else None, None)


_expert_lora_op.register_autograd(_backward, setup_context=_setup_context)


def expert_lora(
    x: Tensor, offsets: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, transposed: bool = False,
) -> Tensor:
    """``y[rows e] = x[rows e] W_eᵀ + scale · x[rows e] A_eᵀ B_eᵀ`` for tokens sorted by expert (module docstring).

    ``offsets`` is an int64 tensor of E+1 row boundaries; ``lora_A``, ``lora_B`` and ``weight`` in ``x``'s dtype.
    """
    if x.dim() != 2 or x.shape[1] != lora_A.shape[2]:
        raise ValueError(f"expert_lora: x must be S×{lora_A.shape[2]}, got {tuple(x.shape)}")
    if offsets.shape != (weight.shape[0] + 1,):
        raise ValueError(f"expert_lora: offsets must have {weight.shape[0] + 1} entries, got {tuple(offsets.shape)}")
    y, _ = _expert_lora_op(x.contiguous(), offsets.to(torch.int64), weight, bool(transposed), lora_A, lora_B,
                           float(scale))
    return y

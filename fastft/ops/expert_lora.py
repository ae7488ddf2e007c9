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
W gets no gradient. The PyTorch implementation here is the reference and runs on every device: its segment GEMMs
go through :mod:`fastft.ops.grouped_gemm`, one ``torch._grouped_mm`` per product on CUDA sm90+ in bfloat16 (aligned
shapes), one GEMM per expert segment elsewhere (cuBLAS on CUDA). No Triton kernel.

FLOPs (2 per multiply-add), for S routed rows: forward ``2·S·K·O + 2·S·R·(K + O)``; backward ``2·S·K·O`` (dx's
frozen product) ``+ 2·S·R·(K + O)`` (gb, dx's low-rank term) ``+ 2·S·R·K`` (dA) ``+ 2·S·R·O`` (dB):
:func:`expert_lora_flops`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..dispatch import implementation, register_op
from .grouped_gemm import segment_mm, segment_mm_t, segment_path


def expert_path(x: Tensor, weight: Tensor, lora_A: Tensor) -> str:
    """``"grouped"`` or ``"loop"``: how this call runs its segment GEMMs (:mod:`fastft.ops.grouped_gemm`)."""
    return segment_path(x.device, x.dtype, (x.shape[1], weight.shape[1], weight.shape[2], lora_A.shape[1]))


def expert_lora_forward_reference(
    x: Tensor, offsets: Tensor, weight: Tensor, transposed: bool, lora_A: Tensor, lora_B: Tensor, scale: float,
) -> tuple[Tensor, Tensor]:
    """(y, xa) of the formula above, through segment GEMMs (one per expert, or one grouped GEMM)."""
    path = expert_path(x, weight, lora_A)
    xa = segment_mm(x, lora_A.transpose(1, 2), offsets, path)
    w = weight if transposed else weight.transpose(1, 2)  # E×K×O views
    y = segment_mm(x, w, offsets, path)
    if scale != 0.0:
        y.add_(segment_mm(xa, lora_B.transpose(1, 2), offsets, path), alpha=scale)
    return y, xa


def expert_lora_backward_reference(
    grad_y: Tensor, x: Tensor, xa: Tensor, offsets: Tensor, weight: Tensor, transposed: bool, lora_A: Tensor,
    lora_B: Tensor, scale: float, need_dx: bool, need_dA: bool, need_dB: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB) of the formula above, empty where not needed."""
    path = expert_path(grad_y, weight, lora_A)
    gb = segment_mm(grad_y, lora_B, offsets, path) if (need_dx or need_dA) else None
    dx, dA, dB = grad_y.new_empty(0), grad_y.new_empty(0), grad_y.new_empty(0)  # distinct: no aliased returns
    if need_dx:
        w = weight.transpose(1, 2) if transposed else weight  # E×O×K views
        dx = segment_mm(grad_y, w, offsets, path).add_(segment_mm(gb, lora_A, offsets, path), alpha=scale)
    if need_dA:
        dA = segment_mm_t(gb, x, offsets, path).mul_(scale)
    if need_dB:
        dB = segment_mm_t(grad_y, xa, offsets, path).mul_(scale)
    return dx, dA, dB


def expert_lora_flops(S: int, K: int, O: int, R: int, backward: bool = True) -> int:
    """FLOPs of one expert_lora call over S routed rows (module docstring; every gradient computed)."""
    forward = 2 * S * K * O + 2 * S * R * (K + O)
    return forward + (2 * S * K * O + 4 * S * R * (K + O) if backward else 0)


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

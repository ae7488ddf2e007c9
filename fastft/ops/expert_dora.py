"""The expert DoRA op: DoRA on every expert of a fused MoE block, over tokens sorted by expert.

Per expert e, with frozen W_e (O×K; stored E×K×O when ``transposed``), trainable A_e (R×K), B_e (O×R) and
magnitude m_e (O)::

    W'_e = diag(g_e) (W_e + s·B_e A_e),    g_e = m_e / n_e,    n_e,i = ‖W_e,i + s·B_e,i A_e‖   (a norm per output row)

For x (S×K) holding the routed (token, expert) pairs sorted by expert and ``offsets`` as in
:mod:`fastft.ops.expert_lora`, ``expert_dora(x, offsets, W, A, B, g, s) -> y``::

    xa[rows e] = x[rows e] A_eᵀ,    z[rows e] = x[rows e] W_eᵀ + s·xa[rows e] B_eᵀ,    y[rows e] = g_e ⊙ z[rows e]

(the segment GEMMs of expert_lora: one per expert, or one ``torch._grouped_mm``; B_e A_e is never formed).
Backward, for gy = ∂L/∂y and gz = g_e ⊙ gy on the rows of e::

    dx, dA, dB = expert_lora's backward of gz        dg_e = Σ_(rows e) gy ⊙ z      (a segment sum, no atomics)

Saved for backward: x (when A trains), xa, and z when g needs a gradient (a buffer of its own, never y: the
caller may modify y in place); W, A, B, g are the caller's tensors. W gets no gradient.

The norms come from :func:`expert_row_norm`, plain differentiable PyTorch on the factors (no op of its own)::

    n_e,i² = ‖W_e,i‖² + 2s·B_e,i·P_e,i + s²·B_e,i G_e B_e,iᵀ,     P_e = W_e A_eᵀ (O×R),  G_e = A_e A_eᵀ (R×R)

one E×O×K×R batched product (P) and E×O×R×R work per call; ‖W_e,i‖² is a constant of the frozen weight the
caller computes once; W_e + s·B_e A_e is never formed. In float32 (float64 for float64), clamped at
``fastft.ops.dora.NORM_EPS`` as the linear DoRA does.

FLOPs, S routed rows: forward ``2·S·K·O + 2·S·R·(K+O) + S·O`` (the scale), norm ``2·E·O·K·R + 2·E·R²·(K+O)``,
backward expert_lora's plus ``3·S·O`` (gz, dg): :func:`expert_dora_flops`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..dispatch import implementation, register_op
from .dora_row_norm import NORM_EPS, norm_dtype
from .expert_lora import expert_lora_backward_reference, expert_lora_flops, expert_lora_forward_reference


def row_experts(offsets: Tensor, rows: int) -> Tensor:
    """The expert of each of ``rows`` sorted rows (rows past ``offsets[-1]`` get the last expert; their z is 0)."""
    ends = offsets[1:]
    ids = torch.searchsorted(ends, torch.arange(rows, device=offsets.device), right=True)
    return ids.clamp_(max=ends.shape[0] - 1)


def expert_row_norm(weight: Tensor, transposed: bool, lora_A: Tensor, lora_B: Tensor, weight_sq_norm: Tensor,
                    scale: float, eps: float = NORM_EPS, experts_per_chunk: int | None = None) -> Tensor:
    """n (E×O): ``‖W_e,i + s·B_e,i A_e‖`` from the factors (module docstring), differentiable in A and B.

    W is converted to the norm dtype a few experts at a time (``experts_per_chunk``, default: about 4M elements)."""
    dtype = norm_dtype(lora_A.dtype if lora_A.dtype == torch.float64 else weight.dtype)
    A, B = lora_A.to(dtype), lora_B.to(dtype)
    E, O, K = weight.shape[0], B.shape[1], A.shape[2]
    step = experts_per_chunk or max(1, (1 << 22) // max(1, O * K))
    parts = []
    for lo in range(0, E, step):
        w = weight[lo:lo + step].to(dtype)
        w = w.transpose(1, 2) if transposed else w  # chunk×O×K
        parts.append(torch.bmm(w, A[lo:lo + step].transpose(1, 2)))  # P: chunk×O×R
    P = torch.cat(parts) if len(parts) > 1 else parts[0]
    G = torch.bmm(A, A.transpose(1, 2))  # E×R×R
    q = weight_sq_norm.to(dtype) + 2 * scale * (B * P).sum(-1) + scale * scale * (torch.bmm(B, G) * B).sum(-1)
    return q.clamp_min(0).sqrt().clamp_min(eps)


def expert_dora_forward_reference(
    x: Tensor, offsets: Tensor, weight: Tensor, transposed: bool, lora_A: Tensor, lora_B: Tensor, g: Tensor,
    scale: float, keep_pre_scale: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, xa, z) of the formula above; z is empty unless ``keep_pre_scale``."""
    z, xa = expert_lora_forward_reference(x, offsets, weight, transposed, lora_A, lora_B, scale)
    y = z * g.to(z.dtype)[row_experts(offsets, x.shape[0])]
    return y, xa, (z if keep_pre_scale else z.new_empty(0))


def expert_dora_backward_reference(
    grad_y: Tensor, x: Tensor, xa: Tensor, z: Tensor, offsets: Tensor, weight: Tensor, transposed: bool,
    lora_A: Tensor, lora_B: Tensor, g: Tensor, scale: float, need_dx: bool, need_dA: bool, need_dB: bool,
    need_dg: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dg) of the formula above, empty where not needed."""
    ids = row_experts(offsets, grad_y.shape[0])
    gz = grad_y * g.to(grad_y.dtype)[ids]
    dx, dA, dB = expert_lora_backward_reference(gz, x, xa, offsets, weight, transposed, lora_A, lora_B, scale,
                                                need_dx, need_dA, need_dB)
    dg = grad_y.new_empty(0)
    if need_dg:
        dg = torch.segment_reduce((grad_y * z).to(g.dtype), "sum", offsets=offsets, axis=0, initial=0)
    return dx, dA, dB, dg


register_op("expert_dora", {
    "torch": {"forward": expert_dora_forward_reference, "backward": expert_dora_backward_reference},
})


@torch.library.custom_op("fastft::expert_dora", mutates_args=())
def _expert_dora_op(
    x: Tensor, offsets: Tensor, weight: Tensor, transposed: bool, lora_A: Tensor, lora_B: Tensor, g: Tensor,
    scale: float, keep_pre_scale: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return implementation("expert_dora", "forward", x.device)(x, offsets, weight, transposed, lora_A, lora_B, g,
                                                             scale, keep_pre_scale)


@_expert_dora_op.register_fake
def _(x, offsets, weight, transposed, lora_A, lora_B, g, scale, keep_pre_scale):
    out_features = weight.shape[2] if transposed else weight.shape[1]
    y = x.new_empty(x.shape[0], out_features)
    return y, x.new_empty(x.shape[0], lora_A.shape[1]), (x.new_empty(y.shape) if keep_pre_scale else x.new_empty(0))


@torch.library.custom_op("fastft::expert_dora_backward", mutates_args=())
def _expert_dora_backward_op(
    grad_y: Tensor, x: Tensor, xa: Tensor, z: Tensor, offsets: Tensor, weight: Tensor, transposed: bool,
    lora_A: Tensor, lora_B: Tensor, g: Tensor, scale: float, need_dx: bool, need_dA: bool, need_dB: bool,
    need_dg: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    args = (grad_y, x, xa, z, offsets, weight, transposed, lora_A, lora_B, g, scale, need_dx, need_dA, need_dB, need_dg)
    return implementation("expert_dora", "backward", grad_y.device)(*args)


@_expert_dora_backward_op.register_fake
def _(grad_y, x, xa, z, offsets, weight, transposed, lora_A, lora_B, g, scale, need_dx, need_dA, need_dB, need_dg):
    empty = grad_y.new_empty(0)
    return (grad_y.new_empty(grad_y.shape[0], lora_A.shape[2]) if need_dx else empty,
            lora_A.new_empty(lora_A.shape) if need_dA else grad_y.new_empty(0),
            lora_B.new_empty(lora_B.shape) if need_dB else grad_y.new_empty(0),
            g.new_empty(g.shape) if need_dg else grad_y.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, offsets, weight, transposed, lora_A, lora_B, g, scale, _keep = inputs
    _, xa, z = output
    need = (ctx.needs_input_grad[0], ctx.needs_input_grad[4], ctx.needs_input_grad[5], ctx.needs_input_grad[6])
    ctx.save_for_backward(x if need[1] else None, xa, z if need[3] else None, offsets, weight, lora_A, lora_B, g)
    ctx.meta = (transposed, scale) + need


def _backward(ctx, grad_y, _grad_xa, _grad_z):
    x, xa, z, offsets, weight, lora_A, lora_B, g = ctx.saved_tensors
    transposed, scale, need_dx, need_dA, need_dB, need_dg = ctx.meta
    empty = xa.new_empty(0)
    dx, dA, dB, dg = _expert_dora_backward_op(
        grad_y.contiguous(), empty if x is None else x, xa, empty if z is None else z, offsets, weight, transposed,
        lora_A, lora_B, g, scale, need_dx, need_dA, need_dB, need_dg)
    return (dx if need_dx else None, None, None, None, dA if need_dA else None, dB if need_dB else None,
            dg if need_dg else None, None, None)


_expert_dora_op.register_autograd(_backward, setup_context=_setup_context)


def expert_dora(
    x: Tensor, offsets: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, g: Tensor, scale: float,
    transposed: bool = False,
) -> Tensor:
    """``y[rows e] = g_e ⊙ (x W_eᵀ + s·x A_eᵀ B_eᵀ)[rows e]`` for tokens sorted by expert (module docstring).

    ``g`` (E×O) is m / n from :func:`expert_row_norm`; ``offsets`` an int64 tensor of E+1 row boundaries."""
    if x.dim() != 2 or x.shape[1] != lora_A.shape[2]:
        raise ValueError(f"expert_dora: x must be S×{lora_A.shape[2]}, got {tuple(x.shape)}")
    out_features = weight.shape[2] if transposed else weight.shape[1]
    if offsets.shape != (weight.shape[0] + 1,) or g.shape != (weight.shape[0], out_features):
        raise ValueError(f"expert_dora: offsets must have {weight.shape[0] + 1} entries and g be "
                         f"{(weight.shape[0], out_features)}; got {tuple(offsets.shape)}, {tuple(g.shape)}")
    y, _, _ = _expert_dora_op(x.contiguous(), offsets.to(torch.int64), weight, bool(transposed), lora_A, lora_B, g,
                              float(scale), bool(g.requires_grad))
    return y


def expert_dora_flops(S: int, E: int, K: int, O: int, R: int, backward: bool = True) -> int:
    """FLOPs of one expert_dora call plus its norms (module docstring)."""
    norm = 2 * E * O * K * R + 2 * E * R * R * (K + O)
    forward = expert_lora_flops(S, K, O, R, backward=False) + S * O
    return norm + forward + (expert_lora_flops(S, K, O, R) - expert_lora_flops(S, K, O, R, False) + 3 * S * O
                             if backward else 0)

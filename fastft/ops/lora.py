"""The LoRA linear op: a frozen base GEMM plus a trainable low-rank update, with a lean backward.

Forward, for x (N×K), frozen W (O×K, dense or bitsandbytes 4-bit), optional frozen bias b (O),
trainable A (R×K), B (O×R), scale s, and an optional dropout mask m with keep probability 1-p::

    x̃  = x ⊙ m / (1 - p)          (x̃ = x without dropout)
    xa = x̃ Aᵀ                      (N×R)
    y  = x Wᵀ + b + s · xa Bᵀ      (N×O)

Backward, for the upstream gradient g = ∂L/∂y (N×O)::

    gb = g B                       (N×R)
    dx = g W + s · (gb A) ⊙ m / (1 - p)
    dA = s · gbᵀ x̃                 (R×K)
    dB = s · gᵀ xa                 (O×R)

What is saved for backward: ``xa`` always (dB needs it), ``x`` only when A trains (dA needs x̃, which
is rebuilt from x and the mask), and the boolean mask with dropout. The base output, x̃ and the
dequantized weight are never saved; W is re-read (re-dequantized for a 4-bit base) in backward.
W and b receive no gradient.

Trainable diagonal (LoLDU): with an optional ``scale_vector`` d (R) between the factors::

    y  = x Wᵀ + b + s · (xa ⊙ d) Bᵀ            (= the formula above with B_d = B diag(d))
    dd = Σ_tokens xa ⊙ (g B) · s = Σ_out B ⊙ dB_d      (dB_d = s · gᵀ xa, the plain dB of B_d)
    dB = dB_d diag(d);   dx, dA as above with B_d

d is folded into B (``B_d = B diag(d)``, O×R elementwise) before every backend, so each backend (torch,
Triton fused or cuBLAS path) runs the same kernels on ``B_d``; dd is reduced from the backend's ``dB_d``
(computed when B or d trains) with the saved B. Nothing more is saved than ``d`` itself: B is saved already.

Registered as the ``torch.library`` ops ``fastft::lora_linear`` and ``fastft::lora_linear_backward``
(with fake kernels, so ``torch.compile`` traces through them). The PyTorch implementation here is the
reference and runs on every device; the Triton kernels in ``fastft.kernels.lora`` run on CUDA.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ..config import check_number
from ..dispatch import implementation, lazy, register_op
from ..node_costs import custom_op_node
from .dequantize_4bit import FourBitWeight, dequantize_4bit

def _dense_weight(weight: Tensor, absmax: Optional[Tensor], code: Optional[Tensor], blocksize: int, shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    if absmax is None:
        return weight
    return dequantize_4bit(weight, absmax, code, blocksize, shape, dtype)


def _dropped(x: Tensor, mask: Optional[Tensor], p: float) -> Tensor:
    if mask is None:
        return x
    return x * mask * (1.0 / (1.0 - p))


def lora_forward_reference(
    x: Tensor, weight: Tensor, absmax: Optional[Tensor], code: Optional[Tensor], blocksize: int, out_features: int,
    bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scale: float, mask: Optional[Tensor], p: float,
) -> tuple[Tensor, Tensor]:
    """Forward of the formula above in PyTorch; returns (y, xa)."""
    w = _dense_weight(weight, absmax, code, blocksize, (out_features, x.shape[1]), x.dtype)
    xa = _dropped(x, mask, p) @ lora_A.t()
    y = torch.nn.functional.linear(x, w, bias)
    y.addmm_(xa, lora_B.t(), alpha=scale)
    return y, xa


def lora_backward_reference(
    grad_y: Tensor, x: Tensor, xa: Tensor, weight: Tensor, absmax: Optional[Tensor], code: Optional[Tensor],
    blocksize: int, in_features: int, lora_A: Tensor, lora_B: Tensor, scale: float, mask: Optional[Tensor], p: float,
    need_dx: bool, need_dA: bool, need_dB: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of the formula above in PyTorch; returns (dx, dA, dB), empty where not needed."""
    gb = grad_y @ lora_B if (need_dx or need_dA) else None
    if need_dx:
        w = _dense_weight(weight, absmax, code, blocksize, (grad_y.shape[1], in_features), grad_y.dtype)
        dx = grad_y @ w
        if mask is None:
            dx.addmm_(gb, lora_A, alpha=scale)
        else:
            dx.add_((gb @ lora_A) * mask, alpha=scale / (1.0 - p))
    else:
        dx = grad_y.new_empty(0)  # distinct empties: a custom op's outputs may not alias one another
    dA = _scaled_mm(gb.t(), _dropped(x, mask, p), scale) if need_dA else grad_y.new_empty(0)
    dB = _scaled_mm(grad_y.t(), xa, scale) if need_dB else grad_y.new_empty(0)
    return dx, dA, dB


def _scaled_mm(a: Tensor, b: Tensor, scale: float) -> Tensor:
    """``scale · a @ b`` in one call (alpha = scale; beta = 0 ignores the uninitialised output)."""
    if scale == 1.0:
        return torch.mm(a, b)
    return a.new_empty(a.shape[0], b.shape[1]).addmm_(a, b, beta=0.0, alpha=scale)


def lora_linear_backward_flops(node, grad_shape):
    """FLOP formula of the backward (:mod:`fastft.node_costs`): for N tokens, in K, out O, rank R::

        gb = g B      2·N·O·R   when x or A needs grad
        dx = g W + s·gb A       2·N·K·O + 2·N·R·K   when x needs grad
        dA = s·gbᵀ x̃  2·N·R·K   when A trains
        dB = s·gᵀ xa  2·N·O·R   when B trains

    The tensor inputs are x, weight, [absmax, code], [bias], lora_A, lora_B, [d] (no dropout mask: the graph
    is read in eval mode), so x is edge 0 and A, B are the last two (before the diagonal d when there is one:
    LoLDU). With d, dd = Σ_out B ⊙ dB_d reuses the product of dB (2·N·O·R, when B or d trains).
    """
    saved = node.saved_tensors
    xa, lora_B = saved[1], saved[6]
    has_vector = len(saved) > 8 and saved[8] is not None
    in_features = node.meta[1]
    tokens, rank = xa.shape
    out_features = lora_B.shape[0]
    last = len(node.next_functions) - 1
    a_edge, b_edge = (last - 2, last - 1) if has_vector else (last - 1, last)
    return [
        (2 * tokens * out_features * rank, (0, a_edge)),
        (2 * tokens * in_features * out_features + 2 * tokens * rank * in_features, (0,)),
        (2 * tokens * rank * in_features, (a_edge,)),
        (2 * tokens * out_features * rank, (b_edge, last) if has_vector else (b_edge,)),
    ]


register_op("lora_linear", {
    "torch": {"forward": lora_forward_reference, "backward": lora_backward_reference},
    # two paths (fastft.dispatch.choose_path): base GEMMs by cuBLAS, or the fused Triton GEMM kernels
    "triton": lazy("fastft.kernels.lora", **{
        "forward@cublas": "lora_forward_cublas", "forward@triton": "lora_forward",
        "backward@cublas": "lora_backward_cublas", "backward@triton": "lora_backward",
    }),
}, node_costs={
    custom_op_node("lora_linear"): lora_linear_backward_flops,
    "_LoRALinearEagerBackward": lora_linear_backward_flops,  # the same op without the custom-op machinery
})


@torch.library.custom_op("fastft::lora_linear", mutates_args=())
def _lora_linear_op(
    x: Tensor, weight: Tensor, absmax: Optional[Tensor], code: Optional[Tensor], blocksize: int, out_features: int,
    bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scale: float, mask: Optional[Tensor], p: float,
    scale_vector: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    args = (x, weight, absmax, code, blocksize, out_features, bias, lora_A, _with_vector(lora_B, scale_vector),
            scale, mask, p)
    return implementation("lora_linear", "forward", x.device)(*args)


def _with_vector(lora_B: Tensor, scale_vector: Optional[Tensor]) -> Tensor:
    """``B diag(d)`` (the factor every backend sees), or B itself without a vector."""
    return lora_B if scale_vector is None else lora_B * scale_vector


def _vector_grads(dB_d: Tensor, lora_B: Tensor, scale_vector: Tensor, need_dB: bool, need_dd: bool):
    """(dB, dd) from the backend's gradient of ``B_d = B diag(d)``."""
    dd = (dB_d * lora_B).sum(0) if need_dd else dB_d.new_empty(0)
    dB = dB_d * scale_vector if need_dB else dB_d.new_empty(0)
    return dB, dd


@_lora_linear_op.register_fake
def _(x, weight, absmax, code, blocksize, out_features, bias, lora_A, lora_B, scale, mask, p, scale_vector=None):
    return x.new_empty(x.shape[0], out_features), x.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.custom_op("fastft::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(
    grad_y: Tensor, x: Tensor, xa: Tensor, weight: Tensor, absmax: Optional[Tensor], code: Optional[Tensor],
    blocksize: int, in_features: int, lora_A: Tensor, lora_B: Tensor, scale: float, mask: Optional[Tensor], p: float,
    need_dx: bool, need_dA: bool, need_dB: bool, scale_vector: Optional[Tensor] = None, need_dd: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _backward_impl(grad_y, x, xa, weight, absmax, code, blocksize, in_features, lora_A, lora_B, scale, mask, p,
                          need_dx, need_dA, need_dB, scale_vector, need_dd)


def _backward_impl(grad_y, x, xa, weight, absmax, code, blocksize, in_features, lora_A, lora_B, scale, mask, p,
                   need_dx, need_dA, need_dB, scale_vector, need_dd):
    """The backend's backward on ``B diag(d)``, then dB and dd from its dB (see the module docstring)."""
    backward = implementation("lora_linear", "backward", grad_y.device)
    if scale_vector is None:
        dx, dA, dB = backward(grad_y, x, xa, weight, absmax, code, blocksize, in_features, lora_A, lora_B, scale,
                              mask, p, need_dx, need_dA, need_dB)
        return dx, dA, dB, grad_y.new_empty(0)
    dx, dA, dB_d = backward(grad_y, x, xa, weight, absmax, code, blocksize, in_features, lora_A,
                            _with_vector(lora_B, scale_vector), scale, mask, p, need_dx, need_dA, need_dB or need_dd)
    if not (need_dB or need_dd):
        return dx, dA, dB_d, grad_y.new_empty(0)
    dB, dd = _vector_grads(dB_d, lora_B, scale_vector, need_dB, need_dd)
    return dx, dA, dB, dd


@_lora_linear_backward_op.register_fake
def _(grad_y, x, xa, weight, absmax, code, blocksize, in_features, lora_A, lora_B, scale, mask, p, need_dx, need_dA, need_dB,
      scale_vector=None, need_dd=False):
    return (
        grad_y.new_empty(grad_y.shape[0], in_features) if need_dx else grad_y.new_empty(0),
        grad_y.new_empty(lora_A.shape) if need_dA else grad_y.new_empty(0),
        grad_y.new_empty(lora_B.shape) if need_dB else grad_y.new_empty(0),
        grad_y.new_empty(lora_B.shape[1]) if need_dd else grad_y.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, weight, absmax, code, blocksize, out_features, bias, lora_A, lora_B, scale, mask, p = inputs[:12]
    scale_vector = inputs[12] if len(inputs) > 12 else None
    _, xa = output
    need_dx, need_dA, need_dB = ctx.needs_input_grad[0], ctx.needs_input_grad[7], ctx.needs_input_grad[8]
    need_dd = scale_vector is not None and ctx.needs_input_grad[12]
    keep_x = x if need_dA else None
    keep_mask = mask if (need_dx or need_dA) else None
    ctx.save_for_backward(keep_x, xa, weight, absmax, code, lora_A, lora_B, keep_mask, scale_vector)
    ctx.meta = (blocksize, x.shape[1], scale, p, need_dx, need_dA, need_dB, need_dd)


def _grads(ctx, dx, dA, dB, dd) -> tuple:
    _, _, _, _, need_dx, need_dA, need_dB, need_dd = ctx.meta
    return (
        dx if need_dx else None, None, None, None, None, None, None,
        dA if need_dA else None, dB if need_dB else None, None, None, None, dd if need_dd else None,
    )


def _backward(ctx, grad_y, _grad_xa):
    x, xa, weight, absmax, code, lora_A, lora_B, mask, scale_vector = ctx.saved_tensors
    blocksize, in_features, scale, p, need_dx, need_dA, need_dB, need_dd = ctx.meta
    if x is None:
        x = xa.new_empty(0)
    grads = _lora_linear_backward_op(
        grad_y.contiguous(), x, xa, weight, absmax, code, blocksize, in_features, lora_A, lora_B, scale, mask, p,
        need_dx, need_dA, need_dB, scale_vector, need_dd,
    )
    return _grads(ctx, *grads)


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


def check_low_rank_args(what: str, weight, bias, lora_A: Tensor, lora_B: Tensor, scale, dropout_p) -> None:
    """The shapes of W (out×in), b (out), A (r×in), B (out×r), a finite scale and a dropout in [0, 1)."""
    check_number(f"{what}: scale", scale, hint="s = alpha / r; give a finite number.")
    check_number(f"{what}: dropout_p", dropout_p, low=0.0, high=1.0, high_open=True)
    if lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(f"{what}: lora_A (r×in) and lora_B (out×r) must be 2-D, got {tuple(lora_A.shape)}, {tuple(lora_B.shape)}")
    out_features, in_features = weight.shape[0], weight.shape[1]
    if lora_A.shape[1] != in_features or lora_B.shape != (out_features, lora_A.shape[0]):
        raise ValueError(
            f"{what}: weight is {out_features}×{in_features}, so lora_A must be r×{in_features} and lora_B "
            f"{out_features}×r; got lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}."
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"{what}: bias must have shape ({out_features},), got {tuple(bias.shape)}")


class _LoRALinearEager(torch.autograd.Function):
    """The same forward, context and backward as the custom op, without the custom-op machinery.

    Eager calls on plain tensors take this route (host overhead: the custom op's Python dispatch, default
    filling and alias checks cost more than the layer's math at a few tokens); under ``torch.compile``, fake
    tensors or tensor subclasses the ``torch.library`` op runs, so tracing sees one opaque op as before.
    """

    @staticmethod
    def forward(ctx, x, weight, absmax, code, blocksize, out_features, bias, lora_A, lora_B, scale, mask, p,
                scale_vector=None):
        y, xa = implementation("lora_linear", "forward", x.device)(
            x, weight, absmax, code, blocksize, out_features, bias, lora_A, _with_vector(lora_B, scale_vector),
            scale, mask, p)
        _setup_context(ctx, (x, weight, absmax, code, blocksize, out_features, bias, lora_A, lora_B, scale, mask, p,
                             scale_vector), (y, xa))
        return y  # xa is only saved: one output, no non-differentiable second output to track

    @staticmethod
    def backward(ctx, grad_y):
        x, xa, weight, absmax, code, lora_A, lora_B, mask, scale_vector = ctx.saved_tensors
        blocksize, in_features, scale, p, need_dx, need_dA, need_dB, need_dd = ctx.meta
        if x is None:
            x = xa.new_empty(0)
        grads = _backward_impl(
            grad_y.contiguous(), x, xa, weight, absmax, code, blocksize, in_features, lora_A, lora_B, scale, mask, p,
            need_dx, need_dA, need_dB, scale_vector, need_dd)
        return _grads(ctx, *grads)


_PLAIN = (Tensor, torch.nn.Parameter)


def _eager(*tensors: Optional[Tensor]) -> bool:
    """True when the call may skip the custom op: eager mode, plain tensors only (no fake or subclass)."""
    if torch.compiler.is_compiling():
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


def lora_linear(
    x: Tensor,
    weight: Union[Tensor, FourBitWeight],
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    dropout_mask: Optional[Tensor] = None,
    scale_vector: Optional[Tensor] = None,
) -> Tensor:
    """``x Wᵀ + b + scale · (dropout(x) Aᵀ) Bᵀ`` over the last dimension of ``x`` (see the module docstring).

    ``weight`` is a dense (out×in) tensor of ``x``'s dtype or a :class:`~fastft.ops.dequantize_4bit.FourBitWeight`;
    ``lora_A``, ``lora_B`` and ``bias`` must already be in ``x``'s dtype. ``dropout_mask`` is a boolean
    tensor of ``x``'s shape (True = keep) or None for no dropout. ``scale_vector`` (r, ``x``'s dtype) is the
    diagonal d between the factors: ``scale · ((dropout(x) Aᵀ) ⊙ d) Bᵀ`` (LoLDU), with its gradient.
    """
    check_low_rank_args("lora_linear", weight, bias, lora_A, lora_B, scale, dropout_p)
    if scale_vector is not None and tuple(scale_vector.shape) != (lora_A.shape[0],):
        raise ValueError(f"lora_linear: scale_vector must have shape ({lora_A.shape[0]},) (the rank), "
                         f"got {tuple(scale_vector.shape)}")
    in_features = lora_A.shape[1]
    if x.shape[-1] != in_features:
        raise ValueError(f"lora_linear: input's last dimension is {x.shape[-1]}, the layer expects {in_features}")
    flat = x.dim() == 2  # (tokens, features) already: no reshape either way
    x2 = x if flat else x.reshape(-1, in_features)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    mask2 = None
    if dropout_mask is not None and dropout_p > 0.0:
        mask2 = dropout_mask if flat else dropout_mask.reshape(-1, in_features)
    if isinstance(weight, FourBitWeight):
        args = (x2, weight.packed, weight.absmax, weight.code, weight.blocksize, weight.shape[0], bias,
                lora_A, lora_B, float(scale), mask2, float(dropout_p))
    else:
        args = (x2, weight, None, None, 0, weight.shape[0], bias, lora_A, lora_B, float(scale), mask2, float(dropout_p))
    if scale_vector is not None:
        args = args + (scale_vector,)
    if _eager(x2, args[1], bias, lora_A, lora_B, scale_vector):
        y = _LoRALinearEager.apply(*args)
    else:
        y, _ = _lora_linear_op(*args)
    return y if flat else y.reshape(*x.shape[:-1], args[5])

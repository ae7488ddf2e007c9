"""The fake-quantized-weight linear op of QAT: ``y = x · Q_w(W + s·BA)ᵀ + b``, with a lean backward.

For an input x (N×K, already fake-quantized by the caller), a weight W (O×K), an optional bias b, an
optional low-rank update (A: R×K, B: O×R, scale s; absent: W_eff = W) and the weight fake quantizer
``Q_w`` (``fastft.ops.fake_quantize`` with fixed settings)::

    W_eff = W + s · B A            (in the adapters' dtype when there is an update)
    y     = x · Q_w(W_eff)ᵀ + b

Backward, for g = ∂L/∂y (N×O), with the straight-through estimator of ``Q_w`` (``M`` = 1 for
``ste="identity"``, the "not clamped" mask of W_eff for ``"clipped"``)::

    dx     = g · Q_w(W_eff)
    dW_eff = M ⊙ (gᵀ x)            (O×K)
    dW     = dW_eff                                          (W trains: QAT alone)
    dA     = s · Bᵀ dW_eff,  dB = s · dW_eff Aᵀ              (LoRA under QAT)
           = s · (g B)ᵀ x,   = s · gᵀ (x Aᵀ)   when M = 1: no O×K product is formed
    db     = Σ_rows g

Saved for backward: x alone (W, A, B are parameters). ``Q_w(W_eff)`` is not kept: the backward
recomputes it (an elementwise pass over W, plus the rank-R product B·A), which is what keeps a QAT
training step's memory at the level of plain LoRA instead of holding a quantized copy of every weight.
The gradients are exactly those of the plain autograd composition ``F.linear(x, fake_quantize(W + s·B@A), b)``.

Registered with the dispatch as a *composite* op (``register_op(..., composite=True)``): its reference
entries run under every backend, since its products are torch matmuls and ``Q_w`` is
``fastft.ops.fake_quantize``, which dispatches itself. It stays a ``torch.autograd.Function`` (not a
``torch.library`` op) because ``Q_w`` is a Python callable, which an op schema cannot carry.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..dispatch import implementation, register_op
from ..node_costs import rows

Quantizer = Callable[[Tensor], Tensor]


def effective_weight(weight: Tensor, lora_A: Optional[Tensor], lora_B: Optional[Tensor], scale: float) -> Tensor:
    """``W`` or ``W + s·BA`` (in the adapters' dtype)."""
    if lora_A is None:
        return weight
    return weight.to(lora_A.dtype) + scale * (lora_B @ lora_A)


def quant_linear_forward_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Optional[Tensor],
                                   lora_B: Optional[Tensor], scale: float, quantizer: Quantizer) -> Tensor:
    """``y = x · Q_w(W + s·BA)ᵀ + b`` (the spec of the forward; computes no graph)."""
    with torch.no_grad():
        wq = quantizer(effective_weight(weight, lora_A, lora_B, scale)).to(x.dtype)
        # written into a tensor of its own: F.linear of a 3-D input returns a view, and a view made inside a
        # custom Function cannot be modified in place, which model code does to layer outputs
        y = x.new_empty(*x.shape[:-1], wq.shape[0])
        flat = y.view(-1, wq.shape[0])
        if bias is None:
            torch.mm(x.reshape(-1, x.shape[-1]), wq.t(), out=flat)
        else:
            torch.addmm(bias.to(x.dtype), x.reshape(-1, x.shape[-1]), wq.t(), out=flat)
    return y


def quant_linear_backward_reference(
    grad: Tensor, x: Tensor, weight: Tensor, lora_A: Optional[Tensor], lora_B: Optional[Tensor], scale: float,
    quantizer: Quantizer, clipped: bool, bias_dtype: Optional[torch.dtype],
    need_x: bool, need_w: bool, need_b: bool, need_A: bool, need_B: bool,
) -> tuple[Optional[Tensor], ...]:
    """(dx, dW, db, dA, dB) of the module docstring; None where not needed. Recomputes ``Q_w(W_eff)``."""
    s = scale
    g2 = grad.reshape(-1, grad.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    dx = dw = db = dA = dB = None
    need_weight_grad = need_w or need_A or need_B
    with_mask = getattr(quantizer, "with_mask", None)  # the clipped STE's mask without autograd.grad
    autograd_ste = clipped and need_weight_grad and with_mask is None
    with torch.enable_grad() if autograd_ste else torch.no_grad():
        w_eff = effective_weight(weight.detach(), *(None if t is None else t.detach() for t in (lora_A, lora_B)), s)
        if autograd_ste:
            w_eff = w_eff.detach().requires_grad_(True)
        if clipped and need_weight_grad and not autograd_ste:
            wq, kept = with_mask(w_eff)
        else:
            wq = quantizer(w_eff)
    if need_x:
        dx = (g2 @ wq.detach().to(g2.dtype)).reshape(x.shape)
    if need_weight_grad:
        if clipped:
            upstream = (g2.t() @ x2).to(wq.dtype)
            if autograd_ste:
                (d_eff,) = torch.autograd.grad(wq, w_eff, upstream)
            else:  # what fake_quantize's clipped backward computes, without torch.autograd.grad (a graph break)
                d_eff = torch.where(kept, upstream, torch.zeros((), dtype=upstream.dtype, device=upstream.device))
            if need_A:
                dA = s * (lora_B.t().to(d_eff.dtype) @ d_eff)
            if need_B:
                dB = s * (d_eff @ lora_A.t().to(d_eff.dtype))
            if need_w:
                dw = d_eff
        else:
            if need_A:
                dA = s * ((g2 @ lora_B.to(g2.dtype)).t() @ x2)
            if need_B:
                dB = s * (g2.t() @ (x2 @ lora_A.to(x2.dtype).t()))
            if need_w:
                dw = g2.t() @ x2
        dw = None if dw is None else dw.to(weight.dtype)
        dA = None if dA is None else dA.to(lora_A.dtype)
        dB = None if dB is None else dB.to(lora_B.dtype)
    if need_b and bias_dtype is not None:
        db = g2.sum(0).to(bias_dtype)
    return dx, dw, db, dA, dB


def quant_linear_backward_flops(node, grad_shape):
    """FLOP formula of the backward (:mod:`fastft.node_costs`): for N tokens, in K, out O, and under LoRA
    rank R::

        W_eff = W + s·BA       2·O·R·K     recomputed whenever the backward runs (LoRA only)
        dx = g Q_w(W_eff)      2·N·O·K     when x needs grad
      identity STE:
        dW = gᵀ x              2·N·O·K     when W trains (QAT alone)
        dA = s·(g B)ᵀ x        2·N·O·R + 2·N·R·K   when A trains
        dB = s·gᵀ(x Aᵀ)        2·N·K·R + 2·N·O·R   when B trains
      clipped STE:
        dW_eff = M ⊙ (gᵀ x)    2·N·O·K     when W, A or B trains
        dA = s·Bᵀ dW_eff       2·R·O·K     when A trains
        dB = s·dW_eff Aᵀ       2·O·K·R     when B trains

    Q_w and the clipped mask are elementwise (0). Tensor inputs: x, weight, [bias], [lora_A, lora_B].
    """
    x, weight, lora_A, lora_B = node.saved_tensors
    out_features, in_features = weight.shape
    tokens = rows(x)
    w_edge = 1
    a_edge = 2 + (1 if node.bias_dtype is not None else 0)
    b_edge = a_edge + 1
    every = tuple(range(len(node.next_functions)))
    nok = 2 * tokens * out_features * in_features
    items = [(nok, (0,))]
    if lora_A is None:
        items.append((nok, (w_edge,)))
        return items
    rank = lora_A.shape[0]
    items.append((2 * out_features * rank * in_features, every))
    if node.clipped:
        items += [
            (nok, (w_edge, a_edge, b_edge)),
            (2 * rank * out_features * in_features, (a_edge,)),
            (2 * out_features * in_features * rank, (b_edge,)),
        ]
    else:
        items += [
            (nok, (w_edge,)),
            (2 * tokens * out_features * rank + 2 * tokens * rank * in_features, (a_edge,)),
            (2 * tokens * in_features * rank + 2 * tokens * out_features * rank, (b_edge,)),
        ]
    return items


# A composite op: its products are torch matmuls and Q_w is fastft.ops.fake_quantize, which dispatches itself;
# it runs these entries under any backend (a forced FASTFT_BACKEND applies to fake_quantize).
register_op("quant_linear", {
    "torch": {"forward": quant_linear_forward_reference, "backward": quant_linear_backward_reference},
}, composite=True, node_costs={"_QuantWeightLinearBackward": quant_linear_backward_flops})


class _QuantWeightLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, quantizer, clipped):
        y = implementation("quant_linear", "forward", x.device)(x, weight, bias, lora_A, lora_B, scale, quantizer)
        ctx.save_for_backward(x, weight, lora_A, lora_B)
        ctx.scale, ctx.quantizer, ctx.clipped = scale, quantizer, clipped
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_A, lora_B = ctx.saved_tensors
        dx, dw, db, dA, dB = implementation("quant_linear", "backward", grad.device)(
            grad, x, weight, lora_A, lora_B, ctx.scale, ctx.quantizer, ctx.clipped, ctx.bias_dtype,
            *ctx.needs_input_grad[:5])
        return dx, dw, db, dA, dB, None, None, None


def quant_weight_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], quantizer: Quantizer, clipped: bool,
    lora_A: Optional[Tensor] = None, lora_B: Optional[Tensor] = None, scale: float = 0.0,
) -> Tensor:
    """``x · Q_w(W + s·BA)ᵀ + b`` (see the module docstring); ``quantizer`` is ``Q_w`` and ``clipped`` says
    whether its straight-through estimator is the clipped one. The bias gets a gradient when it requires one."""
    return _QuantWeightLinear.apply(x, weight, bias, lora_A, lora_B, scale, quantizer, clipped)

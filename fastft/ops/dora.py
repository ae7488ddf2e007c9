"""The DoRA linear op: the magnitude-scaled LoRA linear (the row norm op: ``fastft.ops.dora_row_norm``).

DoRA (weight-decomposed low-rank adaptation) replaces a frozen W (O×K, dense or bitsandbytes 4-bit) by::

    W' = diag(g) (W + s·BA),    g = m / n,    n_i = ‖W_i + s·B_i A‖    (one norm per output row i)

with trainable A (R×K), B (O×R) and magnitude m (O). The module (``fastft.nn.DoRALinear``) computes
``n = dora_row_norm(...)``, then ``g = m / n`` in plain PyTorch (an O-vector), then ``y = dora_linear(...)``;
autograd joins them, so ``∂L/∂m = ∂L/∂g / n`` and, when the norm is not detached, ``∂L/∂n = -∂L/∂g · m/n²``
flows into the row-norm op's backward.

``dora_linear(x, W, b, A, B, g, s, mask, p) -> y``, for x (N×K) and g (O)::

    no dropout:   xa = x Aᵀ,    z = x Wᵀ + s·xa Bᵀ,    y = g ⊙ z + b
    dropout:      x̃ = x ⊙ mask / (1-p),   xa = x̃ Aᵀ,   z = x̃ Wᵀ + s·xa Bᵀ
                  y = x Wᵀ + b + (g - 1) ⊙ z + s·xa Bᵀ

The dropout form is PEFT's: the base path sees x, the DoRA path the dropped x̃, i.e.
``y = x Wᵀ + b + (g-1) ⊙ x̃ Wᵀ + g ⊙ s·xa Bᵀ``. Its second full GEMM, x̃ Wᵀ, is one no algebra removes:
the mask sits on the reduction dimension, so x Wᵀ and x̃ Wᵀ are different products of W and y needs
both. Without dropout there is one GEMM, as in LoRA. Backward, for ``gy = ∂L/∂y`` and ``gz = g ⊙ gy``::

    gb = gz B = gy (diag(g) B)
    dx = gz W + s·gb A                                    (no dropout)
    dx = gy W + ((gz - gy) W + s·gb A) ⊙ mask/(1-p)       (dropout: the second GEMM again)
    dA = s·gbᵀ x̃       dB = s·gzᵀ xa       dg = Σ_tokens gy ⊙ z

What is saved for backward: ``xa``; ``x`` when A trains (and the mask with dropout); g; and, when g
needs a gradient, one output-sized tensor for ``dg``:

the pre-scale output z, a buffer of its own. The layer's output y is never saved: the model may modify it
in place (``out += residual``), which would corrupt a saved y. (The op can still recover z from a saved y,
``saved_is_output``, when called directly with ``keep_pre_scale=False``; ``dora_linear`` never asks for that.)

Never saved: W + s·BA or BA, the base output x Wᵀ beside y, x̃, a dequantized weight. W is re-read
(re-dequantized for a 4-bit base) in backward. W and b get no gradient.

Registered as ``torch.library`` ops (``fastft::dora_linear`` and its backward op) with fake kernels. The
PyTorch implementation here is the reference and runs on every device; the Triton kernels in
``fastft.kernels.dora`` run on CUDA.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

from ..dispatch import implementation, lazy, register_op
from ..node_costs import custom_op_node
from .dequantize_4bit import FourBitWeight
from .dora_row_norm import (  # noqa: F401  (the row-norm op's names, re-exported: DoRA's two ops in one import)
    NORM_EPS, dora_row_norm, dora_row_norm_backward_reference, dora_row_norm_reference, norm_dtype,
    row_norm_from_projection, weight_parts,
)
from .lora import _dense_weight, _dropped, check_low_rank_args


def output_recoverable(x_dtype: torch.dtype, has_bias: bool) -> bool:
    """Whether ``z = (y - b) / g`` recovers the pre-scale output to its own precision."""
    return not has_bias or x_dtype in (torch.float32, torch.float64)



def dora_forward_reference(
    x: Tensor, weight: Tensor, absmax: Optional[Tensor], code: Optional[Tensor], blocksize: int, out_features: int,
    bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, g: Tensor, scale: float, mask: Optional[Tensor],
    p: float, keep_pre_scale: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, xa, z) of the formula above in PyTorch; z is empty unless ``keep_pre_scale`` or dropout."""
    w = _dense_weight(weight, absmax, code, blocksize, (out_features, x.shape[1]), x.dtype)
    empty = x.new_empty(0)
    if mask is None:
        xa = x @ lora_A.t()
        z = torch.nn.functional.linear(x, w)
        z.addmm_(xa, lora_B.t(), alpha=scale)
        if keep_pre_scale:
            y = torch.empty_like(z)
            y = torch.mul(z, g, out=y) if bias is None else torch.addcmul(bias, z, g, out=y)
            return y, xa, z
        y = z.mul_(g) if bias is None else torch.addcmul(bias, z, g, out=z)
        return y, xa, empty
    dropped = _dropped(x, mask, p)
    xa = dropped @ lora_A.t()
    z = torch.nn.functional.linear(dropped, w)
    del dropped
    z.addmm_(xa, lora_B.t(), alpha=scale)
    y = torch.nn.functional.linear(x, w, bias)
    y.addmm_(xa, lora_B.t(), alpha=scale)
    y.addcmul_(z, g - 1.0)
    return y, xa, z


def _column_dot(a: Tensor, b: Tensor, bias: Optional[Tensor], dtype: torch.dtype, chunk_elements: int = 1 << 20) -> Tensor:
    """``Σ_t a[t] ⊙ (b[t] - bias)`` in ``dtype``; 16-bit inputs are widened a block of rows at a time, so each
    product is exact in float32 without a full-size float32 temporary."""
    if a.dtype == dtype:
        product = a * b if bias is None else (b - bias).mul_(a)
        return product.sum(0)
    out = torch.zeros(a.shape[1], dtype=dtype, device=a.device)
    step = max(1, chunk_elements // max(1, a.shape[1]))
    for start in range(0, a.shape[0], step):
        rows = b[start:start + step].to(dtype)
        if bias is not None:
            rows -= bias
        out += rows.mul_(a[start:start + step]).sum(0)
    return out


def _pre_scale_dot(grad_y: Tensor, saved: Tensor, saved_is_output: bool, bias: Optional[Tensor], g: Tensor,
                   x: Tensor, xa: Tensor, w: Callable, lora_B: Tensor, scale: float) -> Tensor:
    """dg = Σ_tokens gy ⊙ z, with z saved, or recovered from y as (y - b)/g; the rows with g = 0 are recomputed
    (finding them is a host synchronisation on a GPU, where the Triton kernel, which needs none, is the default)."""
    dtype = g.dtype
    dot = _column_dot(grad_y, saved, bias if saved_is_output else None, dtype)
    if not saved_is_output:
        return dot
    zero = g == 0
    dg = dot / torch.where(zero, torch.ones_like(g), g)
    if bool(zero.any()):
        rows = zero.nonzero().squeeze(1)
        z_rows = x @ w()[rows].t()
        z_rows.addmm_(xa, lora_B[rows].t(), alpha=scale)
        dg[rows] = (grad_y[:, rows] * z_rows).sum(0, dtype=dtype)
    return dg


def dora_backward_reference(
    grad_y: Tensor, x: Tensor, xa: Tensor, saved: Tensor, saved_is_output: bool, weight: Tensor,
    absmax: Optional[Tensor], code: Optional[Tensor], blocksize: int, in_features: int, bias: Optional[Tensor],
    lora_A: Tensor, lora_B: Tensor, g: Tensor, scale: float, mask: Optional[Tensor], p: float,
    need_dx: bool, need_dA: bool, need_dB: bool, need_dg: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dg) of the formula above in PyTorch, empty where not needed.

    ``saved`` is the output y (``saved_is_output``) or the pre-scale output z; empty when dg is not needed.
    """
    dx, dA, dB, dg = (grad_y.new_empty(0) for _ in range(4))  # distinct: custom-op outputs may not alias
    dense = None

    def w() -> Tensor:
        nonlocal dense
        if dense is None:
            dense = _dense_weight(weight, absmax, code, blocksize, (grad_y.shape[1], in_features), grad_y.dtype)
        return dense

    gz = torch.mul(grad_y, g, out=torch.empty_like(grad_y)) if (need_dx or need_dA or need_dB) else None
    gb = gz @ lora_B if (need_dx or need_dA) else None
    if need_dx:
        if mask is None:
            dx = gz @ w()
            dx.addmm_(gb, lora_A, alpha=scale)
        else:
            dx = grad_y @ w()
            masked = torch.mul(grad_y, g - 1.0, out=torch.empty_like(grad_y)) @ w()
            masked.addmm_(gb, lora_A, alpha=scale)
            dx.add_(masked.mul_(mask), alpha=1.0 / (1.0 - p))
    if need_dA:
        dA = torch.mm(gb.t(), _dropped(x, mask, p)).mul_(scale)
    if need_dB:
        dB = torch.mm(gz.t(), xa).mul_(scale)
    del gz, gb
    if need_dg:
        dg = _pre_scale_dot(grad_y, saved, saved_is_output, bias, g, x, xa, w, lora_B, scale)
    return dx, dA, dB, dg


def dora_linear_backward_flops(node, grad_shape):
    """FLOP formula of the backward (:mod:`fastft.node_costs`): for N tokens, in K, out O, rank R, with
    gz = g ⊙ gy::

        gb = gz B        2·N·O·R           when x or A needs grad
        dx = gz W + s·gb A    2·N·O·K + 2·N·R·K   when x needs grad (with dropout one more 2·N·O·K: the
                                            dropped path's GEMM; counted when the layer has dropout, as
                                            a training step draws a mask — the graph is read in eval mode)
        dA = s·gbᵀ x̃     2·N·R·K           when A trains
        dB = s·gzᵀ xa    2·N·O·R           when B trains
        dg = Σ gy ⊙ z    0 (elementwise; rows with g = 0, a zero magnitude, are recomputed: not counted)

    Tensor inputs: x, weight, [absmax, code], [bias], lora_A, lora_B, g, [mask].
    """
    _, xa, _, _, absmax, _, bias, lora_A, lora_B, g, mask = node.saved_tensors
    in_features, p = node.meta[2], node.meta[4]
    tokens, rank = xa.shape
    out_features = lora_B.shape[0]
    a_edge = 2 + (2 if absmax is not None else 0) + (1 if bias is not None else 0)
    b_edge = a_edge + 1
    dx = 2 * tokens * out_features * in_features * (2 if (mask is not None or p > 0.0) else 1)
    return [
        (2 * tokens * out_features * rank, (0, a_edge)),
        (dx + 2 * tokens * rank * in_features, (0,)),
        (2 * tokens * rank * in_features, (a_edge,)),
        (2 * tokens * out_features * rank, (b_edge,)),
    ]


register_op("dora_linear", {
    "torch": {"forward": dora_forward_reference, "backward": dora_backward_reference},
    # two paths (fastft.dispatch.choose_path): base GEMMs by cuBLAS, or the fused Triton GEMM kernels
    "triton": lazy("fastft.kernels.dora", **{
        "forward@cublas": "dora_forward_cublas", "forward@triton": "dora_forward",
        "backward@cublas": "dora_backward_cublas", "backward@triton": "dora_backward",
    }),
}, node_costs={custom_op_node("dora_linear"): dora_linear_backward_flops})


@torch.library.custom_op("fastft::dora_linear", mutates_args=())
def _dora_linear_op(
    x: Tensor, weight: Tensor, absmax: Optional[Tensor], code: Optional[Tensor], blocksize: int, out_features: int,
    bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, g: Tensor, scale: float, mask: Optional[Tensor],
    p: float, keep_pre_scale: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    args = (x, weight, absmax, code, blocksize, out_features, bias, lora_A, lora_B, g, scale, mask, p, keep_pre_scale)
    return implementation("dora_linear", "forward", x.device)(*args)


@_dora_linear_op.register_fake
def _(x, weight, absmax, code, blocksize, out_features, bias, lora_A, lora_B, g, scale, mask, p, keep_pre_scale):
    has_z = keep_pre_scale or mask is not None
    return (x.new_empty(x.shape[0], out_features), x.new_empty(x.shape[0], lora_A.shape[0]),
            x.new_empty(x.shape[0], out_features) if has_z else x.new_empty(0))


@torch.library.custom_op("fastft::dora_linear_backward", mutates_args=())
def _dora_linear_backward_op(
    grad_y: Tensor, x: Tensor, xa: Tensor, saved: Tensor, saved_is_output: bool, weight: Tensor,
    absmax: Optional[Tensor], code: Optional[Tensor], blocksize: int, in_features: int, bias: Optional[Tensor],
    lora_A: Tensor, lora_B: Tensor, g: Tensor, scale: float, mask: Optional[Tensor], p: float,
    need_dx: bool, need_dA: bool, need_dB: bool, need_dg: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    args = (grad_y, x, xa, saved, saved_is_output, weight, absmax, code, blocksize, in_features, bias, lora_A, lora_B,
            g, scale, mask, p, need_dx, need_dA, need_dB, need_dg)
    return implementation("dora_linear", "backward", grad_y.device)(*args)


@_dora_linear_backward_op.register_fake
def _(grad_y, x, xa, saved, saved_is_output, weight, absmax, code, blocksize, in_features, bias, lora_A, lora_B,
      g, scale, mask, p, need_dx, need_dA, need_dB, need_dg):
    empty = grad_y.new_empty(0)
    return (
        grad_y.new_empty(grad_y.shape[0], in_features) if need_dx else empty,
        grad_y.new_empty(lora_A.shape) if need_dA else empty,
        grad_y.new_empty(lora_B.shape) if need_dB else empty,
        g.new_empty(g.shape) if need_dg else empty,
    )


def _linear_setup_context(ctx, inputs, output):
    x, weight, absmax, code, blocksize, out_features, bias, lora_A, lora_B, g, scale, mask, p, keep_pre_scale = inputs
    y, xa, z = output
    need = ctx.needs_input_grad
    need_dx, need_dA, need_dB, need_dg = need[0], need[7], need[8], need[9]
    saved_is_output = need_dg and mask is None and not keep_pre_scale
    if saved_is_output:
        saved = y
    elif need_dg:
        saved = z
    else:
        saved = None
    keep_x = x if (need_dA or saved_is_output) else None
    keep_mask = mask if (need_dx or need_dA) else None
    ctx.save_for_backward(keep_x, xa, saved, weight, absmax, code, bias, lora_A, lora_B, g, keep_mask)
    ctx.meta = (saved_is_output, blocksize, x.shape[1], scale, p, need_dx, need_dA, need_dB, need_dg)


def _linear_backward(ctx, grad_y, _grad_xa, _grad_z):
    x, xa, saved, weight, absmax, code, bias, lora_A, lora_B, g, mask = ctx.saved_tensors
    saved_is_output, blocksize, in_features, scale, p, need_dx, need_dA, need_dB, need_dg = ctx.meta
    empty = xa.new_empty(0)
    dx, dA, dB, dg = _dora_linear_backward_op(
        grad_y.contiguous(), empty if x is None else x, xa, empty if saved is None else saved, saved_is_output,
        weight, absmax, code, blocksize, in_features, bias, lora_A, lora_B, g, scale, mask, p,
        need_dx, need_dA, need_dB, need_dg,
    )
    return (
        dx if need_dx else None, None, None, None, None, None, None,
        dA if need_dA else None, dB if need_dB else None, dg if need_dg else None, None, None, None, None,
    )


_dora_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def dora_linear(
    x: Tensor,
    weight: Union[Tensor, FourBitWeight],
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    g: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    dropout_mask: Optional[Tensor] = None,
) -> Tensor:
    """``g ⊙ (x Wᵀ + scale·(x Aᵀ) Bᵀ) + b`` over the last dimension of ``x`` (dropout: module docstring).

    ``weight`` is a dense (out×in) tensor of ``x``'s dtype or a :class:`FourBitWeight`; ``lora_A``, ``lora_B``
    and ``bias`` must be in ``x``'s dtype; ``g`` (out) is float32 (float64 for float64 ``x``) and may require
    grad. ``dropout_mask`` is a boolean tensor of ``x``'s shape (True = keep) or None.
    """
    check_low_rank_args("dora_linear", weight, bias, lora_A, lora_B, scale, dropout_p)
    in_features = lora_A.shape[1]
    if x.shape[-1] != in_features:
        raise ValueError(f"dora_linear: input's last dimension is {x.shape[-1]}, the layer expects {in_features}")
    packed, absmax, code, blocksize, out_features = weight_parts(weight)
    if g.shape != (out_features,):
        raise ValueError(f"dora_linear: g must have shape ({out_features},), got {tuple(g.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    mask2 = None
    if dropout_mask is not None and dropout_p > 0.0:
        mask2 = dropout_mask.reshape(-1, in_features)
    # In-place safety: the output y is never saved for backward (the model may add into it in place, e.g.
    # Falcon's ``mlp_output += attention_output``); when g needs a gradient the pre-scale output z is kept as a
    # separate buffer instead (see the module docstring).
    keep_pre_scale = torch.is_grad_enabled() and g.requires_grad and mask2 is None
    y, _, _ = _dora_linear_op(
        x2, packed, absmax, code, blocksize, out_features, bias, lora_A, lora_B, g, float(scale), mask2,
        float(dropout_p), keep_pre_scale,
    )
    return y.reshape(*lead, out_features)

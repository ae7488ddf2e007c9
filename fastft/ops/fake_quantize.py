"""Fake quantization (quantize, then dequantize) with a straight-through estimator, optionally after a Hadamard rotation.

Groups. ``granularity`` cuts x into groups that share one scale (and zero point):

* ``"token"`` (alias ``"channel"``): each row over the last dimension (d elements). For a weight of shape
  out×in this is one scale per output channel.
* ``"group"``: ``group_size`` consecutive elements along the last dimension (d % group_size == 0).
* ``"tensor"``: all of x.

Scales (per group G; c = ``clip_ratio`` rounded to the compute dtype; the compute dtype is float32, or
float64 for float64 input, and every quantity below is computed in it, in this order)::

    asymmetric (default), qmax = 2^bits - 1:
        hi    = max(max_{j∈G} x_j, 0) · c          lo = min(min_{j∈G} x_j, 0) · c      (lo <= 0 <= hi)
        scale = max((hi - lo) / qmax, EPS)
        zero  = round(-lo / scale)                                                    (0 <= zero <= qmax)
        q_j   = clamp(round(x_j / scale) + zero, 0, qmax)
        out_j = (q_j - zero) · scale
    symmetric, qmax = 2^(bits-1) - 1, qmin = -2^(bits-1):
        scale = max(max_{j∈G} |x_j| · c / qmax, EPS)            zero = 0
        q_j   = clamp(round(x_j / scale), qmin, qmax)
        out_j = q_j · scale

``round`` is round-half-to-even (``torch.round``); ``x / scale`` is a correctly rounded division (not a
multiplication by a reciprocal). ``EPS`` = :data:`SCALE_EPS` (1e-8) keeps an all-zero group finite: its
scale is EPS and its output is exactly zero. ``out`` is cast to x's dtype at the end.

Gradient (straight-through estimator; scale and zero are constants, they receive no gradient)::

    ste="identity":  dL/dx_j = dL/dout_j
    ste="clipped":   dL/dx_j = dL/dout_j if x_j was not clamped, i.e. qmin <= round(x_j/scale) + zero <= qmax
                     (qmin = 0 asymmetric), and 0 where the clamp changed the code.

``rotate=True`` applies :func:`fastft.ops.hadamard_transform` over the last dimension first and
quantizes the rotated values; the output stays in the rotated basis (the caller folds the inverse rotation
into the next weight). The backward is the STE above followed by the inverse transform. The rotation's
result is kept in the compute dtype (not rounded to x's dtype) before quantization.

What is saved for backward: nothing for ``ste="identity"``; a boolean "not clamped" mask (1 byte per
element) for ``ste="clipped"``.

Export: :func:`quantize` returns the integer codes with ``scale`` and ``zero``; :func:`dequantize` maps
them back, and ``fake_quantize(x) == dequantize(*quantize(x)).to(x.dtype)`` bit for bit on the reference
backend (``quantize`` always runs the reference: it is for export, not the training step).

Backends: this PyTorch reference (any device) and the Triton kernels of ``fastft.kernels.fake_quantize``
(CUDA; rotate + per-token quantization is one fused kernel of ``fastft.kernels.hadamard``, the clipped
STE backward is fused into the inverse rotation), which reproduce the reference's operations in order;
the C++ CPU library (``cpp``: every granularity, rotation and quantization in one pass per row, the
default on CPU) and the CUDA library (``cuda``: per token only) built from ``csrc/``, which do the same.
Config code can validate arguments early with :func:`check_quant_args`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _ext
from ..dispatch import implementation, lazy, register_op
from ..node_costs import custom_op_node, reads_grad_shape
from ..math.hadamard import compute_dtype
from ..math.quantization import (  # noqa: F401  (re-exported)
    GRANULARITIES, SCALE_EPS, STE_MODES, _divisor_hint, check_quant_args, qrange,
)
from .hadamard import hadamard_transform_flops, hadamard_transform_reference

__all__ = [
    "GRANULARITIES",
    "SCALE_EPS",
    "STE_MODES",
    "check_quant_args",
    "dequantize",
    "fake_quantize",
    "fake_quantize_reference",
    "fake_quantize_with_mask",
    "qrange",
    "quantize",
]


def _cuda_limit(d: int, dtype: torch.dtype, granularity: Optional[str] = None, **_) -> Optional[str]:
    if granularity not in (None, "token", "channel"):
        return f"the CUDA library quantizes per token (granularity 'token'/'channel'), not {granularity!r}"
    longest = _ext.cuda_max_row(dtype)
    return None if d <= longest else f"the CUDA kernel holds a row of at most {longest} elements here, d={d}"


def _cpp_limit(dtype: torch.dtype, **_) -> Optional[str]:
    return None if _ext.cpu_supports(dtype) else f"this build of the C++ library has no {dtype} support"



def _check_tensor(x: Tensor, what: str) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{what} takes float16/bfloat16/float32/float64 input, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{what} needs at least one dimension")


def _groups(x: Tensor, granularity: str, group_size: int) -> Tensor:
    """x as (rows, groups per row, group length)."""
    d = x.shape[-1]
    if granularity == "tensor":
        return x.reshape(1, 1, -1)
    if granularity == "group":
        return x.reshape(-1, d // group_size, group_size)
    return x.reshape(-1, 1, d)


def _scale_shape(x_shape: torch.Size, granularity: str, group_size: int) -> tuple[int, ...]:
    if granularity == "tensor":
        return (1,) * len(x_shape)
    groups = x_shape[-1] // group_size if granularity == "group" else 1
    return (*x_shape[:-1], groups)


# --------------------------------------------------------------------------- the reference
def _scale_zero(xg: Tensor, bits: int, symmetric: bool, clip_ratio: float) -> tuple[Tensor, Tensor]:
    """scale and zero (both (rows, groups, 1), compute dtype) of grouped xg, as in the module docstring."""
    c = torch.tensor(clip_ratio, dtype=xg.dtype)
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        amax = xg.abs().amax(dim=-1, keepdim=True)
        scale = torch.clamp_min(amax * c / qmax, SCALE_EPS)
        return scale, torch.zeros_like(scale)
    hi = torch.clamp_min(xg.amax(dim=-1, keepdim=True), 0) * c
    lo = torch.clamp_max(xg.amin(dim=-1, keepdim=True), 0) * c
    scale = torch.clamp_min((hi - lo) / qmax, SCALE_EPS)
    zero = torch.round(-lo / scale)
    return scale, zero


def _codes(xg: Tensor, scale: Tensor, zero: Tensor, bits: int, symmetric: bool,
           need_mask: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """(clamped codes as compute-dtype integers, not-clamped mask or None); one temporary of xg's size."""
    qmin, qmax = qrange(bits, symmetric)
    q = torch.round(xg / scale).add_(zero)
    kept = ((q >= qmin) & (q <= qmax)) if need_mask else None
    return q.clamp_(qmin, qmax), kept


def fake_quantize_reference(
    x: Tensor, bits: int, granularity: str = "token", group_size: int = 128, symmetric: bool = False,
    clip_ratio: float = 1.0, rotate: bool = False, need_mask: bool = False,
) -> tuple[Tensor, Tensor]:
    """(out, mask): the forward of the module docstring in PyTorch; mask is empty unless ``need_mask``."""
    ct = compute_dtype(x.dtype)
    xc = hadamard_transform_reference(x.to(ct)) if rotate else x.to(ct)
    xg = _groups(xc, granularity, group_size)
    scale, zero = _scale_zero(xg, bits, symmetric, clip_ratio)
    q, kept = _codes(xg, scale, zero, bits, symmetric, need_mask)
    out = q.sub_(zero).mul_(scale).reshape(x.shape).to(x.dtype)
    mask = kept.reshape(x.shape) if need_mask else x.new_empty(0, dtype=torch.bool)
    return out, mask


def fake_quantize_backward_reference(grad: Tensor, mask: Tensor, rotate: bool) -> Tensor:
    """dL/dx from dL/dout: zero where ``mask`` is False (if given), then the inverse transform if ``rotate``."""
    if mask.numel():
        grad = torch.where(mask, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
    if rotate:
        grad = hadamard_transform_reference(grad, inverse=True)
    return grad


@reads_grad_shape
def fake_quantize_backward_flops(node, grad_shape):
    """FLOP formula of the backward (:mod:`fastft.node_costs`): the straight-through gradient is
    elementwise (0); with ``rotate`` the inverse Hadamard transform of the gradient follows
    (:func:`fastft.ops.hadamard.hadamard_transform_flops`)."""
    return [(hadamard_transform_flops(grad_shape(node)) if node.rotate else 0, (0,))]


register_op("fake_quantize", {
    "torch": {"forward": fake_quantize_reference, "backward": fake_quantize_backward_reference},
    "triton": lazy("fastft.kernels.fake_quantize", forward="fake_quantize", backward="fake_quantize_backward"),
    "cpp": {"forward": _ext.fake_quantize, "backward": _ext.fake_quantize_backward},
    "cuda": {"forward": _ext.fake_quantize, "backward": _ext.fake_quantize_backward},
}, limits={"cuda": _cuda_limit, "cpp": _cpp_limit},
   node_costs={custom_op_node("fake_quantize"): fake_quantize_backward_flops})


@torch.library.custom_op("fastft::fake_quantize", mutates_args=())
def _fake_quantize_op(
    x: Tensor, bits: int, granularity: str, group_size: int, symmetric: bool, clip_ratio: float, rotate: bool,
    need_mask: bool,
) -> tuple[Tensor, Tensor]:
    args = (x, bits, granularity, group_size, symmetric, clip_ratio, rotate, need_mask)
    call = dict(d=x.shape[-1], dtype=x.dtype, granularity=granularity)
    return implementation("fake_quantize", "forward", x.device, **call)(*args)


@_fake_quantize_op.register_fake
def _(x, bits, granularity, group_size, symmetric, clip_ratio, rotate, need_mask):
    mask = x.new_empty(x.shape if need_mask else (0,), dtype=torch.bool)
    return torch.empty_like(x), mask


@torch.library.custom_op("fastft::fake_quantize_backward", mutates_args=())
def _fake_quantize_backward_op(grad: Tensor, mask: Tensor, rotate: bool) -> Tensor:
    call = dict(d=grad.shape[-1], dtype=grad.dtype)
    return implementation("fake_quantize", "backward", grad.device, **call)(grad, mask, rotate)


@_fake_quantize_backward_op.register_fake
def _(grad, mask, rotate):
    return torch.empty_like(grad)


def _fq_setup_context(ctx, inputs, output):
    ctx.rotate, ctx.need_mask = inputs[6], inputs[7]
    if ctx.need_mask:
        ctx.save_for_backward(output[1])


def _fq_backward(ctx, grad_out, _grad_mask):
    no_grads = (None,) * 7
    if not ctx.need_mask and not ctx.rotate:
        return (grad_out, *no_grads)
    mask = ctx.saved_tensors[0] if ctx.need_mask else grad_out.new_empty(0, dtype=torch.bool)
    return (_fake_quantize_backward_op(grad_out.contiguous(), mask, ctx.rotate), *no_grads)


_fake_quantize_op.register_autograd(_fq_backward, setup_context=_fq_setup_context)


# --------------------------------------------------------------------------- public API
def fake_quantize(
    x: Tensor, bits: int, granularity: str = "token", group_size: int = 128, symmetric: bool = False,
    clip_ratio: float = 1.0, ste: str = "identity", rotate: bool = False,
) -> Tensor:
    """Quantize-dequantize ``x`` (same shape and dtype) with a straight-through gradient; see the module docstring.

    Args:
        bits: 2..8.  granularity: "token" | "channel" (per row over the last dim) | "group" | "tensor".
        group_size: elements per group along the last dim (granularity="group"; must divide it).
        symmetric: symmetric (signed codes, zero = 0) or asymmetric (unsigned codes with a zero point).
        clip_ratio: in (0, 1]; the range is shrunk by it before the scale is computed.
        ste: "identity" or "clipped" (no gradient where the code was clamped).
        rotate: Hadamard-rotate the last dim first (output in the rotated basis).
    """
    _check_tensor(x, "fake_quantize")
    check_quant_args(bits, granularity, group_size, symmetric, clip_ratio, ste, x.shape[-1], rotate)
    if x.numel() == 0:
        return x.clone()
    out, _ = _fake_quantize_op(
        x.contiguous(), bits, granularity, int(group_size), symmetric, float(clip_ratio), rotate, ste == "clipped"
    )
    return out


def fake_quantize_with_mask(
    x: Tensor, bits: int, granularity: str = "token", group_size: int = 128, symmetric: bool = False,
    clip_ratio: float = 1.0, rotate: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(fake_quantize(x, ...), kept)`` with ``kept`` the boolean "not clamped" mask of the clipped STE (the
    clipped gradient is ``torch.where(kept, grad, 0)``, before the inverse rotation when ``rotate``). No autograd:
    for code that applies the STE itself (a backward computing it without ``torch.autograd.grad``)."""
    _check_tensor(x, "fake_quantize")
    check_quant_args(bits, granularity, group_size, symmetric, clip_ratio, "clipped", x.shape[-1], rotate)
    return _fake_quantize_op(
        x.detach().contiguous(), bits, granularity, int(group_size), symmetric, float(clip_ratio), rotate, True
    )


def quantize(
    x: Tensor, bits: int, granularity: str = "token", group_size: int = 128, symmetric: bool = False,
    clip_ratio: float = 1.0, rotate: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Integer codes of ``x`` with their scale and zero point (for export; not differentiable).

    Returns ``(codes, scale, zero)``:
      * ``codes``: x's shape; ``torch.uint8`` in [0, 2^bits - 1] (asymmetric) or ``torch.int8`` in
        [-2^(bits-1), 2^(bits-1) - 1] (symmetric).
      * ``scale``: the compute dtype (float32, float64 for float64 x); ``zero``: codes' dtype (0 when
        symmetric). Their shape is ``x.shape[:-1] + (G,)`` with G = 1 ("token"/"channel") or
        d / group_size ("group"), and ``(1,) * x.dim()`` for "tensor"; element [..., g] belongs to the
        g-th run of d/G consecutive elements of the row.
    With ``rotate=True`` the codes are those of the rotated x (see :func:`fake_quantize`).
    """
    _check_tensor(x, "quantize")
    check_quant_args(bits, granularity, group_size, symmetric, clip_ratio, "identity", x.shape[-1], rotate)
    ct = compute_dtype(x.dtype)
    xc = hadamard_transform_reference(x.detach().to(ct)) if rotate else x.detach().to(ct)
    xg = _groups(xc, granularity, group_size)
    scale, zero = _scale_zero(xg, bits, symmetric, clip_ratio)
    q, _ = _codes(xg, scale, zero, bits, symmetric, need_mask=False)
    code_dtype = torch.int8 if symmetric else torch.uint8
    shape = _scale_shape(x.shape, granularity, group_size)
    return q.reshape(x.shape).to(code_dtype), scale.reshape(shape), zero.reshape(shape).to(code_dtype)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``(codes - zero) · scale`` per group, computed in ``scale``'s dtype and returned in ``dtype`` (default: it).

    ``scale`` and ``zero`` are shaped as :func:`quantize` returns them: the group length is
    ``codes.shape[-1] / scale.shape[-1]``, and leading dimensions of size 1 broadcast ("tensor").
    """
    if codes.dim() != scale.dim() or scale.shape != zero.shape:
        raise ValueError(
            f"dequantize: codes {tuple(codes.shape)}, scale {tuple(scale.shape)} and zero {tuple(zero.shape)} do not "
            "match; pass them as quantize() returns them"
        )
    d, groups = codes.shape[-1], scale.shape[-1]
    if groups < 1 or d % groups:
        raise ValueError(f"dequantize: {groups} groups do not divide the last dimension {d}")
    ct = scale.dtype
    q = codes.to(ct).reshape(*codes.shape[:-1], groups, d // groups)
    out = (q - zero.to(ct).unsqueeze(-1)) * scale.unsqueeze(-1)
    return out.reshape(codes.shape).to(dtype or ct)

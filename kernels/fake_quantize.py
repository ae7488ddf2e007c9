"""Triton kernels of fake quantization (``fastft.ops.fake_quantize``): per-token/channel/group/tensor
quantize-dequantize with the "not clamped" mask, and the straight-through backward.

The math is the op's (see ``fastft/ops/fake_quantize.py``), in the same order of operations so the result
is the reference's bit for bit::

    asymmetric:  scale = max((max(vmax, 0)·c - min(vmin, 0)·c) / qmax, EPS),  zero = rne(-lo / scale)
    symmetric:   scale = max(max(vmax, -vmin)·c / qmax, EPS),                   zero = 0
    raw = rne(x / scale) + zero,   q = clamp(raw, qmin, qmax),   out = (q - zero)·scale,   kept = (q == raw)

with vmax / vmin the group's max / min, ``rne`` round-half-to-even (:func:`round_half_even`, written with
``floor`` because the interpreter has no ``rint``) and ``/`` a correctly rounded division
(``tl.math.div_rn``; Triton's plain ``/`` may be approximate on a GPU). Launches disable FMA contraction
(``enable_fp_fusion=False``) so that every product is rounded before it is added, as in torch.

What is here:

* :func:`group_scale_zero`, :func:`quantize_tile` (``@triton.jit``): the formulas above on a tile; the
  fused rotate + quantize kernel (``kernels/hadamard.py``) uses them as its epilogue.
* ``_fake_quantize_groups_kernel``: x viewed as (groups, L) (L = d for token/channel, group_size for
  group); one program per ``BLOCK_G`` groups. A group that fits one tile is read once; a longer group
  (a wide row) is read twice, once for its max/min and once to quantize, in ``CHUNK``-wide pieces.
  Granularity "tensor" is the same kernel over one group whose max/min come from
  ``_minmax_partials_kernel`` (one partial per block, reduced by ``torch.amax``/``amin``).
* ``_ste_mask_kernel``: dL/dx = where(kept, dL/dout, 0) (the rotated case is fused into the inverse
  Hadamard kernel instead).

Rotation (``rotate=True``): the token granularity goes through the fused kernel of
``kernels/hadamard.py`` (one read of x, one write of out and the mask); group/tensor rotate in a first
kernel into a float32 (float64) buffer and quantize it here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..math.quantization import SCALE_EPS

from .common import cast_to, group_scale_zero, quant_flags, quantize_tile
from .hadamard import rotate_rows

_MAX_TILE = 8192


@triton.jit
def _minmax_partials_kernel(x_ptr, max_ptr, min_ptr, n, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """max and min of x[pid·BLOCK : (pid+1)·BLOCK] into max_ptr[pid], min_ptr[pid]."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    v = tl.load(x_ptr + offs, mask=valid, other=0.0).to(ACC_DTYPE)
    tl.store(max_ptr + pid, tl.max(tl.where(valid, v, -float("inf")), axis=0))
    tl.store(min_ptr + pid, tl.min(tl.where(valid, v, float("inf")), axis=0))


@triton.jit
def _fake_quantize_groups_kernel(
    x_ptr, out_ptr, keep_ptr, stats_ptr,
    n_groups, L, clip: tl.float64, eps: tl.float64,
    SYMMETRIC: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, STATS_GIVEN: tl.constexpr,
    NEED_MASK: tl.constexpr, ACC_DTYPE: tl.constexpr, IS_F64: tl.constexpr, ROUND_BF16_BY_HAND: tl.constexpr,
    BLOCK_G: tl.constexpr, CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr,
):
    """Fake-quantize groups [pid·BLOCK_G, (pid+1)·BLOCK_G) of the (n_groups × L) view of x.

    With STATS_GIVEN the (max, min) of every group is stats_ptr[0], stats_ptr[1] (granularity "tensor").
    """
    pid = tl.program_id(0)
    groups = pid * BLOCK_G + tl.arange(0, BLOCK_G)
    base = groups.to(tl.int64)[:, None] * L
    in_group = groups[:, None] < n_groups
    cols = tl.arange(0, CHUNK)[None, :]
    clip = tl.full((), clip, ACC_DTYPE)
    eps = tl.full((), eps, ACC_DTYPE)
    out_dtype = out_ptr.dtype.element_ty
    if STATS_GIVEN:
        vmax = tl.load(stats_ptr).to(ACC_DTYPE)
        vmin = tl.load(stats_ptr + 1).to(ACC_DTYPE)
        scale, zero = group_scale_zero(vmax, vmin, clip, eps, SYMMETRIC, QMAX, IS_F64)
        for c in range(N_CHUNKS):
            valid = in_group & (cols + c * CHUNK < L)
            v = tl.load(x_ptr + base + cols + c * CHUNK, mask=valid, other=0.0).to(ACC_DTYPE)
            out, kept = quantize_tile(v, scale, zero, QMIN, QMAX, IS_F64)
            tl.store(out_ptr + base + cols + c * CHUNK, cast_to(out, out_dtype, ROUND_BF16_BY_HAND), mask=valid)
            if NEED_MASK:
                tl.store(keep_ptr + base + cols + c * CHUNK, kept.to(tl.int8), mask=valid)
    elif N_CHUNKS == 1:
        valid = in_group & (cols < L)
        v = tl.load(x_ptr + base + cols, mask=valid, other=0.0).to(ACC_DTYPE)
        vmax = tl.max(tl.where(valid, v, -float("inf")), axis=1)[:, None]
        vmin = tl.min(tl.where(valid, v, float("inf")), axis=1)[:, None]
        scale, zero = group_scale_zero(vmax, vmin, clip, eps, SYMMETRIC, QMAX, IS_F64)
        out, kept = quantize_tile(v, scale, zero, QMIN, QMAX, IS_F64)
        tl.store(out_ptr + base + cols, cast_to(out, out_dtype, ROUND_BF16_BY_HAND), mask=valid)
        if NEED_MASK:
            tl.store(keep_ptr + base + cols, kept.to(tl.int8), mask=valid)
    else:
        vmax = tl.full((BLOCK_G, 1), -float("inf"), ACC_DTYPE)
        vmin = tl.full((BLOCK_G, 1), float("inf"), ACC_DTYPE)
        for c in range(N_CHUNKS):
            valid = in_group & (cols + c * CHUNK < L)
            v = tl.load(x_ptr + base + cols + c * CHUNK, mask=valid, other=0.0).to(ACC_DTYPE)
            vmax = tl.maximum(vmax, tl.max(tl.where(valid, v, -float("inf")), axis=1)[:, None])
            vmin = tl.minimum(vmin, tl.min(tl.where(valid, v, float("inf")), axis=1)[:, None])
        scale, zero = group_scale_zero(vmax, vmin, clip, eps, SYMMETRIC, QMAX, IS_F64)
        for c in range(N_CHUNKS):
            valid = in_group & (cols + c * CHUNK < L)
            v = tl.load(x_ptr + base + cols + c * CHUNK, mask=valid, other=0.0).to(ACC_DTYPE)
            out, kept = quantize_tile(v, scale, zero, QMIN, QMAX, IS_F64)
            tl.store(out_ptr + base + cols + c * CHUNK, cast_to(out, out_dtype, ROUND_BF16_BY_HAND), mask=valid)
            if NEED_MASK:
                tl.store(keep_ptr + base + cols + c * CHUNK, kept.to(tl.int8), mask=valid)


@triton.jit
def _ste_mask_kernel(g_ptr, keep_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = where(keep, g, 0) elementwise."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    g = tl.load(g_ptr + offs, mask=valid, other=0.0)
    keep = tl.load(keep_ptr + offs, mask=valid, other=0)
    tl.store(out_ptr + offs, tl.where(keep != 0, g, tl.zeros_like(g)), mask=valid)


# --------------------------------------------------------------------------- launchers


def quantize_groups(
    x: Tensor, out: Tensor, keep: Tensor, bits: int, granularity: str, group_size: int, symmetric: bool,
    clip_ratio: float, need_mask: bool, compute: torch.dtype,
) -> None:
    """Fake-quantize contiguous ``x`` into ``out`` (and the kept mask, int8 view, into ``keep``)."""
    n = x.numel()
    d = x.shape[-1]
    flags = quant_flags(bits, symmetric, compute, x.device)
    stats = x.new_zeros(2, dtype=compute)
    if granularity == "tensor":
        block = 4096
        parts = triton.cdiv(n, block)
        pmax = torch.empty(parts, dtype=compute, device=x.device)
        pmin = torch.empty(parts, dtype=compute, device=x.device)
        _minmax_partials_kernel[(parts,)](x, pmax, pmin, n, ACC_DTYPE=flags["ACC_DTYPE"], BLOCK=block)
        stats = torch.stack((pmax.amax(), pmin.amin()))
        L, n_groups = n, 1
    elif granularity == "group":
        L, n_groups = group_size, n // group_size
    else:
        L, n_groups = d, n // d
    chunk = min(triton.next_power_of_2(L), _MAX_TILE)
    block_g = max(1, min(64, _MAX_TILE // chunk))
    if granularity == "tensor":
        chunk, block_g = _MAX_TILE, 1
    grid = (triton.cdiv(n_groups, block_g),)
    if not need_mask:
        keep = x.new_zeros(1, dtype=torch.int8)  # never written; a valid pointer
    _fake_quantize_groups_kernel[grid](
        x, out, keep, stats, n_groups, L, float(clip_ratio), SCALE_EPS,
        STATS_GIVEN=granularity == "tensor", NEED_MASK=need_mask,
        BLOCK_G=block_g, CHUNK=chunk, N_CHUNKS=triton.cdiv(L, chunk),
        num_warps=8 if block_g * chunk >= 4096 else 4, enable_fp_fusion=False, **flags,
    )


def fake_quantize(
    x: Tensor, bits: int, granularity: str, group_size: int, symmetric: bool, clip_ratio: float, rotate: bool,
    need_mask: bool,
) -> tuple[Tensor, Tensor]:
    """The op ``fastft::fake_quantize`` on Triton: (out, mask) as the reference returns them."""
    x = x.contiguous()
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.empty_like(x)
    mask = torch.empty(x.shape if need_mask else (0,), dtype=torch.bool, device=x.device)
    keep = mask.view(torch.int8)
    if x.numel() == 0:
        return out, mask
    if rotate:
        if granularity in ("token", "channel"):
            rotate_rows(x, out, inverse=False, quant=dict(bits=bits, symmetric=symmetric, clip_ratio=clip_ratio),
                        keep=keep if need_mask else None)
            return out, mask
        rotated = torch.empty(x.shape, dtype=compute, device=x.device)
        rotate_rows(x, rotated, inverse=False)
        x = rotated
    quantize_groups(x, out, keep, bits, granularity, group_size, symmetric, clip_ratio, need_mask, compute)
    return out, mask


def fake_quantize_backward(grad: Tensor, mask: Tensor, rotate: bool) -> Tensor:
    """The op ``fastft::fake_quantize_backward`` on Triton: STE mask, then the inverse rotation if ``rotate``."""
    grad = grad.contiguous()
    keep = mask.view(torch.int8) if mask.numel() else None
    if rotate:
        out = torch.empty_like(grad)
        rotate_rows(grad, out, inverse=True, mask_in=keep)
        return out
    if keep is None:
        return grad.clone()
    out = torch.empty_like(grad)
    n = grad.numel()
    block = 4096
    _ste_mask_kernel[(triton.cdiv(n, block),)](grad, keep, out, n, BLOCK=block)
    return out

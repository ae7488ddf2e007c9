"""Triton kernels of the Hadamard transform (``fastft.ops.hadamard``), with an optional fused per-token
fake-quantization epilogue and an optional input mask (the straight-through backward).

The matrix is the op's: for a row x of length d = K·2^n viewed as X (K × 2^n), ``Y = H_K X S / sqrt(d)``
(``H_Kᵀ`` for the inverse), S Sylvester's ±1 matrix. The kernels regroup it as ``Y = L X' S_M / sqrt(d)``
with ``L = H_K ⊗ S_{2^a}`` and ``M = 2^(n-a)`` (X' the (K·2^a) × M view of the row): S_{2^n} =
S_{2^a} ⊗ S_M, so this is the same matrix; ``a`` > 0 only moves part of a long power of two into the
dense factor so that the butterfly tile stays small.

Two kernels:

* ``_butterfly_rows_kernel`` (L = 1, d = M a power of two up to ``_MAX_TILE``): one program per
  ``BLOCK_R`` rows; the tile (BLOCK_R × M) is loaded once, the log2(M) butterfly stages run in registers
  (each stage: reshape to (..., 2, h), split, (u + v, u - v), join), the result is scaled, optionally
  fake-quantized per row, and stored once.
* ``_factor_rows_kernel`` (L of order K_L > 1): one program per row. For each chunk of ``BK`` output rows
  of Y' (BK × M): ``acc = Σ_c L[chunk, c] @ X'[c, :]`` with ``tl.dot`` over chunks c of BK input rows
  (L is stored zero-padded to a multiple of BK, so its loads need no mask; the dot accumulates in float32
  — float64 for float64 — and its operands are exact: L is ±1, x is the input), then the butterflies
  along M on acc, the scale, and the store. The small dense product comes first so that half-precision
  input feeds the tensor cores directly. With the quantization epilogue and more than one output chunk
  the row is computed twice: once for its max/min, once to quantize and store (nothing is written in
  between; the second read of x hits L2). For M < 16 (tl.dot needs dimensions >= 16) the chunk product
  is a broadcast multiply and sum instead.

Options of both: ``MASK_IN`` (x := where(keep, x, 0) on load: the clipped STE before the inverse
rotation) and ``QUANT`` (per-row fake quantization of the rotated values in the compute dtype, the
formulas of ``kernels/fake_quantize.py``; the "kept" mask is stored as int8 when asked).

The summation order differs from the reference's (butterflies first, then H_K), so results agree to
rounding; on integer-valued inputs (exact sums) they agree bit for bit, which the tests use to compare
the quantized outputs exactly. The scalars (1/sqrt(d), clip_ratio, EPS) arrive as float64 and are
rounded once to the compute dtype, as torch rounds a Python scalar. Every launch disables FMA contraction
(``enable_fp_fusion=False``): torch rounds each product before the next operation, and so must the
kernels for the scales to match bit for bit (e.g. ``hi - lo`` with ``hi = max·c``, ``lo = min·c``). Under the interpreter bfloat16 dot operands are upcast to float32 (its
bf16 ``tl.dot`` is wrong) and bfloat16 stores are rounded by hand.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..math.hadamard import hadamard_factorization, hadamard_k_factor
from ..math.quantization import SCALE_EPS

from .common import cast_to, group_scale_zero, quant_flags, quantize_tile

_MAX_TILE = 16384  # elements of the butterfly tile a program holds
_BK_MAX = 64


@triton.jit
def _butterflies(x, R: tl.constexpr, M: tl.constexpr, LOG2M: tl.constexpr):
    """x (R × M) times Sylvester's S_M on the right: log2(M) stages of (u, v) -> (u + v, u - v)."""
    for s in tl.static_range(LOG2M):  # stage s pairs elements 2^s apart
        x = tl.reshape(x, (R, M >> (s + 1), 2, 1 << s))
        x = tl.permute(x, (0, 1, 3, 2))
        u, v = tl.split(x)
        x = tl.join(u + v, u - v)
        x = tl.permute(x, (0, 1, 3, 2))
        x = tl.reshape(x, (R, M))
    return x


@triton.jit
def _butterfly_rows_kernel(
    x_ptr, keep_in_ptr, out_ptr, keep_out_ptr, n_rows, scale_d: tl.float64, clip: tl.float64, eps: tl.float64,
    M: tl.constexpr, LOG2M: tl.constexpr, BLOCK_R: tl.constexpr,
    MASK_IN: tl.constexpr, QUANT: tl.constexpr, NEED_MASK: tl.constexpr,
    SYMMETRIC: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
    ACC_DTYPE: tl.constexpr, IS_F64: tl.constexpr, ROUND_BF16_BY_HAND: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs = rows.to(tl.int64)[:, None] * M + tl.arange(0, M)[None, :]
    valid = rows[:, None] < n_rows
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(ACC_DTYPE)
    if MASK_IN:
        keep = tl.load(keep_in_ptr + offs, mask=valid, other=0)
        x = tl.where(keep != 0, x, 0.0)
    y = _butterflies(x, BLOCK_R, M, LOG2M) * tl.full((), scale_d, ACC_DTYPE)
    out_dtype = out_ptr.dtype.element_ty
    if QUANT:
        clip = tl.full((), clip, ACC_DTYPE)
        eps = tl.full((), eps, ACC_DTYPE)
        scale, zero = group_scale_zero(tl.max(y, axis=1)[:, None], tl.min(y, axis=1)[:, None], clip, eps,
                                       SYMMETRIC, QMAX, IS_F64)
        y, kept = quantize_tile(y, scale, zero, QMIN, QMAX, IS_F64)
        if NEED_MASK:
            tl.store(keep_out_ptr + offs, kept.to(tl.int8), mask=valid)
    tl.store(out_ptr + offs, cast_to(y, out_dtype, ROUND_BF16_BY_HAND), mask=valid)


@triton.jit
def _factor_chunk(x_row, keep_row, l_ptr, chunk, K_L, K_PAD: tl.constexpr, M: tl.constexpr, LOG2M: tl.constexpr,
                  BK: tl.constexpr, MASK_IN: tl.constexpr, ACC_DTYPE: tl.constexpr, UPCAST_DOT: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr):
    """Rows [chunk·BK, (chunk+1)·BK) of L X' S_M (unscaled), BK × M in ACC_DTYPE."""
    i = tl.arange(0, BK)
    m = tl.arange(0, M)
    acc = tl.zeros((BK, M), dtype=ACC_DTYPE)
    for c0 in range(0, K_PAD, BK):
        lt = tl.load(l_ptr + (chunk * BK + i)[:, None] * K_PAD + (c0 + i)[None, :])
        in_rows = (c0 + i)[:, None] < K_L
        xt = tl.load(x_row + (c0 + i)[:, None] * M + m[None, :], mask=in_rows, other=0.0)
        if MASK_IN:
            keep = tl.load(keep_row + (c0 + i)[:, None] * M + m[None, :], mask=in_rows, other=0)
            xt = tl.where(keep != 0, xt, tl.zeros_like(xt))
        if M >= 16:
            if UPCAST_DOT:
                lt = lt.to(tl.float32)
                xt = xt.to(tl.float32)
            acc = tl.dot(lt, xt, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        else:  # tl.dot needs every dimension >= 16: a broadcast product for short M (d = 28, 80, 96 ...)
            acc += tl.sum(lt.to(ACC_DTYPE)[:, :, None] * xt.to(ACC_DTYPE)[None, :, :], axis=1)
    return _butterflies(acc, BK, M, LOG2M)


@triton.jit
def _factor_rows_kernel(
    x_ptr, keep_in_ptr, l_ptr, out_ptr, keep_out_ptr, K_L, scale_d: tl.float64, clip: tl.float64, eps: tl.float64,
    K_PAD: tl.constexpr, M: tl.constexpr, LOG2M: tl.constexpr, BK: tl.constexpr,
    MASK_IN: tl.constexpr, QUANT: tl.constexpr, NEED_MASK: tl.constexpr,
    SYMMETRIC: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
    ACC_DTYPE: tl.constexpr, IS_F64: tl.constexpr, ROUND_BF16_BY_HAND: tl.constexpr,
    UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    d = K_L * M
    x_row = x_ptr + row * d
    keep_row = keep_in_ptr + row * d
    out_row = out_ptr + row * d
    keep_out_row = keep_out_ptr + row * d
    scale_d = tl.full((), scale_d, ACC_DTYPE)
    out_dtype = out_ptr.dtype.element_ty
    i = tl.arange(0, BK)
    m = tl.arange(0, M)
    N_CHUNKS: tl.constexpr = K_PAD // BK
    if QUANT:
        clip = tl.full((), clip, ACC_DTYPE)
        eps = tl.full((), eps, ACC_DTYPE)
        if N_CHUNKS == 1:
            y = _factor_chunk(x_row, keep_row, l_ptr, 0, K_L, K_PAD, M, LOG2M, BK, MASK_IN, ACC_DTYPE, UPCAST_DOT,
                              INPUT_PRECISION) * scale_d
            valid = i[:, None] < K_L
            vmax = tl.max(tl.max(tl.where(valid, y, -float("inf")), axis=1), axis=0)
            vmin = tl.min(tl.min(tl.where(valid, y, float("inf")), axis=1), axis=0)
            scale, zero = group_scale_zero(vmax, vmin, clip, eps, SYMMETRIC, QMAX, IS_F64)
            y, kept = quantize_tile(y, scale, zero, QMIN, QMAX, IS_F64)
            offs = i[:, None] * M + m[None, :]
            tl.store(out_row + offs, cast_to(y, out_dtype, ROUND_BF16_BY_HAND), mask=valid)
            if NEED_MASK:
                tl.store(keep_out_row + offs, kept.to(tl.int8), mask=valid)
        else:
            vmax = tl.full((), -float("inf"), ACC_DTYPE)
            vmin = tl.full((), float("inf"), ACC_DTYPE)
            for chunk in range(N_CHUNKS):
                y = _factor_chunk(x_row, keep_row, l_ptr, chunk, K_L, K_PAD, M, LOG2M, BK, MASK_IN, ACC_DTYPE,
                                  UPCAST_DOT, INPUT_PRECISION) * scale_d
                valid = (chunk * BK + i)[:, None] < K_L
                vmax = tl.maximum(vmax, tl.max(tl.max(tl.where(valid, y, -float("inf")), axis=1), axis=0))
                vmin = tl.minimum(vmin, tl.min(tl.min(tl.where(valid, y, float("inf")), axis=1), axis=0))
            scale, zero = group_scale_zero(vmax, vmin, clip, eps, SYMMETRIC, QMAX, IS_F64)
            for chunk in range(N_CHUNKS):
                y = _factor_chunk(x_row, keep_row, l_ptr, chunk, K_L, K_PAD, M, LOG2M, BK, MASK_IN, ACC_DTYPE,
                                  UPCAST_DOT, INPUT_PRECISION) * scale_d
                valid = (chunk * BK + i)[:, None] < K_L
                y, kept = quantize_tile(y, scale, zero, QMIN, QMAX, IS_F64)
                offs = (chunk * BK + i)[:, None] * M + m[None, :]
                tl.store(out_row + offs, cast_to(y, out_dtype, ROUND_BF16_BY_HAND), mask=valid)
                if NEED_MASK:
                    tl.store(keep_out_row + offs, kept.to(tl.int8), mask=valid)
    else:
        for chunk in range(N_CHUNKS):
            y = _factor_chunk(x_row, keep_row, l_ptr, chunk, K_L, K_PAD, M, LOG2M, BK, MASK_IN, ACC_DTYPE,
                              UPCAST_DOT, INPUT_PRECISION) * scale_d
            valid = (chunk * BK + i)[:, None] < K_L
            offs = (chunk * BK + i)[:, None] * M + m[None, :]
            tl.store(out_row + offs, cast_to(y, out_dtype, ROUND_BF16_BY_HAND), mask=valid)


# --------------------------------------------------------------------------- launchers
def kernel_layout(d: int) -> tuple[int, int, int]:
    """(K, a, M): the row is handled as L = H_K ⊗ S_{2^a} (order K·2^a) times butterflies over M = 2^(n-a)."""
    K, n = hadamard_factorization(d)
    M = 1 << n
    if K == 1 and M <= _MAX_TILE:
        return 1, 0, M
    a = 0
    bk = min(_BK_MAX, max(16, triton.next_power_of_2(K)))
    while bk * (M >> a) > _MAX_TILE or (K == 1 and a < 4):
        a += 1
        bk = min(_BK_MAX, max(16, triton.next_power_of_2(K << a)))
    return K, a, M >> a


@functools.lru_cache(maxsize=64)
def _left_factor(K: int, a: int, inverse: bool, dtype: torch.dtype, device: torch.device, bk: int) -> Tensor:
    """(H_K or H_Kᵀ) ⊗ S_{2^a}, ±1, zero-padded to a multiple of bk, in dtype on device."""
    H = hadamard_k_factor(K, torch.float64)
    if inverse:
        H = H.t()
    if a:
        H = torch.kron(H, hadamard_k_factor(1 << a, torch.float64))
    k_l = H.shape[0]
    k_pad = triton.cdiv(k_l, bk) * bk
    padded = torch.zeros(k_pad, k_pad, dtype=torch.float64)
    padded[:k_l, :k_l] = H
    return padded.to(dtype=dtype, device=device).contiguous()


def rotate_rows(
    x: Tensor, out: Tensor, inverse: bool, quant: Optional[dict] = None, keep: Optional[Tensor] = None,
    mask_in: Optional[Tensor] = None,
) -> None:
    """``out = x H_dᵀ`` (``x H_d`` if inverse) row by row over contiguous x's last dim, out of any float dtype.

    ``quant``: dict(bits, symmetric, clip_ratio) for the fused per-row fake quantization (out then holds
    the dequantized values), with the kept mask into ``keep`` (int8, x's shape) if given. ``mask_in``:
    int8 tensor of x's shape; x is zeroed where it is 0 before the transform.
    """
    d = x.shape[-1]
    n_rows = x.numel() // d
    if n_rows == 0:
        return
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    K, a, M = kernel_layout(d)
    interpreting = x.device.type == "cpu"
    qflags = quant_flags(quant["bits"] if quant else 2, quant["symmetric"] if quant else False, compute, x.device)
    common = dict(
        QUANT=quant is not None, NEED_MASK=keep is not None, MASK_IN=mask_in is not None,
        LOG2M=M.bit_length() - 1, M=M, **qflags,
    )
    clip = float(quant["clip_ratio"]) if quant else 1.0
    dummy = x.new_zeros(1, dtype=torch.int8)  # a valid pointer for the arguments a specialization never reads
    keep_in = mask_in if mask_in is not None else dummy
    keep_out = keep if keep is not None else dummy
    scale_d = 1.0 / math.sqrt(d)
    if K == 1 and a == 0:
        block_r = max(1, min(16, _MAX_TILE // M, triton.next_power_of_2(n_rows)))
        _butterfly_rows_kernel[(triton.cdiv(n_rows, block_r),)](
            x, keep_in, out, keep_out, n_rows, scale_d, clip, SCALE_EPS, BLOCK_R=block_r,
            num_warps=8 if block_r * M >= 4096 else 4, enable_fp_fusion=False, **common,
        )
        return
    k_l = K << a
    bk = min(_BK_MAX, max(16, triton.next_power_of_2(k_l)))
    dot_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float64) else torch.float32
    left = _left_factor(K, a, inverse, dot_dtype, x.device, bk)
    _factor_rows_kernel[(n_rows,)](
        x, keep_in, left, out, keep_out, k_l, scale_d, clip, SCALE_EPS,
        K_PAD=left.shape[0], BK=bk, UPCAST_DOT=interpreting and x.dtype == torch.bfloat16,
        INPUT_PRECISION="ieee", num_warps=8 if bk * M >= 4096 else 4, enable_fp_fusion=False, **common,
    )


def hadamard_transform(x: Tensor, inverse: bool) -> Tensor:
    """The op ``fastft::hadamard_transform`` on Triton: x H_dᵀ (x H_d if inverse) in x's dtype."""
    x = x.contiguous()
    out = torch.empty_like(x)
    rotate_rows(x, out, inverse)
    return out

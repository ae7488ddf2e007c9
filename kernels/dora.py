"""Triton kernels of the DoRA ops (``fastft.ops.dora_row_norm``, ``fastft.ops.dora``), over a dense or a
bitsandbytes 4-bit base weight.

The ops (see ``fastft/ops/dora_row_norm.py`` and ``fastft/ops/dora.py`` for the full statements), for x (M×K),
W (N×K), A (R×K), B (N×R)::

    row norm   P = W Aᵀ,  G = A Aᵀ,  n = max(sqrt(max(‖W_i‖² + 2s·B_i·P_i + s²·B_i G B_iᵀ, 0)), eps)
    forward    xa = x Aᵀ,  y = g ⊙ (x Wᵀ + s·xa Bᵀ) + b
    backward   gb = gy (diag(g) B),  dx = (g ⊙ gy) W + s·gb A,  dA = s·gbᵀ x,  dB = s·diag(g) gyᵀ xa,
               dg = Σ_tokens gy ⊙ z

Built from the LoRA kernels' blocks (``fastft.kernels.lora``): the fused linear kernel with its DoRA
hooks does the GEMMs — the forward's epilogue multiplies the accumulator by g before adding the bias
(``out_scale``), the input gradient scales gy's columns by g inside its K-loop (``act_scale``), so
neither ``g ⊙ z`` nor ``g ⊙ gy`` is ever a tensor; ``scaled_matmul`` does the skinny products
(xa, gb, dA, dB, P for a dense W, G). This file adds two kernels:

* ``_row_norm_kernel``: n from ‖W_i‖², P, B and G, one program per block of rows, in float32
  (float64 for float64): O×R×R work. P itself is one O×K×R product — ``scaled_matmul`` (split over K on
  a GPU) for a dense W, the fused kernel with a 4-bit W (dequantized per tile) otherwise; the O×K matrix
  W + s·BA is never formed.
* ``_pre_scale_dot_kernel``: ``dg = Σ_tokens gy ⊙ z`` per output column, z being the saved pre-scale
  output or recovered from the saved output as ``(y - b) / g``. A column block holding a g = 0 (its y
  says nothing of z) recomputes z for that block from x, W, xa and B with the fused kernel's K-loop
  (``accumulate_linear``, ``lowrank_tile``): exact, and without a host synchronisation. Tokens are split
  over a second grid axis on a GPU, each split writing a float32 partial that is summed afterwards.

The dropout path (PEFT's semantics, a second GEMM with the dropped input x̃) runs the fused kernel twice
in each direction and combines the results with elementwise PyTorch; x̃ is formed for the forward's
second GEMM and freed. The exact gradient through the norm (``dora_row_norm_backward``) is one fused
launch, ``dA = 2s·((diag(dq) B)ᵀ W + s·(Bᵀ diag(dq) B) A)``, plus O×R-sized PyTorch.

Numerics follow ``fastft.kernels.lora``: float32 accumulation (float64 for float64), one rounding per
stored result; g and the norms stay float32.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (
    accumulate_linear, block_size, check_operands, dot_flags, four_bit_parts, index_dtype, keep_mask, lowrank_tile, mma,
    sm_count,
)
from .lora import dense_weight, fused_linear_lowrank, scaled_matmul, scaled_mm


INTERPRETER_SPLITS = 1
"""Test hook: the number of token splits of ``pre_scale_dot`` under the Triton interpreter (CPU), where the
GPU's choice (from its SM count) does not apply. Tests raise it to run the split path a GPU takes (the
reductions of ``fastft.kernels.lora`` have their own ``INTERPRETER_SPLITS``)."""


@triton.jit
def _row_norm_kernel(
    proj_ptr, b_ptr, gram_ptr, sq_ptr, norm_ptr, O, R,
    stride_po, stride_pr, stride_bo, stride_br, stride_gi, stride_gj,
    scale: tl.float64, eps: tl.float64,
    ACC_DTYPE: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``n_i = max(sqrt(max(sq_i + 2s·Σ_r B_ir P_ir + s²·Σ_r (B G)_ir B_ir, 0)), eps)`` for a block of rows i."""
    offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    in_o = offs_o < O
    scale = tl.full((), scale, ACC_DTYPE)
    cross = tl.zeros((BLOCK_O,), dtype=ACC_DTYPE)
    quad = tl.zeros((BLOCK_O,), dtype=ACC_DTYPE)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        tile = in_o[:, None] & (offs_r < R)[None, :]
        b = tl.load(b_ptr + offs_o[:, None] * stride_bo + offs_r[None, :] * stride_br, mask=tile, other=0.0)
        b = b.to(ACC_DTYPE)
        p = tl.load(proj_ptr + offs_o[:, None] * stride_po + offs_r[None, :] * stride_pr, mask=tile, other=0.0)
        cross += tl.sum(b * p.to(ACC_DTYPE), axis=1)
        bg = tl.zeros((BLOCK_O, BLOCK_R), dtype=ACC_DTYPE)
        for r1 in range(0, R, BLOCK_R):
            offs_r1 = r1 + tl.arange(0, BLOCK_R)
            b1 = tl.load(b_ptr + offs_o[:, None] * stride_bo + offs_r1[None, :] * stride_br,
                         mask=in_o[:, None] & (offs_r1 < R)[None, :], other=0.0).to(ACC_DTYPE)
            gram = tl.load(gram_ptr + offs_r1[:, None] * stride_gi + offs_r[None, :] * stride_gj,
                           mask=(offs_r1 < R)[:, None] & (offs_r < R)[None, :], other=0.0).to(ACC_DTYPE)
            bg = mma(b1, gram, bg, False, "ieee")
        quad += tl.sum(bg * b, axis=1)
    sq = tl.load(sq_ptr + offs_o, mask=in_o, other=0.0).to(ACC_DTYPE)
    q = sq + 2.0 * scale * cross + scale * scale * quad
    norm = tl.maximum(tl.sqrt(tl.maximum(q, 0.0)), tl.full((), eps, ACC_DTYPE))
    tl.store(norm_ptr + offs_o, norm, mask=in_o)


@triton.jit
def _pre_scale_dot_kernel(
    gy_ptr, saved_ptr, bias_ptr, g_ptr, x_ptr, w_ptr, absmax_ptr, code_ptr, xa_ptr, b_ptr, out_ptr,
    M, N, K, R, tokens_per_split,
    stride_gm, stride_gn, stride_sm, stride_sn, stride_xm, stride_xk, stride_wk, stride_wn,
    stride_am, stride_ar, stride_vr, stride_vn, stride_split,
    scale: tl.float64,
    SAVED_IS_OUTPUT: tl.constexpr, HAS_BIAS: tl.constexpr, FOUR_BIT: tl.constexpr, BLOCKSIZE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, INDEX_DTYPE: tl.constexpr,
    ROUND_BF16_BY_HAND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``out[split, n] = Σ_{tokens m of this split} gy[m, n] · z[m, n]`` for a block of columns n.

    z is ``saved`` or, with SAVED_IS_OUTPUT, ``(saved - bias) / g``; a block with a column where g = 0
    recomputes z there as ``x W'[:, n] + scale · xa V[:, n]`` (W' = Wᵀ, V = Bᵀ).
    """
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(INDEX_DTYPE)
    in_n = offs_n < N
    m_start = tl.program_id(1) * tokens_per_split
    m_end = tl.minimum(M, m_start + tokens_per_split)
    dot = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    if SAVED_IS_OUTPUT and HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=in_n, other=0.0).to(ACC_DTYPE)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(INDEX_DTYPE)
        tile = (offs_m < m_end)[:, None] & in_n[None, :]
        gy = tl.load(gy_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn, mask=tile, other=0.0)
        z = tl.load(saved_ptr + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn, mask=tile, other=0.0)
        z = z.to(ACC_DTYPE)
        if SAVED_IS_OUTPUT and HAS_BIAS:
            z = tl.where(tile, z - bias[None, :], 0.0)
        dot += tl.sum(gy.to(ACC_DTYPE) * z, axis=0)
    if SAVED_IS_OUTPUT:
        g = tl.load(g_ptr + offs_n, mask=in_n, other=1.0).to(ACC_DTYPE)
        zero = g == 0.0
        dot = dot / tl.where(zero, 1.0, g)
        if tl.sum(zero.to(tl.int32), axis=0) > 0:
            exact = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
            for m0 in range(m_start, m_end, BLOCK_M):
                offs_m = (m0 + tl.arange(0, BLOCK_M)).to(INDEX_DTYPE)
                in_m = offs_m < m_end
                z = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
                z = lowrank_tile(z, xa_ptr, b_ptr, offs_m, offs_n, in_m, in_n, R, stride_am, stride_ar, stride_vr,
                                 stride_vn, UPCAST_DOT, INPUT_PRECISION, BLOCK_R)
                z = z * tl.full((), scale, ACC_DTYPE)
                z = accumulate_linear(z, x_ptr, w_ptr, absmax_ptr, code_ptr, x_ptr, offs_m, offs_n, in_m, in_n, K, N,
                                      stride_xm, stride_xk, stride_wk, stride_wn, FOUR_BIT, True, BLOCKSIZE, False,
                                      UPCAST_DOT, INPUT_PRECISION, INDEX_DTYPE, ROUND_BF16_BY_HAND, BLOCK_K)
                gy = tl.load(gy_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                             mask=in_m[:, None] & in_n[None, :], other=0.0)
                exact += tl.sum(gy.to(ACC_DTYPE) * z, axis=0)
            dot = tl.where(zero, exact, dot)
    tl.store(out_ptr + tl.program_id(1) * stride_split + offs_n, dot, mask=in_n)


# ----------------------------------------------------------------------------------------------- launch


def _row_norm_from_projection(proj: Tensor, lora_B: Tensor, gram: Tensor, weight_sq_norm: Tensor, scale: float,
                              eps: float) -> Tensor:
    O, R = lora_B.shape
    norm = torch.empty(O, dtype=weight_sq_norm.dtype, device=lora_B.device)
    if O == 0:
        return norm
    cap = 32 if lora_B.device.type == "cpu" else 64
    block_o, block_r = block_size(O, cap), block_size(R, cap)
    _row_norm_kernel[(triton.cdiv(O, block_o),)](
        proj, lora_B, gram, weight_sq_norm.contiguous(), norm, O, R,
        proj.stride(0), proj.stride(1), lora_B.stride(0), lora_B.stride(1), gram.stride(0), gram.stride(1),
        float(scale), float(eps),
        ACC_DTYPE=tl.float64 if weight_sq_norm.dtype == torch.float64 else tl.float32, BLOCK_O=block_o, BLOCK_R=block_r,
        num_warps=4,
    )
    return norm


def _gram(lora_A: Tensor, dtype: torch.dtype) -> Tensor:
    """G = A Aᵀ (R×R) in ``dtype`` (float32 or float64), accumulated at that precision."""
    R = lora_A.shape[0]
    return scaled_matmul(lora_A, lora_A.t(), torch.empty(R, R, dtype=dtype, device=lora_A.device))


def dora_row_norm(
    weight: Tensor, absmax: Optional[Tensor], code: Optional[Tensor], blocksize: int, out_features: int,
    lora_A: Tensor, lora_B: Tensor, weight_sq_norm: Tensor, scale: float, eps: float,
) -> tuple[Tensor, Tensor]:
    """``(n, P = W Aᵀ)`` of the row-norm op, both in ``weight_sq_norm``'s dtype (see the module docstring)."""
    A = lora_A.contiguous()
    R, K = A.shape
    dense = weight if absmax is None else None
    check_operands(A.dtype, dense, (out_features, K), lora_B=lora_B)
    dtype = weight_sq_norm.dtype
    proj = torch.empty(out_features, R, dtype=dtype, device=A.device)
    w, four_bit = four_bit_parts(weight, absmax, code, blocksize, out_features * K)
    if four_bit is None:
        scaled_matmul(weight, A.t(), proj)
    else:  # Pᵀ = A Wᵀ with W dequantized tile by tile
        fused_linear_lowrank(A, w, four_bit, True, None, None, 1.0, None, None, 1.0, proj.t())
    norm = _row_norm_from_projection(proj, lora_B, _gram(A, dtype), weight_sq_norm, scale, eps)
    return norm, proj


def dora_row_norm_backward(
    grad_norm: Tensor, norm: Tensor, proj: Tensor, weight: Tensor, absmax: Optional[Tensor], code: Optional[Tensor],
    blocksize: int, lora_A: Tensor, lora_B: Tensor, scale: float, eps: float, need_dA: bool, need_dB: bool,
) -> tuple[Tensor, Tensor]:
    """``(dA, dB)`` of the row norm (module docstring), empty where not needed."""
    dA, dB = lora_A.new_empty(0), lora_B.new_empty(0)
    dtype = norm.dtype
    dq = torch.where(norm > eps, grad_norm.to(dtype) / (2.0 * norm), torch.zeros_like(norm))
    B = lora_B.to(dtype)
    A = lora_A.contiguous()
    if need_dB:
        dB = (2.0 * scale * dq[:, None] * (proj + scale * (B @ _gram(A, dtype)))).to(lora_B.dtype)
    if need_dA:
        R, K = A.shape
        weighted_B = dq[:, None] * B
        w, four_bit = four_bit_parts(weight, absmax, code, blocksize, lora_B.shape[0] * K)
        dA = torch.empty(R, K, dtype=A.dtype, device=A.device)
        fused_linear_lowrank(weighted_B.t().to(A.dtype), w, four_bit, False, (B.t() @ weighted_B).to(A.dtype), A,
                             scale, None, None, 1.0, dA)
        dA.mul_(2.0 * scale)
    return dA, dB


def dora_forward(
    x: Tensor, weight: Tensor, absmax: Optional[Tensor], code: Optional[Tensor], blocksize: int, out_features: int,
    bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, g: Tensor, scale: float, mask: Optional[Tensor], p: float,
    keep_pre_scale: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, xa, z)`` of the DoRA linear op; z (the pre-scale output) is empty unless kept or with dropout."""
    x = x.contiguous()
    M, K = x.shape
    R = lora_A.shape[0]
    dense = weight if absmax is None else None
    check_operands(x.dtype, dense, (out_features, K), lora_A=lora_A, lora_B=lora_B, bias=bias)
    w, four_bit = four_bit_parts(weight, absmax, code, blocksize, out_features * K)
    w_t = w if four_bit else weight.t()
    bias = None if bias is None else bias.contiguous()
    g = g.contiguous()
    xa = x.new_empty(M, R)
    y = x.new_empty(M, out_features)
    if mask is None:
        scaled_matmul(lora_A, x.t(), xa.t())
        z = x.new_empty(M, out_features) if keep_pre_scale else x.new_empty(0)
        fused_linear_lowrank(x, w_t, four_bit, True, xa, lora_B.t(), scale, bias, None, 1.0, y, out_scale=g,
                             pre_scale_out=z if keep_pre_scale else None)
        return y, xa, z
    keep = keep_mask(mask, x)
    keep_scale = 1.0 / (1.0 - p)
    scaled_matmul(lora_A, x.t(), xa.t(), keep=keep.t(), keep_scale=keep_scale)
    z = x.new_empty(M, out_features)
    dropped = x * mask * keep_scale
    fused_linear_lowrank(dropped, w_t, four_bit, True, xa, lora_B.t(), scale, None, None, 1.0, z)
    del dropped
    fused_linear_lowrank(x, w_t, four_bit, True, xa, lora_B.t(), scale, bias, None, 1.0, y)
    y.addcmul_(z, g - 1.0)
    return y, xa, z


def pre_scale_dot(
    grad_y: Tensor, saved: Tensor, saved_is_output: bool, bias: Optional[Tensor], g: Tensor, x: Tensor, xa: Tensor,
    w: Tensor, four_bit, w_t: Tensor, lora_B: Tensor, scale: float,
) -> Tensor:
    """``dg = Σ_tokens gy ⊙ z`` (see ``_pre_scale_dot_kernel``), in g's dtype."""
    M, N = grad_y.shape
    dg = torch.empty(N, dtype=g.dtype, device=g.device)
    if N == 0:
        return dg
    interpreting = grad_y.device.type == "cpu"
    cap = 32 if interpreting else 64
    K = x.shape[1] if saved_is_output else 0
    block_m, block_n = block_size(M, cap), block_size(N, cap)
    block_k = block_size(K, 32 if (interpreting or four_bit is not None or x.dtype == torch.float32) else 64)
    block_r = block_size(lora_B.shape[1], 16 if interpreting else 64)
    col_blocks = triton.cdiv(N, block_n)
    splits = INTERPRETER_SPLITS if interpreting else max(1, min(triton.cdiv(4 * sm_count(g.device.index or 0), col_blocks),
                                               triton.cdiv(M, block_m)))
    tokens_per_split = triton.cdiv(triton.cdiv(max(M, 1), splits), block_m) * block_m
    splits = max(1, triton.cdiv(M, tokens_per_split))
    target = dg if splits == 1 else torch.empty(splits, N, dtype=g.dtype, device=g.device)
    if four_bit is None:
        absmax = code = w
        blocksize, stride_wk, stride_wn, extra = 0, w_t.stride(0), w_t.stride(1), 0
    else:
        absmax, code, blocksize = four_bit
        stride_wk = stride_wn = 0
        extra = N * K
    x_ = x if saved_is_output else saved
    xa_ = xa if saved_is_output else saved
    flags = dot_flags(grad_y.dtype, grad_y.device)
    _pre_scale_dot_kernel[(col_blocks, splits)](
        grad_y, saved, bias if bias is not None else g, g, x_, w if saved_is_output else saved, absmax, code, xa_,
        lora_B, target,
        M, N, K, lora_B.shape[1], tokens_per_split,
        grad_y.stride(0), grad_y.stride(1), saved.stride(0), saved.stride(1), x_.stride(0), x_.stride(1),
        stride_wk, stride_wn, xa_.stride(0), xa_.stride(1), lora_B.stride(1), lora_B.stride(0),
        target.stride(0) if splits > 1 else 0,
        float(scale),
        SAVED_IS_OUTPUT=saved_is_output, HAS_BIAS=bias is not None, FOUR_BIT=four_bit is not None, BLOCKSIZE=blocksize,
        INDEX_DTYPE=index_dtype(grad_y, saved, x_, xa_, None if four_bit else w_t, extra=extra),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=4, **flags,
    )
    if splits > 1:
        torch.sum(target, dim=0, out=dg)
    return dg


def dora_backward(
    grad_y: Tensor, x: Tensor, xa: Tensor, saved: Tensor, saved_is_output: bool, weight: Tensor,
    absmax: Optional[Tensor], code: Optional[Tensor], blocksize: int, in_features: int, bias: Optional[Tensor],
    lora_A: Tensor, lora_B: Tensor, g: Tensor, scale: float, mask: Optional[Tensor], p: float,
    need_dx: bool, need_dA: bool, need_dB: bool, need_dg: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dA, dB, dg)`` of the DoRA linear op, empty tensors where not needed."""
    gy = grad_y.contiguous()
    M, N = gy.shape
    R = lora_A.shape[0]
    dx, dA, dB, dg = (gy.new_empty(0) for _ in range(4))
    keep_scale = 1.0 / (1.0 - p) if mask is not None else 1.0
    dense = weight if absmax is None else None
    check_operands(gy.dtype, dense, (N, in_features), lora_A=lora_A, lora_B=lora_B, xa=xa,
                    x=x if (need_dA or (need_dg and saved_is_output)) else None)
    w, four_bit = four_bit_parts(weight, absmax, code, blocksize, N * in_features)
    g = g.contiguous()
    gb = None
    if need_dx or need_dA:
        scaled_B = (lora_B.to(g.dtype) * g[:, None]).to(lora_B.dtype)  # N×R: g ⊙ gy never exists
        gb = scaled_matmul(gy, scaled_B, gy.new_empty(M, R))
    if need_dx:
        dx = gy.new_empty(M, in_features)
        if mask is None:
            fused_linear_lowrank(gy, w, four_bit, False, gb, lora_A, scale, None, None, 1.0, dx, act_scale=g)
        else:
            dropped_part = gy.new_empty(M, in_features)
            fused_linear_lowrank(gy, w, four_bit, False, gb, lora_A, scale, None, None, 1.0, dropped_part,
                                 act_scale=g - 1.0)
            fused_linear_lowrank(gy, w, four_bit, False, None, None, 0.0, None, None, 1.0, dx)
            dx.add_(dropped_part.mul_(mask), alpha=keep_scale)
            del dropped_part
    if need_dA:
        x = x.contiguous()
        dA = gy.new_empty(R, in_features)
        scaled_matmul(gb.t(), x, dA, scale=scale, keep=keep_mask(mask, x), keep_scale=keep_scale)
    if need_dB:
        product = scaled_matmul(gy.t(), xa, torch.empty(N, R, dtype=g.dtype, device=gy.device), scale=scale)
        dB = product.mul_(g[:, None]).to(gy.dtype)
    if need_dg:
        w_t = w if four_bit else weight.t()
        dg = pre_scale_dot(gy, saved.contiguous(), saved_is_output, bias, g, x.contiguous() if saved_is_output else x,
                           xa, w, four_bit, w_t, lora_B, scale)
    return dx, dA, dB, dg


# ------------------------------------------------------------------------------------- the cuBLAS path
# (``fastft.dispatch`` chooses per call: the default on a GPU unless a measurement finds the fused kernels
# above faster.) The base GEMMs by torch's matmuls over the dense weight (a 4-bit weight dequantized once per
# call into a reused workspace), ``addmm_`` folding in the low-rank term, ``addcmul`` the column scale g and
# the bias; Triton for the masked skinny products and for dg (``pre_scale_dot``, no float atomics).


def dora_forward_cublas(
    x: Tensor, weight: Tensor, absmax: Optional[Tensor], code: Optional[Tensor], blocksize: int, out_features: int,
    bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, g: Tensor, scale: float, mask: Optional[Tensor], p: float,
    keep_pre_scale: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, xa, z)`` of the DoRA linear op by cuBLAS: z = x Wᵀ + s·xa Bᵀ (``mm`` + ``addmm_``), y = g ⊙ z + b."""
    x = x.contiguous()
    M, K = x.shape
    check_operands(x.dtype, weight if absmax is None else None, (out_features, K), lora_A=lora_A, lora_B=lora_B,
                   bias=bias)
    w = dense_weight(weight, absmax, code, blocksize, (out_features, K), x.dtype)
    if mask is None:
        xa = torch.mm(x, lora_A.t())
        z = torch.mm(x, w.t())
        z.addmm_(xa, lora_B.t(), alpha=scale)
        if keep_pre_scale:
            y = torch.empty_like(z)
            y = torch.mul(z, g, out=y) if bias is None else torch.addcmul(bias, z, g, out=y)
            return y, xa, z
        y = z.mul_(g) if bias is None else torch.addcmul(bias, z, g, out=z)
        return y, xa, x.new_empty(0)
    keep_scale = 1.0 / (1.0 - p)
    xa = x.new_empty(M, lora_A.shape[0])
    scaled_matmul(lora_A, x.t(), xa.t(), keep=keep_mask(mask, x).t(), keep_scale=keep_scale)
    z = torch.mm(x * mask * keep_scale, w.t())
    z.addmm_(xa, lora_B.t(), alpha=scale)
    y = torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())
    y.addmm_(xa, lora_B.t(), alpha=scale)
    y.addcmul_(z, g - 1.0)
    return y, xa, z


def dora_backward_cublas(
    grad_y: Tensor, x: Tensor, xa: Tensor, saved: Tensor, saved_is_output: bool, weight: Tensor,
    absmax: Optional[Tensor], code: Optional[Tensor], blocksize: int, in_features: int, bias: Optional[Tensor],
    lora_A: Tensor, lora_B: Tensor, g: Tensor, scale: float, mask: Optional[Tensor], p: float,
    need_dx: bool, need_dA: bool, need_dB: bool, need_dg: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dA, dB, dg)`` of the DoRA linear op by cuBLAS (dg and the masked products by Triton)."""
    gy = grad_y.contiguous()
    M, N = gy.shape
    dx, dA, dB, dg = (gy.new_empty(0) for _ in range(4))
    keep_scale = 1.0 / (1.0 - p) if mask is not None else 1.0
    check_operands(gy.dtype, weight if absmax is None else None, (N, in_features), lora_A=lora_A, lora_B=lora_B,
                   xa=xa, x=x if (need_dA or (need_dg and saved_is_output)) else None)
    w = dense_weight(weight, absmax, code, blocksize, (N, in_features), gy.dtype) if (need_dx or need_dg) else None
    gz = torch.mul(gy, g, out=torch.empty_like(gy)) if (need_dx or need_dA or need_dB) else None
    gb = torch.mm(gz, lora_B) if (need_dx or need_dA) else None
    if need_dx:
        if mask is None:
            dx = torch.mm(gz, w)
            dx.addmm_(gb, lora_A, alpha=scale)
        else:
            dx = torch.mm(gy, w)
            masked = torch.mm(torch.mul(gy, g - 1.0, out=torch.empty_like(gy)), w)
            masked.addmm_(gb, lora_A, alpha=scale)
            dx.add_(masked.mul_(mask), alpha=keep_scale)
            del masked
    if need_dA:
        x = x.contiguous()
        if mask is None:
            dA = scaled_mm(gb.t(), x, scale)
        else:
            dA = gy.new_empty(lora_A.shape[0], in_features)
            scaled_matmul(gb.t(), x, dA, scale=scale, keep=keep_mask(mask, x), keep_scale=keep_scale)
    if need_dB:
        dB = scaled_mm(gz.t(), xa, scale)
    del gz, gb
    if need_dg:
        dg = pre_scale_dot(gy, saved.contiguous(), saved_is_output, bias, g.contiguous(),
                           x.contiguous() if saved_is_output else x, xa, w, None, w.t(), lora_B, scale)
    return dx, dA, dB, dg

"""Triton kernels of the LoRA op (``fastft.ops.lora``), over a dense or a bitsandbytes 4-bit base weight.

The op, for x (M×K), frozen W (N×K), bias b, A (R×K), B (N×R), scale s, dropout mask m, keep 1-p::

    x̃ = x ⊙ m / (1-p)      xa = x̃ Aᵀ      y = x Wᵀ + b + s · xa Bᵀ
    gb = g B               dx = g W + s · (gb A) ⊙ m / (1-p)
    dA = s · gbᵀ x̃         dB = s · gᵀ xa

Two kernels do all of it:

* ``_matmul_kernel``: ``C = s · P (Q ⊙ m_Q · keep_scale)`` for strided P (I×L), Q (L×J) and an optional
  mask on Q, used for the four skinny products (xa, gb, dA, dB). Transposes are strides, never copies:
  xa is computed as ``(A x̃ᵀ)ᵀ`` so the mask always sits on the right operand. The reduction may be split
  over a second grid axis (split-K): when the output has few tiles and the reduction is long (dA and dB
  reduce over every token), each split writes a float32 partial and the partials are summed afterwards.
* ``_linear_lowrank_kernel``: ``out = act · W' + s · (U V) [⊙ m · keep_scale] + bias`` per output tile in
  one pass and one store. The forward runs it with act = x, W' = Wᵀ, U = xa, V = Bᵀ and the bias; the
  input gradient with act = g, W' = W, U = gb, V = A and the mask. The low-rank term (a small ``tl.dot``
  loop over the rank), its scale and mask and the bias form the tile's initial accumulator, then the
  base GEMM's K-loop adds into it: the order is free in float32, and it keeps one accumulator live
  instead of two. A 4-bit W is dequantized tile by tile inside the K-loop (``load_dequantized_tile``,
  reading W at transposed indices in the forward), so the dense weight never exists in memory.

Launches: forward = xa, y (2); backward = gb, dx, dA, dB (up to 4, only those needed).

The cuBLAS path (``lora_forward_cublas`` / ``lora_backward_cublas``, the default on a GPU unless a one-time
measurement in ``fastft.dispatch`` finds the fused kernels faster for the shape): the base GEMMs ``x Wᵀ`` and
``g W`` through torch's matmuls, ``addmm`` folding in the bias and ``addmm_(alpha=s)`` the low-rank term in
place; a 4-bit W dequantized once per call into a reused workspace; Triton only for what cuBLAS cannot fuse:
the products with the dropout mask (``scaled_matmul`` with ``keep``; ``add_lowrank``, the masked
``dx += s·(gb A) ⊙ m/(1-p)`` in one read-modify-write).

The building blocks it shares with other kernel families live in ``fastft.kernels.common``:
``lowrank_tile`` (the low-rank term of a tile), ``accumulate_linear`` (a GEMM's K-loop over a dense or
4-bit W, optionally scaling act's columns), tiles and launch. DoRA (``fastft.kernels.dora``) reuses
the fused kernel's DoRA hooks (a column scale on act, a per-column scale of
the result before the bias, a second store of the unscaled result); ``scaled_matmul`` and
``fused_linear_lowrank`` are the launchers.

Numerics: every dot accumulates in float32 (float64 for float64 inputs, with the scales passed as
float64 so that path is exact to float64 too); results are stored once in x's dtype (the intermediates xa
and gb too, as in the reference). float32 operands use ``input_precision="ieee"`` unless torch allows
TF32. Tiling is in :func:`choose_tiles` (grouped tile order for L2 reuse; a launch that runs out of shared
memory retries with leaner tiles, :func:`smaller_tiles`). Under the Triton interpreter (CPU tensors)
tiles are small, bfloat16 dot operands are upcast to float32 (its bf16 ``tl.dot`` is wrong) and bfloat16
stores are rounded by hand (its float32 -> bfloat16 cast truncates).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (
    GROUP_M, Tiles, accumulate_linear, block_size, cast_to, check_operands, choose_tiles, dot_flags, four_bit_parts,
    index_dtype, keep_mask, launch_with_fallback, lowrank_tile, mma, sm_count, tile_coordinates, weight_operands,
    workspace,
)
from .dequantize_4bit import dequantize_4bit


INTERPRETER_SPLITS = 1
"""Test hook: the number of reduction splits used under the Triton interpreter (CPU), where the GPU's choice
(from its SM count) does not apply. Tests raise it to run the split path a GPU takes; 1 leaves behaviour as is."""


@triton.jit
def _matmul_kernel(
    p_ptr, q_ptr, keep_ptr, out_ptr,
    I, J, L, l_per_split,
    stride_pi, stride_pl, stride_ql, stride_qj, stride_keep_l, stride_keep_j, stride_oi, stride_oj, stride_split,
    scale: tl.float64, keep_scale: tl.float64,
    HAS_MASK: tl.constexpr, ACC_DTYPE: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    INDEX_DTYPE: tl.constexpr,
    ROUND_BF16_BY_HAND: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_L: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``out[split] = scale · Σ_{l in split} P[:, l] (Q ⊙ keep · keep_scale)[l, :]`` for one I×J tile.

    Program (t, split) reduces over ``l in [split · l_per_split, (split+1) · l_per_split)``; with one split
    ``out`` is the result, otherwise ``out`` is an ACC_DTYPE (splits × I × J) buffer summed by the caller.
    """
    pid_i, pid_j = tile_coordinates(tl.program_id(0), I, J, BLOCK_I, BLOCK_J, GROUP_M)
    scale = tl.full((), scale, ACC_DTYPE)
    keep_scale = tl.full((), keep_scale, ACC_DTYPE)
    split = tl.program_id(1)
    offs_i = (pid_i * BLOCK_I + tl.arange(0, BLOCK_I)).to(INDEX_DTYPE)
    offs_j = (pid_j * BLOCK_J + tl.arange(0, BLOCK_J)).to(INDEX_DTYPE)
    l_start = split * l_per_split
    l_end = min(L, l_start + l_per_split)
    q_dtype = q_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=ACC_DTYPE)
    for l0 in range(l_start, l_end, BLOCK_L):
        offs_l = (l0 + tl.arange(0, BLOCK_L)).to(INDEX_DTYPE)
        in_l = offs_l < l_end
        p_mask = (offs_i[:, None] < I) & in_l[None, :]
        q_mask = in_l[:, None] & (offs_j[None, :] < J)
        p = tl.load(p_ptr + offs_i[:, None] * stride_pi + offs_l[None, :] * stride_pl, mask=p_mask, other=0.0)
        q = tl.load(q_ptr + offs_l[:, None] * stride_ql + offs_j[None, :] * stride_qj, mask=q_mask, other=0.0)
        if HAS_MASK:
            keep = tl.load(keep_ptr + offs_l[:, None] * stride_keep_l + offs_j[None, :] * stride_keep_j,
                           mask=q_mask, other=0)
            q = tl.where(keep != 0, q.to(ACC_DTYPE) * keep_scale, 0.0)
            q = cast_to(q, q_dtype, ROUND_BF16_BY_HAND)
        acc = mma(p, q, acc, UPCAST_DOT, INPUT_PRECISION)
    acc = acc * scale
    out_ptrs = out_ptr + split * stride_split + offs_i[:, None] * stride_oi + offs_j[None, :] * stride_oj
    out_mask = (offs_i[:, None] < I) & (offs_j[None, :] < J)
    tl.store(out_ptrs, cast_to(acc, out_ptr.dtype.element_ty, ROUND_BF16_BY_HAND), mask=out_mask)


@triton.jit
def _linear_lowrank_kernel(
    act_ptr, w_ptr, absmax_ptr, code_ptr, u_ptr, v_ptr, bias_ptr, keep_ptr, out_ptr,
    act_scale_ptr, out_scale_ptr, pre_scale_ptr,
    M, N, K, R,
    stride_am, stride_ak, stride_wk, stride_wn, stride_um, stride_ur, stride_vr, stride_vn,
    stride_keep_m, stride_keep_n, stride_om, stride_on,
    scale: tl.float64, keep_scale: tl.float64,
    FOUR_BIT: tl.constexpr, W_ROWS_ALONG_N: tl.constexpr, BLOCKSIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_ACT_SCALE: tl.constexpr, HAS_OUT_SCALE: tl.constexpr, STORE_PRE_SCALE: tl.constexpr,
    ACCUMULATE: tl.constexpr, ACC_DTYPE: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, INDEX_DTYPE: tl.constexpr,
    ROUND_BF16_BY_HAND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One BLOCK_M×BLOCK_N tile of ``out = act·W' + scale·(U V)[⊙ keep·keep_scale] + bias``.

    act is M×K, W' is K×N, U is M×R, V is R×N. The tile's accumulator starts as the low-rank term,
    ``Σ_r-blocks U[:, r] @ V[r, :]`` scaled (and masked), plus the bias; the K-loop
    (:func:`accumulate_linear`) then adds ``act[:, k-block] @ W'[k-block, :]``; one store in out's dtype
    ends it. DoRA's hooks (all off for LoRA): HAS_ACT_SCALE multiplies act's column k by
    ``act_scale[k]``; HAS_OUT_SCALE makes the epilogue ``out_scale[n] · acc + bias`` (the bias then joins
    after the scaling); STORE_PRE_SCALE also stores the accumulator before that epilogue to ``pre_scale``
    (out's strides). ACCUMULATE adds out's current tile to the accumulator first (``out +=``; with K = 0
    this is the masked low-rank epilogue of the cuBLAS path).
    """
    pid_m, pid_n = tile_coordinates(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    scale = tl.full((), scale, ACC_DTYPE)
    keep_scale = tl.full((), keep_scale, ACC_DTYPE)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(INDEX_DTYPE)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(INDEX_DTYPE)
    in_m = offs_m < M
    in_n = offs_n < N
    out_mask = in_m[:, None] & in_n[None, :]

    # Low-rank term, dropout mask and bias first: they become the K-loop's initial accumulator, so one
    # BLOCK_M×BLOCK_N float32 accumulator is live instead of two.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    acc = lowrank_tile(acc, u_ptr, v_ptr, offs_m, offs_n, in_m, in_n, R, stride_um, stride_ur, stride_vr, stride_vn,
                       UPCAST_DOT, INPUT_PRECISION, BLOCK_R)
    if HAS_MASK:
        keep = tl.load(keep_ptr + offs_m[:, None] * stride_keep_m + offs_n[None, :] * stride_keep_n,
                       mask=out_mask, other=0)
        acc = tl.where(keep != 0, acc * (scale * keep_scale), 0.0)
    else:
        acc = acc * scale
    if HAS_BIAS:
        if not HAS_OUT_SCALE:
            acc += tl.load(bias_ptr + offs_n, mask=in_n, other=0.0).to(ACC_DTYPE)[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, mask=out_mask,
                       other=0.0).to(ACC_DTYPE)

    acc = accumulate_linear(acc, act_ptr, w_ptr, absmax_ptr, code_ptr, act_scale_ptr, offs_m, offs_n, in_m, in_n, K, N,
                            stride_am, stride_ak, stride_wk, stride_wn, FOUR_BIT, W_ROWS_ALONG_N, BLOCKSIZE,
                            HAS_ACT_SCALE, UPCAST_DOT, INPUT_PRECISION, INDEX_DTYPE, ROUND_BF16_BY_HAND, BLOCK_K)
    out_offsets = offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if STORE_PRE_SCALE:
        tl.store(pre_scale_ptr + out_offsets, cast_to(acc, pre_scale_ptr.dtype.element_ty, ROUND_BF16_BY_HAND),
                 mask=out_mask)
    if HAS_OUT_SCALE:
        acc = acc * tl.load(out_scale_ptr + offs_n, mask=in_n, other=0.0).to(ACC_DTYPE)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=in_n, other=0.0).to(ACC_DTYPE)[None, :]
    tl.store(out_ptr + out_offsets, cast_to(acc, out_ptr.dtype.element_ty, ROUND_BF16_BY_HAND), mask=out_mask)


# ----------------------------------------------------------------------------------------------- launch


def scaled_matmul(p: Tensor, q: Tensor, out: Tensor, scale: float = 1.0, keep: Optional[Tensor] = None,
                  keep_scale: float = 1.0, split: Optional[int] = None) -> Tensor:
    """``out = scale · p @ (q ⊙ keep · keep_scale)`` for strided 2-D views (keep: uint8, q's shape).

    ``split`` forces the number of reduction splits; by default one on the interpreter, and on a GPU as
    many as it takes to give every SM work when the output has few tiles and the reduction is long.
    """
    (I, L), (_, J) = p.shape, q.shape
    if out.numel() == 0:
        return out
    interpreting = p.device.type == "cpu"
    tiles = choose_tiles(I, J, L, p.dtype, p.device)
    if split is None:
        n_tiles = triton.cdiv(I, tiles.m) * triton.cdiv(J, tiles.n)
        split = INTERPRETER_SPLITS if interpreting else min(triton.cdiv(sm_count(p.device.index or 0), n_tiles),
                                           triton.cdiv(L, tiles.k) // 4, 32)
    split = max(1, split)
    keep_strides = (keep.stride(0), keep.stride(1)) if keep is not None else (0, 0)
    flags = dot_flags(p.dtype, p.device)

    def launch(t: Tiles) -> None:
        l_blocks = max(1, triton.cdiv(L, t.k))
        l_per_split = triton.cdiv(l_blocks, min(split, l_blocks)) * t.k
        n_splits = max(1, triton.cdiv(L, l_per_split))
        partial_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        target = out if n_splits == 1 else torch.empty((n_splits, I, J), dtype=partial_dtype, device=out.device)
        if n_splits == 1:
            strides = (out.stride(0), out.stride(1), 0)
        else:
            strides = (target.stride(1), target.stride(2), target.stride(0))
        _matmul_kernel[(triton.cdiv(I, t.m) * triton.cdiv(J, t.n), n_splits)](
            p, q, keep if keep is not None else q, target,
            I, J, L, l_per_split,
            p.stride(0), p.stride(1), q.stride(0), q.stride(1), *keep_strides, *strides,
            float(scale), float(keep_scale),
            HAS_MASK=keep is not None, INDEX_DTYPE=index_dtype(p, q, keep, target),
            BLOCK_I=t.m, BLOCK_J=t.n, BLOCK_L=t.k, GROUP_M=GROUP_M, num_warps=t.warps, num_stages=t.stages, **flags,
        )
        if n_splits > 1:
            out.copy_(target.sum(dim=0))

    launch_with_fallback(("matmul", p.device, p.dtype, keep is not None), tiles, launch)
    return out


def fused_linear_lowrank(
    act: Tensor, w: Tensor, four_bit: Optional[tuple[Tensor, Tensor, int]], w_rows_along_n: bool,
    u: Optional[Tensor], v: Optional[Tensor], scale: float, bias: Optional[Tensor], keep: Optional[Tensor],
    keep_scale: float, out: Tensor, act_scale: Optional[Tensor] = None, out_scale: Optional[Tensor] = None,
    pre_scale_out: Optional[Tensor] = None, accumulate: bool = False,
) -> Tensor:
    """``out = act @ W' + scale · (u @ v) [⊙ keep · keep_scale] + bias`` in one kernel (``out +=`` with
    ``accumulate``).

    W' (K×N) is the strided view ``w`` when ``four_bit`` is None; otherwise ``w`` holds the packed codes
    of W, stored N×K (W' = Wᵀ) if ``w_rows_along_n`` else K×N, and ``four_bit`` = (absmax, code, blocksize).
    ``u``/``v`` None: no low-rank term. DoRA's hooks: ``act_scale`` (K) scales act's columns,
    ``out_scale`` (N) makes it ``out = out_scale ⊙ (act @ W' + scale · u @ v) + bias``, and
    ``pre_scale_out`` (out's shape and strides) also receives the value before that scaling.
    """
    (M, K), N = act.shape, out.shape[1]
    R = 0 if u is None else u.shape[1]
    if u is None:
        u = v = act  # never read with R = 0
    if out.numel() == 0:
        return out
    if pre_scale_out is not None and pre_scale_out.stride() != out.stride():
        raise ValueError("pre_scale_out must have out's strides")
    tiles = choose_tiles(M, N, K, act.dtype, act.device, four_bit=four_bit is not None)
    block_r = block_size(R, 16 if act.device.type == "cpu" else 64)
    absmax, code, blocksize, stride_wk, stride_wn, w_extent = weight_operands(w, w, four_bit, N * K)
    index_type = index_dtype(act, None if four_bit else w, u, v, keep, out, extra=w_extent)
    flags = dot_flags(act.dtype, act.device)

    def launch(t: Tiles) -> None:
        _linear_lowrank_kernel[(triton.cdiv(M, t.m) * triton.cdiv(N, t.n),)](
            act, w, absmax, code, u, v, bias if bias is not None else out, keep if keep is not None else act, out,
            act_scale if act_scale is not None else out, out_scale if out_scale is not None else out,
            pre_scale_out if pre_scale_out is not None else out,
            M, N, K, R,
            act.stride(0), act.stride(1), stride_wk, stride_wn, u.stride(0), u.stride(1), v.stride(0), v.stride(1),
            *((keep.stride(0), keep.stride(1)) if keep is not None else (0, 0)), out.stride(0), out.stride(1),
            float(scale), float(keep_scale),
            FOUR_BIT=four_bit is not None, W_ROWS_ALONG_N=w_rows_along_n, BLOCKSIZE=blocksize,
            HAS_BIAS=bias is not None, HAS_MASK=keep is not None, INDEX_DTYPE=index_type,
            HAS_ACT_SCALE=act_scale is not None, HAS_OUT_SCALE=out_scale is not None,
            STORE_PRE_SCALE=pre_scale_out is not None, ACCUMULATE=accumulate,
            BLOCK_M=t.m, BLOCK_N=t.n, BLOCK_K=t.k, BLOCK_R=block_r, GROUP_M=GROUP_M,
            num_warps=t.warps, num_stages=t.stages, **flags,
        )

    key = ("linear_lowrank", act.device, act.dtype, four_bit is not None, w_rows_along_n,
           act_scale is not None, out_scale is not None, pre_scale_out is not None, accumulate)
    launch_with_fallback(key, tiles, launch)
    return out


def add_lowrank(out: Tensor, u: Tensor, v: Tensor, scale: float, keep: Optional[Tensor] = None,
                keep_scale: float = 1.0) -> Tensor:
    """``out += scale · (u @ v) [⊙ keep · keep_scale]`` in one read-modify-write of out (u M×R, v R×N).

    The masked low-rank term of the cuBLAS path's dx: cuBLAS computes ``g W`` into out, this adds the rank-R
    product with the dropout mask applied on the fly (``addmm_`` cannot mask).
    """
    if out.numel() == 0:
        return out
    act = u[:, :0]  # K = 0: no base GEMM, only the low-rank term and the accumulation
    return fused_linear_lowrank(act, v.t(), None, True, u, v, scale, None, keep, keep_scale, out, accumulate=True)


def dense_weight(weight: Tensor, absmax: Optional[Tensor], code: Optional[Tensor], blocksize: int,
                 shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """The dense base weight of ``shape``: ``weight`` itself, or a 4-bit weight dequantized once into a reused
    workspace (the cuBLAS paths; the fused kernels dequantize tile by tile instead)."""
    if absmax is None:
        return weight
    return dequantize_4bit(weight, absmax, code, blocksize, shape, dtype,
                           out=workspace("dequantized_weight", tuple(shape), dtype, weight.device))


def scaled_mm(a: Tensor, b: Tensor, scale: float) -> Tensor:
    """``scale · a @ b`` by one cuBLAS call (alpha = scale, beta = 0: the empty output is never read)."""
    out = a.new_empty(a.shape[0], b.shape[1])
    return out.addmm_(a, b, beta=0.0, alpha=scale) if scale != 1.0 else torch.mm(a, b, out=out)


def lowrank_grad_A(gb: Tensor, x: Tensor, scale: float, mask: Optional[Tensor], keep_scale: float) -> Tensor:
    """``dA = s·gbᵀ x̃`` (R×K; x̃ = x ⊙ mask·keep_scale) of the cuBLAS paths: ``scaled_mm`` without dropout,
    the masked Triton product with it (LoRA's and DoRA's, where gb is ``g B`` or ``(g ⊙ gy) B``)."""
    x = x.contiguous()
    if mask is None:
        return scaled_mm(gb.t(), x, scale)
    dA = gb.new_empty(gb.shape[1], x.shape[1])
    scaled_matmul(gb.t(), x, dA, scale=scale, keep=keep_mask(mask, x), keep_scale=keep_scale)
    return dA


# ------------------------------------------------------------------------------------------ entry points
# Two paths per entry (``fastft.dispatch`` picks one per call): ``lora_forward`` / ``lora_backward`` run the fused
# Triton GEMM kernels; ``lora_forward_cublas`` / ``lora_backward_cublas`` run the base GEMMs (and the skinny
# products without dropout) through torch's matmuls (cuBLAS), with Triton only for the masked products.


def lora_forward_cublas(
    x: Tensor, weight: Tensor, absmax: Optional[Tensor], code: Optional[Tensor], blocksize: int, out_features: int,
    bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scale: float, mask: Optional[Tensor], p: float,
) -> tuple[Tensor, Tensor]:
    """``(y, xa)``: xa by cuBLAS (Triton with the dropout mask applied on the fly), ``y = addmm(b, x, Wᵀ)``,
    then ``y.addmm_(xa, Bᵀ, alpha=s)`` folds the low-rank term into y in place."""
    x = x.contiguous()
    M, K = x.shape
    R = lora_A.shape[0]
    check_operands(x.dtype, weight if absmax is None else None, (out_features, K), lora_A=lora_A, lora_B=lora_B,
                   bias=bias)
    if mask is None:
        xa = torch.mm(x, lora_A.t())
    else:
        xa = x.new_empty(M, R)
        scaled_matmul(lora_A, x.t(), xa.t(), keep=keep_mask(mask, x).t(), keep_scale=1.0 / (1.0 - p))
    w = dense_weight(weight, absmax, code, blocksize, (out_features, K), x.dtype)
    y = torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())
    y.addmm_(xa, lora_B.t(), alpha=scale)
    return y, xa


def lora_backward_cublas(
    grad_y: Tensor, x: Tensor, xa: Tensor, weight: Tensor, absmax: Optional[Tensor], code: Optional[Tensor],
    blocksize: int, in_features: int, lora_A: Tensor, lora_B: Tensor, scale: float, mask: Optional[Tensor], p: float,
    need_dx: bool, need_dA: bool, need_dB: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dA, dB)``: ``dx = g W`` by cuBLAS with the low-rank term folded in by ``addmm_`` (or, with
    dropout, by one masked Triton epilogue); dA, dB by cuBLAS (Triton where the mask applies)."""
    g = grad_y.contiguous()
    M, N = g.shape
    dx, dA, dB = g.new_empty(0), g.new_empty(0), g.new_empty(0)
    keep_scale = 1.0 / (1.0 - p) if mask is not None else 1.0
    check_operands(g.dtype, weight if (need_dx and absmax is None) else None, (N, in_features), lora_A=lora_A,
                   lora_B=lora_B, xa=xa, x=x if need_dA else None)
    gb = torch.mm(g, lora_B) if (need_dx or need_dA) else None
    if need_dx:
        w = dense_weight(weight, absmax, code, blocksize, (N, in_features), g.dtype)
        dx = torch.mm(g, w)
        if mask is None:
            dx.addmm_(gb, lora_A, alpha=scale)
        else:
            add_lowrank(dx, gb, lora_A, scale, keep_mask(mask, dx), keep_scale)
    if need_dA:
        dA = lowrank_grad_A(gb, x, scale, mask, keep_scale)
    if need_dB:
        dB = scaled_mm(g.t(), xa, scale)
    return dx, dA, dB



def lora_forward(
    x: Tensor, weight: Tensor, absmax: Optional[Tensor], code: Optional[Tensor], blocksize: int, out_features: int,
    bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scale: float, mask: Optional[Tensor], p: float,
) -> tuple[Tensor, Tensor]:
    """``(y, xa)`` of the LoRA forward (see the module docstring); two launches: xa, then fused y."""
    x = x.contiguous()
    M, K = x.shape
    R = lora_A.shape[0]
    dense = weight if absmax is None else None
    check_operands(x.dtype, dense, (out_features, K), lora_A=lora_A, lora_B=lora_B, bias=bias)
    w, four_bit = four_bit_parts(weight, absmax, code, blocksize, out_features * K)
    keep = keep_mask(mask, x)
    keep_scale = 1.0 / (1.0 - p) if keep is not None else 1.0
    xa = x.new_empty(M, R)
    scaled_matmul(lora_A, x.t(), xa.t(), keep=None if keep is None else keep.t(), keep_scale=keep_scale)
    y = x.new_empty(M, out_features)
    fused_linear_lowrank(x, w if four_bit else weight.t(), four_bit, True, xa, lora_B.t(), scale,
                         None if bias is None else bias.contiguous(), None, 1.0, y)
    return y, xa


def lora_backward(
    grad_y: Tensor, x: Tensor, xa: Tensor, weight: Tensor, absmax: Optional[Tensor], code: Optional[Tensor],
    blocksize: int, in_features: int, lora_A: Tensor, lora_B: Tensor, scale: float, mask: Optional[Tensor], p: float,
    need_dx: bool, need_dA: bool, need_dB: bool,
) -> tuple[Tensor, Tensor, Tensor]:

    """``(dx, dA, dB)`` of the LoRA backward, empty tensors where not needed (see the module docstring)."""
    g = grad_y.contiguous()
    M, N = g.shape
    R = lora_A.shape[0]
    # three distinct empties: a custom op's outputs may not alias one another
    dx, dA, dB = g.new_empty(0), g.new_empty(0), g.new_empty(0)
    keep_scale = 1.0 / (1.0 - p) if mask is not None else 1.0
    dense = weight if (need_dx and absmax is None) else None
    check_operands(g.dtype, dense, (N, in_features), lora_A=lora_A, lora_B=lora_B, xa=xa, x=x if need_dA else None)
    gb = scaled_matmul(g, lora_B, g.new_empty(M, R)) if (need_dx or need_dA) else None
    if need_dx:
        w, four_bit = four_bit_parts(weight, absmax, code, blocksize, N * in_features)
        dx = g.new_empty(M, in_features)
        fused_linear_lowrank(g, w, four_bit, False, gb, lora_A, scale, None, keep_mask(mask, dx), keep_scale, dx)
    if need_dA:
        x = x.contiguous()
        dA = g.new_empty(R, in_features)
        scaled_matmul(gb.t(), x, dA, scale=scale, keep=keep_mask(mask, x), keep_scale=keep_scale)
    if need_dB:
        dB = g.new_empty(N, R)
        scaled_matmul(g.t(), xa, dB, scale=scale)
    return dx, dA, dB

"""Triton kernels of the S²FT linear op (``fastft.ops.s2ft_linear``).

The op, for x (M×K), frozen W (N×K), bias b and a trained slice of width S::

    y = x Wᵀ + b
    columns mode: dW_s = gᵀ x[:, :S]      (N×S)
    rows mode:    dW_s = g[:, :S]ᵀ x      (S×K)

Two kernels:

* ``_linear_saving_slice_kernel``: one BLOCK_M×BLOCK_N tile of ``y = x Wᵀ + b``; the programs of the
  first tile column (``pid_n == 0``) also store the x tiles they load for ``k < S`` into ``x_slice``
  (M×S). The slice the backward needs is thereby copied as the forward streams x, without a second
  read of x; every other program skips the store.
* ``_slice_grad_kernel``: ``out = Pᵀ Q`` for token-major P (L×I) and Q (L×J), reducing over the L
  tokens, both operands read through their strides (g[:, :S] is a strided view, never a copy). The
  output of a slice gradient has few tiles and a long reduction, so the tokens are split over a second
  grid axis (split-K): each split writes a float32 partial, summed afterwards.

Numerics: every dot accumulates in float32 (float64 for float64 inputs); results are stored once in
the operands' dtype. float32 operands use ``input_precision="ieee"`` unless torch allows TF32. Tiling
and the shared-memory fallback come from the LoRA kernels' helpers (``choose_tiles``,
``launch_with_fallback``). Under the Triton interpreter (CPU tensors) tiles are small, bfloat16 dot
operands are upcast to float32 (its bf16 ``tl.dot`` is wrong) and bfloat16 stores are rounded by hand.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (
    GROUP_M, cast_to, choose_tiles, dot_flags, index_dtype, launch_with_fallback, mma, sm_count, tile_coordinates,
)


INTERPRETER_SPLITS = 1
"""Test hook: the number of reduction splits used under the Triton interpreter (CPU), where the GPU's choice
(from its SM count) does not apply. Tests raise it to run the split path a GPU takes; 1 leaves behaviour as is."""


@triton.jit
def _linear_saving_slice_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, xs_ptr,
    M, N, K, S,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn, stride_sm, stride_sk,
    HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    INDEX_DTYPE: tl.constexpr, ROUND_BF16_BY_HAND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One tile of ``y = x Wᵀ + b``; the first tile column also copies ``x[:, :S]`` into ``xs``."""
    pid_m, pid_n = tile_coordinates(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(INDEX_DTYPE)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(INDEX_DTYPE)
    in_m = offs_m < M
    in_n = offs_n < N
    saves = pid_n == 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(INDEX_DTYPE)
        in_k = offs_k < K
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=in_m[:, None] & in_k[None, :], other=0.0)
        if saves:
            if k0 < S:
                tl.store(xs_ptr + offs_m[:, None] * stride_sm + offs_k[None, :] * stride_sk, a,
                         mask=in_m[:, None] & (offs_k[None, :] < S))
        w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=in_k[:, None] & in_n[None, :], other=0.0)
        acc = mma(a, w, acc, UPCAST_DOT, INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=in_n, other=0.0).to(ACC_DTYPE)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             cast_to(acc, y_ptr.dtype.element_ty, ROUND_BF16_BY_HAND), mask=in_m[:, None] & in_n[None, :])


@triton.jit
def _slice_grad_kernel(
    p_ptr, q_ptr, out_ptr,
    I, J, L, l_per_split,
    stride_pl, stride_pi, stride_ql, stride_qj, stride_oi, stride_oj, stride_split,
    ACC_DTYPE: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, INDEX_DTYPE: tl.constexpr,
    ROUND_BF16_BY_HAND: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_L: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``out[split] = Σ_{l in split} P[l, :]ᵀ Q[l, :]`` for one I×J tile (P: L×I, Q: L×J, token-major).

    P is read at transposed indices, so the dot sees Pᵀ without a transpose in memory.
    """
    pid_i, pid_j = tile_coordinates(tl.program_id(0), I, J, BLOCK_I, BLOCK_J, GROUP_M)
    split = tl.program_id(1)
    offs_i = (pid_i * BLOCK_I + tl.arange(0, BLOCK_I)).to(INDEX_DTYPE)
    offs_j = (pid_j * BLOCK_J + tl.arange(0, BLOCK_J)).to(INDEX_DTYPE)
    l_start = split * l_per_split
    l_end = min(L, l_start + l_per_split)
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=ACC_DTYPE)
    for l0 in range(l_start, l_end, BLOCK_L):
        offs_l = (l0 + tl.arange(0, BLOCK_L)).to(INDEX_DTYPE)
        in_l = offs_l < l_end
        p_t = tl.load(p_ptr + offs_i[:, None] * stride_pi + offs_l[None, :] * stride_pl,
                      mask=(offs_i[:, None] < I) & in_l[None, :], other=0.0)
        q = tl.load(q_ptr + offs_l[:, None] * stride_ql + offs_j[None, :] * stride_qj,
                    mask=in_l[:, None] & (offs_j[None, :] < J), other=0.0)
        acc = mma(p_t, q, acc, UPCAST_DOT, INPUT_PRECISION)
    out_ptrs = out_ptr + split * stride_split + offs_i[:, None] * stride_oi + offs_j[None, :] * stride_oj
    tl.store(out_ptrs, cast_to(acc, out_ptr.dtype.element_ty, ROUND_BF16_BY_HAND),
             mask=(offs_i[:, None] < I) & (offs_j[None, :] < J))


# ------------------------------------------------------------------------------------------ entry points


def linear_saving_slice(x: Tensor, weight: Tensor, bias: Optional[Tensor], width: int) -> tuple[Tensor, Tensor]:
    """``(x Wᵀ + b, x[:, :width])`` in one kernel (x: M×K, W: N×K, bias: N or None)."""
    x = x.contiguous()
    (M, K), N = x.shape, weight.shape[0]
    if tuple(weight.shape) != (N, K) or weight.dtype != x.dtype:
        raise ValueError(f"weight must be {N}x{K} of {x.dtype}, got {tuple(weight.shape)} of {weight.dtype}")
    if bias is not None and (bias.dtype != x.dtype or tuple(bias.shape) != (N,)):
        raise ValueError(f"bias must be ({N},) of {x.dtype}, got {tuple(bias.shape)} of {bias.dtype}")
    if not 0 < width <= K:
        raise ValueError(f"slice width {width} outside [1, {K}]")
    y = x.new_empty(M, N)
    x_slice = x.new_empty(M, width)
    if M == 0:
        return y, x_slice
    bias = None if bias is None else bias.contiguous()
    tiles = choose_tiles(M, N, K, x.dtype, x.device)
    flags = dot_flags(x.dtype, x.device)
    index_type = index_dtype(x, weight, y, x_slice)

    def launch(t) -> None:
        _linear_saving_slice_kernel[(triton.cdiv(M, t.m) * triton.cdiv(N, t.n),)](
            x, weight, bias if bias is not None else y, y, x_slice,
            M, N, K, width,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
            x_slice.stride(0), x_slice.stride(1),
            HAS_BIAS=bias is not None, INDEX_DTYPE=index_type,
            BLOCK_M=t.m, BLOCK_N=t.n, BLOCK_K=t.k, GROUP_M=GROUP_M, num_warps=t.warps, num_stages=t.stages, **flags,
        )

    launch_with_fallback(("s2ft_linear_saving_slice", x.device, x.dtype, bias is not None), tiles, launch)
    return y, x_slice


def token_reduction(p: Tensor, q: Tensor, split: Optional[int] = None) -> Tensor:
    """``pᵀ q`` for token-major strided 2-D views p (L×I) and q (L×J), split over the tokens.

    ``split`` forces the number of token splits; by default one on the interpreter, and on a GPU as many
    as it takes to give every SM work when the output has few tiles and the reduction is long.
    """
    (L, I), J = p.shape, q.shape[1]
    out = p.new_empty(I, J)
    if out.numel() == 0:
        return out
    if L == 0:
        return out.zero_()
    interpreting = p.device.type == "cpu"
    tiles = choose_tiles(I, J, L, p.dtype, p.device)
    if split is None:
        n_tiles = triton.cdiv(I, tiles.m) * triton.cdiv(J, tiles.n)
        split = INTERPRETER_SPLITS if interpreting else min(triton.cdiv(sm_count(p.device.index or 0), n_tiles),
                                           triton.cdiv(L, tiles.k) // 4, 64)
    split = max(1, split)
    flags = dot_flags(p.dtype, p.device)

    def launch(t) -> None:
        l_blocks = max(1, triton.cdiv(L, t.k))
        l_per_split = triton.cdiv(l_blocks, min(split, l_blocks)) * t.k
        n_splits = max(1, triton.cdiv(L, l_per_split))
        partial_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        target = out if n_splits == 1 else torch.empty((n_splits, I, J), dtype=partial_dtype, device=out.device)
        strides = (out.stride(0), out.stride(1), 0) if n_splits == 1 else (target.stride(1), target.stride(2), target.stride(0))
        _slice_grad_kernel[(triton.cdiv(I, t.m) * triton.cdiv(J, t.n), n_splits)](
            p, q, target, I, J, L, l_per_split,
            p.stride(0), p.stride(1), q.stride(0), q.stride(1), *strides,
            INDEX_DTYPE=index_dtype(p, q, target),
            BLOCK_I=t.m, BLOCK_J=t.n, BLOCK_L=t.k, GROUP_M=GROUP_M, num_warps=t.warps, num_stages=t.stages, **flags,
        )
        if n_splits > 1:
            out.copy_(target.sum(dim=0))

    launch_with_fallback(("s2ft_slice_grad", p.device, p.dtype), tiles, launch)
    return out


def slice_weight_grad(grad_y: Tensor, saved: Tensor, width: int, rows: bool, split: Optional[int] = None) -> Tensor:
    """dW_s: ``gᵀ x[:, :S]`` (columns; ``saved`` is x[:, :S]) or ``g[:, :S]ᵀ x`` (rows; ``saved`` is x)."""
    if saved.dtype != grad_y.dtype or saved.shape[0] != grad_y.shape[0]:
        raise ValueError(
            f"saved activations {tuple(saved.shape)} of {saved.dtype} do not match grad_y "
            f"{tuple(grad_y.shape)} of {grad_y.dtype}"
        )
    if rows:
        return token_reduction(grad_y[:, :width], saved, split)
    return token_reduction(grad_y, saved, split)


def s2ft_forward(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], width: int, rows: bool, save_slice: bool
) -> tuple[Tensor, Tensor]:
    """The op ``fastft::s2ft_linear`` on Triton: (y, x[:, :S]) with the slice saved by the GEMM's own loads.

    Rows mode and the no-gradient forward save nothing: a plain GEMM, which is what torch runs anyway.
    """
    if save_slice and not rows:
        return linear_saving_slice(x, weight, bias, width)
    return torch.nn.functional.linear(x, weight, bias), x.new_empty(0)


def s2ft_backward(
    grad_y: Tensor, saved: Tensor, weight: Tensor, width: int, rows: bool, need_dx: bool, need_dw: bool
) -> tuple[Tensor, Tensor]:
    """The op ``fastft::s2ft_linear_backward`` on Triton: dx by the vendor BLAS, dW_s by :func:`slice_weight_grad`."""
    dx = grad_y @ weight if need_dx else grad_y.new_empty(0)
    dw = slice_weight_grad(grad_y, saved, width, rows) if need_dw else grad_y.new_empty(0)
    return dx, dw

"""Triton kernels of the sparse-delta linear op (``fastft.ops.sparse_delta_linear``).

The op, for x (M×K), frozen W (O×K), bias b, and k values v at positions (r_j, c_j) of ΔW::

    y  = x Wᵀ + b + S(x),       S(x)[:, r] = Σ_{j: r_j = r} v_j x[:, c_j]        (CSR: slots of row r)
    dx = g W + T(g),            T(g)[:, c] = Σ_{j: c_j = c} v_j g[:, r_j]        (CSC: slots of column c)
    dv_j = Σ_m g[m, r_j] x[m, c_j]                                               (SDDMM)

The frozen GEMMs x Wᵀ + b and g W run through torch's matmuls (cuBLAS; a 4-bit weight is dequantized once
into a reused workspace). Two kernels do the rest, with no float atomics (every output element is owned by
exactly one program, so two runs give the same bits):

* ``_gather_columns_kernel``: one program per (output column t, block of tokens) adds
  ``Σ_{p in ptr[t]:ptr[t+1]} val[s_p] · src[:, idx[s_p]]`` into ``out[:, t]`` (read, add, write once), with
  ``s_p = p`` (the forward's CSR row pointer: slots are stored row-sorted) or ``s_p = order[p]`` (the
  backward's CSC permutation, computed once when the indices are set). Columns without slots return at once.
* ``_sddmm_kernel``: one program per block of slots loops over all tokens, gathering ``g[:, r_j]`` and
  ``x[:, c_j]`` tile by tile and reducing over the tokens in float32 (float64 for float64 inputs).

The dense path (``dense=True``, chosen by the op for float32/float64 when N·k is large against O·K) scatters
ΔW into a copy of W (or into the dequantized 4-bit workspace) and runs one GEMM instead of the
gather kernel. Under the Triton interpreter (CPU tensors) blocks are small and bfloat16 stores are rounded
by hand; there is no ``tl.dot`` here, so every dtype runs the same arithmetic as on a GPU.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import acc_dtype, cast_to, index_dtype, workspace
from .dequantize_4bit import dequantize_4bit


@triton.jit
def _gather_columns_kernel(
    out_ptr, src_ptr, ptr_ptr, order_ptr, idx_ptr, val_ptr,
    M, stride_om, stride_sm,
    HAS_ORDER: tl.constexpr, ACC_DTYPE: tl.constexpr, INDEX_DTYPE: tl.constexpr, ROUND_BF16_BY_HAND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """``out[m, t] += Σ_p val[s_p] · src[m, idx[s_p]]`` over the slots p of output column t (one token block)."""
    t = tl.program_id(0)
    start = tl.load(ptr_ptr + t)
    end = tl.load(ptr_ptr + t + 1)
    if end > start:
        offs_m = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(INDEX_DTYPE)
        in_m = offs_m < M
        acc = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
        for first in range(start, end, BLOCK_J):
            p = first + tl.arange(0, BLOCK_J)
            valid = p < end
            if HAS_ORDER:
                slot = tl.load(order_ptr + p, mask=valid, other=0)
            else:
                slot = p
            col = tl.load(idx_ptr + slot, mask=valid, other=0)
            val = tl.load(val_ptr + slot, mask=valid, other=0.0).to(ACC_DTYPE)
            tile = tl.load(src_ptr + offs_m[:, None] * stride_sm + col[None, :],
                           mask=in_m[:, None] & valid[None, :], other=0.0).to(ACC_DTYPE)
            acc += tl.sum(tile * val[None, :], axis=1)
        where = out_ptr + offs_m * stride_om + t
        total = tl.load(where, mask=in_m, other=0.0).to(ACC_DTYPE) + acc
        tl.store(where, cast_to(total, out_ptr.dtype.element_ty, ROUND_BF16_BY_HAND), mask=in_m)


@triton.jit
def _sddmm_kernel(
    g_ptr, x_ptr, rows_ptr, cols_ptr, out_ptr,
    M, n_slots, stride_gm, stride_xm,
    ACC_DTYPE: tl.constexpr, INDEX_DTYPE: tl.constexpr, ROUND_BF16_BY_HAND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """``out[j] = Σ_m g[m, rows[j]] · x[m, cols[j]]`` for one block of slots j, over every token m."""
    j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    valid = j < n_slots
    row = tl.load(rows_ptr + j, mask=valid, other=0)
    col = tl.load(cols_ptr + j, mask=valid, other=0)
    acc = tl.zeros([BLOCK_J], dtype=ACC_DTYPE)
    for first in range(0, M, BLOCK_M):
        offs_m = (first + tl.arange(0, BLOCK_M)).to(INDEX_DTYPE)
        both = (offs_m < M)[:, None] & valid[None, :]
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + row[None, :], mask=both, other=0.0).to(ACC_DTYPE)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + col[None, :], mask=both, other=0.0).to(ACC_DTYPE)
        acc += tl.sum(g * x, axis=0)
    tl.store(out_ptr + j, cast_to(acc, out_ptr.dtype.element_ty, ROUND_BF16_BY_HAND), mask=valid)


# -------------------------------------------------------------------------------------------- launchers
def _blocks(device: torch.device) -> tuple[int, int]:
    """(BLOCK_M tokens, BLOCK_J slots) of both kernels: small under the interpreter (fast tests, edges crossed)."""
    return (16, 16) if device.type == "cpu" else (64, 32)


def _check(dtype: torch.dtype, **tensors: Optional[Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and t.dtype != dtype:
            raise ValueError(f"{name} must be {dtype} like the activations, got {t.dtype}")


def gather_columns(out: Tensor, src: Tensor, ptr: Tensor, order: Optional[Tensor], idx: Tensor, values: Tensor) -> Tensor:
    """``out[:, t] += Σ_{p in ptr[t]:ptr[t+1]} values[s_p] · src[:, idx[s_p]]`` in place (``s_p = order[p]`` or p).

    ``out`` (M×T) and ``src`` (M×·) must have unit column stride; ``ptr`` has T + 1 entries."""
    M, T = out.shape
    if values.numel() == 0 or M == 0:
        return out
    if out.stride(1) != 1 or src.stride(1) != 1:
        raise ValueError("gather_columns: out and src must be row-major (unit column stride)")
    block_m, block_j = _blocks(out.device)
    has_order = order is not None
    _gather_columns_kernel[(T, triton.cdiv(M, block_m))](
        out, src, ptr, order if has_order else ptr, idx, values,
        M, out.stride(0), src.stride(0),
        HAS_ORDER=has_order, ACC_DTYPE=acc_dtype(out.dtype), INDEX_DTYPE=index_dtype(out, src),
        ROUND_BF16_BY_HAND=out.device.type == "cpu", BLOCK_M=block_m, BLOCK_J=block_j, num_warps=4,
    )
    return out


def sampled_gradient(grad_y: Tensor, x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``dv[j] = Σ_m grad_y[m, rows[j]] · x[m, cols[j]]`` (the op's ``sddmm`` entry), in grad_y's dtype."""
    g, x = grad_y.contiguous(), x.contiguous()
    _check(g.dtype, x=x)
    n_slots = rows.numel()
    out = torch.empty(n_slots, dtype=g.dtype, device=g.device)
    if n_slots == 0:
        return out
    if g.shape[0] == 0:
        return out.zero_()
    # a GPU program gathers two 32-token × 64-slot tiles a step (64×64 spills 20 B in fp16 on sm_90)
    block_m, block_j = (16, 16) if g.device.type == "cpu" else (32, 64)
    _sddmm_kernel[(triton.cdiv(n_slots, block_j),)](
        g, x, rows, cols, out,
        g.shape[0], n_slots, g.stride(0), x.stride(0),
        ACC_DTYPE=acc_dtype(g.dtype), INDEX_DTYPE=index_dtype(g, x), ROUND_BF16_BY_HAND=g.device.type == "cpu",
        BLOCK_M=block_m, BLOCK_J=block_j, num_warps=4,
    )
    return out


def _weight(weight: Tensor, absmax: Optional[Tensor], code: Optional[Tensor], blocksize: int,
            shape: tuple[int, int], dtype: torch.dtype) -> tuple[Tensor, bool]:
    """(dense W, whether it is a scratch buffer): W itself, or a 4-bit weight dequantized into a reused workspace."""
    if absmax is None:
        _check(dtype, weight=weight)
        return weight, False
    out = workspace("dequantized_weight", tuple(shape), dtype, weight.device)
    return dequantize_4bit(weight, absmax, code, blocksize, shape, dtype, out=out), True


def _with_delta(w: Tensor, scratch: bool, indices: Tensor, values: Tensor) -> Tensor:
    out = w if scratch else w.clone(memory_format=torch.contiguous_format)
    out.view(-1).index_add_(0, indices, values.to(out.dtype))
    return out


def sparse_delta_forward(
    x: Tensor, weight: Tensor, absmax: Optional[Tensor], code: Optional[Tensor], blocksize: int, out_features: int,
    bias: Optional[Tensor], values: Tensor, indices: Tensor, rows: Tensor, cols: Tensor, row_ptr: Tensor,
    col_order: Tensor, col_ptr: Tensor, dense: bool,
) -> Tensor:
    """y: ``addmm(b, x, Wᵀ)`` by cuBLAS, then the CSR gather kernel adds S(x) in place (or one GEMM over
    W + ΔW on the dense path)."""
    x = x.contiguous()
    _check(x.dtype, values=values, bias=bias)
    w, scratch = _weight(weight, absmax, code, blocksize, (out_features, x.shape[1]), x.dtype)
    if dense:
        w = _with_delta(w, scratch, indices, values)
    y = torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())
    if not dense:
        gather_columns(y, x, row_ptr, None, cols, values)
    return y


def sparse_delta_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, absmax: Optional[Tensor], code: Optional[Tensor], blocksize: int,
    in_features: int, values: Tensor, indices: Tensor, rows: Tensor, cols: Tensor, row_ptr: Tensor,
    col_order: Tensor, col_ptr: Tensor, dense: bool, need_dx: bool, need_dv: bool,
) -> tuple[Tensor, Tensor]:
    """(dx, dv): ``dx = g W`` by cuBLAS plus T(g) by the CSC gather kernel (or g (W + ΔW) on the dense path);
    dv by the SDDMM kernel."""
    g = grad_y.contiguous()
    dx = dv = None
    if need_dx:
        w, scratch = _weight(weight, absmax, code, blocksize, (g.shape[1], in_features), g.dtype)
        if dense:
            dx = torch.mm(g, _with_delta(w, scratch, indices, values))
        else:
            dx = gather_columns(torch.mm(g, w), g, col_ptr, col_order, rows, values)
    if need_dv:
        dv = sampled_gradient(g, x, rows, cols)
    return (dx if dx is not None else g.new_empty(0)), (dv if dv is not None else g.new_empty(0))

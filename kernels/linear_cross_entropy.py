"""Triton kernel of the fused linear cross-entropy (``fastft.ops.linear_cross_entropy``): no logits in memory.

For a block of BLOCK_M tokens, with h (N×K), W (V×K), bias b, labels y, the logits tile of BLOCK_V
vocabulary entries is ``z = h Wᵀ + b`` accumulated over K in BLOCK_K steps with ``tl.dot`` (plus an
optional low-rank term h₂ W₂ᵀ, h₂ N×R and W₂ V×R, over R in BLOCK_R steps: a LoRA lm_head), rounded to
the inputs' dtype (as lm_head's output is), then softcapped ``z ← c·tanh(z/c)``. One kernel does:

* pass 1 (statistics): an online logsumexp over the vocabulary tiles — running max m and sum
  s ← s·exp(m_old − m) + Σ exp(z − m) — plus the label's logit z_y and Σ_v z (for label smoothing).
  It stores per token lse, nll = lse − z_y, the mean logit and the kind weight w (1; exp(−nll) for DFT;
  or read from the caller for TALR and for the backward of reduction "none").
* pass 2 (gradient, once lse is known): the same tiles again, ``g = (α·exp(z − lse) − β·[v = y] − γ)·d``
  with α = r(w + 2λ·lse), β = r·w(1 − ε), γ = r·w·ε/V, d = 1 − (z/c)² under a softcap, then
  dh += g W (BLOCK_M×BLOCK_K per K step), dW += gᵀ h (atomic adds: every token block adds to every
  vocabulary tile) and db += Σ_rows g (atomic); likewise dh₂ += g W₂ and dW₂ += gᵀ h₂.

By default both passes run in one launch, one program per token block (dh rows are owned by their
program: plain loads and stores, deterministic). When there are too few token blocks to fill the GPU, pass
2 is split over the vocabulary on a second grid axis (a separate launch after pass 1), and dh is then
accumulated with atomic adds too.

Numerics: dots accumulate in float32 (float64 for float64 inputs); dh, dW and db accumulate in float32
buffers and are cast to their dtypes at the end; g is cast to the inputs' dtype before its two dots. float32
operands use ``input_precision="ieee"`` unless torch allows TF32. Under the Triton interpreter (CPU
tensors) tiles are small, bfloat16 dot operands are upcast to float32 (its bf16 ``tl.dot`` is wrong) and
bfloat16 roundings are done by hand (its float32 -> bfloat16 cast truncates).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources

from .common import INT32_LIMIT, block_size, cast_to, mma


INTERPRETER_SPLITS = 1
"""Test hook: the number of reduction splits used under the Triton interpreter (CPU), where the GPU's choice
(from its SM count) does not apply. Tests raise it to run the split path a GPU takes; 1 leaves behaviour as is."""

KIND_CE, KIND_DFT, KIND_GIVEN = 0, 1, 2
_KINDS = {"ce": KIND_CE, "dft": KIND_DFT, "given": KIND_GIVEN}


@triton.jit
def _tanh(x):
    """tanh from exp (the interpreter has no tanh): 1 − 2 / (exp(2x) + 1), exact at ±inf."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, b_ptr, h2_ptr, w2_ptr, offs_m, offs_v, N, V, K, R, stride_hm, stride_hk, stride_wv, stride_wk,
    stride_h2m, stride_h2r, stride_w2v, stride_w2r, softcap,
    HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr, SOFTCAP: tl.constexpr, ACC_DTYPE: tl.constexpr,
    UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, ROUND_LOGITS: tl.constexpr,
    ROUND_BF16_BY_HAND: tl.constexpr, INDEX_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """The BLOCK_M×BLOCK_V tile of ``z = h Wᵀ + b [+ h₂ W₂ᵀ]`` (rounded to the inputs' dtype), softcapped."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=ACC_DTYPE)
    row_ok = offs_m < N
    col_ok = offs_v < V
    for k0 in range(0, K, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(INDEX_DTYPE)
        k_ok = offs_k < K
        h = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_k[None, :] * stride_hk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + offs_v[None, :] * stride_wv + offs_k[:, None] * stride_wk,
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = mma(h, w, acc, UPCAST_DOT, INPUT_PRECISION)
    if HAS_LOWRANK:
        for r0 in range(0, R, BLOCK_R):
            offs_r = (r0 + tl.arange(0, BLOCK_R)).to(INDEX_DTYPE)
            r_ok = offs_r < R
            h2 = tl.load(h2_ptr + offs_m[:, None] * stride_h2m + offs_r[None, :] * stride_h2r,
                         mask=row_ok[:, None] & r_ok[None, :], other=0.0)
            w2 = tl.load(w2_ptr + offs_v[None, :] * stride_w2v + offs_r[:, None] * stride_w2r,
                         mask=col_ok[None, :] & r_ok[:, None], other=0.0)
            acc = mma(h2, w2, acc, UPCAST_DOT, INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=col_ok, other=0.0).to(ACC_DTYPE)[None, :]
    if ROUND_LOGITS:
        acc = cast_to(acc, h_ptr.dtype.element_ty, ROUND_BF16_BY_HAND).to(ACC_DTYPE)
    if SOFTCAP:
        acc = _tanh(acc / softcap) * softcap
    return acc


@triton.jit
def _linear_cross_entropy_kernel(
    h_ptr, w_ptr, b_ptr, h2_ptr, w2_ptr, labels_ptr, row_scale_ptr,
    lse_ptr, nll_ptr, z_mean_ptr, kind_weight_ptr, dh_ptr, dw_ptr, db_ptr, dh2_ptr, dw2_ptr,
    N, V, K, R, v_per_split,
    stride_hm, stride_hk, stride_wv, stride_wk, stride_h2m, stride_h2r, stride_w2v, stride_w2r,
    stride_dhm, stride_dhk, stride_dwv, stride_dwk, stride_dh2m, stride_dh2r, stride_dw2v, stride_dw2r,
    ignore_index, label_smoothing: tl.float64, z_loss: tl.float64, softcap: tl.float64,
    KIND: tl.constexpr, STATS: tl.constexpr, GRAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTHING: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, NEED_DH2: tl.constexpr,
    NEED_DW2: tl.constexpr, DH_ATOMIC: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, ROUND_LOGITS: tl.constexpr,
    ROUND_BF16_BY_HAND: tl.constexpr, INDEX_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Program (token block, vocabulary split): pass 1 if STATS, then pass 2 over its split if GRAD."""
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(INDEX_DTYPE)
    row_ok = offs_m < N
    labels = tl.load(labels_ptr + offs_m, mask=row_ok, other=ignore_index)
    labels = tl.where(labels == ignore_index, 0, labels)  # as the reference: class 0 stands in (r_t is 0 there)
    label_smoothing = tl.full((), label_smoothing, ACC_DTYPE)
    z_loss = tl.full((), z_loss, ACC_DTYPE)
    softcap = tl.full((), softcap, ACC_DTYPE)
    if STATS:
        running_max = tl.full((BLOCK_M,), float("-inf"), ACC_DTYPE)
        running_sum = tl.zeros((BLOCK_M,), ACC_DTYPE)
        z_label = tl.zeros((BLOCK_M,), ACC_DTYPE)
        z_total = tl.zeros((BLOCK_M,), ACC_DTYPE)
        for v0 in range(0, V, BLOCK_V):
            offs_v = (v0 + tl.arange(0, BLOCK_V)).to(INDEX_DTYPE)
            col_ok = offs_v < V
            z = _logits_tile(h_ptr, w_ptr, b_ptr, h2_ptr, w2_ptr, offs_m, offs_v, N, V, K, R, stride_hm, stride_hk,
                             stride_wv, stride_wk, stride_h2m, stride_h2r, stride_w2v, stride_w2r, softcap,
                             HAS_BIAS, HAS_LOWRANK, SOFTCAP, ACC_DTYPE, UPCAST_DOT, INPUT_PRECISION, ROUND_LOGITS,
                             ROUND_BF16_BY_HAND, INDEX_DTYPE, BLOCK_M, BLOCK_V, BLOCK_K, BLOCK_R)
            z_in = tl.where(col_ok[None, :], z, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(z_in, axis=1))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z_in - new_max[:, None]), axis=1)
            running_max = new_max
            z_label += tl.sum(tl.where(offs_v[None, :] == labels[:, None], z, 0.0), axis=1)
            if SMOOTHING:
                z_total += tl.sum(tl.where(col_ok[None, :], z, 0.0), axis=1)
        lse = running_max + tl.log(running_sum)
        nll = lse - z_label
        if KIND == 0:
            kind_weight = tl.full((BLOCK_M,), 1.0, ACC_DTYPE)
        elif KIND == 1:
            kind_weight = tl.exp(-nll)
        else:
            kind_weight = tl.load(kind_weight_ptr + offs_m, mask=row_ok, other=0.0).to(ACC_DTYPE)
        tl.store(lse_ptr + offs_m, lse, mask=row_ok)
        tl.store(nll_ptr + offs_m, nll, mask=row_ok)
        tl.store(kind_weight_ptr + offs_m, kind_weight, mask=row_ok)
        if SMOOTHING:
            tl.store(z_mean_ptr + offs_m, z_total / V, mask=row_ok)
    else:
        lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=0.0)
        kind_weight = tl.load(kind_weight_ptr + offs_m, mask=row_ok, other=0.0)
    if GRAD:
        r = tl.load(row_scale_ptr + offs_m, mask=row_ok, other=0.0).to(ACC_DTYPE)
        alpha = r * (kind_weight + 2.0 * z_loss * lse)
        beta = r * kind_weight * (1.0 - label_smoothing)
        gamma = r * kind_weight * label_smoothing / V
        in_dtype = h_ptr.dtype.element_ty
        v_start = tl.program_id(1) * v_per_split
        v_stop = tl.minimum(V, v_start + v_per_split)
        for v0 in range(v_start, v_stop, BLOCK_V):
            offs_v = (v0 + tl.arange(0, BLOCK_V)).to(INDEX_DTYPE)
            col_ok = offs_v < v_stop
            z = _logits_tile(h_ptr, w_ptr, b_ptr, h2_ptr, w2_ptr, offs_m, offs_v, N, V, K, R, stride_hm, stride_hk,
                             stride_wv, stride_wk, stride_h2m, stride_h2r, stride_w2v, stride_w2r, softcap,
                             HAS_BIAS, HAS_LOWRANK, SOFTCAP, ACC_DTYPE, UPCAST_DOT, INPUT_PRECISION, ROUND_LOGITS,
                             ROUND_BF16_BY_HAND, INDEX_DTYPE, BLOCK_M, BLOCK_V, BLOCK_K, BLOCK_R)
            g = alpha[:, None] * tl.exp(z - lse[:, None]) - gamma[:, None]
            g -= tl.where(offs_v[None, :] == labels[:, None], beta[:, None], 0.0)
            if SOFTCAP:
                capped = z / softcap
                g *= 1.0 - capped * capped
            g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
            if NEED_DB:
                tl.atomic_add(db_ptr + offs_v, tl.sum(g, axis=0), mask=col_ok)
            if NEED_DH or NEED_DW:
                g_in = cast_to(g, in_dtype, ROUND_BF16_BY_HAND)
                for k0 in range(0, K, BLOCK_K):
                    offs_k = (k0 + tl.arange(0, BLOCK_K)).to(INDEX_DTYPE)
                    k_ok = offs_k < K
                    if NEED_DH:
                        w = tl.load(w_ptr + offs_v[:, None] * stride_wv + offs_k[None, :] * stride_wk,
                                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                        update = mma(g_in, w, tl.zeros((BLOCK_M, BLOCK_K), ACC_DTYPE), UPCAST_DOT, INPUT_PRECISION)
                        dh_ptrs = dh_ptr + offs_m[:, None] * stride_dhm + offs_k[None, :] * stride_dhk
                        dh_mask = row_ok[:, None] & k_ok[None, :]
                        if DH_ATOMIC:
                            tl.atomic_add(dh_ptrs, update, mask=dh_mask)
                        else:
                            tl.store(dh_ptrs, tl.load(dh_ptrs, mask=dh_mask, other=0.0) + update, mask=dh_mask)
                    if NEED_DW:
                        h = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_k[None, :] * stride_hk,
                                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                        update = mma(tl.trans(g_in), h, tl.zeros((BLOCK_V, BLOCK_K), ACC_DTYPE), UPCAST_DOT,
                                      INPUT_PRECISION)
                        tl.atomic_add(dw_ptr + offs_v[:, None] * stride_dwv + offs_k[None, :] * stride_dwk, update,
                                      mask=col_ok[:, None] & k_ok[None, :])
            if NEED_DH2 or NEED_DW2:
                g_in = cast_to(g, in_dtype, ROUND_BF16_BY_HAND)
                for r0 in range(0, R, BLOCK_R):
                    offs_r = (r0 + tl.arange(0, BLOCK_R)).to(INDEX_DTYPE)
                    r_ok = offs_r < R
                    if NEED_DH2:
                        w2 = tl.load(w2_ptr + offs_v[:, None] * stride_w2v + offs_r[None, :] * stride_w2r,
                                     mask=col_ok[:, None] & r_ok[None, :], other=0.0)
                        update = mma(g_in, w2, tl.zeros((BLOCK_M, BLOCK_R), ACC_DTYPE), UPCAST_DOT, INPUT_PRECISION)
                        dh2_ptrs = dh2_ptr + offs_m[:, None] * stride_dh2m + offs_r[None, :] * stride_dh2r
                        dh2_mask = row_ok[:, None] & r_ok[None, :]
                        if DH_ATOMIC:
                            tl.atomic_add(dh2_ptrs, update, mask=dh2_mask)
                        else:
                            tl.store(dh2_ptrs, tl.load(dh2_ptrs, mask=dh2_mask, other=0.0) + update, mask=dh2_mask)
                    if NEED_DW2:
                        h2 = tl.load(h2_ptr + offs_m[:, None] * stride_h2m + offs_r[None, :] * stride_h2r,
                                     mask=row_ok[:, None] & r_ok[None, :], other=0.0)
                        update = mma(tl.trans(g_in), h2, tl.zeros((BLOCK_V, BLOCK_R), ACC_DTYPE), UPCAST_DOT,
                                      INPUT_PRECISION)
                        tl.atomic_add(dw2_ptr + offs_v[:, None] * stride_dw2v + offs_r[None, :] * stride_dw2r, update,
                                      mask=col_ok[:, None] & r_ok[None, :])


def choose_tiles(tokens: int, vocab: int, hidden: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_V, BLOCK_K, warps). Interpreter: at most 16/32/16, so shapes of a few dozen cross edges."""
    if device.type == "cpu":
        return block_size(tokens, 16), block_size(vocab, 32), block_size(hidden, 16), 4
    return block_size(tokens, 64), block_size(vocab, 128), block_size(hidden, 32 if dtype == torch.float32 else 64), 8


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def index_dtype(*tensors: Optional[Tensor]):
    largest = 0
    for t in tensors:
        if t is not None and t.numel() > 0:
            largest = max(largest, sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())))
    return tl.int64 if largest + 4096 >= INT32_LIMIT else tl.int32


def fused_pass(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, row_scale: Tensor,
    given_weight: Optional[Tensor], kind: str, ignore_index: int, label_smoothing: float, z_loss: float,
    softcap: Optional[float], chunk_size: int, need_dh: bool, need_dw: bool, need_db: bool,
    hidden2: Optional[Tensor] = None, weight2: Optional[Tensor] = None, need_dh2: bool = False,
    need_dw2: bool = False, vocab_splits: Optional[int] = None,
) -> tuple[Tensor, ...]:

    """One pass over the tokens with the contract of ``fastft.ops.linear_cross_entropy.reference_pass``.

    Returns (lse, nll, z_mean, kind_weight, dh, dw, db, dh2, dw2), gradients empty where not needed. ``chunk_size``
    (the reference's token chunk) is not used: nothing vocabulary-sized is stored. ``vocab_splits``
    forces the number of vocabulary splits of pass 2 (default: 1 on the interpreter; on a GPU enough to
    give every SM a program).
    """
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    n_tokens, n_hidden = hidden.shape
    vocab = weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    if any(t is not None and t.dtype != dtype for t in (weight, bias, hidden2, weight2)):
        raise ValueError(f"linear_cross_entropy kernel: every operand must be {dtype} like the hidden states")
    if hidden2 is not None:
        hidden2, weight2 = hidden2.contiguous(), weight2.contiguous()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    lse = torch.empty(n_tokens, dtype=acc, device=device)
    nll = torch.empty(n_tokens, dtype=acc, device=device)
    z_mean = torch.zeros(n_tokens, dtype=acc, device=device)
    if kind == "given":
        kind_weight = given_weight.to(device=device, dtype=acc).contiguous().clone()
    else:
        kind_weight = torch.empty(n_tokens, dtype=acc, device=device)
    need_grad = need_dh or need_dw or need_db or need_dh2 or need_dw2
    dh = torch.zeros(n_tokens, n_hidden, dtype=acc, device=device) if need_dh else None
    dw = torch.zeros(vocab, n_hidden, dtype=acc, device=device) if need_dw else None
    db = torch.zeros(vocab, dtype=acc, device=device) if need_db else None
    dh2 = torch.zeros(hidden2.shape, dtype=acc, device=device) if need_dh2 else None
    dw2 = torch.zeros(weight2.shape, dtype=acc, device=device) if need_dw2 else None
    labels = labels.contiguous()
    row_scale = row_scale.to(acc).contiguous()
    if n_tokens > 0 and vocab > 0:
        _launch(hidden, weight, bias, hidden2, weight2, labels, row_scale, lse, nll, z_mean, kind_weight,
                (dh, dw, db, dh2, dw2), _KINDS[kind], ignore_index, label_smoothing, z_loss, softcap, need_grad,
                vocab_splits)
    empty = lambda t: t.new_empty(0)  # noqa: E731
    return (
        lse, nll, z_mean, kind_weight,
        dh.to(dtype) if need_dh else empty(hidden),
        dw.to(weight.dtype) if need_dw else empty(weight),
        db.to(bias.dtype) if need_db else empty(hidden),
        dh2.to(dtype) if need_dh2 else empty(hidden),
        dw2.to(dtype) if need_dw2 else empty(hidden),
    )


def _launch(hidden, weight, bias, hidden2, weight2, labels, row_scale, lse, nll, z_mean, kind_weight, grads, kind,
            ignore_index, label_smoothing, z_loss, softcap, need_grad, vocab_splits) -> None:
    dh, dw, db, dh2, dw2 = grads
    n_tokens, n_hidden = hidden.shape
    rank = 0 if hidden2 is None else hidden2.shape[1]
    vocab = weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    interpreting = device.type == "cpu"
    block_m, block_v, block_k, warps = choose_tiles(n_tokens, vocab, n_hidden, dtype, device)
    token_blocks = triton.cdiv(n_tokens, block_m)
    vocab_blocks = triton.cdiv(vocab, block_v)
    if vocab_splits is None:
        vocab_splits = INTERPRETER_SPLITS if interpreting else min(vocab_blocks, triton.cdiv(sm_count(device.index or 0), token_blocks))
    vocab_splits = max(1, min(vocab_splits, vocab_blocks)) if need_grad else 1
    v_per_split = triton.cdiv(vocab_blocks, vocab_splits) * block_v
    vocab_splits = triton.cdiv(vocab, v_per_split)
    tf32 = dtype == torch.float32 and not interpreting and torch.backends.cuda.matmul.allow_tf32
    dummy = lse
    strides = lambda t: (t.stride(0), t.stride(1)) if t is not None else (0, 0)  # noqa: E731
    common = dict(
        KIND=kind, HAS_BIAS=bias is not None, HAS_LOWRANK=hidden2 is not None, SOFTCAP=softcap is not None,
        SMOOTHING=label_smoothing > 0.0, NEED_DH=dh is not None, NEED_DW=dw is not None, NEED_DB=db is not None,
        NEED_DH2=dh2 is not None, NEED_DW2=dw2 is not None,
        ACC_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
        UPCAST_DOT=interpreting and dtype == torch.bfloat16,
        INPUT_PRECISION="tf32" if tf32 else "ieee",
        ROUND_LOGITS=dtype in (torch.float16, torch.bfloat16),
        ROUND_BF16_BY_HAND=interpreting,
        INDEX_DTYPE=index_dtype(hidden, weight, dh, dw),
    )
    or_dummy = lambda t: t if t is not None else dummy  # noqa: E731
    args = (
        hidden, weight, or_dummy(bias), or_dummy(hidden2), or_dummy(weight2), labels, row_scale,
        lse, nll, z_mean, kind_weight, or_dummy(dh), or_dummy(dw), or_dummy(db), or_dummy(dh2), or_dummy(dw2),
        n_tokens, vocab, n_hidden, rank, v_per_split,
        *strides(hidden), *strides(weight), *strides(hidden2), *strides(weight2),
        *strides(dh), *strides(dw), *strides(dh2), *strides(dw2),
        ignore_index, float(label_smoothing), float(z_loss), float(softcap or 1.0),
    )
    block_r = block_size(rank, 16 if interpreting else 64)

    def run(grid, block_k_now, **flags) -> None:
        _linear_cross_entropy_kernel[grid](*args, **common, **flags, BLOCK_M=block_m, BLOCK_V=block_v,
                                           BLOCK_K=block_k_now, BLOCK_R=block_r, num_warps=warps, num_stages=2)

    def with_fallback(grid, **flags) -> None:
        k = block_k
        while True:
            try:
                return run(grid, k, **flags)
            except OutOfResources:
                if k <= 16:
                    raise
                k //= 2

    if vocab_splits == 1:
        with_fallback((token_blocks, 1), STATS=True, GRAD=need_grad, DH_ATOMIC=False)
    else:
        with_fallback((token_blocks, 1), STATS=True, GRAD=False, DH_ATOMIC=False)
        common["KIND"] = KIND_GIVEN
        with_fallback((token_blocks, vocab_splits), STATS=False, GRAD=True, DH_ATOMIC=True)

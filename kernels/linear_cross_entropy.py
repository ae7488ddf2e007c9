"""Triton kernel of the fused linear cross-entropy (``fastft.ops.linear_cross_entropy``): chunked, in place, no atomics.

The tokens are walked in chunks of C rows (C from the caller's cap and, on a GPU, from the free device
memory: the C×V logits buffer is the only vocabulary-sized buffer, allocated once per pass). Per chunk:

1. logits by cuBLAS: ``z = h Wᵀ + b`` (``addmm`` into the buffer, in the inputs' dtype, as lm_head's output
   is) and, for a LoRA lm_head, ``z += h₂ W₂ᵀ`` (``addmm_``);
2. one Triton launch, ``_chunk_loss_kernel``, one program per row: pass 1 reads the row tile by tile
   (softcap ``z ← c·tanh(z/c)`` applied on the fly) for an online logsumexp (running max m, sum
   s ← s·exp(m_old − m) + Σ exp(z − m)), the label's logit z_y and Σ_v z (label smoothing), and stores
   lse, nll = lse − z_y, the mean logit and the kind weight w (1; exp(−nll) for DFT; the caller's for TALR
   and for the backward of reduction "none"); pass 2, when a gradient is wanted, reads the row again and
   **overwrites the logits with the logit gradient** ``g = (α·exp(z − lse) − β·[v = y] − γ)·d`` with
   α = r(w + 2λ·lse), β = r·w(1 − ε), γ = r·w·ε/V and d = 1 − (z/c)² under a softcap (0 at ignored rows);
3. the gradient products by cuBLAS: ``dh[chunk] = g W`` (``mm`` with ``out=``), ``dW += gᵀ h``
   (``addmm_`` in place), ``db += Σ_rows g``, and ``dh₂[chunk] = g W₂``, ``dW₂ += gᵀ h₂``.

Every reduction is owned by one program or one cuBLAS call: no float atomics, so two runs on one device
give bitwise-identical results. Numerics: softmax, loss and g in float32 (float64 for float64 inputs); g is
stored in the inputs' dtype (the reference rounds g to it before its products too); dW and dW₂ accumulate
in place in the weight's dtype (cuBLAS accumulates each chunk's product in float32; float32 and float64
weights accumulate exactly as the reference), so a trained lm_head costs one V×H gradient buffer, no float32
copy. Under the Triton interpreter (CPU tensors) the same code runs with torch's CPU matmuls and small tiles.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import block_size, cast_to

KIND_CE, KIND_DFT, KIND_GIVEN = 0, 1, 2
_KINDS = {"ce": KIND_CE, "dft": KIND_DFT, "given": KIND_GIVEN}
LOGITS_MEMORY_SHARE = 0.25  # of the free device memory the C×V logits buffer may take (GPU)


@triton.jit
def _tanh(x):
    """tanh from exp (the interpreter has no tanh): 1 − 2 / (exp(2x) + 1), exact at ±inf."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _chunk_loss_kernel(
    z_ptr, labels_ptr, row_scale_ptr, lse_ptr, nll_ptr, z_mean_ptr, kind_weight_ptr,
    V, stride_zm, ignore_index, label_smoothing: tl.float64, z_loss: tl.float64, softcap: tl.float64,
    KIND: tl.constexpr, GRAD: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTHING: tl.constexpr,
    ACC_DTYPE: tl.constexpr, ROUND_BF16_BY_HAND: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Row ``program_id(0)`` of the C×V logits ``z``: statistics (pass 1), then z ← ∂loss/∂z in place (pass 2)."""
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * stride_zm
    label = tl.load(labels_ptr + row)
    label = tl.where(label == ignore_index, 0, label)  # as the reference: class 0 stands in (r_t is 0 there)
    label_smoothing = tl.full((), label_smoothing, ACC_DTYPE)
    z_loss = tl.full((), z_loss, ACC_DTYPE)
    softcap = tl.full((), softcap, ACC_DTYPE)
    running_max = tl.full((), float("-inf"), ACC_DTYPE)
    running_sum = tl.zeros((), ACC_DTYPE)
    z_label = tl.zeros((), ACC_DTYPE)
    z_total = tl.zeros((), ACC_DTYPE)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        ok = offs_v < V
        z = tl.load(z_row + offs_v, mask=ok, other=0.0).to(ACC_DTYPE)
        if SOFTCAP:
            z = _tanh(z / softcap) * softcap
        z_in = tl.where(ok, z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z_in, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z_in - new_max), axis=0)
        running_max = new_max
        z_label += tl.sum(tl.where(offs_v == label, z, 0.0), axis=0)
        if SMOOTHING:
            z_total += tl.sum(tl.where(ok, z, 0.0), axis=0)
    lse = running_max + tl.log(running_sum)
    nll = lse - z_label
    if KIND == 0:
        kind_weight = tl.full((), 1.0, ACC_DTYPE)
    elif KIND == 1:
        kind_weight = tl.exp(-nll)
    else:
        kind_weight = tl.load(kind_weight_ptr + row).to(ACC_DTYPE)
    tl.store(lse_ptr + row, lse)
    tl.store(nll_ptr + row, nll)
    tl.store(kind_weight_ptr + row, kind_weight)
    if SMOOTHING:
        tl.store(z_mean_ptr + row, z_total / V)
    if GRAD:
        r = tl.load(row_scale_ptr + row).to(ACC_DTYPE)
        alpha = r * (kind_weight + 2.0 * z_loss * lse)
        beta = r * kind_weight * (1.0 - label_smoothing)
        gamma = r * kind_weight * label_smoothing / V
        for v0 in range(0, V, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            ok = offs_v < V
            z = tl.load(z_row + offs_v, mask=ok, other=0.0).to(ACC_DTYPE)
            if SOFTCAP:
                z = _tanh(z / softcap) * softcap
            g = alpha * tl.exp(z - lse) - gamma
            g -= tl.where(offs_v == label, beta, 0.0)
            if SOFTCAP:
                capped = z / softcap
                g *= 1.0 - capped * capped
            tl.store(z_row + offs_v, cast_to(g, z_ptr.dtype.element_ty, ROUND_BF16_BY_HAND), mask=ok)


def chunk_loss(
    logits: Tensor, labels: Tensor, row_scale: Tensor, kind: str, ignore_index: int, label_smoothing: float,
    z_loss: float, softcap: Optional[float], grad: bool, lse: Tensor, nll: Tensor, z_mean: Tensor,
    kind_weight: Tensor,
) -> Tensor:
    """One launch over a C×V ``logits`` chunk (row stride free, unit column stride): writes lse, nll, z_mean
    (with label smoothing) and kind_weight per row (1-D, C each; kind_weight is read for ``kind="given"``),
    and with ``grad`` overwrites ``logits`` with the logit gradient (row_scale r_t per row). Returns logits."""
    rows, vocab = logits.shape
    if rows == 0 or vocab == 0:
        return logits
    if logits.stride(1) != 1:
        raise ValueError("chunk_loss: the logits need unit stride along the vocabulary")
    interpreting = logits.device.type == "cpu"
    acc = tl.float64 if lse.dtype == torch.float64 else tl.float32
    _chunk_loss_kernel[(rows,)](
        logits, labels, row_scale, lse, nll, z_mean, kind_weight,
        vocab, logits.stride(0), ignore_index, float(label_smoothing), float(z_loss), float(softcap or 1.0),
        KIND=_KINDS[kind], GRAD=grad, SOFTCAP=softcap is not None, SMOOTHING=label_smoothing > 0.0,
        ACC_DTYPE=acc, ROUND_BF16_BY_HAND=interpreting,
        BLOCK_V=block_size(vocab, 32 if interpreting else 4096), num_warps=1 if interpreting else 8,
    )
    return logits


def chunk_rows(tokens: int, vocab: int, dtype: torch.dtype, device: torch.device, cap: int) -> int:
    """Rows per chunk: the caller's ``cap``, and on a GPU no more than a C×V buffer in
    ``LOGITS_MEMORY_SHARE`` of the free device memory allows."""
    rows = max(1, min(tokens, cap))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        fit = int(free * LOGITS_MEMORY_SHARE) // max(1, vocab * torch.empty((), dtype=dtype).element_size())
        rows = max(1, min(rows, fit if fit < 16 else fit // 16 * 16))
    return rows


def fused_pass(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, row_scale: Tensor,
    given_weight: Optional[Tensor], kind: str, ignore_index: int, label_smoothing: float, z_loss: float,
    softcap: Optional[float], chunk_size: int, need_dh: bool, need_dw: bool, need_db: bool,
    hidden2: Optional[Tensor] = None, weight2: Optional[Tensor] = None, need_dh2: bool = False,
    need_dw2: bool = False, vocab_splits: Optional[int] = None,
) -> tuple[Tensor, ...]:
    """One pass over the tokens with the contract of ``fastft.ops.linear_cross_entropy.reference_pass``.

    Returns (lse, nll, z_mean, kind_weight, dh, dw, db, dh2, dw2), gradients empty where not needed.
    ``chunk_size`` caps the rows of a chunk (see :func:`chunk_rows`). ``vocab_splits`` is accepted for
    compatibility and ignored (the former kernel split the vocabulary with atomic adds; this one has none).
    """
    del vocab_splits
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
    empty = hidden.new_empty(0)
    dh = torch.empty_like(hidden) if need_dh else empty
    dw = torch.zeros_like(weight) if need_dw else weight.new_empty(0)
    db = torch.zeros(vocab, dtype=acc, device=device) if need_db else None
    dh2 = torch.empty_like(hidden2) if need_dh2 else hidden.new_empty(0)
    dw2 = torch.zeros_like(weight2) if need_dw2 else hidden.new_empty(0)
    labels = labels.contiguous()
    row_scale = row_scale.to(acc).contiguous()
    if n_tokens > 0 and vocab > 0:
        chunk = chunk_rows(n_tokens, vocab, dtype, device, chunk_size)
        buffer = torch.empty(chunk, vocab, dtype=dtype, device=device)
        w_t = weight.t()
        for start in range(0, n_tokens, chunk):
            stop = min(n_tokens, start + chunk)
            h_c = hidden[start:stop]
            z = buffer[: stop - start]
            if bias is None:
                torch.mm(h_c, w_t, out=z)
            else:
                torch.addmm(bias, h_c, w_t, out=z)
            if hidden2 is not None:
                z.addmm_(hidden2[start:stop], weight2.t())
            chunk_loss(z, labels[start:stop], row_scale[start:stop], kind, ignore_index, label_smoothing, z_loss,
                       softcap, need_grad, lse[start:stop], nll[start:stop], z_mean[start:stop],
                       kind_weight[start:stop])
            if not need_grad:
                continue
            if need_dh:
                torch.mm(z, weight, out=dh[start:stop])
            if need_dw:
                dw.addmm_(z.t(), h_c)
            if need_db:
                db.add_(z.sum(dim=0, dtype=acc))
            if need_dh2:
                torch.mm(z, weight2, out=dh2[start:stop])
            if need_dw2:
                dw2.addmm_(z.t(), hidden2[start:stop])
    return (lse, nll, z_mean, kind_weight, dh, dw, db.to(bias.dtype) if need_db else hidden.new_empty(0), dh2, dw2)

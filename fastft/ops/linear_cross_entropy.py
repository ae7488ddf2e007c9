"""Fused linear cross-entropy: the loss of ``logits = hidden · weightᵀ + bias`` without the N×V logits.

For N tokens with hidden states h_t (H), an lm_head weight W (V×H), an optional bias b (V) and labels
y_t, a token t is *valid* when ``y_t != ignore_index``. For a valid token::

    z_t      = W h_t + b [+ W₂ h₂_t]                      (V logits, accumulated in float32; the optional
                                                           low-rank term is a LoRA lm_head: h₂ = s·Ah, W₂ = B)
    z_t      ← c · tanh(z_t / c)                          (only with logit_softcap = c)
    lse_t    = log Σ_v exp(z_tv)
    nll_t    = lse_t − z_t,y                              (= −log p_t, p_t = softmax(z_t)_y)
    ce_t     = (1 − ε) · nll_t + ε · (lse_t − (1/V) Σ_v z_tv)
                                                          (label smoothing ε, as torch's cross_entropy:
                                                           the smoothed target puts ε/V on every class)
    w_t      = 1                                          (kind="ce")
             = sg(p_t)                                    (kind="dft": Dynamic Fine-Tuning)
             = max(sg(p_t)^(1/τ), w_min)                  (kind="talr": Token-Adaptive Loss Reweighting)
    loss_t   = u_t · (w_t · ce_t + λ · lse_t²)            (z-loss λ; u_t = token_weights[t], default 1)

``sg`` is stop-gradient: w_t and u_t are constants for the gradient. For TALR, τ is a statistic of the
batch, also without gradient: the median over sequences of the mean of nll_t over the sequence's valid
tokens (sequences without a valid token are left out; for an even count the median is the mean of the
two middle values; τ is floored at 1e-6). A sequence is a row of a 2-D ``labels`` (batch × sequence);
``kind="talr"`` refuses 1-D labels, because a flattened batch does not say where sequences end.
Computed per call: under gradient accumulation τ is a statistic of each micro-batch.

Reductions over the tokens (ignored tokens contribute nothing):
    "sum"   Σ_t loss_t
    "mean"  Σ_t loss_t / n, with n = ``num_items_in_batch`` when given (the number of valid tokens in
            the whole accumulated batch, as transformers' Trainer passes it), else the number of valid
            tokens of this call. n = 0 (nothing to learn from) gives a loss of exactly 0 with zero
            gradients, never NaN.
    "none"  loss_t per token, in the shape of ``labels`` (0 at ignored tokens).

Gradient. With g_tv = ∂loss/∂z_tv before the softcap::

    g_tv = r_t · [ (w_t + 2λ·lse_t) · softmax(z_t)_v − w_t·(1 − ε)·[v = y_t] − w_t·ε/V ] · d_tv
    d_tv = 1 − (z_tv / c)²  with a softcap (the derivative of c·tanh(x/c)), else 1
    dh_t = Σ_v g_tv W_v        dW = Σ_t g_tᵀ h_t        db = Σ_t g_t
    dh₂_t = Σ_v g_tv W₂_v      dW₂ = Σ_t g_tᵀ h₂_t

where r_t = u_t / n ("mean"), u_t ("sum"), or u_t times the upstream gradient of loss_t ("none").

How it runs. Both backends walk the tokens in chunks of at most ``chunk_size`` rows: a chunk's C×V logits
are the only vocabulary-sized buffer, and the chunk's gradient is folded into dh, dW and db before the next
chunk. The PyTorch reference (the spec; what runs on CPU) does the softmax and gradient with torch ops
(two C×V buffers with a softcap). The Triton backend (``fastft.kernels.linear_cross_entropy``, on CUDA)
computes the logits, dh and dW by cuBLAS and the loss, lse and logit gradient in one Triton pass that
overwrites the logits in place; the chunk is also capped by the free device memory; no float atomics
(bitwise-deterministic gradients), dW accumulated in place in the weight's dtype. For "mean" and "sum"
both compute the gradients during the forward and keep them (dh: N×H in the hidden states' dtype; dW:
V×H in the weight's dtype; db: V; dh₂, dW₂) until backward, which only multiplies them, in place, by the
upstream scalar and hands them to autograd (which makes dW the lm_head's ``.grad``, or adds it in place to
an existing one); only the gradients that are needed (inputs that require grad, grad mode on) are computed.
So backward runs once per forward (``retain_graph`` is refused with a clear error). For "none" the forward
keeps (h, W, b, h₂, W₂, labels, w_t) and backward recomputes the logits chunk by chunk. TALR needs τ before
any gradient: one extra pass over the logits computes the statistics first.

Matmuls run in the inputs' dtype (logits rounded to it, as ``lm_head`` then ``.float()`` does in
transformers; g rounded to it before its two products, as autograd through that path does); softmax,
losses and the accumulation of db are in float32 (float64 for float64 inputs), dW too in the reference
(the Triton backend accumulates 16-bit dW in its dtype, each chunk's product in float32). Labels outside
the vocabulary are an error (checked once per call: one device synchronisation on a GPU). Registered as
the ``torch.library`` ops ``fastft::linear_cross_entropy`` and ``fastft::linear_cross_entropy_backward``
(with fake kernels; under ``torch.compile`` the label check is an on-device assert, not a graph break).
"""
from __future__ import annotations

import numbers

from typing import Any, NamedTuple, Optional, Union

import torch
from torch import Tensor
from torch._guards import detect_fake_mode

from ..dispatch import implementation, lazy, register_op
from ..node_costs import custom_op_node

KINDS = ("ce", "dft", "talr")
REDUCTIONS = ("mean", "sum", "none")
TALR_MIN_TAU = 1e-6


class PassResult(NamedTuple):
    """What one pass over the tokens returns (every per-token vector is float32, float64 for float64 inputs).

    lse, nll, z_mean: per token (z_mean is 0 unless label smoothing asked for it); kind_weight: the w_t
    the pass used; dh, dw, db, dh2, dw2: gradients, empty where not asked for.
    """

    lse: Tensor
    nll: Tensor
    z_mean: Tensor
    kind_weight: Tensor
    dh: Tensor
    dw: Tensor
    db: Tensor
    dh2: Tensor
    dw2: Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_chunk_size(tokens: int, hidden: int, vocab: int) -> int:
    """Rows per chunk of the reference: a sixteenth of the tokens rounded down to a power of two, but at
    least 256 rows (or all of them when fewer), so a chunk's C×V logits are at most 1/16 of the full
    logits at training sizes, while the GEMMs keep enough rows to run at full speed and the per-chunk
    update of dW (a V×H read-modify-write) stays rare. ``hidden`` is accepted for future tuning."""
    sixteenth = max(1, tokens // 16)
    chunk = max(256, 1 << (sixteenth.bit_length() - 1))
    return max(1, min(tokens, chunk))


# --------------------------------------------------------------------------- the reference pass
def _chunk_logits(h_chunk: Tensor, weight: Tensor, bias: Optional[Tensor], h2_chunk: Optional[Tensor],
                  weight2: Optional[Tensor], acc_dtype: torch.dtype) -> Tensor:
    logits = h_chunk @ weight.t() if bias is None else torch.addmm(bias, h_chunk, weight.t())
    if h2_chunk is not None:
        logits = torch.addmm(logits, h2_chunk, weight2.t())
    return logits if logits.dtype == acc_dtype else logits.to(acc_dtype)


def reference_pass(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, row_scale: Tensor,
    given_weight: Optional[Tensor], kind: str, ignore_index: int, label_smoothing: float, z_loss: float,
    softcap: Optional[float], chunk_size: int, need_dh: bool, need_dw: bool, need_db: bool,
    hidden2: Optional[Tensor] = None, weight2: Optional[Tensor] = None, need_dh2: bool = False,
    need_dw2: bool = False,
) -> PassResult:
    """One chunked pass of the formulas in the module docstring over N tokens (hidden N×H, labels N).

    ``row_scale`` is r_t (zero at ignored tokens); ``kind`` is "ce" or "dft" (w_t from p_t) or "given"
    (w_t = ``given_weight``). ``hidden2`` (N×R) and ``weight2`` (V×R) add the low-rank term to the
    logits. Gradients are computed only when a ``need_*`` flag asks for them.
    """
    n_tokens, n_hidden = hidden.shape
    vocab = weight.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    device = hidden.device
    need_grad = need_dh or need_dw or need_db or need_dh2 or need_dw2
    lse = torch.empty(n_tokens, dtype=acc, device=device)
    nll = torch.empty(n_tokens, dtype=acc, device=device)
    z_mean = torch.zeros(n_tokens, dtype=acc, device=device)
    kind_weight = torch.empty(n_tokens, dtype=acc, device=device)
    dh = torch.empty_like(hidden) if need_dh else hidden.new_empty(0)
    dw = torch.zeros(weight.shape, dtype=acc, device=device) if need_dw else weight.new_empty(0)
    db = torch.zeros(vocab, dtype=acc, device=device) if need_db else hidden.new_empty(0)
    dh2 = torch.empty_like(hidden2) if need_dh2 else hidden.new_empty(0)
    dw2 = torch.zeros(weight2.shape, dtype=acc, device=device) if need_dw2 else hidden.new_empty(0)
    safe_labels = torch.where(labels == ignore_index, 0, labels)
    for start in range(0, n_tokens, chunk_size):
        stop = min(n_tokens, start + chunk_size)
        h_c, y_c = hidden[start:stop], safe_labels[start:stop, None]
        h2_c = None if hidden2 is None else hidden2[start:stop]
        z = _chunk_logits(h_c, weight, bias, h2_c, weight2, acc)
        tanh = None
        if softcap is not None:
            tanh = z.div_(softcap).tanh_()
            z = tanh * softcap
        z_y = z.gather(1, y_c).squeeze(1)
        if label_smoothing > 0.0:
            z_mean[start:stop] = z.mean(dim=1)
        z_max = z.amax(dim=1)
        probs = z.sub_(z_max[:, None]).exp_()  # unnormalised softmax, in z's buffer
        total = probs.sum(dim=1)
        lse_c = z_max + total.log()
        nll_c = lse_c - z_y
        if kind == "ce":
            w_c = torch.ones_like(nll_c)
        elif kind == "dft":
            w_c = torch.exp(-nll_c)
        else:
            w_c = given_weight[start:stop].to(acc)
        lse[start:stop], nll[start:stop], kind_weight[start:stop] = lse_c, nll_c, w_c
        if not need_grad:
            continue
        r_c = row_scale[start:stop].to(acc)
        grad = probs.mul_((r_c * (w_c + 2.0 * z_loss * lse_c) / total)[:, None])
        grad.scatter_add_(1, y_c, (-(1.0 - label_smoothing) * r_c * w_c)[:, None])
        if label_smoothing > 0.0:
            grad.sub_((label_smoothing / vocab * r_c * w_c)[:, None])
        if tanh is not None:
            grad.mul_(tanh.square_().neg_().add_(1.0))
        grad_in = grad.to(hidden.dtype)  # the products take g rounded to the inputs' dtype (no copy in fp32)
        if need_dh:
            torch.mm(grad_in, weight, out=dh[start:stop])
        if need_dw:
            dw.addmm_(grad_in.to(acc).t(), h_c.to(acc))
        if need_db:
            db.add_(grad.sum(dim=0))
        if need_dh2:
            torch.mm(grad_in, weight2, out=dh2[start:stop])
        if need_dw2:
            dw2.addmm_(grad_in.to(acc).t(), h2_c.to(acc))
        del grad, grad_in, probs, z, tanh
    if need_dw:
        dw = dw.to(weight.dtype)
    if need_db:
        db = db.to(bias.dtype)
    if need_dw2:
        dw2 = dw2.to(weight2.dtype)
    return PassResult(lse, nll, z_mean, kind_weight, dh, dw, db, dh2, dw2)


def linear_cross_entropy_backward_flops(node, grad_shape):
    """FLOP formula of the backward (:mod:`fastft.node_costs`): for N tokens, hidden H, vocabulary V,
    low-rank R (a LoRA lm_head)::

        dh  = g W      2·N·V·H   when the hidden states need grad
        dW  = gᵀ h     2·N·V·H   when the lm_head weight trains
        dh₂ = g W₂     2·N·V·R   when h₂ = s·dropout(h)Aᵀ needs grad
        dW₂ = gᵀ h₂    2·N·V·R   when W₂ = B trains
        db  = Σ g      0

    For ``reduction="mean"``/``"sum"`` the op computes these products during its forward (it keeps the
    gradients, the backward only scales them), for ``"none"`` in the backward, which first recomputes the
    logits (2·N·V·(H + R), whenever it runs). Either way they are the cost of training what they serve, so
    they are counted here: for a fused-loss model the report's backward FLOPs are the step's FLOPs minus
    those of a forward without gradients. Tensor inputs: hidden, weight, labels, [bias], [h₂, W₂], ...
    """
    tokens, hidden, vocab, rank, has_bias = node.sizes
    h2_edge = 3 + (1 if has_bias else 0)
    w2_edge = h2_edge + 1
    items = [(2 * tokens * vocab * hidden, (0,)), (2 * tokens * vocab * hidden, (1,))]
    if rank:
        items += [(2 * tokens * vocab * rank, (h2_edge,)), (2 * tokens * vocab * rank, (w2_edge,))]
    if node.reduction == "none":
        items.append((2 * tokens * vocab * (hidden + rank), tuple(range(len(node.next_functions)))))
    return items


register_op("linear_cross_entropy", {
    "torch": {"pass": reference_pass},
    "triton": lazy("fastft.kernels.linear_cross_entropy", **{"pass": "fused_pass"}),
}, node_costs={custom_op_node("linear_cross_entropy"): linear_cross_entropy_backward_flops})


def _run_pass(*args, **kwargs) -> PassResult:
    hidden = args[0]
    return PassResult(*implementation("linear_cross_entropy", "pass", hidden.device)(*args, **kwargs))


# --------------------------------------------------------------------------- shared formulas
def token_losses(pass_result: PassResult, valid: Tensor, token_weights: Optional[Tensor], label_smoothing: float,
                 z_loss: float) -> Tensor:
    """loss_t of the module docstring from a pass's statistics (0 at ignored tokens)."""
    lse, nll, z_mean, w = pass_result.lse, pass_result.nll, pass_result.z_mean, pass_result.kind_weight
    ce = nll if label_smoothing == 0.0 else (1.0 - label_smoothing) * nll + label_smoothing * (lse - z_mean)
    loss = w * ce
    if z_loss:
        loss = loss + z_loss * lse.square()
    if token_weights is not None:
        loss = loss * token_weights.to(loss.dtype)
    return torch.where(valid, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))


def talr_weights(nll: Tensor, valid: Tensor, sequence_length: int, min_weight: float) -> Tensor:
    """w_t = max(p_t^(1/τ), w_min) = max(exp(−nll_t / τ), w_min), τ = median over sequences of mean nll."""
    nll2 = torch.where(valid, nll, torch.zeros((), dtype=nll.dtype, device=nll.device)).view(-1, sequence_length)
    counts = valid.view(-1, sequence_length).sum(dim=1)
    means = nll2.sum(dim=1) / counts.clamp_min(1)
    means = means[counts > 0]
    if means.numel() == 0:
        tau = torch.ones((), dtype=nll.dtype, device=nll.device)
    else:
        tau = torch.quantile(means, 0.5).clamp_min(TALR_MIN_TAU)
    return torch.exp(-nll / tau).clamp_min(min_weight)


def _denominator(valid: Tensor, num_items: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    count = valid.sum() if num_items is None else num_items
    return count.to(dtype).clamp_min(1)


# --------------------------------------------------------------------------- torch.library ops
_N_INPUTS = 22  # of fastft::linear_cross_entropy


@torch.library.custom_op("fastft::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor], hidden2: Optional[Tensor],
    weight2: Optional[Tensor], token_weights: Optional[Tensor], num_items: Optional[Tensor], kind: str,
    reduction: str, ignore_index: int, label_smoothing: float, z_loss: float, softcap: Optional[float],
    talr_min_weight: float, sequence_length: int, chunk_size: int,
    need_dh: bool, need_dw: bool, need_db: bool, need_dh2: bool, need_dw2: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, dh, dw, db, dh2, dw2, kind_weight): the loss per the module docstring; for "mean"/"sum" the
    gradients of that loss (unit upstream gradient), empty where not needed or for "none"."""
    valid = labels != ignore_index
    acc = accumulation_dtype(hidden.dtype)
    if reduction == "none":
        need_dh = need_dw = need_db = need_dh2 = need_dw2 = False
        scale = torch.zeros((), dtype=acc, device=hidden.device)
    elif reduction == "sum":
        scale = torch.ones((), dtype=acc, device=hidden.device)
    else:
        scale = 1.0 / _denominator(valid, num_items, acc)
    row_scale = valid.to(acc) * scale
    if token_weights is not None:
        row_scale = row_scale * token_weights.to(acc)
    common = (ignore_index, label_smoothing, z_loss, softcap, chunk_size)
    lowrank = dict(hidden2=hidden2, weight2=weight2)
    given = None
    pass_kind = kind
    if kind == "talr":
        stats = _run_pass(hidden, weight, bias, labels, row_scale, None, "ce", *common, False, False, False, **lowrank)
        given = talr_weights(stats.nll, valid, sequence_length, talr_min_weight)
        pass_kind = "given"
    result = _run_pass(hidden, weight, bias, labels, row_scale, given, pass_kind, *common, need_dh, need_dw, need_db,
                       need_dh2=need_dh2, need_dw2=need_dw2, **lowrank)
    losses = token_losses(result, valid, token_weights, label_smoothing, z_loss)
    if reduction == "none":
        loss = losses
    else:
        loss = losses.sum() * scale
    return loss, result.dh, result.dw, result.db, result.dh2, result.dw2, result.kind_weight


def _fake_grads(hidden, weight, bias, hidden2, weight2, need_dh, need_dw, need_db, need_dh2, need_dw2):
    return (
        hidden.new_empty(hidden.shape) if need_dh else hidden.new_empty(0),
        weight.new_empty(weight.shape) if need_dw else weight.new_empty(0),
        bias.new_empty(bias.shape) if need_db and bias is not None else hidden.new_empty(0),
        hidden2.new_empty(hidden2.shape) if need_dh2 and hidden2 is not None else hidden.new_empty(0),
        weight2.new_empty(weight2.shape) if need_dw2 and weight2 is not None else hidden.new_empty(0),
    )


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, labels, bias, hidden2, weight2, token_weights, num_items, kind, reduction, ignore_index,
      label_smoothing, z_loss, softcap, talr_min_weight, sequence_length, chunk_size, need_dh, need_dw, need_db,
      need_dh2, need_dw2):
    acc = accumulation_dtype(hidden.dtype)
    per_token = reduction == "none"
    loss = hidden.new_empty(labels.shape, dtype=acc) if per_token else hidden.new_empty((), dtype=acc)
    needs = (False,) * 5 if per_token else (need_dh, need_dw, need_db, need_dh2, need_dw2)
    return (loss, *_fake_grads(hidden, weight, bias, hidden2, weight2, *needs), hidden.new_empty(labels.shape, dtype=acc))


@torch.library.custom_op("fastft::linear_cross_entropy_backward", mutates_args=())
def _linear_cross_entropy_backward_op(
    grad_loss: Tensor, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor],
    hidden2: Optional[Tensor], weight2: Optional[Tensor], token_weights: Optional[Tensor], kind_weight: Tensor,
    ignore_index: int, label_smoothing: float, z_loss: float, softcap: Optional[float], chunk_size: int,
    need_dh: bool, need_dw: bool, need_db: bool, need_dh2: bool, need_dw2: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dh, dw, db, dh2, dw2) of reduction "none" for the per-token upstream gradient ``grad_loss``:
    recomputes the logits chunk by chunk (or tile by tile) with the w_t the forward used."""
    acc = accumulation_dtype(hidden.dtype)
    valid = labels != ignore_index
    row_scale = grad_loss.to(acc) * valid
    if token_weights is not None:
        row_scale = row_scale * token_weights.to(acc)
    result = _run_pass(hidden, weight, bias, labels, row_scale, kind_weight, "given", ignore_index, label_smoothing,
                       z_loss, softcap, chunk_size, need_dh, need_dw, need_db, hidden2=hidden2, weight2=weight2,
                       need_dh2=need_dh2, need_dw2=need_dw2)
    return result.dh, result.dw, result.db, result.dh2, result.dw2


@_linear_cross_entropy_backward_op.register_fake
def _(grad_loss, hidden, weight, labels, bias, hidden2, weight2, token_weights, kind_weight, ignore_index,
      label_smoothing, z_loss, softcap, chunk_size, need_dh, need_dw, need_db, need_dh2, need_dw2):
    return _fake_grads(hidden, weight, bias, hidden2, weight2, need_dh, need_dw, need_db, need_dh2, need_dw2)


def _setup_context(ctx, inputs, output):
    (hidden, weight, labels, bias, hidden2, weight2, token_weights, num_items, kind, reduction, ignore_index,
     label_smoothing, z_loss, softcap, talr_min_weight, sequence_length, chunk_size, *needs) = inputs
    loss, dh, dw, db, dh2, dw2, kind_weight = output
    ctx.mark_non_differentiable(dh, dw, db, dh2, dw2, kind_weight)
    ctx.set_materialize_grads(False)  # no zero-filled N×H / V×H gradients for the outputs nobody uses
    ctx.reduction = reduction
    ctx.needs = tuple(needs)
    # operand sizes, read off the graph by cost models (fastft.policies): tokens, hidden, vocab, rank, bias?
    ctx.sizes = (hidden.shape[0], hidden.shape[1], weight.shape[0], 0 if weight2 is None else weight2.shape[1],
                 bias is not None)
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, labels, bias, hidden2, weight2, token_weights, kind_weight)
        ctx.meta = (ignore_index, label_smoothing, z_loss, softcap, chunk_size)
        ctx.grads = None
    else:
        # Kept as plain attributes (detached, so no reference cycle through the graph) and handed over,
        # not copied, in backward: the parameter gradient can then become .grad without a second V×H copy.
        ctx.grads = [dh.detach(), dw.detach(), db.detach(), dh2.detach(), dw2.detach()]


def _backward(ctx, grad_loss, *_unused_output_grads):
    if grad_loss is None:  # the loss itself was not used
        return (None,) * _N_INPUTS
    if ctx.reduction == "none":
        hidden, weight, labels, bias, hidden2, weight2, token_weights, kind_weight = ctx.saved_tensors
        wants = ctx.needs_input_grad
        needs = (wants[0], wants[1], wants[3] and bias is not None, wants[4] and hidden2 is not None,
                 wants[5] and weight2 is not None)
        grads = _linear_cross_entropy_backward_op(
            grad_loss.contiguous(), hidden, weight, labels, bias, hidden2, weight2, token_weights, kind_weight,
            *ctx.meta, *needs,
        )
    else:
        if ctx.grads is None:
            raise RuntimeError(
                "fastft linear_cross_entropy: backward ran a second time through the same forward. The loss "
                "computes its gradients during the forward and hands them over once, so retain_graph=True / a "
                "second backward is not supported; run the forward again instead."
            )
        needs, grads = ctx.needs, ctx.grads
        ctx.grads = None
        for grad in grads:
            if grad.numel():
                grad.mul_(grad_loss.to(grad.dtype))
    dh, dw, db, dh2, dw2 = (grad if need else None for grad, need in zip(grads, needs))
    return (dh, dw, None, db, dh2, dw2) + (None,) * (_N_INPUTS - 6)


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- the public function
def _check_args(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor], kind: str, reduction: str,
                token_weights: Optional[Tensor], label_smoothing: float, z_loss: float,
                logit_softcap: Optional[float], talr_min_weight: float, chunk_size: Optional[int]) -> None:
    if kind not in KINDS:
        raise ValueError(f"linear_cross_entropy: kind={kind!r}; choose one of {list(KINDS)}.")
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction={reduction!r}; choose one of {list(REDUCTIONS)}.")
    if not isinstance(hidden, Tensor) or not hidden.is_floating_point() or hidden.dim() < 1:
        raise TypeError("linear_cross_entropy: hidden must be a floating-point tensor (..., hidden_size).")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(
            f"linear_cross_entropy: weight must be the 2-D (vocab_size, hidden_size) lm_head weight, got shape "
            f"{tuple(getattr(weight, 'shape', ()))}."
        )
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"linear_cross_entropy: hidden states have {hidden.shape[-1]} features but the weight is "
            f"{tuple(weight.shape)} (vocab_size × hidden_size): they do not belong together."
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}; cast one to the other "
            "(inside a model under autocast, fastft casts both to the autocast dtype as lm_head would)."
        )
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"linear_cross_entropy: labels must be an integer tensor of token ids, got {getattr(labels, 'dtype', type(labels))}.")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"linear_cross_entropy: labels have shape {tuple(labels.shape)} but the hidden states {tuple(hidden.shape)} "
            f"need labels of shape {tuple(hidden.shape[:-1])} (one label per position)."
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0] or bias.dtype != hidden.dtype):
        raise ValueError(
            f"linear_cross_entropy: bias must be ({weight.shape[0]},) of {hidden.dtype}, got "
            f"{tuple(bias.shape)} of {bias.dtype}."
        )
    if token_weights is not None and (
        not isinstance(token_weights, Tensor) or tuple(token_weights.shape) != tuple(labels.shape)
        or not token_weights.is_floating_point()
    ):
        raise ValueError(
            f"linear_cross_entropy: token_weights must be a float tensor of the labels' shape {tuple(labels.shape)}."
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"linear_cross_entropy: label_smoothing={label_smoothing} must be in [0, 1].")
    if not z_loss >= 0.0:
        raise ValueError(f"linear_cross_entropy: z_loss={z_loss} must be >= 0 (a typical value is 1e-4).")
    if logit_softcap is not None and not logit_softcap > 0.0:
        raise ValueError(f"linear_cross_entropy: logit_softcap={logit_softcap} must be a positive number or None.")
    if not 0.0 <= talr_min_weight <= 1.0:
        raise ValueError(f"linear_cross_entropy: talr_min_weight={talr_min_weight} must be in [0, 1].")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"linear_cross_entropy: chunk_size={chunk_size!r} must be a positive integer or None.")
    if kind == "talr" and labels.dim() != 2:
        raise ValueError(
            "linear_cross_entropy: kind='talr' needs 2-D labels (batch × sequence) with hidden states "
            "(batch × sequence × hidden): τ is a median over sequences, and flattened tokens do not say where a "
            f"sequence ends. Got labels of shape {tuple(labels.shape)}."
        )


def _check_lowrank(hidden: Tensor, weight: Tensor, lowrank_hidden: Optional[Tensor],
                   lowrank_weight: Optional[Tensor]) -> None:
    if lowrank_hidden is None and lowrank_weight is None:
        return
    if lowrank_hidden is None or lowrank_weight is None:
        raise ValueError("linear_cross_entropy: pass both lowrank_hidden and lowrank_weight, or neither.")
    rank = lowrank_weight.shape[-1] if lowrank_weight.dim() == 2 else -1
    if (lowrank_weight.dim() != 2 or lowrank_weight.shape[0] != weight.shape[0]
            or tuple(lowrank_hidden.shape) != (*hidden.shape[:-1], rank)):
        raise ValueError(
            f"linear_cross_entropy: lowrank_weight must be (vocab_size={weight.shape[0]}, R) and lowrank_hidden "
            f"{tuple(hidden.shape[:-1])} + (R,); got {tuple(lowrank_weight.shape)} and {tuple(lowrank_hidden.shape)}."
        )
    if lowrank_hidden.dtype != hidden.dtype or lowrank_weight.dtype != hidden.dtype:
        raise TypeError(f"linear_cross_entropy: the low-rank operands must be {hidden.dtype} like hidden.")


def _check_label_range(labels: Tensor, vocab: int, ignore_index: int) -> None:
    if not torch.compiler.is_compiling() and detect_fake_mode(labels) is not None:
        return  # shapes without values (e.g. fastft.select_trainable reading the graph on fake tensors)
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if torch.compiler.is_compiling():  # no host synchronisation (graph break) in a compiled graph: assert on device
        torch._assert_async(
            ~bad.any(),
            f"linear_cross_entropy: a label is outside the vocabulary [0, {vocab}) of the weight and is not "
            f"ignore_index={ignore_index}: the labels do not match this lm_head.",
        )
        return
    if bool(bad.any()):
        example = int(labels[bad][0])
        raise ValueError(
            f"linear_cross_entropy: label {example} is outside the vocabulary [0, {vocab}) of the weight "
            f"(vocab_size {vocab}) and is not ignore_index={ignore_index}: the labels do not match this lm_head."
        )


def _check_num_items(num_items_in_batch: Any, labels: Tensor, ignore_index: int, device: torch.device) -> Optional[Tensor]:
    """``num_items_in_batch`` as a 0-d tensor on ``device``, checked: a finite count >= 0, and > 0 when these
    labels hold a target (it counts the targets of the whole batch, these included). A tensor on an
    accelerator is checked without a host sync (an asynchronous device assertion)."""
    if num_items_in_batch is None:
        return None
    what = "linear_cross_entropy: num_items_in_batch"
    if isinstance(num_items_in_batch, Tensor):
        if num_items_in_batch.numel() != 1 or num_items_in_batch.is_complex():
            raise ValueError(f"{what} must be a number or a 1-element real tensor, got shape {tuple(num_items_in_batch.shape)}.")
        if num_items_in_batch.dtype == torch.bool:
            raise TypeError(f"{what} is a bool tensor; give the count of target tokens (an int or a 1-element tensor).")
        num_items = num_items_in_batch.reshape(()).to(device)
    else:
        if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, numbers.Real):
            raise TypeError(f"{what}={num_items_in_batch!r}: give the count of target tokens (an int or a 1-element tensor).")
        num_items = torch.tensor(float(num_items_in_batch), device=device)
    has_target = (labels != ignore_index).any()
    ok = torch.isfinite(num_items) & (num_items >= 0) & ((num_items > 0) | ~has_target.to(device))
    if num_items.device.type == "cpu" and not torch.compiler.is_compiling() and detect_fake_mode() is None:
        if not bool(ok):
            raise ValueError(
                f"{what}={num_items.item()!r}: the number of target tokens in the whole batch must be finite, >= 0, "
                "and > 0 when these labels hold a target (a NaN, a negative count or 0 would give a NaN loss or "
                "silently divide by 1). Pass the count transformers' Trainer passes, or None to divide by this "
                "batch's own count."
            )
    else:
        torch._assert_async(ok, f"{what} must be finite, >= 0, and > 0 when the labels hold a target.")
    return num_items


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Optional[Tensor] = None,
    kind: str = "ce",
    reduction: str = "mean",
    token_weights: Optional[Tensor] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: Optional[float] = None,
    talr_min_weight: float = 0.01,
    chunk_size: Optional[int] = None,
    num_items_in_batch: Union[int, float, Tensor, None] = None,
    lowrank_hidden: Optional[Tensor] = None,
    lowrank_weight: Optional[Tensor] = None,
) -> Tensor:
    """The loss of ``hidden · weightᵀ + bias`` against ``labels`` without materialising the logits.

    See the module docstring for every formula. Args:
        hidden: (..., H) hidden states (the input of lm_head); labels: (...) integer token ids, already
            aligned with ``hidden`` (no shift here), ``ignore_index`` where there is nothing to predict.
        weight: (V, H) lm_head weight, of hidden's dtype; bias: optional (V,).
        kind: "ce" (cross-entropy), "dft" (w_t = sg(p_t)) or "talr" (w_t = max(sg(p_t)^(1/τ), w_min); needs
            2-D labels, one sequence per row).
        reduction: "mean" (÷ valid tokens, or ÷ ``num_items_in_batch``), "sum" or "none".
        token_weights: optional per-token factors u_t (labels' shape, no gradient flows into them).
        label_smoothing, z_loss, logit_softcap, talr_min_weight: ε, λ, c and w_min of the formulas.
        chunk_size: the most tokens per chunk (default :func:`default_chunk_size`); on a GPU the Triton backend
            also keeps a chunk's logits within a quarter of the free device memory.
        num_items_in_batch: the "mean" divisor for gradient accumulation (int or 0-d tensor, >= 0).
        lowrank_hidden, lowrank_weight: optional (..., R) and (V, R) tensors adding ``lowrank_hidden ·
            lowrank_weightᵀ`` to the logits: a LoRA lm_head is ``lowrank_hidden = s·dropout(hidden)·Aᵀ``,
            ``lowrank_weight = B`` (both receive gradients; still no logits in memory).

    Returns a 0-d loss (float32; float64 for float64 inputs), or per-token losses of labels' shape for
    ``reduction="none"``. Raises ``ValueError``/``TypeError`` on shapes, dtypes or labels outside the
    vocabulary.
    """
    _check_args(hidden, weight, labels, bias, kind, reduction, token_weights, label_smoothing, z_loss,
                logit_softcap, talr_min_weight, chunk_size)
    _check_lowrank(hidden, weight, lowrank_hidden, lowrank_weight)
    vocab, n_hidden = weight.shape
    _check_label_range(labels, vocab, ignore_index)
    num_items = _check_num_items(num_items_in_batch, labels, ignore_index, hidden.device)
    sequence_length = labels.shape[-1] if labels.dim() >= 1 else 1
    h1 = hidden.reshape(-1, n_hidden)
    if not h1.is_contiguous():
        h1 = h1.contiguous()
    labels1 = labels.reshape(-1).to(hidden.device, torch.long)
    weights1 = None if token_weights is None else token_weights.detach().reshape(-1).to(hidden.device)
    h2 = w2 = None
    if lowrank_hidden is not None:
        h2 = lowrank_hidden.reshape(-1, lowrank_hidden.shape[-1]).contiguous()
        w2 = lowrank_weight.contiguous()
    tokens = h1.shape[0]
    chunk = chunk_size or default_chunk_size(tokens, n_hidden, vocab)
    grad_on = torch.is_grad_enabled()
    need_dh = grad_on and hidden.requires_grad
    need_dw = grad_on and weight.requires_grad
    need_db = grad_on and bias is not None and bias.requires_grad
    need_dh2 = grad_on and h2 is not None and h2.requires_grad
    need_dw2 = grad_on and w2 is not None and w2.requires_grad
    loss, *_ = _linear_cross_entropy_op(
        h1, weight if weight.is_contiguous() else weight.contiguous(), labels1, bias, h2, w2, weights1, num_items,
        kind, reduction, int(ignore_index), float(label_smoothing), float(z_loss),
        None if logit_softcap is None else float(logit_softcap), float(talr_min_weight), int(sequence_length),
        int(chunk), need_dh, need_dw, need_db, need_dh2, need_dw2,
    )
    return loss.reshape(labels.shape) if reduction == "none" else loss

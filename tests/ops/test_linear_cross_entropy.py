"""The fused linear cross-entropy op (PyTorch reference) against a float64 evaluation with materialised logits.

The formula below is written independently of the op: full logits, ``log_softmax``, the kind weights
detached, τ of TALR from NumPy's median. Every loss and gradient (hidden, weight, bias) is compared with
the tolerance table of tests/helpers.py.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, backend

from fastft import measure
from fastft.ops import linear_cross_entropy
from fastft.ops.linear_cross_entropy import default_chunk_size

B, T, H, V = 3, 7, 12, 37
IGNORE = -100


def formula(h, W, b, y, kind="ce", label_smoothing=0.0, z_loss=0.0, logit_softcap=None, token_weights=None,
            talr_min_weight=0.01, reduction="mean", num_items=None, detach_weights=True):
    """The loss with materialised logits, evaluated by plain autograd (see the op's module docstring)."""
    z = h @ W.t()
    if b is not None:
        z = z + b
    if logit_softcap is not None:
        z = logit_softcap * torch.tanh(z / logit_softcap)
    logp = torch.log_softmax(z, dim=-1)
    valid = y != IGNORE
    nll = -logp.gather(-1, torch.where(valid, y, 0)[..., None]).squeeze(-1)
    ce = (1 - label_smoothing) * nll + label_smoothing * (-logp.mean(dim=-1))
    p = torch.exp(-nll)
    if detach_weights:
        p = p.detach()
    if kind == "ce":
        w = torch.ones_like(p)
    elif kind == "dft":
        w = p
    else:
        rows = [nll[i][valid[i]].detach().mean().item() for i in range(y.shape[0]) if valid[i].any()]
        tau = max(float(np.median(rows)), 1e-6) if rows else 1.0
        w = torch.clamp(p ** (1.0 / tau), min=talr_min_weight)
    loss = w * ce + z_loss * torch.logsumexp(z, dim=-1) ** 2
    if token_weights is not None:
        loss = loss * token_weights
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    n = valid.sum() if num_items is None else torch.tensor(num_items)
    return loss.sum() / n.clamp_min(1)


def make(dtype=torch.float64, bias=True, ignored=4, seed=0, batch=B, seq=T, hidden=H, vocab=V):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=g, dtype=torch.float64)
    W = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) / hidden ** 0.5 * 2
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, vocab, (batch, seq), generator=g)
    flat = y.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[:ignored]] = IGNORE
    tw = torch.rand(batch, seq, generator=g, dtype=torch.float64) + 0.5
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(h), cast(W), cast(b), y, cast(tw)


def grads_of(fn, h, W, b, upstream=None):
    """(loss, dh, dW, db) of ``fn(h, W, b)`` with fresh leaves."""
    h = h.clone().requires_grad_(True)
    W = W.clone().requires_grad_(True)
    b = None if b is None else b.clone().requires_grad_(True)
    loss = fn(h, W, b)
    if upstream is None:
        loss.backward()
    else:
        loss.backward(upstream)
    return loss.detach(), h.grad, W.grad, None if b is None else b.grad


def compare(got, want, dtype, names=("loss", "dh", "dW", "db")):
    for name, g, w in zip(names, got, want):
        if w is None:
            assert g is None, name
            continue
        assert_close(g, w, dtype, msg=name)


CASES = {
    "plain": dict(),
    "smoothing": dict(label_smoothing=0.1),
    "softcap-zloss": dict(logit_softcap=3.0, z_loss=1e-2),
    "all-options": dict(label_smoothing=0.2, logit_softcap=2.5, z_loss=3e-3, token_weights=True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["ce", "dft", "talr"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_float64_formula(kind, case, dtype):
    options = dict(CASES[case])
    h, W, b, y, tw = make(dtype)
    token_weights = tw if options.pop("token_weights", False) else None
    with backend("torch"):
        got = grads_of(lambda h_, W_, b_: linear_cross_entropy(
            h_, W_, y, b_, kind=kind, token_weights=token_weights, chunk_size=5, **options), h, W, b)
    up = lambda t: None if t is None else t.double()  # noqa: E731
    want = grads_of(lambda h_, W_, b_: formula(
        h_, W_, b_, y, kind=kind, token_weights=up(token_weights), **options), up(h), up(W), up(b))
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got[1].dtype == got[2].dtype == dtype
    compare(got, want, dtype)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("kind", ["ce", "dft", "talr"])
def test_reductions(kind, reduction):
    h, W, b, y, tw = make()
    options = dict(label_smoothing=0.1, logit_softcap=4.0, z_loss=1e-2)
    upstream = torch.randn(B, T, dtype=torch.float64) if reduction == "none" else None
    with backend("torch"):
        got = grads_of(lambda h_, W_, b_: linear_cross_entropy(
            h_, W_, y, b_, kind=kind, reduction=reduction, token_weights=tw, chunk_size=4, **options), h, W, b, upstream)
    want = grads_of(lambda h_, W_, b_: formula(
        h_, W_, b_, y, kind=kind, reduction=reduction, token_weights=tw, **options), h, W, b, upstream)
    if reduction == "none":
        assert got[0].shape == (B, T)
        assert (got[0][y == IGNORE] == 0).all()
    compare(got, want, torch.float64)


def test_cross_entropy_is_torchs_with_label_smoothing():
    """kind='ce' with smoothing is F.cross_entropy(label_smoothing=ε) over the materialised logits."""
    h, W, b, y, _ = make()
    with backend("torch"):
        got = grads_of(lambda h_, W_, b_: linear_cross_entropy(h_, W_, y, b_, label_smoothing=0.3), h, W, b)
    want = grads_of(lambda h_, W_, b_: F.cross_entropy(
        (h_ @ W_.t() + b_).view(-1, V), y.view(-1), ignore_index=IGNORE, label_smoothing=0.3), h, W, b)
    compare(got, want, torch.float64)


@pytest.mark.parametrize("kind", ["dft", "talr"])
def test_token_weights_of_dft_and_talr_carry_no_gradient(kind):
    h, W, b, y, _ = make()
    with backend("torch"):
        got = grads_of(lambda h_, W_, b_: linear_cross_entropy(h_, W_, y, b_, kind=kind), h, W, b)
    detached = grads_of(lambda h_, W_, b_: formula(h_, W_, b_, y, kind=kind), h, W, b)
    through = grads_of(lambda h_, W_, b_: formula(h_, W_, b_, y, kind=kind, detach_weights=False), h, W, b)
    compare(got, detached, torch.float64)
    assert_close(got[0], through[0], torch.float64)  # same loss value ...
    assert (got[1] - through[1]).abs().max() > 1e-3  # ... but a gradient through w_t would differ


def test_talr_weights_use_the_median_over_sequences():
    """w_t = max(p_t^(1/τ), w_min) with τ the median of the per-sequence mean NLL; checked by hand."""
    h, W, b, y, _ = make(batch=4)
    with backend("torch"):
        ce = linear_cross_entropy(h, W, y, b, reduction="none")
        talr = linear_cross_entropy(h, W, y, b, kind="talr", reduction="none", talr_min_weight=0.3)
    valid = y != IGNORE
    means = torch.stack([ce[i][valid[i]].mean() for i in range(4)])
    tau = means.sort().values[1:3].mean()  # even count: mean of the two middle values
    weights = torch.clamp(torch.exp(-ce / tau), min=0.3)
    assert_close(talr, torch.where(valid, weights * ce, 0.0), torch.float64)
    raw = torch.exp(-ce / tau)[valid]
    assert (raw < 0.3).any() and (raw > 0.3).any()  # the data reach both sides of the floor w_min


@pytest.mark.parametrize("kind", ["ce", "dft"])
def test_gradient_accumulation_with_num_items_equals_full_batch(kind):
    """4 micro-batches with unequal valid-token counts, each divided by the total count (num_items_in_batch)."""
    g = torch.Generator().manual_seed(3)
    h, W, b, y, _ = make(batch=8, seq=9)
    ignored_per_pair = [0, 3, 7, 12]  # micro-batch i (rows 2i, 2i+1) loses this many labels
    for i, count in enumerate(ignored_per_pair):
        rows = y[2 * i:2 * i + 2].reshape(-1)
        rows[torch.randperm(rows.numel(), generator=g)[:count]] = IGNORE
        y[2 * i:2 * i + 2] = rows.view(2, -1)
    counts = [(y[2 * i:2 * i + 2] != IGNORE).sum().item() for i in range(4)]
    assert len(set(counts)) == 4
    total = sum(counts)
    options = dict(kind=kind, label_smoothing=0.1, z_loss=1e-3)
    with backend("torch"):
        full = grads_of(lambda h_, W_, b_: linear_cross_entropy(h_, W_, y, b_, **options), h, W, b)
        leaves = [t.clone().requires_grad_(True) for t in (h, W, b)]
        accumulated_loss = 0.0
        for i in range(4):
            rows = slice(2 * i, 2 * i + 2)
            loss = linear_cross_entropy(leaves[0][rows], leaves[1], y[rows], leaves[2], num_items_in_batch=torch.tensor(total),
                                        **options)
            loss.backward()
            accumulated_loss += loss.detach()
        naive = grads_of(lambda h_, W_, b_: sum(
            linear_cross_entropy(h_[2 * i:2 * i + 2], W_, y[2 * i:2 * i + 2], b_, **options) / 4 for i in range(4)), h, W, b)
    compare((accumulated_loss, *(t.grad for t in leaves)), full, torch.float64)
    assert (naive[2] - full[2]).abs().max() > 1e-4  # averaging per micro-batch would be wrong


def test_num_items_as_python_int():
    h, W, b, y, _ = make()
    with backend("torch"):
        loss = linear_cross_entropy(h, W, y, b, num_items_in_batch=50)
    assert_close(loss, formula(h, W, b, y, num_items=50), torch.float64)


@pytest.mark.parametrize("chunk", [1, 4, 21, 1000])
def test_chunk_size_does_not_change_the_result(chunk):
    h, W, b, y, _ = make()
    with backend("torch"):
        got = grads_of(lambda h_, W_, b_: linear_cross_entropy(h_, W_, y, b_, kind="dft", logit_softcap=3.0, chunk_size=chunk), h, W, b)
    want = grads_of(lambda h_, W_, b_: formula(h_, W_, b_, y, kind="dft", logit_softcap=3.0), h, W, b)
    compare(got, want, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_the_default_path(dtype):
    """In 16 bits: lm_head in the dtype, .float(), cross_entropy — what transformers does — to the dtype's tolerance."""
    h, W, b, y, _ = make(dtype, bias=False)
    with backend("torch"):
        got = grads_of(lambda h_, W_, b_: linear_cross_entropy(h_, W_, y), h, W, None)
    want = grads_of(lambda h_, W_, b_: F.cross_entropy((h_ @ W_.t()).float().view(-1, V), y.view(-1)), h, W, None)
    assert got[1].dtype == got[2].dtype == dtype
    compare(got, want, dtype)


def test_frozen_weight_gets_no_gradient_and_hidden_only_is_computed():
    h, W, b, y, _ = make()
    h = h.clone().requires_grad_(True)
    with backend("torch"):
        linear_cross_entropy(h, W, y, b).backward()
    want = grads_of(lambda h_, W_, b_: formula(h_, W_, b_, y), h.detach(), W, b)
    assert W.grad is None and b.grad is None
    assert_close(h.grad, want[1], torch.float64)


def test_no_vocabulary_sized_tensor_is_ever_live():
    """Peak live bytes of loss + backward stay far below one N×V float32 logits tensor."""
    tokens, hidden, vocab = 256, 32, 2048
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g).requires_grad_(True)
    W = (torch.randn(vocab, hidden, generator=g) / 8).requires_grad_(True)
    y = torch.randint(0, vocab, (tokens,), generator=g)
    logits_bytes = tokens * vocab * 4

    def step():
        h.grad = W.grad = None
        linear_cross_entropy(h, W, y, chunk_size=chunk).backward()

    chunk = 16
    with backend("torch"):
        step()
        peak = measure.peak_live_bytes(step)
    floor = h.numel() * 4 + W.numel() * 4  # dh and dW must exist
    assert peak <= floor + 4 * chunk * vocab * 4 + 64 * 1024, (peak, floor)
    assert peak < logits_bytes / 2


def test_all_labels_ignored_is_a_zero_loss_with_zero_gradients():
    h, W, b, y, _ = make()
    y = torch.full_like(y, IGNORE)
    for kind in ("ce", "dft", "talr"):
        with backend("torch"):
            got = grads_of(lambda h_, W_, b_: linear_cross_entropy(h_, W_, y, b_, kind=kind, z_loss=1e-2), h, W, b)
        assert got[0].item() == 0.0
        for grad in got[1:]:
            assert torch.isfinite(grad).all() and (grad == 0).all()
        with backend("torch"):
            assert linear_cross_entropy(h, W, y, b, num_items_in_batch=0).item() == 0.0


def test_bad_input_is_a_clear_error():
    h, W, b, y, _ = make()
    with pytest.raises(ValueError, match="labels have shape"):
        linear_cross_entropy(h, W, y[:, :-1], b)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        linear_cross_entropy(h, W[:20], y.clamp_min(0) + 19, b[:20])
    with pytest.raises(ValueError, match="features but the weight"):
        linear_cross_entropy(h[..., :-1], W, y, b)
    with pytest.raises(TypeError, match="integer tensor"):
        linear_cross_entropy(h, W, y.double(), b)
    with pytest.raises(ValueError, match="needs 2-D labels"):
        linear_cross_entropy(h.view(-1, H), W, y.view(-1), b, kind="talr")
    with pytest.raises(ValueError, match="kind="):
        linear_cross_entropy(h, W, y, b, kind="focal")
    with pytest.raises(ValueError, match="bias must be"):
        linear_cross_entropy(h, W, y, b[:-1])
    with pytest.raises(TypeError, match="cast one to the other"):
        linear_cross_entropy(h.float(), W, y, b)


def test_second_backward_is_refused_clearly():
    h, W, b, y, _ = make()
    h.requires_grad_(True)
    with backend("torch"):
        loss = linear_cross_entropy(h, W, y, b)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


def test_upstream_gradient_scales_the_stored_gradients():
    h, W, b, y, _ = make()
    with backend("torch"):
        got = grads_of(lambda h_, W_, b_: 2.5 * linear_cross_entropy(h_, W_, y, b_, kind="dft"), h, W, b)
    want = grads_of(lambda h_, W_, b_: 2.5 * formula(h_, W_, b_, y, kind="dft"), h, W, b)
    compare(got, want, torch.float64)


def test_default_chunk_size():
    assert default_chunk_size(8192, 4096, 32000) == 512
    assert default_chunk_size(8192, 4096, 152064) == 512
    assert default_chunk_size(100000, 4096, 152064) == 4096
    assert default_chunk_size(3000, 64, 1000) == 256
    assert default_chunk_size(5, 4096, 10) == 5


def test_lowrank_term_matches_the_formula():
    """A LoRA lm_head: logits = h Wᵀ + b + h₂ W₂ᵀ; every input gets its gradient."""
    h, W, b, y, _ = make()
    g = torch.Generator().manual_seed(11)
    h2 = torch.randn(B, T, 3, generator=g, dtype=torch.float64)
    W2 = torch.randn(V, 3, generator=g, dtype=torch.float64)
    options = dict(kind="dft", label_smoothing=0.1, logit_softcap=3.0, z_loss=1e-2)
    identity = torch.eye(V, dtype=torch.float64)
    for reduction in ("mean", "none"):
        upstream = torch.randn(B, T, generator=g, dtype=torch.float64) if reduction == "none" else None
        results = []
        for use_op in (True, False):
            leaves = [t.clone().requires_grad_(True) for t in (h, W, b, h2, W2)]
            if use_op:
                with backend("torch"):
                    loss = linear_cross_entropy(*leaves[:2], y, leaves[2], reduction=reduction, chunk_size=4,
                                                lowrank_hidden=leaves[3], lowrank_weight=leaves[4], **options)
            else:  # the formula on explicit logits (an identity "weight" passes them through)
                logits = leaves[0] @ leaves[1].t() + leaves[2] + leaves[3] @ leaves[4].t()
                loss = formula(logits, identity, None, y, reduction=reduction, **options)
            loss.backward(upstream)
            results.append([loss.detach(), *(t.grad for t in leaves)])
        compare(results[0], results[1], torch.float64, names=("loss", "dh", "dW", "db", "dh2", "dW2"))
    with pytest.raises(ValueError, match="both lowrank_hidden and lowrank_weight"):
        linear_cross_entropy(h, W, y, b, lowrank_hidden=h2)
    with pytest.raises(ValueError, match="lowrank_weight must be"):
        linear_cross_entropy(h, W, y, b, lowrank_hidden=h2, lowrank_weight=W2[:-1])

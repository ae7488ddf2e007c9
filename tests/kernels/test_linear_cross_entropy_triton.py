"""The Triton fused linear cross-entropy kernel against the PyTorch reference pass, under the interpreter.

Shapes cross every tile edge (tokens 37, hidden 40, vocabulary 101 against tiles of 16/32/16). In 16 bits
the hidden states and weights are small multiples of 1/8, so every logit is exact in float16 and bfloat16
(the kernel accumulates in float32 and rounds once, the reference's matmul may round differently on a
non-exact value): the comparison then measures the kernel, not two roundings of the same number.
"""
from __future__ import annotations

import pytest
import torch
from helpers import assert_close, backend, spy_on

from fastft.ops import linear_cross_entropy
from fastft.ops.linear_cross_entropy import reference_pass

kernels = pytest.importorskip("fastft.kernels.linear_cross_entropy")

N, H, V = 37, 40, 101
IGNORE = -100


def make(dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype in (torch.float16, torch.bfloat16):
        h = torch.randint(-2, 3, (N, H), generator=g).double() / 8
        W = torch.randint(-2, 3, (V, H), generator=g).double() / 8
        b = torch.randint(-8, 9, (V,), generator=g).double() / 64 if bias else None
    else:
        h = torch.randn(N, H, generator=g, dtype=torch.float64)
        W = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5
        b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.randperm(N, generator=g)[:5]] = IGNORE
    row_scale = (torch.rand(N, generator=g, dtype=torch.float64) + 0.5) * (labels != IGNORE)
    given = torch.rand(N, generator=g, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return cast(h), cast(W), cast(b), labels, row_scale.to(acc), given.to(acc)


OPTIONS = {
    "plain": dict(label_smoothing=0.0, z_loss=0.0, softcap=None),
    "smoothing-zloss": dict(label_smoothing=0.1, z_loss=1e-2, softcap=None),
    "softcap": dict(label_smoothing=0.0, z_loss=0.0, softcap=2.0),
    "everything": dict(label_smoothing=0.2, z_loss=3e-3, softcap=1.5),
}
CASES = {
    "fp32-ce-plain": (torch.float32, "ce", "plain", True),
    "fp32-dft-everything": (torch.float32, "dft", "everything", True),
    "fp32-given-softcap-nobias": (torch.float32, "given", "softcap", False),
    "fp16-ce-smoothing": (torch.float16, "ce", "smoothing-zloss", True),
    "fp16-dft-softcap": (torch.float16, "dft", "softcap", False),
    "bf16-ce-everything": (torch.bfloat16, "ce", "everything", True),
    "fp64-dft-everything": (torch.float64, "dft", "everything", True),
}


def run_both(dtype, kind, options, bias, need=(True, True, True), splits=None):
    h, W, b, labels, row_scale, given = make(dtype, bias)
    need = (need[0], need[1], need[2] and bias)
    args = (h, W, b, labels, row_scale, given if kind == "given" else None, kind, IGNORE,
            options["label_smoothing"], options["z_loss"], options["softcap"], 8, *need)
    return kernels.fused_pass(*args, vocab_splits=splits), reference_pass(*args)


NAMES = ("lse", "nll", "z_mean", "kind_weight", "dh", "dw", "db")


@pytest.mark.parametrize("name", list(CASES))
def test_fused_pass_matches_reference(name):
    dtype, kind, options, bias = CASES[name]
    got, want = run_both(dtype, kind, OPTIONS[options], bias)
    for what, g, w in zip(NAMES, got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, what
        if g.numel():  # each output at its own dtype's tolerance: the statistics are float32 in 16-bit cases
            assert_close(g, w, msg=what)


@pytest.mark.parametrize("splits", [2, 4])
def test_vocabulary_split_with_atomic_hidden_gradient(splits):
    got, want = run_both(torch.float32, "dft", OPTIONS["everything"], True, splits=splits)
    for what, g, w in zip(NAMES, got, want):
        assert_close(g, w, torch.float32, msg=what)


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, False, False)], ids=["dh", "dw", "db", "stats"])
def test_only_what_is_needed(need):
    got, want = run_both(torch.float32, "ce", OPTIONS["smoothing-zloss"], True, need=need)
    for what, g, w in zip(NAMES, got, want):
        assert g.shape == w.shape, what
        if g.numel():
            assert_close(g, w, torch.float32, msg=what)
    for flag, grad in zip(need, got[4:]):
        assert (grad.numel() > 0) == flag


@pytest.mark.parametrize("kind", ["ce", "dft", "talr"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_op_on_triton_backend_matches_torch_backend(kind, reduction):
    g = torch.Generator().manual_seed(5)
    h = torch.randn(3, 11, 24, generator=g)
    W = torch.randn(53, 24, generator=g) / 5
    b = torch.randn(53, generator=g)
    y = torch.randint(0, 53, (3, 11), generator=g)
    y[0, :4] = IGNORE
    up = torch.randn(3, 11, generator=g)
    results = {}
    for name in ("torch", "triton"):
        leaves = [t.clone().requires_grad_(True) for t in (h, W, b)]
        with backend(name):
            loss = linear_cross_entropy(*leaves[:2], y, leaves[2], kind=kind, reduction=reduction,
                                        label_smoothing=0.1, z_loss=1e-3, logit_softcap=5.0, chunk_size=7)
            loss.backward(up if reduction == "none" else None)
        results[name] = [loss.detach(), *(t.grad for t in leaves)]
    for what, got, want in zip(("loss", "dh", "dW", "db"), results["triton"], results["torch"]):
        assert_close(got, want, torch.float32, msg=what)


def test_op_on_triton_backend_against_the_float64_formula(monkeypatch):
    """The op through the Triton backend (the chunk kernel's launches recorded, so it cannot fall back), over
    several chunks, against cross-entropy in float64."""
    g = torch.Generator().manual_seed(6)
    h = torch.randn(2, 13, 24, generator=g)
    W = torch.randn(53, 24, generator=g) / 5
    b = torch.randn(53, generator=g)
    y = torch.randint(0, 53, (2, 13), generator=g)
    y[0, :3] = IGNORE
    spy = spy_on(monkeypatch, kernels, "_chunk_loss_kernel")
    leaves = [t.clone().requires_grad_(True) for t in (h, W, b)]
    with backend("triton"):
        loss = linear_cross_entropy(*leaves[:2], y, leaves[2], chunk_size=7)
        loss.backward()
    assert len(spy.grids) >= 4  # 26 tokens in chunks of 7: one launch per chunk
    wide = [t.double().requires_grad_(True) for t in (h, W, b)]
    logits = wide[0].reshape(-1, 24) @ wide[1].t() + wide[2]
    want = torch.nn.functional.cross_entropy(logits, y.reshape(-1), ignore_index=IGNORE)
    want.backward()
    assert_close(loss.detach(), want.float(), msg="loss")
    for what, got, ref in zip(("dh", "dW", "db"), leaves, wide):
        assert_close(got.grad, ref.grad.float(), msg=what)


def test_no_tokens():
    h, W, b, labels, row_scale, _ = make(torch.float32)
    got = kernels.fused_pass(h[:0], W, b, labels[:0], row_scale[:0], None, "ce", IGNORE, 0.0, 0.0, None, 8,
                             True, True, True)
    assert got[0].shape == (0,) and got[4].shape == (0, H)
    assert (got[5] == 0).all() and (got[6] == 0).all()


@pytest.mark.parametrize("dtype,splits", [(torch.float32, None), (torch.float16, None), (torch.float32, 3)],
                         ids=["fp32", "fp16", "fp32-split"])
def test_lowrank_term(dtype, splits):
    """A LoRA lm_head: logits += h₂ W₂ᵀ (rank 5, under one BLOCK_R), with dh₂ and dW₂."""
    h, W, b, labels, row_scale, _ = make(dtype, True)
    g = torch.Generator().manual_seed(9)
    h2 = (torch.randint(-2, 3, (N, 5), generator=g).double() / 8).to(dtype)
    W2 = (torch.randint(-2, 3, (V, 5), generator=g).double() / 8).to(dtype)
    args = (h, W, b, labels, row_scale, None, "dft", IGNORE, 0.1, 1e-3, 2.0, 8, True, False, True)
    lowrank = dict(hidden2=h2, weight2=W2, need_dh2=True, need_dw2=True)
    got = kernels.fused_pass(*args, **lowrank, vocab_splits=splits)
    want = reference_pass(*args, **lowrank)
    for what, g_, w in zip(NAMES + ("dh2", "dw2"), got, want):
        assert g_.shape == w.shape, what
        if g_.numel():
            assert_close(g_, w, dtype, msg=what)

"""The chunked loss kernel (``fastft.kernels.linear_cross_entropy.chunk_loss``) under the interpreter.

One Triton launch over a C×V logits chunk writes lse, nll, the mean logit and the kind weight per row and
overwrites the logits with the logit gradient in place. Checked here against the PyTorch reference of the
op (float32, every kind, label smoothing, z-loss, softcap, ignore_index, row scales), and the whole pass
(cuBLAS products + this kernel, no float atomics) for bitwise determinism and against the reference op
for every reduction.
"""
from __future__ import annotations

import pytest
import torch
from helpers import assert_close, backend

from fastft.ops import linear_cross_entropy
from fastft.ops.linear_cross_entropy import reference_pass

kernels = pytest.importorskip("fastft.kernels.linear_cross_entropy")

N, H, V = 29, 24, 77  # V crosses the interpreter's 32-wide vocabulary tiles
IGNORE = -100
OPTIONS = {
    "plain": (0.0, 0.0, None),
    "smoothing": (0.1, 0.0, None),
    "zloss": (0.0, 1e-2, None),
    "softcap": (0.0, 0.0, 2.0),
    "everything": (0.2, 3e-3, 1.5),
}


def make(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype)
    W = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    b = torch.randn(V, generator=g).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.randperm(N, generator=g)[:6]] = IGNORE
    row_scale = (torch.rand(N, generator=g) + 0.5) * (labels != IGNORE)
    given = torch.rand(N, generator=g)
    return h, W, b, labels, row_scale, given


@pytest.mark.parametrize("kind", ["ce", "dft", "given"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_kernel_matches_reference_on_one_chunk(kind, option):
    """The kernel's statistics and in-place gradient equal the reference's (whose dh = g W, so g W is checked
    through dh; the logit gradient itself by one product with the identity)."""
    smoothing, zloss, softcap = OPTIONS[option]
    h, W, b, labels, row_scale, given = make()
    logits = torch.addmm(b, h, W.t())
    stats = [torch.empty(N) for _ in range(3)]
    kind_weight = given.clone() if kind == "given" else torch.empty(N)
    kernels.chunk_loss(logits, labels, row_scale, kind, IGNORE, smoothing, zloss, softcap, True, *stats, kind_weight)
    # the reference's gradient wrt the logits: its dh for hidden = identity rows over a weight = logits' inputs
    eye = torch.eye(V)
    ref_logits = torch.addmm(b, h, W.t())
    # reference with hidden = the logits themselves through an identity lm_head gives the same z
    ref = reference_pass(ref_logits, eye, None, labels, row_scale, given if kind == "given" else None, kind,
                         IGNORE, smoothing, zloss, softcap, 8, True, False, False)
    assert_close(stats[0], ref.lse, msg="lse")
    assert_close(stats[1], ref.nll, msg="nll")
    if smoothing:
        assert_close(stats[2], ref.z_mean, msg="z_mean")
    assert_close(kind_weight, ref.kind_weight, msg="kind_weight")
    assert_close(logits, ref.dh, msg="dlogits")  # dh = g · I
    assert torch.all(logits[labels == IGNORE] == 0), "ignored rows get no gradient"


def test_statistics_only_leaves_the_logits():
    h, W, b, labels, row_scale, _ = make()
    logits = torch.addmm(b, h, W.t())
    before = logits.clone()
    stats = [torch.empty(N) for _ in range(4)]
    kernels.chunk_loss(logits, labels, row_scale, "ce", IGNORE, 0.0, 0.0, None, False, *stats)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("option", ["plain", "everything"])
def test_pass_matches_reference(dtype, option):
    smoothing, zloss, softcap = OPTIONS[option]
    h, W, b, labels, row_scale, _ = make(1, dtype)
    args = (h, W, b, labels, row_scale, None, "dft", IGNORE, smoothing, zloss, softcap, 8, True, True, True)
    got, ref = kernels.fused_pass(*args), reference_pass(*args)
    for name, a, e in zip(("lse", "nll", "z_mean", "kind_weight", "dh", "dw", "db"), got, ref):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert_close(a, e, msg=name)


def test_pass_is_bitwise_deterministic():
    h, W, b, labels, row_scale, _ = make(2)
    h2, W2 = torch.randn(N, 4), torch.randn(V, 4)
    args = (h, W, b, labels, row_scale, None, "ce", IGNORE, 0.1, 1e-3, 3.0, 8, True, True, True)
    first = kernels.fused_pass(*args, hidden2=h2, weight2=W2, need_dh2=True, need_dw2=True)
    second = kernels.fused_pass(*args, hidden2=h2, weight2=W2, need_dh2=True, need_dw2=True)
    for a, e in zip(first, second):
        assert torch.equal(a, e)


def test_chunk_rows_respects_the_cap_and_the_free_memory(monkeypatch):
    assert kernels.chunk_rows(1000, 50, torch.float32, torch.device("cpu"), 64) == 64
    assert kernels.chunk_rows(10, 50, torch.float32, torch.device("cpu"), 64) == 10
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 128 * 1000 * 4, 1 << 40))
    # a quarter of the free memory holds 128 rows of 1000 float32 logits (a multiple of 16)
    assert kernels.chunk_rows(100000, 1000, torch.float32, torch.device("cuda", 0), 4096) == 128


@pytest.mark.parametrize("kind", ["ce", "dft", "talr"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_op_every_reduction_matches_torch_backend(kind, reduction):
    g = torch.Generator().manual_seed(5)
    h = torch.randn(3, 9, H, generator=g)
    W = torch.randn(V, H, generator=g) / H ** 0.5
    labels = torch.randint(0, V, (3, 9), generator=g)
    labels[0, :4] = IGNORE
    weights = torch.rand(3, 9, generator=g)
    results = []
    for name in ("torch", "triton"):
        hs, Ws = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
        with backend(name):
            loss = linear_cross_entropy(hs, Ws, labels, kind=kind, reduction=reduction, token_weights=weights,
                                        label_smoothing=0.1, z_loss=1e-3, logit_softcap=4.0, chunk_size=8)
            (loss if reduction != "none" else (loss * torch.linspace(0, 1, 27).view(3, 9)).sum()).sum().backward()
        results.append((loss.detach(), hs.grad, Ws.grad))
    for a, e in zip(*results):
        assert_close(a, e)

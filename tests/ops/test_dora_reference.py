"""The DoRA ops' PyTorch reference against a float64 autograd evaluation of the DoRA formula."""
import math

import pytest
import torch
from helpers import assert_close, backend

from fastft.ops.dora import NORM_EPS, dora_linear, dora_row_norm

N, K, O, R = 13, 24, 19, 5


def formula(x, W, b, A, B, m, s, mask, p, detach_norm, eps=None):
    """PEFT's DoRA by plain autograd: the full matrix W + s·BA and its row norms, as PEFT computes them
    (``eps``: fastft's guard, ``max(n, eps)``)."""
    n = torch.linalg.vector_norm(W + s * B @ A, dim=1)
    if eps is not None:
        n = n.clamp_min(eps)
    g = m / (n.detach() if detach_norm else n)
    x_low = x if mask is None else x * mask / (1.0 - p)
    lowrank = s * (x_low @ A.t()) @ B.t()
    if mask is None:
        y = g * (x @ W.t() + lowrank)
    else:
        y = x @ W.t() + (g - 1) * (x_low @ W.t()) + g * lowrank
    return y if b is None else y + b


def op(x, W, b, A, B, m, s, mask, p, detach_norm):
    """What DoRALinear does with the ops: the row norm, g = m / n, the DoRA linear."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    sq = torch.linalg.vector_norm(W.to(dtype), dim=1) ** 2
    if detach_norm:
        with torch.no_grad():
            n = dora_row_norm(W, A.detach(), B.detach(), sq, s)
    else:
        n = dora_row_norm(W, A, B, sq, s)
    return dora_linear(x, W, b, A, B, m.to(dtype) / n, s, dropout_p=p, dropout_mask=mask)


def make(dtype, bias=True, dropout=0.0, lead=(N,), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g, dtype=torch.float64)
    W = torch.randn(O, K, generator=g, dtype=torch.float64) / math.sqrt(K)
    b = torch.randn(O, generator=g, dtype=torch.float64) if bias else None
    A = torch.randn(R, K, generator=g, dtype=torch.float64) / math.sqrt(K)
    B = torch.randn(O, R, generator=g, dtype=torch.float64) * 0.3
    m = torch.rand(O, generator=g, dtype=torch.float64) + 0.5
    mask = (torch.rand(*lead, K, generator=g) >= dropout) if dropout else None
    grad = torch.randn(*lead, O, generator=g, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(W), cast(b), cast(A), cast(B), cast(m), mask, cast(grad)


def run(fn, x, W, b, A, B, m, s, mask, p, grad, detach_norm, train_a=True, **kwargs):
    x = x.clone().requires_grad_(True)
    A = A.clone().requires_grad_(train_a)
    B = B.clone().requires_grad_(True)
    m = m.clone().requires_grad_(True)
    y = fn(x, W, b, A, B, m, s, mask, p, detach_norm, **kwargs)
    y.backward(grad)
    return y.detach(), x.grad, A.grad, B.grad, m.grad


CASES = [
    dict(bias=True, dropout=0.0, scale=2.0),
    dict(bias=False, dropout=0.0, scale=2.0),
    dict(bias=True, dropout=0.3, scale=2.0),
    dict(bias=True, dropout=0.0, scale=32 / math.sqrt(R)),  # rslora: alpha / sqrt(r)
    dict(bias=True, dropout=0.0, scale=2.0, train_a=False),
    dict(bias=False, dropout=0.3, scale=2.0, train_a=False),
]


def case_id(c):
    return f"bias{c['bias']}-p{c['dropout']}-s{c['scale']:.3g}" + ("-frozenA" if c.get("train_a") is False else "")


@pytest.mark.parametrize("detach_norm", [True, False], ids=["detached", "exact"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_matches_float64_formula(case, dtype, detach_norm):
    x, W, b, A, B, m, mask, grad = make(dtype, bias=case["bias"], dropout=case["dropout"])
    p, s, train_a = case["dropout"], case["scale"], case.get("train_a", True)
    with backend("torch"):
        got = run(op, x, W, b, A, B, m, s, mask, p, grad, detach_norm, train_a)
    up = lambda t: None if t is None else t.double()  # noqa: E731
    want = run(formula, up(x), up(W), up(b), up(A), up(B), up(m), s, mask, p, up(grad), detach_norm, train_a)
    for name, g, w in zip(("y", "dx", "dA", "dB", "dm"), got, want):
        if w is None:
            assert g is None, name
            continue
        assert g.dtype == dtype, name
        assert_close(g, w, dtype, msg=name)


def test_exact_and_detached_gradients_differ_only_in_A_and_B():
    x, W, b, A, B, m, mask, grad = make(torch.float64)
    with backend("torch"):
        detached = run(op, x, W, b, A, B, m, 2.0, None, 0.0, grad, True)
        exact = run(op, x, W, b, A, B, m, 2.0, None, 0.0, grad, False)
    for name, d, e in zip(("y", "dx", "dm"), (detached[0], detached[1], detached[4]), (exact[0], exact[1], exact[4])):
        assert_close(d, e, msg=name)
    assert (detached[2] - exact[2]).abs().max() > 1e-3 and (detached[3] - exact[3]).abs().max() > 1e-3


def test_row_norm_equals_the_norm_of_the_full_matrix():
    x, W, b, A, B, m, mask, grad = make(torch.float64)
    sq = (W * W).sum(1)
    with backend("torch"):
        n = dora_row_norm(W, A, B, sq, 1.7)
    assert_close(n, torch.linalg.vector_norm(W + 1.7 * B @ A, dim=1))


def saved_activation_shapes(fn):
    saved = []
    with backend("torch"), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return saved, out


@pytest.mark.parametrize("bias", [False, True])
def test_saves_x_xa_the_output_and_vectors_only(bias):
    """x, x·Aᵀ, the pre-scale output z (a buffer of its own: never the returned y, which the model may modify
    in place) and g; no BA."""
    x, W, b, A, B, m, mask, grad = make(torch.float32, bias=bias)
    params = [W, A.requires_grad_(True), B.requires_grad_(True), m.requires_grad_(True)] + ([b] if bias else [])
    saved, y = saved_activation_shapes(lambda: op(x.requires_grad_(True), W, b, A, B, m, 2.0, None, 0.0, True))
    weights = {t.data_ptr() for t in params}
    activations = [t for t in saved if t.data_ptr() not in weights]
    assert sorted(tuple(t.shape) for t in activations) == sorted([(N, K), (N, R), (N, O), (O,), (O,)])
    output = [t for t in activations if tuple(t.shape) == (N, O)]
    assert output[0].untyped_storage().data_ptr() != y.untyped_storage().data_ptr()  # never y itself


def test_with_dropout_or_frozen_A_the_pre_scale_output_is_saved_instead():
    x, W, b, A, B, m, mask, grad = make(torch.float32, dropout=0.3)
    A.requires_grad_(False)
    B.requires_grad_(True)
    m.requires_grad_(True)
    weights = {t.data_ptr() for t in (W, A, B, m, b)}
    saved, y = saved_activation_shapes(lambda: op(x, W, b, A, B, m, 2.0, None, 0.0, True))
    shapes = sorted(tuple(t.shape) for t in saved if t.data_ptr() not in weights)
    assert shapes == sorted([(N, R), (N, O), (O,), (O,)])  # x·Aᵀ, z, g (and m / n's n): x is not needed
    z = [t for t in saved if tuple(t.shape) == (N, O)][0]
    assert z.untyped_storage().data_ptr() != y.untyped_storage().data_ptr()
    A.requires_grad_(True)
    saved, _ = saved_activation_shapes(lambda: op(x, W, b, A, B, m, 2.0, mask, 0.3, True))
    shapes = sorted(tuple(t.shape) for t in saved if t.data_ptr() not in weights)
    assert shapes == sorted([(N, K), (N, R), (N, O), (N, K), (O,), (O,)])  # x, x̃·Aᵀ, z, mask, g, n


def test_half_precision_output_with_bias_keeps_the_pre_scale_output():
    """(y - b) / g would lose precision to a large bias in a 16-bit y: z is kept instead."""
    x, W, b, A, B, m, mask, grad = make(torch.bfloat16)
    weights = {t.data_ptr() for t in (W, A.requires_grad_(True), B.requires_grad_(True), m.requires_grad_(True), b)}
    saved, y = saved_activation_shapes(lambda: op(x, W, b, A, B, m, 2.0, None, 0.0, True))
    outputs = [t for t in saved if t.data_ptr() not in weights and tuple(t.shape) == (N, O)]
    assert len(outputs) == 1 and outputs[0].untyped_storage().data_ptr() != y.untyped_storage().data_ptr()


@pytest.mark.parametrize("detach_norm", [True, False], ids=["detached", "exact"])
def test_zero_weight_row_and_zero_magnitude_stay_finite_and_exact(detach_norm):
    """Row 0: W and B zero (norm 0: n = eps); row 1: magnitude 0 (g = 0: y says nothing about z there)."""
    x, W, b, A, B, m, mask, grad = make(torch.float64)
    W[0] = 0.0
    B[0] = 0.0
    m[0] = NORM_EPS  # what DoRALinear initialises a zero row's magnitude to: g = 1
    m[1] = 0.0
    with backend("torch"):
        got = run(op, x, W, b, A, B, m, 2.0, None, 0.0, grad, detach_norm)
    for name, t in zip(("y", "dx", "dA", "dB", "dm"), got):
        assert torch.isfinite(t).all(), name
    peft_like = run(formula, x, W, b, A, B, m, 2.0, None, 0.0, grad, detach_norm)
    assert torch.isnan(peft_like[0][:, 0]).all()  # the unguarded norm is 0 in row 0: 0/0
    want = run(formula, x, W, b, A, B, m, 2.0, None, 0.0, grad, detach_norm, eps=NORM_EPS)
    for name, g, w in zip(("y", "dx", "dA", "dB", "dm"), got, want):
        assert_close(g, w, msg=name)  # dm[1] is recomputed from x, W, x·Aᵀ and B for the g = 0 row
    assert_close(got[0][:, 0], b[0].expand(N), msg="the zero row gives its bias")
    assert_close(got[0][:, 1], b[1].expand(N), msg="the zero-magnitude row gives its bias")
    assert got[4][1] != 0.0


def test_leading_dimensions_and_wrong_shapes():
    x, W, b, A, B, m, mask, grad = make(torch.float64, lead=(2, 3, 4))
    with backend("torch"):
        y = op(x, W, b, A, B, m, 1.5, None, 0.0, True)
    assert y.shape == (2, 3, 4, O)
    assert_close(y, formula(x, W, b, A, B, m, 1.5, None, 0.0, True))
    with pytest.raises(ValueError, match="last dimension is 23"):
        dora_linear(x[..., :23], W, b, A, B, m, 1.5)
    with pytest.raises(ValueError, match="g must have shape"):
        dora_linear(x, W, b, A, B, m[:-1], 1.5)

"""The LoRA op's PyTorch reference against a float64 autograd evaluation of its formula."""
import math

import pytest
import torch
from helpers import assert_close, backend

from fastft.ops import lora_linear

N, K, O = 13, 24, 19


def formula(x, W, b, A, B, s, mask, p):
    """y = x Wᵀ + b + s · (x ⊙ m / (1-p)) Aᵀ Bᵀ, evaluated by plain autograd."""
    x_low = x if mask is None else x * mask / (1.0 - p)
    y = x @ W.t() + s * (x_low @ A.t()) @ B.t()
    return y if b is None else y + b


def make(dtype, bias=True, dropout=0.0, r=5, lead=(N,), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g, dtype=torch.float64)
    W = torch.randn(O, K, generator=g, dtype=torch.float64) / math.sqrt(K)
    b = torch.randn(O, generator=g, dtype=torch.float64) if bias else None
    A = torch.randn(r, K, generator=g, dtype=torch.float64) / math.sqrt(K)
    B = torch.randn(O, r, generator=g, dtype=torch.float64)
    mask = (torch.rand(*lead, K, generator=g) >= dropout) if dropout else None
    grad = torch.randn(*lead, O, generator=g, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(W), cast(b), cast(A), cast(B), mask, cast(grad)


def run(fn, x, W, b, A, B, s, mask, p, grad, train_a=True):
    x = x.clone().requires_grad_(True)
    A = A.clone().requires_grad_(train_a)
    B = B.clone().requires_grad_(True)
    y = fn(x, W, b, A, B, s, mask, p)
    y.backward(grad)
    return y.detach(), x.grad, A.grad, B.grad


def op(x, W, b, A, B, s, mask, p):
    return lora_linear(x, W, b, A, B, s, dropout_p=p, dropout_mask=mask)


CASES = [
    dict(bias=True, dropout=0.0, scale=2.0),
    dict(bias=False, dropout=0.0, scale=2.0),
    dict(bias=True, dropout=0.3, scale=2.0),
    dict(bias=True, dropout=0.0, scale=32 / math.sqrt(5)),  # rslora scale with r=5, alpha=32
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"bias{c['bias']}-p{c['dropout']}-s{c['scale']:.3g}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_matches_float64_formula(case, dtype):
    x, W, b, A, B, mask, grad = make(dtype, bias=case["bias"], dropout=case["dropout"])
    p, s = case["dropout"], case["scale"]
    with backend("torch"):
        got = run(op, x, W, b, A, B, s, mask, p, grad)
    up = lambda t: None if t is None else t.double()  # noqa: E731
    want = run(formula, up(x), up(W), up(b), up(A), up(B), s, mask, p, up(grad))
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, want):
        assert g.dtype == dtype
        assert_close(g, w, dtype, msg=name)


def test_frozen_A_gets_no_gradient_and_only_xa_is_saved():
    x, W, b, A, B, mask, grad = make(torch.float64)
    saved = []
    x.requires_grad_(True)
    B.requires_grad_(True)
    with backend("torch"), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lora_linear(x, W, b, A, B, 2.0)
    y.backward(grad)
    weights = {W.data_ptr(), A.data_ptr(), B.data_ptr()}
    assert [tuple(t.shape) for t in saved if t.data_ptr() not in weights] == [(N, 5)]  # x·Aᵀ alone
    assert A.grad is None
    want = run(formula, x.detach(), W, b, A, B.detach(), 2.0, None, 0.0, grad, train_a=False)
    assert_close(y.detach(), want[0])
    assert_close(x.grad, want[1])
    assert_close(B.grad, want[3])


def test_saved_tensors_are_x_and_xa_only():
    x, W, b, A, B, mask, grad = make(torch.float32)
    saved = []
    with backend("torch"), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_linear(x.requires_grad_(True), W, b, A.requires_grad_(True), B.requires_grad_(True), 2.0)
    weights = {W.data_ptr(), A.data_ptr(), B.data_ptr()}
    activations = sorted(tuple(t.shape) for t in saved if t.data_ptr() not in weights)
    assert activations == sorted([(N, K), (N, 5)])  # x and x·Aᵀ; not y, not the dropped x


def test_leading_dimensions_and_wrong_width():
    x, W, b, A, B, mask, grad = make(torch.float64, lead=(2, 3, 4))
    with backend("torch"):
        y = lora_linear(x, W, b, A, B, 1.5)
    assert y.shape == (2, 3, 4, O)
    assert_close(y, formula(x, W, b, A, B, 1.5, None, 0.0))
    with pytest.raises(ValueError, match="last dimension is 23"):
        lora_linear(x[..., :23], W, b, A, B, 1.5)


def test_no_input_grad_skips_dx():
    x, W, b, A, B, mask, grad = make(torch.float64)
    A.requires_grad_(True)
    B.requires_grad_(True)
    with backend("torch"):
        y = lora_linear(x, W, b, A, B, 2.0)
    y.backward(grad)
    want = run(formula, x, W, b, A.detach(), B.detach(), 2.0, None, 0.0, grad)
    assert_close(A.grad, want[2])
    assert_close(B.grad, want[3])

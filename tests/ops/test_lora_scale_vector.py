"""The LoRA op's trainable diagonal (``scale_vector``, LoLDU): y = x Wᵀ + b + s·((x̃ Aᵀ) ⊙ d) Bᵀ.

The op's reference against a float64 autograd evaluation of the formula (y, dx, dA, dB, dd), the eager and
custom-op routes against each other, and the Triton backend (interpreter) against the torch backend.
"""
import math

import pytest
import torch
from helpers import assert_close, backend

from fastft.ops import lora_linear
from fastft.ops import lora as lora_ops

N, K, O, R = 13, 24, 19, 5


def formula(x, W, b, A, B, d, s, mask, p):
    x_low = x if mask is None else x * mask / (1.0 - p)
    y = x @ W.t() + s * ((x_low @ A.t()) * d) @ B.t()
    return y if b is None else y + b


def make(dtype, dropout=0.0, lead=(N,), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g, dtype=torch.float64)
    W = torch.randn(O, K, generator=g, dtype=torch.float64) / math.sqrt(K)
    b = torch.randn(O, generator=g, dtype=torch.float64)
    A = torch.randn(R, K, generator=g, dtype=torch.float64) / math.sqrt(K)
    B = torch.randn(O, R, generator=g, dtype=torch.float64)
    d = torch.randn(R, generator=g, dtype=torch.float64)
    mask = (torch.rand(*lead, K, generator=g) >= dropout) if dropout else None
    grad = torch.randn(*lead, O, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (x, W, b, A, B, d)], mask, grad.to(dtype)


def run(fn, tensors, s, mask, p, grad, trains=(True, True, True, True)):
    x, W, b, A, B, d = tensors
    leaves = [t.clone().requires_grad_(flag) for t, flag in zip((x, A, B, d), trains)]
    y = fn(leaves[0], W, b, leaves[1], leaves[2], leaves[3], s, mask, p)
    y.backward(grad)
    return [y.detach()] + [t.grad for t in leaves]


def op(x, W, b, A, B, d, s, mask, p):
    return lora_linear(x, W, b, A, B, s, dropout_p=p, dropout_mask=mask, scale_vector=d)


@pytest.mark.parametrize("trains", [(True, True, True, True), (True, False, False, True), (False, False, False, True)],
                         ids=["all", "loldu", "d-only"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_matches_float64_formula(dtype, dropout, trains):
    tensors, mask, grad = make(dtype, dropout=dropout)
    with backend("torch"):
        got = run(op, tensors, 1.7, mask, dropout, grad, trains)
    want = run(formula, [t.double() for t in tensors], 1.7, mask, dropout, grad.double(), trains)
    for name, g, w, flag in zip(("y", "dx", "dA", "dB", "dd"), got, want, (True,) + trains):
        if not flag:
            assert g is None and w is None, name
            continue
        assert g.dtype == dtype
        assert_close(g, w, dtype, msg=name)


def test_custom_op_route_equals_eager_route_and_3d_input():
    tensors, _, _ = make(torch.float64, lead=(2, 7))
    grad = torch.randn(2, 7, O, dtype=torch.float64)
    x, W, b, A, B, d = tensors
    results = []
    for custom in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (x, A, B, d)]
        if custom:  # the torch.library op (what torch.compile traces)
            y, _ = lora_ops._lora_linear_op(leaves[0].reshape(-1, K), W, None, None, 0, O, b, leaves[1], leaves[2],
                                            1.3, None, 0.0, leaves[3])
            y = y.reshape(2, 7, O)
        else:
            y = lora_linear(leaves[0], W, b, leaves[1], leaves[2], 1.3, scale_vector=leaves[3])
        y.backward(grad)
        results.append([y.detach()] + [t.grad for t in leaves])
    for got, want in zip(*results):
        assert_close(got, want)


def test_no_vector_is_plain_lora_and_bad_shape_raises():
    tensors, _, _ = make(torch.float64)
    x, W, b, A, B, d = tensors
    ones = torch.ones(R, dtype=torch.float64)
    assert_close(lora_linear(x, W, b, A, B, 0.9, scale_vector=ones), lora_linear(x, W, b, A, B, 0.9))
    with pytest.raises(ValueError, match="scale_vector"):
        lora_linear(x, W, b, A, B, 0.9, scale_vector=torch.ones(R + 1, dtype=torch.float64))


def test_triton_backend_equals_torch_backend():
    pytest.importorskip("fastft.kernels.lora")
    tensors, mask, grad = make(torch.float32, dropout=0.5, lead=(3, 5))
    results = {}
    for name in ("torch", "triton"):
        with backend(name):
            results[name] = run(op, tensors, 0.7, mask, 0.5, grad)
    for got, ref, what in zip(results["triton"], results["torch"], "y dx dA dB dd".split()):
        assert_close(got, ref, msg=what)

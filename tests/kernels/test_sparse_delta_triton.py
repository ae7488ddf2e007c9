"""The Triton sparse-delta kernels (fastft.kernels.sparse_delta) against the PyTorch reference op, under the
interpreter, in float32 and float16 (the kernels hold no ``tl.dot``, so bfloat16 is checked too).

Shapes cross the interpreter's 16-wide blocks (tokens 37, in 70, out 45) and the supports include a row
with more slots than a block (the CSR loop runs several steps), empty rows and columns, and k = 0.
"""
from __future__ import annotations

import pytest
import torch
from helpers import assert_close, backend

import fastft
from fastft.ops.sparse_delta_linear import (
    sampled_gradient_reference, sparse_delta_backward_reference, sparse_delta_forward_reference, sparse_delta_linear,
    sparse_support,
)

kernels = pytest.importorskip("fastft.kernels.sparse_delta")

TOKENS, IN, OUT = 37, 70, 45
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make(dtype, k=150, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, IN, generator=gen).to(dtype)
    W = (torch.randn(OUT, IN, generator=gen) * IN**-0.5).to(dtype)
    b = (torch.randn(OUT, generator=gen) * 0.5).to(dtype) if bias else None
    g = torch.randn(TOKENS, OUT, generator=gen).to(dtype)
    chosen = torch.randperm(OUT * IN, generator=gen)[:k]
    dense_row = torch.arange(3 * IN, 3 * IN + 40)  # row 3: 40 slots, more than one BLOCK_J step
    idx = torch.cat([chosen, dense_row]).unique()
    idx = idx[(idx // IN != 7)]  # row 7 empty
    v = torch.randn(idx.numel(), generator=gen).to(dtype)
    return x, W, b, g, idx, v


def args(idx, v):
    s = sparse_support(idx, (OUT, IN))
    return (v, *s.tensors())


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_matches_reference(dtype, bias):
    x, W, b, _, idx, v = make(dtype, bias=bias)
    y = kernels.sparse_delta_forward(x, W, None, None, 0, OUT, b, *args(idx, v), False)
    y_ref = sparse_delta_forward_reference(x, W, None, None, 0, OUT, b, *args(idx, v), False)
    assert y.dtype == dtype
    assert_close(y, y_ref, msg="y")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_matches_reference(dtype):
    x, W, _, g, idx, v = make(dtype)
    dx, dv = kernels.sparse_delta_backward(g, x, W, None, None, 0, IN, *args(idx, v), False, True, True)
    dx_ref, dv_ref = sparse_delta_backward_reference(g, x, W, None, None, 0, IN, *args(idx, v), False, True, True)
    assert dx.dtype == dtype and dv.dtype == dtype and dv.shape == (idx.numel(),)
    assert_close(dx, dx_ref, msg="dx")
    assert_close(dv, dv_ref, msg="dv")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_sddmm_and_csc_alone(dtype):
    x, W, _, g, idx, v = make(dtype, k=90, seed=3)
    s = sparse_support(idx, (OUT, IN))
    assert_close(kernels.sampled_gradient(g, x, s.rows, s.cols), sampled_gradient_reference(g, x, s.rows, s.cols))
    out = torch.zeros(TOKENS, IN, dtype=dtype)
    kernels.gather_columns(out, g, s.col_ptr, s.col_order, s.rows, v)
    delta = torch.zeros(OUT * IN, dtype=torch.float64)
    delta[idx] = v.double()
    assert_close(out, g.double() @ delta.view(OUT, IN), dtype)


def test_dense_path_and_k_zero():
    x, W, b, g, idx, v = make(torch.float32)
    y = kernels.sparse_delta_forward(x, W, None, None, 0, OUT, b, *args(idx, v), True)
    assert_close(y, sparse_delta_forward_reference(x, W, None, None, 0, OUT, b, *args(idx, v), False))
    dx, _ = kernels.sparse_delta_backward(g, x, W, None, None, 0, IN, *args(idx, v), True, True, False)
    assert_close(dx, sparse_delta_backward_reference(g, x, W, None, None, 0, IN, *args(idx, v), False, True, False)[0])
    empty = torch.zeros(0, dtype=torch.int64)
    y0 = kernels.sparse_delta_forward(x, W, None, None, 0, OUT, b, *args(empty, v[:0]), False)
    assert_close(y0, torch.nn.functional.linear(x, W, b))
    dx0, dv0 = kernels.sparse_delta_backward(g, x, W, None, None, 0, IN, *args(empty, v[:0]), False, True, True)
    assert_close(dx0, g @ W) and dv0.shape == (0,)


def test_op_and_layer_run_on_the_triton_backend():
    """Through the op's autograd (custom op -> dispatch -> kernels) and SparseDeltaLinear, 3-D input."""
    x, W, b, _, idx, v = make(torch.float32)
    x3 = x[:18].reshape(2, 9, IN)
    results = {}
    for name in ("torch", "triton"):
        xi, vi = x3.clone().requires_grad_(True), v.clone().requires_grad_(True)
        with backend(name):
            y = sparse_delta_linear(xi, W, b, idx, vi, dense=False)
            y.backward(torch.ones_like(y))
        results[name] = (y.detach(), xi.grad, vi.grad)
    for got, want in zip(results["triton"], results["torch"]):
        assert_close(got, want)
    layer = fastft.nn.SparseDeltaLinear(torch.nn.Linear(IN, OUT), idx, v)
    with backend("triton"):
        got = layer(x3)
    with backend("torch"):
        assert_close(got, layer(x3))

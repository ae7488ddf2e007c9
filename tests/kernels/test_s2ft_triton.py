"""The Triton S²FT kernels (fastft.kernels.s2ft) against the PyTorch reference op, under the interpreter.

Shapes are not multiples of any block size (tokens 37, in 70, out 45; slices of 5 and 33 cross one or
two 32-wide tiles), so every edge mask is exercised. bfloat16 runs with the dot operands upcast (the
interpreter's bf16 ``tl.dot`` is wrong); x_slice must be a bit-exact copy of x in every dtype.
"""
from __future__ import annotations

import pytest
import torch
from helpers import assert_close, backend, interpreter_splits, spy_on

from fastft.ops.s2ft_linear import s2ft_backward_reference, s2ft_forward_reference, s2ft_linear

s2ft_kernels = pytest.importorskip("fastft.kernels.s2ft")

TOKENS, IN, OUT = 37, 70, 45
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def make(dtype, bias=True, seed=0, tokens=TOKENS):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, IN, generator=gen).to(dtype)
    W = (torch.randn(OUT, IN, generator=gen) * IN**-0.5).to(dtype)
    b = (torch.randn(OUT, generator=gen) * 0.5).to(dtype) if bias else None
    g = torch.randn(tokens, OUT, generator=gen).to(dtype)
    return x, W, b, g


@pytest.mark.parametrize("width", [5, 33, IN])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_saves_the_slice_while_computing_y(dtype, width):
    x, W, b, _ = make(dtype, bias=width != 33)
    y, x_slice = s2ft_kernels.linear_saving_slice(x, W, b, width)
    y_ref, x_slice_ref = s2ft_forward_reference(x, W, b, width, rows=False, save_slice=True)
    assert y.dtype == dtype and x_slice.shape == (TOKENS, width)
    assert torch.equal(x_slice, x_slice_ref)
    assert_close(y, y_ref, msg="y")


@pytest.mark.parametrize("rows,width", [(False, 5), (False, 33), (True, 7), (True, OUT)], ids=["cols5", "cols33", "rows7", "rows-all"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_slice_gradient_matches_reference(dtype, rows, width):
    x, W, _, g = make(dtype)
    saved = x if rows else x[:, :width].contiguous()
    dw = s2ft_kernels.slice_weight_grad(g, saved, width, rows)
    _, dw_ref = s2ft_backward_reference(g, saved, W, width, rows, need_dx=False, need_dw=True)
    assert dw.shape == dw_ref.shape and dw.dtype == dtype
    # the reference rounds once in float16/bfloat16 too (one mm): the kernel's float32 accumulation matches it
    assert_close(dw, dw_ref, msg="dW slice")


@pytest.mark.parametrize("split", [2, 3, 5])
def test_token_split_partials_sum_to_the_same_gradient(split):
    x, _, _, g = make(torch.float32)
    got = s2ft_kernels.slice_weight_grad(g, x[:, :9].contiguous(), 9, rows=False, split=split)
    assert_close(got, g.t() @ x[:, :9])


def test_no_tokens_and_mismatched_operands():
    x, W, b, g = make(torch.float32, tokens=0)
    y, x_slice = s2ft_kernels.linear_saving_slice(x, W, b, 4)
    assert y.shape == (0, OUT) and x_slice.shape == (0, 4)
    assert torch.equal(s2ft_kernels.slice_weight_grad(g, x_slice, 4, rows=False), torch.zeros(OUT, 4))
    x, W, b, g = make(torch.float32)
    with pytest.raises(ValueError, match="weight must be"):
        s2ft_kernels.linear_saving_slice(x, W.half(), b, 4)
    with pytest.raises(ValueError, match="do not match grad_y"):
        s2ft_kernels.slice_weight_grad(g, x[:10], 4, rows=True)


@pytest.mark.parametrize("splits", [1, 3], ids=["one-split", "token-split"])
@pytest.mark.parametrize("rows", [False, True], ids=["cols", "rows"])
def test_op_through_the_triton_backend_against_the_float64_formula(rows, splits, monkeypatch):
    """The op on the Triton backend against y = x Wᵀ + b, dx = g W, dW_s in float64, with each kernel launch
    recorded. By design (fastft/ops/s2ft_linear.py) the Triton kernels compute y in columns mode (the GEMM
    that copies x[:, :S] out) and dW_s (split over the tokens in the second variant, as on a GPU); dx, and y
    in rows mode, are plain GEMMs on torch.mm on every backend, so no kernel may run for them."""
    x, W, b, g = make(torch.float32)
    forward = spy_on(monkeypatch, s2ft_kernels, "_linear_saving_slice_kernel")
    reduction = spy_on(monkeypatch, s2ft_kernels, "_slice_grad_kernel")
    xr = x.clone().requires_grad_(True)
    ws = (W[:6] if rows else W[:, :6]).clone().requires_grad_(True)
    with backend("triton"), interpreter_splits(splits):
        y = s2ft_linear(xr, W, b, ws, rows=rows)
        y.backward(g)
    assert len(forward.grids) == (0 if rows else 1), "the forward kernel runs in columns mode only"
    assert len(reduction.grids) == 1, "dW_s goes through the Triton kernel"
    assert (reduction.grids[0][1] > 1) == (splits > 1), "37 tokens: two token splits when forced"
    x64, W64, b64, g64 = (t.double() for t in (x, W, b, g))
    y64 = x64 @ W64.t() + b64
    dx64 = g64 @ W64
    dw64 = g64[:, :6].t() @ x64 if rows else g64.t() @ x64[:, :6]
    for got, want, what in zip((y.detach(), xr.grad, ws.grad), (y64, dx64, dw64), ("y", "dx", "dW slice")):
        assert_close(got, want.float(), msg=what)

"""The cuBLAS paths of the DoRA and S²FT launchers against their references (same cases as the fused kernels).

The cuBLAS path mirrors the reference's products (torch's matmuls), so it is compared at the reference's own
roundings; Triton runs its masked skinny products and DoRA's dg under the interpreter.
"""
from __future__ import annotations

import pytest
import torch
from helpers import assert_close, backend

from fastft.dispatch import implementation
from fastft.ops.dora import dora_backward_reference, dora_forward_reference
from fastft.ops.s2ft_linear import s2ft_backward_reference, s2ft_forward_reference, s2ft_linear

dora_kernels = pytest.importorskip("fastft.kernels.dora")
s2ft_kernels = pytest.importorskip("fastft.kernels.s2ft")
pytest.importorskip("bitsandbytes.functional")
from test_dora_triton import CASES, backward_args, make_case  # noqa: E402


@pytest.mark.parametrize("name", list(CASES))
def test_dora_cublas_forward_matches_reference(name):
    args, _ = make_case(**CASES[name])
    got, expected = dora_kernels.dora_forward_cublas(*args), dora_forward_reference(*args)
    for t, ref, what in zip(got, expected, ("y", "xa", "z")):
        assert t.shape == ref.shape and t.dtype == ref.dtype, what
        assert_close(t, ref, msg=what)


@pytest.mark.parametrize("name", list(CASES))
def test_dora_cublas_backward_matches_reference(name):
    args, grad = make_case(**CASES[name])
    bargs = backward_args(args, grad)
    got, expected = dora_kernels.dora_backward_cublas(*bargs), dora_backward_reference(*bargs)
    for t, ref, what in zip(got, expected, "dx dA dB dg".split()):
        assert t.shape == ref.shape and t.dtype == ref.dtype, what
        assert_close(t, ref, CASES[name]["dtype"], msg=what)


@pytest.mark.parametrize("rows,width", [(False, 5), (True, 7)], ids=["cols5", "rows7"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_s2ft_cublas_matches_reference(monkeypatch, dtype, rows, width):
    """S²FT's cuBLAS path is its reference (torch's matmuls), registered as the triton backend's @cublas entries."""
    monkeypatch.setenv("FASTFT_GEMM", "cublas")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 70, generator=gen).to(dtype)
    W = (torch.randn(45, 70, generator=gen) * 70 ** -0.5).to(dtype)
    b = torch.randn(45, generator=gen).to(dtype)
    g = torch.randn(37, 45, generator=gen).to(dtype)
    with backend("triton"):
        forward = implementation("s2ft_linear", "forward", x.device)
        backward = implementation("s2ft_linear", "backward", x.device)
        y, saved = forward(x, W, b, width, rows, True)
        y_ref, saved_ref = s2ft_forward_reference(x, W, b, width, rows, True)
        assert_close(y, y_ref)
        assert torch.equal(saved, saved_ref)
        saved = x if rows else saved
        for t, ref in zip(backward(g, saved, W, width, rows, True, True),
                          s2ft_backward_reference(g, saved, W, width, rows, True, True)):
            assert_close(t, ref)


@pytest.mark.parametrize("forced", ["cublas", "triton"])
def test_s2ft_op_on_either_path(monkeypatch, forced):
    monkeypatch.setenv("FASTFT_GEMM", forced)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 70, generator=gen)
    W = torch.randn(45, 70, generator=gen) * 70 ** -0.5
    results = []
    for name in ("torch", "triton"):
        xs = x.clone().requires_grad_(True)
        ws = W[:, :6].clone().requires_grad_(True)
        with backend(name):
            y = s2ft_linear(xs, W, None, ws, rows=False)
            y.square().sum().backward()
        results.append((y.detach(), xs.grad, ws.grad))
    for a, e in zip(*results):
        assert_close(a, e)

"""The eager DoRA calls (no custom-op machinery) against the custom ops they stand for.

Plain tensors in eager mode take ``_DoRALinearEager`` (and the detached row norm its implementation directly);
fake tensors (graph reading, torch.compile) take ``fastft::dora_linear`` / ``fastft::dora_row_norm``. Both must
give the same outputs and gradients and save the same tensors, on a dense and on a 4-bit weight.
"""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastft.ops import dora as dora_ops
from fastft.ops.dequantize_4bit import FourBitWeight


def operands(quantized: bool, dropout: bool, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 16, generator=gen, requires_grad=True)
    if quantized:  # 9×16 = 144 codes in blocks of 32: 4.5 blocks, the last one partial
        W = FourBitWeight(packed=torch.randint(0, 256, (72,), dtype=torch.uint8, generator=gen),
                          absmax=torch.rand(5, generator=gen) + 0.5, code=torch.linspace(-1, 1, 16),
                          blocksize=32, shape=(9, 16), dtype=torch.float32, quant_type="nf4")
    else:
        W = torch.randn(9, 16, generator=gen)
    b = torch.randn(9, generator=gen)
    A = torch.randn(3, 16, generator=gen, requires_grad=True)
    B = torch.randn(9, 3, generator=gen, requires_grad=True)
    g = (torch.rand(9, generator=gen) + 0.5).requires_grad_(True)
    mask = (torch.rand(2, 5, 16, generator=gen) > 0.3) if dropout else None
    return x, W, b, A, B, g, mask


def run(force_custom_op: bool, monkeypatch, quantized: bool, dropout: bool):
    if force_custom_op:
        monkeypatch.setattr(dora_ops, "_eager", lambda *tensors: False)
    x, W, b, A, B, g, mask = operands(quantized, dropout)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(tuple(t.shape)), t)[1], lambda t: t):
        y = dora_ops.dora_linear(x, W, b, A, B, g, 0.7, 0.3 if dropout else 0.0, mask)
    name = type(y.grad_fn.next_functions[0][0]).__name__  # under the reshape back to (..., out)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    sq = torch.rand(9, generator=torch.Generator().manual_seed(3)) + 1.0
    with torch.no_grad():
        norm = dora_ops.dora_row_norm(W, A.detach(), B.detach(), sq, 0.7)
    monkeypatch.undo()
    return (y.detach(), x.grad, A.grad, B.grad, g.grad, norm), sorted(saved), name


@pytest.mark.parametrize("quantized", [False, True])
def test_eager_path_equals_the_custom_op(monkeypatch, quantized):
    for dropout in (True, False):
        eager, eager_saved, eager_name = run(False, monkeypatch, quantized, dropout)
        op, op_saved, op_name = run(True, monkeypatch, quantized, dropout)
        assert "DoRALinearEager" in eager_name and "fastft_dora_linear" in op_name
        for a, e in zip(eager, op):
            assert torch.equal(a, e)
        assert eager_saved == op_saved


def test_a_row_norm_that_needs_gradients_keeps_the_custom_op():
    x, W, b, A, B, g, _ = operands(False, False)
    norm = dora_ops.dora_row_norm(W, A, B, torch.ones(9), 0.5)
    assert "fastft_dora_row_norm" in type(norm.grad_fn).__name__ or "fastft_dora_row_norm" in str(norm.grad_fn)


def test_fake_tensors_take_the_custom_op():
    with FakeTensorMode():
        x, W, b, A, B, g, _ = operands(False, False)
        y = dora_ops.dora_linear(x, W, b, A, B, g, 0.5)
        assert "fastft_dora_linear" in type(y.grad_fn.next_functions[0][0]).__name__
        assert y.shape == (2, 5, 9)

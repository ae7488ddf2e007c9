"""The eager LoRA call (one autograd.Function, no custom-op machinery) against the custom op it stands for.

Plain tensors in eager mode take ``_LoRALinearEager``; fake tensors (graph reading, torch.compile) take
``fastft::lora_linear``. Both must give the same outputs and gradients and save the same tensors.
"""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastft.ops import lora as lora_ops


def operands(seed=0, dropout=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 7, 12, generator=gen, requires_grad=True)
    W = torch.randn(9, 12, generator=gen)
    b = torch.randn(9, generator=gen)
    A = torch.randn(4, 12, generator=gen, requires_grad=True)
    B = torch.randn(9, 4, generator=gen, requires_grad=True)
    mask = (torch.rand(2, 7, 12, generator=gen) > 0.3) if dropout else None
    return x, W, b, A, B, mask


def run(force_custom_op: bool, monkeypatch, dropout=True):
    if force_custom_op:
        monkeypatch.setattr(lora_ops, "_eager", lambda *tensors: False)
    x, W, b, A, B, mask = operands(dropout=dropout)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(tuple(t.shape)), t)[1], lambda t: t):
        y = lora_ops.lora_linear(x, W, b, A, B, 0.7, 0.3 if dropout else 0.0, mask)
    name = type(y.grad_fn.next_functions[0][0]).__name__  # under the reshape back to (..., out)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    monkeypatch.undo()
    return y.detach(), x.grad, A.grad, B.grad, sorted(saved), name


def test_eager_path_equals_the_custom_op(monkeypatch):
    for dropout in (True, False):
        *eager, eager_saved, eager_name = run(False, monkeypatch, dropout)
        *op, op_saved, op_name = run(True, monkeypatch, dropout)
        assert "LoRALinearEager" in eager_name and "fastft_lora_linear" in op_name
        for a, e in zip(eager, op):
            assert torch.equal(a, e)
        assert eager_saved == op_saved


def test_fake_tensors_take_the_custom_op():
    with FakeTensorMode():
        x, W, b, A, B, _ = operands(dropout=False)
        y = lora_ops.lora_linear(x, W, b, A, B, 0.5)
        assert "fastft_lora_linear" in type(y.grad_fn.next_functions[0][0]).__name__
        assert y.shape == (2, 7, 9)

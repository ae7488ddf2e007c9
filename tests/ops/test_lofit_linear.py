"""The LoFiT op against a float64 autograd evaluation of its definition: offsets added to head slices of the
input, then the linear layer (y, dx, dv), and the saved tensors (no activation)."""
import pytest
import torch
from helpers import assert_close

from fastft.ops import lofit_linear

HEADS, D, O = 5, 6, 11


def formula(x, W, b, heads, v):
    shifted = x.clone()
    for i, h in enumerate(heads):
        shifted[..., h * D:(h + 1) * D] = shifted[..., h * D:(h + 1) * D] + v[i]
    y = shifted @ W.t()
    return y if b is None else y + b


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_float64_formula(dtype, bias):
    g = torch.Generator().manual_seed(0)
    heads = (4, 1)
    x = torch.randn(3, 7, HEADS * D, generator=g, dtype=torch.float64)
    W = torch.randn(O, HEADS * D, generator=g, dtype=torch.float64)
    b = torch.randn(O, generator=g, dtype=torch.float64) if bias else None
    v = torch.randn(len(heads), D, generator=g, dtype=torch.float64)
    grad = torch.randn(3, 7, O, generator=g, dtype=torch.float64)
    columns = torch.cat([torch.arange(h * D, (h + 1) * D) for h in heads])
    results = []
    for fn, cast in ((lambda *a: lofit_linear(a[0], a[1], a[2], columns, a[4]), dtype),
                     (formula, torch.float64)):
        xs, vs = x.to(cast).requires_grad_(True), v.to(cast).requires_grad_(True)
        y = fn(xs, W.to(cast), None if b is None else b.to(cast), heads, vs)
        y.backward(grad.to(cast))
        results.append((y.detach(), xs.grad, vs.grad))
    for name, got, want in zip(("y", "dx", "dv"), *results):
        assert got.dtype == dtype
        assert_close(got, want, dtype, msg=name)


def test_saves_no_activation_and_frozen_input():
    x = torch.randn(4, HEADS * D)
    W = torch.randn(O, HEADS * D)
    v = torch.zeros(1, D, requires_grad=True)
    y = lofit_linear(x, W, None, torch.arange(D, 2 * D), v)
    saved = [t.shape for t in y.grad_fn.next_functions[0][0].saved_tensors] if y.grad_fn.next_functions else []
    node = y.grad_fn
    while node is not None and "lofit" not in type(node).__name__:
        node = node.next_functions[0][0]
    assert node is not None
    assert [tuple(t.shape) for t in node.saved_tensors] == [tuple(W.shape), (D,)]  # W and the columns only
    y.sum().backward()
    assert_close(v.grad, (W[:, D:2 * D].t() @ torch.ones(O) * 4).reshape(1, D))
    del saved


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="columns"):
        lofit_linear(torch.randn(2, 10), torch.randn(3, 10), None, torch.arange(4), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="last dimension"):
        lofit_linear(torch.randn(2, 9), torch.randn(3, 10), None, torch.arange(3), torch.zeros(1, 3))

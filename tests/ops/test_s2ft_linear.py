"""The S²FT op and ``S2FTLinear`` against a float64 autograd evaluation of the full-weight formula.

The formula is ``y = x Wᵀ + b`` with the whole W requiring grad; S²FT must give the same y and dx, and
for the slice exactly the full weight gradient restricted to it (columns ``[:, :S]`` or rows ``[:S]``).
"""
import copy

import pytest
import torch
from helpers import assert_close, backend
from torch import nn

from fastft.nn import S2FTLinear
from fastft.ops import s2ft_linear

N, K, O = 13, 24, 19


def make(dtype, bias=True, lead=(N,), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g, dtype=torch.float64)
    W = torch.randn(O, K, generator=g, dtype=torch.float64) / K**0.5
    b = torch.randn(O, generator=g, dtype=torch.float64) if bias else None
    grad = torch.randn(*lead, O, generator=g, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(W), cast(b), cast(grad)


def full_weight_formula(x, W, b, grad):
    """(y, dx, dW) of y = x Wᵀ + b with every entry of W trainable, in float64 autograd."""
    x = x.double().clone().requires_grad_(True)
    W = W.double().clone().requires_grad_(True)
    y = torch.nn.functional.linear(x, W, None if b is None else b.double())
    y.backward(grad.double())
    return y.detach(), x.grad, W.grad


def run_op(x, W, b, grad, width, rows):
    x = x.clone().requires_grad_(True)
    view = W[:width] if rows else W[:, :width]
    weight_slice = view.clone().requires_grad_(True)
    y = s2ft_linear(x, W, b, weight_slice, rows=rows)
    y.backward(grad)
    return y.detach(), x.grad, weight_slice.grad


CASES = [dict(rows=False, width=5), dict(rows=False, width=K), dict(rows=True, width=7), dict(rows=True, width=1)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'rows' if c['rows'] else 'cols'}{c['width']}")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_matches_full_weight_gradient_on_the_slice(case, bias, dtype):
    x, W, b, grad = make(dtype, bias=bias, lead=(3, 5))
    with backend("torch"):
        y, dx, dw = run_op(x, W, b, grad, case["width"], case["rows"])
    want_y, want_dx, want_dW = full_weight_formula(x, W, b, grad)
    S = case["width"]
    assert_close(y, want_y, dtype, msg="y")
    assert_close(dx, want_dx, dtype, msg="dx")
    assert dw.shape == ((S, K) if case["rows"] else (O, S))
    assert_close(dw, want_dW[:S] if case["rows"] else want_dW[:, :S], dtype, msg="dW slice")


def saved_activations(fn, *weights):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    skip = {w.data_ptr() for w in weights}
    return [t for t in saved if t.data_ptr() not in skip]


def test_columns_mode_saves_only_the_input_slice():
    x, W, b, _ = make(torch.float32)
    ws = W[:, :5].clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    with backend("torch"):
        saved = saved_activations(lambda: s2ft_linear(xr, W, b, ws), W, ws)
    assert [tuple(t.shape) for t in saved] == [(N, 5)]
    assert torch.equal(saved[0], x[:, :5])


def test_rows_mode_saves_x_and_reads_only_the_gradient_slice():
    x, W, b, grad = make(torch.float64)
    ws = W[:4].clone().requires_grad_(True)
    with backend("torch"):
        saved = saved_activations(lambda: s2ft_linear(x, W, b, ws, rows=True), W, ws)
        assert [t.data_ptr() for t in saved] == [x.data_ptr()]  # x itself, no copy
        y = s2ft_linear(x, W, b, ws, rows=True)
    poisoned = grad.clone()
    poisoned[:, 4:] = float("nan")  # dW_s must not read the gradient of the frozen rows
    y.backward(poisoned)
    assert torch.isfinite(ws.grad).all()
    assert_close(ws.grad, full_weight_formula(x, W, b, grad)[2][:4])


def test_nothing_is_saved_without_a_slice_gradient():
    x, W, b, _ = make(torch.float32)
    ws = W[:, :5].clone()  # frozen slice, x needs no grad: no backward at all
    with backend("torch"):
        assert saved_activations(lambda: s2ft_linear(x.requires_grad_(True), W, b, ws), W, ws) == []
        with torch.no_grad():
            assert_close(s2ft_linear(x, W, b, ws.requires_grad_(True)), x @ W.t() + b)


def test_no_input_gradient_skips_dx():
    x, W, b, grad = make(torch.float64)
    ws = W[:, :6].clone().requires_grad_(True)
    with backend("torch"):
        y = s2ft_linear(x, W, b, ws)
    saved = saved_activations(lambda: s2ft_linear(x, W, b, ws), W, ws)
    assert [tuple(t.shape) for t in saved] == [(N, 6)]
    y.backward(grad)
    assert_close(ws.grad, full_weight_formula(x, W, b, grad)[2][:, :6])


def test_bad_slices_and_widths():
    x, W, b, _ = make(torch.float32)
    with pytest.raises(ValueError, match="last dimension is 23"):
        s2ft_linear(x[:, :23], W, b, W[:, :3])
    with pytest.raises(ValueError, match="not a slice of the first columns"):
        s2ft_linear(x, W, b, W[:5, :3])
    with pytest.raises(ValueError, match="asked, but the layer has 24"):
        S2FTLinear.from_linear(nn.Linear(K, O), 25)
    with pytest.raises(ValueError, match="asked, but the layer has 19"):
        S2FTLinear.from_linear(nn.Linear(K, O), 20, rows=True)
    with pytest.raises(ValueError, match="distinct"):
        S2FTLinear.from_linear(nn.Linear(K, O), 2, index=[3, 3])
    with pytest.raises(TypeError, match="nn.Linear layers with float weights"):
        S2FTLinear.from_linear(nn.Conv1d(3, 3, 1), 1)


# ---------------------------------------------------------------------------------------------- module


def layer64(rows=False, width=5, bias=True):
    torch.manual_seed(0)
    base = nn.Linear(K, O, bias=bias, dtype=torch.float64)
    base.weight.requires_grad_(False)
    if bias:
        base.bias.requires_grad_(False)
    return S2FTLinear.from_linear(base, width, rows=rows)


@pytest.mark.parametrize("rows", [False, True], ids=["cols", "rows"])
def test_module_gradients_and_a_step_touch_only_the_slice(rows):
    layer = layer64(rows=rows)
    before = layer.base_layer.weight.detach().clone()
    x, _, _, grad = make(torch.float64, lead=(2, 7))
    x.requires_grad_(True)
    y = layer(x)
    y.backward(grad)
    want_y, want_dx, want_dW = full_weight_formula(x.detach(), before, layer.base_layer.bias, grad)
    assert_close(y, want_y)
    assert_close(x.grad, want_dx)
    assert_close(layer.weight_slice.grad, want_dW[:5] if rows else want_dW[:, :5])
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["weight_slice"]
    optimizer = torch.optim.AdamW([layer.weight_slice], lr=0.1)
    optimizer.step()
    assert optimizer.state[layer.weight_slice]["exp_avg"].shape == layer.weight_slice.shape
    changed = layer.base_layer.weight.detach() != before
    expected = torch.zeros_like(changed)
    if rows:
        expected[:5] = True
    else:
        expected[:, :5] = True
    assert torch.equal(changed, expected)  # every slice entry moved, nothing else did
    assert_close(layer(x), torch.nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias))


def test_gradient_accumulation_sums_micro_batch_gradients():
    layer = layer64()
    x1, _, _, g1 = make(torch.float64, seed=1)
    x2, _, _, g2 = make(torch.float64, seed=2)
    layer(x1).backward(g1)
    layer(x2).backward(g2)
    W = layer.base_layer.weight.detach()
    want = full_weight_formula(x1, W, None, g1)[2] + full_weight_formula(x2, W, None, g2)[2]
    assert_close(layer.weight_slice.grad, want[:, :5])


def test_moving_and_copying_keep_the_slice_a_view_of_the_weight():
    layer = layer64()
    for moved in (layer.to(torch.float32), copy.deepcopy(layer)):
        x = torch.randn(4, K, dtype=moved.base_layer.weight.dtype)
        with torch.no_grad():
            moved.weight_slice.add_(1.0)
        moved(x)  # the forward re-points a deep copy's slice at its weight
        assert moved.weight_slice.data_ptr() == moved.base_layer.weight.data_ptr()
        with torch.no_grad():
            moved.weight_slice.add_(1.0)
        assert_close(moved(x), torch.nn.functional.linear(x, moved.base_layer.weight, moved.base_layer.bias))


def test_state_dict_holds_the_slice_once_and_unpatch_restores_or_keeps_it():
    layer = layer64()
    initial = layer.base_layer.weight.detach().clone()
    assert set(layer.state_dict()) == {"base_layer.weight", "base_layer.bias"}
    with torch.no_grad():
        layer.weight_slice.mul_(3.0)
    trained = layer.base_layer.weight.detach().clone()
    layer.load_state_dict(layer.state_dict())
    assert torch.equal(layer.base_layer.weight, trained)
    assert torch.equal(layer.unpatched(merge=True).weight, trained)
    assert torch.equal(layer.unpatched(merge=False).weight, initial)


def test_autocast_computes_in_the_autocast_dtype_and_keeps_a_float32_slice():
    layer = layer64().float()
    x = torch.randn(6, K)
    reference = copy.deepcopy(layer.base_layer).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_ref = reference(x)
    assert y.dtype == torch.bfloat16 and layer.weight_slice.dtype == torch.float32
    grad = torch.randn(6, O, dtype=torch.bfloat16)
    y.backward(grad)
    y_ref.backward(grad)
    assert layer.weight_slice.grad.dtype == torch.float32
    assert_close(y, y_ref, torch.bfloat16)
    assert_close(layer.weight_slice.grad, reference.weight.grad[:, :5], torch.bfloat16)

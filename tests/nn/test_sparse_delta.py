"""``SparseDeltaLinear``: the drop-in layer over nn.Linear, Conv1D and Linear4bit, against the dense formula."""
import copy

import pytest
import torch
from helpers import assert_close
from torch import nn

from fastft.nn import FastFTLayer, SparseDeltaLinear

K, O = 20, 13


def base(dtype=torch.float64, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(K, O, bias=bias, dtype=dtype)
    layer.requires_grad_(False)
    return layer


def support(k=30, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(O * K, generator=g)[:k].sort().values


def dense_formula(x, W, b, delta, grad):
    x = x.detach().double().clone().requires_grad_(True)
    delta = delta.detach().double().clone().requires_grad_(True)
    y = torch.nn.functional.linear(x, W.double() + delta, None if b is None else b.double())
    y.backward(grad.double())
    return y.detach(), x.grad, delta.grad


def test_forward_and_gradients_match_the_dense_formula():
    lin, idx = base(), support()
    layer = SparseDeltaLinear(lin, idx, torch.randn(idx.numel(), dtype=torch.float64))
    assert isinstance(layer, FastFTLayer) and layer.kind == "sparse" and layer.op == "sparse_delta_linear"
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert (layer.in_features, layer.out_features) == (K, O)
    assert layer.delta_values.dtype == torch.float64  # a float weight's dtype (not half): kept
    x = torch.randn(2, 3, K, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    want_y, want_dx, want_dW = dense_formula(x, lin.weight, lin.bias, layer.delta_weight(), grad)
    assert_close(y.detach(), want_y)
    assert_close(x.grad, want_dx)
    assert_close(layer.delta_values.grad, want_dW.reshape(-1)[idx])
    assert lin.weight.grad is None and lin.bias.grad is None
    assert set(layer.adapter_parameters()) == {"delta_values"}
    assert layer.report_detail() == f"k=30 density={30 / (O * K):.3%}"


def test_values_default_to_float32_on_half_bases_and_follow_the_activation_dtype():
    lin = base(torch.bfloat16)
    layer = SparseDeltaLinear(lin, support())
    assert layer.delta_values.dtype == torch.float32
    assert SparseDeltaLinear(base(torch.bfloat16), support(), dtype=torch.bfloat16).delta_values.dtype == torch.bfloat16
    torch.nn.init.normal_(layer.delta_values)
    x = torch.randn(4, K, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.delta_values.grad.dtype == torch.float32


def test_conv1d_base_uses_the_out_in_view():
    transformers = pytest.importorskip("transformers")
    conv = transformers.pytorch_utils.Conv1D(O, K).double()  # weight K×O
    conv.requires_grad_(False)
    idx = support()
    layer = SparseDeltaLinear(conv, idx, torch.randn(idx.numel(), dtype=torch.float64))
    x = torch.randn(5, K, dtype=torch.float64)
    W = conv.weight.t()
    assert_close(layer(x), torch.nn.functional.linear(x, W + layer.delta_weight(), conv.bias))
    merged = copy.deepcopy(layer).unpatched(merge=True)
    assert_close(merged(x), layer(x))


def test_merge_is_exact_and_unmerged_base_untouched():
    lin, idx = base(), support()
    before = lin.weight.detach().clone()
    layer = SparseDeltaLinear(lin, idx, torch.randn(idx.numel(), dtype=torch.float64))
    x = torch.randn(4, K, dtype=torch.float64)
    y = layer(x)
    assert copy.deepcopy(layer).unpatched(merge=False).weight.equal(before)
    merged = layer.unpatched(merge=True)
    want = before.clone().view(-1)
    want[idx] += layer.delta_values.detach()
    assert torch.equal(merged.weight.detach().view(-1), want)  # bit-exact: W[idx] + v in the weight's dtype
    assert_close(merged(x), y)


def test_set_support_keeps_the_parameter_and_reports_changed_slots():
    lin = base()
    idx = torch.tensor([3, 10, 40, 41, 100])
    layer = SparseDeltaLinear(lin, idx, torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64))
    param = layer.delta_values
    opt = torch.optim.Adam(layer.adapter_parameters().values(), lr=0.1)
    layer(torch.randn(3, K, dtype=torch.float64)).sum().backward()
    opt.step()
    stepped = layer.delta_values.detach().clone()
    changed = layer.set_support(torch.tensor([3, 40, 41, 77, 200]))
    assert layer.delta_values is param
    assert changed.tolist() == [False, True, True, True, True]
    assert layer.support_moves.tolist() == [0, 2, 3, -1, -1]
    assert layer.delta_values.detach().tolist() == [stepped[0].item(), stepped[2].item(), stepped[3].item(), 0.0, 0.0]
    assert layer.delta_indices.tolist() == [3, 40, 41, 77, 200]
    assert layer.rows.tolist() == [0, 2, 2, 3, 10]  # the index structures follow
    layer.set_support(torch.tensor([0, 1, 2, 3, 4]), values=torch.arange(5.0))
    assert layer.delta_values.detach().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    x = torch.randn(3, K, dtype=torch.float64)
    assert_close(layer(x), torch.nn.functional.linear(x, lin.weight + layer.delta_weight(), lin.bias))
    with pytest.raises(ValueError, match="k must stay 5"):
        layer.set_support(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="duplicates"):
        layer.set_support(torch.tensor([1, 1, 2, 3, 4]))


def test_candidates_get_the_dense_gradient_without_changing_the_forward():
    lin, idx = base(), support(k=25)
    layer = SparseDeltaLinear(lin, idx, torch.randn(idx.numel(), dtype=torch.float64)).train()
    free = torch.tensor([i for i in range(O * K) if i not in set(idx.tolist())])
    candidates = free[torch.randperm(free.numel(), generator=torch.Generator().manual_seed(3))[:17]]
    x = torch.randn(6, K, dtype=torch.float64)
    y0 = layer(x)
    layer.set_candidates(candidates)
    assert all(p is not layer._candidate_values for p in layer.parameters())  # no optimizer sees it
    y = layer(x)
    assert torch.equal(y, y0)
    grad = torch.randn_like(y)
    y.backward(grad)
    _, _, dW = dense_formula(x, lin.weight, lin.bias, layer.delta_weight(), grad)
    order = candidates.sort().values
    assert layer.candidate_indices.tolist() == order.tolist()
    assert_close(layer.candidate_gradients(), dW.reshape(-1)[order])
    assert_close(layer.delta_values.grad, dW.reshape(-1)[idx])
    layer(x).backward(grad)  # accumulates across steps
    assert_close(layer.candidate_gradients(), 2 * dW.reshape(-1)[order])
    layer.clear_candidate_gradients()
    assert layer.candidate_gradients() is None
    with pytest.raises(ValueError, match="must not include active"):
        layer.set_candidates(idx[:2])
    layer.set_candidates(None)
    assert layer.candidate_gradients() is None and torch.equal(layer(x), y0)


def test_value_transform_hook_feeds_the_op_and_the_merge():
    class Halve(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

        def forward(self, v):
            return v * self.scale

    lin, idx = base(), support()
    layer = SparseDeltaLinear(lin, idx, torch.randn(idx.numel(), dtype=torch.float64))
    layer.value_transform = Halve()
    x = torch.randn(3, K, dtype=torch.float64)
    delta = torch.zeros(O * K, dtype=torch.float64)
    delta[idx] = 0.5 * layer.delta_values.detach()
    assert_close(layer(x), torch.nn.functional.linear(x, lin.weight + delta.view(O, K), lin.bias))
    assert_close(layer.delta_weight(), delta.view(O, K))
    assert set(layer.adapter_parameters()) == {"delta_values", "value_transform.scale"}
    layer(x).sum().backward()
    assert layer.value_transform.scale.grad is not None
    state = layer.adapter_state_dict()
    assert "value_transform_scale" in state and "transform=Halve" in layer.report_detail()
    assert all("." not in key for key in state)  # fastft.load splits "<module>.<tensor>" at the last dot


def test_adapter_state_round_trip_and_checks():
    lin, idx = base(), support()
    layer = SparseDeltaLinear(lin, idx, torch.randn(idx.numel(), dtype=torch.float64))
    state = layer.adapter_state_dict()
    assert set(state) == {"delta_indices", "delta_values", "shape"} and state["shape"].tolist() == [O, K]
    other = SparseDeltaLinear(base(), support(k=7, seed=5))  # another k: the support is replaced
    other.load_adapter_state_dict(state)
    x = torch.randn(3, K, dtype=torch.float64)
    assert torch.equal(other(x), layer(x))
    bad = dict(state, shape=torch.tensor([K, O]))
    with pytest.raises(ValueError, match=f"for a {K}×{O} weight"):
        other.load_adapter_state_dict(bad)
    with pytest.raises(ValueError, match="expected"):
        other.load_adapter_state_dict({"delta_values": state["delta_values"]})


def test_bad_construction():
    with pytest.raises(TypeError, match="Linear4bit"):
        SparseDeltaLinear(nn.Conv2d(2, 2, 1), torch.tensor([0]))
    with pytest.raises(ValueError, match="sorted ascending"):
        SparseDeltaLinear(base(), torch.tensor([5, 1]))
    with pytest.raises(ValueError, match="values must have shape"):
        SparseDeltaLinear(base(), torch.tensor([1, 5]), torch.zeros(3))


def linear4bit(bias=True):
    bnb = pytest.importorskip("bitsandbytes", reason="the 4-bit base needs bitsandbytes; install fastft[test]")
    torch.manual_seed(0)
    dense = nn.Linear(70, 45, bias=bias)  # 3150 weights: not a multiple of the 64 block
    q = bnb.nn.Linear4bit(70, 45, bias=bias, compute_dtype=torch.float32, quant_type="nf4")
    q.load_state_dict(dense.state_dict())
    return q.to("cpu")


def test_linear4bit_base_matches_the_dequantized_weight_and_merges_with_requantization():
    q = linear4bit()
    import bitsandbytes as bnb

    idx = torch.randperm(70 * 45, generator=torch.Generator().manual_seed(0))[:40].sort().values
    layer = SparseDeltaLinear(q, idx, torch.randn(40) * 0.1)
    assert layer.delta_values.dtype == torch.float32
    W = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state)
    x = torch.randn(3, 70, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    delta = layer.delta_weight()
    want_y, want_dx, want_dW = dense_formula(x, W, q.bias, delta, grad)
    assert_close(y.detach(), want_y, torch.float32)
    assert_close(x.grad, want_dx, torch.float32)
    assert_close(layer.delta_values.grad, want_dW.reshape(-1)[idx], torch.float32)
    with pytest.warns(UserWarning, match="re-quantized"):
        merged = layer.unpatched(merge=True)
    assert isinstance(merged, bnb.nn.Linear4bit)


def test_a_tiny_llama_trains_with_sparse_layers_and_no_dense_gradient():
    """Every decoder linear swapped by hand (no planner); AdamW on the values only: the loss falls, no base
    weight gets a gradient, and nothing of a weight's size is kept between steps."""
    from helpers import tiny_model

    torch.manual_seed(0)
    model = tiny_model("llama").train()
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and ".layers." in name:
            k = module.weight.numel() // 100
            idx = torch.randperm(module.weight.numel(), generator=gen)[:k].sort().values
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, SparseDeltaLinear(module, idx))
    params = [m.delta_values for m in model.modules() if isinstance(m, SparseDeltaLinear)]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, 96, (2, 16), generator=gen)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(p.grad is None for n, p in model.named_parameters() if "delta_values" not in n)
    for m in model.modules():
        if isinstance(m, SparseDeltaLinear):
            assert all(s["exp_avg"].numel() == m.k for s in [opt.state[m.delta_values]])


def test_load_state_dict_rebuilds_the_support():
    """A checkpoint taken after a re-selection (e.g. a Trainer resuming) restores indices and index structures."""
    lin = base()
    layer = SparseDeltaLinear(lin, torch.tensor([3, 10, 40, 41, 100]), torch.arange(5.0, dtype=torch.float64))
    moved = copy.deepcopy(layer)
    moved.set_support(torch.tensor([0, 21, 40, 77, 200]), values=torch.arange(5.0, dtype=torch.float64))
    layer.load_state_dict(moved.state_dict())
    assert layer.delta_indices.tolist() == [0, 21, 40, 77, 200]
    assert layer.rows.tolist() == moved.rows.tolist() and layer.col_order.tolist() == moved.col_order.tolist()
    x = torch.randn(3, K, dtype=torch.float64)
    assert torch.equal(layer(x), moved(x))
    bad = moved.state_dict()
    bad["delta_indices"] = torch.tensor([5, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="sorted ascending"):
        layer.load_state_dict(bad)

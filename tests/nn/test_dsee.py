"""DSEE (``DSEEConfig``): the layer against a float64 autograd evaluation of ``x(W+S)ᵀ + b + s·(xAᵀ)Bᵀ``
(y and every gradient), the support rules, save/load, merge/unpatch, PEFT export refused, training, bad values."""
import copy

import pytest
import torch
from helpers import assert_adapter_round_trips, assert_close, tiny_model, training_losses

import fastft
from fastft.nn import DSEELinear
from fastft.nn.dsee import dsee_support


def ids(seed=0, n=2, length=10):
    return torch.randint(0, 96, (n, length), generator=torch.Generator().manual_seed(seed))


def dsee_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, DSEELinear)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layer_matches_the_dense_formula_with_gradients(dtype):
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 9, dtype=dtype)
    module = DSEELinear(layer, fastft.DSEEConfig(r=3, alpha=6, sparse=10))
    with torch.no_grad():
        module.lora_B.normal_()
        module.delta_values.normal_()
    x = torch.randn(2, 5, 12, dtype=dtype)
    g = torch.randn(2, 5, 9, dtype=dtype)
    xs = x.clone().requires_grad_(True)
    y = module(xs)
    y.backward(g)
    W, b = layer.weight.detach().double(), layer.bias.detach().double()
    A = module.lora_A.detach().double().requires_grad_(True)
    B = module.lora_B.detach().double().requires_grad_(True)
    v = module.delta_values.detach().double().requires_grad_(True)
    x64 = x.double().requires_grad_(True)
    S = torch.zeros(9 * 12, dtype=torch.float64).index_put((module.delta_indices,), v).view(9, 12)
    want = x64 @ (W + S).t() + b + module.scale * (x64 @ A.t()) @ B.t()
    want.backward(g.double())
    assert_close(y, want, dtype, msg="y")
    for name, got, ref in (("dx", xs.grad, x64.grad), ("dA", module.lora_A.grad, A.grad),
                           ("dB", module.lora_B.grad, B.grad), ("dv", module.delta_values.grad, v.grad)):
        assert_close(got, ref, dtype, msg=name)
    assert layer.weight.grad is None


def test_support_rules():
    W = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    u, s, vh = torch.linalg.svd(W, full_matrices=False)
    residual = W - (u[:, :2] * s[:2]) @ vh[:2]
    assert torch.equal(dsee_support(W, 5, 2, "residual", 0), torch.topk(residual.abs().flatten(), 5).indices.sort().values)
    assert torch.equal(dsee_support(W, 5, 2, "magnitude", 0), torch.topk(W.abs().flatten(), 5).indices.sort().values)
    random = dsee_support(W, 5, 2, "random", 3)
    assert torch.equal(random, dsee_support(W, 5, 2, "random", 3)) and len(set(random.tolist())) == 5


def test_save_load_merge_unpatch_and_peft_refused(tmp_path):
    base = tiny_model("llama", torch.float64)
    model = copy.deepcopy(base)
    fastft.patch(model, fastft.DSEEConfig(r=4, sparse=0.01, targets=["q_proj", "down_proj"]))
    with torch.no_grad():
        for m in dsee_modules(model).values():
            m.lora_B.normal_(std=0.1)
            m.delta_values.normal_(std=0.1)
    x = ids(1)
    with pytest.raises(ValueError, match="sparse part"):
        fastft.export_peft(model, tmp_path / "peft")
    assert_adapter_round_trips(model, base, x, tmp_path, peft_export=False)
    with torch.no_grad():
        fastft.unpatch(model, merge=False)
        assert_close(model(x).logits, base(x).logits)


def test_tiny_llama_trains():
    model = tiny_model("llama")
    fastft.patch(model, fastft.DSEEConfig(r=4, sparse=16))
    x = ids(3, 4, 12)
    losses = training_losses(model, x, lr=1e-2)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("kwargs,match", [
    (dict(sparse=0), "sparse"),
    (dict(sparse=1.5), "sparse"),
    (dict(support="top"), "support"),
    (dict(seed=1.5), "seed"),
    (dict(init="pissa"), "init"),
])
def test_bad_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastft.DSEEConfig(**kwargs)


def test_too_many_entries_is_refused_before_any_change():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="only"):
        fastft.patch(model, fastft.DSEEConfig(r=4, sparse=10_000, targets=["q_proj"]))
    assert not fastft.is_patched(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

"""LoLDU (``LoRAConfig(init="loldu")``): the LDU factors, the model unchanged at init, only the diagonal
trains, merge / unpatch, save/load, export to PEFT (an equivalent rank-r LoRA), training, bad values."""
import copy

import pytest
import torch
from helpers import assert_adapter_round_trips, assert_close, tiny_model, training_losses

import fastft
from fastft.math.lora_inits import loldu_factors
from fastft.nn import LoLDULinear


def ids(seed=0, n=2, length=10):
    return torch.randint(0, 96, (n, length), generator=torch.Generator().manual_seed(seed))


def loldu_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoLDULinear)}


def test_factors_are_the_ldu_decomposition():
    W = torch.randn(9, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    A, B, d = loldu_factors(W, 7, scale=2.0)  # full rank: P L D U = W
    assert_close(2.0 * (B * d) @ A, W)
    assert_close(torch.diagonal(A), torch.ones(7, dtype=torch.float64))  # U unit upper
    assert torch.equal(torch.triu(A), A)
    A3, B3, d3 = loldu_factors(W, 3, scale=2.0)
    assert_close(A3, A[:3]) and assert_close(B3, B[:, :3]) and assert_close(d3, d[:3])


def test_unchanged_at_init_only_diag_trains_and_merge_unpatch():
    base = tiny_model("llama", torch.float64)
    model = copy.deepcopy(base)
    report = fastft.patch(model, fastft.LoRAConfig(r=4, init="loldu"))
    modules = loldu_modules(model)
    assert len(modules) == 14 and report.trainable_params == 14 * 4
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"lora_diag"}
    x = ids()
    with torch.no_grad():
        assert_close(model(x).logits, base(x).logits)
        for m in modules.values():
            m.lora_diag.mul_(1.5).add_(0.1)
        want = model(x).logits
        merged = copy.deepcopy(model)
        fastft.unpatch(merged, merge=True)
        assert_close(merged(x).logits, want)
        fastft.unpatch(model, merge=False)
        assert_close(model(x).logits, base(x).logits)


def test_layer_matches_its_formula_with_gradients():
    layer = torch.nn.Linear(12, 10, dtype=torch.float64)
    W0 = layer.weight.detach().clone()
    module = LoLDULinear(layer, fastft.LoRAConfig(r=3, alpha=6, init="loldu"))
    with torch.no_grad():
        module.lora_diag.add_(torch.randn(3, dtype=torch.float64))
    x = torch.randn(5, 12, dtype=torch.float64)
    d = module.lora_diag.detach().clone().requires_grad_(True)
    A, B, s = module.lora_A, module.lora_B, module.scale
    W_res = W0 - s * (B * module.loldu_d0) @ A
    want = x @ W_res.t() + layer.bias + s * ((x @ A.t()) * d) @ B.t()
    got = module(x)
    assert_close(got, want)
    g = torch.randn_like(got)
    got.backward(g)
    want.backward(g)
    assert_close(module.lora_diag.grad, d.grad)
    assert module.lora_A.grad is None and module.lora_B.grad is None


def test_save_load_and_peft_export(tmp_path):
    pytest.importorskip("peft")
    base = tiny_model("llama", torch.float64)
    model = copy.deepcopy(base)
    fastft.patch(model, fastft.LoRAConfig(r=4, init="loldu", targets=["q_proj", "down_proj"]))
    with torch.no_grad():
        for m in loldu_modules(model).values():
            m.lora_diag.add_(0.3 * torch.randn_like(m.lora_diag))
    assert_adapter_round_trips(model, base, ids(1), tmp_path)


def test_tiny_llama_trains():
    model = tiny_model("llama")
    fastft.patch(model, fastft.LoRAConfig(r=4, init="loldu"))
    x = ids(2, 4, 12)
    losses = training_losses(model, x, lr=5e-2)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("kwargs,match", [
    (dict(init="loldu", dora=True), "loldu"),
    (dict(init="loldu", dropout=0.1), "loldu"),
    (dict(init="ldu"), "init"),
])
def test_bad_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastft.LoRAConfig(**kwargs)


def test_rank_above_min_dim_is_refused_before_any_change():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="r <= min"):
        fastft.patch(model, fastft.LoRAConfig(r=80, init="loldu"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

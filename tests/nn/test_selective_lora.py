"""Selective LoRA (``SelectiveLoRAConfig``): a closed gate's block is exactly the base layer and runs no
low-rank product (the op is never called), an open gate is LoRA with the straight-through score gradient,
the L1 term reaches the loss, save/load, merge, PEFT export, training, bad values."""
import copy

import pytest
import torch
from helpers import assert_adapter_round_trips, assert_close, tiny_model, training_losses

import fastft
from fastft.nn import SelectiveLoRALinear, selective_lora_active
from fastft.nn import selective_lora as selective_module


def ids(seed=0, n=2, length=10):
    return torch.randint(0, 96, (n, length), generator=torch.Generator().manual_seed(seed))


def gated(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SelectiveLoRALinear)}


def make_layer(score=1.0):
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 9, dtype=torch.float64)
    module = SelectiveLoRALinear(layer, fastft.SelectiveLoRAConfig(r=3, alpha=6, score_init=max(score, 0.1)))
    with torch.no_grad():
        module.lora_B.normal_()
        module.lora_gate_score.fill_(score)
    return layer, module


def test_closed_gate_is_the_base_layer_and_runs_no_low_rank_product(monkeypatch):
    layer, module = make_layer(score=0.05)  # below τ = 0.1
    calls = []
    real = selective_module.lora_linear
    monkeypatch.setattr(selective_module, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    y = module(x)
    assert not module.active and calls == []
    assert torch.equal(y, layer(x))
    y.sum().backward()
    assert module.lora_A.grad is None and module.lora_B.grad is None and module.lora_gate_score.grad is None
    with torch.no_grad():
        module.lora_gate_score.fill_(0.5)  # reopened (by hand): the op runs again
    module(x)
    assert module.active and calls == [1]


def test_open_gate_is_lora_with_the_straight_through_score_gradient():
    layer, module = make_layer(score=0.7)
    x = torch.randn(5, 12, dtype=torch.float64)
    sigma = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    A, B = module.lora_A.detach().clone().requires_grad_(True), module.lora_B.detach().clone().requires_grad_(True)
    gate = sigma - sigma.detach() + 1.0
    want = layer(x) + gate * module.scale * (x @ A.t()) @ B.t()
    got = module(x)
    assert_close(got, want)
    g = torch.randn_like(got)
    got.backward(g)
    want.backward(g)
    assert_close(module.lora_gate_score.grad, sigma.grad.float())  # σ is a float32 parameter
    assert_close(module.lora_A.grad, A.grad)
    assert_close(module.lora_B.grad, B.grad)
    assert_close(module.regularization(), torch.tensor(1e-3 * 0.7, dtype=torch.float32))


def test_l1_term_is_added_to_the_loss_and_gates_close_monotonically():
    model = tiny_model("llama")
    x = ids(1, 2, 12)
    with torch.no_grad():
        plain = model(x, labels=x).loss
    fastft.patch(model, fastft.SelectiveLoRAConfig(r=4, score_init=0.2, threshold=0.1, l1=0.5))
    model.train()
    with torch.no_grad():
        assert_close(model(x, labels=x).loss, plain + 14 * 0.5 * 0.2)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    history = []
    for _ in range(8):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        history.append({n for n, m in gated(model).items() if m.active})
    assert all(later <= earlier for earlier, later in zip(history, history[1:]))  # a closed gate stays closed
    assert selective_lora_active(model) == (len(history[-1]), 14) and len(history[-1]) < 14


def test_save_load_merge_and_peft_export(tmp_path):
    pytest.importorskip("peft")
    base = tiny_model("llama", torch.float64)
    model = copy.deepcopy(base)
    fastft.patch(model, fastft.SelectiveLoRAConfig(r=4, targets=["q_proj", "up_proj"]))
    with torch.no_grad():
        for i, m in enumerate(gated(model).values()):
            m.lora_B.normal_(std=0.1)
            m.lora_gate_score.fill_(0.05 if i % 2 else 0.9)  # half the blocks closed
    assert_adapter_round_trips(model, base, ids(2), tmp_path)


def test_tiny_llama_trains():
    model = tiny_model("llama")
    fastft.patch(model, fastft.SelectiveLoRAConfig(r=4, l1=1e-4))
    x = ids(3, 4, 12)
    losses = training_losses(model, x, lr=1e-2)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("kwargs,match", [
    (dict(threshold=0), "threshold"),
    (dict(score_init=0.05), "score_init"),
    (dict(l1=-1), "l1"),
    (dict(init="pissa"), "init"),
    (dict(dora=True), "DoRA"),
    (dict(r=0), "r"),
])
def test_bad_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastft.SelectiveLoRAConfig(**kwargs)

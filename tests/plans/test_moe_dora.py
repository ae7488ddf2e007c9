"""DoRA on fused MoE experts (which PEFT refuses) and the router as a target: DoRA equals the base model at init, the
model equals one whose expert weights are the explicit per-expert DoRA weights, it trains (every adapter gradient
finite and non-zero), saves and loads, merges; the router matches PEFT's ``gate.weight`` LoRA both ways and takes
DoRA; export_peft refuses what PEFT has no format for."""
from __future__ import annotations

import copy
import tempfile

import pytest
import torch

from helpers import (assert_same_logits_and_input_grads, loaded_from_peft, randomize_by_name, tiny_moe_model,
                     training_losses)

import fastft
from fastft.nn import DoRAExperts, LoRARouter

tf = pytest.importorskip("transformers")


def _qwen3_moe():
    return tiny_moe_model("qwen3_moe")


def _mixtral():
    return tiny_moe_model("mixtral")


@pytest.mark.parametrize("build", [_qwen3_moe, _mixtral])
def test_dora_experts_match_explicit_weights_train_save_merge(build, tmp_path):
    model = build()
    base = copy.deepcopy(model)
    ids = torch.randint(0, 64, (2, 7))
    report = fastft.patch(model, fastft.LoRAConfig(r=2, alpha=4, dora=True, targets=["mlp.experts.gate_up_proj",
                                                                                     "mlp.experts.down_proj"]))
    rows = [row for row in report if row.kind == "dora-experts"]
    assert len(rows) == 2 and "one GEMM per expert segment" in rows[0].detail
    torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    randomize_by_name(model, magnitude_jitter=0.2)
    logits = model(input_ids=ids).logits
    # the explicit formula: each expert's W' = m/‖W + s·BA‖ ⊙ (W + s·BA), formed in full, in a plain model
    explicit = copy.deepcopy(base)
    for name, module in model.named_modules():
        if isinstance(module, DoRAExperts):
            target = explicit.get_submodule(name)
            for p in module.params:
                W = getattr(target, p).detach()
                A, B = getattr(module, f"lora_A_{p}").detach(), getattr(module, f"lora_B_{p}").detach()
                m = getattr(module, f"lora_magnitude_{p}").detach()
                full = W + module.scale * torch.bmm(B, A)
                getattr(target, p).data.copy_(full * (m / full.norm(dim=2)).unsqueeze(2))
    torch.testing.assert_close(logits, explicit(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    fastft.save(model, tmp_path / "a")
    again = copy.deepcopy(base)
    fastft.load(again, tmp_path / "a")
    torch.testing.assert_close(again(input_ids=ids).logits, logits, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="no PEFT format"):
        fastft.export_peft(model, tmp_path / "p")
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and "experts" in n}
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    model.eval()
    fastft.unpatch(model, merge=True)
    torch.testing.assert_close(model(input_ids=ids).logits, logits, atol=1e-5, rtol=1e-5)


def test_dora_all_linear_exact_norm_grad_trains():
    model = _qwen3_moe()
    report = fastft.patch(model, fastft.LoRAConfig(r=2, alpha=4, dora=True, dora_detach_norm=False))
    kinds = {row.kind for row in report}
    assert {"dora", "dora-experts", "dora-router"} <= kinds
    ids = torch.randint(0, 64, (2, 9))
    losses = training_losses(model, ids, steps=3)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("target", [["mlp.gate"], ["mlp.gate.weight"], r".*\.mlp\.gate\.weight"])
def test_router_target_forms(target):
    model = _qwen3_moe()
    report = fastft.patch(model, fastft.LoRAConfig(r=2, alpha=4, targets=target))
    assert [row.kind for row in report] == ["lora-router", "lora-router"]
    assert isinstance(model.model.layers[0].mlp.gate, LoRARouter)


def test_router_matches_peft_both_ways():
    peft = pytest.importorskip("peft")
    base = _mixtral()
    model = copy.deepcopy(base)
    fastft.patch(model, fastft.LoRAConfig(r=2, alpha=4, targets=["q_proj", "mlp.gate"]))
    randomize_by_name(model, std=1.0, magnitude_jitter=0.2)
    ids = torch.randint(0, 64, (2, 7))
    logits = model(input_ids=ids).logits
    assert not torch.allclose(logits, base(input_ids=ids).logits, atol=1e-3)
    with tempfile.TemporaryDirectory() as d:
        fastft.export_peft(model, d)
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), d).eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, logits, atol=1e-5, rtol=1e-5)
        again = copy.deepcopy(base)
        fastft.from_peft(again, d)
        torch.testing.assert_close(again(input_ids=ids).logits, logits, atol=1e-6, rtol=1e-6)
    ours, pm = loaded_from_peft(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                      target_parameters=["mlp.gate.weight"]), b_std=1.0)
    assert_same_logits_and_input_grads(ours, pm, base, ids)


def test_dora_router_merges():
    model = _mixtral()
    fastft.patch(model, fastft.LoRAConfig(r=2, alpha=4, dora=True, targets=["mlp.gate"]))
    randomize_by_name(model, std=1.0, magnitude_jitter=0.2)
    ids = torch.randint(0, 64, (2, 7))
    logits = model(input_ids=ids).logits
    fastft.unpatch(model, merge=True)
    assert type(model.model.layers[0].mlp.gate).__name__ == "MixtralTopKRouter"
    torch.testing.assert_close(model(input_ids=ids).logits, logits, atol=1e-5, rtol=1e-5)

"""LoRA on fused 3-D MoE experts (transformers 5 Qwen3-MoE, Mixtral): the grouped op against a float64 autograd
evaluation, the model against PEFT's target_parameters LoRA (logits, input gradients, training, export / import in
both directions, merge), and clear patch-time errors for what is not supported."""
from __future__ import annotations

import copy
import tempfile

import pytest
import torch

from helpers import (assert_same_logits_and_input_grads, loaded_from_peft, randomize_by_name, tiny_moe_model,
                     training_losses)

import fastft
from fastft.nn import LoRAExperts
from fastft.ops.expert_lora import expert_lora

tf = pytest.importorskip("transformers")


@pytest.mark.parametrize("transposed", [False, True])
def test_op_against_float64_autograd(transposed):
    torch.manual_seed(0)
    E, K, O, R, S = 4, 6, 5, 2, 11
    counts = [3, 0, 6, 2]
    offsets = torch.tensor([0, 3, 3, 9, 11])
    W = torch.randn(E, K, O) if transposed else torch.randn(E, O, K)
    x = torch.randn(S, K, dtype=torch.float64, requires_grad=True)
    A = torch.randn(E, R, K, dtype=torch.float64, requires_grad=True)
    B = torch.randn(E, O, R, dtype=torch.float64, requires_grad=True)
    W = W.double()
    y = expert_lora(x, offsets, W, A, B, 0.7, transposed=transposed)
    grad = torch.randn_like(y)
    y.backward(grad)
    got = [x.grad.clone(), A.grad.clone(), B.grad.clone()]
    for t in (x, A, B):
        t.grad = None
    ids = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
    Wo = W.transpose(1, 2) if transposed else W  # E×O×K
    ref = torch.einsum("sk,sok->so", x, Wo[ids]) + 0.7 * torch.einsum("sr,sor->so", torch.einsum("sk,srk->sr", x, A[ids]), B[ids])
    ref.backward(grad)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    for g, t in zip(got, (x, A, B)):
        torch.testing.assert_close(g, t.grad, rtol=1e-10, atol=1e-12)


def test_op_never_forms_BA_nor_saves_its_output():
    E, K, O, R, S = 3, 16, 12, 2, 9
    W = torch.randn(E, O, K)
    x = torch.randn(S, K, requires_grad=True)
    A = torch.randn(E, R, K, requires_grad=True)
    B = torch.randn(E, O, R, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = expert_lora(x, torch.tensor([0, 4, 4, 9]), W, A, B, 1.0)
    shapes = {tuple(t.shape) for t in saved}
    assert (E, O, K) in shapes  # the frozen weight itself (a reference, not a copy)
    assert not any(t.numel() == E * O * K and t.data_ptr() != W.data_ptr() for t in saved)
    assert all(t.untyped_storage().data_ptr() != y.untyped_storage().data_ptr() for t in saved)


def _qwen3_moe():
    return tiny_moe_model("qwen3_moe")


def _mixtral():
    return tiny_moe_model("mixtral")


@pytest.mark.parametrize("build", [_qwen3_moe, _mixtral])
def test_experts_match_peft_both_directions(build):
    peft = pytest.importorskip("peft")
    model = build()
    base = copy.deepcopy(model)
    report = fastft.patch(model, fastft.LoRAConfig(r=2, alpha=4))
    experts = [row for row in report if row.kind == "lora-experts"]
    assert len(experts) == 2 and "grouped" in experts[0].detail
    randomize_by_name(model)
    ids = torch.randint(0, 64, (2, 7))
    logits = model(input_ids=ids).logits
    with tempfile.TemporaryDirectory() as d:
        fastft.export_peft(model, d)
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), d).eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, logits, atol=1e-5, rtol=1e-5)
        again = copy.deepcopy(base)
        fastft.from_peft(again, d)
        torch.testing.assert_close(again(input_ids=ids).logits, logits, atol=1e-6, rtol=1e-6)
    # a PEFT expert adapter -> fastft
    names = [n for n, m in base.named_modules() if type(m).__name__.endswith("Experts")]
    pcfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                           target_parameters=[f"{n}.{p}" for n in names for p in ("gate_up_proj", "down_proj")])
    ours, pm = loaded_from_peft(base, pcfg, b_std=0.3)
    assert_same_logits_and_input_grads(ours, pm, base, ids)
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert all(g is not None for g in ours_grads.values())


def test_experts_train_and_merge():
    model = _qwen3_moe()
    fastft.patch(model, fastft.LoRAConfig(r=2, alpha=4, targets=["q_proj", "mlp.experts.down_proj"]))
    experts = [m for m in model.modules() if isinstance(m, LoRAExperts)]
    assert experts and experts[0].params == ("down_proj",)
    ids = torch.randint(0, 64, (2, 9))
    losses = training_losses(model, ids, steps=3)
    assert losses[-1] < losses[0]
    model.eval()
    logits = model(input_ids=ids).logits
    fastft.unpatch(model, merge=True)
    assert type(model.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    torch.testing.assert_close(model(input_ids=ids).logits, logits, atol=1e-5, rtol=1e-5)


def test_unsupported_on_experts_is_a_patch_time_error():
    with pytest.raises(ValueError, match="dropout=0"):
        fastft.patch(_qwen3_moe(), fastft.LoRAConfig(r=2, dropout=0.1))
    with pytest.raises(ValueError, match="Qwen3MoeExperts"):
        fastft.patch(_qwen3_moe(), fastft.QATConfig(group_size=8, rotations=()))
    model = _qwen3_moe()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match="PiSSA"):
        fastft.patch(model, fastft.LoRAConfig(r=2, init="pissa"))
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert not any(isinstance(m, LoRAExperts) for m in model.modules())

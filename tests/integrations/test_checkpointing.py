"""Gradient checkpointing (transformers' gradient_checkpointing_enable, reentrant and not) gives the same loss and
gradients as no checkpointing, for every method, dropout included (the recomputed forward re-draws the same
masks: checkpointing restores the RNG state), and the layers really are recomputed."""
import copy

import pytest
import torch
from helpers import TOLERANCES, quantize_linears, randomize_lora, tiny_model

import fastft

IDS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))

METHODS = {
    "lora-dropout": (lambda: fastft.LoRAConfig(r=4, dropout=0.2), False),
    "qlora-dropout": (lambda: fastft.LoRAConfig(r=4, dropout=0.1), True),
    "dora-dropout-exact-norm": (lambda: fastft.LoRAConfig(r=4, dora=True, dropout=0.2, dora_detach_norm=False), False),
    "qdora": (lambda: fastft.LoRAConfig(r=4, dora=True), True),
    "qat+lora": (lambda: [fastft.QATConfig(w_bits=4, a_bits=8, kv_bits=4, group_size=16, ste="clipped"),
                          fastft.LoRAConfig(r=4)], False),
    "qat": (lambda: fastft.QATConfig(w_bits=4, a_bits=8, group_size=16), False),
    "s2ft": (lambda: fastft.S2FTConfig(ffn_ratio=0.1, attn_ratio=0.5, rows=True), False),
    "lora-head+loss": (lambda: [fastft.LoRAConfig(r=4, dropout=0.1, targets=["q_proj", "v_proj", "lm_head"]),
                                fastft.LossConfig(kind="dft", z_loss=1e-4)], False),
}


def loss_and_grads(model):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks in every run
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", list(METHODS))
def test_checkpointing_gives_the_same_gradients(method):
    build, four_bit = METHODS[method]
    if four_bit:
        pytest.importorskip("bitsandbytes", reason="QLoRA/QDoRA need bitsandbytes; install fastft[test]")
    model = tiny_model("llama")
    if four_bit:
        quantize_linears(model)
    fastft.patch(model, build())
    randomize_lora(model)
    model.train()
    want_loss, want = loss_and_grads(model)
    assert want and all(g is not None and g.abs().max() > 0 for g in want.values())
    for reentrant in (True, False):
        twin = copy.deepcopy(model)
        twin.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        calls = []
        twin.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *args: calls.append(1))
        got_loss, got = loss_and_grads(twin)
        assert len(calls) == 2, "the checkpointed layer was not recomputed"
        torch.testing.assert_close(got_loss, want_loss, **TOLERANCES[torch.float32])
        assert set(got) == set(want), f"reentrant={reentrant}"
        for name, grad in want.items():
            assert got[name] is not None, f"reentrant={reentrant}: {name} got no gradient"
            torch.testing.assert_close(got[name], grad, **TOLERANCES[torch.float32], msg=f"reentrant={reentrant}: {name}")


def test_fused_loss_inside_a_checkpoint():
    """The fused loss computes its gradients during the forward and hands them over in backward; checkpointed
    itself (a user wrapping the head and loss), the recomputation gives the same loss and gradients."""
    from torch.utils.checkpoint import checkpoint

    from fastft.ops import linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    weight = torch.randn(30, 16, requires_grad=True)
    labels = torch.randint(0, 30, (2, 7))

    def head_and_loss(h, w):
        return linear_cross_entropy(torch.tanh(h), w, labels, kind="dft", z_loss=1e-3)

    want_loss = head_and_loss(hidden, weight)
    want = torch.autograd.grad(want_loss, (hidden, weight))
    for reentrant in (True, False):
        hidden.grad = weight.grad = None
        loss = checkpoint(head_and_loss, hidden, weight, use_reentrant=reentrant)
        loss.backward()
        torch.testing.assert_close(loss, want_loss, **TOLERANCES[torch.float32])
        torch.testing.assert_close(hidden.grad, want[0], **TOLERANCES[torch.float32])
        torch.testing.assert_close(weight.grad, want[1], **TOLERANCES[torch.float32])

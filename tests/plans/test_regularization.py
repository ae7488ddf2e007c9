"""The loss-term mechanism: FastFTLayer.regularization() summed into output.loss while training."""
from __future__ import annotations

import torch
from torch import nn

import fastft
from fastft.nn.lora import LoRALinear
from fastft.plans.regularization import HOOK_ATTR, RegularizationEdit, regularization_loss
from helpers import tiny_model


class _Penalised(LoRALinear):
    """A LoRA layer with a known penalty: weight · Σ A²."""

    def regularization(self):
        return 0.5 * self.lora_A.pow(2).sum()


def _patched_with_penalty():
    torch.manual_seed(0)
    model = tiny_model("llama")
    fastft.patch(model, fastft.LoRAConfig(r=4, targets=["q_proj"]))
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            module.__class__ = _Penalised
    return model


def test_regularization_loss_sums_every_layer_term():
    model = _patched_with_penalty()
    expected = sum(0.5 * m.lora_A.pow(2).sum() for m in model.modules() if isinstance(m, _Penalised))
    torch.testing.assert_close(regularization_loss(model), expected)
    assert regularization_loss(tiny_model("llama")) is None


def test_edit_adds_the_term_to_output_loss_in_training_only_and_reverts():
    model = _patched_with_penalty()
    ids = torch.randint(0, 96, (2, 7))
    model.train()
    plain = model(input_ids=ids, labels=ids).loss
    edits = [RegularizationEdit(), RegularizationEdit()]  # two plans share one hook
    for edit in edits:
        edit.apply(model)
    with_term = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(with_term, plain + regularization_loss(model))
    with_term.backward()
    assert all(m.lora_A.grad is not None for m in model.modules() if isinstance(m, _Penalised))
    model.eval()
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, plain)
    assert model(input_ids=ids).loss is None
    model.train()
    edits[0].revert(model, merge=False)
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, with_term.detach())
    edits[1].revert(model, merge=False)
    assert HOOK_ATTR not in model.__dict__ and not model._forward_hooks
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, plain)


def test_default_layer_has_no_term():
    layer = LoRALinear.from_linear(nn.Linear(8, 8), fastft.LoRAConfig(r=2))
    assert layer.regularization() is None

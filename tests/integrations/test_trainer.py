"""A short transformers Trainer run: fastft LoRA's loss curve equals PEFT LoRA's step by step."""
import copy

import pytest
import torch
from helpers import TOLERANCES, tiny_model, trainer_losses

import fastft

peft = pytest.importorskip("peft", reason="PEFT is the oracle; install fastft[test]")


def test_trainer_loss_curve_matches_peft(tmp_path):
    base = tiny_model("llama", torch.float32).train()
    ours = copy.deepcopy(base)
    config = fastft.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "gate_proj", "down_proj"])
    fastft.patch(ours, config)
    names = [n for n, m in ours.named_modules() if isinstance(m, fastft.nn.LoRALinear)]
    twin = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=names))
    with torch.no_grad():  # same initial adapter (A random, B zero) in both
        for name in names:
            twin.base_model.model.get_submodule(name).lora_A["default"].weight.copy_(ours.get_submodule(name).lora_A)
    ours_losses = trainer_losses(ours, tmp_path / "fastft")
    peft_losses = trainer_losses(twin, tmp_path / "peft")
    assert len(ours_losses) == len(peft_losses) == 8
    assert ours_losses[-1] < ours_losses[0]  # it learns
    torch.testing.assert_close(torch.tensor(ours_losses), torch.tensor(peft_losses), **TOLERANCES[torch.float32])

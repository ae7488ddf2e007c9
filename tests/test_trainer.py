"""A short transformers Trainer run: fastft LoRA's loss curve equals PEFT LoRA's step by step."""
import copy

import pytest
import torch
from helpers import TOLERANCES, tiny_model

import fastft

peft = pytest.importorskip("peft", reason="PEFT is the oracle; install fastft[test]")
transformers = pytest.importorskip("transformers")


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n=32, length=16, vocab=96, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def train(model, tmp_path, name, steps=8):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=steps, learning_rate=5e-3,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0, save_strategy="no",
        dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData())
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


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
    ours_losses = train(ours, tmp_path, "fastft")
    peft_losses = train(twin, tmp_path, "peft")
    assert len(ours_losses) == len(peft_losses) == 8
    assert ours_losses[-1] < ours_losses[0]  # it learns
    torch.testing.assert_close(torch.tensor(ours_losses), torch.tensor(peft_losses), **TOLERANCES[torch.float32])

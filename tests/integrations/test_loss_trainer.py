"""transformers Trainer with a fused loss: gradient accumulation over micro-batches of unequal valid-token counts.

Trainer counts the valid (shifted) labels of all micro-batches of an optimizer step and passes that count
as ``num_items_in_batch`` to a forward that takes ``**kwargs``; the fused loss divides by it, so the
accumulated gradient is the gradient of the whole step's mean.
"""
import copy

import pytest
import torch
from helpers import TOLERANCES, tiny_model

import fastft
import fastft.nn.fused_loss as loss_method

transformers = pytest.importorskip("transformers")


class PromptData(torch.utils.data.Dataset):
    """Token rows whose first 0..11 labels are masked (a prompt), so micro-batches differ in valid counts."""

    def __init__(self, n=16, length=16, vocab=96, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)
        self.prompt = torch.randint(0, 12, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].clone()
        labels[: self.prompt[i]] = -100
        return {"input_ids": self.ids[i], "labels": labels}


def train(model, tmp_path, name, steps=4):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / name), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=steps, learning_rate=2e-3, logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0,
        save_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=PromptData())
    assert trainer.model_accepts_loss_kwargs  # so Trainer passes num_items_in_batch to the forward
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_ce_loss_curve_equals_transformers(tmp_path):
    base = tiny_model("llama", torch.float32).train()
    ours = copy.deepcopy(base)
    fastft.patch(ours, fastft.LossConfig(kind="ce"))
    want = train(base, tmp_path, "transformers")
    got = train(ours, tmp_path, "fastft")
    assert len(got) == len(want) == 4
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), **TOLERANCES[torch.float32])


def test_trainer_dft_passes_num_items_and_learns(tmp_path, monkeypatch):
    model = tiny_model("llama", torch.float32).train()
    fastft.patch(model, fastft.LossConfig(kind="dft"))
    seen = []
    op = loss_method.linear_cross_entropy

    def spy(hidden, weight, labels, *args, **kwargs):
        seen.append((kwargs["num_items_in_batch"], int((labels != -100).sum())))
        return op(hidden, weight, labels, *args, **kwargs)

    def data_nll():  # mean cross-entropy of the data: what learning lowers (DFT's own value need not fall)
        data = PromptData()
        with torch.no_grad():
            logits = model(input_ids=data.ids, labels=data.ids, return_logits=True).logits
        labels = torch.stack([data[i]["labels"] for i in range(len(data))])
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), labels[:, 1:].reshape(-1))

    before = data_nll()
    monkeypatch.setattr(loss_method, "linear_cross_entropy", spy)
    losses = train(model, tmp_path, "dft", steps=6)
    seen = seen[:12]
    assert len(seen) == 12 and all(torch.is_tensor(n) for n, _ in seen)
    for step in range(6):  # both micro-batches of a step divide by the valid count of the two together
        (n_a, count_a), (n_b, count_b) = seen[2 * step], seen[2 * step + 1]
        assert int(n_a) == int(n_b) == count_a + count_b
    assert len({count for _, count in seen}) > 1  # the micro-batches do differ
    assert all(torch.isfinite(torch.tensor(losses)))
    assert data_nll() < before - 0.05

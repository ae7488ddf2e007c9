"""TRL's SFTTrainer on fastft-patched models: LoRA trains unchanged; a fastft fused loss is either used
(fastft.integrations.FastFTSFTTrainer) or the conflict is a clear error (plain SFTTrainer)."""
import pytest
import torch
from helpers import TOLERANCES, tiny_model

import fastft
import fastft.nn.fused_loss as loss_method

trl = pytest.importorskip("trl", reason="TRL is an optional integration; install fastft[test]")
datasets = pytest.importorskip("datasets", reason="TRL's trainers take a datasets.Dataset (installed with trl)")
transformers = pytest.importorskip("transformers")

PAD, EOS = 94, 95


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer over the tiny models' 96 ids, built in memory (nothing is downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(PAD)} | {"<pad>": PAD, "<eos>": EOS}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def dataset():
    """Pre-tokenized rows of unequal lengths (SFTTrainer pads them and masks the padding in the labels)."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(6, 16, (16,), generator=g)
    rows = [torch.randint(0, PAD, (int(n),), generator=g).tolist() + [EOS] for n in lengths]
    return datasets.Dataset.from_dict({"input_ids": rows})


def sft(model, tokenizer, tmp_path, trainer_class=None, steps=4):
    model.config.pad_token_id, model.config.eos_token_id = PAD, EOS
    args = trl.SFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps, learning_rate=5e-3, logging_steps=1,
        report_to=[], use_cpu=True, seed=0, data_seed=0, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, max_length=None,
    )
    cls = trainer_class or trl.SFTTrainer
    return cls(model=model, args=args, train_dataset=dataset(), processing_class=tokenizer)


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_sft_trainer_trains_fastft_lora(tokenizer, tmp_path):
    model = tiny_model("llama").train()
    fastft.patch(model, fastft.LoRAConfig(r=4))
    trainer = sft(model, tokenizer, tmp_path)
    trainer.train()
    assert model.model.layers[0].gradient_checkpointing  # SFTConfig checkpoints by default: covered too
    got = losses(trainer)
    assert len(got) == 4 and all(torch.isfinite(torch.tensor(got)))
    assert all(m.lora_B.abs().max() > 0 for m in model.modules() if isinstance(m, fastft.nn.LoRALinear))
    assert "mean_token_accuracy" in trainer.state.log_history[0]  # TRL's own fused head ran


def test_plain_sft_trainer_with_loss_config_is_a_clear_error(tokenizer, tmp_path):
    model = tiny_model("llama").train()
    fastft.patch(model, [fastft.LoRAConfig(r=4), fastft.LossConfig()])
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = sft(model, tokenizer, tmp_path)
    with pytest.raises(ValueError, match="FastFTSFTTrainer"):
        trainer.train()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # refused before any step


@pytest.mark.parametrize("configs", ["loss", "lora-head"])
def test_fastft_sft_trainer_uses_fastfts_loss(tokenizer, tmp_path, monkeypatch, configs):
    from fastft.integrations import FastFTSFTTrainer

    model = tiny_model("llama").train()
    twin = tiny_model("llama").train()
    if configs == "loss":  # the fused loss: every step's loss comes from fastft's op, equal to TRL's NLL at step 1
        fastft.patch(model, [fastft.LoRAConfig(r=4), fastft.LossConfig()])
        fastft.patch(twin, fastft.LoRAConfig(r=4))
    else:  # a LoRA lm_head, which TRL's fused head cannot train (it reads lm_head.weight)
        fastft.patch(model, fastft.LoRAConfig(r=4, targets=["q_proj", "lm_head"]))
        fastft.patch(twin, fastft.LoRAConfig(r=4, targets=["q_proj"]))
    seen = []
    op = loss_method.linear_cross_entropy

    def spy(*args, **kwargs):
        loss = op(*args, **kwargs)
        seen.append(float(loss.detach()))
        return loss

    monkeypatch.setattr(loss_method, "linear_cross_entropy", spy)
    trainer = sft(model, tokenizer, tmp_path / "fastft", FastFTSFTTrainer)
    trainer.train()
    got = losses(trainer)
    assert len(got) == 4 and all(torch.isfinite(torch.tensor(got)))
    if configs == "loss":
        torch.testing.assert_close(torch.tensor(got), torch.tensor(seen), **TOLERANCES[torch.float32])
    else:
        assert seen == [] and model.lm_head.lora_B.abs().max() > 0
    reference = sft(twin, tokenizer, tmp_path / "trl")  # plain SFTTrainer, TRL's fused NLL
    reference.train()
    torch.testing.assert_close(torch.tensor(got[0]), torch.tensor(losses(reference)[0]), **TOLERANCES[torch.float32])

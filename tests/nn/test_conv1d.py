"""GPT-2-family Conv1D layers (weights stored in×out): LoRA and DoRA match PEFT (which sets fan_in_fan_out for
them) in logits, gradients, export / import in both directions and merge; QAT and S²FT refuse them by name."""
from __future__ import annotations

import copy
import tempfile

import pytest
import torch

import fastft
from fastft.nn import LoRALinear

tf = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _gpt2():
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)
    return tf.GPT2LMHeadModel(cfg).eval()


def _randomize(model):
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.2)


@pytest.mark.parametrize("dora", [False, True])
def test_gpt2_matches_peft_export_import_merge(dora):
    model = _gpt2()
    base = copy.deepcopy(model)
    report = fastft.patch(model, fastft.LoRAConfig(r=4, alpha=8, dora=dora))
    assert {row.name.rsplit(".", 1)[-1] for row in report} == {"c_attn", "c_proj", "c_fc"}
    assert len(report) == 8 and all(m.fan_in_fan_out for m in model.modules() if isinstance(m, LoRALinear))
    _randomize(model)
    ids = torch.randint(0, 64, (2, 7))
    logits = model(input_ids=ids).logits
    with tempfile.TemporaryDirectory() as d:
        fastft.export_peft(model, d)
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), d).eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, logits, atol=1e-5, rtol=1e-5)
        again = copy.deepcopy(base)
        fastft.from_peft(again, d)  # fan_in_fan_out=True is read
        torch.testing.assert_close(again(input_ids=ids).logits, logits, atol=1e-6, rtol=1e-6)
    # PEFT -> fastft: a PEFT adapter trained on GPT-2 (fan_in_fan_out=True)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                                    fan_in_fan_out=True, use_dora=dora))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)
    pm.eval()
    with tempfile.TemporaryDirectory() as d:
        pm.save_pretrained(d)
        ours = copy.deepcopy(base)
        fastft.from_peft(ours, d)
        torch.testing.assert_close(ours(input_ids=ids).logits, pm(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    # gradients against PEFT on the same adapter
    x = model.transformer.wte(ids).detach().requires_grad_(True)
    model(inputs_embeds=x).logits.square().mean().backward()
    with tempfile.TemporaryDirectory() as d:
        fastft.export_peft(model, d)
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), d, is_trainable=True)
    x2 = x.detach().clone().requires_grad_(True)
    loaded.eval()
    loaded(inputs_embeds=x2).logits.square().mean().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-6, rtol=1e-5)
    fastft.unpatch(model, merge=True)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    torch.testing.assert_close(model(input_ids=ids).logits, logits, atol=1e-5, rtol=1e-5)


def test_gpt2_trains_with_inplace_safe_layers():
    model = _gpt2()
    fastft.patch(model, fastft.LoRAConfig(r=4, dora=True))
    model.train()
    ids = torch.randint(0, 64, (2, 7))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_qat_and_s2ft_refuse_conv1d_by_name():
    with pytest.raises(TypeError, match="Conv1D"):
        fastft.patch(_gpt2(), fastft.QATConfig(group_size=8, rotations=()))
    # S²FT's structure (attention heads of o_proj, FFN channels of down_proj) is named; GPT-2 has neither
    with pytest.raises(ValueError, match="matches no module in GPT2LMHeadModel"):
        fastft.patch(_gpt2(), fastft.S2FTConfig())

"""The zoo: tiny random models of many transformers architectures, fastft all-linear LoRA against PEFT's all-linear
on the adapted modules, logits, input gradients, a training step, export round trip and merge.

A curated list (built tiny from config classes, nothing downloaded), not an enumeration of every auto-mapping
entry: that would exceed the test's time budget. The support table in docs/support.md comes from this list.
``EXPECTED_DIFF`` names, per architecture, what PEFT's all-linear takes that fastft's does not (and why)."""
from __future__ import annotations

import copy
import tempfile

import pytest
import torch
from torch import nn

import fastft

tf = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

C = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
ZOO = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**C, intermediate_size=40, num_key_value_heads=2)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**C, intermediate_size=40, num_key_value_heads=2)),
    "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**C, intermediate_size=40, num_key_value_heads=2, head_dim=8)),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**C, intermediate_size=40, num_key_value_heads=2)),
    "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**C, intermediate_size=40, num_key_value_heads=2, head_dim=8)),
    "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**C, intermediate_size=40, num_key_value_heads=2, pad_token_id=0)),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)),
    "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**C, intermediate_size=40)),
    "falcon": lambda: tf.FalconForCausalLM(tf.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)),
    "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=40, word_embed_proj_dim=32)),
    "bloom": lambda: tf.BloomForCausalLM(tf.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)),
    "t5": lambda: tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_heads=4, decoder_start_token_id=0)),
    "bart": lambda: tf.BartForConditionalGeneration(tf.BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=40, decoder_ffn_dim=40, max_position_embeddings=32)),
    "qwen3_moe": lambda: tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**C, intermediate_size=40, moe_intermediate_size=16, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, head_dim=8)),
    "mixtral": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**C, intermediate_size=24, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
}
# what PEFT's all-linear adapts that fastft's does not, by leaf name
EXPECTED_DIFF = {
    "qwen3_moe": {"gate"},  # the router: PEFT's load-time conversion adds gate.weight; fastft leaves routers alone
    "mixtral": {"gate"},
}


def _peft_names(model) -> set[str]:
    names = set()
    for n, m in model.named_modules():
        if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and m.lora_A:
            n = n.removeprefix("base_model.model.")
            while n.endswith(".base_layer"):
                n = n.removesuffix(".base_layer")
            names.add(n)
    return names


@pytest.mark.parametrize("arch", sorted(ZOO))
def test_zoo(arch):
    torch.manual_seed(0)
    base = ZOO[arch]().eval()
    model = copy.deepcopy(base)
    report = fastft.patch(model, fastft.LoRAConfig(r=2, alpha=4))
    ours = {row.name for row in report}
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    theirs = _peft_names(pm)
    extra = {n.rsplit(".", 1)[-1] for n in theirs - ours}
    assert ours <= theirs, f"fastft adapts modules PEFT does not: {sorted(ours - theirs)[:5]}"
    assert extra == EXPECTED_DIFF.get(arch, set()), f"PEFT also adapts {sorted(theirs - ours)[:6]}"
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    ids = torch.randint(1, 64, (2, 6))
    kwargs = {"decoder_input_ids": ids} if arch in ("t5", "bart") else {}
    x = base.get_input_embeddings()(ids).detach()
    x1 = x.clone().requires_grad_(True)
    logits = model(inputs_embeds=x1, **kwargs).logits
    with tempfile.TemporaryDirectory() as d:
        fastft.export_peft(model, d)
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), d, is_trainable=True).eval()
        again = copy.deepcopy(base)
        fastft.from_peft(again, d)
    x2 = x.clone().requires_grad_(True)
    peft_logits = loaded(inputs_embeds=x2, **kwargs).logits
    torch.testing.assert_close(peft_logits, logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(again(inputs_embeds=x, **kwargs).logits, logits, atol=1e-6, rtol=1e-5)
    logits.square().mean().backward()
    peft_logits.square().mean().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=1e-4)
    # one training step
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    model.eval()
    after = model(input_ids=ids, **kwargs).logits
    fastft.unpatch(model, merge=True)
    torch.testing.assert_close(model(input_ids=ids, **kwargs).logits, after, atol=1e-5, rtol=1e-4)

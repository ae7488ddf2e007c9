"""Every layer stack (encoder, decoder, both stacks of an encoder–decoder, vision towers) is taken by
``targets='all-linear'``, the report says per stack what was taken, and a patched layer looks like the layer it
replaced to model code (weight, bias, in/out features, dtype and device reads)."""
from __future__ import annotations

import copy
import tempfile

import pytest
import torch
from torch import nn

import fastft
from fastft.nn import LoRALinear
from fastft.targets import find_layer_stacks

tf = pytest.importorskip("transformers")


def _t5():
    torch.manual_seed(0)
    cfg = tf.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0)
    return tf.T5ForConditionalGeneration(cfg).eval()


def test_t5_takes_encoder_and_decoder():
    model = _t5()
    stacks = [s.prefix for s in find_layer_stacks(model)]
    assert stacks == ["encoder.block", "decoder.block"]
    report = fastft.patch(model, fastft.LoRAConfig(r=4))
    names = [row.name for row in report]
    # encoder: q k v o wi wo (6 a block); decoder: self q k v o, cross q k v o, wi wo (10 a block)
    assert len(names) == 2 * 6 + 3 * 10
    assert any(".EncDecAttention.q" in n for n in names) and any(n.startswith("encoder.") for n in names)
    assert "lm_head" not in names
    notes = "\n".join(report.notes)
    assert "stack 'encoder.block' (2 blocks): 12 modules" in notes
    assert "stack 'decoder.block' (3 blocks): 30 modules" in notes
    assert "stack 'encoder.block'" in str(report)


def test_t5_matches_peft_and_trains():
    peft = pytest.importorskip("peft")
    model = _t5()
    base = copy.deepcopy(model)
    report = fastft.patch(model, fastft.LoRAConfig(r=4, alpha=8))
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    peft_names = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and isinstance(getattr(m, "lora_A"), nn.ModuleDict)}
    assert {row.name for row in report} == peft_names
    ids = torch.randint(1, 64, (2, 6))
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):  # 'LoRALinear' object has no attribute 'weight' used to fail here (T5 reads wo.weight.dtype)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss)
    model.eval()
    with tempfile.TemporaryDirectory() as d:
        fastft.export_peft(model, d)
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), d).eval()
        torch.testing.assert_close(loaded(input_ids=ids, labels=ids).logits, model(input_ids=ids, labels=ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_bart_and_vision_tower_stacks():
    torch.manual_seed(0)
    bart = tf.BartForConditionalGeneration(tf.BartConfig(
        vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=40, decoder_ffn_dim=40, max_position_embeddings=32))
    report = fastft.patch(bart, fastft.LoRAConfig(r=2))
    prefixes = {row.name.split(".layers.")[0] for row in report}
    assert prefixes == {"model.encoder", "model.decoder"}
    assert any("encoder_attn" in row.name for row in report)
    vit = tf.ViTForImageClassification(tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                    intermediate_size=40, image_size=16, patch_size=8, num_labels=3))
    report = fastft.patch(vit, fastft.LoRAConfig(r=2))
    assert all(row.name.startswith("vit.layers.") for row in report if row.kind == "lora")
    assert len([row for row in report if row.kind == "lora"]) == 2 * 6


def test_layers_index_applies_per_stack():
    model = _t5()
    report = fastft.patch(model, fastft.LoRAConfig(r=2, layers=[1]))
    assert {row.name.split(".")[0] for row in report} == {"encoder", "decoder"}
    assert all(".block.1." in row.name for row in report)


def test_patched_layer_looks_like_the_layer_it_replaced():
    for dora in (False, True):
        base = nn.Linear(8, 6)
        layer = LoRALinear.from_linear(base, fastft.LoRAConfig(r=2, dora=dora))
        assert layer.weight is base.weight and layer.bias is base.bias
        assert (layer.in_features, layer.out_features) == (8, 6)
        assert layer.weight.dtype == torch.float32 and layer.weight.device.type == "cpu"
        assert "weight" not in dict(layer.named_parameters(recurse=False))  # a view, not a second parameter
        with pytest.raises((AttributeError, KeyError)):
            layer.weight = nn.Parameter(torch.zeros(6, 8))  # read-only


def test_s2ft_and_qat_expose_weight():
    from fastft.nn import QuantLinear, S2FTLinear
    base = nn.Linear(16, 8)
    assert S2FTLinear(base, 4).weight is base.weight
    assert QuantLinear(nn.Linear(16, 8), fastft.QATConfig(group_size=8, rotations=())).bias is not None


def test_no_stack_error_names_the_model():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="found no stack of layers in Flat"):
        fastft.patch(Flat(), fastft.LoRAConfig(r=2))


def _deepseek():
    torch.manual_seed(0)
    cfg = tf.DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
        first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=8, n_group=1, topk_group=1)
    return tf.DeepseekV3ForCausalLM(cfg).eval()


def test_deepseek_export_refuses_what_peft_would_drop():
    """PEFT rewrites targets ending in gate_proj/up_proj/down_proj into expert parameters when it loads a
    deepseek_v3 adapter: an export with adapters on the dense MLP / shared experts must raise, not load wrong."""
    model = _deepseek()
    fastft.patch(model, fastft.LoRAConfig(r=2, targets=["q_a_proj", "mlp.gate_proj", "o_proj"]))
    with tempfile.TemporaryDirectory() as d, pytest.raises(ValueError, match="silently dropped.*mlp.gate_proj"):
        fastft.export_peft(model, d)


def test_deepseek_export_of_attention_reloads_in_peft():
    peft = pytest.importorskip("peft")
    model = _deepseek()
    base = copy.deepcopy(model)
    fastft.patch(model, fastft.LoRAConfig(r=2, targets=["q_a_proj", "q_b_proj", "o_proj"]))
    for module in model.modules():
        if isinstance(module, LoRALinear):
            nn.init.normal_(module.lora_B, std=0.2)
    ids = torch.randint(0, 64, (2, 5))
    with tempfile.TemporaryDirectory() as d:
        fastft.export_peft(model, d)
        loaded = peft.PeftModel.from_pretrained(base, d).eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


class _GroupedLinear(nn.Linear):  # DeepSeek-V4's o_a_proj shape: a forward of its own, not F.linear
    def forward(self, x):
        w = self.weight.view(2, -1, x.shape[-1]).transpose(1, 2)
        return torch.bmm(x.reshape(-1, 2, x.shape[-1]).transpose(0, 1), w).transpose(0, 1).reshape(*x.shape[:-1], -1)


class _PlainSubclass(nn.Linear):  # Falcon's FalconLinear: F.linear written out
    def forward(self, x):
        return x @ self.weight.T


class FalconLinear(_PlainSubclass):
    pass


def _stack(make):
    torch.manual_seed(0)
    return nn.Sequential(nn.ModuleList([nn.ModuleDict({"proj": make(), "up": nn.Linear(8, 8)}) for _ in range(2)]))


def test_linear_subclass_with_its_own_forward_is_refused():
    model = _stack(lambda: _GroupedLinear(8, 8))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"'0\.0\.proj' \(_GroupedLinear\), an nn.Linear subclass with a forward of its own"):
        fastft.patch(model, fastft.LoRAConfig(r=2))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    report = fastft.patch(model, fastft.LoRAConfig(r=2, targets=["up"]))  # leaving it out works
    assert [row.name for row in report] == ["0.0.up", "0.1.up"]


def test_known_plain_linear_subclass_is_adapted():
    assert [row.name for row in fastft.patch(_stack(lambda: FalconLinear(8, 8)), fastft.LoRAConfig(r=2))] == \
        ["0.0.proj", "0.0.up", "0.1.proj", "0.1.up"]
    with pytest.raises(ValueError, match="forward of its own"):
        fastft.patch(_stack(lambda: _PlainSubclass(8, 8)), fastft.LoRAConfig(r=2))

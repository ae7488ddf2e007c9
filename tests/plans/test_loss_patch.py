"""fastft.patch with a LossConfig: the patched CausalLM's fused loss against transformers' own loss path."""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close, assert_model_unchanged, model_snapshot, randomize_lora, tiny_config

import fastft
from fastft.plans.loss import SUPPORTED_MODELS

transformers = pytest.importorskip("transformers")
VOCAB = 96


def tiny(family: str, seed: int = 0):
    """tests/helpers.py's tiny models, plus Qwen3 and Gemma 2 (final logit softcap 30 → 3 here, to bite)."""
    torch.manual_seed(seed)
    if family == "qwen3":
        config = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                          max_position_embeddings=64)
        model = transformers.Qwen3ForCausalLM(config)
    elif family == "gemma2":
        config = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                           max_position_embeddings=64, final_logit_softcapping=3.0)
        model = transformers.Gemma2ForCausalLM(config)
    else:
        cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
               "mistral": transformers.MistralForCausalLM, "gemma": transformers.GemmaForCausalLM}[family]
        model = cls(tiny_config(family))
    with torch.no_grad():  # a less uniform head, so the loss is not log(V) everywhere
        model.get_output_embeddings().weight.mul_(8.0)
    return model.float().train()


def batch(seed: int = 0, batch_size: int = 3, length: int = 12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch_size, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # right padding
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[2, :5] = -100  # a prompt
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def loss_and_grads(model, inputs, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


FAMILIES = ["llama", "qwen2", "mistral", "gemma", "qwen3", "gemma2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_ce_equals_transformers_loss_and_gradients(family):
    model = tiny(family)
    ours = copy.deepcopy(model)
    report = fastft.patch(ours, fastft.LossConfig())
    assert [row.kind for row in report] == ["loss-ce"] and report.modules[0].name == "lm_head"
    assert report.trainable_params == report.total_params  # a lone LossConfig freezes nothing
    inputs = batch()
    want, want_grads = loss_and_grads(model, inputs)
    got, got_grads = loss_and_grads(ours, inputs)
    assert got.logits is None  # train mode: no logits
    assert_close(got.loss, want.loss, torch.float32, msg="loss")
    assert set(got_grads) == set(want_grads)
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name], torch.float32, msg=name)


def test_gemma2_softcap_is_the_models():
    model = tiny("gemma2")
    ours = copy.deepcopy(model)
    report = fastft.patch(ours, fastft.LossConfig())
    assert "softcap=3" in report.modules[0].detail
    inputs = batch(1)
    unpatched_loss = model(**inputs).loss
    assert_close(ours(**inputs).loss, unpatched_loss, torch.float32)
    plain = copy.deepcopy(model)
    plain.config.final_logit_softcapping = None
    assert (plain(**inputs).loss - unpatched_loss).abs() > 1e-3  # the cap matters at c=3
    capped = copy.deepcopy(model)
    before = model_snapshot(capped)
    with pytest.raises(ValueError, match="already softcaps"):
        fastft.patch(capped, fastft.LossConfig(logit_softcap=10.0))
    assert_model_unchanged(capped, before)


def test_num_items_in_batch_and_shift_labels_follow_transformers():
    model = tiny("llama")
    ours = copy.deepcopy(model)
    fastft.patch(ours, fastft.LossConfig())
    inputs = batch(2)
    for extra in (dict(num_items_in_batch=torch.tensor(57)), dict(num_items_in_batch=40)):
        assert_close(ours(**inputs, **extra).loss, model(**inputs, **extra).loss, torch.float32)
    shifted = torch.roll(inputs["labels"], -1, dims=1)
    shifted[:, -1] = -100
    shifted[0, 3] = -100
    assert_close(ours(**inputs, shift_labels=shifted).loss, model(**inputs, shift_labels=shifted).loss, torch.float32)


def test_logits_only_when_asked():
    model = tiny("qwen2")
    ours = copy.deepcopy(model)
    fastft.patch(ours, fastft.LossConfig())
    inputs = batch(3)
    want = model(**inputs)
    assert ours(**inputs).logits is None
    forced = ours(**inputs, return_logits=True)
    assert_close(forced.logits, want.logits, torch.float32)
    assert_close(forced.loss, want.loss, torch.float32)
    ours.eval()
    model.eval()
    evaluated = ours(**inputs)
    assert_close(evaluated.logits, model(**inputs).logits, torch.float32)
    assert ours(**inputs, return_logits=False).logits is None
    no_labels = dict(inputs)
    no_labels.pop("labels")
    assert_close(ours(**no_labels).logits, model(**no_labels).logits, torch.float32)  # the class forward
    tup = ours(**inputs, return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], evaluated.loss)


def test_logits_to_keep_with_matching_labels():
    model = tiny("llama")
    ours = copy.deepcopy(model)
    fastft.patch(ours, fastft.LossConfig())
    inputs = batch(4)
    inputs["labels"] = inputs["labels"][:, -5:]
    assert_close(ours(**inputs, logits_to_keep=5).loss, model(**inputs, logits_to_keep=5).loss, torch.float32)
    before = model_snapshot(ours)
    with pytest.raises(ValueError, match="logits_to_keep=3"):
        ours(**inputs, logits_to_keep=3)
    assert_model_unchanged(ours, before)


@pytest.mark.parametrize("kind", ["dft", "talr"])
def test_other_kinds_equal_the_op_on_the_shifted_hidden_states(kind):
    model = tiny("llama")
    ours = copy.deepcopy(model)
    fastft.patch(ours, fastft.LossConfig(kind=kind, label_smoothing=0.1, z_loss=1e-3))
    inputs = batch(5)
    hidden = model.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    labels = torch.nn.functional.pad(inputs["labels"], (0, 1), value=-100)[:, 1:]
    want = fastft.ops.linear_cross_entropy(hidden, model.lm_head.weight, labels, kind=kind, label_smoothing=0.1,
                                           z_loss=1e-3)
    assert_close(ours(**inputs).loss, want, torch.float32)


def test_with_lora_in_the_same_call():
    base = tiny("llama")
    plain_lora = copy.deepcopy(base)
    fused = copy.deepcopy(base)
    lora = fastft.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    fastft.patch(plain_lora, lora)
    report = fastft.patch(fused, [lora, fastft.LossConfig(kind="ce")])
    randomize_lora(plain_lora)
    randomize_lora(fused)
    assert {row.kind for row in report} == {"lora", "loss-ce"}
    assert report.modules[-1].trainable == 0  # lm_head frozen by LoRA's rule
    inputs = batch(6)
    want, want_grads = loss_and_grads(plain_lora, inputs)
    got, got_grads = loss_and_grads(fused, inputs)
    assert_close(got.loss, want.loss, torch.float32)
    assert set(got_grads) == set(want_grads) and all("lora_" in n for n in got_grads)
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name], torch.float32, msg=name)
    fastft.unpatch(fused, merge=False)
    assert "forward" not in fused.__dict__
    assert_close(fused(**inputs).loss, base(**inputs).loss, torch.float32)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_lora_on_lm_head_is_computed_through(dropout):
    """LoRA targeting lm_head: the fused loss adds s·dropout(h)Aᵀ·Bᵀ, so A and B of lm_head train as without it."""
    base = tiny("qwen2")
    lora = fastft.LoRAConfig(r=4, alpha=8, dropout=dropout, targets=["v_proj", "lm_head"])
    plain_lora, fused = copy.deepcopy(base), copy.deepcopy(base)
    fastft.patch(plain_lora, lora)
    report = fastft.patch(fused, [fastft.LossConfig(kind="ce"), lora])
    randomize_lora(plain_lora)
    randomize_lora(fused)
    assert "through LoRA r=4" in [row for row in report if row.kind == "loss-ce"][0].detail
    inputs = batch(9)
    torch.manual_seed(123)
    want, want_grads = loss_and_grads(plain_lora, inputs)
    torch.manual_seed(123)
    got, got_grads = loss_and_grads(fused, inputs)
    assert any(name.startswith("lm_head.lora_") for name in got_grads)
    assert_close(got.loss, want.loss, torch.float32)
    assert set(got_grads) == set(want_grads)
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name], torch.float32, msg=name)
    fused.eval()
    plain_lora.eval()
    assert_close(fused(**inputs).logits, plain_lora(**inputs).logits, torch.float32)


def test_other_adapters_on_lm_head_are_refused_before_anything_changes():
    class Wrapped(torch.nn.Module):  # some adapter layer fastft cannot compute through
        def __init__(self, layer):
            super().__init__()
            self.base_layer = layer

        def forward(self, x):
            return self.base_layer(x)

    model = tiny("llama")
    model.lm_head = Wrapped(model.lm_head)
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="never train"):
        fastft.patch(model, fastft.LossConfig())
    assert not fastft.is_patched(model) and "forward" not in model.__dict__
    assert_model_unchanged(model, before)


def test_lora_over_a_4bit_lm_head_is_refused_before_anything_changes():
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny("llama")
    head = bnb.nn.Linear4bit(64, VOCAB, bias=False, compute_dtype=torch.float32)
    head.load_state_dict(model.lm_head.state_dict())
    model.lm_head = head = head.to("cpu")  # bitsandbytes quantizes on the move
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="quantized"):
        fastft.patch(model, fastft.LossConfig())
    assert_model_unchanged(model, before)
    with pytest.raises(ValueError, match="quantized"):  # the LoRA plan would wrap it: refused by the cross-plan check
        fastft.patch(model, [fastft.LoRAConfig(r=4, targets=["q_proj", "lm_head"]), fastft.LossConfig()])
    assert not fastft.is_patched(model) and "forward" not in model.__dict__
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear and model.lm_head is head
    assert_model_unchanged(model, before)


def test_unsupported_model_and_bad_config_are_clear_errors():
    config = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=2)
    mixtral = transformers.MixtralForCausalLM(config)
    before = model_snapshot(mixtral)
    with pytest.raises(ValueError, match="supports"):
        fastft.patch(mixtral, fastft.LossConfig())
    assert_model_unchanged(mixtral, before)
    for bad in (dict(kind="focal"), dict(label_smoothing=1.5), dict(z_loss=-1.0), dict(logit_softcap=0.0),
                dict(chunk_size=0), dict(talr_min_weight=2.0)):
        with pytest.raises(ValueError, match="LossConfig"):
            fastft.LossConfig(**bad)
    model = tiny("llama")
    fastft.patch(model, fastft.LossConfig())
    inputs = batch(7)
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="labels give targets of shape"):
        model(input_ids=inputs["input_ids"], labels=inputs["labels"][:, :-2])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(input_ids=inputs["input_ids"], labels=inputs["labels"].clamp_min(0) + VOCAB)
    assert_model_unchanged(model, before)
    all_ignored = torch.full_like(inputs["labels"], -100)
    out = model(input_ids=inputs["input_ids"], labels=all_ignored)
    assert out.loss.item() == 0.0  # documented: nothing to learn from is a zero loss, never NaN


def test_save_load_and_deepcopy(tmp_path):
    base = tiny("llama")
    model = copy.deepcopy(base)
    fastft.patch(model, [fastft.LoRAConfig(r=4, targets=["q_proj"]), fastft.LossConfig(kind="dft", z_loss=1e-3)])
    randomize_lora(model)
    inputs = batch(8)
    want = model(**inputs).loss
    fastft.save(model, tmp_path / "adapter")
    fresh = copy.deepcopy(base)
    report = fastft.load(fresh, tmp_path / "adapter")
    assert {row.kind for row in report} == {"lora", "loss-dft"}
    assert_close(fresh(**inputs).loss, want, torch.float32)
    fastft.export_peft(model, tmp_path / "peft")  # the loss adds no adapter: the LoRA part exports alone
    assert (tmp_path / "peft" / "adapter_config.json").exists()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm_head.weight.mul_(0.5)  # the copy computes with its own weights
    assert (twin(**inputs).loss - want).abs() > 1e-4
    assert_close(model(**inputs).loss, want, torch.float32)


def test_supported_list_is_what_is_tested():
    names = {type(tiny(f)).__name__ for f in FAMILIES}
    assert names == set(SUPPORTED_MODELS)

"""PEFT is the oracle: same weights give the same logits and gradients; adapters cross over both ways."""
import copy

import pytest
import torch
from helpers import assert_close, assert_model_unchanged, model_snapshot, randomize_lora, tiny_model

import fastft

peft = pytest.importorskip("peft", reason="PEFT is the LoRA oracle; install fastft[test]")

FAMILIES = ["llama", "qwen2", "mistral", "gemma"]


def batch(vocab=96, seed=0, shape=(2, 11)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, shape, generator=g)
    return dict(input_ids=ids, labels=ids)


def lora_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, fastft.nn.LoRALinear)}


def peft_twin(base, fast_model, config: fastft.LoRAConfig):
    """A PEFT LoRA model on ``base`` patching the same modules, with fastft's adapter weights copied in."""
    names = list(lora_modules(fast_model))
    peft_config = peft.LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=names,
        use_rslora=config.rslora, init_lora_weights=False,
    )
    twin = peft.get_peft_model(base, peft_config)
    with torch.no_grad():
        for name, module in lora_modules(fast_model).items():
            target = twin.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(module.lora_A)
            target.lora_B["default"].weight.copy_(module.lora_B)
    return twin


def forward_backward(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("family", FAMILIES)
def test_same_logits_and_gradients_as_peft(family, dtype):
    base = tiny_model(family, dtype)
    ours = copy.deepcopy(base)
    config = fastft.LoRAConfig(r=4, alpha=8, rslora=family == "mistral")
    report = fastft.patch(ours, config)
    assert len(report) == 2 * 7
    randomize_lora(ours)
    twin = peft_twin(base, ours, config)
    inputs = batch()
    logits, loss = forward_backward(ours, inputs)
    twin_logits, twin_loss = forward_backward(twin, inputs)
    assert_close(logits, twin_logits, dtype)
    assert_close(loss, twin_loss, dtype)
    for name, module in lora_modules(ours).items():
        target = twin.base_model.model.get_submodule(name)
        assert_close(module.lora_A.grad, target.lora_A["default"].weight.grad, dtype, msg=f"{name} dA")
        assert_close(module.lora_B.grad, target.lora_B["default"].weight.grad, dtype, msg=f"{name} dB")


def test_dropout_with_a_seeded_mask_matches_peft():
    """LoRA dropout: PEFT's dropout slot draws the mask exactly as fastft does, so one seed gives both the same
    mask; logits and every gradient then agree, and the mask is not the identity."""
    from test_dora_peft import SeededDropout

    base = tiny_model("qwen2", torch.float64).train()
    ours = copy.deepcopy(base)
    config = fastft.LoRAConfig(r=4, alpha=8, dropout=0.25, targets=["q_proj", "v_proj", "down_proj"])
    fastft.patch(ours, config)
    randomize_lora(ours)
    twin = peft_twin(base, ours, config).train()
    for name in lora_modules(ours):
        twin.base_model.model.get_submodule(name).lora_dropout["default"] = SeededDropout(0.25)
    inputs = batch()
    torch.manual_seed(7)
    logits, loss = forward_backward(ours, inputs)
    torch.manual_seed(7)
    twin_logits, twin_loss = forward_backward(twin, inputs)
    assert_close(logits, twin_logits)
    assert_close(loss, twin_loss)
    for name, module in lora_modules(ours).items():
        target = twin.base_model.model.get_submodule(name)
        assert_close(module.lora_A.grad, target.lora_A["default"].weight.grad, msg=f"{name} dA")
        assert_close(module.lora_B.grad, target.lora_B["default"].weight.grad, msg=f"{name} dB")
    with torch.no_grad():
        assert (ours.eval()(**inputs).logits - logits).abs().max() > 1e-6  # the mask dropped something


@pytest.mark.parametrize("family", FAMILIES)
def test_export_peft_loads_in_peft_with_identical_logits(family, tmp_path):
    base = tiny_model(family, torch.float64)
    ours = copy.deepcopy(base)
    fastft.patch(ours, fastft.LoRAConfig(r=4, alpha=16, targets=["q_proj", "v_proj", "down_proj"]))
    randomize_lora(ours)
    fastft.export_peft(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    inputs = batch()
    with torch.no_grad():
        assert_close(ours(**inputs).logits, loaded(**inputs).logits)


def test_from_peft_round_trip(tmp_path):
    base = tiny_model("qwen2", torch.float64)
    twin = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=3, lora_alpha=5, target_modules=["k_proj", "o_proj", "up_proj"], init_lora_weights=False),
    )
    twin.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    report = fastft.from_peft(ours, tmp_path / "peft")
    assert len(report) == 6 and {m.kind for m in report} == {"lora"}
    inputs = batch()
    with torch.no_grad():
        assert_close(ours(**inputs).logits, twin(**inputs).logits)
    # and back out again: export_peft of what from_peft read gives the same adapter
    fastft.export_peft(ours, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "again")
    with torch.no_grad():
        assert_close(again(**inputs).logits, twin(**inputs).logits)


def test_pissa_exports_as_equivalent_lora_on_the_original_base(tmp_path):
    base = tiny_model("llama", torch.float64)
    ours = copy.deepcopy(base)
    fastft.patch(ours, fastft.LoRAConfig(r=4, alpha=8, init="pissa", targets=["q_proj", "gate_proj"]))
    inputs = batch()
    with torch.no_grad():
        assert_close(ours(**inputs).logits, base(**inputs).logits)  # PiSSA leaves the model unchanged at init
        for module in lora_modules(ours).values():  # "train" a little
            module.lora_A.add_(0.05 * torch.randn_like(module.lora_A))
            module.lora_B.add_(0.05 * torch.randn_like(module.lora_B))
    fastft.export_peft(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        assert_close(ours(**inputs).logits, loaded(**inputs).logits)


def test_from_peft_refuses_what_it_cannot_read(tmp_path):
    base = tiny_model("llama", torch.float32)
    twin = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}),
    )
    twin.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="rank_pattern"):
        fastft.from_peft(model, tmp_path)
    assert not fastft.is_patched(model)
    assert_model_unchanged(model, before)


def test_patching_a_peft_model_points_to_from_peft():
    twin = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    before = model_snapshot(twin)
    with pytest.raises(ValueError, match="from_peft"):
        fastft.patch(twin, fastft.LoRAConfig())
    assert_model_unchanged(twin, before)


def test_bf16_autocast_matches_peft():
    base = tiny_model("llama", torch.float32)
    ours = copy.deepcopy(base)
    config = fastft.LoRAConfig(r=4, alpha=8)
    fastft.patch(ours, config)
    randomize_lora(ours)
    twin = peft_twin(base, ours, config)
    inputs = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = forward_backward(ours, inputs)
        twin_logits, _ = forward_backward(twin, inputs)
    assert logits.dtype == twin_logits.dtype == torch.bfloat16
    assert_close(logits, twin_logits, torch.bfloat16)
    for name, module in lora_modules(ours).items():
        target = twin.base_model.model.get_submodule(name)
        assert module.lora_A.grad.dtype == module.lora_B.grad.dtype == torch.float32
        assert_close(module.lora_A.grad, target.lora_A["default"].weight.grad, torch.bfloat16, msg=f"{name} dA")
        assert_close(module.lora_B.grad, target.lora_B["default"].weight.grad, torch.bfloat16, msg=f"{name} dB")

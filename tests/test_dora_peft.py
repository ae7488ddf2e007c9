"""PEFT DoRA is the oracle: same weights give the same logits and gradients (A, B, magnitude); adapters cross
over both ways; dropout follows PEFT's semantics; a Trainer run follows PEFT DoRA's loss curve."""
import copy

import pytest
import torch
from helpers import TOLERANCES, assert_close, quantize_linears, tiny_model, trainer_losses

import fastft
from fastft.nn import DoRALinear

peft = pytest.importorskip("peft", reason="PEFT is the DoRA oracle; install fastft[test]")

FAMILIES = ["llama", "qwen2", "gemma"]


def batch(vocab=96, seed=0, shape=(2, 11)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, shape, generator=g)
    return dict(input_ids=ids, labels=ids)


def dora_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, DoRALinear)}


def randomize_dora(model, seed=1, std=0.1):
    """Non-zero A and B, and a magnitude away from its initial row norms (so g != 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in dora_modules(model).values():
            module.lora_A.copy_(torch.randn(module.lora_A.shape, generator=gen) * std)
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=gen) * std)
            module.lora_magnitude_vector.mul_(0.8 + 0.4 * torch.rand(module.out_features, generator=gen))


def peft_dora_twin(base, fast_model, config: fastft.LoRAConfig):
    """A PEFT DoRA model on ``base`` patching the same modules, with fastft's A, B and magnitude copied in."""
    names = list(dora_modules(fast_model))
    twin = peft.get_peft_model(base, peft.LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=names,
        use_rslora=config.rslora, use_dora=True, init_lora_weights=False,
    ))
    with torch.no_grad():
        for name, module in dora_modules(fast_model).items():
            target = twin.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(module.lora_A)
            target.lora_B["default"].weight.copy_(module.lora_B)
            target.lora_magnitude_vector["default"].weight.copy_(module.lora_magnitude_vector)
    return twin


def forward_backward(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach()


def assert_same_gradients(ours, twin, dtype):
    for name, module in dora_modules(ours).items():
        target = twin.base_model.model.get_submodule(name)
        assert_close(module.lora_A.grad, target.lora_A["default"].weight.grad, dtype, msg=f"{name} dA")
        assert_close(module.lora_B.grad, target.lora_B["default"].weight.grad, dtype, msg=f"{name} dB")
        assert_close(module.lora_magnitude_vector.grad, target.lora_magnitude_vector["default"].weight.grad, dtype,
                     msg=f"{name} dm")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("family", FAMILIES)
def test_same_logits_and_gradients_as_peft_dora(family, dtype):
    base = tiny_model(family, dtype)
    ours = copy.deepcopy(base)
    config = fastft.LoRAConfig(r=4, alpha=8, dora=True, rslora=family == "gemma")
    report = fastft.patch(ours, config)
    assert len(report) == 2 * 7 and {m.kind for m in report} == {"dora"}
    randomize_dora(ours)
    twin = peft_dora_twin(base, ours, config)
    inputs = batch()
    logits, loss = forward_backward(ours, inputs)
    twin_logits, twin_loss = forward_backward(twin, inputs)
    assert_close(logits, twin_logits, dtype)
    assert_close(loss, twin_loss, dtype)
    assert_same_gradients(ours, twin, dtype)


class SeededDropout(torch.nn.Module):
    """PEFT's dropout slot, drawing its mask exactly as fastft does (so one seed gives both the same mask)."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        mask = torch.empty(x.shape, device=x.device).bernoulli_(1.0 - self.p).bool()
        return x * mask / (1.0 - self.p)


def test_dropout_follows_peft_semantics():
    """With dropout PEFT feeds the dropped input to the whole DoRA path (a second base GEMM); so does fastft."""
    base = tiny_model("qwen2", torch.float64).train()  # q/k/v biases
    ours = copy.deepcopy(base)
    config = fastft.LoRAConfig(r=4, alpha=8, dropout=0.25, dora=True, targets=["q_proj", "v_proj", "down_proj"])
    fastft.patch(ours, config)
    randomize_dora(ours)
    twin = peft_dora_twin(base, ours, config).train()
    for name in dora_modules(ours):
        twin.base_model.model.get_submodule(name).lora_dropout["default"] = SeededDropout(0.25)
    inputs = batch()
    torch.manual_seed(7)
    logits, _ = forward_backward(ours, inputs)
    torch.manual_seed(7)
    twin_logits, _ = forward_backward(twin, inputs)
    assert_close(logits, twin_logits)
    assert_same_gradients(ours, twin, torch.float64)
    ours.eval()
    twin.eval()
    with torch.no_grad():  # no dropout in eval mode, in both
        assert_close(ours(**inputs).logits, twin(**inputs).logits)


def test_exact_norm_gradient_differs_from_peft_only_in_A_and_B():
    base = tiny_model("llama", torch.float64)
    ours = copy.deepcopy(base)
    config = fastft.LoRAConfig(r=4, alpha=8, dora=True, dora_detach_norm=False, targets=["q_proj", "up_proj"])
    report = fastft.patch(ours, config)
    assert all("exact norm grad" in m.detail for m in report)
    randomize_dora(ours)
    twin = peft_dora_twin(base, ours, config)
    inputs = batch()
    logits, _ = forward_backward(ours, inputs)
    twin_logits, _ = forward_backward(twin, inputs)
    assert_close(logits, twin_logits)
    for name, module in dora_modules(ours).items():
        target = twin.base_model.model.get_submodule(name)
        assert_close(module.lora_magnitude_vector.grad, target.lora_magnitude_vector["default"].weight.grad)
        assert not torch.allclose(module.lora_B.grad, target.lora_B["default"].weight.grad)


def test_magnitude_starts_at_the_row_norms_so_dora_equals_lora_at_init():
    base = tiny_model("gemma", torch.float64)
    dora, lora = copy.deepcopy(base), copy.deepcopy(base)
    fastft.patch(dora, fastft.LoRAConfig(r=4, alpha=8, dora=True))
    fastft.patch(lora, fastft.LoRAConfig(r=4, alpha=8))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B non-zero: the initial magnitude is the norm of W + s·BA, not of W
        for name, d in dora_modules(dora).items():
            W = d.base_layer.weight.detach()
            # at patch time (B = 0) the magnitude is ‖W_i‖, written out here
            assert_close(d.lora_magnitude_vector, (W * W).sum(1).sqrt(), msg=name)
            d.lora_B.normal_(0.0, 0.1, generator=gen)
            lora.get_submodule(name).lora_A.copy_(d.lora_A)
            lora.get_submodule(name).lora_B.copy_(d.lora_B)
            full = W + (8 / 4) * d.lora_B @ d.lora_A  # W + s·BA written out, s = alpha/r = 2
            norms = (full * full).sum(1).sqrt()
            assert_close(d.row_norms(), norms, msg=name)  # the op's norm, against the written-out one
            d.lora_magnitude_vector.copy_(norms)  # g = m/n is 1 only if the forward divides by the true norm
            assert_close(torch.linalg.vector_norm(d.merged_weight(), dim=1), norms, msg=name)
            assert_close(d.merged_weight(), full, msg=name)
    inputs = batch()
    with torch.no_grad():
        assert_close(dora(**inputs).logits, lora(**inputs).logits)


def test_bf16_autocast_matches_peft_dora():
    base = tiny_model("llama", torch.float32)
    ours = copy.deepcopy(base)
    config = fastft.LoRAConfig(r=4, alpha=8, dora=True)
    fastft.patch(ours, config)
    randomize_dora(ours)
    twin = peft_dora_twin(base, ours, config)
    inputs = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = forward_backward(ours, inputs)
        twin_logits, _ = forward_backward(twin, inputs)
    assert logits.dtype == twin_logits.dtype == torch.bfloat16
    assert_close(logits, twin_logits, torch.bfloat16)
    for name, module in dora_modules(ours).items():
        target = twin.base_model.model.get_submodule(name)
        assert module.lora_magnitude_vector.grad.dtype == torch.float32
        assert_close(module.lora_magnitude_vector.grad, target.lora_magnitude_vector["default"].weight.grad,
                     torch.bfloat16, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_peft_loads_in_peft_with_identical_logits(family, tmp_path):
    base = tiny_model(family, torch.float64)
    ours = copy.deepcopy(base)
    fastft.patch(ours, fastft.LoRAConfig(r=4, alpha=16, dora=True, targets=["q_proj", "v_proj", "down_proj"]))
    randomize_dora(ours)
    fastft.export_peft(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    assert loaded.peft_config["default"].use_dora
    inputs = batch()
    with torch.no_grad():
        assert_close(ours(**inputs).logits, loaded(**inputs).logits)


def test_from_peft_reads_dora_and_exports_it_back(tmp_path):
    base = tiny_model("qwen2", torch.float64)
    twin = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=3, lora_alpha=5, target_modules=["k_proj", "o_proj", "up_proj"], use_dora=True, init_lora_weights=False))
    with torch.no_grad():
        for module in twin.modules():
            if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_magnitude_vector:
                module.lora_magnitude_vector["default"].weight.mul_(1.3)
    twin.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    report = fastft.from_peft(ours, tmp_path / "peft")
    assert len(report) == 6 and {m.kind for m in report} == {"dora"}
    inputs = batch()
    with torch.no_grad():
        assert_close(ours(**inputs).logits, twin(**inputs).logits)
    fastft.export_peft(ours, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "again")
    with torch.no_grad():
        assert_close(again(**inputs).logits, twin(**inputs).logits)


def test_qdora_same_logits_and_gradients_as_peft_over_the_same_4bit_base():
    pytest.importorskip("bitsandbytes")
    quantized = quantize_linears(tiny_model("llama"), nested=True)
    config = fastft.LoRAConfig(r=4, alpha=8, dora=True, targets=["q_proj", "down_proj"])
    ours = copy.deepcopy(quantized)
    report = fastft.patch(ours, config)
    assert {m.kind for m in report} == {"qdora"}
    randomize_dora(ours)
    # train mode: bitsandbytes' CPU eval path repacks the weight and wants out_features % 32 == 0
    twin = peft_dora_twin(quantized, ours, config).train()
    inputs = batch()
    logits, _ = forward_backward(ours, inputs)
    twin_logits, _ = forward_backward(twin, inputs)
    assert_close(logits, twin_logits, torch.float32)
    assert_same_gradients(ours, twin, torch.float32)



def test_trainer_loss_curve_matches_peft_dora(tmp_path):
    base = tiny_model("llama", torch.float32).train()
    ours = copy.deepcopy(base)
    config = fastft.LoRAConfig(r=4, alpha=8, dora=True, targets=["q_proj", "v_proj", "gate_proj", "down_proj"])
    fastft.patch(ours, config)
    names = list(dora_modules(ours))
    twin = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=names, use_dora=True))
    with torch.no_grad():  # same initial adapter (A random, B zero, magnitude = row norms of W) in both
        for name in names:
            target = twin.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(ours.get_submodule(name).lora_A)
            assert_close(target.lora_magnitude_vector["default"].weight,
                         ours.get_submodule(name).lora_magnitude_vector)
    ours_losses = trainer_losses(ours, tmp_path / "fastft")
    peft_losses = trainer_losses(twin, tmp_path / "peft")
    assert len(ours_losses) == len(peft_losses) == 8
    assert ours_losses[-1] < ours_losses[0]  # it learns
    torch.testing.assert_close(torch.tensor(ours_losses), torch.tensor(peft_losses), **TOLERANCES[torch.float32])

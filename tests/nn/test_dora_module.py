"""DoRALinear and DoRA through fastft.patch: config, merge/unpatch, save/load, QDoRA over 4-bit bases."""
import copy
import math
import warnings

import pytest
import torch
from helpers import assert_close, dequantized_copy, quantize_linears, tiny_model

import fastft
from fastft.nn import DoRALinear, LoRALinear
from fastft.ops.dora import NORM_EPS



def needs_bnb():
    """bitsandbytes for the QDoRA tests only: the dense tests of this file run without it."""
    return pytest.importorskip("bitsandbytes", reason="QDoRA needs bitsandbytes; install fastft[test]")


def ids(seed=0, shape=(2, 9)):
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


def randomize(model, seed=1, std=0.1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, DoRALinear):
                module.lora_A.copy_(torch.randn(module.lora_A.shape, generator=gen) * std)
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=gen) * std)
                module.lora_magnitude_vector.mul_(0.8 + 0.4 * torch.rand(module.out_features, generator=gen))


def dora_formula(layer: DoRALinear, W: torch.Tensor, x: torch.Tensor):
    """float64 DoRA of ``layer``'s adapters over the float64 weight W, by autograd (norm detached)."""
    A = layer.lora_A.detach().double().requires_grad_(True)
    B = layer.lora_B.detach().double().requires_grad_(True)
    m = layer.lora_magnitude_vector.detach().double().requires_grad_(True)
    x = x.detach().double().requires_grad_(True)
    full = W.double() + layer.scale * B @ A
    g = m / torch.linalg.vector_norm(full, dim=1).detach()
    y = g * (x @ W.double().t() + layer.scale * (x @ A.t()) @ B.t())
    if layer.base_layer.bias is not None:
        y = y + layer.base_layer.bias.double()
    return y, x, A, B, m


def test_config_fields_are_validated():
    with pytest.raises(ValueError, match="dora_detach_norm=False only applies to DoRA"):
        fastft.LoRAConfig(dora_detach_norm=False)
    with pytest.raises(ValueError, match="dora=1"):
        fastft.LoRAConfig(dora=1)
    config = fastft.LoRAConfig(r=4, dora=True, dora_detach_norm=False)
    assert fastft.config.config_from_dict(config.to_dict()) == config


def test_lora_linear_builds_dora_through_from_linear_only():
    layer = torch.nn.Linear(16, 8)
    built = LoRALinear.from_linear(layer, fastft.LoRAConfig(r=2, dora=True))
    assert isinstance(built, DoRALinear) and isinstance(built, LoRALinear) and built.kind == "dora"
    assert type(LoRALinear.from_linear(torch.nn.Linear(16, 8), fastft.LoRAConfig(r=2))) is LoRALinear
    with pytest.raises(TypeError, match="from_linear"):
        LoRALinear(torch.nn.Linear(16, 8), fastft.LoRAConfig(r=2, dora=True))
    with pytest.raises(ValueError, match="dora=True"):
        DoRALinear(torch.nn.Linear(16, 8), fastft.LoRAConfig(r=2))


def test_patch_reports_dora_and_trains_the_magnitude():
    model = tiny_model("llama")
    report = fastft.patch(model, fastft.LoRAConfig(r=4, dora=True, targets=["q_proj", "down_proj"]))
    assert [m.kind for m in report] == ["dora"] * 4
    assert all(m.backend == "torch" and "norm detached" in m.detail for m in report)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    names = [m.name for m in report]
    assert trainable == {f"{n}.{p}" for n in names for p in ("lora_A", "lora_B", "lora_magnitude_vector")}
    assert report.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert not any("weight_sq_norm" in k for k in model.state_dict())  # a cache, not state


def test_merge_folds_the_magnitude_and_direction_into_the_weight():
    model = tiny_model("qwen2", torch.float64)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    fastft.patch(model, fastft.LoRAConfig(r=4, alpha=6, dora=True))  # s = 1.5: a dropped scale shows
    randomize(model)
    layer = model.model.layers[0].self_attn.q_proj
    W, A, B, m = (t.detach().clone() for t in (layer.base_layer.weight, layer.lora_A, layer.lora_B,
                                                 layer.lora_magnitude_vector))
    with torch.no_grad():
        patched_logits = model(ids()).logits
    fastft.unpatch(model, merge=True)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    full = W + (6 / 4) * B @ A
    assert_close(model.model.layers[0].self_attn.q_proj.weight, m[:, None] * full / full.norm(dim=1, keepdim=True))
    with torch.no_grad():
        assert_close(model(ids()).logits, patched_logits)


def test_unpatch_without_merge_restores_the_original_model():
    model = tiny_model("llama", torch.float64)
    before = copy.deepcopy(model.state_dict())
    fastft.patch(model, fastft.LoRAConfig(r=4, dora=True, init="pissa"))
    randomize(model)
    fastft.unpatch(model, merge=False)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], atol=1e-12, rtol=0)


def test_save_load_onto_a_fresh_model(tmp_path):
    model = tiny_model("gemma", torch.float64)
    fastft.patch(model, fastft.LoRAConfig(r=4, alpha=8, dora=True, dora_detach_norm=False, targets=["v_proj"]))
    randomize(model)
    fastft.save(model, tmp_path)
    fresh = tiny_model("gemma", torch.float64)
    report = fastft.load(fresh, tmp_path)
    assert {m.kind for m in report} == {"dora"} and all("exact norm grad" in m.detail for m in report)
    with torch.no_grad():
        assert torch.equal(fresh(ids()).logits, model(ids()).logits)


def test_pissa_with_dora_leaves_the_model_unchanged_and_exports_equivalently(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_model("llama", torch.float64)
    ours = copy.deepcopy(base)
    fastft.patch(ours, fastft.LoRAConfig(r=4, alpha=8, init="pissa", dora=True, targets=["q_proj", "gate_proj"]))
    with torch.no_grad():
        assert_close(ours(ids()).logits, base(ids()).logits)
    randomize(ours)
    fastft.export_peft(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        assert_close(ours(ids()).logits, loaded(ids()).logits)


def test_frozen_A_trains_B_and_the_magnitude():
    model = tiny_model("llama")
    fastft.patch(model, fastft.LoRAConfig(r=4, dora=True, train_a=False, targets=["up_proj"]))
    randomize(model)
    model(ids(), labels=ids()).loss.backward()
    for module in model.modules():
        if isinstance(module, DoRALinear):
            assert module.lora_A.grad is None
            assert module.lora_B.grad.abs().sum() > 0 and module.lora_magnitude_vector.grad.abs().sum() > 0


@pytest.mark.parametrize("detach_norm", [True, False], ids=["detached", "exact"])
def test_all_zero_weight_row_gives_finite_outputs_and_gradients(detach_norm):
    layer = torch.nn.Linear(24, 10)
    with torch.no_grad():
        layer.weight[3] = 0.0
    dora = LoRALinear.from_linear(layer, fastft.LoRAConfig(r=4, dora=True, dora_detach_norm=detach_norm))
    assert dora.lora_magnitude_vector[3] == NORM_EPS  # the guarded norm: g = 1, DoRA equals LoRA at init
    x = torch.randn(5, 24, requires_grad=True)
    for _ in range(2):  # at init (B zero), then with B's row 3 non-zero
        y = dora(x)
        y.square().sum().backward()
        for t in (y, x.grad, dora.lora_A.grad, dora.lora_B.grad, dora.lora_magnitude_vector.grad):
            assert torch.isfinite(t).all()
        with torch.no_grad():
            dora.lora_B.normal_(0.0, 0.1)
        x.grad = None
        dora.zero_grad()


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_qdora_matches_dora_on_bitsandbytes_dequantized_weight(nested, quant_type):
    bnb = needs_bnb()  # noqa: F841
    torch.manual_seed(0)
    dense = torch.nn.Linear(70, 45)  # 3150 weights: not a multiple of the 64 block
    base = bnb.nn.Linear4bit(70, 45, compute_dtype=torch.float32, compress_statistics=nested, quant_type=quant_type)
    base.load_state_dict(dense.state_dict())
    base = base.to("cpu")
    layer = LoRALinear.from_linear(base, fastft.LoRAConfig(r=5, alpha=10, dora=True))
    assert layer.kind == "qdora"
    W = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)  # bitsandbytes' own
    assert_close(layer.weight_sq_norm, (W.double() ** 2).sum(1).float())
    torch.nn.init.normal_(layer.lora_B, std=0.1)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1.0 + 0.3 * torch.rand(45))
    x = torch.randn(3, 7, 70, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    y64, x64, A64, B64, m64 = dora_formula(layer, W, x)
    y64.backward(g.double())
    assert_close(y, y64, torch.float32)
    assert_close(x.grad, x64.grad, torch.float32)
    assert_close(layer.lora_A.grad, A64.grad, torch.float32)
    assert_close(layer.lora_B.grad, B64.grad, torch.float32)
    assert_close(layer.lora_magnitude_vector.grad, m64.grad, torch.float32)
    assert base.weight.grad is None


def test_quantized_model_equals_dense_model_with_the_dequantized_weights():
    bnb = needs_bnb()  # noqa: F841
    quantized = quantize_linears(tiny_model("qwen2"), nested=True)
    dense = dequantized_copy(quantized)
    config = fastft.LoRAConfig(r=4, alpha=8, dora=True)
    assert {m.kind for m in fastft.patch(quantized, config)} == {"qdora"}
    fastft.patch(dense, config)
    for model in (quantized, dense):
        randomize(model)
    out_q, out_d = quantized(ids(), labels=ids()), dense(ids(), labels=ids())
    out_q.loss.backward()
    out_d.loss.backward()
    assert_close(out_q.logits, out_d.logits, torch.float32)
    q_mods = {n: m for n, m in quantized.named_modules() if isinstance(m, DoRALinear)}
    for name, module in dense.named_modules():
        if isinstance(module, DoRALinear):
            for p in ("lora_A", "lora_B", "lora_magnitude_vector"):
                assert_close(getattr(q_mods[name], p).grad, getattr(module, p).grad, torch.float32, msg=f"{name} {p}")


def test_qdora_merge_dequantizes_merges_requantizes_and_warns():
    bnb = needs_bnb()  # noqa: F841
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    base.load_state_dict(torch.nn.Linear(64, 32).state_dict())
    base = base.to("cpu")
    layer = LoRALinear.from_linear(base, fastft.LoRAConfig(r=4, alpha=6, dora=True))  # s = 1.5
    torch.nn.init.normal_(layer.lora_B, std=0.05)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1.1)
    W = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)  # bitsandbytes' own
    full = W + (6 / 4) * layer.lora_B.detach() @ layer.lora_A.detach()
    expected = layer.lora_magnitude_vector.detach()[:, None] * full / full.norm(dim=1, keepdim=True)
    assert_close(layer.merged_weight(), expected)
    assert_close(W + layer.delta_weight(), expected)
    with pytest.warns(UserWarning, match="re-quantized"):
        merged = layer.unpatched(merge=True)
    assert isinstance(merged, bnb.nn.Linear4bit) and merged.weight.quant_state.nested
    requantized, _ = bnb.functional.quantize_4bit(expected, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(merged.weight.data.view(torch.uint8).reshape(-1), requantized.reshape(-1))


def test_qdora_unpatch_without_merge_gives_back_the_same_4bit_layers():
    bnb = needs_bnb()  # noqa: F841
    model = quantize_linears(tiny_model("llama"))
    originals = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    fastft.patch(model, fastft.LoRAConfig(r=2, dora=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastft.unpatch(model, merge=False)
    assert {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)} == originals


def test_scale_and_extra_repr():
    layer = LoRALinear.from_linear(torch.nn.Linear(32, 16), fastft.LoRAConfig(r=4, alpha=6, rslora=True, dora=True))
    assert math.isclose(layer.scale, 3.0)
    assert "dora=True" in repr(layer)

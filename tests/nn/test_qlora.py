"""QLoRA: LoRA over bitsandbytes Linear4bit, against the dequantized weight plus the reference LoRA."""
import copy
import math
import warnings

import pytest
import torch
from helpers import assert_close, dequantized_copy, quantize_linears, randomize_lora, tiny_model

import fastft
from fastft.bnb import four_bit_weight
from fastft.nn import LoRALinear

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes; install fastft[test]")


def linear4bit(in_features, out_features, nested, quant_type, bias=True, seed=0):
    torch.manual_seed(seed)
    dense = torch.nn.Linear(in_features, out_features, bias=bias)
    q = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=torch.float32,
                          compress_statistics=nested, quant_type=quant_type)
    q.load_state_dict(dense.state_dict())
    return q.to("cpu")


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_lora_over_linear4bit_matches_dequantized_reference(nested, quant_type):
    base = linear4bit(70, 45, nested, quant_type)  # 3150 weights: not a multiple of the 64 block
    layer = LoRALinear.from_linear(base, fastft.LoRAConfig(r=5, alpha=10))
    assert layer.kind == "qlora"
    torch.nn.init.normal_(layer.lora_B, std=0.1)
    W = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)  # bitsandbytes' own
    x = torch.randn(3, 7, 70, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)

    x64 = x.detach().double().requires_grad_(True)
    A64 = layer.lora_A.detach().double().requires_grad_(True)
    B64 = layer.lora_B.detach().double().requires_grad_(True)
    y64 = x64 @ W.double().t() + base.bias.double() + 2.0 * (x64 @ A64.t()) @ B64.t()
    y64.backward(g.double())
    assert_close(y, y64, torch.float32)
    assert_close(x.grad, x64.grad, torch.float32)
    assert_close(layer.lora_A.grad, A64.grad, torch.float32)
    assert_close(layer.lora_B.grad, B64.grad, torch.float32)
    assert base.weight.grad is None


def test_quantized_model_equals_dense_model_with_the_dequantized_weights():
    quantized = quantize_linears(tiny_model("qwen2"), nested=True)
    dense = dequantized_copy(quantized)
    config = fastft.LoRAConfig(r=4, alpha=8)
    report = fastft.patch(quantized, config)
    assert {m.kind for m in report} == {"qlora"} and len(report) == 14
    fastft.patch(dense, config)
    randomize_lora(quantized)
    randomize_lora(dense)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    out_q, out_d = quantized(ids, labels=ids), dense(ids, labels=ids)
    out_q.loss.backward()
    out_d.loss.backward()
    assert_close(out_q.logits, out_d.logits, torch.float32)
    q_mods = {n: m for n, m in quantized.named_modules() if isinstance(m, LoRALinear)}
    for name, module in dense.named_modules():
        if isinstance(module, LoRALinear):
            assert_close(q_mods[name].lora_A.grad, module.lora_A.grad, torch.float32, msg=name)
            assert_close(q_mods[name].lora_B.grad, module.lora_B.grad, torch.float32, msg=name)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_same_logits_and_gradients_as_peft_over_the_same_4bit_base(family, nested):
    peft = pytest.importorskip("peft")
    quantized = quantize_linears(tiny_model(family), nested=nested)
    twin = peft.get_peft_model(
        copy.deepcopy(quantized), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                  init_lora_weights=False)
    )
    fastft.patch(quantized, fastft.LoRAConfig(r=4, alpha=8, targets=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, LoRALinear):
                target = twin.base_model.model.get_submodule(name)
                module.lora_A.copy_(target.lora_A["default"].weight)
                module.lora_B.copy_(target.lora_B["default"].weight)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    ours, theirs = quantized(ids, labels=ids), twin(input_ids=ids, labels=ids)
    assert_close(ours.logits, theirs.logits, torch.float32)
    ours.loss.backward()
    theirs.loss.backward()
    count = 0
    for name, module in quantized.named_modules():
        if isinstance(module, LoRALinear):
            target = twin.base_model.model.get_submodule(name)
            assert_close(module.lora_A.grad, target.lora_A["default"].weight.grad, msg=f"{name} dA")
            assert_close(module.lora_B.grad, target.lora_B["default"].weight.grad, msg=f"{name} dB")
            count += 1
    assert count == 4


def test_merge_into_4bit_dequantizes_merges_requantizes_and_warns():
    base = linear4bit(64, 32, nested=True, quant_type="nf4")
    layer = LoRALinear.from_linear(base, fastft.LoRAConfig(r=4, alpha=6))
    torch.nn.init.normal_(layer.lora_B, std=0.05)
    # W + (alpha/r)·B·A written out, on bitsandbytes' own dequantization (not the layer's delta_weight)
    W = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
    expected_float = W + (6 / 4) * (layer.lora_B.detach() @ layer.lora_A.detach())
    assert_close(layer.delta_weight(), expected_float - W)
    with pytest.warns(UserWarning, match="re-quantized"):
        merged = layer.unpatched(merge=True)
    assert isinstance(merged, bnb.nn.Linear4bit)
    state = merged.weight.quant_state
    assert state.nested and state.quant_type == "nf4" and state.blocksize == 64
    requantized, _ = bnb.functional.quantize_4bit(expected_float, blocksize=64, compress_statistics=True,
                                                  quant_type="nf4")
    assert torch.equal(merged.weight.data.view(torch.uint8).reshape(-1), requantized.reshape(-1))
    # rounding to 4 bits again: within half a quantization step of the float merge
    step = expected_float.abs().max() / 7
    assert (four_bit_weight(merged).dequantize(torch.float32) - expected_float).abs().max() <= step
    assert torch.equal(merged.bias, base.bias)


def test_unpatch_without_merge_gives_back_the_same_4bit_layers():
    model = quantize_linears(tiny_model("llama"))
    originals = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    fastft.patch(model, fastft.LoRAConfig(r=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastft.unpatch(model, merge=False)
    assert {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)} == originals


def test_qlora_export_loads_in_peft_on_the_4bit_base(tmp_path):
    peft = pytest.importorskip("peft")
    base = quantize_linears(tiny_model("mistral"))
    ours = copy.deepcopy(base)
    fastft.patch(ours, fastft.LoRAConfig(r=4, alpha=8, targets=["v_proj", "up_proj"]))
    randomize_lora(ours)
    fastft.export_peft(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    # train mode (no dropout here): in eval mode bitsandbytes' CPU path repacks the weight and asserts that
    # out_features is a multiple of 32, which the tiny model's 88-wide MLP is not
    loaded.train()
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(ours(ids).logits, loaded(ids).logits, torch.float32)


def test_weight_repacked_by_bitsandbytes_cpu_inference_is_read_correctly():
    base = linear4bit(64, 96, nested=True, quant_type="nf4").eval()
    x = torch.randn(2, 64)
    with torch.no_grad():
        reference = base(x)  # on AVX512-BF16 CPUs this repacks the weight (absmax rounded to bfloat16)
    repacked = getattr(base.weight.quant_state, "packing_format_for_cpu", False)
    layer = LoRALinear.from_linear(base, fastft.LoRAConfig(r=2)).eval()
    weight = four_bit_weight(base).dequantize(torch.float32)  # restores the standard layout if repacked
    assert not getattr(base.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(weight, bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state))
    with torch.no_grad():
        # repacking rounded absmax to bfloat16 and restoring re-quantized it: bfloat16-level agreement
        assert_close(layer(x), reference, torch.bfloat16 if repacked else torch.float32)


def test_unquantized_linear4bit_is_refused_with_a_fix():
    layer = bnb.nn.Linear4bit(16, 16)  # still on the meta-free CPU path but never moved: no quant state
    if getattr(layer.weight, "quant_state", None) is not None:
        pytest.skip("this bitsandbytes quantizes at construction")
    with pytest.raises(ValueError, match="moved to a device"):
        LoRALinear.from_linear(layer, fastft.LoRAConfig(r=2))


def test_pissa_on_4bit_is_refused():
    with pytest.raises(ValueError, match="pissa' needs a float base weight"):
        LoRALinear.from_linear(linear4bit(32, 32, True, "nf4"), fastft.LoRAConfig(r=2, init="pissa"))


def test_scale_is_used():
    # in_features a multiple of the block size (64): bitsandbytes' AVX-512 CPU dequantize (0.49-0.50.2)
    # reads a block that spans two rows wrongly (its own quantize/dequantize round trip is off by ~1.6
    # at 16x32), so the reference W below comes from a shape its kernel handles
    base = linear4bit(64, 16, False, "nf4", bias=False)
    layer = LoRALinear.from_linear(base, fastft.LoRAConfig(r=4, alpha=6, rslora=True))
    assert math.isclose(layer.scale, 3.0)
    torch.nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    W = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).double()
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    with torch.no_grad():  # the forward uses s = alpha/sqrt(r) = 3, written out
        assert_close(layer(x), x.double() @ W.t() + (6 / 4 ** 0.5) * (x.double() @ A.t()) @ B.t(), torch.float32)

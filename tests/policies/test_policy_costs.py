"""The backward-FLOP formulas of fastft's ops (beside each op in fastft/ops/, read by fastft/policies/cost.py), and select_trainable on every method.

Each formula is checked against FlopCounterMode (fastft.measure.flops, the reference backend) on a real
step, for every subset of the op's inputs that may need a gradient. What is compared is the cost of training:
the FLOPs of forward + backward minus those of the same forward without gradients — for most ops that is the
backward alone; the fused loss computes its gradient products during its forward (reductions "mean"/"sum").
"""
import itertools
from functools import partial

import pytest
import torch
import transformers as tf
from helpers import backend, tiny_config, tiny_model
from torch import nn

import fastft
from fastft import measure
from fastft.nn import DoRALinear, LoRALinear, S2FTLinear
from fastft.ops import fake_quantize, hadamard_transform, linear_cross_entropy
from fastft.ops.qat_linear import quant_weight_linear
from fastft.policies.cost import build_cost_model


def training_flops(run, module) -> int:
    """FLOPs of ``run(module)`` + its backward, minus those of the same forward under no_grad."""
    def step():
        out = run(module)
        (out if out.dim() == 0 else out.sum()).backward()

    with torch.no_grad():
        forward = measure.flops(lambda: run(module))
    return measure.flops(step) - forward


def assert_formula_matches_counter(module, run, names, products=True):
    """For every non-empty subset S of the parameters ``names``: the cost model's FLOPs of training S equal
    FlopCounterMode's on a real step with exactly S requiring grad."""
    params = dict(module.named_parameters())
    for p in module.parameters():
        p.requires_grad_(False)
    candidates = [(n, params[n].requires_grad_(True)) for n in names]
    cost = build_cost_model(module, candidates, run, [], "", ())
    assert all(leaf.kind == "param" for leaf in cost.leaves)
    checked = 0
    for size in range(1, len(names) + 1):
        for subset in itertools.combinations(range(len(names)), size):
            for j, (_, p) in enumerate(candidates):
                p.requires_grad_(j in subset)
                p.grad = None
            mask = sum(1 << j for j in subset)
            assert cost.flops(mask) == training_flops(run, module), [names[j] for j in subset]
            checked += cost.flops(mask) > 0
    assert bool(checked) == products, f"{checked} subsets cost FLOPs"


class Holder(nn.Module):
    """One layer ``proj`` and its input ``x`` as a parameter (so "x needs grad" is a choice too)."""

    def __init__(self, layer, x):
        super().__init__()
        self.proj = layer
        self.x = nn.Parameter(x)


def call_proj(holder):
    return holder.proj(holder.x)


@pytest.mark.parametrize("bias,dropout,detach_norm,four_bit", [
    (False, 0.0, True, False),
    (True, 0.1, True, False),  # dropout: the dropped path's second GEMM in dx
    (False, 0.0, False, False),  # the exact norm gradient: dora_row_norm's backward
    (True, 0.0, False, True),  # QDoRA: a 4-bit base (absmax, code shift the edges)
])
def test_dora_formulas(bias, dropout, detach_norm, four_bit):
    torch.manual_seed(0)
    base = nn.Linear(24, 20, bias=bias)
    if four_bit:
        from helpers import quantize_linears

        holder = quantize_linears(nn.ModuleDict({"layers": nn.ModuleList([nn.ModuleDict({"proj": base})])}))
        base = holder["layers"][0]["proj"]
    holder = Holder(base, torch.randn(2, 7, 24))
    fastft.patch(holder, fastft.LoRAConfig(r=3, targets=["proj"], dora=True, dropout=dropout,
                                           dora_detach_norm=detach_norm))
    assert isinstance(holder.proj, DoRALinear)
    with torch.no_grad():
        holder.proj.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    holder.train()
    with backend("torch"):
        assert_formula_matches_counter(holder, call_proj, ["x", "proj.lora_A", "proj.lora_B",
                                                           "proj.lora_magnitude_vector"])


@pytest.mark.parametrize("d,rotate,ste", [(96, True, "identity"), (96, False, "clipped"), (64, True, "clipped")])
def test_fake_quantize_and_hadamard_formulas(d, rotate, ste):
    x = torch.randn(3, 5, d)  # d = 96 = 12·8: the K×K product of the transform counts; 64: only butterflies
    holder = Holder(nn.Identity(), x)
    quant = lambda h: fake_quantize(h.x * 1.0, 4, rotate=rotate, ste=ste)  # noqa: E731
    transform = lambda h: hadamard_transform(hadamard_transform(h.x), inverse=True) * 2.0  # noqa: E731
    with backend("torch"):
        assert_formula_matches_counter(holder, quant, ["x"], products=rotate and d == 96)
        assert_formula_matches_counter(holder, transform, ["x"], products=d == 96)


@pytest.mark.parametrize("lora,bias,clipped", [(False, True, False), (True, False, False), (True, True, True)])
def test_quant_linear_formula(lora, bias, clipped):
    torch.manual_seed(0)
    module = nn.Module()
    module.x = nn.Parameter(torch.randn(2, 5, 16))
    module.weight = nn.Parameter(torch.randn(12, 16) * 0.3)
    module.bias = nn.Parameter(torch.randn(12)) if bias else None
    if lora:
        module.lora_A = nn.Parameter(torch.randn(3, 16) * 0.3)
        module.lora_B = nn.Parameter(torch.randn(12, 3) * 0.3)
    quantizer = partial(fake_quantize, bits=4, granularity="channel", ste="clipped" if clipped else "identity")

    def run(m):
        extra = (m.lora_A, m.lora_B, 0.5) if lora else ()
        return quant_weight_linear(m.x, m.weight, m.bias, quantizer, clipped, *extra)

    names = ["x", "weight"] + (["bias"] if bias else []) + (["lora_A", "lora_B"] if lora else [])
    with backend("torch"):
        assert_formula_matches_counter(module, run, names)


@pytest.mark.parametrize("reduction,bias,lowrank", [("mean", False, False), ("sum", True, True), ("none", False, True)])
def test_linear_cross_entropy_formula(reduction, bias, lowrank):
    torch.manual_seed(0)
    module = nn.Module()
    module.hidden = nn.Parameter(torch.randn(2, 6, 16))
    module.weight = nn.Parameter(torch.randn(40, 16) * 0.2)
    module.bias = nn.Parameter(torch.randn(40) * 0.1) if bias else None
    if lowrank:
        module.h2 = nn.Parameter(torch.randn(2, 6, 3))
        module.w2 = nn.Parameter(torch.randn(40, 3) * 0.2)
    labels = torch.randint(0, 40, (2, 6))
    labels[0, :2] = -100

    def run(m):
        extra = dict(lowrank_hidden=m.h2, lowrank_weight=m.w2) if lowrank else {}
        return linear_cross_entropy(m.hidden, m.weight, labels, m.bias, reduction=reduction, chunk_size=5, **extra)

    names = ["hidden", "weight"] + (["bias"] if bias else []) + (["h2", "w2"] if lowrank else [])
    with backend("torch"):
        assert_formula_matches_counter(module, run, names)


@pytest.mark.parametrize("rows,bias", [(False, False), (True, True)])
def test_s2ft_linear_formula(rows, bias):
    torch.manual_seed(0)
    holder = Holder(S2FTLinear(nn.Linear(24, 20, bias=bias).requires_grad_(False), 5, rows=rows),
                    torch.randn(2, 7, 24))
    with backend("torch"):
        assert_formula_matches_counter(holder, call_proj, ["x", "proj.weight_slice"])


# ------------------------------------------------------------------ select_trainable on every method
def ids(seed=0, shape=(2, 9)):
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


def qat_model():
    """Llama with intermediate 96 = 12·8, so R4's online Hadamard on down_proj's input has a K×K product."""
    torch.manual_seed(0)
    config = tiny_config("llama")
    config.intermediate_size = 96
    return tf.LlamaForCausalLM(config).eval()


def _randomize_adapters(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_(0, 0.1, generator=gen)


METHODS = {
    "dora": (lambda: tiny_model("qwen2"), lambda: [fastft.LoRAConfig(r=4, dora=True, dora_detach_norm=False)],
             "flops", dict(budget=0.5)),
    "qat": (qat_model, lambda: [fastft.QATConfig(w_bits=4, a_bits=8, kv_bits=4)], "half", dict(seed=0)),
    "qat+lora": (qat_model, lambda: [fastft.QATConfig(w_bits=4, a_bits=8, ste="clipped"), fastft.LoRAConfig(r=4)],
                 "flops", dict(budget=0.4)),
    "s2ft": (lambda: tiny_model("llama"), lambda: [fastft.S2FTConfig(ffn_ratio=0.25, attn_ratio=0.5, rows=True)],
             "layers", dict(layers=[1])),
    "loss": (lambda: tiny_model("llama"), lambda: [fastft.LossConfig()], "flops", dict(budget=0.5)),
    "loss+lora": (lambda: tiny_model("llama"),
                  lambda: [fastft.LossConfig(), fastft.LoRAConfig(r=4, targets=["q_proj", "v_proj", "lm_head"])],
                  "half", dict(seed=1)),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_select_trainable_on_each_method_reports_the_flops_of_a_real_step(method):
    build, configs, policy, kwargs = METHODS[method]
    model = build()
    fastft.patch(model, configs())
    _randomize_adapters(model)
    model.train()
    batch = {"input_ids": ids(), "labels": ids()}
    run = lambda m: m(**batch).loss  # noqa: E731
    with backend("torch"):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        report = fastft.select_trainable(model, policy, batch=batch, **kwargs)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # weights untouched
        assert 0 < report.backward_flops < report.full_backward_flops
        assert training_flops(run, model) == report.backward_flops
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == set(report.trainable) and trainable
        fastft.unselect(model)
        assert training_flops(run, model) == report.full_backward_flops
    if method == "s2ft":
        assert all(m._is_linked() for m in model.modules() if isinstance(m, S2FTLinear))

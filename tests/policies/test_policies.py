"""fastft.select_trainable: partial-backprop policies (layers, half, GreenTrainer flops).

Every FLOP figure of a report is checked against FlopCounterMode (fastft.measure.flops) on a real
training step's backward; the knapsack against brute force; the probe's restoration bit for bit.
"""
import itertools
import math
import random

import pytest
import torch
import transformers as tf
from helpers import assert_model_unchanged, model_snapshot, tiny_config, tiny_model

import fastft
from fastft import measure
from fastft.nn import LoRALinear
from fastft.policies import build_context, selection_state
from fastft.policies.knapsack import SelectionProblem, brute_force, solve


def ids(seed=0, shape=(2, 9)):
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


def train_model(family="llama", lora=None, eager=False):
    if eager:
        torch.manual_seed(0)
        config = tiny_config(family)
        config._attn_implementation = "eager"
        model = tf.LlamaForCausalLM(config)
    else:
        model = tiny_model(family)
    if lora is not None:
        fastft.patch(model, fastft.LoRAConfig(r=4, **lora))
        with torch.no_grad():  # B starts at zero: give every LoRA gradient something to carry
            for module in model.modules():
                if isinstance(module, LoRALinear):
                    module.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return model.train()


def backward_flops(model, batch):
    """FLOPs FlopCounterMode counts in the backward of one real training step."""
    out = model(batch, labels=batch)
    return measure.flops(lambda: out.loss.backward())


snapshot = model_snapshot  # the shared whole-model snapshot (tests/helpers.py)


def assert_unchanged(model, before):
    assert_model_unchanged(model, before)
    assert selection_state(model) is None


# ------------------------------------------------------------------ FLOPs agree with FlopCounterMode
CASES = [
    ("llama", None, False, "layers", dict(layers=[1])),
    ("llama", None, False, "half", dict(seed=3)),
    ("llama", None, False, "flops", dict(budget=0.3)),
    ("qwen2", None, False, "flops", dict(budget=0.6)),  # grouped-query attention, q/k/v biases
    ("gemma", None, False, "flops", dict(budget=0.5)),  # tied embeddings: lm_head's dW belongs to the embedding
    ("llama", None, True, "half", dict(seed=1)),  # eager attention: bmm products, dq/dk/dv separately
    ("llama", {}, False, "layers", dict(layers=[-1])),
    ("llama", {}, False, "half", dict(seed=0)),
    ("llama", {}, False, "flops", dict(budget=0.5)),
    ("qwen2", dict(train_a=False), False, "flops", dict(budget=0.4)),
]


@pytest.mark.parametrize("family,lora,eager,policy,kwargs", CASES)
def test_report_flops_equal_flop_counter_on_a_real_step(family, lora, eager, policy, kwargs):
    model = train_model(family, lora, eager)
    batch = ids()
    report = fastft.select_trainable(model, policy, batch=batch, **kwargs)
    assert report.tokens == (2, 9)
    assert backward_flops(model, batch) == report.backward_flops
    assert 0 < report.backward_flops < report.full_backward_flops
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(report.trainable) and report.trainable_params == sum(
        p.numel() for p in model.parameters() if p.requires_grad)
    fastft.unselect(model)
    assert backward_flops(model, batch) == report.full_backward_flops  # every candidate trains again
    assert "backward FLOPs" in str(report)


def test_qlora_model_flops_equal_flop_counter():
    from helpers import quantize_linears

    model = quantize_linears(tiny_model("llama"))
    fastft.patch(model, fastft.LoRAConfig(r=4))
    model.train()
    batch = ids()
    report = fastft.select_trainable(model, "flops", budget=0.5, batch=batch)
    assert backward_flops(model, batch) == report.backward_flops <= report.budget_flops


def test_layers_backpropagates_nothing_below_the_lowest_trainable_layer():
    batch = ids()
    model = train_model()
    model.model.embed_tokens.weight.requires_grad_(False)
    report = fastft.select_trainable(model, "layers", layers=range(-1, 0), batch=batch)
    assert report.cut == "model.layers.1" and report.trainable == [n for n, _ in model.named_parameters()
                                                                      if n.startswith("model.layers.1.")]
    fired = []
    for name, module in model.named_modules():
        if name.startswith("model.layers.0") or name == "model.embed_tokens":
            module.register_full_backward_hook(lambda m, gi, go, name=name: fired.append(name))
    assert backward_flops(model, batch) == report.backward_flops
    assert fired == []
    # exactly the two matmuls per linear of layer 1 (dX and dW), its attention, and lm_head's dX
    n = 2 * 9
    linears = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 88), (64, 88), (88, 64)]
    attention = 5 * 2 * 2 * 4 * 9 * 9 * 16
    assert report.backward_flops == sum(2 * 2 * n * i * o for i, o in linears) + attention + 2 * n * 64 * 96


def test_the_cut_stops_the_backward_that_enable_input_require_grads_starts():
    batch = ids()
    model = train_model()
    model.enable_input_require_grads()  # what gradient_checkpointing_enable switches on
    for name, param in model.named_parameters():  # the same choice by hand: the backward descends
        param.requires_grad_(name.startswith("model.layers.1."))
    by_hand = backward_flops(model, batch)
    for param in model.parameters():
        param.requires_grad_(True)
    report = fastft.select_trainable(model, "layers", layers=[1], batch=batch)
    fired = []
    for module in model.model.layers[0].modules():
        module.register_full_backward_hook(lambda m, gi, go: fired.append(m))
    assert backward_flops(model, batch) == report.backward_flops < by_hand
    assert fired == []
    assert any("enable_input_require_grads" in note for note in report.notes)


def test_layers_by_budget_takes_the_top_fraction():
    model = train_model()
    report = fastft.select_trainable(model, "layers", budget=0.5)
    assert {t.layer for t in report if t.trainable} == {1}
    assert report.tokens == (1, 64)  # the default shape: one sequence of min(512, max_position_embeddings)


# ------------------------------------------------------------------ half
def test_half_is_deterministic_and_freezes_half_of_each_group():
    def choose(seed, lora=None):
        model = train_model(lora=lora)
        report = fastft.select_trainable(model, "half", seed=seed)
        return model, report

    model, report = choose(0)
    again = choose(0)[1]
    assert report.trainable == again.trainable
    assert any(choose(seed)[1].trainable != report.trainable for seed in (1, 2, 3))
    weights = {t.name: t.trainable for t in report if t.name.endswith("_proj.weight")}
    for layer in (0, 1):
        attention = [v for n, v in weights.items() if f"layers.{layer}.self_attn" in n]
        mlp = [v for n, v in weights.items() if f"layers.{layer}.mlp" in n]
        assert sum(attention) == 2 and len(attention) == 4
        assert sum(mlp) == (2 if layer % 2 == 0 else 1) and len(mlp) == 3  # 3 matrices: 1 frozen, then 2
    outside = [t for t in report if not t.name.endswith("_proj.weight")]
    assert outside and all(t.trainable for t in outside)  # norms, embeddings, lm_head keep training

    model, report = choose(0, lora={})
    modules = {}
    for t in report:
        modules.setdefault(t.name.rsplit(".", 1)[0], set()).add(t.trainable)
    assert all(len(flags) == 1 for flags in modules.values())  # A and B of one LoRA layer go together
    assert sum(flags == {True} for flags in modules.values()) == 2 * 2 + 2 + 1


# ------------------------------------------------------------------ flops (GreenTrainer)
@pytest.mark.parametrize("budget", [0.15, 0.45, 0.8, 1.0])
def test_flops_respects_the_budget(budget):
    model = train_model()
    batch = ids()
    report = fastft.select_trainable(model, "flops", budget=budget, batch=batch)
    assert report.budget_flops == int(budget * report.full_backward_flops)
    assert backward_flops(model, batch) == report.backward_flops <= report.budget_flops
    if budget == 1.0:
        assert len(report.trainable) == len(report.tensors)


@pytest.mark.parametrize("reentrant", [False, True])
def test_flops_programme_is_optimal_against_brute_force_on_a_real_model(reentrant):
    model = train_model(lora=dict(targets=["q_proj", "v_proj"]))
    if reentrant:  # a chosen layer's input must then require grad: the programme's depths move to the layer inputs
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    batch = ids()
    report = fastft.select_trainable(model, "flops", budget=0.7 if reentrant else 0.5, batch=batch)
    fastft.unselect(model)
    ctx = build_context(model, batch)
    names = [n for n, _ in ctx.candidates]
    importance = {t.name: t.importance for t in report}
    assert len(names) == 8 and all(v > 0 for v in importance.values())
    best = 0.0
    for size in range(1, len(names) + 1):
        for chosen in itertools.combinations(range(len(names)), size):
            if ctx.backward_flops(chosen) <= report.budget_flops:
                best = max(best, sum(importance[names[j]] for j in chosen))
    assert math.isclose(sum(importance[n] for n in report.trainable), best, rel_tol=1e-12)
    # the programme's cost model is the exact one on every subset
    problem, index_of, exact = ctx.selection_problem([0.0] * len(names), report.budget_flops)
    assert exact
    for size in range(1, len(names) + 1):
        for chosen in itertools.combinations(range(len(index_of)), size):
            assert problem.cost(chosen) == ctx.backward_flops([index_of[k] for k in chosen])


def test_programme_cost_model_is_exact_on_a_plain_model():
    ctx = build_context(train_model("qwen2"), ids())
    problem, index_of, exact = ctx.selection_problem([1.0] * len(ctx.candidates), 1)
    assert exact
    rng = random.Random(0)
    for _ in range(200):
        chosen = rng.sample(range(len(index_of)), rng.randint(1, len(index_of)))
        assert problem.cost(chosen) == ctx.backward_flops([index_of[k] for k in chosen])


def test_knapsack_matches_brute_force_on_random_instances():
    rng = random.Random(0)
    for trial in range(300):
        n = rng.randint(1, 8)
        groups = sorted(rng.randint(0, 12) for _ in range(n))
        conds = [[(3 * rng.randint(1, 9), rng.randint(-1, groups[j] - 1))] if rng.random() < 0.4 else []
                 for j in range(n)]
        shared = [(3 * rng.randint(1, 15), rng.randint(0, 12)) for _ in range(rng.randint(0, 5))]
        values = [rng.choice([0.0, rng.random()]) for _ in range(n)]
        weights = [3 * rng.randint(0, 20) for _ in range(n)]
        full = SelectionProblem(values, weights, groups, 0, conds, shared).cost(range(n))
        problem = SelectionProblem(values, weights, groups, int(full * rng.random()), conds, shared)
        for bins in (1 << 16, 7):  # exact, and rounded to a coarse resolution
            solution = solve(problem, max_bins=bins)
            assert solution.cost == problem.cost(solution.chosen) <= problem.capacity
            if bins > 7:
                assert solution.exact
                assert math.isclose(solution.value, brute_force(problem)[0], abs_tol=1e-12), trial


def test_probe_restores_weights_grads_buffers_and_rng_exactly():
    model = train_model(lora={})
    batch = ids()
    lora_b = model.model.layers[0].self_attn.q_proj.lora_B
    lora_b.grad = torch.full_like(lora_b, 0.5)  # a gradient the user was accumulating
    held = lora_b.grad
    weights = {n: p.detach().clone() for n, p in model.state_dict(keep_vars=True).items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    report = fastft.select_trainable(model, "flops", budget=0.5, batch=batch, update="sgd", lr=0.1)
    assert torch.equal(torch.get_rng_state(), rng)
    for name, value in model.state_dict(keep_vars=True).items():
        assert torch.equal(value, weights[name]), name
    assert lora_b.grad is held and torch.equal(held, torch.full_like(held, 0.5))
    assert all(p.grad is None for n, p in model.named_parameters() if p is not lora_b)
    assert all(t.importance is not None and t.importance >= 0 for t in report)
    fastft.unselect(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_probe_takes_a_closure_and_sgd_importance_is_lr_times_squared_gradient():
    model = train_model()
    batch = ids()
    report = fastft.select_trainable(model, "flops", budget=1.0, closure=lambda m: m(batch, labels=batch).loss,
                                     update="sgd", lr=0.5)
    fastft.unselect(model)
    model.zero_grad(set_to_none=True)
    model(batch, labels=batch).loss.backward()
    for t in report:
        grad = dict(model.named_parameters())[t.name].grad.double()
        assert math.isclose(t.importance, 0.5 * float((grad * grad).sum()), rel_tol=1e-9)


# ------------------------------------------------------------------ training: accumulation, checkpointing
def reference_grads(model, batches):
    """Gradients of the summed loss over ``batches`` with every parameter trainable (no selection)."""
    import copy

    model = copy.deepcopy(model)
    for param in model.parameters():
        param.requires_grad_(True)
    for batch in batches:
        model(batch, labels=batch).loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("policy,kwargs", [("layers", dict(layers=[1])), ("half", dict(seed=5))])
def test_gradient_accumulation_over_micro_batches(policy, kwargs):
    model = train_model()
    batches = [ids(1), ids(2)]
    expected = reference_grads(model, batches)
    report = fastft.select_trainable(model, policy, **kwargs)
    for batch in batches:
        model(batch, labels=batch).loss.backward()
    for name, param in model.named_parameters():
        if name in report.trainable:
            torch.testing.assert_close(param.grad, expected[name], atol=1e-6, rtol=1e-5)
        else:
            assert param.grad is None, name


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("lora", [None, {}])
def test_gradient_checkpointing_keeps_gradients_and_cut(reentrant, lora):
    batch = ids()
    model = train_model(lora=lora)
    expected = reference_grads(model, [batch]) if lora is None else None
    if lora is not None:
        plain = train_model(lora=lora)
        report_plain = fastft.select_trainable(plain, "layers", layers=[1], batch=batch)
        plain(batch, labels=batch).loss.backward()
        expected = {n: p.grad for n, p in plain.named_parameters()}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    report = fastft.select_trainable(model, "layers", layers=[1], batch=batch)
    assert report.checkpointing == ("reentrant" if reentrant else "non-reentrant")
    below = []
    for module in model.model.layers[0].modules():
        module.register_forward_hook(lambda m, i, o: below.append(m))
        module.register_full_backward_hook(lambda m, gi, go: below.append(m))
    out = model(batch, labels=batch)
    below.clear()  # layer 0's forward ran; from now on nothing of it may run again
    counted = measure.flops(lambda: out.loss.backward())
    assert below == []
    for name in report.trainable:
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, expected[name], atol=1e-6, rtol=1e-5)
    # the backward is the report's plus the recomputed forward of layer 1 (reentrant: all of it; non-reentrant:
    # all of it but the products no saved tensor needs)
    layer = model.model.layers[1]
    hidden = torch.randn(2, 9, 64)
    rope = model.model.rotary_emb(hidden, torch.arange(9)[None].expand(2, 9))
    model.eval()
    recompute = measure.flops(lambda: layer(hidden, position_embeddings=rope))
    model.train()
    if reentrant:
        assert counted == report.backward_flops + recompute
    else:
        assert report.backward_flops < counted <= report.backward_flops + recompute
    if lora is not None:
        # the norms are frozen, so reentrant checkpointing costs layer 1's input gradient (dX of q, k, v)
        assert (report.backward_flops > report_plain.backward_flops) == reentrant


def test_reentrant_checkpointing_without_input_grads_loses_gradients_unless_selected():
    batch = ids()
    model = train_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.disable_input_require_grads()
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("model.layers.1.") or name == "lm_head.weight")
    with pytest.warns(UserWarning, match="requires_grad"):
        model(batch, labels=batch).loss.backward()
    assert model.model.layers[1].mlp.down_proj.weight.grad is None  # the hazard: silently no gradient
    model.zero_grad(set_to_none=True)
    for param in model.parameters():
        param.requires_grad_(True)
    fastft.select_trainable(model, "layers", layers=[1], batch=batch)
    model(batch, labels=batch).loss.backward()
    assert all(p.grad is not None for p in model.model.layers[1].parameters())


# ------------------------------------------------------------------ reversibility and bad input
def test_unselect_restores_flags_and_hooks_and_guards_patch():
    model = train_model(lora={})
    before = snapshot(model)
    fastft.select_trainable(model, "layers", layers=[1])
    assert selection_state(model) is not None
    with pytest.raises(ValueError, match="unselect"):
        fastft.unpatch(model)
    with pytest.raises(ValueError, match="already has a selection"):
        fastft.select_trainable(model, "half")
    fastft.unselect(model)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="no selection"):
        fastft.unselect(model)
    fastft.unpatch(model)


BAD = [
    (("nope",), {}, ValueError, "unknown policy"),
    (("flops",), dict(budget=0, batch=ids()), ValueError, r"\(0, 1\]"),
    (("flops",), dict(budget=1.5, batch=ids()), ValueError, r"\(0, 1\]"),
    (("flops",), dict(budget=float("nan"), batch=ids()), ValueError, r"\(0, 1\]"),
    (("flops",), dict(budget=True, batch=ids()), ValueError, r"\(0, 1\]"),
    (("flops",), dict(budget=0.5), ValueError, "probe"),
    (("flops",), dict(budget=0.5, batch=(2, 9)), ValueError, "not a shape"),
    (("flops",), dict(budget=0.5, batch=ids(), update="lion"), ValueError, "update"),
    (("flops",), dict(budget=1e-9, batch=ids()), ValueError, "cheapest"),
    (("layers",), dict(layers=[2]), ValueError, "do not exist"),
    (("layers",), dict(layers=[-3]), ValueError, "do not exist"),
    (("layers",), dict(layers=[]), ValueError, "empty"),
    (("layers",), dict(layers="1"), ValueError, "range"),
    (("layers",), {}, ValueError, "exactly one"),
    (("layers",), dict(layers=[1], budget=0.5), ValueError, "exactly one"),
    (("half",), dict(budget=0.5), ValueError, "no budget"),
    (("half",), dict(seed="a"), ValueError, "seed"),
    (("half",), dict(layers=[0]), TypeError, "takes no argument"),
    (("half",), dict(batch="text"), ValueError, "batch"),
]


@pytest.mark.parametrize("args,kwargs,error,match", BAD)
def test_bad_input_is_a_clear_error_and_changes_nothing(args, kwargs, error, match):
    model = train_model()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        fastft.select_trainable(model, *args, **kwargs)
    assert_unchanged(model, before)


def test_a_model_with_nothing_trainable_is_refused():
    model = train_model()
    for param in model.parameters():
        param.requires_grad_(False)
    before = snapshot(model)
    with pytest.raises(ValueError, match="nothing to choose"):
        fastft.select_trainable(model, "half")
    assert_unchanged(model, before)


def test_lora_backward_with_only_b_trainable_in_the_first_layer():
    """Regression: the LoRA backward returned one empty tensor for both dx and dA, which torch refuses."""
    model = train_model(lora=dict(train_a=False))
    batch = ids()
    model(batch, labels=batch).loss.backward()
    assert all(m.lora_B.grad is not None for m in model.modules() if isinstance(m, LoRALinear))

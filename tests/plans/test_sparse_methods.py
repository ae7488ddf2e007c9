"""The sparse fine-tuning methods on a model: selection through the planner, each method's training-time rule
against a reference, bad inputs, end-to-end training of a tiny Llama (save / load, export and composition are
in test_sparse_methods_io.py)."""
import math

import pytest
import torch
import torch.nn.functional as F
from sparse_helpers import (
    METHODS,
    TARGETS,
    config_for,
    make_batch,
    snapshot,
    sparse_modules,
    train_steps,
)

import fastft
from fastft.nn.sparse_delta import SparseDeltaLinear
from fastft.nn.sparse_gates import GradientMask, HardConcreteGate, StraightThroughMask, expected_l0
from fastft.plans.sparse import sparse_schedules
from fastft.plans.sparse_schedule import SparseSchedule
from fastft.plans.sparse_selection import slot_count, smallest_magnitude
from helpers import tiny_model


@pytest.mark.parametrize("method", METHODS)
def test_each_method_patches_and_leaves_the_function_unchanged(method):
    model = tiny_model()
    batch = make_batch()
    with torch.no_grad():
        before = model(**batch).logits
    report = fastft.patch(model, config_for(method))
    modules = sparse_modules(model)
    assert len(modules) == 4 and all(r.kind == "sparse" for r in report.modules)
    for _, m in modules:
        expected_k = (m.out_features * max(1, round(0.05 * m.in_features)) if method == "sct"
                      else slot_count(0.05, m.out_features, m.in_features))
        assert m.k == expected_k
        transform = {"diff-pruning": HardConcreteGate, "mft": StraightThroughMask, "gmt": GradientMask}.get(method)
        assert (m.value_transform is None) if transform is None else isinstance(m.value_transform, transform)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, atol=1e-5, rtol=1e-5)


def test_sara_support_is_the_smallest_magnitudes():
    model = tiny_model()
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(tuple(TARGETS))}
    fastft.patch(model, config_for("sara"))
    for name, m in sparse_modules(model):
        assert torch.equal(m.delta_indices, smallest_magnitude(weights[name], m.k))


def test_lt_sft_support_is_the_most_changed_and_accepts_a_model():
    model = tiny_model()
    phase1 = tiny_model()
    gen = torch.Generator().manual_seed(1)
    chosen = {}
    with torch.no_grad():
        for name, m in phase1.named_modules():
            if name.endswith(tuple(TARGETS)):
                k = slot_count(0.05, m.out_features, m.in_features)
                idx = torch.randperm(m.weight.numel(), generator=gen)[:k]
                m.weight.view(-1)[idx] += 1.0 + torch.rand(k, generator=gen)
                chosen[name] = torch.sort(idx).values
    fastft.patch(model, fastft.SparseConfig(method="lt-sft", targets=TARGETS, density=0.05, phase1=phase1))
    for name, m in sparse_modules(model):
        assert torch.equal(m.delta_indices, chosen[name])


def test_sct_support_is_whole_salient_columns():
    model = tiny_model()
    batches = [make_batch(5), make_batch(6)]
    norms = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: norms.__setitem__(n, norms.get(n, 0) + a[0].double().square().reshape(-1, a[0].shape[-1]).sum(0)))
             for n, m in model.named_modules() if n.endswith(tuple(TARGETS))]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    fastft.patch(model, fastft.SparseConfig(method="sct", targets=TARGETS, density=0.125, calib=batches))
    for name, m in sparse_modules(model):
        channels = torch.topk(norms[name], max(1, round(0.125 * m.in_features))).indices
        cols = m.delta_indices % m.in_features
        assert torch.equal(cols.unique(), channels.sort().values)
        assert m.k == m.out_features * channels.numel()


@pytest.mark.parametrize("bad", [
    dict(method="lt-sft", phase1={"model.layers.0.self_attn.q_proj": torch.zeros(64, 64)}),  # other layers missing
    dict(method="lt-sft", phase1={n: torch.zeros(3, 3) for n in ["model.layers.0.self_attn.q_proj"]}),
    dict(method="sct", calib=lambda model: None),  # runs no layer
    dict(method="sara", targets=["no_such_proj"]),
])
def test_bad_inputs_change_nothing(bad):
    model = tiny_model()
    before = snapshot(model)
    config = fastft.SparseConfig(**{"targets": TARGETS, "density": 0.05, **bad})
    with pytest.raises(ValueError):
        fastft.patch(model, config)
    assert not fastft.is_patched(model) and not sparse_modules(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_a_tiny_llama(method):
    torch.manual_seed(0)
    model = tiny_model()
    options = {"density": 0.1}
    if method == "spiel":
        options.update(regrow_every=2, prune_fraction=0.2)
    if method == "diff-pruning":
        options.update(fix_at_step=4, l0_weight=1e-4, final_density=0.5)
    if method == "mft":  # masking a random tiny model's weights moves its loss little: mask more of them
        options.update(score_init=0.05, density=0.5)
    if method == "sct":
        options.update(density=0.2)
    fastft.patch(model, config_for(method, **options))
    batch = make_batch()
    with torch.no_grad():
        start = model(**batch).loss.item()
    lr = 0.1 if method == "mft" else 1e-2
    losses, _ = train_steps(model, 6, lr=lr, batch=batch)
    with torch.no_grad():
        end = model(**batch).loss.item()
    assert end < start - 0.05, (method, start, end, losses)


def test_spiel_cycle_moves_the_support_by_accumulated_candidate_gradients_and_moves_optimizer_state():
    torch.manual_seed(0)
    model = tiny_model()
    fastft.patch(model, config_for("spiel", regrow_every=2, prune_fraction=0.25, candidate_factor=2.0))
    (schedule,) = sparse_schedules(model)
    modules = sparse_modules(model)
    assert all(m.candidate_indices is not None for _, m in modules)
    # one step of training, then accumulate a second step's candidate gradients by hand and check the choice
    losses, optimizer = train_steps(model, 1, schedule=False)
    model.train()
    model(**make_batch(1)).loss.backward()
    optimizer.step()
    name, m = modules[0]
    grads = m.candidate_gradients().clone()
    cands = m.candidate_indices.clone()
    old_idx, old_val = m.delta_indices.clone(), m.delta_values.detach().clone()
    old_avg = optimizer.state[m.delta_values]["exp_avg"].clone()
    n = schedule.regrow_count(m)
    done = schedule.step(model, 2, optimizer)
    assert done and "SpIEL" in done[0]
    dropped = old_idx[torch.sort(old_val.abs(), stable=True).indices[:n]]
    grown = cands[torch.topk(grads.abs(), n).indices]
    expected = torch.sort(torch.cat([old_idx[~torch.isin(old_idx, dropped)], grown])).values
    assert torch.equal(m.delta_indices, expected)
    new_avg = optimizer.state[m.delta_values]["exp_avg"]
    for slot, index in enumerate(m.delta_indices.tolist()):
        if index in old_idx.tolist():
            old_slot = old_idx.tolist().index(index)
            assert m.delta_values[slot] == old_val[old_slot] and new_avg[slot] == old_avg[old_slot]
        else:
            assert m.delta_values[slot] == 0 and new_avg[slot] == 0
    assert m.candidate_indices is not None and not torch.isin(m.candidate_indices, m.delta_indices).any()
    assert m.candidate_gradients() is None


def test_spiel_candidate_gradients_equal_the_dense_gradient():
    layer = torch.nn.Linear(6, 5).double()
    module = SparseDeltaLinear(layer, torch.tensor([0, 7, 13, 20, 29]))
    inactive = torch.tensor([i for i in range(30) if i not in (0, 7, 13, 20, 29)])
    module.set_candidates(inactive)
    module.train()
    gen = torch.Generator().manual_seed(0)
    dense = torch.zeros(5, 6, dtype=torch.float64)
    for _ in range(3):
        x = torch.randn(4, 6, generator=gen, dtype=torch.float64)
        g = torch.randn(4, 5, generator=gen, dtype=torch.float64)
        module(x).backward(g)
        dense += g.t() @ x
    torch.testing.assert_close(module.candidate_gradients(), dense.flatten()[inactive])
    config = fastft.SparseConfig(method="spiel", density=5 / 30, prune_fraction=0.4, candidate_factor=4.0)
    schedule = SparseSchedule(config, [("layer", module)])
    schedule.regrow()
    masked = dense.flatten().abs().clone()
    masked[[0, 7, 13, 20, 29]] = -1
    grown = torch.topk(masked, 2).indices
    assert torch.isin(grown, module.delta_indices).all()


def test_gmt_keeps_exactly_the_top_fraction_of_each_layer_gradient():
    model = tiny_model()
    fastft.patch(model, config_for("gmt", keep_fraction=0.3))
    model.train()
    model(**make_batch()).loss.backward()
    for _, m in sparse_modules(model):
        assert int((m.delta_values.grad != 0).sum()) == max(1, math.floor(0.3 * m.k + 0.5))


def test_mft_forward_equals_the_masked_weights():
    model = tiny_model()
    fastft.patch(model, config_for("mft"))
    name, m = sparse_modules(model)[0]
    with torch.no_grad():
        m.delta_values.copy_(torch.randn(m.k, generator=torch.Generator().manual_seed(0)))
    mask = torch.ones(m.weight.numel())
    mask[m.delta_indices[m.delta_values <= 0]] = 0
    x = torch.randn(3, m.in_features)
    expected = F.linear(x, m.weight * mask.view_as(m.weight), m.bias)
    torch.testing.assert_close(m(x), expected)


def test_sara_nuclear_norm_joins_the_loss_and_trains():
    model = tiny_model()
    fastft.patch(model, config_for("sara", nuclear_weight=0.01))
    modules = sparse_modules(model)
    with torch.no_grad():
        for _, m in modules:
            m.delta_values.normal_(0, 0.1)
    model.train()
    batch = make_batch()
    loss = model(**batch).loss
    plain = model(input_ids=batch["input_ids"]).logits
    ce = F.cross_entropy(plain[:, :-1].reshape(-1, 96), batch["labels"][:, 1:].reshape(-1))
    penalty = sum(0.01 * torch.linalg.matrix_norm(m.delta_weight().float(), ord="nuc") for _, m in modules)
    torch.testing.assert_close(loss, ce + penalty)
    losses, _ = train_steps(model, 6)
    assert losses[-1] < losses[0]


def test_diff_pruning_adds_the_l0_penalty_to_the_loss_and_fixes_the_gates():
    model = tiny_model()
    fastft.patch(model, config_for("diff-pruning", l0_weight=0.01, final_density=0.25))
    model.train()
    batch = make_batch()
    torch.manual_seed(0)
    loss = model(**batch).loss
    torch.manual_seed(0)
    plain = model(input_ids=batch["input_ids"]).logits
    ce = F.cross_entropy(plain[:, :-1].reshape(-1, 96), batch["labels"][:, 1:].reshape(-1))
    penalty = sum(0.01 * expected_l0(m.value_transform.log_alpha, 2 / 3) for _, m in sparse_modules(model))
    torch.testing.assert_close(loss, ce + penalty)
    schedule = SparseSchedule(config_for("diff-pruning", final_density=0.25), sparse_modules(model))
    schedule.fix_gates()
    for _, m in sparse_modules(model):
        assert int(m.value_transform.fixed_mask.sum()) == max(1, math.floor(0.25 * m.k + 0.5))  # round half up
        assert m.regularization() is None


def test_four_bit_bases_select_on_the_dequantized_weight():
    pytest.importorskip("bitsandbytes")
    from helpers import quantize_linears

    from fastft.bnb import four_bit_weight

    model = quantize_linears(tiny_model())
    dequantized = {n: four_bit_weight(m).dequantize(torch.float32) for n, m in model.named_modules()
                   if n.endswith("down_proj")}
    report = fastft.patch(model, [fastft.SparseConfig(method="sara", targets=["down_proj"], density=0.05)])
    assert any("smallest |W|" in note for note in report.notes)
    for name, m in sparse_modules(model):
        assert m.is_4bit and torch.equal(m.delta_indices, smallest_magnitude(dequantized[name], m.k))
    losses, _ = train_steps(model, 4)
    assert losses[-1] < losses[0]


def test_lt_sft_from_a_larger_sparse_phase_one():
    phase1 = tiny_model()
    fastft.patch(phase1, fastft.SparseConfig(method="random", targets=TARGETS, density=0.2))
    train_steps(phase1, 3)
    model = tiny_model()
    fastft.patch(model, fastft.SparseConfig(method="lt-sft", targets=TARGETS, density=0.02, phase1=phase1))
    for (name, m), (_, p) in zip(sparse_modules(model), sparse_modules(phase1)):
        change = p.delta_weight().abs().flatten()
        assert torch.equal(m.delta_indices, torch.sort(torch.topk(change, m.k).indices).values)
        assert torch.isin(m.delta_indices, p.delta_indices).all() and (m.delta_values == 0).all()


def test_new_layers_take_the_mode_of_the_layers_they_replace():
    model = tiny_model()  # eval mode
    fastft.patch(model, config_for("diff-pruning"))
    assert all(not m.training and not m.value_transform.training for _, m in sparse_modules(model))
    batch = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, model(**batch).logits, atol=0, rtol=0)  # deterministic

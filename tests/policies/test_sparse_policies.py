"""Partial-backprop policies over a sparse fine-tuning patch: the policy chooses among the sparse deltas."""
from __future__ import annotations

import pytest
import torch

import fastft
from fastft.nn import SparseDeltaLinear
from helpers import tiny_model


def _sparse_model():
    torch.manual_seed(0)
    model = tiny_model("llama")
    fastft.patch(model, fastft.SparseConfig(method="random", density=0.05))
    model.train()
    return model


def _batch():
    return torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("policy,kwargs", [("layers", dict(layers=[1])), ("flops", dict(budget=0.5)),
                                           ("half", dict(seed=2))])
def test_a_policy_selects_among_the_sparse_deltas_and_training_follows_it(policy, kwargs):
    model = _sparse_model()
    deltas = {n for n, p in model.named_parameters() if p.requires_grad}
    assert deltas and all(n.endswith("delta_values") for n in deltas)
    batch = _batch()
    report = fastft.select_trainable(model, policy, batch=batch, **kwargs)
    chosen = {n for n, p in model.named_parameters() if p.requires_grad}
    assert chosen == set(report.trainable) and chosen and chosen < deltas
    if policy == "layers":
        assert all(".layers.1." in n for n in chosen)
    assert 0 < report.backward_flops < report.full_backward_flops

    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in deltas}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-1)
    model(batch, labels=batch).loss.backward()
    opt.step()
    moved = {n for n, p in model.named_parameters() if n in deltas and not torch.equal(p.detach(), before[n])}
    assert moved == chosen  # exactly the chosen deltas trained; the rest got no gradient
    assert all(isinstance(m, SparseDeltaLinear) for n, m in model.named_modules() if n + ".delta_values" in deltas)

    fastft.unselect(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == deltas

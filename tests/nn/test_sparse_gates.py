"""The sparse-delta value transforms against their reference formulations (float64)."""
import math

import pytest
import torch

from fastft.nn.sparse_gates import (
    STRETCH,
    GradientMask,
    HardConcreteGate,
    StraightThroughMask,
    expected_l0,
    hard_concrete_mean_gate,
    hard_concrete_sample,
    top_fraction_mask,
)


def _hard_concrete_reference(log_alpha: float, beta: float, u: float) -> float:
    low, high = STRETCH
    s = 1.0 / (1.0 + math.exp(-((math.log(u) - math.log(1.0 - u) + log_alpha) / beta)))
    return min(1.0, max(0.0, s * (high - low) + low))


def test_hard_concrete_sample_matches_the_formula_in_float64():
    gen = torch.Generator().manual_seed(0)
    log_alpha = torch.randn(50, generator=gen, dtype=torch.float64) * 3
    u = torch.rand(50, generator=gen, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    z = hard_concrete_sample(log_alpha, 2 / 3, u)
    expected = torch.tensor([_hard_concrete_reference(a, 2 / 3, v) for a, v in zip(log_alpha.tolist(), u.tolist())],
                            dtype=torch.float64)
    torch.testing.assert_close(z, expected, atol=1e-12, rtol=1e-12)
    assert (z == 0).any() and (z == 1).any()  # the stretch reaches exact zeros and ones


def test_expected_l0_is_the_probability_of_a_nonzero_gate():
    """Closed form Σ σ(log α − β log(−l/r)) against the float64 CDF of the stretched concrete at 0:
    P(z > 0) = P(s > −l/(r−l)) = σ(log α − β·logit(−l/(r−l)))... which equals the closed form; and a
    Monte-Carlo estimate from the sampler agrees within its standard error."""
    low, high = STRETCH
    log_alpha = torch.tensor([-2.0, 0.0, 0.5, 3.0], dtype=torch.float64)
    beta = 2 / 3
    t = -low / (high - low)
    exact = torch.sigmoid(log_alpha - beta * math.log(t / (1 - t)))
    for i in range(4):
        torch.testing.assert_close(expected_l0(log_alpha[i:i + 1], beta), exact[i], atol=1e-12, rtol=1e-12)
    gen = torch.Generator().manual_seed(1)
    n = 200_000
    u = torch.rand(n, 4, generator=gen, dtype=torch.float64).clamp(1e-9, 1 - 1e-9)
    frequency = (hard_concrete_sample(log_alpha, beta, u) > 0).double().mean(0)
    assert torch.all((frequency - exact).abs() < 5 * torch.sqrt(exact * (1 - exact) / n) + 1e-9)


def test_gate_modes_and_penalty():
    gate = HardConcreteGate(6, temperature=2 / 3, l0_weight=0.5, init=0.2).double()
    values = torch.arange(1.0, 7.0, dtype=torch.float64)
    gate.eval()
    torch.testing.assert_close(gate(values), values * hard_concrete_mean_gate(gate.log_alpha))
    torch.testing.assert_close(gate.regularization(), 0.5 * expected_l0(gate.log_alpha, 2 / 3))
    gate.train()
    torch.manual_seed(3)
    out = gate(values)
    torch.manual_seed(3)
    u = torch.rand(6, dtype=torch.float64).clamp(gate.eps, 1 - gate.eps)
    torch.testing.assert_close(out, values * hard_concrete_sample(gate.log_alpha, 2 / 3, u))
    gate.regularization().backward()
    assert gate.log_alpha.grad is not None and (gate.log_alpha.grad > 0).all()  # the penalty closes gates


def test_fix_keeps_the_largest_effective_values():
    gate = HardConcreteGate(5, init=1.0)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([3.0, -3.0, 3.0, 0.0, 3.0]))
    values = torch.tensor([0.1, 5.0, -2.0, 1.0, 0.4])
    new = gate.fix(values, keep=2)
    z = hard_concrete_mean_gate(gate.log_alpha.detach())
    eff = values * z
    kept = torch.topk(eff.abs(), 2).indices
    mask = torch.zeros(5)
    mask[kept] = 1
    assert torch.equal(gate.fixed_mask, mask)
    torch.testing.assert_close(new, eff * mask)
    gate.train()
    assert torch.equal(gate(new), new * mask) and gate.regularization() is None
    with pytest.raises(ValueError):
        gate.fix(values, keep=2)


def test_mft_mask_forward_is_the_masked_weight_and_backward_is_straight_through():
    w = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=torch.float64)
    transform = StraightThroughMask(w)
    scores = torch.tensor([1.0, -0.5, 0.2, -2.0], dtype=torch.float64, requires_grad=True)
    delta = transform(scores)
    mask = (scores > 0).double()
    assert torch.equal(w + delta, w * mask)  # the effective weight: the base kept or masked out
    g = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    delta.backward(g)
    torch.testing.assert_close(scores.grad, g * w)  # d(−w(1−m))/dm = w, dm/dscore = 1


def test_top_fraction_mask_keeps_exactly_the_top_entries():
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(37, generator=gen)
    for fraction in (0.01, 0.3, 0.5, 1.0):
        mask = top_fraction_mask(g, fraction)
        count = max(1, round(fraction * 37 + 1e-9))
        assert int(mask.sum()) == count
        kept = g.abs()[mask.bool()]
        dropped = g.abs()[~mask.bool()]
        assert dropped.numel() == 0 or kept.min() > dropped.max()


def test_gradient_mask_is_identity_forward_and_masks_backward():
    values = torch.randn(20, dtype=torch.float64, requires_grad=True)
    out = GradientMask(0.25)(values)
    assert torch.equal(out, values)
    g = torch.randn(20, dtype=torch.float64)
    out.backward(g)
    torch.testing.assert_close(values.grad, g * top_fraction_mask(g, 0.25))
    assert int((values.grad != 0).sum()) == 5
    with pytest.raises(ValueError):
        GradientMask(0.0)


def test_nuclear_norm_penalty_is_the_nuclear_norm_of_the_dense_delta():
    from fastft.nn.sparse_delta import SparseDeltaLinear
    from fastft.nn.sparse_gates import NuclearNormPenalty

    layer = torch.nn.Linear(6, 5).double()
    idx = torch.tensor([0, 4, 7, 13, 20, 29])
    module = SparseDeltaLinear(layer, idx, torch.randn(6, dtype=torch.float64))
    module.value_transform = NuclearNormPenalty(0.3)
    x = torch.randn(2, 6, dtype=torch.float64)
    torch.testing.assert_close(module(x), torch.nn.functional.linear(x, layer.weight + module.delta_weight(), layer.bias))
    values = module.delta_values.detach().clone().requires_grad_(True)
    dense = torch.zeros(30, dtype=torch.float64).index_put((idx,), values).view(5, 6)
    expected = 0.3 * torch.linalg.svdvals(dense).sum()
    term = module.regularization()
    torch.testing.assert_close(term.double(), expected, atol=1e-5, rtol=1e-5)  # computed in float32
    term.backward()
    expected.backward()
    torch.testing.assert_close(module.delta_values.grad, values.grad, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        NuclearNormPenalty(0.0)

"""The sparse methods' selection rules against direct reference formulations."""
import pytest
import torch
from torch import nn

from fastft.plans.sparse_selection import (
    activation_norms,
    channel_count,
    column_support,
    largest_magnitude,
    most_changed,
    prune_slots,
    random_support,
    regrow_indices,
    salient_channels,
    slot_count,
    smallest_magnitude,
    spiel_support,
)


def _weight(out=7, inp=9, seed=0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def test_counts():
    assert slot_count(0.005, 64, 88) == round(0.005 * 64 * 88)
    assert slot_count(1e-9, 4, 4) == 1 and slot_count(1.0, 4, 4) == 16
    assert channel_count(0.125, 64) == 8 and channel_count(1e-6, 64) == 1


def test_sara_picks_the_smallest_magnitudes():
    w = _weight()
    idx = smallest_magnitude(w, 10)
    assert idx.dtype == torch.int64 and torch.equal(idx, idx.sort().values)
    flat = w.abs().flatten()
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[idx] = True
    assert flat[chosen].max() < flat[~chosen].min()
    assert torch.equal(largest_magnitude(w, 10), torch.sort(torch.topk(flat, 10).indices).values)


def test_lt_sft_picks_the_most_changed():
    w0 = _weight()
    w1 = w0 + 0.01 * _weight(seed=1)
    w1.view(-1)[[3, 17, 40]] += torch.tensor([5.0, -4.0, 3.0])
    assert torch.equal(most_changed(w0, w1, 3), torch.tensor([3, 17, 40]))
    with pytest.raises(ValueError):
        most_changed(w0, w1.t(), 3)


def test_random_support_is_distinct_seeded_and_avoids_excluded():
    gen = torch.Generator().manual_seed(0)
    exclude = torch.arange(0, 100, 3)
    idx = random_support(100, 40, gen, exclude=exclude)
    assert idx.numel() == 40 and idx.unique().numel() == 40 and not torch.isin(idx, exclude).any()
    assert torch.equal(idx, random_support(100, 40, torch.Generator().manual_seed(0), exclude=exclude))
    big = random_support(10_000, 10, torch.Generator().manual_seed(1))
    assert big.unique().numel() == 10 and big.max() < 10_000
    with pytest.raises(ValueError):
        random_support(10, 8, gen, exclude=torch.arange(5))


def test_random_support_is_uniform():
    counts = torch.zeros(20)
    gen = torch.Generator().manual_seed(3)
    for _ in range(2000):
        counts[random_support(20, 3, gen)] += 1
    expected = 2000 * 3 / 20
    assert (counts - expected).abs().max() < 5 * expected ** 0.5  # no bias towards low indices


def test_sct_picks_the_channels_with_the_largest_activation_norms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    batches = [{"input": torch.randn(3, 6) * torch.tensor([1.0, 10, 1, 1, 5, 1])} for _ in range(2)]

    def calib(m):
        for b in batches:
            m(b["input"])

    model.train()
    norms = activation_norms(model, {"0": model[0], "2": model[2]}, calib)
    assert model.training and all(m.training for m in model.modules())
    x = torch.cat([b["input"] for b in batches]).double()
    torch.testing.assert_close(norms["0"], x.square().sum(0).sqrt())
    h = torch.relu(model[0](torch.cat([b["input"] for b in batches]))).double()
    torch.testing.assert_close(norms["2"], h.square().sum(0).sqrt(), atol=1e-5, rtol=1e-5)
    channels = salient_channels(norms["0"], 2)
    assert torch.equal(channels, torch.tensor([1, 4]))
    flat = column_support(channels, 5, 6)
    expected = torch.tensor([r * 6 + c for r in range(5) for c in (1, 4)])
    assert torch.equal(flat, expected)
    with pytest.raises(ValueError):
        activation_norms(model, {"0": model[0]}, lambda m: None)


def test_spiel_prune_and_regrow():
    values = torch.tensor([0.5, -0.01, 2.0, 0.02, -1.0])
    assert torch.equal(prune_slots(values, 2), torch.tensor([1, 3]))
    candidates = torch.tensor([30, 2, 11, 7])
    grads = torch.tensor([0.1, -3.0, 0.2, 2.5])
    assert torch.equal(regrow_indices(candidates, grads, 2), torch.tensor([2, 7]))
    indices = torch.tensor([1, 4, 9, 12, 20])
    new_idx, new_val = spiel_support(indices, values, candidates, grads, 2)
    assert torch.equal(new_idx, torch.tensor([1, 2, 7, 9, 20]))
    assert torch.equal(new_val, torch.tensor([0.5, 0.0, 0.0, 2.0, -1.0]))


def test_spiel_regrow_equals_a_dense_gradient_reference():
    """Candidates = every inactive position, their accumulated gradient = the dense gradient there: regrow picks
    the inactive entries of largest |Σ dense grad|."""
    gen = torch.Generator().manual_seed(4)
    out, inp = 5, 6
    active = torch.tensor([0, 7, 13, 20, 29])
    dense = sum(torch.randn(out, inp, generator=gen, dtype=torch.float64) for _ in range(3))
    inactive = torch.tensor([i for i in range(out * inp) if i not in active.tolist()])
    grown = regrow_indices(inactive, dense.flatten()[inactive], 3)
    masked = dense.flatten().abs().clone()
    masked[active] = -1
    assert torch.equal(grown, torch.sort(torch.topk(masked, 3).indices).values)

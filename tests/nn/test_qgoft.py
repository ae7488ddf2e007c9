"""QGOFTLinear: the quasi-Givens blocks and their closed-form regularizer, identity at init, merge, Conv1D."""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close
from torch import nn

from fastft.math.givens import dense_matrix
from fastft.nn import QGOFTLinear
from fastft.nn.qgoft import quasi_givens_blocks, soft_orthogonality


def trained(layer, seed=0, std=0.2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapter_parameters().values():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return layer


def test_blocks_are_givens_rotations_with_the_adjustments():
    theta = torch.tensor([[0.3]])
    scale = torch.tensor([[[1.5], [0.5]]])
    delta = torch.tensor([[0.2]])
    live = torch.tensor([[True]])
    a, b, c, e = quasi_givens_blocks(theta, scale, delta, live)[0, :, 0]
    t, phi = 0.3, 0.5
    expected = torch.tensor([[1.5 * torch.cos(torch.tensor(t)), -0.5 * torch.sin(torch.tensor(phi))],
                             [1.5 * torch.sin(torch.tensor(t)), 0.5 * torch.cos(torch.tensor(phi))]])
    assert_close(torch.stack([torch.stack([a, b]), torch.stack([c, e])]), expected)
    B = expected.double()
    assert_close(soft_orthogonality(scale, delta, live).double(), ((B.t() @ B - torch.eye(2, dtype=torch.float64)) ** 2).sum(),
                 dtype=torch.float32)
    # exact rotations: orthogonal blocks, no term
    R = quasi_givens_blocks(theta, None, None, live)[0, :, 0].view(2, 2).double()
    assert_close(R.t() @ R, torch.eye(2, dtype=torch.float64), dtype=torch.float32)
    assert soft_orthogonality(None, None, live) is None


@pytest.mark.parametrize("d_in", [16, 13])
def test_regularizer_is_the_sum_of_block_terms_and_zero_for_orthogonal_blocks(d_in):
    layer = QGOFTLinear(nn.Linear(d_in, 5), orthogonality_weight=0.5)
    assert layer.regularization().item() == 0.0
    trained(layer)
    blocks = layer.blocks().double()
    expected = 0.0
    for s in range(layer.stages):
        for p in range(blocks.shape[2]):
            if layer.live[s, p]:
                a, b, c, e = blocks[s, :, p]
                B = torch.stack([torch.stack([a, b]), torch.stack([c, e])])
                expected += ((B.t() @ B - torch.eye(2, dtype=torch.float64)) ** 2).sum()
    assert_close(layer.regularization().double(), 0.5 * expected, dtype=torch.float32)
    layer.regularization().backward()
    assert layer.scale.grad is not None and layer.delta.grad.abs().sum() > 0


@pytest.mark.parametrize("d_in,stages", [(16, None), (13, None), (16, 2)])
def test_identity_at_init_and_the_forward_is_x_Mt_Wt(d_in, stages):
    torch.manual_seed(0)
    base = nn.Linear(d_in, 7).double()
    layer = QGOFTLinear(copy.deepcopy(base), stages=stages)
    x = torch.randn(3, 4, d_in, dtype=torch.float64)
    assert torch.equal(layer(x), base(x))
    trained(layer)
    M = dense_matrix(layer.blocks().double(), d_in)
    assert_close(layer(x), (x @ M.t()) @ base.weight.t() + base.bias)
    # dead pairs (padding) stay identity, whatever their parameters hold
    assert layer.trainable_count() == int(layer.live.sum()) * 4


@pytest.mark.parametrize("d_in", [16, 12])
def test_merge_is_exact_and_unmerged_is_the_original(d_in):
    torch.manual_seed(1)
    base = nn.Linear(d_in, 6)
    original = base.weight.detach().clone()
    layer = trained(QGOFTLinear(base))
    x = torch.randn(5, d_in)
    y = layer(x)
    M = dense_matrix(layer.blocks().double(), d_in)
    merged = layer.unpatched(merge=True)
    assert merged is base
    assert_close(merged.weight.double(), original.double() @ M, dtype=torch.float32)
    assert_close(merged(x), y)
    base2 = nn.Linear(d_in, 6)
    w2 = base2.weight.detach().clone()
    assert torch.equal(trained(QGOFTLinear(base2)).unpatched(merge=False).weight, w2)


def test_conv1d_base():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(2)
    conv = Conv1D(5, 8)  # nx=8 in, nf=5 out; weight 8×5
    layer = trained(QGOFTLinear(copy.deepcopy(conv)))
    x = torch.randn(3, 8)
    M = dense_matrix(layer.blocks().double(), 8).float()
    assert_close(layer(x), (x @ M.t()) @ conv.weight + conv.bias)
    y = layer(x)
    assert_close(layer.unpatched(merge=True)(x), y)


def test_bad_arguments_and_state():
    with pytest.raises(ValueError, match="stages=5"):
        QGOFTLinear(nn.Linear(16, 4), stages=5)
    with pytest.raises(ValueError, match="stages=0"):
        QGOFTLinear(nn.Linear(16, 4), stages=0)
    with pytest.raises(TypeError, match="nn.Linear"):
        QGOFTLinear(nn.Conv2d(2, 2, 1))
    layer = QGOFTLinear(nn.Linear(16, 4), learn_scale=False, relative_angle=False)
    assert set(layer.adapter_parameters()) == {"theta"} and layer.regularization() is None
    with pytest.raises(ValueError, match="expected"):
        layer.load_adapter_state_dict({"theta": torch.zeros(4, 8), "scale": torch.ones(4, 2, 8)})
    with pytest.raises(ValueError, match="saved shape"):
        layer.load_adapter_state_dict({"theta": torch.zeros(3, 8)})
    with pytest.raises(ValueError, match="input's last dimension"):
        layer(torch.randn(2, 15))


def test_half_precision_input_computes_in_float32_blocks():
    torch.manual_seed(3)
    base = nn.Linear(16, 4).to(torch.bfloat16)
    layer = trained(QGOFTLinear(base))
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.theta.dtype == torch.float32
    y.float().sum().backward()
    assert layer.theta.grad is not None and layer.theta.grad.dtype == torch.float32

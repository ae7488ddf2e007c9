"""The Givens butterfly op's PyTorch reference against float64 autograd of the EXPLICIT matrix.

The expected map is built densely from the definition (``fastft.math.givens.dense_matrix``: each stage's P×P
matrix entry by entry from its pairs, multiplied, restricted to d×d), and ``x Mᵀ`` is differentiated by
torch autograd in float64: the reference's z, dx and block gradient must match it, for powers of two and
for d with padding (dead pairs, general blocks too), for a partial number of stages, and in float32.
"""
from __future__ import annotations

import pytest
import torch
from helpers import assert_close, backend

from fastft.math.givens import butterfly_width, dense_matrix, identity_blocks, live_pairs, pair_indices
from fastft.ops.givens_rotation import (
    givens_rotation, givens_rotation_backward_reference, givens_rotation_flops, givens_rotation_reference,
)


def random_blocks(d, stages, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    P = butterfly_width(d)
    return (identity_blocks(d, stages, torch.float64) + 0.3 * torch.randn(stages, 4, P // 2, generator=gen,
                                                                        dtype=torch.float64)).to(dtype)


def explicit(x, blocks, grad):
    """z = x Mᵀ and its gradients by float64 autograd through the dense M."""
    x = x.detach().double().requires_grad_(True)
    blocks = blocks.detach().double().requires_grad_(True)
    z = x @ dense_matrix(blocks, x.shape[1]).t()
    dx, dblocks = torch.autograd.grad(z, (x, blocks), grad.double())
    return z.detach(), dx, dblocks


def test_pairing_is_the_butterfly():
    i, j = pair_indices(8, 1)
    assert i.tolist() == [0, 1, 4, 5] and j.tolist() == [2, 3, 6, 7]
    assert live_pairs(6, 3).tolist() == [[True, True, True, False], [True, True, False, False],
                                         [True, True, False, False]]
    assert butterfly_width(1) == 2 and butterfly_width(13) == 16 and butterfly_width(16) == 16


@pytest.mark.parametrize("d,stages", [(8, 3), (16, 2), (13, 4), (6, 3), (1, 1), (24, 5)])
def test_reference_matches_float64_autograd_of_the_dense_matrix(d, stages):
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(7, d, generator=gen, dtype=torch.float64)
    g = torch.randn(7, d, generator=gen, dtype=torch.float64)
    blocks = random_blocks(d, stages)
    z_exp, dx_exp, db_exp = explicit(x, blocks, g)
    z = givens_rotation_reference(x, blocks)
    dx, db = givens_rotation_backward_reference(g, x, blocks, True, True)
    assert_close(z, z_exp, msg="z")
    assert_close(dx, dx_exp, msg="dx")
    assert_close(db, db_exp, msg="dblocks")
    # only what is asked
    dx_only, none = givens_rotation_backward_reference(g, x, blocks, True, False)
    assert none.numel() == 0 and torch.equal(dx_only, dx)
    empty, db_only = givens_rotation_backward_reference(g, x, blocks, False, True)
    assert empty.numel() == 0 and torch.equal(db_only, db)


def test_float32_reference_and_the_autograd_op():
    d, stages = 12, 4
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, d, generator=gen)
    g = torch.randn(2, 5, d, generator=gen)
    blocks = random_blocks(d, stages, torch.float32)
    z_exp, dx_exp, db_exp = explicit(x.reshape(-1, d), blocks, g.reshape(-1, d))
    xr = x.clone().requires_grad_(True)
    br = blocks.clone().requires_grad_(True)
    with backend("torch"):
        z = givens_rotation(xr, br)
        z.backward(g)
    assert z.shape == x.shape and z.dtype == torch.float32
    assert_close(z.reshape(-1, d), z_exp.float(), msg="z")
    assert_close(xr.grad.reshape(-1, d), dx_exp.float(), msg="dx")
    assert_close(br.grad, db_exp.float(), msg="dblocks")


def test_identity_blocks_and_dead_pairs_keep_padding_out():
    d = 11
    x = torch.randn(4, d, dtype=torch.float64)
    assert torch.equal(givens_rotation_reference(x, identity_blocks(d, 4, torch.float64)), x)
    blocks = random_blocks(d, 4)
    live = live_pairs(d, 4)
    blocks = torch.where(live[:, None, :], blocks, identity_blocks(d, 4, torch.float64))
    M = dense_matrix(blocks, d)
    full = dense_matrix(blocks, butterfly_width(d))
    # the padded coordinates neither feed nor receive anything: M restricted to d is the full map's block
    assert torch.equal(full[:d, d:], torch.zeros_like(full[:d, d:]))
    assert torch.equal(full[d:, :d], torch.zeros_like(full[d:, :d]))
    assert_close(givens_rotation_reference(x, blocks), x @ M.t())


def test_saved_tensors_are_the_input_and_the_blocks():
    x = torch.randn(5, 8, requires_grad=True)
    blocks = random_blocks(8, 3, torch.float32).requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), backend("torch"):
        givens_rotation(x, blocks)
    assert sorted(tuple(t.shape) for t in saved) == [(3, 4, 4), (5, 8)]


def test_bad_blocks_and_flops():
    with pytest.raises(ValueError, match="do not fit"):
        givens_rotation(torch.randn(3, 8), torch.zeros(2, 4, 8))
    with pytest.raises(ValueError, match="S <= 3"):
        givens_rotation(torch.randn(3, 8), torch.zeros(4, 4, 4))
    with pytest.raises(TypeError):
        givens_rotation(torch.ones(3, 8, dtype=torch.int64), torch.zeros(1, 4, 4))
    f = givens_rotation_flops(10, 12, 4)
    assert f == {"forward": 6 * 10 * 8 * 4, "backward": 14 * 10 * 8 * 4, "matmul": 0}


def test_node_cost_is_registered_beside_the_op():
    import importlib

    from fastft import node_costs

    op_module = importlib.import_module("fastft.ops.givens_rotation")  # fastft.ops.givens_rotation is the function

    x = torch.randn(3, 8, requires_grad=True)
    blocks = random_blocks(8, 3, torch.float32).requires_grad_(True)
    with backend("torch"):
        node = givens_rotation(x, blocks).grad_fn
    while type(node).__name__ != node_costs.custom_op_node("givens_rotation"):
        node = node.next_functions[0][0]
    assert node_costs.NODE_COSTS[type(node).__name__] is op_module.givens_rotation_backward_flops
    assert op_module.givens_rotation_backward_flops(node, None) == [(0, (0, 1))]

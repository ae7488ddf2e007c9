"""The Triton Givens-butterfly kernels (fastft.kernels.givens) against the PyTorch reference, under the interpreter.

Token counts are not multiples of the row block (masks), d covers a power of two and padded widths, fp32 and
fp16 (the kernels' arithmetic is elementwise, so bf16 is exercised too). The backward's block gradient is a
sum of per-program partials: several programs (a row-block loop per program) must give the reference's sum,
and two runs the same bits.
"""
from __future__ import annotations

import pytest
import torch
from helpers import assert_close, backend

from fastft.math.givens import butterfly_width, identity_blocks
from fastft.ops.givens_rotation import givens_rotation, givens_rotation_backward_reference, givens_rotation_reference

givens = pytest.importorskip("fastft.kernels.givens")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make(tokens, d, stages, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=gen).to(dtype)
    g = torch.randn(tokens, d, generator=gen).to(dtype)
    blocks = identity_blocks(d, stages) + 0.3 * torch.randn(stages, 4, butterfly_width(d) // 2, generator=gen)
    return x, g, blocks


@pytest.mark.parametrize("tokens,d,stages", [(19, 16, 4), (5, 12, 4), (37, 8, 2), (3, 1, 1)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_backward_match_the_reference(dtype, tokens, d, stages):
    x, g, blocks = make(tokens, d, stages, dtype)
    z = givens.givens_forward(x, blocks)
    assert z.dtype == dtype
    assert_close(z, givens_rotation_reference(x, blocks), msg="z")
    dx, db = givens.givens_backward(g, x, blocks, True, True)
    dx_ref, db_ref = givens_rotation_backward_reference(g, x, blocks, True, True)
    assert dx.dtype == dtype and db.dtype == torch.float32
    assert_close(dx, dx_ref, msg="dx")
    # block gradient: a float32 sum over tokens in both; the summation order differs (per program partials)
    assert_close(db, db_ref, dtype=torch.float32 if dtype == torch.float32 else torch.float16, msg="dblocks")


def test_backward_parts_and_determinism(monkeypatch):
    x, g, blocks = make(23, 16, 4, torch.float32, seed=3)
    monkeypatch.setattr(givens, "_MAX_TILE_BACKWARD", 32)  # two rows a block: 12 row blocks over 3 programs
    dx, db = givens.givens_backward(g, x, blocks, True, True)
    dx2, db2 = givens.givens_backward(g, x, blocks, True, True)
    assert torch.equal(dx, dx2) and torch.equal(db, db2)
    _, db_only = givens.givens_backward(g, x, blocks, False, True)
    dx_only, none = givens.givens_backward(g, x, blocks, True, False)
    assert torch.equal(db_only, db) and torch.equal(dx_only, dx) and none.numel() == 0
    dx_ref, db_ref = givens_rotation_backward_reference(g, x, blocks, True, True)
    assert_close(dx, dx_ref)
    assert_close(db, db_ref)


def test_the_op_dispatches_to_triton_with_autograd():
    x, g, blocks = make(9, 12, 3, torch.float32, seed=5)
    xr, br = x.clone().requires_grad_(True), blocks.clone().requires_grad_(True)
    with backend("triton"):
        z = givens_rotation(xr, br)
        z.backward(g)
    dx_ref, db_ref = givens_rotation_backward_reference(g, x, blocks, True, True)
    assert_close(z, givens_rotation_reference(x, blocks))
    assert_close(xr.grad, dx_ref)
    assert_close(br.grad, db_ref)


def test_no_rows():
    x, g, blocks = make(0, 8, 3, torch.float32)
    assert givens.givens_forward(x, blocks).shape == (0, 8)
    dx, db = givens.givens_backward(g, x, blocks, True, True)
    assert dx.shape == (0, 8) and torch.equal(db, torch.zeros_like(blocks))


def test_exact_rotations_step_back_exactly_enough():
    """The backward reconstructs stage inputs through inverse blocks; for rotations the inverse is the transpose."""
    gen = torch.Generator().manual_seed(7)
    d, stages = 16, 4
    theta = torch.randn(stages, d // 2, generator=gen)
    blocks = torch.stack((theta.cos(), -theta.sin(), theta.sin(), theta.cos()), 1)
    x = torch.randn(21, d, generator=gen)
    g = torch.randn(21, d, generator=gen)
    dx, db = givens.givens_backward(g, x, blocks, True, True)
    dx_ref, db_ref = givens_rotation_backward_reference(g, x, blocks, True, True)
    assert_close(dx, dx_ref)
    assert_close(db, db_ref)
    inv = givens.inverse_blocks(blocks)
    assert_close(inv, torch.stack((blocks[:, 0], blocks[:, 2], blocks[:, 1], blocks[:, 3]), 1))

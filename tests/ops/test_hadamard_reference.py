"""The Hadamard transform's PyTorch reference against the dense matrix, built independently here in float64.

The expected matrix is assembled from its definition (``H_d[a·2^n + b, c·2^n + e] = H_K[a, c]·S[b, e] /
sqrt(d)``, S[b, e] = (-1)^popcount(b & e)) without the transform's code path; the K-factors are checked to
be Hadamard matrices exactly in integer arithmetic. Big sizes are checked on a few rows and a sample of
output coordinates (each an exact float64 dot product with a row or column of H_d).
"""
from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close, backend

from fastft.ops import hadamard_matrix, hadamard_transform, is_hadamard_size
from fastft.ops.hadamard import (
    MAX_K_FACTOR,
    LLM_SIZES as DOCUMENTED_SIZES,
    WILLIAMSON_FIRST_ROWS,
    hadamard_factorization,
    hadamard_k_factor,
    supported_sizes_table,
    hadamard_transform_reference,
    k_factor_construction,
)

# Hidden and intermediate sizes (and head dims) of Llama 2/3, Qwen2/2.5/3, Mistral, Gemma 1/2/3.
LLM_SIZES = {
    64: 1, 80: 20, 96: 12, 128: 1, 256: 1,
    896: 28, 1152: 36, 1536: 12, 2048: 1, 2304: 36, 2560: 20, 3072: 12, 3584: 28, 3840: 60, 4096: 1,
    4608: 36, 4864: 76, 5120: 20, 5376: 84, 6144: 12, 6912: 108, 8192: 1, 8960: 140, 9216: 36, 9728: 76,
    10240: 20, 11008: 172, 12288: 12, 13824: 108, 14336: 28, 15360: 60, 16384: 1, 17408: 68, 18944: 148,
    21504: 84, 24576: 12, 25600: 100, 27648: 108, 28672: 28, 29568: 924, 36864: 36, 53248: 52,
}


def sylvester_entries(rows: torch.Tensor, cols: torch.Tensor, n: int) -> torch.Tensor:
    """S[b, e] = (-1)^popcount(b & e) for broadcast index tensors b, e."""
    both = rows & cols
    parity = torch.zeros_like(both)
    for t in range(n):
        parity ^= (both >> t) & 1
    return (1 - 2 * parity).double()


def sylvester(n: int) -> torch.Tensor:
    idx = torch.arange(1 << n)
    return sylvester_entries(idx[:, None], idx[None, :], n)


def dense(d: int) -> torch.Tensor:
    K, n = hadamard_factorization(d)
    HK = hadamard_k_factor(K, torch.float64)
    S = sylvester(n)
    M = 1 << n
    H = (HK[:, None, :, None] * S[None, :, None, :]).reshape(d, d)  # H[(a,b),(c,e)] = HK[a,c] S[b,e]
    assert H.shape == (K * M, K * M)
    return H / math.sqrt(d)


def dense_row(d: int, i: int) -> torch.Tensor:
    """Row i of H_d, from the definition."""
    K, n = hadamard_factorization(d)
    M = 1 << n
    a, b = divmod(i, M)
    HK = hadamard_k_factor(K, torch.float64)
    s_row = sylvester_entries(torch.tensor(b), torch.arange(M), n)
    return torch.kron(HK[a], s_row) / math.sqrt(d)


def test_k_factors_are_hadamard_matrices():
    built = [K for K in range(4, 401, 4) if k_factor_construction(K)] + [924]
    assert {12, 20, 28, 36, 52, 60, 76, 84, 100, 108, 140, 148, 172, 344}.issubset(built)
    for K in built:
        H = hadamard_k_factor(K, torch.float64)  # integer products and sums: exact in float64
        assert set(H.unique().tolist()) == {-1, 1}, K
        assert torch.equal(H @ H.t(), K * torch.eye(K, dtype=torch.float64)), f"K={K} ({k_factor_construction(K)})"


def test_williamson_rows_satisfy_the_williamson_conditions():
    for t, rows in WILLIAMSON_FIRST_ROWS.items():
        blocks = []
        for row in rows:
            a = torch.tensor([1 if c == "+" else -1 for c in row])
            assert len(row) == t and all(a[i] == a[(t - i) % t] for i in range(t))  # symmetric circulant
            blocks.append(torch.stack([torch.roll(a, k) for k in range(t)]))
        assert torch.equal(sum(M @ M.t() for M in blocks), 4 * t * torch.eye(t, dtype=torch.int64))
        assert k_factor_construction(4 * t) == f"williamson t={t}"


def test_documented_table_matches():
    assert set(DOCUMENTED_SIZES) == set(LLM_SIZES)
    table = supported_sizes_table()
    assert "11008       172·2^6  williamson t=43" in table and "unsupported" not in table


def test_paley_types():
    # Paley I is "skew type" (H - I skew), Paley II is symmetric; the first row is all ones for Paley I.
    H = hadamard_k_factor(12, torch.int64)
    assert k_factor_construction(12).startswith("paley1")
    assert torch.equal(H - torch.eye(12, dtype=torch.int64), -(H - torch.eye(12, dtype=torch.int64)).t())
    H = hadamard_k_factor(36, torch.int64)
    assert k_factor_construction(36).startswith("paley2")
    assert torch.equal(H, H.t())


@pytest.mark.parametrize("d, K", sorted(LLM_SIZES.items()))
def test_llm_sizes_and_their_k_factors(d, K):
    assert is_hadamard_size(d)
    assert hadamard_factorization(d)[0] == K


@pytest.mark.parametrize("d", [1, 2, 4, 8, 16, 32, 64, 128, 12, 24, 48, 20, 40, 28, 56, 36, 52, 60, 76, 84, 100,
                               108, 140, 148, 172, 344, 1024, 1536, 2560])
def test_matches_dense_matrix(d):
    H = dense(d)
    assert_close(hadamard_matrix(d, torch.float64), H)
    assert_close(H @ H.t(), torch.eye(d, dtype=torch.float64))
    g = torch.Generator().manual_seed(d)
    x = torch.randn(2, 3, d, generator=g, dtype=torch.float64)
    with backend("torch"):
        assert_close(hadamard_transform(x), x @ H.t())
        assert_close(hadamard_transform(x, inverse=True), x @ H)
        assert_close(hadamard_transform(torch.eye(d, dtype=torch.float64)), H.t())


@pytest.mark.parametrize("d", sorted({d for d in LLM_SIZES if d >= 3584} | {2**15, 2**16}))
def test_large_sizes_on_sampled_coordinates(d):
    """A few rows of x, every output checked at 24 sampled coordinates j against x · H_d[j, :] (and x · H_d[:, j])."""
    g = torch.Generator().manual_seed(d)
    x = torch.randn(3, d, generator=g, dtype=torch.float64)
    with backend("torch"):
        y = hadamard_transform(x)
        yi = hadamard_transform(x, inverse=True)
    K, n = hadamard_factorization(d)
    cols = torch.randperm(d, generator=g)[:24].tolist() + [0, d - 1, (K - 1) << n]
    rows = torch.stack([dense_row(d, j) for j in cols])  # rows[k] = H_d[cols[k], :]
    assert_close(y[:, cols], x @ rows.t())
    # x H_d at column j needs column j of H_d: H_dᵀ = (H_Kᵀ ⊗ S) / sqrt(d), its rows are H_d's columns.
    HKt = hadamard_k_factor(K, torch.float64).t()
    M = 1 << n
    col_rows = torch.stack([torch.kron(HKt[j // M], dense_row(M, j % M) * math.sqrt(M)) / math.sqrt(d) for j in cols])
    assert_close(yi[:, cols], x @ col_rows.t())
    # and the whole output is orthonormal: norms are kept, the inverse undoes the forward
    assert_close(y.norm(dim=-1), x.norm(dim=-1))
    with backend("torch"):
        assert_close(hadamard_transform(y, inverse=True), x)


@pytest.mark.parametrize("d", [16, 12, 28, 40])
@pytest.mark.parametrize("inverse", [False, True])
def test_gradient_is_the_opposite_transform(d, inverse):
    H = dense(d)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, d, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(5, d, generator=g, dtype=torch.float64)
    with backend("torch"):
        y = hadamard_transform(x, inverse=inverse)
    (dx,) = torch.autograd.grad(y, x, grad)
    xr = x.detach().clone().requires_grad_(True)
    yr = xr @ (H if inverse else H.t())
    (want,) = torch.autograd.grad(yr, xr, grad)
    assert_close(dx, want)
    if d <= 16:  # numerical Jacobians cost d² evaluations: the small sizes cover both code paths
        with backend("torch"):
            assert torch.autograd.gradcheck(lambda t: hadamard_transform(t, inverse=inverse), (x[:1],))
            assert torch.autograd.gradgradcheck(lambda t: hadamard_transform(t, inverse=inverse), (x[:1],))


def test_nothing_is_saved_for_backward():
    saved = []
    x = torch.randn(4, 24, requires_grad=True)
    with backend("torch"), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = hadamard_transform(x)
    y.sum().backward()
    assert saved == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 12, 344])
def test_low_precision_inputs_compute_in_float32(dtype, d):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, d, generator=g).to(dtype)
    with backend("torch"):
        y = hadamard_transform(x)
    assert y.dtype == dtype and y.shape == x.shape
    want = x.double() @ dense(d).t()
    assert_close(y, want, dtype)
    # the half result is the float32 result rounded once
    if dtype != torch.float32:
        with backend("torch"):
            assert torch.equal(y, hadamard_transform(x.float()).to(dtype))


def test_leading_shapes_and_non_contiguous_input():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 40, 3, generator=g, dtype=torch.float64)
    x = base.transpose(1, 2)  # (6, 3, 40), not contiguous
    H = dense(40)
    with backend("torch"):
        assert_close(hadamard_transform(x), x @ H.t())
        v = torch.randn(40, dtype=torch.float64, generator=g)
        assert_close(hadamard_transform(v), v @ H.t())
        assert hadamard_transform(torch.empty(0, 40)).shape == (0, 40)


@pytest.mark.parametrize("d", [3, 6, 10, 172 * 43, 22, 44 * 47 * 2, 0])
def test_unsupported_sizes_raise_naming_the_size(d):
    assert not is_hadamard_size(d)
    with pytest.raises(ValueError, match=f"d={d}"):
        hadamard_transform(torch.zeros(2, d))
    with pytest.raises(ValueError, match=f"d={d}"):
        hadamard_matrix(d)


def test_k_factor_limit_and_bad_dtypes():
    assert k_factor_construction(MAX_K_FACTOR * 2 + 4) is None
    with pytest.raises(TypeError, match="int64"):
        hadamard_transform(torch.zeros(2, 8, dtype=torch.int64))


def test_custom_op_registration():
    from fastft.ops.hadamard import _hadamard_transform_op

    x = torch.randn(3, 24, requires_grad=True)
    torch.library.opcheck(_hadamard_transform_op, (x, False))
    torch.library.opcheck(_hadamard_transform_op, (x, True))


def test_reference_is_the_op_on_the_torch_backend():
    x = torch.randn(3, 96, dtype=torch.float64)
    with backend("torch"):
        assert torch.equal(hadamard_transform(x), hadamard_transform_reference(x))

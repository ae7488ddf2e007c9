"""The normalized Walsh–Hadamard transform over the last dimension, for d = K·2^n.

The matrix (this is the spec; the Triton and any later CUDA kernel apply exactly this matrix)::

    H_d = (H_K ⊗ S_{2^n}) / sqrt(d)          d = K · 2^n,   H_d H_dᵀ = I

* ``S_{2^n}`` is Sylvester's ±1 matrix: ``S_1 = [1]``, ``S_{2m} = [[S_m, S_m], [S_m, -S_m]]``, i.e.
  ``S[i, j] = (-1)^popcount(i & j)``. It is symmetric.
* ``H_K`` is the ±1 "K-factor" (``H_K H_Kᵀ = K·I``, K = 1 for a power of two), built in code by the
  construction named by :func:`k_factor_construction` (see "K-factors" below); :func:`hadamard_k_factor`
  returns it. It is not symmetric in general (Paley I matrices are not), so the inverse is the transpose.
* ``⊗`` is the Kronecker product in this order: element ``i = a·2^n + b`` (a < K, b < 2^n) of a vector
  is element (a, b) of its K × 2^n reshape, and ``H_d[a·2^n + b, c·2^n + e] = H_K[a, c]·S[b, e] / sqrt(d)``.

The transform of a row x (length d), reshaped to X (K × 2^n)::

    hadamard_transform(x)               = x H_dᵀ,  i.e.  Y = H_K  X S / sqrt(d)
    hadamard_transform(x, inverse=True) = x H_d,   i.e.  Y = H_Kᵀ X S / sqrt(d)

computed in O(d log d): the 2^n butterflies of S along each row of X (stage s = 0 .. n-1 combines the
pairs (j, j + 2^s) inside blocks of 2^(s+1) into (u + v, u - v)), then the K×K product (skipped for
K = 1), then one multiplication by ``1/sqrt(d)`` rounded to the compute dtype. The compute dtype is
float32 for float16/bfloat16/float32 input and float64 for float64 input; the result is returned in the
input's dtype. Other summation orders (a kernel's) agree to rounding.

Backends: this PyTorch reference; the Triton kernels of ``fastft.kernels.hadamard`` (CUDA); the C++ CPU
library and the CUDA library built from ``csrc/`` (``cpp``, ``cuda``; see ``fastft/dispatch.py``), which
run the butterflies in the reference's order (bit for bit for K = 1) and sum the K-factor product over
c in order.

Autograd: the transform is linear and orthogonal, so the gradient of ``hadamard_transform(x, inverse)``
is ``hadamard_transform(grad, not inverse)``; nothing is saved for backward.

K-factors
---------
For ``d = m·2^a`` with m odd: if m = 1, K = 1 (Sylvester alone). Otherwise K is the smallest
``m·2^j`` (2 <= j <= a) that one of these constructions gives, tried in this order, and n = a - j:

1. Paley I (R. E. A. C. Paley, "On orthogonal matrices", J. Math. Phys. 12 (1933) 311–320): K = q + 1,
   q a prime power ≡ 3 (mod 4). With χ the quadratic character of GF(q) (χ(0) = 0, χ(a) = 1 for a
   non-zero square, -1 otherwise) and Q[i, j] = χ(g_i - g_j) over the field elements g_0..g_{q-1}
   (see "field elements" below), Q is skew and ``H_K = I + [[0, 1ᵀ], [-1, Q]]``.
2. Paley II (same paper): K = 2(q + 1), q a prime power ≡ 1 (mod 4). Q as above is symmetric;
   C = [[0, 1ᵀ], [1, Q]] is a symmetric conference matrix and
   ``H_K = C ⊗ [[1, 1], [1, -1]] + I_{q+1} ⊗ [[1, -1], [-1, -1]]`` (symmetric).
3. Williamson (J. Williamson, "Hadamard's determinant theorem and the sum of four squares", Duke Math.
   J. 11 (1944) 65–81): K = 4t from four symmetric circulant ±1 matrices A, B, C, D of order t with
   AAᵀ + BBᵀ + CCᵀ + DDᵀ = 4t·I, ``H_K = [[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]]``,
   where the circulant of a first row a is M[i, j] = a[(j - i) mod t]. Only t = 43 (K = 172, for
   11008 = 172·64) is tabulated (:data:`WILLIAMSON_FIRST_ROWS`): an order-43 solution as tabulated in
   M. Hall Jr., Combinatorial Theory, 2nd ed. (Wiley, 1986) (order 43 was first solved by Williamson,
   1944; see also L. D. Baumert and M. Hall Jr., "Hadamard matrices of the Williamson type", Math. Comp.
   19 (1965) 442–447), read from SageMath's ``williamson_type_quadruples_smallcases``. The tests check
   that A..D are symmetric, satisfy the sum-of-squares identity and give a Hadamard matrix.

Field elements: for q = p (prime), g_i = i mod p. For q = p^k (k > 1), g_i is the polynomial
Σ_t c_t X^t whose base-p digits are i = Σ_t c_t p^t, taken modulo the smallest monic irreducible
polynomial of degree k over GF(p), "smallest" meaning smallest Σ_t f_t p^t over its lower
coefficients f_0..f_{k-1}.

K is at most :data:`MAX_K_FACTOR`. Any other d (an odd part for which no K above exists, or a d whose
K would exceed the limit) raises ``ValueError`` naming d, its factorization and the supported forms;
:func:`is_hadamard_size` asks without raising. Sizes common in LLMs and their K-factors:
:func:`supported_sizes_table`.

To rotate a weight, apply the transform to its rows (``hadamard_transform(W)`` is W H_dᵀ) rather than
building ``hadamard_matrix(d)``: the dense matrix is d² numbers (0.8 GB for d = 14336 in float32).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _ext
from ..dispatch import implementation, lazy, register_op
from ..node_costs import custom_op_node, reads_grad_shape
from ..math.hadamard import (  # noqa: F401  (the math this op is built on, re-exported)
    LLM_SIZES, MAX_K_FACTOR, WILLIAMSON_FIRST_ROWS, _factorization_or_none, _k_factor_numpy, compute_dtype, hadamard_factorization,
    hadamard_k_factor, hadamard_matrix, is_hadamard_size, k_factor_construction, supported_sizes_table,
)

__all__ = [
    "MAX_K_FACTOR",
    "hadamard_factorization",
    "hadamard_k_factor",
    "hadamard_matrix",
    "hadamard_transform",
    "hadamard_transform_reference",
    "is_hadamard_size",
    "k_factor_construction",
    "supported_sizes_table",
]


def _cuda_row_limit(d: int, dtype: torch.dtype, **_) -> Optional[str]:
    longest = _ext.cuda_max_row(dtype)
    return None if d <= longest else f"the CUDA kernel holds a row of at most {longest} elements here, d={d}"


def _cpp_dtype_limit(dtype: torch.dtype, **_) -> Optional[str]:
    return None if _ext.cpu_supports(dtype) else f"this build of the C++ library has no {dtype} support"



# --------------------------------------------------------------------------- the transform
def _check_input(x: Tensor) -> tuple[int, int]:
    if not x.is_floating_point() or x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"hadamard_transform takes float16/bfloat16/float32/float64 input, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("hadamard_transform needs at least one dimension (it transforms the last one)")
    return hadamard_factorization(x.shape[-1])


def hadamard_transform_reference(x: Tensor, inverse: bool = False) -> Tensor:
    """The transform of the module docstring in PyTorch: butterflies, then the K×K product, then 1/sqrt(d)."""
    K, n = _check_input(x)
    d = x.shape[-1]
    ct = compute_dtype(x.dtype)
    M = 1 << n
    y = x.to(ct).reshape(-1, K, M)
    rows = y.shape[0]
    h, spare = 1, None  # two buffers alternate; the input itself is never written
    while h < M:
        out = torch.empty_like(y) if spare is None else spare
        src = y.view(rows, K, M // (2 * h), 2, h)
        dst = out.view(rows, K, M // (2 * h), 2, h)
        torch.add(src[:, :, :, 0], src[:, :, :, 1], out=dst[:, :, :, 0])
        torch.sub(src[:, :, :, 0], src[:, :, :, 1], out=dst[:, :, :, 1])
        spare = None if h == 1 else y
        y = out
        h *= 2
    if K > 1:
        HK = hadamard_k_factor(K, ct, x.device)
        y = torch.matmul(HK.t() if inverse else HK, y)
    y = y * (1.0 / math.sqrt(d)) if d == 1 else y.mul_(1.0 / math.sqrt(d))  # d > 1: y is our own buffer
    return y.reshape(x.shape).to(x.dtype)


def hadamard_transform_flops(shape: tuple[int, ...]) -> int:
    """FLOPs of one Hadamard transform over the last dimension d = K·2^n: butterflies and the 1/sqrt(d)
    scale are additions and products by constants (0); the K×K product is 2·K·d per row (0 for K = 1)."""
    if not shape:
        return 0
    K, _ = hadamard_factorization(int(shape[-1]))
    numel = 1
    for size in shape:
        numel *= int(size)
    return 2 * K * numel if K > 1 else 0


@reads_grad_shape
def hadamard_transform_backward_flops(node, grad_shape):
    """FLOP formula of the backward (:mod:`fastft.node_costs`): the opposite transform of the gradient
    (input x, edge 0)."""
    return [(hadamard_transform_flops(grad_shape(node)), (0,))]


register_op("hadamard_transform", {
    "torch": {"forward": hadamard_transform_reference},
    "triton": lazy("fastft.kernels.hadamard", forward="hadamard_transform"),
    "cpp": {"forward": _ext.hadamard_transform},
    "cuda": {"forward": _ext.hadamard_transform},
}, limits={"cuda": _cuda_row_limit, "cpp": _cpp_dtype_limit},
   node_costs={custom_op_node("hadamard_transform"): hadamard_transform_backward_flops})


@torch.library.custom_op("fastft::hadamard_transform", mutates_args=())
def _hadamard_transform_op(x: Tensor, inverse: bool) -> Tensor:
    return implementation("hadamard_transform", "forward", x.device, d=x.shape[-1], dtype=x.dtype)(x, inverse)


@_hadamard_transform_op.register_fake
def _(x, inverse):
    return torch.empty_like(x)


def _hadamard_setup_context(ctx, inputs, output):
    ctx.inverse = inputs[1]


def _hadamard_backward(ctx, grad):
    return _hadamard_transform_op(grad.contiguous(), not ctx.inverse), None


_hadamard_transform_op.register_autograd(_hadamard_backward, setup_context=_hadamard_setup_context)


def hadamard_transform(x: Tensor, inverse: bool = False) -> Tensor:
    """``x H_dᵀ`` (or ``x H_d`` with ``inverse=True``) over the last dimension; see the module docstring.

    Any leading shape; float16/bfloat16/float32/float64, returned in x's dtype. Differentiable (the
    gradient is the opposite transform of the incoming gradient). Raises ValueError for an unsupported d.
    """
    _check_input(x)
    return _hadamard_transform_op(x.contiguous(), bool(inverse))

"""Hadamard matrices as pure math: the K-factors, the d = K·2^n factorization and the sizes supported.

The spec of the transform (the matrix, its order, the K-factor constructions) is the docstring of
:mod:`fastft.ops.hadamard`; this module builds the numbers it names and nothing else: no torch.library
op, no backend. ``fastft.ops.hadamard``, the Triton kernels and the C++ bindings all import it.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "LLM_SIZES",
    "MAX_K_FACTOR",
    "compute_dtype",
    "hadamard_factorization",
    "hadamard_k_factor",
    "hadamard_matrix",
    "is_hadamard_size",
    "k_factor_construction",
    "supported_sizes_table",
]

MAX_K_FACTOR = 2048
"""The largest K-factor built (its K×K product costs 2K flops per element, the dense matrix 2d)."""



WILLIAMSON_FIRST_ROWS = {
    43: (
        "++---++++-+--+--++--------++--+--+-++++---+",
        "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
        "++-++++++----+-+--++-++-++--+-+----++++++-+",
        "+---++--++++-+-+++-++--++-+++-+-++++--++---",
    ),
}
"""First rows (``+`` = 1, ``-`` = -1) of the symmetric circulant Williamson matrices A, B, C, D by order t."""


# --------------------------------------------------------------------------- finite fields
def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def _prime_power(q: int) -> Optional[tuple[int, int]]:
    """(p, k) with q = p^k, p prime, k >= 1; None if q is not a prime power."""
    if q < 2:
        return None
    for p in range(2, q + 1):
        if q % p == 0:
            if not _is_prime(p):
                return None
            k, r = 0, q
            while r % p == 0:
                r //= p
                k += 1
            return (p, k) if r == 1 else None
    return None


def _poly_mod(a: list[int], modulus: list[int], p: int) -> list[int]:
    """a mod modulus over GF(p); polynomials as coefficient lists, lowest degree first; modulus monic."""
    a = [c % p for c in a]
    k = len(modulus) - 1
    for top in range(len(a) - 1, k - 1, -1):
        c = a[top]
        if c:
            for t in range(k + 1):
                a[top - k + t] = (a[top - k + t] - c * modulus[t]) % p
    return (a + [0] * k)[:k]


def _has_factor(poly: list[int], p: int) -> bool:
    """Whether a monic ``poly`` of degree k has a monic factor of degree 1..k//2 over GF(p)."""
    k = len(poly) - 1
    for degree in range(1, k // 2 + 1):
        for code in range(p**degree):
            divisor = [(code // p**t) % p for t in range(degree)] + [1]
            if not any(_poly_mod(poly, divisor, p)):
                return True
    return False


@functools.lru_cache(maxsize=None)
def _irreducible(p: int, k: int) -> tuple[int, ...]:
    """The smallest monic irreducible polynomial of degree k over GF(p) (see the module docstring)."""
    for code in range(p**k):
        poly = [(code // p**t) % p for t in range(k)] + [1]
        if not _has_factor(poly, p):
            return tuple(poly)
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # cannot happen


@functools.lru_cache(maxsize=None)
def _quadratic_residue_matrix(q: int) -> np.ndarray:
    """Jacobsthal matrix Q[i, j] = χ(g_i - g_j) of GF(q) (int8), in the element order of the docstring."""
    p, k = _prime_power(q)
    digits = np.array([[(i // p**t) % p for t in range(k)] for i in range(q)], dtype=np.int64)
    weights = p ** np.arange(k, dtype=np.int64)
    if k == 1:
        squares = {(i * i) % p for i in range(1, p)}
    else:
        modulus = list(_irreducible(p, k))
        squares = set()
        for i in range(1, q):
            a = list(digits[i])
            product = [0] * (2 * k - 1)
            for s in range(k):
                for t in range(k):
                    product[s + t] += a[s] * a[t]
            squares.add(int(np.dot(_poly_mod(product, modulus, p), weights)))
    chi = np.full(q, -1, dtype=np.int8)
    chi[0] = 0
    chi[list(squares)] = 1
    difference = ((digits[:, None, :] - digits[None, :, :]) % p) @ weights
    return chi[difference]


# --------------------------------------------------------------------------- K-factors
def _paley1(K: int) -> np.ndarray:
    q = K - 1
    Q = _quadratic_residue_matrix(q)
    S = np.zeros((K, K), dtype=np.int8)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = Q
    return S + np.eye(K, dtype=np.int8)


def _paley2(K: int) -> np.ndarray:
    q = K // 2 - 1
    Q = _quadratic_residue_matrix(q)
    C = np.zeros((q + 1, q + 1), dtype=np.int8)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = Q
    plus = np.array([[1, 1], [1, -1]], dtype=np.int8)
    zero = np.array([[1, -1], [-1, -1]], dtype=np.int8)
    return np.kron(C, plus) + np.kron(np.eye(q + 1, dtype=np.int8), zero)


def _williamson(K: int) -> np.ndarray:
    t = K // 4
    blocks = []
    for row in WILLIAMSON_FIRST_ROWS[t]:
        a = np.array([1 if c == "+" else -1 for c in row], dtype=np.int8)
        blocks.append(a[(np.arange(t)[None, :] - np.arange(t)[:, None]) % t])
    A, B, C, D = blocks
    return np.block([[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]])


def k_factor_construction(K: int) -> Optional[str]:
    """How the ±1 factor of order K is built ("sylvester", "paley1 q=..", "paley2 q=..", "williamson t=..") or None."""
    if K >= 1 and K & (K - 1) == 0:
        return "sylvester"
    if K > MAX_K_FACTOR or K % 4:
        return None
    pk = _prime_power(K - 1)
    if pk is not None and (K - 1) % 4 == 3:
        return f"paley1 q={K - 1}"
    pk = _prime_power(K // 2 - 1)
    if pk is not None and (K // 2 - 1) % 4 == 1:
        return f"paley2 q={K // 2 - 1}"
    if K // 4 in WILLIAMSON_FIRST_ROWS:
        return f"williamson t={K // 4}"
    return None


@functools.lru_cache(maxsize=None)
def _k_factor_numpy(K: int) -> np.ndarray:
    how = k_factor_construction(K)
    if how is None:
        raise ValueError(f"no Hadamard K-factor of order {K} is built here")
    if how == "sylvester":
        n = K.bit_length() - 1
        idx = np.arange(K)
        bits = np.bitwise_and(idx[:, None], idx[None, :])
        parity = np.zeros_like(bits)
        for t in range(n):
            parity ^= (bits >> t) & 1
        H = (1 - 2 * parity).astype(np.int8)
    elif how.startswith("paley1"):
        H = _paley1(K)
    elif how.startswith("paley2"):
        H = _paley2(K)
    else:
        H = _williamson(K)
    H.setflags(write=False)
    return H


def hadamard_k_factor(K: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """The ±1 (unnormalized) K-factor H_K of the module docstring, H_K H_Kᵀ = K·I."""
    return torch.from_numpy(_k_factor_numpy(K).copy()).to(dtype=dtype, device=device)


# --------------------------------------------------------------------------- sizes
def _split_two(d: int) -> tuple[int, int]:
    """(m, a) with d = m·2^a and m odd."""
    a = (d & -d).bit_length() - 1
    return d >> a, a


@functools.lru_cache(maxsize=None)
def _factorization_or_none(d: int) -> Optional[tuple[int, int]]:
    if d < 1:
        return None
    m, a = _split_two(d)
    if m == 1:
        return 1, a
    for j in range(2, a + 1):
        K = m << j
        if K > MAX_K_FACTOR:
            return None
        if k_factor_construction(K) is not None:
            return K, a - j
    return None


def _factor_text(d: int) -> str:
    parts, r, f = [], d, 2
    while f * f <= r:
        while r % f == 0:
            parts.append(f)
            r //= f
        f += 1
    if r > 1:
        parts.append(r)
    return "·".join(str(p) for p in parts) or str(d)


@torch.compiler.assume_constant_result  # a pure function of a Python int: torch.compile runs it while tracing
def hadamard_factorization(d: int) -> tuple[int, int]:
    """(K, n) with d = K·2^n as the module docstring chooses them; ValueError if d is not supported."""
    if not isinstance(d, int) or isinstance(d, bool):
        raise TypeError(f"Hadamard size must be an int, got {type(d).__name__}")
    found = _factorization_or_none(d)
    if found is None:
        m, a = _split_two(d) if d >= 1 else (d, 0)
        raise ValueError(
            f"no Hadamard transform of size d={d} (= {_factor_text(d) if d >= 1 else d}, odd part {m}, 2^{a}): "
            f"supported are d = 2^n and d = K·2^n with a K-factor K = m·2^j (j >= 2, K <= {MAX_K_FACTOR}) built by "
            "Paley I (K - 1 a prime power ≡ 3 mod 4), Paley II (K/2 - 1 a prime power ≡ 1 mod 4) or Williamson "
            "(K = 172), e.g. 12, 20, 28, 36, 52, 60, 76, 84, 108, 140, 148, 172. Pad the dimension or choose "
            "another rotation."
        )
    return found


LLM_SIZES = {
    64: "head dim", 80: "head dim (Phi-2)", 96: "head dim (Phi-3)", 128: "head dim", 256: "head dim (Gemma)",
    896: "Qwen2/2.5-0.5B hidden", 1152: "Gemma-3-1B hidden", 1536: "Qwen2/2.5-1.5B hidden",
    2048: "Llama-3.2-1B, Gemma-2B, Qwen2.5-3B hidden", 2304: "Gemma-2-2B hidden", 2560: "Gemma-3-4B, Qwen3-4B hidden",
    3072: "Llama-3.2-3B, Gemma-7B hidden; Qwen3-0.6B intermediate", 3584: "Qwen2/2.5-7B, Gemma-2-9B hidden",
    3840: "Gemma-3-12B hidden", 4096: "Llama-2-7B, Llama-3-8B, Mistral-7B hidden", 4608: "Gemma-2-27B hidden",
    4864: "Qwen2/2.5-0.5B intermediate", 5120: "Llama-2-13B, Qwen2.5-14B/32B, Mistral-Nemo hidden",
    5376: "Gemma-3-27B hidden", 6144: "Mistral-Small-22B hidden; Qwen3-1.7B intermediate",
    6912: "Gemma-3-1B intermediate", 8192: "Llama-2/3-70B hidden; Llama-3.2 intermediate",
    8960: "Qwen2/2.5-1.5B intermediate", 9216: "Gemma-2-2B intermediate", 9728: "Qwen3-4B intermediate",
    10240: "Gemma-3-4B intermediate", 11008: "Llama-2-7B, Qwen2.5-3B intermediate",
    12288: "Qwen3-8B intermediate", 13824: "Llama-2-13B, Qwen2.5-14B intermediate",
    14336: "Llama-3-8B, Mistral-7B, Mixtral-8x7B, Mistral-Nemo, Gemma-2-9B intermediate",
    15360: "Gemma-3-12B intermediate", 16384: "Gemma-2B, Mistral-Small-22B intermediate; Llama-3.1-405B hidden",
    17408: "Qwen3-14B intermediate", 18944: "Qwen2/2.5-7B intermediate", 21504: "Gemma-3-27B intermediate",
    24576: "Gemma-7B intermediate", 25600: "Qwen3-32B intermediate", 27648: "Qwen2.5-32B intermediate",
    28672: "Llama-2/3-70B intermediate", 29568: "Qwen2/2.5-72B intermediate", 36864: "Gemma-2-27B intermediate",
    53248: "Llama-3.1-405B intermediate",
}
"""Hidden, intermediate and head sizes of common LLMs (Llama 2/3, Qwen2/2.5/3, Mistral, Gemma 1/2/3, Phi)."""


def supported_sizes_table(sizes: Optional[dict] = None) -> str:
    """A text table: size, where it occurs, its K-factor and construction (or "unsupported")."""
    sizes = LLM_SIZES if sizes is None else sizes
    lines = [f"{'d':>6}  {'K·2^n':>12}  {'K-factor':<16}  where"]
    for d, where in sorted(sizes.items()):
        found = _factorization_or_none(d)
        if found is None:
            lines.append(f"{d:>6}  {'unsupported':>12}  {'':<16}  {where}")
        else:
            K, n = found
            lines.append(f"{d:>6}  {f'{K}·2^{n}':>12}  {k_factor_construction(K):<16}  {where}")
    return "\n".join(lines)


def is_hadamard_size(d: int) -> bool:
    """Whether :func:`hadamard_transform` supports a last dimension of size d."""
    return isinstance(d, int) and not isinstance(d, bool) and _factorization_or_none(d) is not None


def hadamard_matrix(d: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """The orthonormal d×d matrix H_d = (H_K ⊗ S_{2^n}) / sqrt(d) of the module docstring (built in float64)."""
    K, n = hadamard_factorization(d)
    H = np.kron(_k_factor_numpy(K).astype(np.float64), _k_factor_numpy(1 << n).astype(np.float64))
    return torch.from_numpy(H / math.sqrt(d)).to(dtype=dtype, device=device)


# --------------------------------------------------------------------------- the transform
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32

"""Index math of the butterfly of Givens-like 2×2 blocks (qGOFT), shared by the Triton kernel, the op and the layer.

A row x of length d is zero-padded to P = 2^⌈log2 d⌉ (at least 2). Stage s (0 <= s < S <= log2 P) pairs the
elements i and j = i + 2^s for every i whose bit s is 0, and maps the pair (u, v) = (x_i, x_j) by its own
2×2 block ``[[a, b], [c, e]]``::

    u' = a·u + b·v        v' = c·u + e·v

Pair number p (0 <= p < P/2) of stage s is the p-th such i in increasing order:
``i = (p >> s) << (s + 1) | (p & (2^s - 1))``. In a row viewed as (P / 2^(s+1), 2, 2^s), pair p is
(hi, 0, lo) and (hi, 1, lo) with p = hi·2^s + lo — the view the kernels and the reference use.

The blocks of all stages are one tensor ``blocks`` of shape (S, 4, P/2): ``blocks[s, k, p]`` is a, b, c, e
(k = 0..3) of pair p of stage s. The whole map, on a column vector, is ``M = B_{S-1} ⋯ B_1 B_0`` (stage 0 is
applied first); for a row-major batch x (N × d) it is ``z = (pad_P(x) Mᵀ)[:, :d]``.

Dimensions that are not a power of two: a pair whose partner j lies at or beyond d (in the padding) is a
*dead* pair; :func:`live_pairs` marks the live ones. Callers that want a map of R^d to itself (the qGOFT
layer) keep dead pairs at the identity block, so padding stays zero and the real coordinates of a dead
pair pass through unchanged: every stage is then a product of disjoint 2×2 maps on R^d and identities.
"""
from __future__ import annotations

import torch
from torch import Tensor


def butterfly_width(d: int) -> int:
    """P: the power of two (>= 2) a row of length d is padded to."""
    if d < 1:
        raise ValueError(f"a butterfly needs d >= 1 features, got {d}")
    return max(2, 1 << (d - 1).bit_length())


def max_stages(d: int) -> int:
    """log2 P: the number of distinct stages (stage s pairs elements 2^s apart)."""
    return butterfly_width(d).bit_length() - 1


def pair_indices(P: int, stage: int) -> tuple[Tensor, Tensor]:
    """(i, j): the two element indices of every pair p = 0..P/2-1 of ``stage`` (int64, length P/2)."""
    p = torch.arange(P // 2)
    low = p & ((1 << stage) - 1)
    i = ((p >> stage) << (stage + 1)) | low
    return i, i + (1 << stage)


def live_pairs(d: int, stages: int) -> Tensor:
    """Bool (stages, P/2): pair p of stage s is live when both of its elements are < d."""
    P = butterfly_width(d)
    return torch.stack([pair_indices(P, s)[1] < d for s in range(stages)]) if stages else torch.zeros(0, P // 2, dtype=torch.bool)


def identity_blocks(d: int, stages: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """Blocks (stages, 4, P/2) that make every stage the identity (a = e = 1, b = c = 0)."""
    P = butterfly_width(d)
    blocks = torch.zeros(stages, 4, P // 2, dtype=dtype, device=device)
    blocks[:, 0] = 1
    blocks[:, 3] = 1
    return blocks


def dense_matrix(blocks: Tensor, d: int) -> Tensor:
    """M (d × d) with ``z = x Mᵀ`` for the op's map (the padding dropped), built from the definition in blocks' dtype.

    Each stage's P×P matrix has entries M[i,i] = a, M[i,j] = b, M[j,i] = c, M[j,j] = e for its pairs (i, j);
    the product is over the padded width, then restricted to the first d rows and columns (exact when the
    dead pairs are identity blocks, and the definition of the op's map in general: z = (pad(x) Mᵀ)[:, :d]).
    """
    S, four, half = blocks.shape
    if four != 4:
        raise ValueError(f"blocks must have shape (stages, 4, P/2), got {tuple(blocks.shape)}")
    P = 2 * half
    M = torch.eye(P, dtype=blocks.dtype, device=blocks.device)
    for s in range(S):
        i, j = pair_indices(P, s)
        B = torch.zeros(P, P, dtype=blocks.dtype, device=blocks.device)
        a, b, c, e = blocks[s]
        B = B.index_put((i, i), a).index_put((i, j), b).index_put((j, i), c).index_put((j, j), e)
        M = B @ M
    return M[:d, :d]


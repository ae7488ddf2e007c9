"""The butterfly of Givens-like 2×2 blocks applied to activations (qGOFT's rotation), forward and backward.

For x (N × d) and blocks (S × 4 × P/2), P = 2^⌈log2 d⌉ (see ``fastft/math/givens.py`` for the pairing)::

    h_0 = pad_P(x)                       (zero columns d..P-1)
    h_{s+1}: for every pair (i, j = i + 2^s) of stage s, block [[a, b], [c, e]] = blocks[s, :, p]:
             h_{s+1}[:, i] = a·h_s[:, i] + b·h_s[:, j]
             h_{s+1}[:, j] = c·h_s[:, i] + e·h_s[:, j]
    z = h_S[:, :d]                        i.e.  z = x Mᵀ with M = (B_{S-1} ⋯ B_0)[:d, :d]

Backward, for g = ∂L/∂z (padded to P with zeros), s = S-1 .. 0, with (u, v) the pair of h_s and (gu, gv)
the pair of the gradient entering stage s's output::

    ∂a = Σ_rows gu·u     ∂b = Σ_rows gu·v     ∂c = Σ_rows gv·u     ∂e = Σ_rows gv·v
    (gu, gv) <- (a·gu + c·gv, b·gu + e·gv)        (the transposed block)
    dx = g[:, :d]                                  i.e.  dx = g M

The block gradient is a reduction over the N tokens, once per stage. What is saved for backward: x (the
input; the stage inputs h_s are recomputed from it, never stored) and the blocks (S·2P numbers). The
reference keeps the S stage inputs of one call alive during its backward; the Triton kernel recomputes
them in registers.

Arithmetic in float32 for float16/bfloat16/float32 input (float64 for float64); z and dx are returned in
x's dtype, the block gradient in the blocks' dtype.

FLOPs (:func:`givens_rotation_flops`; the node cost of the op's backward, :func:`givens_rotation_backward_flops`,
is registered with ``register_op(..., node_costs=...)``): the map is elementwise multiply-adds (6 FLOPs a pair a stage:
``6·N·(P/2)·S`` forward); FlopCounterMode counts matrix products only and so counts it 0, as it does the
Hadamard butterflies. The backward costs ``6·N·(P/2)·S`` for dx and ``8·N·(P/2)·S`` for the block
gradient plus, in the Triton kernel, the recomputation of the stage inputs (``6·N·(P/2)·S(S-1)/2``).

Backends: this PyTorch reference (every device); the Triton kernels of ``fastft.kernels.givens`` (CUDA,
and CPU under ``TRITON_INTERPRET=1``), one fused kernel for all stages of a block of rows each way, with a
deterministic block-gradient reduction (per-program partials, then a sum; no float atomics).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..dispatch import implementation, lazy, register_op
from ..math.givens import butterfly_width
from ..node_costs import custom_op_node

__all__ = ["givens_rotation", "givens_rotation_reference", "givens_rotation_backward_reference",
           "givens_rotation_flops", "givens_rotation_backward_flops"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stage(h: Tensor, blocks_s: Tensor, s: int, transpose: bool) -> Tensor:
    """One stage on h (N × P): the pairs (u, v) of the (N, P/2^(s+1), 2, 2^s) view, mapped by their blocks."""
    n, P = h.shape
    view = h.view(n, P >> (s + 1), 2, 1 << s)
    u, v = view[:, :, 0], view[:, :, 1]
    a, b, c, e = (blocks_s[k].view(P >> (s + 1), 1 << s) for k in range(4))
    if transpose:
        b, c = c, b
    return torch.stack((a * u + b * v, c * u + e * v), dim=2).view(n, P)


def _pair_halves(h: Tensor, s: int) -> tuple[Tensor, Tensor]:
    n, P = h.shape
    view = h.view(n, P >> (s + 1), 2, 1 << s)
    return view[:, :, 0].reshape(n, P // 2), view[:, :, 1].reshape(n, P // 2)


def _padded(x: Tensor, P: int, dtype: torch.dtype) -> Tensor:
    h = x.to(dtype)
    return torch.nn.functional.pad(h, (0, P - x.shape[1])) if P != x.shape[1] else h


def givens_rotation_reference(x: Tensor, blocks: Tensor) -> Tensor:
    """z = (pad_P(x) Mᵀ)[:, :d] in PyTorch, one stage at a time (the spec of the module docstring)."""
    d = x.shape[1]
    P = butterfly_width(d)
    ct = _compute_dtype(x.dtype)
    h = _padded(x, P, ct)
    c = blocks.to(ct)
    for s in range(blocks.shape[0]):
        h = _stage(h, c[s], s, transpose=False)
    return h[:, :d].to(x.dtype).contiguous()


def givens_rotation_backward_reference(grad: Tensor, x: Tensor, blocks: Tensor, need_dx: bool, need_dblocks: bool
                                       ) -> tuple[Tensor, Tensor]:
    """(dx, dblocks) in PyTorch (empty where not needed): the stage inputs recomputed, then the stages backwards."""
    d = x.shape[1]
    P = butterfly_width(d)
    S = blocks.shape[0]
    ct = _compute_dtype(x.dtype)
    c = blocks.to(ct)
    inputs = []
    if need_dblocks:
        h = _padded(x, P, ct)
        for s in range(S):
            inputs.append(h)
            h = _stage(h, c[s], s, transpose=False)
    g = _padded(grad, P, ct)
    dblocks = torch.empty(S, 4, P // 2, dtype=ct, device=x.device) if need_dblocks else blocks.new_empty(0)
    for s in reversed(range(S)):
        if need_dblocks:
            u, v = _pair_halves(inputs[s], s)
            gu, gv = _pair_halves(g, s)
            dblocks[s, 0] = (gu * u).sum(0)
            dblocks[s, 1] = (gu * v).sum(0)
            dblocks[s, 2] = (gv * u).sum(0)
            dblocks[s, 3] = (gv * v).sum(0)
        if need_dx or s > 0:
            g = _stage(g, c[s], s, transpose=True)
    dx = g[:, :d].to(x.dtype).contiguous() if need_dx else grad.new_empty(0)
    return dx, dblocks.to(blocks.dtype) if need_dblocks else dblocks


def givens_rotation_flops(tokens: int, d: int, stages: int, need_dx: bool = True, need_dblocks: bool = True,
                          recompute: bool = False) -> dict[str, int]:
    """Elementwise FLOPs of the op for N = tokens rows (see the module docstring); matrix-product FLOPs are 0."""
    pairs = tokens * (butterfly_width(d) // 2)
    backward = (6 * pairs * stages if need_dx else 0) + (8 * pairs * stages if need_dblocks else 0)
    if recompute and need_dblocks:
        backward += 6 * pairs * stages * (stages - 1) // 2
    return {"forward": 6 * pairs * stages, "backward": backward, "matmul": 0}


def givens_rotation_backward_flops(node, grad_shape):
    """FLOP formula of the backward (:mod:`fastft.node_costs`): elementwise multiply-adds per pair and stage
    (:func:`givens_rotation_flops`), no matrix product, so 0 in FlopCounterMode's convention (as the
    Hadamard butterflies); x is edge 0, the blocks edge 1."""
    return [(0, (0, 1))]


register_op("givens_rotation", {
    "torch": {"forward": givens_rotation_reference, "backward": givens_rotation_backward_reference},
    "triton": lazy("fastft.kernels.givens", forward="givens_forward", backward="givens_backward"),
}, node_costs={custom_op_node("givens_rotation"): givens_rotation_backward_flops})


@torch.library.custom_op("fastft::givens_rotation", mutates_args=())
def _givens_rotation_op(x: Tensor, blocks: Tensor) -> Tensor:
    return implementation("givens_rotation", "forward", x.device)(x, blocks)


@_givens_rotation_op.register_fake
def _(x, blocks):
    return torch.empty_like(x)


@torch.library.custom_op("fastft::givens_rotation_backward", mutates_args=())
def _givens_rotation_backward_op(grad: Tensor, x: Tensor, blocks: Tensor, need_dx: bool, need_dblocks: bool
                                 ) -> tuple[Tensor, Tensor]:
    return implementation("givens_rotation", "backward", grad.device)(grad, x, blocks, need_dx, need_dblocks)


@_givens_rotation_backward_op.register_fake
def _(grad, x, blocks, need_dx, need_dblocks):
    return (torch.empty_like(grad) if need_dx else grad.new_empty(0),
            torch.empty_like(blocks) if need_dblocks else blocks.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, blocks = inputs
    ctx.need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])
    ctx.save_for_backward(x, blocks)


def _backward(ctx, grad):
    x, blocks = ctx.saved_tensors
    need_dx, need_dblocks = ctx.need
    dx, dblocks = _givens_rotation_backward_op(grad.contiguous(), x, blocks, need_dx, need_dblocks)
    return dx if need_dx else None, dblocks if need_dblocks else None


_givens_rotation_op.register_autograd(_backward, setup_context=_setup_context)


def givens_rotation(x: Tensor, blocks: Tensor) -> Tensor:
    """``z = x Mᵀ`` over the last dimension of x (any leading shape) for the butterfly ``blocks`` (S, 4, P/2).

    Differentiable in x and blocks; see the module docstring. float16/bfloat16/float32/float64 x; z in x's dtype.
    """
    if not x.is_floating_point():
        raise TypeError(f"givens_rotation takes a float input, got {x.dtype}")
    d = x.shape[-1]
    P = butterfly_width(d)
    if blocks.dim() != 3 or blocks.shape[1] != 4 or blocks.shape[2] != P // 2 or blocks.shape[0] > P.bit_length() - 1:
        raise ValueError(
            f"givens_rotation: blocks {tuple(blocks.shape)} do not fit d={d}: expected (S, 4, {P // 2}) with "
            f"S <= {P.bit_length() - 1}"
        )
    lead = x.shape[:-1]
    z = _givens_rotation_op(x.reshape(-1, d).contiguous(), blocks.contiguous())
    return z.reshape(*lead, d)

"""Triton kernels of the butterfly of Givens-like 2×2 blocks (``fastft.ops.givens_rotation``, qGOFT).

The map is the op's (``fastft/math/givens.py``): a row x (length d) zero-padded to P = 2^k; stage s = 0..S-1
maps each pair (u, v) = (x_i, x_{i+2^s}) to (a·u + b·v, c·u + e·v). The data movement is the Hadamard
butterfly's (``kernels/hadamard.py``): the row tile viewed as (R, P/2^(s+1), 2, 2^s), split into u and v,
recombined, joined back; the stages are unrolled (S <= log2 P) and run in registers.

* ``_givens_forward_kernel``: one program per ``BLOCK_R`` rows: load the tile, S stages, store once.
* ``_givens_backward_kernel``: a fixed number of programs (``programs``), each looping over the row blocks
  pid, pid + programs, ... For a row block it loads x and the upstream gradient g and runs the S forward
  stages to h_S. Then for s = S-1 .. 0 it steps back to the stage input h_s through the inverse block
  (``B⁻¹ = [[e, -b], [-c, a]] / (a e - b c)``, computed by the launcher), adds this row block's block
  gradient (``Σ_rows gu·u, gu·v, gv·u, gv·v``) to the program's own slot of a partials buffer (read, add,
  write; a barrier orders the slot's next read after the write), and maps g back through the transposed
  block (``gu' = a·gu + c·gv``, ``gv' = b·gu + e·gv``). Finally dx = g. 3S stages of arithmetic, one read of
  x and g and one write of dx. The launcher sums the partials over programs with ``torch.sum`` (a
  fixed-order reduction): no float atomics, so the block gradient is the same bits on every run of one
  device and shape.

Reconstructing h_s by inverting the blocks (instead of recomputing it from x, S(S-1)/2 stages, or storing
S intermediate tiles) keeps the kernel at 3S unrolled stages; its rounding error grows with the blocks'
condition number. qGOFT's blocks are rotations with mild norm/angle adjustments held near orthogonal by the
regularizer (condition number near 1); exact Givens rotations invert exactly up to rounding. A block with
``a e - b c = 0`` has no inverse and gives non-finite block gradients here (the PyTorch reference recomputes
from x and has no such limit).

Arithmetic in float32 (float64 for float64 input); z and dx are stored in the input's dtype, the block
gradient in the blocks' dtype. Under the interpreter bfloat16 stores are rounded by hand (``cast_to``).

Limits: a program holds whole rows (P elements; the backward holds x, g and h), so P is at most
:data:`MAX_WIDTH`. The partials buffer has ``programs × S × 2P`` float32 entries (at most
:data:`_PARTIALS_BUDGET` bytes); its read-add-write per row block is extra traffic a column-split
(four-step) kernel would avoid — not done here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..math.givens import butterfly_width

from .common import acc_dtype, cast_to, sm_count

MAX_WIDTH = 16384           # P: the widest row a program holds
_MAX_TILE_FORWARD = 4096    # elements of the row tile a forward program holds
_MAX_TILE_BACKWARD = 2048   # per tile; the backward holds three
_PARTIALS_BUDGET = 64 << 20  # bytes of the per-program block-gradient partials


@triton.jit
def _stage(h, c_ptr, s: tl.constexpr, R: tl.constexpr, P: tl.constexpr, TRANSPOSE: tl.constexpr,
           ACC: tl.constexpr):
    """Stage s on the tile h (R × P): (u, v) -> (a u + b v, c u + e v), or with TRANSPOSE the transposed
    blocks (a u + c v, b u + e v); the blocks of stage s at c_ptr + s·4·P/2 (a, b, c, e rows)."""
    HALF: tl.constexpr = P // 2
    H: tl.constexpr = 1 << s
    G: tl.constexpr = P >> (s + 1)
    base = c_ptr + s * 4 * HALF
    offs = tl.arange(0, HALF)
    a = tl.reshape(tl.load(base + offs).to(ACC), (1, G, H))
    b = tl.reshape(tl.load(base + HALF + offs).to(ACC), (1, G, H))
    c = tl.reshape(tl.load(base + 2 * HALF + offs).to(ACC), (1, G, H))
    e = tl.reshape(tl.load(base + 3 * HALF + offs).to(ACC), (1, G, H))
    u, v = tl.split(tl.permute(tl.reshape(h, (R, G, 2, H)), (0, 1, 3, 2)))
    if TRANSPOSE:
        x = tl.join(a * u + c * v, b * u + e * v)
    else:
        x = tl.join(a * u + b * v, c * u + e * v)
    return tl.reshape(tl.permute(x, (0, 1, 3, 2)), (R, P))


@triton.jit
def _pair_sums(g, h, s: tl.constexpr, R: tl.constexpr, P: tl.constexpr):
    """(Σ_rows gu·u, gu·v, gv·u, gv·v), each of length P/2 in pair order, for the pairs of stage s."""
    HALF: tl.constexpr = P // 2
    H: tl.constexpr = 1 << s
    G: tl.constexpr = P >> (s + 1)
    u, v = tl.split(tl.permute(tl.reshape(h, (R, G, 2, H)), (0, 1, 3, 2)))
    gu, gv = tl.split(tl.permute(tl.reshape(g, (R, G, 2, H)), (0, 1, 3, 2)))
    return (tl.reshape(tl.sum(gu * u, axis=0), (HALF,)), tl.reshape(tl.sum(gu * v, axis=0), (HALF,)),
            tl.reshape(tl.sum(gv * u, axis=0), (HALF,)), tl.reshape(tl.sum(gv * v, axis=0), (HALF,)))


@triton.jit
def _givens_forward_kernel(x_ptr, c_ptr, out_ptr, n_rows, d, P: tl.constexpr, S: tl.constexpr,
                           BLOCK_R: tl.constexpr, ACC: tl.constexpr, ROUND_BF16_BY_HAND: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, P)
    valid = (rows[:, None] < n_rows) & (cols[None, :] < d)
    offs = rows.to(tl.int64)[:, None] * d + cols[None, :]
    h = tl.load(x_ptr + offs, mask=valid, other=0.0).to(ACC)
    for s in tl.static_range(S):
        h = _stage(h, c_ptr, s, BLOCK_R, P, False, ACC)
    tl.store(out_ptr + offs, cast_to(h, out_ptr.dtype.element_ty, ROUND_BF16_BY_HAND), mask=valid)


@triton.jit
def _givens_backward_kernel(x_ptr, g_ptr, c_ptr, inv_ptr, dx_ptr, part_ptr, n_rows, d, n_blocks,
                            P: tl.constexpr, S: tl.constexpr, BLOCK_R: tl.constexpr, NEED_DX: tl.constexpr,
                            NEED_DBLOCKS: tl.constexpr, ACC: tl.constexpr, ROUND_BF16_BY_HAND: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    HALF: tl.constexpr = P // 2
    cols = tl.arange(0, P)
    halves = tl.arange(0, HALF)
    part = part_ptr + pid.to(tl.int64) * (S * 4 * HALF)
    for blk in range(pid, n_blocks, programs):
        rows = blk * BLOCK_R + tl.arange(0, BLOCK_R)
        valid = (rows[:, None] < n_rows) & (cols[None, :] < d)
        offs = rows.to(tl.int64)[:, None] * d + cols[None, :]
        g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(ACC)
        if NEED_DBLOCKS:
            h = tl.load(x_ptr + offs, mask=valid, other=0.0).to(ACC)
            for s in tl.static_range(S):
                h = _stage(h, c_ptr, s, BLOCK_R, P, False, ACC)
        for s in tl.static_range(S - 1, -1, -1):
            if NEED_DBLOCKS:
                h = _stage(h, inv_ptr, s, BLOCK_R, P, False, ACC)  # h_s, the input of stage s
                da, db, dc, de = _pair_sums(g, h, s, BLOCK_R, P)
                slot = part + s * 4 * HALF + halves
                tl.store(slot, tl.load(slot) + da)
                tl.store(slot + HALF, tl.load(slot + HALF) + db)
                tl.store(slot + 2 * HALF, tl.load(slot + 2 * HALF) + dc)
                tl.store(slot + 3 * HALF, tl.load(slot + 3 * HALF) + de)
            g = _stage(g, c_ptr, s, BLOCK_R, P, True, ACC)
        if NEED_DX:
            tl.store(dx_ptr + offs, cast_to(g, dx_ptr.dtype.element_ty, ROUND_BF16_BY_HAND), mask=valid)
        tl.debug_barrier()  # the slot's writes land before this program's next row block reads them


# --------------------------------------------------------------------------- launchers
def _check(x: Tensor, blocks: Tensor) -> tuple[int, int, int]:
    n_rows, d = x.shape
    S, four, half = blocks.shape
    P = butterfly_width(d)
    if four != 4 or 2 * half != P:
        raise ValueError(f"givens kernels: blocks {tuple(blocks.shape)} do not fit d={d} (expected (S, 4, {P // 2}))")
    if P > MAX_WIDTH:
        raise ValueError(f"givens kernels: d={d} pads to {P} > {MAX_WIDTH}, the widest row a program holds")
    return n_rows, d, P


def _compute(blocks: Tensor, x: Tensor) -> Tensor:
    return blocks.to(torch.float64 if x.dtype == torch.float64 else torch.float32).contiguous()


def inverse_blocks(blocks: Tensor) -> Tensor:
    """Each 2×2 block's inverse, ``[[e, -b], [-c, a]] / (a e - b c)``, in the blocks' layout (S, 4, P/2)."""
    a, b, c, e = blocks.unbind(1)
    det = a * e - b * c
    return torch.stack((e / det, -b / det, -c / det, a / det), 1).contiguous()


def _warps(elements: int) -> int:
    """Warps for a program holding ``elements`` values: about 16 a thread, 4 to 16 warps."""
    return min(16, max(4, triton.next_power_of_2(elements) // 512))


def givens_forward(x: Tensor, blocks: Tensor) -> Tensor:
    """The op's forward on Triton: ``z = (pad_P(x) Mᵀ)[:, :d]`` for x (N × d), in x's dtype."""
    x = x.contiguous()
    n_rows, d, P = _check(x, blocks)
    out = torch.empty_like(x)
    if n_rows == 0:
        return out
    block_r = max(1, min(16, _MAX_TILE_FORWARD // P, triton.next_power_of_2(n_rows)))
    _givens_forward_kernel[(triton.cdiv(n_rows, block_r),)](
        x, _compute(blocks, x), out, n_rows, d, P=P, S=blocks.shape[0], BLOCK_R=block_r, ACC=acc_dtype(x.dtype),
        ROUND_BF16_BY_HAND=x.device.type == "cpu", num_warps=_warps(block_r * P),
    )
    return out


def backward_programs(n_blocks: int, stages: int, P: int, device: torch.device) -> int:
    """How many programs the backward runs: enough to fill the GPU twice, within the partials budget; a
    function of the shape and the device only (so the reduction order, and the result, are reproducible)."""
    slot = max(1, stages * 2 * P * 4)
    wanted = 3 if device.type == "cpu" else 2 * sm_count(device.index or 0)  # cpu: the interpreter
    return max(1, min(n_blocks, wanted, _PARTIALS_BUDGET // slot))


def givens_backward(grad: Tensor, x: Tensor, blocks: Tensor, need_dx: bool, need_dblocks: bool
                    ) -> tuple[Tensor, Tensor]:
    """(dx, dblocks) on Triton: dx = g M (in x's dtype), dblocks (S, 4, P/2) in blocks' dtype; empty when not needed."""
    grad = grad.contiguous()
    x = x.contiguous()
    n_rows, d, P = _check(x, blocks)
    S = blocks.shape[0]
    dx = torch.empty_like(grad) if need_dx else grad.new_empty(0)
    if n_rows == 0 or not (need_dx or need_dblocks):
        return dx, (torch.zeros_like(blocks) if need_dblocks else blocks.new_empty(0))
    c = _compute(blocks, x)
    inv = inverse_blocks(c) if need_dblocks else c
    block_r = max(1, min(16, _MAX_TILE_BACKWARD // P, triton.next_power_of_2(n_rows)))
    n_blocks = triton.cdiv(n_rows, block_r)
    programs = backward_programs(n_blocks, S, P, x.device) if need_dblocks else n_blocks
    partials = torch.zeros(programs if need_dblocks else 1, S, 4, P // 2, dtype=c.dtype, device=x.device)
    _givens_backward_kernel[(programs,)](
        x, grad, c, inv, dx if need_dx else grad, partials, n_rows, d, n_blocks, P=P, S=S, BLOCK_R=block_r,
        NEED_DX=need_dx, NEED_DBLOCKS=need_dblocks, ACC=acc_dtype(x.dtype),
        ROUND_BF16_BY_HAND=x.device.type == "cpu", num_warps=_warps(3 * block_r * P),
    )
    dblocks = partials.sum(0).to(blocks.dtype) if need_dblocks else blocks.new_empty(0)
    return dx, dblocks

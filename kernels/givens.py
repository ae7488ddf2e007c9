"""Triton kernels of the butterfly of Givens-like 2×2 blocks (``fastft.ops.givens_rotation``, qGOFT).

The map is the op's (``fastft/math/givens.py``): a row x (length d) zero-padded to P = 2^k, stage s = 0..S-1
maps each pair (u, v) = (x_i, x_{i+2^s}) to (a·u + b·v, c·u + e·v) with the pair's block from
``blocks[s, :, p]``; z is the first d columns. The data movement is the Hadamard butterfly's
(``kernels/hadamard.py``): the row tile viewed as (R, P/2^(s+1), 2, 2^s), split into u and v, recombined,
joined back — all S stages in registers, one read and one write of the tile.

* ``_givens_forward_kernel``: one program per ``BLOCK_R`` rows: load, S stages, store.
* ``_givens_backward_kernel``: a fixed number of programs (``programs``), each looping over row blocks
  pid, pid + programs, ... For a row block it loads x and the upstream gradient g, then for s = S-1 .. 0:
  recomputes the stage-s input h_s from x (stages 0..s-1 in registers: O(S²) arithmetic, no extra memory
  traffic; the blocks are not inverted, so nothing depends on their conditioning), adds the block gradient
  of this row block (da = Σ gu·u, db = Σ gu·v, dc = Σ gv·u, de = Σ gv·v over rows) to the program's own
  slot of a partials buffer (read, add, write; a barrier orders the slot's next read after the write), and
  maps g back through the transposed stage (gu' = a·gu + c·gv, gv' = b·gu + e·gv). Finally dx = g.
  The launcher sums the partials over programs with ``torch.sum`` (a fixed-order reduction): no float
  atomics, so the block gradient is the same bits on every run of one device and shape.

Arithmetic in float32 (float64 for float64 input); z and dx are stored in the input's dtype, the block
gradient in float32 (float64). Under the interpreter bfloat16 stores are rounded by hand
(``kernels/common.py``'s ``cast_to``).

Limits: the row tile holds P elements; the backward holds three such tiles (x, g and a recomputed h), so
for P = 16384 (d up to 16384) a 16-bit launch runs one row a program and may spill registers (see the
static compile test). The partials buffer has ``programs × S × 4 × P/2`` float32 entries (at most
:data:`_PARTIALS_BUDGET` bytes); its read-add-write per row block is extra traffic that a column-split
(four-step) kernel would avoid — not done here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..math.givens import butterfly_width

from .common import acc_dtype, cast_to, sm_count

_MAX_TILE_FORWARD = 8192   # elements of the row tile a forward program holds
_MAX_TILE_BACKWARD = 4096  # per tile; the backward holds three
_PARTIALS_BUDGET = 64 << 20  # bytes of the per-program block-gradient partials


@triton.jit
def _stage(h, c_ptr, s: tl.constexpr, R: tl.constexpr, P: tl.constexpr, TRANSPOSE: tl.constexpr,
           ACC: tl.constexpr):
    """Stage s of the butterfly on the tile h (R × P): (u, v) -> (a u + b v, c u + e v), or with TRANSPOSE
    the transposed blocks (a u + c v, b u + e v)."""
    HALF: tl.constexpr = P // 2
    H: tl.constexpr = 1 << s
    G: tl.constexpr = P >> (s + 1)
    base = c_ptr + s * 4 * HALF
    offs = tl.arange(0, HALF)
    a = tl.reshape(tl.load(base + offs).to(ACC), (1, G, H))
    b = tl.reshape(tl.load(base + HALF + offs).to(ACC), (1, G, H))
    c = tl.reshape(tl.load(base + 2 * HALF + offs).to(ACC), (1, G, H))
    e = tl.reshape(tl.load(base + 3 * HALF + offs).to(ACC), (1, G, H))
    x = tl.permute(tl.reshape(h, (R, G, 2, H)), (0, 1, 3, 2))
    u, v = tl.split(x)
    if TRANSPOSE:
        x = tl.join(a * u + c * v, b * u + e * v)
    else:
        x = tl.join(a * u + b * v, c * u + e * v)
    return tl.reshape(tl.permute(x, (0, 1, 3, 2)), (R, P))


@triton.jit
def _pair_halves(h, s: tl.constexpr, R: tl.constexpr, P: tl.constexpr):
    """(u, v), each (R, P/2^(s+1), 2^s): the first and second elements of every pair of stage s."""
    H: tl.constexpr = 1 << s
    G: tl.constexpr = P >> (s + 1)
    return tl.split(tl.permute(tl.reshape(h, (R, G, 2, H)), (0, 1, 3, 2)))


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
def _givens_backward_kernel(x_ptr, g_ptr, c_ptr, dx_ptr, part_ptr, n_rows, d, n_blocks,
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
            x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(ACC)
        for t in tl.static_range(S):
            s: tl.constexpr = S - 1 - t
            if NEED_DBLOCKS:
                h = x
                for q in tl.static_range(s):
                    h = _stage(h, c_ptr, q, BLOCK_R, P, False, ACC)
                u, v = _pair_halves(h, s, BLOCK_R, P)
                gu, gv = _pair_halves(g, s, BLOCK_R, P)
                slot = part + s * 4 * HALF + halves
                da = tl.reshape(tl.sum(gu * u, axis=0), (HALF,))
                db = tl.reshape(tl.sum(gu * v, axis=0), (HALF,))
                dc = tl.reshape(tl.sum(gv * u, axis=0), (HALF,))
                de = tl.reshape(tl.sum(gv * v, axis=0), (HALF,))
                tl.store(slot, tl.load(slot) + da)
                tl.store(slot + HALF, tl.load(slot + HALF) + db)
                tl.store(slot + 2 * HALF, tl.load(slot + 2 * HALF) + dc)
                tl.store(slot + 3 * HALF, tl.load(slot + 3 * HALF) + de)
            if NEED_DX or s > 0:
                g = _stage(g, c_ptr, s, BLOCK_R, P, True, ACC)
        if NEED_DX:
            tl.store(dx_ptr + offs, cast_to(g, dx_ptr.dtype.element_ty, ROUND_BF16_BY_HAND), mask=valid)
        tl.debug_barrier()  # the slot's writes land before this program's next row block reads them


# --------------------------------------------------------------------------- launchers
def _check(x: Tensor, blocks: Tensor) -> tuple[int, int, int]:
    n_rows, d = x.shape
    S, four, half = blocks.shape
    P = butterfly_width(d)
    if four != 4 or 2 * half != P or S < 0:
        raise ValueError(f"givens kernels: blocks {tuple(blocks.shape)} do not fit d={d} (expected (S, 4, {P // 2}))")
    return n_rows, d, P


def _compute_blocks(blocks: Tensor, x: Tensor) -> Tensor:
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return blocks.to(dtype).contiguous()


def givens_forward(x: Tensor, blocks: Tensor) -> Tensor:
    """The op's forward on Triton: ``z = (pad_P(x) Mᵀ)[:, :d]`` for x (N × d) contiguous, in x's dtype."""
    x = x.contiguous()
    n_rows, d, P = _check(x, blocks)
    out = torch.empty_like(x)
    if n_rows == 0:
        return out
    c = _compute_blocks(blocks, x)
    block_r = max(1, min(16, _MAX_TILE_FORWARD // P, triton.next_power_of_2(n_rows)))
    _givens_forward_kernel[(triton.cdiv(n_rows, block_r),)](
        x, c, out, n_rows, d, P=P, S=blocks.shape[0], BLOCK_R=block_r, ACC=acc_dtype(x.dtype),
        ROUND_BF16_BY_HAND=x.device.type == "cpu", num_warps=8 if block_r * P >= 4096 else 4,
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
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    dx = torch.empty_like(grad) if need_dx else grad.new_empty(0)
    if n_rows == 0 or not (need_dx or need_dblocks):
        dblocks = torch.zeros_like(blocks) if need_dblocks else blocks.new_empty(0)
        return dx, dblocks
    c = _compute_blocks(blocks, x)
    block_r = max(1, min(16, _MAX_TILE_BACKWARD // P, triton.next_power_of_2(n_rows)))
    n_blocks = triton.cdiv(n_rows, block_r)
    programs = backward_programs(n_blocks, S, P, x.device) if need_dblocks else n_blocks
    partials = (torch.zeros(programs, S, 4, P // 2, dtype=compute, device=x.device) if need_dblocks
                else c.new_zeros(1))
    _givens_backward_kernel[(programs,)](
        x, grad, c, dx if need_dx else grad, partials, n_rows, d, n_blocks, P=P, S=S, BLOCK_R=block_r,
        NEED_DX=need_dx, NEED_DBLOCKS=need_dblocks, ACC=acc_dtype(x.dtype),
        ROUND_BF16_BY_HAND=x.device.type == "cpu", num_warps=8 if block_r * P >= 4096 else 4,
    )
    dblocks = partials.sum(0).to(blocks.dtype) if need_dblocks else blocks.new_empty(0)
    return dx, dblocks

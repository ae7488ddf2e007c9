"""Triton building blocks shared by every kernel family of ``fastft.kernels``; each kernel file imports them by name.

What is here (``@triton.jit`` helpers are inlined into the kernels that call them):

* casts: :func:`cast_to`, a down-cast that rounds to nearest-even on every backend (the Triton
  interpreter truncates float32 -> bfloat16; ``ROUND_BF16_BY_HAND`` rounds by hand first).
* tile order and the dot: :func:`tile_coordinates` (grouped tile order, ``GROUP_M`` tile rows walked column
  by column for L2 reuse) and :func:`mma` (``acc + a @ b`` in acc's dtype, operands optionally widened
  to float32 because the interpreter's bfloat16 ``tl.dot`` is wrong).
* 4-bit weight tiles: :func:`dequantize_at` and :func:`load_dequantized_tile` read a bitsandbytes NF4/FP4
  weight (format in ``fastft/ops/dequantize_4bit.py``) tile by tile inside a K-loop, so the dense weight
  never exists in memory; :func:`check_4bit_weight` validates its parts.
* GEMM building blocks: :func:`accumulate_linear` (the K-loop of a GEMM over a dense or 4-bit weight,
  optionally scaling the activation's columns) and :func:`lowrank_tile` (the low-rank term of a tile).
* quantization epilogue: :func:`group_scale_zero` and :func:`quantize_tile` (the grid of
  ``fastft.ops.fake_quantize``, bit for bit), with :func:`round_half_even` and :func:`exact_div`.
* launch: :class:`Tiles`, :func:`choose_tiles`, :func:`smaller_tiles` and :func:`launch_with_fallback`
  (retry with leaner tiles when shared memory runs out), :func:`dot_flags`, :func:`index_dtype`,
  :func:`sm_count` and operand checks.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources

from ..math.quantization import qrange


# ----------------------------------------------------------------------- casts

@triton.jit
def round_to_bfloat16_grid(value):
    """Float32 ``value`` rounded to the nearest bfloat16 (ties to even), still held as float32."""
    bits = value.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def cast_to(value, dtype: tl.constexpr, ROUND_BF16_BY_HAND: tl.constexpr):
    """``value.to(dtype)`` rounded to nearest-even.

    The Triton interpreter (3.9) truncates float32 -> bfloat16 conversions instead of rounding them, so
    under the interpreter a bfloat16 result would differ from the GPU and from torch by up to one ulp.
    With ``ROUND_BF16_BY_HAND`` (set when interpreting) a float32 value bound for bfloat16 is first
    rounded onto the bfloat16 grid in integer arithmetic, which makes the truncating cast exact.
    """
    if ROUND_BF16_BY_HAND and dtype == tl.bfloat16 and value.dtype == tl.float32:
        value = round_to_bfloat16_grid(value)
    return value.to(dtype)


# ------------------------------------------------------ tile order and the dot

GROUP_M = 8


@triton.jit
def mma(a, b, acc, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``acc + a @ b`` in acc's dtype; with UPCAST_DOT the operands are widened to float32 first."""
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)


@triton.jit
def tile_coordinates(pid, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(tile row, tile column) of program ``pid``, walking GROUP_M tile rows column by column (L2 reuse)."""
    tiles_m = tl.cdiv(n_rows, BLOCK_M)
    tiles_n = tl.cdiv(n_cols, BLOCK_N)
    tiles_per_group = GROUP_M * tiles_n
    first_m = (pid // tiles_per_group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_rows
    pid_n = (pid % tiles_per_group) // group_rows
    return pid_m, pid_n


# ---------------------------------------------------------- 4-bit weight tiles

@triton.jit
def dequantize_at(packed_ptr, absmax_ptr, code_ptr, flat, valid, BLOCKSIZE: tl.constexpr):
    """Float32 ``w[flat]`` (see the module docstring) where ``valid``, 0 elsewhere; ``flat`` any shape."""
    byte = tl.load(packed_ptr + (flat >> 1), mask=valid, other=0)
    nibble = tl.where((flat & 1) == 0, byte >> 4, byte & 0xF)
    value = tl.load(code_ptr + nibble.to(tl.int32), mask=valid, other=0.0)
    scale = tl.load(absmax_ptr + flat // BLOCKSIZE, mask=valid, other=0.0)
    return value * scale


@triton.jit
def load_dequantized_tile(packed_ptr, absmax_ptr, code_ptr, rows, cols, n_rows, n_cols, BLOCKSIZE: tl.constexpr):
    """Float32 tile ``W[rows, cols]`` of the n_rows×n_cols 4-bit matrix W, 0 outside it.

    ``rows`` and ``cols`` are integer blocks that broadcast against each other (e.g. ``offs_n[:, None]``
    and ``offs_k[None, :]`` for a BLOCK_N×BLOCK_K tile, or ``offs_n[None, :]`` and ``offs_k[:, None]``
    for its BLOCK_K×BLOCK_N transpose). Use int64 rows when ``n_rows * n_cols`` reaches 2**31.
    """
    valid = (rows < n_rows) & (cols < n_cols)
    return dequantize_at(packed_ptr, absmax_ptr, code_ptr, rows * n_cols + cols, valid, BLOCKSIZE)


def check_4bit_weight(
    packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, numel: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The flat uint8 codes, absmax and code table of a 4-bit weight of ``numel`` elements, validated."""
    packed = packed.reshape(-1).view(torch.uint8)
    if packed.numel() < (numel + 1) // 2:
        raise ValueError(f"4-bit weight of {numel} elements needs {(numel + 1) // 2} packed bytes, "
                         f"got {packed.numel()}")
    if blocksize <= 0 or absmax.numel() < triton.cdiv(numel, blocksize):
        raise ValueError(f"4-bit weight of {numel} elements at blocksize {blocksize} needs "
                         f"{triton.cdiv(numel, max(blocksize, 1))} absmax values, got {absmax.numel()}")
    if absmax.dtype != torch.float32 or code.dtype != torch.float32 or code.numel() != 16:
        raise TypeError(f"expected float32 absmax and a 16-entry float32 code table, got {absmax.dtype} absmax "
                        f"and a {code.numel()}-entry {code.dtype} table")
    if not (packed.device == absmax.device == code.device):
        raise ValueError(f"packed, absmax and code must share a device, got {packed.device}, {absmax.device}, "
                         f"{code.device}")
    return packed.contiguous(), absmax.reshape(-1).contiguous(), code.reshape(-1).contiguous()


def four_bit_parts(weight: Tensor, absmax: Optional[Tensor], code: Optional[Tensor], blocksize: int, numel: int):
    if absmax is None:
        return weight, None
    packed, absmax, code = check_4bit_weight(weight, absmax, code, blocksize, numel)
    return packed, (absmax, code, blocksize)


def weight_operands(w: Tensor, strides_of: Tensor, four_bit, numel: int):
    """A GEMM kernel's weight arguments ``(absmax, code, blocksize, stride_wk, stride_wn, extent)``.

    Dense (``four_bit`` None): ``w`` stands in for the unused absmax and code pointers, the strides are
    ``strides_of``'s (the K×N view the kernel reads), extent 0. 4-bit: the tables of :func:`four_bit_parts`,
    no strides, ``numel`` packed values (the extent for the index dtype).
    """
    if four_bit is None:
        return w, w, 0, strides_of.stride(0), strides_of.stride(1), 0
    absmax, code, blocksize = four_bit
    return absmax, code, blocksize, 0, 0, numel


# -------------------------------------------------------- GEMM building blocks

@triton.jit
def lowrank_tile(acc, u_ptr, v_ptr, offs_m, offs_n, in_m, in_n, R, stride_um, stride_ur, stride_vr, stride_vn,
                 UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    """``acc + U[offs_m, :] @ V[:, offs_n]`` for U (M×R) and V (R×N), a ``tl.dot`` per BLOCK_R of the rank."""
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        in_r = offs_r < R
        u = tl.load(u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur,
                    mask=in_m[:, None] & in_r[None, :], other=0.0)
        v = tl.load(v_ptr + offs_r[:, None] * stride_vr + offs_n[None, :] * stride_vn,
                    mask=in_r[:, None] & in_n[None, :], other=0.0)
        acc = mma(u, v, acc, UPCAST_DOT, INPUT_PRECISION)
    return acc


@triton.jit
def accumulate_linear(
    acc, act_ptr, w_ptr, absmax_ptr, code_ptr, act_scale_ptr, offs_m, offs_n, in_m, in_n, K, N,
    stride_am, stride_ak, stride_wk, stride_wn,
    FOUR_BIT: tl.constexpr, W_ROWS_ALONG_N: tl.constexpr, BLOCKSIZE: tl.constexpr, HAS_ACT_SCALE: tl.constexpr,
    UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, INDEX_DTYPE: tl.constexpr,
    ROUND_BF16_BY_HAND: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``acc + (act[offs_m, :] [⊙ act_scale]) @ W'[:, offs_n]``: the K-loop of a GEMM with act (M×K), W' (K×N).

    A dense W' is read through its strides; a 4-bit W' is dequantized per tile (W stored N×K if
    W_ROWS_ALONG_N, i.e. W' = Wᵀ, else K×N). With HAS_ACT_SCALE each act column k is multiplied by
    ``act_scale[k]`` in ACC precision and rounded back to act's dtype before the dot (DoRA's ``g ⊙ grad``).
    """
    act_dtype = act_ptr.dtype.element_ty
    for k0 in range(0, K, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(INDEX_DTYPE)
        in_k = offs_k < K
        a = tl.load(act_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=in_m[:, None] & in_k[None, :], other=0.0)
        if HAS_ACT_SCALE:
            column_scale = tl.load(act_scale_ptr + offs_k, mask=in_k, other=0.0).to(acc.dtype)
            a = cast_to(a.to(acc.dtype) * column_scale[None, :], act_dtype, ROUND_BF16_BY_HAND)
        if FOUR_BIT:
            if W_ROWS_ALONG_N:
                w = load_dequantized_tile(w_ptr, absmax_ptr, code_ptr, offs_n[None, :], offs_k[:, None], N, K,
                                          BLOCKSIZE)
            else:
                w = load_dequantized_tile(w_ptr, absmax_ptr, code_ptr, offs_k[:, None], offs_n[None, :], K, N,
                                          BLOCKSIZE)
            w = cast_to(w, act_dtype, ROUND_BF16_BY_HAND)
        else:
            w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                        mask=in_k[:, None] & in_n[None, :], other=0.0)
        acc = mma(a, w, acc, UPCAST_DOT, INPUT_PRECISION)
    return acc


# ------------------------------------------------------- quantization epilogue

@triton.jit
def round_half_even(v):
    """Round to the nearest integer, ties to even (torch.round), for any finite or infinite float tile."""
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def exact_div(a, b, IS_F64: tl.constexpr):
    """Correctly rounded a / b (float64 division is always correctly rounded)."""
    if IS_F64:
        return a / b
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def group_scale_zero(vmax, vmin, clip, eps, SYMMETRIC: tl.constexpr, QMAX: tl.constexpr, IS_F64: tl.constexpr):
    """(scale, zero) from a group's max and min (any broadcastable shapes), in vmax's dtype."""
    qmax = tl.full((), QMAX, vmax.dtype)
    if SYMMETRIC:
        amax = tl.maximum(vmax, -vmin)
        scale = tl.maximum(exact_div(amax * clip, qmax, IS_F64), eps)
        zero = tl.zeros_like(scale)
    else:
        hi = tl.maximum(vmax, 0.0) * clip
        lo = tl.minimum(vmin, 0.0) * clip
        scale = tl.maximum(exact_div(hi - lo, qmax, IS_F64), eps)
        zero = round_half_even(exact_div(-lo, scale, IS_F64))
    return scale, zero


@triton.jit
def quantize_tile(v, scale, zero, QMIN: tl.constexpr, QMAX: tl.constexpr, IS_F64: tl.constexpr):
    """(out, kept): the fake-quantized tile and where its code was not clamped."""
    raw = round_half_even(exact_div(v, scale, IS_F64)) + zero
    q = tl.minimum(tl.maximum(raw, QMIN), QMAX)
    return (q - zero) * scale, q == raw


def acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def quant_flags(bits: int, symmetric: bool, dtype: torch.dtype, device: torch.device) -> dict:
    """The constexpr arguments the quantization epilogue needs."""
    qmin, qmax = qrange(bits, symmetric)
    return dict(
        SYMMETRIC=symmetric, QMIN=float(qmin), QMAX=float(qmax), ACC_DTYPE=acc_dtype(dtype),
        IS_F64=dtype == torch.float64, ROUND_BF16_BY_HAND=device.type == "cpu",
    )


# ---------------------------------------------- launch: tiles, flags, operands

INT32_LIMIT = 2**31


@dataclass(frozen=True)
class Tiles:
    """Block sizes of one launch: an m×n output tile, k per reduction step, warps and pipeline stages."""

    m: int
    n: int
    k: int
    warps: int
    stages: int


def block_size(dim: int, cap: int) -> int:
    """Smallest power of two ≥ dim, within [16, cap] (16 is tl.dot's smallest tile)."""
    return max(16, min(cap, triton.next_power_of_2(max(dim, 1))))


def choose_tiles(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, four_bit: bool = False) -> Tiles:
    """Tiles for an m×n output reducing over k.

    GPU: up to 128×128 output tiles (a skinny dimension such as the rank gets its own power of two, at
    least 16), BLOCK_K 64 for 16-bit operands and 32 for float32 or a 4-bit weight (whose dequantization
    already costs registers), 8 warps for a full 128×128 tile. Interpreter (CPU tensors): at most 32, so
    tests run fast and shapes of a few dozen cross tile edges.
    """
    if device.type == "cpu":
        return Tiles(block_size(m, 32), block_size(n, 32), block_size(k, 32), 4, 1)
    block_m, block_n = block_size(m, 128), block_size(n, 128)
    block_k = block_size(k, 32 if (dtype == torch.float32 or four_bit) else 64)
    return Tiles(block_m, block_n, block_k, 8 if block_m * block_n >= 128 * 128 else 4, 2 if four_bit else 3)


def smaller_tiles(tiles: Tiles) -> Optional[Tiles]:
    """The next, leaner configuration to try after ``tiles`` ran out of shared memory (None: none left).

    Fewer pipeline stages first, then a shorter reduction step, then a smaller output tile (GPUs with
    less shared memory than an A100, e.g. a T4's 64 KiB, take this path once per shape class).
    """
    if tiles.stages > 2:
        return replace(tiles, stages=tiles.stages - 1)
    if tiles.k > 16:
        return replace(tiles, k=tiles.k // 2)
    if max(tiles.m, tiles.n) > 32:
        m, n = (tiles.m // 2, tiles.n) if tiles.m >= tiles.n else (tiles.m, tiles.n // 2)
        return replace(tiles, m=m, n=n, warps=4)
    return None


_WORKING_TILES: dict = {}


def launch_with_fallback(key, tiles: Tiles, launch: Callable[[Tiles], None]) -> None:
    """``launch(tiles)``, shrinking the tiles while the GPU reports too little shared memory for them.

    ``key`` identifies the kernel specialization and shape class; the configuration that worked is
    remembered for it, so the retries happen once.
    """
    tiles = _WORKING_TILES.get((key, tiles), tiles)
    first = tiles
    while True:
        try:
            launch(tiles)
        except OutOfResources:
            tiles = smaller_tiles(tiles)
            if tiles is None:
                raise
            continue
        if tiles != first:
            _WORKING_TILES[(key, first)] = tiles
        return


def dot_flags(dtype: torch.dtype, device: torch.device) -> dict:
    interpreting = device.type == "cpu"
    tf32 = dtype == torch.float32 and not interpreting and torch.backends.cuda.matmul.allow_tf32
    return dict(
        ACC_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
        UPCAST_DOT=interpreting and dtype == torch.bfloat16,
        INPUT_PRECISION="tf32" if tf32 else "ieee",
        ROUND_BF16_BY_HAND=interpreting,
    )


def index_dtype(*tensors: Optional[Tensor], extra: int = 0):
    """int64 offsets when some tensor's largest element offset (or ``extra``) reaches 2**31, else int32."""
    largest = extra
    for t in tensors:
        if t is not None and t.numel() > 0:
            largest = max(largest, sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())))
    return tl.int64 if largest + 256 >= INT32_LIMIT else tl.int32


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_WORKSPACES: dict = {}


def workspace(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A reused buffer of ``shape`` (contents undefined), one per (name, dtype, device), grown when needed.

    For a value consumed within one launcher call (a 4-bit weight dequantized for one cuBLAS GEMM): the
    next call of any launcher asking for the same name overwrites it, on the same stream, so the buffer is
    never read after it was reused.
    """
    numel = 1
    for size in shape:
        numel *= int(size)
    key = (name, dtype, device)
    buffer = _WORKSPACES.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(max(numel, 1), dtype=dtype, device=device)
        _WORKSPACES[key] = buffer
    return buffer[:numel].view(shape)


def keep_mask(mask: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    if mask is None:
        return None
    if mask.shape != like.shape:
        raise ValueError(f"dropout mask has shape {tuple(mask.shape)}, expected {tuple(like.shape)}")
    return mask.to(torch.bool).view(torch.uint8)


def check_operands(
    dtype: torch.dtype, weight: Optional[Tensor], weight_shape: tuple[int, int], **others: Optional[Tensor]
) -> None:
    """Dense weight of ``weight_shape`` and every other operand in the activations' ``dtype``."""
    if weight is not None and (tuple(weight.shape) != weight_shape or weight.dtype != dtype):
        raise ValueError(f"dense weight must be {weight_shape} of {dtype}, got {tuple(weight.shape)} of {weight.dtype}")
    for name, t in others.items():
        if t is not None and t.dtype != dtype:
            raise ValueError(f"{name} must be {dtype} like the activations, got {t.dtype}")

"""Triton kernels for bitsandbytes 4-bit (NF4 / FP4) weights.

Format (see ``fastft/ops/dequantize_4bit.py``): the row-major flattening ``w`` of an out×in matrix holds
one 4-bit code per element, two to a byte, element ``i`` in byte ``i // 2`` (high nibble when ``i`` is
even, low nibble when odd), and::

    w_i = code[c_i] · absmax[i // blocksize]

with ``code`` the 16-entry float32 table of the quant type and ``absmax`` the float32 per-block scale
(nested quantization already undone by the caller).

What is here:

* :func:`dequantize_at` (``@triton.jit``): ``w_i`` at any block of flat indices ``i``, in float32. Each
  element loads its byte (the two elements of a byte hit the same cache line), picks the nibble by the
  parity of ``i``, gathers from the 16-entry table (which stays in L1) and scales by its block's absmax.
* :func:`load_dequantized_tile` (``@triton.jit``): the tile ``W[rows, cols]`` for broadcastable row and
  column index blocks, zero outside the matrix. Passing ``rows[:, None], cols[None, :]`` gives a tile of
  W; passing ``rows[None, :], cols[:, None]`` gives the same tile already transposed, which is how a
  GEMM reads Wᵀ as its right operand without a transpose. Fused kernels (LoRA, DoRA, QAT) call this
  inside their K-loop, so the dense weight never exists in memory.
* :func:`dequantize_4bit`: the dense matrix, one program per ``BLOCK`` consecutive elements (used by the
  reference path on CUDA and by merge/unpatch).
* :func:`cast_to` (``@triton.jit``): a down-cast that rounds to nearest-even on every backend; see its
  docstring for the Triton-interpreter bfloat16 issue it works around.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_INT32_LIMIT = 2**31


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


@triton.jit
def _dequantize_4bit_kernel(
    packed_ptr, absmax_ptr, code_ptr, out_ptr, numel,
    BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr, INDEX_DTYPE: tl.constexpr, ROUND_BF16_BY_HAND: tl.constexpr,
):
    """``out[i] = code[c_i] · absmax[i // BLOCKSIZE]`` for the BLOCK elements ``i`` of this program."""
    flat = tl.program_id(0).to(INDEX_DTYPE) * BLOCK + tl.arange(0, BLOCK)
    valid = flat < numel
    value = dequantize_at(packed_ptr, absmax_ptr, code_ptr, flat, valid, BLOCKSIZE)
    tl.store(out_ptr + flat, cast_to(value, out_ptr.dtype.element_ty, ROUND_BF16_BY_HAND), mask=valid)


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


def dequantize_4bit(
    packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, shape: tuple[int, int], dtype: torch.dtype
) -> Tensor:
    """Dense ``shape`` matrix of ``dtype`` from a packed 4-bit weight (float32 math, one rounding to dtype)."""
    numel = int(shape[0]) * int(shape[1])
    packed, absmax, code = check_4bit_weight(packed, absmax, code, blocksize, numel)
    out = torch.empty(tuple(shape), dtype=dtype, device=packed.device)
    if numel == 0:
        return out
    interpreting = packed.device.type == "cpu"
    block = 1024
    _dequantize_4bit_kernel[(triton.cdiv(numel, block),)](
        packed, absmax, code, out, numel,
        BLOCKSIZE=blocksize, BLOCK=block, INDEX_DTYPE=tl.int64 if numel + block >= _INT32_LIMIT else tl.int32,
        ROUND_BF16_BY_HAND=interpreting,
        num_warps=4,
    )
    return out

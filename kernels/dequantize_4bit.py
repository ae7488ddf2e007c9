"""Triton kernels for bitsandbytes 4-bit (NF4 / FP4) weights.

Format (see ``fastft/ops/dequantize_4bit.py``): the row-major flattening ``w`` of an out×in matrix holds
one 4-bit code per element, two to a byte, element ``i`` in byte ``i // 2`` (high nibble when ``i`` is
even, low nibble when odd), and::

    w_i = code[c_i] · absmax[i // blocksize]

with ``code`` the 16-entry float32 table of the quant type and ``absmax`` the float32 per-block scale
(nested quantization already undone by the caller).

The tile reads every fused kernel shares live in ``fastft.kernels.common``: ``dequantize_at`` (``w_i`` at
any block of flat indices, in float32: each element loads its byte, picks the nibble by the parity of
``i``, gathers from the 16-entry table and scales by its block's absmax) and ``load_dequantized_tile``
(the tile ``W[rows, cols]`` for broadcastable index blocks, zero outside the matrix; ``rows[None, :],
cols[:, None]`` gives the tile already transposed, which is how a GEMM reads Wᵀ without a transpose).
Fused kernels (LoRA, DoRA, QAT) call it inside their K-loop, so the dense weight never exists in memory.

What is here: :func:`dequantize_4bit`, the dense matrix, one program per ``BLOCK`` consecutive elements
(used by the reference path on CUDA and by merge/unpatch).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import INT32_LIMIT, cast_to, check_4bit_weight, dequantize_at
from .common import load_dequantized_tile  # noqa: F401  (the 4-bit tile read, documented above)



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


def dequantize_4bit(
    packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, shape: tuple[int, int], dtype: torch.dtype,
    out: Tensor | None = None,
) -> Tensor:
    """Dense ``shape`` matrix of ``dtype`` from a packed 4-bit weight (float32 math, one rounding to dtype).

    ``out``: a contiguous buffer of ``shape`` and ``dtype`` to write into (the cuBLAS paths pass a reused
    workspace, so a 4-bit weight is dequantized once per call without a fresh allocation)."""
    numel = int(shape[0]) * int(shape[1])
    packed, absmax, code = check_4bit_weight(packed, absmax, code, blocksize, numel)
    if out is None:
        out = torch.empty(tuple(shape), dtype=dtype, device=packed.device)
    if numel == 0:
        return out
    interpreting = packed.device.type == "cpu"
    block = 1024
    _dequantize_4bit_kernel[(triton.cdiv(numel, block),)](
        packed, absmax, code, out, numel,
        BLOCKSIZE=blocksize, BLOCK=block, INDEX_DTYPE=tl.int64 if numel + block >= INT32_LIMIT else tl.int32,
        ROUND_BF16_BY_HAND=interpreting,
        num_warps=4,
    )
    return out

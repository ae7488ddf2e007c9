"""Dequantize a bitsandbytes 4-bit (NF4 / FP4) weight.

Format (bitsandbytes ``Params4bit``): the row-major flattening ``w`` of an out×in matrix is cut into
blocks of ``blocksize`` elements; element ``i`` is stored as a 4-bit code ``c_i`` packed two to a byte,
the even element in the high nibble (byte ``i // 2``; high nibble if ``i`` is even, low nibble if odd).

    w_i = code[c_i] · absmax[i // blocksize]

``code`` is the 16-entry table of the quant type (NF4 or FP4, ``QuantState.code``). With nested
("double") quantization the absmax vector is itself stored blockwise in 8 bits:

    absmax_j = code2[q_j] · absmax2[j // blocksize2] + offset

:func:`unnest_absmax` undoes that once per call (the vector is ``in·out / blocksize`` long, 1/64 of
the weight at the default block size), so every consumer sees a plain float32 ``absmax``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _ext
from ..dispatch import implementation, lazy, register_op


def unnest_absmax(absmax_codes: Tensor, code2: Tensor, absmax2: Tensor, blocksize2: int, offset: float | Tensor) -> Tensor:
    """Float32 absmax from its 8-bit blockwise encoding (bitsandbytes' nested quant state)."""
    n = absmax_codes.numel()
    scale = absmax2.float().repeat_interleave(blocksize2)[:n]
    return code2.float()[absmax_codes.reshape(-1).long()] * scale + offset


def dequantize_4bit_reference(
    packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, shape: tuple[int, int], dtype: torch.dtype
) -> Tensor:
    """The formula above in PyTorch, computed in float32 and cast to ``dtype``."""
    n = shape[0] * shape[1]
    data = packed.reshape(-1).view(torch.uint8)
    # code[c_i] for both nibbles of every byte at once: rows of a 256×2 table selected by the byte (the same
    # float32 values as indexing ``code`` by each nibble, one row gather over n/2 bytes instead of n lookups)
    nibbles = torch.arange(256, device=code.device)
    table = code.float()[torch.stack((nibbles >> 4, nibbles & 0xF), dim=-1)]
    values = torch.index_select(table, 0, data.int()).reshape(-1)[:n]
    if n % blocksize == 0:  # whole blocks: scale each block by its absmax in place (no n-long scale vector)
        return values.view(-1, blocksize).mul_(absmax.float()[:, None]).reshape(shape).to(dtype)
    return (values * absmax.float().repeat_interleave(blocksize)[:n]).reshape(shape).to(dtype)


def dequantize_4bit(
    packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, shape: tuple[int, int], dtype: torch.dtype
) -> Tensor:
    """Dense ``shape`` matrix of ``dtype`` from a packed 4-bit weight, on the backend chosen for its device."""
    if absmax.dtype != torch.float32:
        raise TypeError(f"dequantize_4bit expects a float32 absmax (unnest it first), got {absmax.dtype}")
    return implementation("dequantize_4bit", "forward", packed.device)(packed, absmax, code, blocksize, shape, dtype)


def dequantize_4bit_nested(
    packed: Tensor, absmax_codes: Tensor, code2: Tensor, absmax2: Tensor, blocksize2: int, offset: float | Tensor,
    code: Tensor, blocksize: int, shape: tuple[int, int], dtype: torch.dtype,
) -> Tensor:
    """:func:`dequantize_4bit` of a weight whose absmax is nested (bitsandbytes' double quantization).

    The CUDA library decodes each block's absmax inside the kernel; the other backends unnest it first
    (:func:`unnest_absmax`) — the same float32 operations, so the same result.
    """
    return implementation("dequantize_4bit", "nested", packed.device)(
        packed, absmax_codes, code2, absmax2, blocksize2, offset, code, blocksize, shape, dtype)


def _nested_by_unnesting(
    packed: Tensor, absmax_codes: Tensor, code2: Tensor, absmax2: Tensor, blocksize2: int, offset: float | Tensor,
    code: Tensor, blocksize: int, shape: tuple[int, int], dtype: torch.dtype,
) -> Tensor:
    """The nested entry of the reference (and of Triton): unnest the absmax, then :func:`dequantize_4bit`."""
    absmax = unnest_absmax(absmax_codes, code2, absmax2, blocksize2, offset)
    return dequantize_4bit(packed, absmax, code, blocksize, shape, dtype)


def _nested_in_cuda(
    packed: Tensor, absmax_codes: Tensor, code2: Tensor, absmax2: Tensor, blocksize2: int, offset: float | Tensor,
    code: Tensor, blocksize: int, shape: tuple[int, int], dtype: torch.dtype,
) -> Tensor:
    """The nested entry of the CUDA library: it decodes each block's absmax inside the kernel."""
    return _ext.dequantize_4bit(packed, None, code, blocksize, shape, dtype,
                                nested=(absmax_codes, code2, absmax2, int(blocksize2), float(offset)))


register_op("dequantize_4bit", {
    "torch": {"forward": dequantize_4bit_reference, "nested": _nested_by_unnesting},
    "triton": lazy("fastft.kernels.dequantize_4bit", forward="dequantize_4bit"),
    "cuda": {"forward": _ext.dequantize_4bit, "nested": _nested_in_cuda},
})


@dataclass
class FourBitWeight:
    """A packed 4-bit weight as plain tensors: what the ops and kernels take."""

    packed: Tensor  # uint8 codes, two per byte (high nibble first)
    absmax: Tensor  # float32, one per block
    code: Tensor  # float32, 16 entries
    blocksize: int
    shape: tuple[int, int]  # (out_features, in_features)
    dtype: torch.dtype  # dtype of the original weight
    quant_type: str

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize_4bit(self.packed, self.absmax, self.code, self.blocksize, self.shape, dtype or self.dtype)

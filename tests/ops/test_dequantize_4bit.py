"""4-bit dequantization: the PyTorch reference equals bitsandbytes bit for bit, the Triton kernel equals
the reference bit for bit (under the interpreter), and so does the tile loader the fused kernels use."""
from __future__ import annotations

import pytest
import torch
from helpers import backend

from fastft.ops.dequantize_4bit import FourBitWeight, dequantize_4bit_reference, unnest_absmax

bnb_functional = pytest.importorskip("bitsandbytes.functional")
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
kernels = pytest.importorskip("fastft.kernels.dequantize_4bit")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def quantized(shape, quant_type, nested, blocksize=64, seed=0):
    """(bitsandbytes' packed codes and state, the op's FourBitWeight) for a random ``shape`` weight."""
    W = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    packed, state = bnb_functional.quantize_4bit(W, blocksize=blocksize, compress_statistics=nested,
                                                 quant_type=quant_type)
    absmax = state.absmax
    if nested:
        absmax = unnest_absmax(absmax, state.state2.code, state.state2.absmax, state.state2.blocksize, state.offset)
    weight = FourBitWeight(packed.reshape(-1), absmax.float(), state.code.float(), blocksize, shape, W.dtype,
                           quant_type)
    return packed, state, weight


def reference(w: FourBitWeight, dtype):
    return dequantize_4bit_reference(w.packed, w.absmax, w.code, w.blocksize, w.shape, dtype)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_reference_equals_bitsandbytes(quant_type, nested):
    for shape, blocksize in [((45, 71), 64), ((6, 50), 128), ((3, 5), 64)]:  # odd totals, a partial last block
        packed, state, weight = quantized(shape, quant_type, nested, blocksize)
        for dtype in DTYPES:
            state.dtype = dtype  # bitsandbytes dequantizes to the state's dtype
            expected = bnb_functional.dequantize_4bit(packed, state)
            got = reference(weight, dtype)
            assert got.dtype == dtype and torch.equal(got, expected), (shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type,nested,shape,blocksize", [
    ("nf4", True, (45, 71), 64),   # 3195 elements: odd, spans several kernel blocks, last one partial
    ("fp4", False, (33, 64), 128),
])
def test_triton_kernel_equals_reference(quant_type, nested, shape, blocksize, dtype):
    _, _, weight = quantized(shape, quant_type, nested, blocksize)
    got = kernels.dequantize_4bit(weight.packed, weight.absmax, weight.code, blocksize, shape, dtype)
    assert got.dtype == dtype and torch.equal(got, reference(weight, dtype))


def test_op_dispatches_to_the_triton_kernel():
    _, _, weight = quantized((45, 71), "nf4", True)
    with backend("triton"):
        got = weight.dequantize(torch.bfloat16)
    assert torch.equal(got, reference(weight, torch.bfloat16))


@triton.jit
def _tile_probe(packed_ptr, absmax_ptr, code_ptr, out_ptr, row0, col0, n_rows, n_cols,
                TRANSPOSED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCKSIZE: tl.constexpr):
    rows = row0 + tl.arange(0, BLOCK_R)
    cols = col0 + tl.arange(0, BLOCK_C)
    if TRANSPOSED:  # the (cols × rows) tile of Wᵀ, read at transposed indices
        tile = kernels.load_dequantized_tile(packed_ptr, absmax_ptr, code_ptr, rows[None, :], cols[:, None],
                                             n_rows, n_cols, BLOCKSIZE)
        tl.store(out_ptr + tl.arange(0, BLOCK_C)[:, None] * BLOCK_R + tl.arange(0, BLOCK_R)[None, :], tile)
    else:
        tile = kernels.load_dequantized_tile(packed_ptr, absmax_ptr, code_ptr, rows[:, None], cols[None, :],
                                             n_rows, n_cols, BLOCKSIZE)
        tl.store(out_ptr + tl.arange(0, BLOCK_R)[:, None] * BLOCK_C + tl.arange(0, BLOCK_C)[None, :], tile)


@pytest.mark.parametrize("transposed", [False, True], ids=["tile", "transposed-tile"])
def test_tile_loader_reads_w_and_pads_with_zeros(transposed):
    shape = (45, 71)
    _, _, weight = quantized(shape, "fp4", True)
    dense = reference(weight, torch.float32)
    padded = torch.zeros(48, 96)
    padded[:45, :71] = dense
    row0, col0 = 32, 64  # the tile overhangs both the last row and the last column
    out = torch.empty((32, 16) if transposed else (16, 32))
    _tile_probe[(1,)](weight.packed, weight.absmax, weight.code, out, row0, col0, 45, 71,
                      TRANSPOSED=transposed, BLOCK_R=16, BLOCK_C=32, BLOCKSIZE=64)
    expected = padded[row0:row0 + 16, col0:col0 + 32]
    assert torch.equal(out, expected.t() if transposed else expected)


@pytest.mark.parametrize("shape,blocksize", [((12, 16), 64), ((7, 9), 64), ((5, 3), 2)],
                         ids=["whole-blocks", "partial-block", "odd-count"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_equals_the_formula_nibble_by_nibble(shape, blocksize, dtype):
    """The reference's byte-table gather and in-place block scaling give w_i = code[c_i]·absmax[i // blocksize]
    exactly, whether or not the last block is whole."""
    gen = torch.Generator().manual_seed(1)
    n = shape[0] * shape[1]
    packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, generator=gen)
    absmax = torch.rand((n + blocksize - 1) // blocksize, generator=gen) + 0.1
    code = torch.randn(16, generator=gen)
    codes = [c for byte in packed.tolist() for c in (byte >> 4, byte & 0xF)][:n]
    expected = torch.stack([code[c] * absmax[i // blocksize] for i, c in enumerate(codes)]).reshape(shape).to(dtype)
    assert torch.equal(dequantize_4bit_reference(packed, absmax, code, blocksize, shape, dtype), expected)

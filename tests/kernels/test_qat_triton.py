"""The Triton Hadamard and fake-quantization kernels against the PyTorch reference ops, under the interpreter.

Transforms are compared at the input dtype with the shared tolerance table (the kernels sum in another
order). Quantized outputs and masks are compared bit for bit on integer-valued inputs: every sum in the
rotation is then exact in any order, so the kernels and the reference see the same rotated values and
must produce the same codes, scales and outputs. Row counts are odd and the sizes cover every kernel
path: pure butterflies (K = 1), the dense factor with tl.dot (M >= 16) and with the broadcast product
(M < 16), several output chunks (K = 172), a Sylvester split of a long power of two (65536), wide rows
quantized in chunks.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from helpers import TOLERANCES, assert_close, backend

from fastft.ops import fake_quantize, hadamard_transform
from fastft.ops.fake_quantize import fake_quantize_backward_reference, fake_quantize_reference
from fastft.ops.hadamard import hadamard_transform_reference

kernels_h = pytest.importorskip("fastft.kernels.hadamard")
kernels_q = pytest.importorskip("fastft.kernels.fake_quantize")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def integer_rows(rows: int, d: int, seed: int, outlier: float = 48.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-8, 9, (rows, d), generator=g).double()
    x[:, d // 3] = outlier  # an outlier channel
    x[0] = x[0].abs()  # a row with min 0
    return x


@pytest.mark.parametrize("d", [16, 128, 1024, 12, 48, 80, 96, 320, 896, 172])
@pytest.mark.parametrize("dtype", DTYPES)
def test_hadamard_kernel_matches_reference(d, dtype):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(5, d, generator=g).to(dtype)
    for inverse in (False, True):
        got = kernels_h.hadamard_transform(x, inverse)
        want = hadamard_transform_reference(x, inverse)
        assert got.dtype == dtype
        assert_close(got, want, dtype, msg=f"d={d} inverse={inverse}")


@pytest.mark.parametrize("d", [11008, 14336, 65536])
def test_hadamard_kernel_large_sizes(d):
    x = torch.randn(1, d, generator=torch.Generator().manual_seed(0))
    assert_close(kernels_h.hadamard_transform(x, False), hadamard_transform_reference(x, False))
    assert_close(kernels_h.hadamard_transform(x, True), hadamard_transform_reference(x, True))


def test_kernel_layout():
    assert kernels_h.kernel_layout(1024) == (1, 0, 1024)
    assert kernels_h.kernel_layout(14336) == (28, 0, 512)
    assert kernels_h.kernel_layout(11008) == (172, 0, 64)
    K, a, M = kernels_h.kernel_layout(65536)
    assert K == 1 and (1 << a) * M == 65536 and a >= 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_hadamard_op_on_triton_backend_with_gradient(dtype):
    x = torch.randn(3, 4, 48, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_(True)
    grad = torch.randn(3, 4, 48, generator=torch.Generator().manual_seed(2)).to(dtype)
    with backend("triton"):
        y = hadamard_transform(x)
        (dx,) = torch.autograd.grad(y, x, grad)
    assert_close(y.detach(), hadamard_transform_reference(x.detach()), dtype)
    assert_close(dx, hadamard_transform_reference(grad, inverse=True), dtype)


CASES = list(itertools.product(("token", "group", "tensor"), (False, True), (False, True)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 48, 320])
def test_fake_quantize_kernel_is_the_reference_bit_for_bit(dtype, d):
    x = integer_rows(5, d, seed=d).to(dtype)
    for (granularity, symmetric, rotate), (bits, clip) in itertools.product(CASES, ((3, 0.9), (8, 1.0))):
        args = (x, bits, granularity, 16, symmetric, clip, rotate, True)
        out, mask = kernels_q.fake_quantize(*args)
        want, want_mask = fake_quantize_reference(*args)
        name = f"{dtype} d={d} {granularity} sym={symmetric} rotate={rotate} bits={bits} clip={clip}"
        assert out.dtype == dtype and mask.dtype == torch.bool, name
        assert torch.equal(out, want), name
        assert torch.equal(mask, want_mask), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rotate_quantize_over_several_chunks(dtype):
    """K = 172 (three output chunks): max/min in a first sweep, quantization in the second."""
    x = integer_rows(3, 172, seed=3).to(dtype)
    for symmetric, bits in ((False, 4), (True, 8)):
        args = (x, bits, "token", 128, symmetric, 0.95, True, True)
        out, mask = kernels_q.fake_quantize(*args)
        want, want_mask = fake_quantize_reference(*args)
        assert torch.equal(out, want) and torch.equal(mask, want_mask)


def test_wide_rows_are_quantized_in_chunks():
    x = integer_rows(3, 9000, seed=4)  # 9000 > the 8192-element tile: two sweeps over two chunks
    for granularity in ("token", "tensor"):
        args = (x.float(), 4, granularity, 128, False, 1.0, False, True)
        out, mask = kernels_q.fake_quantize(*args)
        want, want_mask = fake_quantize_reference(*args)
        assert torch.equal(out, want) and torch.equal(mask, want_mask), granularity


def test_random_inputs_close_to_reference():
    """Non-integer input: the rotation's rounding may move a value across a rounding tie; elsewhere equal."""
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(5))
    out, _ = kernels_q.fake_quantize(x, 4, "token", 128, False, 1.0, True, False)
    want, _ = fake_quantize_reference(x, 4, "token", 128, False, 1.0, True, False)
    step = (want.amax(-1, keepdim=True) - want.amin(-1, keepdim=True)) / 15
    # the kernel's scale may sit an ulp from the reference's: outputs equal at the float32 tolerance, except
    # where they are neighbouring grid points and the exactly rotated input sat at the tie between them (its
    # float32 rotation, summed in another order, may land on either side)
    differ = ~torch.isclose(out, want, **TOLERANCES[torch.float32])
    exact = hadamard_transform_reference(x.double())
    one_step = ((out - want).abs().double() - step.double()).abs() <= 1e-4 * step.double()
    at_tie = (exact - (out.double() + want.double()) / 2).abs() <= 1e-4 * step.double()
    assert (one_step & at_tie)[differ].all(), f"{int(differ.sum())} outputs differ, not all at a rounding tie"
    out, _ = kernels_q.fake_quantize(x, 4, "group", 32, True, 0.9, False, False)
    assert torch.equal(out, fake_quantize_reference(x, 4, "group", 32, True, 0.9, False, False)[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_ste_backward_kernel(dtype):
    g = torch.Generator().manual_seed(6)
    grad = torch.randn(5, 48, generator=g).to(dtype)
    mask = torch.rand(5, 48, generator=g) > 0.2
    empty = torch.empty(0, dtype=torch.bool)
    for m, rotate in itertools.product((mask, empty), (False, True)):
        got = kernels_q.fake_quantize_backward(grad, m, rotate)
        want = fake_quantize_backward_reference(grad, m, rotate)
        assert got.dtype == dtype
        if rotate:
            assert_close(got, want, dtype)
        else:
            assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fake_quantize_op_on_triton_backend(dtype):
    x = integer_rows(5, 80, seed=7).to(dtype).reshape(5, 1, 80).requires_grad_(True)
    grad = torch.randn(5, 1, 80, generator=torch.Generator().manual_seed(8)).to(dtype)
    results = {}
    for name in ("torch", "triton"):
        with backend(name):
            out = fake_quantize(x, 4, "token", ste="clipped", rotate=True, clip_ratio=0.8)
            (dx,) = torch.autograd.grad(out, x, grad)
        results[name] = (out.detach(), dx)
    assert torch.equal(results["triton"][0], results["torch"][0])
    assert_close(results["triton"][1], results["torch"][1], dtype)
    assert (results["torch"][0] != 0).any()


def test_all_zero_rows_are_zero():
    x = torch.zeros(3, 64)
    for granularity, rotate in itertools.product(("token", "group", "tensor"), (False, True)):
        out, mask = kernels_q.fake_quantize(x, 4, granularity, 16, False, 1.0, rotate, True)
        assert torch.equal(out, x) and mask.all()

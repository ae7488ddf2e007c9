"""Fake quantization's PyTorch reference against the formula written out here, over every combination.

The formula (``formula`` below) is evaluated group by group with plain tensor code, in float64 for
float64 input (compared with the shared tolerance table) and, for lower-precision input, in float32 with
the same order of operations (compared bit for bit: the codes are integers, so a different rounding
would show up as a whole quantization step). Gradients: the straight-through estimator written as plain
autograd (``x + (fq(x) - x).detach()``, with a ``where`` for the clipped variant).
"""
from __future__ import annotations

import itertools

import pytest
import torch
from helpers import assert_close, backend

from fastft.ops import dequantize, fake_quantize, hadamard_matrix, hadamard_transform, quantize
from fastft.ops.fake_quantize import SCALE_EPS, fake_quantize_reference
from fastft.ops.hadamard import hadamard_transform_reference

ROWS, D, GROUP = 6, 48, 16


def formula(x: torch.Tensor, bits, granularity, group_size, symmetric, clip_ratio, ct):
    """(out, kept) of the module docstring, one group at a time, in compute dtype ``ct``."""
    xc = x.to(ct)
    flat = xc.reshape(-1, x.shape[-1])
    if granularity == "tensor":
        groups = [flat.reshape(-1)]
    elif granularity == "group":
        groups = [row[s:s + group_size] for row in flat for s in range(0, x.shape[-1], group_size)]
    else:
        groups = list(flat)
    c = torch.tensor(clip_ratio, dtype=ct)
    outs, keeps = [], []
    for v in groups:
        if symmetric:
            qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
            scale = torch.maximum(v.abs().max() * c / qmax, torch.tensor(SCALE_EPS, dtype=ct))
            zero = torch.zeros((), dtype=ct)
        else:
            qmin, qmax = 0, 2**bits - 1
            hi = torch.maximum(v.max(), torch.zeros((), dtype=ct)) * c
            lo = torch.minimum(v.min(), torch.zeros((), dtype=ct)) * c
            scale = torch.maximum((hi - lo) / qmax, torch.tensor(SCALE_EPS, dtype=ct))
            zero = torch.round(-lo / scale)
        raw = torch.round(v / scale) + zero
        q = raw.clamp(qmin, qmax)
        outs.append((q - zero) * scale)
        keeps.append((raw >= qmin) & (raw <= qmax))
    return torch.cat(outs).reshape(x.shape).to(x.dtype), torch.cat(keeps).reshape(x.shape)


def ste_formula(x, bits, granularity, group_size, symmetric, clip_ratio, ste, rotate, ct):
    """Differentiable STE of the formula; rotation by the dense float64 matrix (float64) or the reference."""
    dtype = x.dtype
    if rotate:
        if x.dtype == torch.float64:
            x = x @ hadamard_matrix(x.shape[-1], torch.float64).t()
        else:
            with backend("torch"):  # the op (differentiable), bit for bit the reference
                x = hadamard_transform(x.to(ct))
    out, kept = formula(x.detach().to(ct), bits, granularity, group_size, symmetric, clip_ratio, ct)
    through = torch.where(kept, x, x.detach()) if ste == "clipped" else x
    return (through + (out.to(x.dtype) - through).detach()).to(dtype), out


def make(dtype, seed, lead=(ROWS,), d=D, outliers=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d, generator=g, dtype=torch.float64)
    if outliers:
        x[..., 3] *= 8.0  # an outlier channel: makes clipping and rotation matter
    x.view(-1, d)[0] = x.view(-1, d)[0].abs()  # a row with lo = 0 (asymmetric zero point 0)
    x.view(-1, d)[1] = -x.view(-1, d)[1].abs()  # a row with hi = 0
    grad = torch.randn(*lead, d, generator=g, dtype=torch.float64)
    return x.to(dtype), grad.to(dtype)


GRANULARITIES = ["token", "channel", "group", "tensor"]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_float64_matches_formula_every_combination(bits, granularity):
    x, grad = make(torch.float64, seed=bits)
    clamped_somewhere = False
    for symmetric, clip_ratio, ste, rotate in itertools.product((False, True), (1.0, 0.5), ("identity", "clipped"),
                                                                (False, True)):
        args = (bits, granularity, GROUP, symmetric, clip_ratio)
        name = f"bits={bits} {granularity} sym={symmetric} clip={clip_ratio} ste={ste} rotate={rotate}"
        xa = x.clone().requires_grad_(True)
        with backend("torch"):
            out = fake_quantize(xa, *args, ste=ste, rotate=rotate)
        (dx,) = torch.autograd.grad(out, xa, grad)
        xb = x.clone().requires_grad_(True)
        want, _ = ste_formula(xb, *args, ste, rotate, torch.float64)
        (want_dx,) = torch.autograd.grad(want, xb, grad)
        assert out.dtype == torch.float64
        assert_close(out, want.detach(), msg=name)
        assert_close(dx, want_dx, msg=name)
        if ste == "clipped" and not rotate:
            clamped_somewhere |= bool((dx == 0).any())
    assert clamped_somewhere  # the clipped STE was exercised where it zeroes gradients


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_low_precision_is_the_float32_formula_bit_for_bit(dtype, granularity):
    x, grad = make(dtype, seed=7)
    for bits, symmetric, clip_ratio, rotate in itertools.product((2, 4, 8), (False, True), (1.0, 0.9), (False, True)):
        args = (bits, granularity, GROUP, symmetric, clip_ratio)
        xa = x.clone().requires_grad_(True)
        with backend("torch"):
            out = fake_quantize(xa, *args, ste="clipped", rotate=rotate)
        (dx,) = torch.autograd.grad(out, xa, grad)
        xb = x.clone().requires_grad_(True)
        want, _ = ste_formula(xb, *args, "clipped", rotate, torch.float32)
        (want_dx,) = torch.autograd.grad(want, xb, grad)
        assert out.dtype == dtype and dx.dtype == dtype
        name = f"{dtype} bits={bits} sym={symmetric} clip={clip_ratio} rotate={rotate}"
        assert torch.equal(out, want.detach()), name
        if rotate:  # the gradient is rotated back in float32, then rounded once
            assert_close(dx, want_dx, msg=name)
        else:
            assert torch.equal(dx, want_dx), name


def test_clipped_ste_masks_exactly_the_clamped_elements():
    x = torch.tensor([[-4.0, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0, 8.0]], dtype=torch.float64, requires_grad=True)
    with backend("torch"):
        out = fake_quantize(x, 4, symmetric=True, clip_ratio=0.5, ste="clipped")
    out.sum().backward()
    # scale = 8 · 0.5 / 7; codes round(x / scale) in [-8, 7]: -4 -> -7 kept, 3 -> 5.25 -> 5 kept, 8 -> 14 clamped
    scale = 4.0 / 7
    want_codes = torch.tensor([-7, -2, 0, 1, 2, 4, 5, 7], dtype=torch.float64)
    assert_close(out.detach()[0], want_codes * scale)
    assert x.grad.tolist() == [[1, 1, 1, 1, 1, 1, 1, 0]]


def test_all_zero_groups_are_finite_zeros_with_finite_gradients():
    x = torch.zeros(3, 32, requires_grad=True)
    for granularity, symmetric, ste in itertools.product(GRANULARITIES, (False, True), ("identity", "clipped")):
        with backend("torch"):
            out = fake_quantize(x, 4, granularity, 8, symmetric, ste=ste)
        (dx,) = torch.autograd.grad(out.sum(), x)
        assert torch.equal(out, torch.zeros_like(out)) and torch.isfinite(dx).all()
        codes, scale, zero = quantize(x, 4, granularity, 8, symmetric)
        assert torch.equal(scale, torch.full_like(scale, SCALE_EPS)) and not codes.any() and not zero.any()
    # a group of zeros beside a normal one keeps the normal one's quantization
    y = torch.cat([torch.zeros(1, 8), torch.linspace(-1, 1, 8)[None]], dim=1)
    with backend("torch"):
        out = fake_quantize(y, 8, "group", 8)
    assert torch.equal(out[:, :8], torch.zeros(1, 8)) and (out[:, 8:] - y[:, 8:]).abs().max() < 1 / 255


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_dequantize_roundtrip(dtype, granularity, symmetric):
    x, _ = make(dtype, seed=11, lead=(2, 3))
    for bits, rotate in itertools.product((3, 8), (False, True)):
        codes, scale, zero = quantize(x, bits, granularity, GROUP, symmetric, 0.9, rotate=rotate)
        assert codes.shape == x.shape and codes.dtype == (torch.int8 if symmetric else torch.uint8)
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
        assert codes.min() >= lo and codes.max() <= hi
        groups = {"group": D // GROUP, "tensor": 1}.get(granularity, 1)
        want_shape = (1, 1, 1) if granularity == "tensor" else (2, 3, groups)
        assert scale.shape == want_shape and zero.shape == want_shape
        assert scale.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        if symmetric:
            assert not zero.any()
        with backend("torch"):
            fq = fake_quantize(x, bits, granularity, GROUP, symmetric, 0.9, rotate=rotate)
        assert torch.equal(dequantize(codes, scale, zero, dtype), fq)


def test_channel_is_token():
    x, _ = make(torch.float32, seed=5)
    with backend("torch"):
        assert torch.equal(fake_quantize(x, 4, "channel"), fake_quantize(x, 4, "token"))


def test_only_the_mask_is_saved_and_only_for_clipped():
    x = torch.randn(4, 32, requires_grad=True)
    for ste, rotate, want in (("identity", False, []), ("identity", True, []), ("clipped", True, [(torch.bool, (4, 32))])):
        saved = []
        with backend("torch"), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            fake_quantize(x, 4, ste=ste, rotate=rotate)
        assert [(t.dtype, tuple(t.shape)) for t in saved] == want


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=1), "bits=1"), (dict(bits=9), "bits=9"), (dict(bits=4.0), "bits=4.0"),
        (dict(bits=4, granularity="row"), "granularity='row'"),
        (dict(bits=4, granularity="group", group_size=7), "group_size=7 does not divide the last dimension 48"),
        (dict(bits=4, granularity="group", group_size=0), "group_size=0"),
        (dict(bits=4, clip_ratio=0.0), "clip_ratio=0.0"), (dict(bits=4, clip_ratio=1.5), "clip_ratio=1.5"),
        (dict(bits=4, ste="none"), "ste='none'"),
        (dict(bits=4, symmetric=1), "symmetric=1"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, match):
    x = torch.randn(2, D)
    with pytest.raises(ValueError, match=match):
        fake_quantize(x, **kwargs)
    if "ste" not in kwargs:  # quantize has no gradient, hence no ste argument
        with pytest.raises(ValueError, match=match):
            quantize(x, **kwargs)


def test_rotation_of_an_unsupported_size_is_a_clear_error():
    with pytest.raises(ValueError, match="d=30"):
        fake_quantize(torch.randn(2, 30), 4, rotate=True)
    with pytest.raises(TypeError, match="int32"):
        fake_quantize(torch.zeros(2, 8, dtype=torch.int32), 4)


def test_rotation_removes_an_outlier_channel():
    """The reason for the rotation: per-token 4-bit error with an outlier channel, before and after."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g)
    x[:, 7] *= 50.0
    with backend("torch"):
        plain = (fake_quantize(x, 4) - x).pow(2).mean()
        rotated = fake_quantize(x, 4, rotate=True)
        back = hadamard_transform_reference(rotated, inverse=True)
    assert (back - x).pow(2).mean() < 0.2 * plain


def test_reference_and_custom_op_agree_and_opcheck():
    from fastft.ops.fake_quantize import _fake_quantize_backward_op, _fake_quantize_op

    x = torch.randn(3, 32, dtype=torch.float64)
    with backend("torch"):
        out = fake_quantize(x, 4, "group", 16, ste="clipped", rotate=True)
    assert torch.equal(out, fake_quantize_reference(x, 4, "group", 16, False, 1.0, True, True)[0])
    xr = x.clone().requires_grad_(True)
    torch.library.opcheck(_fake_quantize_op, (xr, 4, "group", 16, False, 0.9, True, True))
    torch.library.opcheck(_fake_quantize_op, (xr, 3, "token", 128, True, 1.0, False, False))
    mask = torch.rand(3, 32) > 0.3
    torch.library.opcheck(_fake_quantize_backward_op, (torch.randn(3, 32), mask, True))

"""The Triton DoRA kernels (fastft.kernels.dora) against the PyTorch reference ops, under the interpreter.

Same conventions as tests/kernels/test_lora_triton.py: same-dtype comparisons with the shared tolerance table,
shapes off every block size (tokens 37, in 70, out 45; rank 20 spans two rank blocks), powers-of-two
scales and a low-rank term smaller than the base term in 16-bit cases (so the reference's extra
roundings stay at the output's own precision). g lies in [0.5, 1.5]; in 16-bit cases it is a power of two
(1/2, 1, 2), since the reference rounds g ⊙ gy where the kernels round g ⊙ B or scale in float32.
"""
from __future__ import annotations

import pytest
import torch
from helpers import assert_close, backend, interpreter_splits, spy_on

import fastft
from fastft.ops.dequantize_4bit import dequantize_4bit
from fastft.ops.dora import (
    NORM_EPS, dora_backward_reference, dora_forward_reference, dora_row_norm_backward_reference,
    dora_row_norm_reference,
)
from test_lora_triton import IN, OUT, TOKENS, quantize

dora_kernels = pytest.importorskip("fastft.kernels.dora")


def make_case(dtype, quant=None, bias=True, dropout=False, rank=5, out=OUT, in_features=IN, scale=None,
              keep_pre_scale=False, zero_g=(), seed=0):
    """Positional arguments of dora_forward, and an upstream gradient; quant = (quant_type, nested) or None."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    if scale is None:
        scale = 0.5 if dtype in (torch.float16, torch.bfloat16) else 0.7
    x = randn(TOKENS, in_features)
    W = randn(out, in_features, std=in_features ** -0.5)
    A = randn(rank, in_features, std=in_features ** -0.5)
    B = randn(out, rank, std=0.3 * rank ** -0.5)
    b = randn(out, std=0.5) if bias else None
    norm_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if dtype in (torch.float16, torch.bfloat16):  # powers of two: g ⊙ gy and g ⊙ B round alike (exactly)
        g = (2.0 ** torch.randint(-1, 2, (out,), generator=gen)).to(norm_dtype)
    else:
        g = (0.5 + torch.rand(out, generator=gen)).to(norm_dtype)
    g[list(zero_g)] = 0.0
    p = 0.5 if dropout else 0.0
    mask = (torch.rand(TOKENS, in_features, generator=gen) >= p) if dropout else None
    if quant is None:
        weight, absmax, code, blocksize = W, None, None, 0
    else:
        fb = quantize(W.float() if dtype == torch.float64 else W, *quant)
        weight, absmax, code, blocksize = fb.packed, fb.absmax, fb.code, fb.blocksize
    grad = randn(TOKENS, out)
    return (x, weight, absmax, code, blocksize, out, b, A, B, g, scale, mask, p, keep_pre_scale), grad


CASES = {
    "fp32-dense-bias": dict(dtype=torch.float32),
    "fp32-dense-keep-z-r20": dict(dtype=torch.float32, bias=False, rank=20, keep_pre_scale=True),
    "fp32-dense-dropout": dict(dtype=torch.float32, dropout=True),
    "fp16-dense-bias-r16": dict(dtype=torch.float16, rank=16),
    "fp16-dense-dropout-keep-z": dict(dtype=torch.float16, dropout=True, bias=False),
    "fp32-nf4-nested-bias": dict(dtype=torch.float32, quant=("nf4", True)),
    "fp16-fp4-plain-keep-z-r16": dict(dtype=torch.float16, quant=("fp4", False), bias=False, rank=16,
                                      keep_pre_scale=True),
    "fp32-fp4-nested-dropout-odd-total": dict(dtype=torch.float32, quant=("fp4", True), dropout=True,
                                              in_features=IN + 1),
    "fp64-dense-bias": dict(dtype=torch.float64),
    "fp64-nf4-nested-dropout": dict(dtype=torch.float64, quant=("nf4", True), dropout=True),
}


def widened(args, g_index):
    """``args`` with 16-bit tensors (and g, at ``g_index``) in float64: the reference then computes exactly."""
    wide = [t.double() if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16) else t
            for t in args]
    wide[g_index] = wide[g_index].double()
    return wide


def sums_of_gemms_rounded_apart(case):
    """With dropout in 16 bits, y, z and dx each sum two GEMMs (or a GEMM and a scaled z); a reference run
    rounds the parts separately, the kernels partly together, and the two can sit 2 ulps apart: those are
    compared with the exact value instead. The rest round at the same points (g a power of two)."""
    return case["dtype"] in (torch.float16, torch.bfloat16) and case.get("dropout", False)


@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_reference(name):
    args, _ = make_case(**CASES[name])
    got, expected = dora_kernels.dora_forward(*args), list(dora_forward_reference(*args))
    if sums_of_gemms_rounded_apart(CASES[name]):
        exact = dora_forward_reference(*widened(args, 9))
        expected[0], expected[2] = exact[0].to(expected[0].dtype), exact[2].to(expected[2].dtype)
    for t, ref, what in zip(got, expected, ("y", "xa", "z")):
        assert t.shape == ref.shape and t.dtype == ref.dtype, what
        assert_close(t, ref, msg=what)


def backward_args(forward_args, grad, need=(True, True, True, True)):
    x, weight, absmax, code, blocksize, _, bias, A, B, g, scale, mask, p, keep_pre_scale = forward_args
    y, xa, z = dora_forward_reference(*forward_args)
    saved_is_output = mask is None and not keep_pre_scale
    saved = y if saved_is_output else z
    return (grad, x, xa, saved, saved_is_output, weight, absmax, code, blocksize, x.shape[1], bias, A, B, g, scale,
            mask, p, *need)


@pytest.mark.parametrize("name", list(CASES))
def test_backward_matches_reference(name):
    args, grad = make_case(**CASES[name])
    bargs = backward_args(args, grad)
    dtype = CASES[name]["dtype"]
    got = dora_kernels.dora_backward(*bargs)
    expected = list(dora_backward_reference(*bargs))
    if sums_of_gemms_rounded_apart(CASES[name]):
        expected[0] = dora_backward_reference(*widened(bargs, 13))[0].to(dtype)
    for t, ref, what in zip(got, expected, "dx dA dB dg".split()):
        assert t.shape == ref.shape and t.dtype == ref.dtype, what
        assert_close(t, ref, msg=what)  # the tolerance of each output's own dtype: dg is float32 in every case


@pytest.mark.parametrize("name", ["fp32-dense-bias", "fp32-dense-dropout", "fp16-dense-bias-r16", "fp32-nf4-nested-bias"])
def test_backward_with_split_reductions_matches_reference(name, monkeypatch):
    """The GPU's split paths under the interpreter: dg summed over token splits (``pre_scale_dot``) and the
    dA/dB reductions split over the tokens (split-K), each split a float32 partial summed afterwards."""
    args, grad = make_case(**CASES[name])
    bargs = backward_args(args, grad)
    dots = spy_on(monkeypatch, dora_kernels, "_pre_scale_dot_kernel")
    from fastft.kernels import lora as lora_kernels

    matmuls = spy_on(monkeypatch, lora_kernels, "_matmul_kernel")
    with interpreter_splits(3):
        got = dora_kernels.dora_backward(*bargs)
    assert dots.grids and dots.grids[-1][1] > 1, "dg was not reduced over several token splits"
    assert matmuls.grids and max(grid[1] for grid in matmuls.grids) > 1, "no split-K reduction ran"
    expected = list(dora_backward_reference(*bargs))
    if sums_of_gemms_rounded_apart(CASES[name]):
        expected[0] = dora_backward_reference(*widened(bargs, 13))[0].to(CASES[name]["dtype"])
    for t, ref, what in zip(got, expected, "dx dA dB dg".split()):
        assert t.shape == ref.shape and t.dtype == ref.dtype, what
        assert_close(t, ref, msg=what)


@pytest.mark.parametrize("quant", [None, ("nf4", True)], ids=["dense", "nf4"])
def test_zero_g_columns_are_recomputed_inside_the_kernel(quant):
    """g = 0 in columns 0, 33 and 44 (two column blocks): dg there comes from x, W, xa and B, not from y."""
    args, grad = make_case(torch.float32, quant=quant, zero_g=(0, 33, 44))
    bargs = backward_args(args, grad)
    assert bargs[4]  # recovered from the output y
    got, expected = dora_kernels.dora_backward(*bargs), dora_backward_reference(*bargs)
    for t, ref, what in zip(got, expected, "dx dA dB dg".split()):
        assert_close(t, ref, msg=what)
    z = dora_forward_reference(*args[:-1], True)[2]
    assert_close(got[3], (grad * z).sum(0), msg="dg against the pre-scale output itself")
    assert got[3][[0, 33, 44]].abs().min() > 0


@pytest.mark.parametrize("need", [(True, False, False, False), (False, True, False, False),
                                  (False, False, True, False), (False, False, False, True)],
                         ids=["dx", "dA", "dB", "dg"])
def test_backward_computes_only_what_is_needed(need):
    args, grad = make_case(torch.float32)
    bargs = backward_args(args, grad, need)
    for t, ref, needed, what in zip(dora_kernels.dora_backward(*bargs), dora_backward_reference(*bargs), need,
                                    "dx dA dB dg".split()):
        if needed:
            assert_close(t, ref, msg=what)
        else:
            assert t.numel() == 0, what


NORM_CASES = {
    "fp32-dense": dict(dtype=torch.float32),
    "fp32-dense-r20": dict(dtype=torch.float32, rank=20),
    "fp16-nf4-nested": dict(dtype=torch.float16, quant=("nf4", True)),
    "fp32-fp4-plain": dict(dtype=torch.float32, quant=("fp4", False), rank=20),
    "fp64-dense": dict(dtype=torch.float64),
}


def norm_args(dtype, quant=None, rank=5):
    args, _ = make_case(dtype, quant=quant, rank=rank)
    x, weight, absmax, code, blocksize, out, _, A, B, *_ = args
    sq_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    dense = weight if quant is None else dequantize_4bit(weight, absmax, code, blocksize, (out, A.shape[1]),
                                                         torch.float32)
    sq = (dense.to(sq_dtype) ** 2).sum(1)
    sq[3] = 0.0  # as for an all-zero row (with B's row zeroed below): the norm is eps there
    B = B.clone()
    B[3] = 0.0
    return (weight, absmax, code, blocksize, out, A, B, sq, 0.75, NORM_EPS)


@pytest.mark.parametrize("name", list(NORM_CASES))
def test_row_norm_matches_reference(name):
    args = norm_args(**NORM_CASES[name])
    (norm, proj), (norm_ref, proj_ref) = dora_kernels.dora_row_norm(*args), dora_row_norm_reference(*args)
    assert norm.dtype == norm_ref.dtype and proj.dtype == proj_ref.dtype
    # P and n are float32 (float64): compared at their own dtype's tolerance with the formula evaluated in
    # float64 (the reference itself rounds P to a 16-bit input dtype before forming n)
    weight, absmax, code, blocksize, out, A, B, sq, scale, eps = args
    dense = weight if absmax is None else dequantize_4bit(weight, absmax, code, blocksize, (out, A.shape[1]), A.dtype)
    exact_norm, exact_proj = dora_row_norm_reference(dense.double(), None, None, 0, out, A.double(), B.double(),
                                                     sq.double(), scale, eps)
    assert_close(proj, exact_proj.to(proj.dtype), msg="P")
    assert_close(norm, exact_norm.to(norm.dtype), msg="n")
    assert_close(norm, norm_ref, msg="n against the reference")
    assert norm[3] == NORM_EPS


@pytest.mark.parametrize("name", list(NORM_CASES))
def test_row_norm_backward_matches_reference(name):
    args = norm_args(**NORM_CASES[name])
    weight, absmax, code, blocksize, out, A, B, sq, scale, eps = args
    norm, proj = dora_row_norm_reference(*args)
    grad = torch.randn(out, generator=torch.Generator().manual_seed(4), dtype=norm.dtype)
    bargs = (grad, norm, proj, weight, absmax, code, blocksize, A, B, scale, eps, True, True)
    for t, ref, what in zip(dora_kernels.dora_row_norm_backward(*bargs), dora_row_norm_backward_reference(*bargs),
                            ("dA", "dB")):
        assert t.shape == ref.shape and t.dtype == ref.dtype, what
        assert_close(t, ref, msg=what)


@pytest.mark.parametrize("detach_norm", [True, False], ids=["detached", "exact"])
@pytest.mark.parametrize("quant", [None, ("nf4", True)], ids=["dense", "nf4"])
def test_dora_layer_triton_equals_torch(quant, detach_norm):
    """DoRALinear end to end (3-D input, bias, dropout in train mode) on both backends."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = torch.nn.Linear(IN, OUT)
    if quant is None:
        base = dense
    else:
        base = bnb.nn.Linear4bit(IN, OUT, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
        base.load_state_dict(dense.state_dict())
        base = base.to("cpu")
    config = fastft.LoRAConfig(r=5, alpha=10, dropout=0.25, dora=True, dora_detach_norm=detach_norm)
    with backend("torch"):
        layer = fastft.nn.LoRALinear.from_linear(base, config)
    torch.nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(4, 9, IN)
    g = torch.randn(4, 9, OUT)
    results = {}
    for name in ("torch", "triton"):
        for mode in ("train", "eval"):
            getattr(layer, mode)()
            leaf = x.clone().requires_grad_(True)
            layer.zero_grad(set_to_none=True)
            torch.manual_seed(3)
            with backend(name):
                y = layer(leaf)
                y.backward(g)
            results[name, mode] = [y.detach(), leaf.grad, layer.lora_A.grad, layer.lora_B.grad,
                                   layer.lora_magnitude_vector.grad]
    for mode in ("train", "eval"):
        for got, ref, what in zip(results["triton", mode], results["torch", mode], "y dx dA dB dm".split()):
            assert_close(got, ref, msg=f"{mode} {what}")

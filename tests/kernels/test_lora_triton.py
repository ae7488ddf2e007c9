"""The Triton LoRA kernels (fastft.kernels.lora) against the PyTorch reference op, under the interpreter.

Every comparison is at the same dtype with the shared tolerance table. Shapes are not multiples of any
block size (tokens 37, in 70, out 45), so every edge mask is exercised; rank 20 spans two rank blocks.

Choice of inputs: in float16/bfloat16 the reference rounds after each PyTorch call (``mm`` then
``mul_(scale)``; ``linear`` then ``addmm_``), the kernels round once. The scales there are powers of two
(the extra rounding is then exact) and the low-rank term is kept smaller than the base term (so the
reference's intermediate rounding is at the output's own precision): the comparison then measures the
kernels, not the reference's extra roundings. float32 and float64 cases use a scale that is not a power
of two (float64 runs accumulate in float64 and must match to float64 precision).
"""
from __future__ import annotations

import pytest
import torch
from helpers import assert_close, backend, interpreter_splits, spy_on

from fastft.ops.dequantize_4bit import FourBitWeight, unnest_absmax
from fastft.ops.lora import lora_backward_reference, lora_forward_reference, lora_linear

lora_kernels = pytest.importorskip("fastft.kernels.lora")
common_kernels = pytest.importorskip("fastft.kernels.common")

TOKENS, IN, OUT = 37, 70, 45


def quantize(W: torch.Tensor, quant_type: str, nested: bool) -> FourBitWeight:
    """bitsandbytes' 4-bit encoding of W as the plain tensors the op takes (nested absmax undone); a test that
    quantizes is skipped without bitsandbytes, the dense tests of this file (and of test_dora_triton) run."""
    bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="install fastft[test]")
    packed, state = bnb_functional.quantize_4bit(W, blocksize=64, compress_statistics=nested, quant_type=quant_type)
    absmax = state.absmax
    if state.nested:
        absmax = unnest_absmax(absmax, state.state2.code, state.state2.absmax, state.state2.blocksize, state.offset)
    return FourBitWeight(packed.reshape(-1), absmax.float(), state.code.float(), 64, tuple(W.shape), W.dtype,
                         quant_type)


def make_case(dtype, quant=None, bias=True, dropout=True, rank=5, out=OUT, in_features=IN, scale=None, seed=0):
    """Positional arguments of lora_forward (and what backward needs); quant = (quant_type, nested) or None."""
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
    p = 0.5 if dropout else 0.0
    mask = (torch.rand(TOKENS, in_features, generator=gen) >= p) if dropout else None
    if quant is None:
        weight, absmax, code, blocksize = W, None, None, 0
    else:
        fb = quantize(W.float() if dtype == torch.float64 else W, *quant)  # bitsandbytes takes ≤ 32 bits
        weight, absmax, code, blocksize = fb.packed, fb.absmax, fb.code, fb.blocksize
    g = randn(TOKENS, out)
    forward_args = (x, weight, absmax, code, blocksize, out, b, A, B, scale, mask, p)
    return forward_args, g


CASES = {
    "fp32-dense-bias": dict(dtype=torch.float32, bias=True, dropout=False),
    "fp32-dense-dropout-r20": dict(dtype=torch.float32, bias=False, dropout=True, rank=20),
    "fp16-dense-bias-dropout-r16": dict(dtype=torch.float16, rank=16),
    "bf16-dense-bias-dropout": dict(dtype=torch.bfloat16),
    "fp32-nf4-nested-dropout": dict(dtype=torch.float32, quant=("nf4", True)),
    "fp16-fp4-plain-r16": dict(dtype=torch.float16, quant=("fp4", False), bias=False, dropout=False, rank=16),
    "bf16-nf4-plain-dropout-r20": dict(dtype=torch.bfloat16, quant=("nf4", False), rank=20),
    "fp32-fp4-nested-odd-total": dict(dtype=torch.float32, quant=("fp4", True), out=OUT, in_features=IN + 1),
    "fp64-dense-bias-dropout": dict(dtype=torch.float64),
    "fp64-nf4-nested-bias": dict(dtype=torch.float64, quant=("nf4", True), dropout=False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_reference(name):
    args, _ = make_case(**CASES[name])
    y, xa = lora_kernels.lora_forward(*args)
    y_ref, xa_ref = lora_forward_reference(*args)
    assert y.dtype == y_ref.dtype and xa.dtype == xa_ref.dtype
    assert_close(xa, xa_ref, msg="xa")
    assert_close(y, y_ref, msg="y")


def backward_args(forward_args, g, need=(True, True, True)):
    x, weight, absmax, code, blocksize, _, _, A, B, scale, mask, p = forward_args
    _, xa = lora_forward_reference(*forward_args)
    return (g, x, xa, weight, absmax, code, blocksize, x.shape[1], A, B, scale, mask, p, *need)


@pytest.mark.parametrize("name", list(CASES))
def test_backward_matches_reference(name):
    args, g = make_case(**CASES[name])
    bargs = backward_args(args, g)
    got, expected = lora_kernels.lora_backward(*bargs), lora_backward_reference(*bargs)
    for grad, ref, what in zip(got, expected, "dx dA dB".split()):
        assert grad.shape == ref.shape and grad.dtype == ref.dtype, what
        assert_close(grad, ref, msg=what)


def widened(args):
    """``args`` with every 16-bit tensor in float64: the reference then evaluates the formula exactly."""
    return [t.double() if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16) else t
            for t in args]


@pytest.mark.parametrize("quant", [None, ("nf4", False)], ids=["dense", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16bit_with_a_scale_that_is_not_a_power_of_two(dtype, quant):
    """s = 0.7 in 16 bits: the kernels round once, so they are compared with the exact value (the reference
    on float64 copies of the same 16-bit inputs) rounded to the output dtype, at that dtype's tolerance."""
    args, g = make_case(dtype, quant=quant, scale=0.7)
    y, xa = lora_kernels.lora_forward(*args)
    y_exact, xa_exact = lora_forward_reference(*widened(args))
    assert_close(xa, xa_exact.to(dtype), msg="xa")
    assert_close(y, y_exact.to(dtype), msg="y")
    bargs = backward_args(args, g)
    exact = list(lora_backward_reference(*widened(bargs)))
    # dA = s·gbᵀ x̃ reads gb = gy B as the 16-bit intermediate the kernels store: exact from that rounded gb
    x, A, B, mask, p = args[0], args[7], args[8], args[10], args[11]
    gb = (g.double() @ B.double()).to(dtype).double()
    dropped = x.double() if mask is None else x.double() * mask / (1.0 - p)
    exact[1] = 0.7 * gb.t() @ dropped
    for grad, ref, what in zip(lora_kernels.lora_backward(*bargs), exact, "dx dA dB".split()):
        assert grad.dtype == dtype, what
        assert_close(grad, ref.to(dtype), msg=what)


@pytest.mark.parametrize("quant", [None, ("nf4", True)], ids=["dense", "nf4"])
@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, True, True)], ids=["dx", "dA", "dB", "dA+dB"])
def test_backward_computes_only_what_is_needed(need, quant):
    args, g = make_case(torch.float32, quant=quant)
    bargs = backward_args(args, g, need)
    got = lora_kernels.lora_backward(*bargs)
    expected = lora_backward_reference(*bargs)
    for grad, ref, needed, what in zip(got, expected, need, "dx dA dB".split()):
        if needed:
            assert_close(grad, ref, msg=what)
        else:
            assert grad.numel() == 0, what


@pytest.mark.parametrize("tokens,in_features,out_features,rank", [(0, 6, 5, 2), (3, 5, 1, 1)], ids=["no-tokens", "tiny"])
def test_degenerate_shapes(tokens, in_features, out_features, rank):
    gen = torch.Generator().manual_seed(0)
    x, W, A, B = (torch.randn(*shape, generator=gen) for shape in
                  [(tokens, in_features), (out_features, in_features), (rank, in_features), (out_features, rank)])
    mask = torch.rand(tokens, in_features, generator=gen) > 0.5
    args = (x, W, None, None, 0, out_features, torch.randn(out_features, generator=gen), A, B, 0.7, mask, 0.5)
    for got, ref in zip(lora_kernels.lora_forward(*args), lora_forward_reference(*args)):
        assert got.shape == ref.shape
        assert_close(got, ref)
    bargs = backward_args(args, torch.randn(tokens, out_features, generator=gen))
    for got, ref in zip(lora_kernels.lora_backward(*bargs), lora_backward_reference(*bargs)):
        assert got.shape == ref.shape
        assert_close(got, ref)

def test_strided_inputs_and_split_reduction(monkeypatch):
    """Non-contiguous x, A, B and W; a split-K reduction; 64-bit offsets (forced by a zero limit)."""
    args, g = make_case(torch.float32, rank=5)
    x, W, _, _, _, out, b, A, B, scale, mask, p = args
    strided = (torch.stack([x, -x], -1)[..., 0], W.t().contiguous().t(), A.t().contiguous().t(), B.t().contiguous().t())
    assert not any(t.is_contiguous() for t in strided)
    xs, Ws, As, Bs = strided
    monkeypatch.setattr(common_kernels, "INT32_LIMIT", 0)
    fwd = (xs, Ws, None, None, 0, out, b, As, Bs, scale, mask, p)
    for got, ref in zip(lora_kernels.lora_forward(*fwd), lora_forward_reference(*args)):
        assert_close(got, ref)
    bargs = backward_args(fwd, g)
    for got, ref in zip(lora_kernels.lora_backward(*bargs), lora_backward_reference(*bargs)):
        assert_close(got, ref)

    q = torch.randn(20, IN, generator=torch.Generator().manual_seed(3)).t()  # reduction of 70: 3 splits of ≤32
    product = torch.empty(TOKENS, 20)
    lora_kernels.scaled_matmul(x, q, product, scale=0.7, split=3)
    assert_close(product, 0.7 * (x @ q))


def test_launch_shrinks_tiles_until_shared_memory_suffices():
    from triton.runtime.errors import OutOfResources

    tried = []

    def launch(t):
        tried.append(t)
        if t.stages * t.k * (t.m + t.n) * 2 > 48 * 1024:  # 48 KiB of shared memory, 16-bit operands
            raise OutOfResources(t.stages * t.k * (t.m + t.n) * 2, 48 * 1024, "shared memory")

    first = lora_kernels.Tiles(128, 128, 64, 8, 3)
    lora_kernels.launch_with_fallback("probe", first, launch)
    assert tried == [first, lora_kernels.Tiles(128, 128, 64, 8, 2), lora_kernels.Tiles(128, 128, 32, 8, 2)]
    tried.clear()
    lora_kernels.launch_with_fallback("probe", first, launch)  # remembered: no second search
    assert tried == [lora_kernels.Tiles(128, 128, 32, 8, 2)]
    with pytest.raises(OutOfResources):
        lora_kernels.launch_with_fallback("never", first, lambda t: launch(lora_kernels.Tiles(512, 512, 512, 8, 4)))


@pytest.mark.parametrize("splits", [1, 3], ids=["one-split", "split-k"])
@pytest.mark.parametrize("dtype,quant", [(torch.float32, None), (torch.float16, ("nf4", True))],
                         ids=["fp32-dense", "fp16-nf4"])
def test_lora_linear_autograd_triton_equals_torch(dtype, quant, splits, monkeypatch):
    """The public op end to end: 3-D input, dropout, autograd through the custom op on both backends; with
    split-K forced (the reduction path a GPU takes for dA and dB) in the second variant."""
    args, _ = make_case(dtype, quant=quant)
    x, weight, absmax, code, blocksize, out, bias, A, B, scale, _, p = args
    if quant is not None:
        weight = FourBitWeight(weight, absmax, code, blocksize, (out, IN), dtype, quant[0])
    x3 = x[:36].reshape(4, 9, IN)
    mask = torch.rand(x3.shape, generator=torch.Generator().manual_seed(5)) >= p
    g = torch.randn(4, 9, out, generator=torch.Generator().manual_seed(6)).to(dtype)
    results = {}
    spy = spy_on(monkeypatch, lora_kernels, "_matmul_kernel")
    for name in ("torch", "triton"):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x3, A, B)]
        with backend(name), interpreter_splits(splits):
            y = lora_linear(leaves[0], weight, bias, leaves[1], leaves[2], scale, p, mask)
            y.backward(g)
        results[name] = [y.detach()] + [t.grad for t in leaves]
    assert spy.grids and max(grid[1] for grid in spy.grids) == splits  # the reduction ran with that many splits
    for got, ref, what in zip(results["triton"], results["torch"], "y dx dA dB".split()):
        assert_close(got, ref, msg=what)

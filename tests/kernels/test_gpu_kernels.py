"""On a CUDA GPU: every public Triton launcher against its PyTorch reference in bf16, fp16 and fp32, and the
fused loss deterministic (two runs, the same bits). Skipped without a GPU (the kernels' correctness on the CPU
is tested under the Triton interpreter by the test_*_triton.py files, which use CPU tensors).
``benchmarks/gpu_check.sh`` runs it on the GPU day. ``FASTFT_GPU_TEST_DEVICE=cpu`` runs the float32 cases on
the interpreter, to check this file itself on a machine without a GPU.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch

# Every fastft name this file uses: (launcher, reference) pairs with one signature, as fastft/ops dispatches them.
PAIRS = {
    "lora_forward": ("fastft.kernels.lora:lora_forward", "fastft.ops.lora:lora_forward_reference"),
    "lora_backward": ("fastft.kernels.lora:lora_backward", "fastft.ops.lora:lora_backward_reference"),
    "dora_row_norm": ("fastft.kernels.dora:dora_row_norm", "fastft.ops.dora_row_norm:dora_row_norm_reference"),
    "dora_forward": ("fastft.kernels.dora:dora_forward", "fastft.ops.dora:dora_forward_reference"),
    "dora_backward": ("fastft.kernels.dora:dora_backward", "fastft.ops.dora:dora_backward_reference"),
    "fused_pass": ("fastft.kernels.linear_cross_entropy:fused_pass", "fastft.ops.linear_cross_entropy:reference_pass"),
    "hadamard_transform": ("fastft.kernels.hadamard:hadamard_transform", "fastft.ops.hadamard:hadamard_transform_reference"),
    "fake_quantize": ("fastft.kernels.fake_quantize:fake_quantize", "fastft.ops.fake_quantize:fake_quantize_reference"),
    "dequantize_4bit": ("fastft.kernels.dequantize_4bit:dequantize_4bit",
                        "fastft.ops.dequantize_4bit:dequantize_4bit_reference"),
    "slice_weight_grad": ("fastft.kernels.s2ft:slice_weight_grad", None),
    "linear_saving_slice": ("fastft.kernels.s2ft:linear_saving_slice", None),
    "sparse_delta_forward": ("fastft.kernels.sparse_delta:sparse_delta_forward",
                             "fastft.ops.sparse_delta_linear:sparse_delta_forward_reference"),
    "sparse_delta_backward": ("fastft.kernels.sparse_delta:sparse_delta_backward",
                              "fastft.ops.sparse_delta_linear:sparse_delta_backward_reference"),
}
# relative Frobenius error allowed against the reference, per dtype (float32: IEEE dots, TF32 off)
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 2e-5}

if torch.cuda.is_available():
    DEVICE, DTYPES = "cuda", (torch.bfloat16, torch.float16, torch.float32)
    M, K, N, R, V = 1000, 768, 640, 16, 5000  # not multiples of the tiles: the masks are exercised
elif os.environ.get("FASTFT_GPU_TEST_DEVICE") == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE, DTYPES = "cpu", (torch.float32,)
    M, K, N, R, V = 40, 48, 36, 4, 70
else:
    pytest.skip("no CUDA device (FASTFT_GPU_TEST_DEVICE=cpu runs the float32 cases on the interpreter)",
                allow_module_level=True)


def _load(spec):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _pair(name):
    fast, ref = PAIRS[name]
    return _load(fast), (_load(ref) if ref else None)


def _close(got, ref, dtype, what):
    if isinstance(got, (tuple, list)):
        for i, (g, r) in enumerate(zip(got, ref)):
            _close(g, r, dtype, f"{what}[{i}]")
        return
    if got is None or ref is None or got.numel() == 0:
        assert (got is None or got.numel() == 0) and (ref is None or ref.numel() == 0), what
        return
    assert got.shape == ref.shape and got.dtype == ref.dtype, (what, got.shape, ref.shape, got.dtype, ref.dtype)
    if got.dtype in (torch.bool, torch.int8, torch.uint8, torch.int64):
        assert (got != ref).float().mean().item() <= 1e-3, what  # quantization masks: ties may round apart
        return
    g, r = got.double(), ref.double()
    err = (g - r).norm() / r.norm().clamp_min(1e-30)
    assert err.item() <= TOLERANCE[dtype], f"{what}: relative error {err.item():.3g} > {TOLERANCE[dtype]}"


def _rand(*shape, dtype, std=1.0, gen):
    return (torch.randn(*shape, generator=gen, device=DEVICE) * std).to(dtype)


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def dtype(request):
    return request.param


@pytest.fixture
def gen():
    return torch.Generator(device=DEVICE).manual_seed(0)


def _four_bit(gen, out_features, in_features):
    n = out_features * in_features
    packed = torch.randint(0, 256, (n // 2, 1), generator=gen, device=DEVICE, dtype=torch.uint8)
    absmax = torch.rand(n // 64, generator=gen, device=DEVICE) + 0.5
    code = torch.linspace(-1, 1, 16, device=DEVICE)
    return packed, absmax, code, 64


@pytest.mark.parametrize("four_bit,dropout", [(False, False), (False, True), (True, True)])
def test_lora(dtype, gen, four_bit, dropout):
    fwd, fwd_ref = _pair("lora_forward")
    bwd, bwd_ref = _pair("lora_backward")
    x, A, B = _rand(M, K, dtype=dtype, gen=gen), _rand(R, K, dtype=dtype, std=K ** -0.5, gen=gen), _rand(N, R, dtype=dtype, std=0.3, gen=gen)
    w, absmax, code, bs = _four_bit(gen, N, K) if four_bit else (_rand(N, K, dtype=dtype, std=K ** -0.5, gen=gen), None, None, 0)
    mask = torch.rand(M, K, generator=gen, device=DEVICE) >= 0.3 if dropout else None
    p = 0.3 if dropout else 0.0
    bias = _rand(N, dtype=dtype, gen=gen)
    args = (x, w, absmax, code, bs, N, bias, A, B, 0.5, mask, p)
    y, xa = fwd(*args)
    _close((y, xa), fwd_ref(*args), dtype, "lora forward")
    g = _rand(M, N, dtype=dtype, gen=gen)
    bargs = (g, x, xa, w, absmax, code, bs, K, A, B, 0.5, mask, p, True, True, True)
    _close(bwd(*bargs), bwd_ref(*bargs), dtype, "lora backward")


@pytest.mark.parametrize("four_bit", [False, True])
def test_dora(dtype, gen, four_bit):
    norm, norm_ref = _pair("dora_row_norm")
    fwd, fwd_ref = _pair("dora_forward")
    bwd, bwd_ref = _pair("dora_backward")
    x, A, B = _rand(M, K, dtype=dtype, gen=gen), _rand(R, K, dtype=dtype, std=K ** -0.5, gen=gen), _rand(N, R, dtype=dtype, std=0.3, gen=gen)
    w, absmax, code, bs = _four_bit(gen, N, K) if four_bit else (_rand(N, K, dtype=dtype, std=K ** -0.5, gen=gen), None, None, 0)
    sq = torch.rand(N, generator=gen, device=DEVICE) + 0.5
    _close(norm(w, absmax, code, bs, N, A, B, sq, 0.5, 1e-6), norm_ref(w, absmax, code, bs, N, A, B, sq, 0.5, 1e-6),
           dtype, "dora row norm")
    g = torch.rand(N, generator=gen, device=DEVICE) + 0.5
    args = (x, w, absmax, code, bs, N, None, A, B, g, 0.5, None, 0.0, True)
    out = fwd(*args)
    _close(out, fwd_ref(*args), dtype, "dora forward")
    gy = _rand(M, N, dtype=dtype, gen=gen)
    bargs = (gy, x, out[1], out[2], False, w, absmax, code, bs, K, None, A, B, g, 0.5, None, 0.0, True, True, True, True)
    _close(bwd(*bargs), bwd_ref(*bargs), dtype, "dora backward")


@pytest.mark.parametrize("kind,bias,smoothing,softcap", [("ce", False, 0.0, None), ("dft", True, 0.1, 30.0)])
def test_fused_loss(dtype, gen, kind, bias, smoothing, softcap):
    fast, ref = _pair("fused_pass")
    h, W = _rand(M, K, dtype=dtype, gen=gen), _rand(V, K, dtype=dtype, std=K ** -0.5, gen=gen)
    labels = torch.randint(0, V, (M,), generator=gen, device=DEVICE)
    labels[::7] = -100
    row_scale = (labels != -100).float() / M
    args = (h, W, _rand(V, dtype=dtype, gen=gen) if bias else None, labels, row_scale, None, kind, -100, smoothing, 1e-4,
            softcap, 256, True, True, bias)
    _close(fast(*args), ref(*args), dtype, f"fused loss {kind}")


def test_fused_loss_is_deterministic(gen):
    """DESIGN.md: no float atomics where results must be deterministic — two runs, the same bits."""
    fast, _ = _pair("fused_pass")
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    h, W = _rand(M, K, dtype=dtype, gen=gen), _rand(V, K, dtype=dtype, std=K ** -0.5, gen=gen)
    labels = torch.randint(0, V, (M,), generator=gen, device=DEVICE)
    row_scale = torch.full((M,), 1.0 / M, device=DEVICE)
    args = (h, W, None, labels, row_scale, None, "ce", -100, 0.0, 0.0, None, 256, True, True, False)
    first, second = fast(*args), fast(*args)
    names = "lse nll z_mean kind_weight dh dw db dh2 dw2".split()
    differ = [n for n, a, b in zip(names, first, second) if not torch.equal(a, b)]
    assert not differ, f"two runs of the fused loss differ in {differ} (float atomics?)"


@pytest.mark.parametrize("d", [1024, 4096, 14336])
def test_hadamard_and_fake_quantize(dtype, gen, d):
    rows = 64 if DEVICE == "cuda" else 3
    if DEVICE == "cpu":
        d = {1024: 32, 4096: 64, 14336: 28}[d]
    fast, ref = _pair("hadamard_transform")
    x = _rand(rows, d, dtype=dtype, gen=gen)
    for inverse in (False, True):
        _close(fast(x, inverse), ref(x, inverse), dtype, f"hadamard d={d} inverse={inverse}")
    fq, fq_ref = _pair("fake_quantize")
    for granularity, rotate in (("token", True), ("token", False), ("tensor", False)):
        args = (x, 4, granularity, 0, True, 1.0, rotate, True)
        _close(fq(*args), fq_ref(*args), dtype, f"fake_quantize {granularity} rotate={rotate}")


def test_dequantize_4bit(dtype, gen):
    fast, ref = _pair("dequantize_4bit")
    packed, absmax, code, bs = _four_bit(gen, N, K)
    assert torch.equal(fast(packed, absmax, code, bs, (N, K), dtype), ref(packed, absmax, code, bs, (N, K), dtype))


@pytest.mark.parametrize("rows", [False, True])
def test_s2ft(dtype, gen, rows):
    forward, _ = _pair("linear_saving_slice")
    grad, _ = _pair("slice_weight_grad")
    S = 128 if DEVICE == "cuda" else 8
    x, W, b = _rand(M, K, dtype=dtype, gen=gen), _rand(N, K, dtype=dtype, std=K ** -0.5, gen=gen), _rand(N, dtype=dtype, gen=gen)
    y, xs = forward(x, W, b, S)
    _close((y, xs), ((x.double() @ W.double().t() + b.double()).to(dtype), x[:, :S].contiguous()), dtype, "s2ft forward")
    g = _rand(M, N, dtype=dtype, gen=gen)
    want = (g[:, :S].double().t() @ x.double()) if rows else (g.double().t() @ x[:, :S].double())
    _close(grad(g, x if rows else xs, S, rows), want.to(dtype), dtype, f"s2ft dW rows={rows}")


@pytest.mark.parametrize("dense", [False, True])
def test_sparse_delta(dtype, gen, dense):
    from fastft.ops.sparse_delta_linear import sparse_support

    forward, forward_ref = _pair("sparse_delta_forward")
    backward, backward_ref = _pair("sparse_delta_backward")
    k = N * K // 50
    idx = torch.randperm(N * K, generator=gen, device=DEVICE)[:k].sort().values
    support = sparse_support(idx, (N, K)).tensors()
    x, W, b = _rand(M, K, dtype=dtype, gen=gen), _rand(N, K, dtype=dtype, std=K ** -0.5, gen=gen), _rand(N, dtype=dtype, gen=gen)
    v, g = _rand(k, dtype=dtype, std=0.1, gen=gen), _rand(M, N, dtype=dtype, gen=gen)
    _close(forward(x, W, None, None, 0, N, b, v, *support, dense), forward_ref(x, W, None, None, 0, N, b, v, *support, dense),
           dtype, "sparse delta forward")
    _close(backward(g, x, W, None, None, 0, K, v, *support, dense, True, True),
           backward_ref(g, x, W, None, None, 0, K, v, *support, dense, True, True), dtype, "sparse delta backward")
    first = backward(g, x, W, None, None, 0, K, v, *support, dense, True, True)
    second = backward(g, x, W, None, None, 0, K, v, *support, dense, True, True)
    assert torch.equal(first[1], second[1]) and (dense or torch.equal(first[0], second[0])), "not deterministic"

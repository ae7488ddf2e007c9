"""The C libraries of csrc/: the C++ CPU kernels against the PyTorch reference, the build and its cache,
the CUDA library compiled and loaded on a machine without a GPU, and the dispatch of the ``cpp`` /
``cuda`` backends.

The C++ kernels run the reference's butterflies in its order, so the transforms are compared bit for
bit for K = 1 and to the tolerance table otherwise (the K×K product may sum in another order than
torch's matmul); the fake-quantized outputs and masks are compared bit for bit on integer-valued
inputs, where every sum is exact in any order, and on random inputs for K = 1. The libraries are built
once per session into the temporary cache tests/conftest.py sets (FASTFT_CACHE_DIR); tests that corrupt
or rebuild work on copies in their own directories.
"""
from __future__ import annotations

import ctypes
import itertools
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path

import pytest
import torch
from helpers import assert_close, backend

import fastft
from fastft import _ext, build
from fastft.ops import fake_quantize, hadamard_transform
from fastft.ops.fake_quantize import fake_quantize_backward_reference, fake_quantize_reference
from fastft.ops.hadamard import (
    LLM_SIZES,
    MAX_K_FACTOR,
    hadamard_factorization,
    hadamard_transform_reference,
    is_hadamard_size,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture(scope="session")
def cpu_library():
    """The C++ CPU library of this session (built on first use into the session cache)."""
    if not _ext.available("cpu"):
        pytest.skip(f"the C++ CPU library cannot be built on this machine: {_ext.unavailable_reason('cpu')}")
    return _ext.built("cpu")


@pytest.fixture(scope="session")
def cuda_library():
    """The CUDA library, compiled for sm_80 only (the default sm_80 + sm_90 + PTX takes ~3x as long)."""
    try:
        build.find_nvcc()
    except build.BuildError as error:
        pytest.skip(f"nvcc is not installed, so the CUDA library is not compiled here ({error})")
    previous = os.environ.get("FASTFT_CUDA_ARCHS")
    os.environ["FASTFT_CUDA_ARCHS"] = previous or "80"
    try:
        assert _ext.available("cuda"), _ext.unavailable_reason("cuda")
        yield _ext.built("cuda")
    finally:
        if previous is None:
            os.environ.pop("FASTFT_CUDA_ARCHS", None)


def integer_rows(rows: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-8, 9, (rows, d), generator=g).double()
    x[:, d // 3] = 48.0  # an outlier channel
    x[0] = x[0].abs()  # a row with min 0
    return x


# --------------------------------------------------------------------------- the transform
POWERS = [1 << n for n in range(16)]  # 1 .. 32768
K_SIZES = [K for K in range(12, MAX_K_FACTOR + 1, 4) if is_hadamard_size(K) and hadamard_factorization(K) == (K, 0)]
K_SAMPLE = [K for K in K_SIZES if K <= 256] + K_SIZES[-1:-60:-12]  # all small ones, five large


@pytest.mark.parametrize("dtype", DTYPES)
def test_transform_every_power_of_two_bit_for_bit(cpu_library, dtype):
    for d in POWERS:
        rows = 5 if d <= 4096 else 1
        x = torch.randn(rows, d, generator=torch.Generator().manual_seed(d)).to(dtype)
        for inverse in (False, True):
            got = _ext.hadamard_transform(x, inverse)
            assert got.dtype == dtype and got.shape == x.shape
            assert torch.equal(got, hadamard_transform_reference(x, inverse)), f"d={d} inverse={inverse}"


def test_transform_every_k_factor(cpu_library):
    """Every K-factor the reference builds (d = K; the larger ones sampled), float32 and bfloat16."""
    assert len(K_SIZES) > 100 and 172 in K_SIZES and 2044 in K_SIZES
    for K in K_SAMPLE:
        x = torch.randn(3, K, generator=torch.Generator().manual_seed(K))
        for dtype, inverse in itertools.product((torch.float32, torch.bfloat16), (False, True)):
            xd = x.to(dtype)
            assert_close(_ext.hadamard_transform(xd, inverse), hadamard_transform_reference(xd, inverse), dtype,
                         msg=f"K={K} {dtype} inverse={inverse}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transform_llm_sizes(cpu_library, dtype):
    """The hidden / intermediate / head sizes of common LLMs (K·2^n with n > 0), odd row counts."""
    for d in sorted(LLM_SIZES):
        rows = 3 if d <= 8192 else 1
        x = torch.randn(rows, d, generator=torch.Generator().manual_seed(d)).to(dtype)
        for inverse in (False, True):
            assert_close(_ext.hadamard_transform(x, inverse), hadamard_transform_reference(x, inverse), dtype,
                         msg=f"d={d} inverse={inverse}")


def test_transform_integer_inputs_are_exact_for_k_factors(cpu_library):
    for d in (12, 48, 80, 172, 896, 11008):
        x = integer_rows(3, d, d).float()
        for inverse in (False, True):
            assert torch.equal(_ext.hadamard_transform(x, inverse), hadamard_transform_reference(x, inverse))


# --------------------------------------------------------------------------- fake quantization
QUANT_CASES = list(itertools.product(("token", "group", "tensor"), (False, True), (False, True), (1.0, 0.8)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 48, 320, 2048])
def test_fake_quantize_bit_for_bit(cpu_library, dtype, d):
    """Integer-valued inputs (any d) and random inputs (d a power of two): outputs and masks equal."""
    inputs = [integer_rows(7, d, d).to(dtype)]
    if d & (d - 1) == 0:
        inputs.append(torch.randn(7, d, generator=torch.Generator().manual_seed(d)).to(dtype))
    for x, (granularity, symmetric, rotate, clip), bits in itertools.product(inputs, QUANT_CASES, (2, 4, 8)):
        args = (x, bits, granularity, 16, symmetric, clip, rotate, True)
        out, mask = _ext.fake_quantize(*args)
        want, want_mask = fake_quantize_reference(*args)
        case = f"{granularity} symmetric={symmetric} rotate={rotate} clip={clip} bits={bits}"
        assert out.dtype == dtype and torch.equal(out, want), case
        assert torch.equal(mask, want_mask), case


def test_fake_quantize_all_zero_rows_and_nan(cpu_library):
    x = torch.zeros(3, 32)
    x[1, 5] = float("nan")
    for granularity, symmetric in itertools.product(("token", "group", "tensor"), (False, True)):
        out, mask = _ext.fake_quantize(x, 4, granularity, 8, symmetric, 1.0, False, True)
        want, want_mask = fake_quantize_reference(x, 4, granularity, 8, symmetric, 1.0, False, True)
        assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.nan_to_num(), want.nan_to_num())
        assert torch.equal(mask, want_mask)
    out, _ = _ext.fake_quantize(torch.zeros(3, 32), 4, "token", 8, False, 1.0, True, False)
    assert torch.equal(out, torch.zeros(3, 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_on_the_cpp_backend_with_gradients(cpu_library, dtype):
    """The public ops end to end on ``cpp``: 3-D input, clipped STE through the rotation, odd row count."""
    x = integer_rows(15, 48, 3).to(dtype).reshape(3, 5, 48)
    grad = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(4)).to(dtype)
    results = {}
    for name in ("cpp", "torch"):
        with backend(name):
            xr = x.clone().requires_grad_(True)
            y = fake_quantize(xr, 4, "token", ste="clipped", rotate=True)
            (dx,) = torch.autograd.grad(y, xr, grad)
            h = hadamard_transform(xr)
            (dh,) = torch.autograd.grad(h, xr, grad)
            results[name] = (y.detach(), dx, h.detach(), dh)
    for got, want in zip(results["cpp"], results["torch"]):
        assert_close(got, want, dtype)
    assert torch.equal(results["cpp"][0], results["torch"][0])


@pytest.mark.parametrize("rotate", [False, True])
def test_backward_kernel_matches_reference(cpu_library, rotate):
    grad = torch.randn(5, 80, generator=torch.Generator().manual_seed(5))
    mask = torch.rand(5, 80, generator=torch.Generator().manual_seed(6)) > 0.3
    for m in (mask, mask.new_empty(0)):
        assert_close(_ext.fake_quantize_backward(grad, m, rotate), fake_quantize_backward_reference(grad, m, rotate))


# --------------------------------------------------------------------------- layouts
def test_non_contiguous_inputs_are_read_through_strides_or_copied(cpu_library):
    base = torch.randn(16, 96, generator=torch.Generator().manual_seed(7))
    cases = {
        "row slice (row stride 96)": base[:, :48],
        "every other row": base[::2, 16:64],
        "expanded row (row stride 0)": base[0, :64].expand(5, 64),
        "transposed (copied)": base[:, :32].t(),
        "permuted 3-D (copied)": base.reshape(16, 2, 48).permute(1, 0, 2),
        "last dim strided (copied)": base[:, ::2],
    }
    for name, x in cases.items():
        want_h = hadamard_transform_reference(x.contiguous())
        assert torch.equal(_ext.hadamard_transform(x, False), want_h), name
        out, mask = _ext.fake_quantize(x, 4, "group", 16, False, 1.0, True, True)
        want, want_mask = fake_quantize_reference(x.contiguous(), 4, "group", 16, False, 1.0, True, True)
        assert torch.equal(out, want) and torch.equal(mask, want_mask), name
    view, stride = _ext.as_rows(base[:, :48])
    assert stride == 96 and view.data_ptr() == base.data_ptr()  # a row slice is not copied


def test_bad_layouts_are_refused_with_a_clear_error(cpu_library):
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match="output must be a contiguous"):
        _ext.rows(x, torch.empty(16, 4).t(), rotate=True)
    with pytest.raises(ValueError, match="mask must be a contiguous bool"):
        _ext.rows(x, torch.empty(4, 16), keep_in=torch.ones(16, 4, dtype=torch.bool).t())
    with pytest.raises(TypeError, match="float32/bfloat16/float16/float64"):
        _ext.rows(x.long(), torch.empty(4, 16))
    args = _ext.RowsArgs(x=x.data_ptr(), out=x.data_ptr(), x_row_stride=16, out_row_stride=8, rows=4, d=16)
    with pytest.raises(RuntimeError, match="last dimension must be contiguous"):
        _ext._check("cpu", _ext.library("cpu")["rows"](ctypes.byref(args), 1))


# --------------------------------------------------------------------------- dispatch
def test_cpp_is_the_default_on_cpu_and_forcing_works(cpu_library):
    assert fastft.backends("cpu")["hadamard_transform"] == "cpp"
    assert fastft.backends("cpu")["fake_quantize"] == "cpp"
    assert fastft.backends("cpu")["lora_linear"] == "torch"
    from fastft.dispatch import backend_for

    with backend("torch"):
        assert backend_for("hadamard_transform", "cpu") == "torch"
    with backend("cuda,cpp"):
        assert backend_for("fake_quantize", "cpu", d=64, dtype=torch.float32, granularity="group") == "cpp"
    with backend("cuda"), pytest.raises(RuntimeError, match="'cuda' runs on cuda tensors only"):
        hadamard_transform(torch.randn(2, 8))
    with backend("cpp"), pytest.raises(RuntimeError, match="'cpp' does not implement 'lora_linear'"):
        backend_for("lora_linear", "cpu")


def test_cuda_limits_name_the_reason(cpu_library, cuda_library):
    from fastft.ops.fake_quantize import _cuda_limit

    assert _cuda_limit(d=4096, dtype=torch.bfloat16, granularity="token") is None
    assert "per token" in _cuda_limit(d=4096, dtype=torch.float32, granularity="group")
    assert "at most 32768" in _cuda_limit(d=65536, dtype=torch.float32)
    assert "at most 16384" in _cuda_limit(d=32768, dtype=torch.float64)


def _fresh_library_state(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTFT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "prebuilt_root", lambda: tmp_path / "no-prebuilt")
    _ext.reset()


@pytest.mark.parametrize("missing", ["compiler", "ninja"])
def test_missing_tools_warn_once_and_the_reference_runs(cpu_library, monkeypatch, tmp_path, missing):
    _fresh_library_state(monkeypatch, tmp_path)
    if missing == "compiler":
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
        reason = "is not an executable compiler"
    else:
        def no_ninja():
            raise build.BuildError("ninja not found: `pip install ninja` (the PyPI package ships the binary)")

        monkeypatch.setattr(build, "find_ninja", no_ninja)
        reason = "ninja not found"
    try:
        x = torch.randn(3, 64)
        with pytest.warns(RuntimeWarning, match=f"C\\+\\+ CPU kernels are unavailable.*{reason}"):
            y = hadamard_transform(x)
        assert torch.equal(y, hadamard_transform_reference(x))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            assert fastft.backends("cpu")["hadamard_transform"] == "torch"
            fake_quantize(x, 4)
        with backend("cpp"), pytest.raises(RuntimeError, match=f"'cpp' library is unavailable.*{reason}"):
            hadamard_transform(x)
    finally:
        monkeypatch.undo()
        _ext.reset()


# --------------------------------------------------------------------------- build cache
def _copy_session_build(built: build.Built, tmp_path: Path) -> Path:
    """A copy of this session's build in a cache of its own; returns its directory."""
    target = tmp_path / "cache" / built.path.parent.name
    shutil.copytree(built.path.parent, target)
    return target


def _replace_file(path: Path, data: bytes) -> None:
    """Write a new file over ``path`` (a new inode: the library loaded from the old one stays mapped)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _corrupt_library(directory: Path) -> None:
    stamp = json.loads((directory / "stamp.json").read_text())
    _replace_file(directory / stamp["library"], b"\x7fELF this is not a shared library")


def _stale_stamp(directory: Path) -> None:
    stamp = json.loads((directory / "stamp.json").read_text())
    stamp["key"] = "0" * 64
    (directory / "stamp.json").write_text(json.dumps(stamp))


def _foreign_build_id(directory: Path) -> None:
    """Another build's id inside the library (as if a library from other sources were copied in)."""
    stamp = json.loads((directory / "stamp.json").read_text())
    path = directory / stamp["library"]
    data = path.read_bytes()
    key = stamp["key"].encode()
    assert data.count(key) == 1
    _replace_file(path, data.replace(key, b"f" * len(key)))


def _compile_by_copying(pristine: Path):
    """A stand-in for build._compile that installs a copy of a good build (no compiler run)."""
    def compile_(kind, tools, key, dest):
        stamp = json.loads((pristine / "stamp.json").read_text())
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        name = f"libfastft_cpu-copy{uuid.uuid4().hex[:8]}.so"  # a new name, as every build gets
        shutil.copyfile(pristine / stamp["library"], dest / name)
        (dest / "stamp.json").write_text(json.dumps(dict(stamp, library=name)))
        return build.Built(kind, dest / name, key, tools.compiler, tools.version, [], "built")

    return compile_


@pytest.mark.parametrize("damage, reason, compiles", [
    (_corrupt_library, "cannot load", True),  # one real rebuild; the others only check the detection
    (_stale_stamp, "stale stamp", False),
    (_foreign_build_id, "built from other sources", False),
])
def test_corrupted_or_stale_builds_are_rebuilt(cpu_library, monkeypatch, tmp_path, damage, reason, compiles):
    directory = _copy_session_build(cpu_library, tmp_path)
    _fresh_library_state(monkeypatch, tmp_path)
    if not compiles:
        monkeypatch.setattr(build, "_compile", _compile_by_copying(cpu_library.path.parent))
    try:
        assert build._read_stamp(directory)["key"] == build.build_key("cpu", build.cpu_toolchain())  # a valid entry
        damage(directory)  # before it is loaded: a process keeps the library it has loaded
        lib, built = build.load("cpu")
        assert built.origin == "built" and reason in built.rebuilt_because
        assert built.path.parent == directory and built.path.exists()
        assert lib.fastft_cpu_abi_version() == build.ABI_VERSION
        lib, again = build.load("cpu")
        assert again.origin == "cache" and again.path == built.path
    finally:
        monkeypatch.undo()
        _ext.reset()


def test_the_key_follows_sources_and_flags_not_torch(cpu_library, monkeypatch, tmp_path):
    tools = build.cpu_toolchain()
    key = build.build_key("cpu", tools)
    assert key == cpu_library.key
    sources = tmp_path / "csrc"
    shutil.copytree(build.csrc_dir(), sources)
    monkeypatch.setattr(build, "csrc_dir", lambda: sources)
    assert build.build_key("cpu", tools) == key
    with open(sources / "quantize.h", "a") as f:
        f.write("// an edit\n")
    assert build.build_key("cpu", tools) != key  # an edited header is a new build
    monkeypatch.undo()
    monkeypatch.setenv("FASTFT_CXXFLAGS", "-DFASTFT_TEST_FLAG")
    assert build.build_key("cpu", build.cpu_toolchain()) != key
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    monkeypatch.delenv("FASTFT_CXXFLAGS")
    assert build.build_key("cpu", build.cpu_toolchain()) == key


def test_prebuilt_libraries_are_used_when_they_match(cpu_library, monkeypatch, tmp_path):
    """What setup.py installs with FASTFT_BUILD_EXT=1 (fastft/_prebuilt/<kind>/) is loaded without a build."""
    prebuilt = tmp_path / "_prebuilt"
    shutil.copytree(cpu_library.path.parent, prebuilt / "cpu")
    monkeypatch.setattr(build, "prebuilt_root", lambda: prebuilt)
    monkeypatch.setenv("FASTFT_CACHE_DIR", str(tmp_path / "empty-cache"))
    lib, built = build.load("cpu")
    assert built.origin == "prebuilt" and built.path.parent == prebuilt / "cpu"
    assert not (tmp_path / "empty-cache").exists()
    _stale_stamp(prebuilt / "cpu")  # a prebuilt library for other sources is ignored, not loaded
    stamp = json.loads((prebuilt / "cpu" / "stamp.json").read_text())
    stamp["source_key"] = "0" * 64
    (prebuilt / "cpu" / "stamp.json").write_text(json.dumps(stamp))
    assert build._load_prebuilt("cpu") is None


def test_python_m_fastft_build_prints_what_where_and_which_compiler(cpu_library, capsys):
    assert build.main(["--cpu"]) == 0
    out = capsys.readouterr().out
    assert "C++ CPU library (fastft_cpu): up to date" in out
    assert f"library:  {cpu_library.path}" in out
    assert f"compiler: {cpu_library.compiler} ({cpu_library.compiler_version})" in out
    assert str(build.cache_root()) in out


def test_nested_dequantize_takes_bitsandbytes_state_fields():
    """dequantize_4bit_nested (the CUDA kernel's entry, the reference here) equals bitsandbytes."""
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    from fastft.ops.dequantize_4bit import dequantize_4bit_nested

    W = torch.randn(45, 71, generator=torch.Generator().manual_seed(0))
    for quant_type in ("nf4", "fp4"):
        packed, state = bnb_functional.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type=quant_type)
        for dtype in (torch.float32, torch.bfloat16):
            state.dtype = dtype
            got = dequantize_4bit_nested(packed, state.absmax, state.state2.code, state.state2.absmax,
                                         state.state2.blocksize, state.offset, state.code, 64, (45, 71), dtype)
            assert torch.equal(got, bnb_functional.dequantize_4bit(packed, state))


# --------------------------------------------------------------------------- the CUDA library
def test_cuda_library_compiles_links_and_loads(cuda_library):
    assert cuda_library.path.exists() and "nvcc" in cuda_library.compiler
    assert "-gencode=arch=compute_80,code=sm_80" in cuda_library.flags
    fns = _ext.library("cuda")
    assert fns["args_size"]() == ctypes.sizeof(_ext.RowsArgs)
    assert fns["max_row"](0) == 32768 and fns["max_row"](3) == 16384


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the kernels run instead")
def test_cuda_library_without_a_gpu_gives_a_clear_error(cuda_library, capsys):
    fns = _ext.library("cuda")
    assert fns["device_count"]() == -1
    args = _ext.RowsArgs(rows=1, d=8, rotate=1, k=1, row_scale=0.5)
    with pytest.raises(RuntimeError, match="fastft cuda library: no CUDA device"):
        _ext._check("cuda", fns["rows"](ctypes.byref(args), 0, None))
    args4 = _ext.Dequantize4bitArgs(n=8, blocksize=64)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        _ext._check("cuda", fns["dequantize_4bit"](ctypes.byref(args4), 0, None))
    assert build.main(["--cuda"]) == 0
    out = capsys.readouterr().out
    assert "CUDA library (fastft_cuda): up to date" in out and "device:   no CUDA device" in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA kernels are compiled, not run")
def test_cuda_kernels_match_the_reference_on_a_gpu(cuda_library):
    from fastft.ops.dequantize_4bit import dequantize_4bit_reference

    for d, dtype in itertools.product((64, 1024, 32768, 48, 172, 11008), (torch.float32, torch.bfloat16)):
        x = integer_rows(5, d, d).to(dtype)
        xc = x.cuda()
        for inverse in (False, True):
            assert torch.equal(_ext.hadamard_transform(xc, inverse).cpu(), hadamard_transform_reference(x, inverse))
        for symmetric, bits in itertools.product((False, True), (4, 8)):
            out, mask = _ext.fake_quantize(xc, bits, "token", 0, symmetric, 0.9, True, True)
            want, want_mask = fake_quantize_reference(x, bits, "token", 0, symmetric, 0.9, True, True)
            assert torch.equal(out.cpu(), want) and torch.equal(mask.cpu(), want_mask)
            grad = torch.randn(5, d).to(dtype)
            got = _ext.fake_quantize_backward(grad.cuda(), mask, True).cpu()
            want = fake_quantize_backward_reference(grad, want_mask, True)
            if hadamard_factorization(d)[0] == 1:
                assert torch.equal(got, want)
            else:  # the K-sum of random values: rounding-level agreement
                assert_close(got, want, dtype)
    packed = torch.randint(0, 256, (96,), dtype=torch.uint8)
    absmax = torch.rand(3) + 0.5
    code = torch.linspace(-1, 1, 16)
    codes = torch.randint(0, 256, (3,), dtype=torch.uint8)
    code2, absmax2 = torch.linspace(-1, 1, 256), torch.rand(1) + 0.5
    from fastft.ops.dequantize_4bit import unnest_absmax

    nested_absmax = unnest_absmax(codes, code2, absmax2, 256, 0.25)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = _ext.dequantize_4bit(packed.cuda(), absmax.cuda(), code.cuda(), 64, (12, 16), dtype)
        assert torch.equal(got.cpu(), dequantize_4bit_reference(packed, absmax, code, 64, (12, 16), dtype))
        got = _ext.dequantize_4bit(packed.cuda(), None, code.cuda(), 64, (12, 16), dtype,
                                   nested=(codes.cuda(), code2.cuda(), absmax2.cuda(), 256, 0.25))
        assert torch.equal(got.cpu(), dequantize_4bit_reference(packed, nested_absmax, code, 64, (12, 16), dtype))

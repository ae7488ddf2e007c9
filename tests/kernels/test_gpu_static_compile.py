"""Static GPU checks, no GPU needed (issue 14, item 4): compile exactly what a launch compiles.

Triton: every public launcher of ``fastft.kernels`` is called on ``meta`` tensors at LLM shapes (tokens 8192,
hidden 4096, intermediate 14336, rank 16, vocabulary 128256) with torch pretending to be an A100 (sm_80) or an
H100 (sm_90), in bf16, fp16 and fp32. ``JITFunction.run`` is intercepted after Triton's own binder (dtypes,
16-byte pointer alignment, integers divisible by 16, integers equal to 1), and the bound specialization is
compiled with the bundled ptxas (``tests/gpu_static.py``). Asserted per target and dtype: it compiles, its
shared memory fits one block of that card (A100 163 KiB, H100 227 KiB), 16-bit variants do not spill, every
``*_kernel`` of every kernel module was compiled, and the grid fits CUDA's limits.

Which variants: every distinct specialization the scenarios launch is captured (about 180 a target); by
default a greedy cover compiles, per (target, kernel), the fewest of them that together take every dtype, every
flag and tile constexpr value and every (warps, stages) the launches use — heavy combinations first, since they
cover the most, and every flag that is on in some 16-bit launch also in a 16-bit one (about 45 a target). ``FASTFT_GPU_STATIC=full`` compiles every captured variant (about 4x longer
the first time). Results are cached by Triton's cache key in ``.pytest_cache`` (``--cache-clear`` forgets
them), so a rerun compiles only what changed.

CUDA (csrc/): every ``.cu`` with a ``__global__`` kernel is compiled with the build's flags
(``fastft.build.cuda_toolchain``) and ``-Xptxas -v`` for sm_80 and sm_90; no kernel the dispatch can pick may
spill. Known spills are xfailed with their reason (``KNOWN_CUDA_SPILLS``), not hidden.

The table, the per-variant report and the ptxas numbers are written to ``.pytest_cache/d/fastft-gpu-static/``
(``report.md``); ``pytest -s`` also prints the summary.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# ------------------------------------------------------------------------------------------------------
# Every fastft name this file depends on: the public launchers of fastft.kernels (as fastft/ops imports them)
# and the build's CUDA toolchain. A rename elsewhere is a one-line change here.
LAUNCHERS = {
    "lora_forward": "fastft.kernels.lora:lora_forward",
    "lora_backward": "fastft.kernels.lora:lora_backward",
    "dora_forward": "fastft.kernels.dora:dora_forward",
    "dora_backward": "fastft.kernels.dora:dora_backward",
    "dora_row_norm": "fastft.kernels.dora:dora_row_norm",
    "dora_row_norm_backward": "fastft.kernels.dora:dora_row_norm_backward",
    "linear_saving_slice": "fastft.kernels.s2ft:linear_saving_slice",
    "slice_weight_grad": "fastft.kernels.s2ft:slice_weight_grad",
    "fused_pass": "fastft.kernels.linear_cross_entropy:fused_pass",
    "hadamard_transform": "fastft.kernels.hadamard:hadamard_transform",
    "fake_quantize": "fastft.kernels.fake_quantize:fake_quantize",
    "fake_quantize_backward": "fastft.kernels.fake_quantize:fake_quantize_backward",
    "dequantize_4bit": "fastft.kernels.dequantize_4bit:dequantize_4bit",
    "sparse_delta_forward": "fastft.kernels.sparse_delta:sparse_delta_forward",
    "sparse_delta_backward": "fastft.kernels.sparse_delta:sparse_delta_backward",
    "sampled_gradient": "fastft.kernels.sparse_delta:sampled_gradient",
    "givens_forward": "fastft.kernels.givens:givens_forward",
    "givens_backward": "fastft.kernels.givens:givens_backward",
}
KERNEL_PACKAGE = "fastft.kernels"  # every module in it is scanned for JIT functions named *_kernel
CUDA_TOOLCHAIN = "fastft.build:cuda_toolchain"  # -> Toolchain(nvcc, version, cflags, ...)
# Known spills of 16-bit Triton variants: (target, kernel) -> (the scenarios allowed to spill, reason). The
# test xfails with the reason when only those spill (a fix makes it pass); any other spill fails it.
KNOWN_TRITON_SPILLS = {
    ("sm_80", "_linear_cross_entropy_kernel"): (
        ("ce", "ce+bias+smoothing+z_loss+softcap", "dft", "talr (given weights)", "ce+lora lm_head"),
        "fused linear cross-entropy with gradients on an A100: 108 SMs >= 8192/64 token blocks, so the launcher runs "
        "statistics and gradient in ONE launch (STATS and GRAD, vocab_splits = 1); that kernel needs more than 255 "
        "registers at BLOCK_M 64 x BLOCK_V 128 x BLOCK_K 64, 8 warps, and spills 12/12 B (88/116 B with a LoRA "
        "lm_head). On an H100 (132 SMs) the launcher splits it in two launches, which do not spill. Fix in "
        "kernels/linear_cross_entropy.py (always split the passes, or leaner tiles for the fused one) or move to the "
        "issue's design (logits and dh/dW by cuBLAS, one Triton pass for the softmax gradient)"),
    ("sm_80", "_linear_lowrank_kernel"): (
        ("qdora", "qdora+dropout"),
        "QDoRA row norm with a 4-bit W (P^T = A W^T, and the norm's dA): BLOCK_M 16 (the rank) x BLOCK_N 128 x "
        "BLOCK_K 32, 4 warps, 2 stages: ptxas stops at 80 registers and spills 4/4 B on sm_80 (not on sm_90); "
        "caught by FASTFT_GPU_STATIC=full"),
}
_GIVENS_WIDE = (
    "qGOFT's Givens butterfly over 14336 features (padded to 16384): a program holds one whole padded row, "
    "16384 float32 values a tile (the backward two: h and g) over 16 warps, past the 128 registers a thread "
    "has at 16 warps. Fix in kernels/givens.py: a column-split (four-step) kernel that runs the low stages on "
    "column tiles and the high stages on a strided view, so a program holds a fraction of a row")
for _target in ("sm_80", "sm_90"):
    for _kernel in ("_givens_forward_kernel", "_givens_backward_kernel"):
        KNOWN_TRITON_SPILLS[(_target, _kernel)] = (("givens (qGOFT) d=14336",), _GIVENS_WIDE)
# ------------------------------------------------------------------------------------------------------

TOKENS, HIDDEN, INTERMEDIATE, RANK, VOCAB = 8192, 4096, 14336, 16, 128256
S2FT_WIDTH = 512  # four 128-wide heads of an attention output projection (columns) or rows of an MLP
NF4_BLOCKSIZE = 64
DTYPES = ("bfloat16", "float16", "float32")
TARGET_NAMES = ("sm_80", "sm_90")
SIXTEEN_BIT = ("bfloat16", "float16")
TIMEOUT_S = 900  # the default cover, cold, on a loaded 2-core machine takes about 5 minutes
FULL_TIMEOUT_S = 3600

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: gpu_static.py
import gpu_static  # noqa: E402  (tests/gpu_static.py)


# ------------------------------------------------------------------------------------- launch scenarios
# Each scenario calls public launchers as fastft's ops call them on CUDA, on meta tensors. ``L`` maps the
# LAUNCHERS names to the functions, ``m(*shape, dtype=...)`` makes a meta tensor of the scenario's dtype.

def _four_bit(m, out_features, in_features):
    import torch

    n = out_features * in_features
    return (m(n // 2, 1, dtype=torch.uint8), m(n // NF4_BLOCKSIZE, dtype=torch.float32), m(16, dtype=torch.float32),
            NF4_BLOCKSIZE)


def _weight(m, four_bit, out_features, in_features):
    """(weight, absmax, code, blocksize) of a dense or NF4 base weight."""
    if four_bit:
        return _four_bit(m, out_features, in_features)
    return m(out_features, in_features), None, None, 0


def _lora(L, m, four_bit, dropout, bias):
    import torch

    n, k = (INTERMEDIATE, HIDDEN) if four_bit else (HIDDEN, HIDDEN)
    w, absmax, code, bs = _weight(m, four_bit, n, k)
    mask = m(TOKENS, k, dtype=torch.bool) if dropout else None
    p = 0.1 if dropout else 0.0
    L.lora_forward(m(TOKENS, k), w, absmax, code, bs, n, m(n) if bias else None, m(RANK, k), m(n, RANK), 2.0, mask, p)
    L.lora_backward(m(TOKENS, n), m(TOKENS, k), m(TOKENS, RANK), w, absmax, code, bs, k, m(RANK, k), m(n, RANK), 2.0,
                    mask, p, True, True, True)


def _dora(L, m, four_bit, dropout, bias):
    import torch

    n, k = (INTERMEDIATE, HIDDEN) if four_bit else (HIDDEN, HIDDEN)
    w, absmax, code, bs = _weight(m, four_bit, n, k)
    f32 = torch.float32 if m.dtype != torch.float64 else torch.float64
    A, B, g = m(RANK, k), m(n, RANK), m(n, dtype=f32)
    norm, proj = L.dora_row_norm(w, absmax, code, bs, n, A, B, m(n, dtype=f32), 2.0, 1e-6)
    L.dora_row_norm_backward(m(n, dtype=f32), norm, proj, w, absmax, code, bs, A, B, 2.0, 1e-6, True, True)
    mask = m(TOKENS, k, dtype=torch.bool) if dropout else None
    p = 0.1 if dropout else 0.0
    b = m(n) if bias else None
    for keep_pre_scale in ((False,) if dropout else (False, True)):
        L.dora_forward(m(TOKENS, k), w, absmax, code, bs, n, b, A, B, g, 2.0, mask, p, keep_pre_scale)
    for saved_is_output in ((False,) if dropout else (True, False)):
        L.dora_backward(m(TOKENS, n), m(TOKENS, k), m(TOKENS, RANK), m(TOKENS, n), saved_is_output, w, absmax, code, bs,
                        k, b, A, B, g, 2.0, mask, p, True, True, True, True)


def _s2ft(L, m, bias):
    L.linear_saving_slice(m(TOKENS, HIDDEN), m(HIDDEN, HIDDEN), m(HIDDEN) if bias else None, S2FT_WIDTH)
    L.slice_weight_grad(m(TOKENS, HIDDEN), m(TOKENS, S2FT_WIDTH), S2FT_WIDTH, False)  # columns: gᵀ x[:, :S]
    L.slice_weight_grad(m(TOKENS, INTERMEDIATE), m(TOKENS, HIDDEN), S2FT_WIDTH, True)  # rows: g[:, :S]ᵀ x


def _sparse_delta(L, m, four_bit, bias):
    """0.5% of a 4096x4096 (or 14336x4096 NF4) weight; the sparse terms by the gather kernel, dv by the SDDMM."""
    import torch

    n, k = (INTERMEDIATE, HIDDEN) if four_bit else (HIDDEN, HIDDEN)
    w, absmax, code, bs = _weight(m, four_bit, n, k)
    nnz = n * k // 200

    def i64(*shape):
        return m(*shape, dtype=torch.int64)

    support = (i64(nnz), i64(nnz), i64(nnz), i64(n + 1), i64(nnz), i64(k + 1))  # indices rows cols row_ptr order col_ptr
    L.sparse_delta_forward(m(TOKENS, k), w, absmax, code, bs, n, m(n) if bias else None, m(nnz), *support, False)
    L.sparse_delta_backward(m(TOKENS, n), m(TOKENS, k), w, absmax, code, bs, k, m(nnz), *support, False, True, True)
    L.sampled_gradient(m(TOKENS, n), m(TOKENS, k), i64(4096), i64(4096))  # SpIEL's candidates


def _cross_entropy(L, m, kind="ce", bias=False, smoothing=0.0, z_loss=0.0, softcap=None, lowrank=False, grads=True):
    import torch

    acc = torch.float32
    lowrank_args = dict(hidden2=m(TOKENS, RANK), weight2=m(VOCAB, RANK), need_dh2=grads, need_dw2=grads) if lowrank else {}
    L.fused_pass(m(TOKENS, HIDDEN), m(VOCAB, HIDDEN), m(VOCAB) if bias else None, m(TOKENS, dtype=torch.int64),
                 m(TOKENS, dtype=acc), m(TOKENS, dtype=acc) if kind == "given" else None, kind, -100, smoothing,
                 z_loss, softcap, 4096, grads, grads, grads and bias, **lowrank_args)


def _hadamard(L, m):
    for d in (HIDDEN, INTERMEDIATE):  # 4096 = 2^12: butterflies only; 14336 = 28 · 2^9: a K-factor of 28
        L.hadamard_transform(m(TOKENS, d), False)
        L.hadamard_transform(m(TOKENS, d), True)


def _fake_quantize(L, m):
    import torch

    for d in (HIDDEN, INTERMEDIATE):
        for rotate in (False, True):
            L.fake_quantize(m(TOKENS, d), 4, "token", 0, True, 1.0, rotate, True)  # activations, per token
            L.fake_quantize_backward(m(TOKENS, d), m(TOKENS, d, dtype=torch.bool), rotate)
    L.fake_quantize(m(HIDDEN, HIDDEN), 4, "group", 128, False, 0.9, False, True)  # weights, asymmetric groups
    L.fake_quantize(m(HIDDEN, HIDDEN), 8, "group", 128, True, 1.0, True, False)
    L.fake_quantize(m(TOKENS, HIDDEN), 8, "tensor", 0, True, 1.0, False, False)
    L.fake_quantize(m(HIDDEN, HIDDEN), 8, "channel", 0, False, 1.0, False, True)


def _dequantize(L, m):
    packed, absmax, code, bs = _four_bit(m, INTERMEDIATE, HIDDEN)
    L.dequantize_4bit(packed, absmax, code, bs, (INTERMEDIATE, HIDDEN), m.dtype)


def _givens(L, m, d):
    import torch

    stages = (d - 1).bit_length()  # 4096: 12 stages; 14336 pads to 16384, 14 stages
    blocks = m(stages, 4, 1 << (stages - 1), dtype=torch.float32)
    L.givens_forward(m(TOKENS, d), blocks)
    L.givens_backward(m(TOKENS, d), m(TOKENS, d), blocks, True, True)
    L.givens_backward(m(TOKENS, d), m(TOKENS, d), blocks, True, False)


SCENARIOS = {
    "lora": lambda L, m: _lora(L, m, False, False, False),
    "lora+dropout+bias": lambda L, m: _lora(L, m, False, True, True),
    "qlora": lambda L, m: _lora(L, m, True, False, False),
    "qlora+dropout": lambda L, m: _lora(L, m, True, True, False),
    "dora": lambda L, m: _dora(L, m, False, False, False),
    "dora+bias": lambda L, m: _dora(L, m, False, False, True),
    "dora+dropout": lambda L, m: _dora(L, m, False, True, False),
    "qdora": lambda L, m: _dora(L, m, True, False, False),
    "qdora+dropout": lambda L, m: _dora(L, m, True, True, False),
    "s2ft": lambda L, m: _s2ft(L, m, False),
    "s2ft+bias": lambda L, m: _s2ft(L, m, True),
    "sparse delta": lambda L, m: _sparse_delta(L, m, False, False),
    "sparse delta+bias over nf4": lambda L, m: _sparse_delta(L, m, True, True),
    "ce": lambda L, m: _cross_entropy(L, m),
    "ce forward only": lambda L, m: _cross_entropy(L, m, grads=False),
    "ce+bias+smoothing+z_loss+softcap": lambda L, m: _cross_entropy(L, m, bias=True, smoothing=0.1, z_loss=1e-4,
                                                                     softcap=30.0),
    "dft": lambda L, m: _cross_entropy(L, m, kind="dft"),
    "talr (given weights)": lambda L, m: _cross_entropy(L, m, kind="given"),
    "ce+lora lm_head": lambda L, m: _cross_entropy(L, m, lowrank=True),
    "hadamard": _hadamard,
    "fake_quantize": _fake_quantize,
    "dequantize_4bit": _dequantize,
    "givens (qGOFT) d=4096": lambda L, m: _givens(L, m, HIDDEN),
    "givens (qGOFT) d=14336": lambda L, m: _givens(L, m, INTERMEDIATE),
}


# ----------------------------------------------------------------------------------------- the worker
def _load(spec: str):
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _kernel_modules():
    import importlib
    import pkgutil

    package = importlib.import_module(KERNEL_PACKAGE)
    return [importlib.import_module(f"{KERNEL_PACKAGE}.{info.name}") for info in pkgutil.iter_modules(package.__path__)]


def _jit_kernels(modules) -> set[str]:
    from triton.runtime.jit import JITFunction

    return {name for module in modules for name, value in vars(module).items()
            if isinstance(value, JITFunction) and name.endswith("_kernel") and value.fn.__module__ == module.__name__}


def _features(launch, dtype: str) -> set:
    """What a variant exercises: its dtype, every flag and tile constexpr (upper-case names; strides equal to
    1 and other specialized integers are left out), its warps and stages, and — so that the heavy variants are
    compiled in half precision too, where spills are asserted — each flag that is on in a 16-bit variant."""
    names = list(launch.signature)
    feats = {("dtype", dtype), ("launch", launch.options.get("num_warps"), launch.options.get("num_stages"))}
    for path, value in launch.constexprs.items():
        name = names[path[0]] if isinstance(path, tuple) else str(path)
        if name.isupper():
            feats.add((name, repr(value)))
            if value is True and dtype in SIXTEEN_BIT:
                feats.add(("16-bit", name))
    return feats


def _cover(variants: list) -> list:
    """Greedy set cover of the (launch, dtype) variants' features: every dtype, flag value, tile and (warps,
    stages) at least once; ties go to the variant with more features (the heavier kernel), then the first."""
    left = list(variants)
    wanted = set().union(*(_features(*v) for v in left)) if left else set()
    chosen = []
    while wanted:
        best = max(left, key=lambda v: (len(_features(*v) & wanted), len(_features(*v))))
        chosen.append(best)
        wanted -= _features(*best)
        left.remove(best)
    return chosen


_SELECTED: list = []  # (target name, launch) for the forked compile workers


def _compile_one(index: int) -> dict:
    target, launch = _SELECTED[index]
    cache = os.environ.get("FASTFT_GPU_STATIC_CACHE")
    return gpu_static.compile_launch(launch, gpu_static.TARGETS[target], Path(cache) if cache else None)


def worker(out_path: str, full: bool, jobs: int) -> None:
    import multiprocessing
    import types
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "the static compile needs the real JIT, not the interpreter"
    L = types.SimpleNamespace(**{name: _load(spec) for name, spec in LAUNCHERS.items()})
    modules = _kernel_modules()
    rows, groups = [], {}
    current = [""]
    for target_name in TARGET_NAMES:
        target = gpu_static.TARGETS[target_name]
        with gpu_static.pretend_gpu(target, modules):
            for dtype_name in DTYPES:
                dtype = getattr(torch, dtype_name)

                def m(*shape, dtype=dtype):
                    return torch.empty(*shape, dtype=dtype, device="meta")

                m.dtype = dtype
                sink: list = []
                with gpu_static.capture_launches(target, sink, lambda: current[0]):
                    for name, scenario in SCENARIOS.items():
                        current[0] = name
                        scenario(L, m)
                for launch in sink:
                    key = (target_name, dtype_name, launch.kernel)
                    seen = groups.setdefault(key, {})
                    ident = launch.identity()
                    if ident in seen:
                        seen[ident][1].add(launch.origin)
                        seen[ident][2].append(list(launch.grid))
                    else:
                        seen[ident] = (launch, {launch.origin}, [list(launch.grid)])
    by_kernel: dict = {}
    for (target_name, dtype_name, kernel), seen in sorted(groups.items()):
        by_kernel.setdefault((target_name, kernel), []).extend((v[0], dtype_name) for v in seen.values())
    for (target_name, kernel), variants in sorted(by_kernel.items()):
        chosen = variants if full else _cover(variants)
        for launch, dtype_name in variants:
            _, origins, grids = groups[(target_name, dtype_name, kernel)][launch.identity()]
            picked = any(launch is c[0] for c in chosen)
            rows.append(dict(target=target_name, dtype=dtype_name, kernel=kernel, origins=sorted(origins),
                             grids=grids, compiled=picked, launch=gpu_static.describe(launch)))
            if picked:
                _SELECTED.append((target_name, launch))
    compiled_rows = [r for r in rows if r["compiled"]]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(max(1, jobs)) as pool:
        results = pool.map(_compile_one, range(len(_SELECTED)), chunksize=1)
    for row, result in zip(compiled_rows, results):
        row["result"] = result
    Path(out_path).write_text(json.dumps(dict(rows=rows, kernels=sorted(_jit_kernels(modules))), indent=1))


# ------------------------------------------------------------------------------------------- fixtures
def _cache_dir(request) -> Path:
    """``.pytest_cache/d/fastft-gpu-static`` (kept between runs), or a temporary directory under ``-p no:cacheprovider``."""
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("fastft-gpu-static"))
    return request.getfixturevalue("tmp_path_factory").mktemp("fastft-gpu-static")


@pytest.fixture(scope="module")
def static_compile(request):
    pytest.importorskip("triton.backends.nvidia")
    cache = _cache_dir(request)
    out = cache / "last-run.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(FASTFT_GPU_STATIC_CACHE=str(cache / "results"), TRITON_CACHE_DIR=str(cache / "triton"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")])))
    full = os.environ.get("FASTFT_GPU_STATIC", "") == "full"
    jobs = str(min(4, os.cpu_count() or 1))
    done = subprocess.run([sys.executable, __file__, "--worker", str(out), "1" if full else "0", jobs], env=env,
                          capture_output=True, text=True, timeout=FULL_TIMEOUT_S if full else TIMEOUT_S,
                          cwd=str(REPO))
    assert done.returncode == 0, f"static compile worker failed:\n{done.stdout[-2000:]}\n{done.stderr[-6000:]}"
    data = json.loads(out.read_text())
    report = _report(data)
    (cache / "report.md").write_text(report)
    print("\n" + report.split("\n## Variants")[0])
    return data


def _rows(data, target=None, dtype=None, compiled=True):
    return [r for r in data["rows"] if (not compiled or r["compiled"]) and (target is None or r["target"] == target)
            and (dtype is None or r["dtype"] == dtype)]


def _report(data) -> str:
    lines = ["# Static GPU compile: what the launchers compile at LLM shapes", "",
             f"tokens {TOKENS}, hidden {HIDDEN}, intermediate {INTERMEDIATE}, rank {RANK}, vocabulary {VOCAB}; "
             "registers and spills from ptxas -v, shared memory from Triton's metadata.", "",
             "| target | dtype | kernel | variants captured | compiled | max regs | max shared KiB | spill stores/loads B |",
             "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["target"], r["dtype"], r["kernel"]) for r in data["rows"]})
    for target, dtype, kernel in keys:
        allv = [r for r in data["rows"] if (r["target"], r["dtype"], r["kernel"]) == (target, dtype, kernel)]
        done = [r["result"] for r in allv if r["compiled"] and r["result"].get("ok")]
        regs = max((d["regs"] for d in done), default=0)
        shared = max((d["shared"] for d in done), default=0)
        stores = max((d["spill_stores"] for d in done), default=0)
        loads = max((d["spill_loads"] for d in done), default=0)
        lines.append(f"| {target} | {dtype} | {kernel} | {len(allv)} | {len(done)}/{sum(r['compiled'] for r in allv)} "
                     f"| {regs} | {shared / 1024:.1f} | {stores}/{loads} |")
    lines += ["", "## Variants", ""]
    for r in data["rows"]:
        if r["compiled"]:
            res = r["result"]
            lines.append(f"- {r['target']} {r['dtype']} {r['kernel']} ({', '.join(r['origins'])}): "
                         + (f"{res['regs']} regs, {res['shared']} B shared, spills {res['spill_stores']}/"
                            f"{res['spill_loads']} B" if res.get("ok") else f"FAILED {res.get('error', '')[:300]}")
                         + f"; constexprs {r['launch']['constexprs']}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- tests
CASES = [(t, d) for t in TARGET_NAMES for d in DTYPES]


@pytest.mark.parametrize("target,dtype", CASES)
def test_every_variant_compiles(static_compile, target, dtype):
    rows = _rows(static_compile, target, dtype)
    assert rows, "no launches captured"
    failed = [(r["kernel"], r["origins"], r["result"].get("error", "")[:1500]) for r in rows if not r["result"].get("ok")]
    assert not failed, failed


@pytest.mark.parametrize("target,dtype", CASES)
def test_shared_memory_fits_one_block(static_compile, target, dtype):
    limit = gpu_static.TARGETS[target].shared_per_block
    over = [(r["kernel"], r["origins"], r["result"]["shared"]) for r in _rows(static_compile, target, dtype)
            if r["result"].get("ok") and r["result"]["shared"] > limit]
    assert not over, f"more than {limit} B of shared memory per block on {target}: {over}"


@pytest.mark.parametrize("target,dtype", [(t, d) for t, d in CASES if d in SIXTEEN_BIT])
def test_16bit_variants_do_not_spill(static_compile, target, dtype):
    spills = [(r["kernel"], r["origins"], r["result"]["regs"], r["result"]["spill_stores"], r["result"]["spill_loads"])
              for r in _rows(static_compile, target, dtype)
              if r["result"].get("ok") and (r["result"]["spill_stores"] or r["result"]["spill_loads"])]
    unknown = [s for s in spills if not set(s[1]) <= set(KNOWN_TRITON_SPILLS.get((target, s[0]), ((), ""))[0])]
    assert not unknown, unknown
    if spills:
        reasons = "; ".join(sorted({KNOWN_TRITON_SPILLS[(target, s[0])][1] for s in spills}))
        pytest.xfail(f"known spills {spills}: {reasons}")


@pytest.mark.parametrize("target,dtype", CASES)
def test_every_kernel_is_compiled(static_compile, target, dtype):
    compiled = {r["kernel"] for r in _rows(static_compile, target, dtype)}
    missing = set(static_compile["kernels"]) - compiled
    assert not missing, f"no scenario launches {sorted(missing)}: add one to SCENARIOS"


def test_grids_fit_cuda_limits(static_compile):
    bad = [(r["target"], r["dtype"], r["kernel"], g) for r in _rows(static_compile, compiled=False) for g in r["grids"]
           if not (1 <= g[0] < 2**31 and all(1 <= v <= 65535 for v in g[1:]))]
    assert not bad, bad


# ---------------------------------------------------------------------------------------------- nvcc
KNOWN_CUDA_SPILLS = {
    # kernel (demangled, without namespace) -> why it spills and when the dispatch picks it.
    "rows_kernel<float, 32>": (
        "__launch_bounds__(1024) caps it at 64 registers and it holds 32 float values a thread: it spills. "
        "Picked with FASTFT_BACKEND=cuda for 8192 < d <= 32768 (fastft._ext.cuda_max_row(float32) = 32768); "
        "fix in csrc/hadamard_cuda.cu (fewer values a thread, or smaller launch bounds for this instantiation)"),
    "rows_kernel<double, 16>": (
        "__launch_bounds__(1024) caps it at 64 registers and it holds 16 double values a thread: it spills. "
        "Picked with FASTFT_BACKEND=cuda for float64 rows with 8192 < d <= 16384 (cuda_max_row(float64) = 16384)"),
    "rows_kernel<double, 8>": (
        "__launch_bounds__(1024) caps it at 64 registers; with 8 double values a thread ptxas spills a few bytes. "
        "Picked with FASTFT_BACKEND=cuda for float64 rows with d <= 8192"),
}
CUDA_ARCHS = ("80", "90")


def _find_nvcc():
    for candidate in (os.environ.get("FASTFT_NVCC"), os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "bin", "nvcc"),
                      shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def _kernel_sources() -> list[Path]:
    return sorted(p for p in (REPO / "csrc").glob("*.cu") if "__global__" in p.read_text())


_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\d+)'")


def _demangle(names: list[str], nvcc: str) -> dict:
    filt = os.path.join(os.path.dirname(nvcc), "cu++filt")
    tool = filt if os.path.exists(filt) else shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    clean = []
    for line in out:  # "void fastft::(anonymous namespace)::rows_kernel<float, 8>(fastft::...::RowsParams)"
        line = re.sub(r"^void ", "", line.replace("(anonymous namespace)::", ""))
        clean.append(re.sub(r"^(\w+::)+", "", line.split("(")[0]))
    return dict(zip(names, clean)) if len(clean) == len(names) else {n: n for n in names}


def _ptxas_kernels(log: str) -> dict:
    """{(arch, mangled kernel): {regs, spill_stores, spill_loads, stack}} from an ``-Xptxas -v`` log."""
    parts = _PTXAS_ENTRY.split(log)
    found = {}
    for i in range(1, len(parts) - 2, 3):
        name, arch, body = parts[i], parts[i + 1], parts[i + 2]
        found[(arch, name)] = gpu_static.parse_ptxas_log(body)
    return found


def _demangled(found: dict, nvcc: str) -> dict:
    names = _demangle(sorted({n for _, n in found}), nvcc)
    return {(arch, names[n]): v for (arch, n), v in found.items()}


def _compile_cuda(source: Path, arch: str, flags: list[str], nvcc: str, out_dir: Path):
    cmd = [nvcc, *flags, f"-gencode=arch=compute_{arch},code=sm_{arch}", "-cubin", "-Xptxas", "-v", "-I",
           str(REPO / "csrc"), str(source), "-o", str(out_dir / f"{source.stem}.sm_{arch}.cubin")]
    return cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def cuda_ptxas(request, tmp_path_factory):
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found ($FASTFT_NVCC, $CUDA_HOME/bin/nvcc, PATH, /usr/local/cuda/bin/nvcc)")
    toolchain = _load(CUDA_TOOLCHAIN)()
    # the build's flags without its -gencode list and host-compiler options (a cubin per arch instead)
    flags, skip = [], False
    for flag in toolchain.cflags:
        if skip:
            skip = False
            continue
        if flag == "-Xcompiler":
            skip = True
            continue
        if not flag.startswith("-gencode"):
            flags.append(flag)
    sources = _kernel_sources()
    key = hashlib.sha256(json.dumps(["mangled", toolchain.version, flags, CUDA_ARCHS,
                                     [(p.name, p.read_text()) for p in sorted((REPO / "csrc").iterdir()) if p.is_file()]
                                     ]).encode()).hexdigest()[:24]
    stored = _cache_dir(request) / f"ptxas-{key}.json"
    if stored.exists():
        data = json.loads(stored.read_text())
        return _demangled({(a, k): v for a, k, v in data["kernels"]}, nvcc), data["flags"]
    out_dir = tmp_path_factory.mktemp("cubin")
    # one nvcc per (source, arch), two at a time: the float32 row kernel alone takes ptxas ~20 s
    jobs = [(s, a) for s in sources for a in CUDA_ARCHS]
    logs, running = [], []
    for source, arch in jobs:
        running.append(_compile_cuda(source, arch, flags, nvcc, out_dir))
        if len(running) >= 2:
            cmd, proc = running.pop(0)
            logs.append((cmd, proc.communicate(timeout=TIMEOUT_S)[0], proc.returncode))
    for cmd, proc in running:
        logs.append((cmd, proc.communicate(timeout=TIMEOUT_S)[0], proc.returncode))
    for cmd, log, rc in logs:
        assert rc == 0, f"{' '.join(cmd)} failed:\n{log[-4000:]}"
    kernels = {}
    for _, log, _ in logs:
        kernels.update(_ptxas_kernels(log))
    stored.write_text(json.dumps(dict(flags=flags, kernels=[[a, k, v] for (a, k), v in sorted(kernels.items())])))
    return _demangled(kernels, nvcc), flags


def test_every_cuda_kernel_is_compiled_for_both_archs(cuda_ptxas):
    kernels, flags = cuda_ptxas
    assert "--fmad=false" in flags  # the build's flags, not a guess
    names = {k for _, k in kernels}
    assert any(n.startswith("rows_kernel") for n in names) and any("dequantize_4bit" in n for n in names), names
    for arch in CUDA_ARCHS:
        assert {k for a, k in kernels if a == arch} == names, f"sm_{arch} lacks some kernels"
    lines = [f"sm_{a} {k}: {v['regs']} regs, stack {v['stack']} B, spills {v['spill_stores']}/{v['spill_loads']} B"
             for (a, k), v in sorted(kernels.items())]
    print("\n" + "\n".join(lines))


def _cuda_cases():
    # The CUDA kernels of csrc/ as the build instantiates them; every one is reachable when FASTFT_BACKEND
    # names "cuda" (fastft.dispatch; the op limits admit rows up to cuda_max_row: 32768 float, 16384 double).
    names = ["rows_kernel<float, 8>", "rows_kernel<float, 32>", "rows_kernel<double, 8>", "rows_kernel<double, 16>",
             "dequantize_4bit_kernel<float>", "dequantize_4bit_kernel<double>",
             "dequantize_4bit_kernel<__nv_bfloat16>", "dequantize_4bit_kernel<__half>"]
    return [(a, n) for a in CUDA_ARCHS for n in names]


@pytest.mark.parametrize("arch,kernel", _cuda_cases())
def test_cuda_kernels_the_dispatch_can_pick_do_not_spill(cuda_ptxas, arch, kernel):
    kernels, _ = cuda_ptxas
    assert (arch, kernel) in kernels, f"sm_{arch} {kernel} not in the ptxas log: {sorted(kernels)}"
    info = kernels[(arch, kernel)]
    spills = info["spill_stores"] or info["spill_loads"]
    if spills and kernel in KNOWN_CUDA_SPILLS:
        pytest.xfail(f"sm_{arch} {kernel}: {info['regs']} registers, spills {info['spill_stores']}/"
                     f"{info['spill_loads']} B: {KNOWN_CUDA_SPILLS[kernel]}")
    assert not spills, f"sm_{arch} {kernel} spills: {info}"


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--worker":
    worker(sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]))

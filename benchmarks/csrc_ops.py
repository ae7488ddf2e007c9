"""The C++ CPU kernels of csrc/ against the PyTorch reference and torch.compile of the reference.

    python -m benchmarks.csrc_ops --quick   # this module's benchmarks through the suite's command line
    python -m benchmarks.csrc_ops           # their full sweep (the suite's options apply: --only, --out, ...)

This module only declares its cases and how to run one; the command line, CSV, plots, summary and sanity
checks are the suite's (``benchmarks.suite``), the measurement procedure ``benchmarks.harness``'s. The text
below describes what the benchmarks measure (targets are reported by the summary's ratios, never asserted).

Three ops, each on a tokens × d input, for every d:
  transform     ``hadamard_transform(x)``: y = x H_dᵀ;
  fused fq      ``fake_quantize(x, 8, "token", rotate=True, ste="clipped")``'s forward: rotate, per-token
                8-bit asymmetric quantize-dequantize, and the 1-byte "not clamped" mask;
  ste backward  its backward: dL/dx = (mask ⊙ dL/dout) H_d, the inverse rotation of the masked gradient.

Providers, interleaved in one process (``fastft.measure.time_interleaved``):
  cpp           the C++ library (``fastft._ext``: what the ``cpp`` backend, the default on CPU, runs);
  reference     the PyTorch reference (``fastft.ops.hadamard`` / ``fake_quantize`` ``*_reference``);
  compiled      ``torch.compile`` of the reference (inductor's C++ code for the CPU); a reference that
                does not compile is reported as such (skipped with ``--no-compile`` and in ``--quick``).
Before timing, cpp is checked against the reference (bit for bit for d a power of two and for the
masks; to 1e-5 relative otherwise).

Bytes moved: what the op must read and write at least (x, out, the mask; 4 bytes an element in
float32), the same for every provider; GB/s is that over the median time. Peak live: the peak bytes of
the tensors one call allocates (``measure.peak_live_bytes``), which shows the reference's temporaries.
Target (issue 8): cpp at least 3x faster than the reference for the transform and the fused fq at
d=4096, reported as met / not met. The machine's 1-minute load average is printed before and after.

In ``python -m benchmarks`` (``suite_benchmarks``: "hadamard", "rotate_quantize") the same ops run
through the public autograd ops on every fastft backend (``torch`` = the reference, ``cpp``;
``triton``/``cuda`` on a GPU) beside what one writes without fastft — the rotation as a dense matmul by
H_d, the quantization with a detach-style STE — eager and under torch.compile (full sweep), forward,
backward and step, with the suite's metrics.
"""
from __future__ import annotations

import sys

import torch

from fastft.ops.fake_quantize import fake_quantize_reference



DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SIZES = (1024, 4096, 11008)
QUICK = dict(tokens=128, sizes=[1024, 4096], repeats=3, warmup=1, compile=False)
TARGET_SPEEDUP = 3.0
TARGET_D = 4096
OPS = ("transform", "fused fq", "ste backward")


def bytes_moved(op: str, tokens: int, d: int, element: int) -> int:
    n = tokens * d
    return {"transform": 2 * n * element, "fused fq": 2 * n * element + n, "ste backward": 2 * n * element + n}[op]


# --------------------------------------------------------------------------- the suite (python -m benchmarks)
SUITE_SWEEPS = {
    ("cpu", "quick"): (dict(d=1024, tokens=256, dtype="float32"), dict(d=[1024, 1536])),  # 1536 = 12·128: a K-factor
    ("cpu", "full"): (dict(d=4096, tokens=2048, dtype="float32"),
                      dict(d=[1024, 4096, 11008], dtype=["float32", "bfloat16"])),
    ("cuda", "quick"): (dict(d=4096, tokens=2048, dtype="bfloat16"), dict(d=[1024, 4096, 11008])),
    ("cuda", "full"): (dict(d=4096, tokens=8192, dtype="bfloat16"),
                       dict(d=[1024, 4096, 11008, 14336], tokens=[2048, 8192, 32768], dtype=["float32", "bfloat16"])),
}


def dense_rotate_quantize(x: torch.Tensor, H: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Rotation by the dense H_d (a matmul) + per-token asymmetric fake quantization with the clipped STE,
    in plain differentiable PyTorch: what one writes without fastft (gradient: autograd through the
    matmul, masked where the code was clamped)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    rotated = x.to(compute) @ H.t()
    codes, keep = fake_quantize_reference(rotated.detach(), bits, "token", 128, False, 1.0, False, True)
    passed = torch.where(keep, rotated, rotated.detach())
    return (passed + (codes - passed).detach()).to(x.dtype)


def _suite_subjects(op: str, config: dict, ctx) -> list:
    from fastft.ops import fake_quantize, hadamard_transform

    from .hadamard import dense_hadamard
    from .harness import DTYPES as HARNESS_DTYPES
    from .harness import Subject, compiled_peer, fastft_backends, forced_backend

    dtype, device = HARNESS_DTYPES[config["dtype"]], ctx.device
    gen = torch.Generator().manual_seed(config["d"])
    x = torch.randn(config["tokens"], config["d"], generator=gen).to(device, dtype).requires_grad_(True)
    grad = torch.randn(config["tokens"], config["d"], generator=gen).to(device, dtype)
    if op == "hadamard_transform":
        H = dense_hadamard(config["d"], dtype, device)
        ours, peer = (lambda: hadamard_transform(x)), (lambda t: t @ H.t())
    else:
        H = dense_hadamard(config["d"], torch.float64 if dtype == torch.float64 else torch.float32, device)
        ours = lambda: fake_quantize(x, 8, "token", rotate=True, ste="clipped")  # noqa: E731
        peer = lambda t: dense_rotate_quantize(t, H)  # noqa: E731
    subjects: list = []
    backends, skipped = fastft_backends(op if op == "hadamard_transform" else "fake_quantize", device)
    for backend in backends:
        subjects.append(Subject("fastft", backend, "fastft", ours, grad, [x],
                                context=lambda backend=backend: forced_backend(backend),
                                flops_context=lambda: forced_backend("torch")))
    subjects += skipped
    subjects.append(Subject("pytorch", "dense", "peer", lambda: peer(x), grad, [x], parameters=[H]))
    # compiled: the dense version (fastft's O(d log d) reference writes its butterflies with out=, which autograd
    # and so torch.compile's autograd tracing refuse; the op's own backward is the inverse transform)
    subjects.append(compiled_peer(ctx, peer, (x,), grad, [x], [H], what="the dense version"))
    if op == "hadamard_transform":
        subjects.append(_fast_hadamard_transform(ctx, x, grad))
    return subjects


def _fast_hadamard_transform(ctx, x, grad):
    """Dao-AILab's fast-hadamard-transform (a CUDA extension): the GPU peer of the transform."""
    from .harness import Skipped, Subject, installed, not_run_here

    if not ctx.on_gpu:
        return not_run_here("fast-hadamard-transform", "cuda", "peer", "a CUDA extension (its wheel builds with nvcc "
                            "against a CUDA torch): GPU only")
    if not installed("fast_hadamard_transform"):
        return Skipped("fast-hadamard-transform", "cuda", "peer", "fast-hadamard-transform is not installed: its peer "
                       "skipped (pip install fast-hadamard-transform, built against this torch)")
    import math

    from fast_hadamard_transform import hadamard_transform as fht

    d = x.shape[-1]
    if d & (d - 1):
        return not_run_here("fast-hadamard-transform", "cuda", "peer", f"d={d} is not a power of two (it handles 2^n)")
    return Subject("fast-hadamard-transform", "cuda", "peer", lambda: fht(x, scale=1 / math.sqrt(d)), grad, [x])


def _suite_min_bytes(op: str, config: dict, mode: str) -> int:
    from .harness import DTYPES as HARNESS_DTYPES

    n = config["tokens"] * config["d"]
    e = torch.empty(0, dtype=HARNESS_DTYPES[config["dtype"]]).element_size()
    mask = n if op == "rotate_quantize" else 0
    forward, backward = 2 * n * e + mask, 2 * n * e + mask
    return {"forward": forward, "backward": backward, "step": forward + backward}[mode]


def _suite_cases(op: str, sweeps: dict):
    from .harness import layer_case, sweep_of, sweep_points

    def estimate(ctx, point) -> float:
        if ctx.on_gpu:
            return 15.0
        calls = 4 * (7 + 3 * (ctx.warmup + ctx.repeats))  # providers x (passes + timed modes)
        compile_s = 0.0 if ctx.quick else 60.0
        return calls * point["tokens"] * point["d"] * 50e-9 * ctx.contention + compile_s + 2.0

    def cases(ctx) -> list:
        base, variables = sweep_of(op, sweeps, ctx)
        return [
            layer_case(op, point, x_names, build=lambda config, ctx: _suite_subjects(op, config, ctx),
                       min_bytes=lambda config, mode: _suite_min_bytes(op, config, mode),
                       estimate_s=lambda ctx, point=point: estimate(ctx, point))
            for point, x_names in sweep_points(base, variables)
        ]

    return cases


def suite_benchmarks(sweeps: dict | None = None) -> list:
    """The QAT ops in ``python -m benchmarks``: every fastft backend (``cpp`` on CPU) against the dense
    PyTorch version, eager and compiled ("hadamard": the transform; "rotate_quantize": rotate + per-token
    8-bit fake quantization with the clipped STE), forward, backward and step."""
    from .harness import Benchmark

    sweeps = sweeps or SUITE_SWEEPS
    return [
        Benchmark("hadamard", _suite_cases("hadamard_transform", sweeps),
                  "the Hadamard transform x H_dᵀ over the last dim, forward + backward", tags=("op", "qat")),
        Benchmark("rotate_quantize", _suite_cases("rotate_quantize", sweeps),
                  "rotate + per-token 8-bit fake quantization (clipped STE), forward + backward", tags=("op", "qat")),
    ]


if __name__ == "__main__":
    from .suite import main_module

    sys.exit(main_module("csrc_ops", suite_benchmarks()))

"""Hadamard rotation and fake quantization: fastft's ops beside a dense matmul, the unfused PyTorch composite and torchao.

    python -m benchmarks.hadamard --quick   # this module's benchmarks through the suite's command line
    python -m benchmarks.hadamard           # their full sweep (the suite's options apply: --only, --out, ...)

This module only declares its cases and how to run one; the command line, CSV, plots, summary and sanity
checks are the suite's (``benchmarks.suite``), the measurement procedure ``benchmarks.harness``'s. The text
below describes what the benchmarks measure (targets are reported by the summary's ratios, never asserted).

Three tables, every provider measured side by side in one process (``fastft.measure``):

1. Transform, forward, x (tokens × d): ``fastft`` = ``fastft.ops.hadamard_transform`` (the O(d log d)
   transform; fastft's default backend: on this CPU the C++ library where it builds, else the PyTorch
   reference; on CUDA the Triton kernel) against ``dense`` =
   ``x @ H_dᵀ`` with the dense matrix built once beforehand. Columns: time; matmul GFLOP counted by
   FlopCounterMode (it counts matrix products only: the dense matmul, the fastft K×K product; a
   butterfly's additions count 0); and the analytic operation count (every add and multiply: butterflies
   d·log2(2^n) per row, the K-factor product 2·K·d per row, the 1/sqrt(d) scale d per row; dense 2·d²).
   The dense matrix of the largest sizes is big (0.8 GB for 14336 in float32): ``--quick`` times the
   dense matmul only up to d = 4096 and reports the larger ones as unmeasured (their FLOPs are still
   counted, on meta tensors).
2. Rotate + per-token 8-bit asymmetric fake quantization (activations, as R4 / the online rotations
   use it), forward + backward with the identity STE, x requires grad. ``fastft`` = ``fake_quantize(x, 8,
   rotate=True)`` (one op: transform then quantize; on CUDA one fused Triton kernel);
   ``dense+composite`` = dense rotation then the per-token formula written in plain PyTorch with the STE
   as ``x + (fq(x) - x).detach()`` (the unfused composite); ``fwht+composite`` = fastft's transform then
   the same composite; ``dense+torchao`` = dense rotation then torchao's ``IntxFakeQuantizer`` (int8 per
   token, asymmetric), when torchao is installed. Columns also: bytes saved for backward (the dense H
   excluded: it is a constant the model would own) and peak live bytes.
3. Weight fake quantization (no rotation), 4-bit symmetric groups of 128 over a d×d weight, forward +
   backward: ``fastft`` vs the plain composite vs torchao (int4 per group, symmetric). torchao's
   formulas differ slightly from fastft's (its symmetric scale divides by (qmax - qmin)/2 = 7.5, fastft's
   by qmax = 7; its int8 per-token range is [-128, 127] with a zero point, fastft's [0, 255]): the same
   work, not the same numbers.

Targets (the issue sets no number; reported, never asserted): the FWHT cheaper than the dense matmul in
time and FLOPs at every size; fastft's rotate+quantize not slower than the unfused composites and
saving no more for backward. On this CPU the numbers compare PyTorch implementations; the Triton
kernels are timed only on a GPU (``unmeasured`` here).
"""
from __future__ import annotations

import math
import sys
import warnings
from typing import Optional

import torch

from fastft.ops import fake_quantize
from fastft.ops.hadamard import hadamard_factorization, hadamard_k_factor



DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SIZES = (1024, 4096, 11008, 14336)
QUICK = dict(tokens=64, repeats=3, warmup=1, quant_features=1024, dense_limit=4096)


def dense_hadamard(d: int, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    """H_d = (H_K ⊗ S) / sqrt(d) built directly in ``dtype`` (the float64 hadamard_matrix would double the memory)."""
    K, n = hadamard_factorization(d)
    H = torch.kron(hadamard_k_factor(K, dtype, device), hadamard_k_factor(1 << n, dtype, device))
    return H.mul_(1.0 / math.sqrt(d))


def fwht_analytic_flops(tokens: int, d: int) -> int:
    K, n = hadamard_factorization(d)
    return tokens * (d * n + (2 * K * d if K > 1 else 0) + d)


# --------------------------------------------------------------------------- 1. the transform


# --------------------------------------------------------------------------- 2./3. fake quantization
def composite_fake_quantize(x: torch.Tensor, bits: int, group: Optional[int], symmetric: bool) -> torch.Tensor:
    """The per-token / per-group formula of fastft.ops.fake_quantize in plain PyTorch, STE by detach."""
    shape = x.shape
    xc = x.float()
    xg = xc.reshape(-1, shape[-1] // group, group) if group else xc.reshape(-1, 1, shape[-1])
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (xg.detach().abs().amax(-1, keepdim=True) / qmax).clamp_min(1e-8)
        q = torch.clamp(torch.round(xg.detach() / scale), -qmax - 1, qmax)
        out = q * scale
    else:
        qmax = 2**bits - 1
        hi = xg.detach().amax(-1, keepdim=True).clamp_min(0)
        lo = xg.detach().amin(-1, keepdim=True).clamp_max(0)
        scale = ((hi - lo) / qmax).clamp_min(1e-8)
        zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(xg.detach() / scale) + zero, 0, qmax)
        out = (q - zero) * scale
    out = out.reshape(shape).to(x.dtype)
    return x + (out - x).detach()


def torchao_quantizer(bits: int, group: Optional[int], symmetric: bool):
    """torchao's IntxFakeQuantizer (int8 per token asymmetric, or int4 per group symmetric); None if absent."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization.qat import IntxFakeQuantizeConfig, IntxFakeQuantizer
    except Exception:
        return None
    if group is None:
        config = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=symmetric)
    else:
        config = IntxFakeQuantizeConfig(torch.int4, group_size=group, is_symmetric=symmetric)
    return IntxFakeQuantizer(config)


# --------------------------------------------------------------------------- output


# ------------------------------------------------------------------------------------------- in the suite
# ``python -m benchmarks`` runs "fake_quant_weight" from here: 4-bit symmetric fake quantization in groups of 128
# of a d × d weight, forward + backward, fastft on every backend that runs here vs ``composite`` (the formula in
# plain PyTorch, STE by detach) and torchao's fake quantizer when installed (a skipped row says so otherwise).
# The transform and the rotate + quantize of activations are in the suite through ``benchmarks.csrc_ops``
# ("hadamard", "rotate_quantize": every backend, C++ included, against the dense PyTorch version).
WEIGHT_SUITE_SWEEPS = {
    ("cpu", "quick"): (dict(d=1024, dtype="float32"), dict(d=[1024])),
    ("cpu", "full"): (dict(d=4096, dtype="float32"), dict(d=[1024, 4096, 11008], dtype=["float32", "bfloat16"])),
    ("cuda", "quick"): (dict(d=4096, dtype="bfloat16"), dict(d=[4096, 14336])),
    ("cuda", "full"): (dict(d=4096, dtype="bfloat16"), dict(d=[1024, 4096, 11008, 14336], dtype=["bfloat16", "float32"])),
}


def weight_quantize_subjects(config: dict, ctx) -> list:
    from .harness import DTYPES, Skipped, Subject, compiled_peer, fastft_backends, forced_backend

    d, dtype = config["d"], DTYPES[config["dtype"]]
    gen = torch.Generator().manual_seed(8)
    w = (torch.randn(d, d, generator=gen) / math.sqrt(d)).to(ctx.device, dtype).requires_grad_(True)
    grad = torch.randn(d, d, generator=gen).to(ctx.device, dtype)
    backends, skipped = fastft_backends("fake_quantize", ctx.device)
    subjects: list = [
        Subject("fastft", backend, "fastft", lambda: fake_quantize(w, 4, "group", 128, symmetric=True), grad, [w],
                context=lambda backend=backend: forced_backend(backend), flops_context=lambda: forced_backend("torch"))
        for backend in backends
    ] + skipped
    subjects.append(Subject("composite", "eager", "peer", lambda: composite_fake_quantize(w, 4, 128, True), grad, [w]))
    subjects.append(compiled_peer(ctx, lambda t: composite_fake_quantize(t, 4, 128, True), (w,), grad, [w],
                                  what="the composite formula"))
    ao = torchao_quantizer(4, 128, True)
    if ao is not None:
        subjects.append(Subject("torchao", "eager", "peer", lambda: ao(w), grad, [w]))
    else:
        subjects.append(Skipped("torchao", "eager", "peer", "torchao is not installed: its fake quantizer peer skipped "
                                "(pip install torchao)"))
    return subjects


def _weight_min_bytes(config: dict, mode: str) -> int:
    """Read the weight once and write its fake-quantized copy once (forward), the same for the gradient."""
    from .harness import DTYPES

    once = 2 * config["d"] ** 2 * torch.empty(0, dtype=DTYPES[config["dtype"]]).element_size()
    return {"forward": once, "backward": once, "step": 2 * once}[mode]


def suite_benchmarks(weight_sweeps: dict | None = None) -> list:
    """The weight fake-quantization benchmark of ``python -m benchmarks`` ("fake_quant_weight"); sweeps
    replaceable (tests)."""
    from .harness import Benchmark, layer_case, layer_estimate, sweep_of, sweep_points

    table = weight_sweeps or WEIGHT_SUITE_SWEEPS

    def cases(ctx) -> list:
        base, variables = sweep_of("fake_quant_weight", table, ctx)
        return [layer_case("fake_quant_weight", point, x_names, build=weight_quantize_subjects,
                           min_bytes=_weight_min_bytes,
                           estimate_s=lambda ctx, point=point: layer_estimate(0.0, 3, ctx))
                for point, x_names in sweep_points(base, variables)]

    return [Benchmark("fake_quant_weight", cases, "4-bit group fake quantization of a weight vs the composite, "
                      "forward + backward", tags=("layer", "qat"))]


if __name__ == "__main__":
    from .suite import main_module

    sys.exit(main_module("hadamard", suite_benchmarks()))

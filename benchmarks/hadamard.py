"""Hadamard rotation and fake quantization: fastft's ops beside a dense matmul, the unfused PyTorch composite and torchao.

    python -m benchmarks.hadamard                   # tokens=2048, d in {1024, 4096, 11008, 14336}, float32
    python -m benchmarks.hadamard --quick           # tokens=64, about ten seconds on 2 idle cores
    python -m benchmarks.hadamard --csv qat.csv     # also one CSV row per measurement

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

import argparse
import csv
import math
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fastft.dispatch import backend_for
from fastft.ops import fake_quantize, hadamard_transform
from fastft.ops.hadamard import hadamard_factorization, hadamard_k_factor

from fastft import measure

from . import cli

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SIZES = (1024, 4096, 11008, 14336)
QUICK = dict(tokens=64, repeats=3, warmup=1, quant_features=1024, dense_limit=4096)


@dataclass
class Row:
    table: str
    d: int
    provider: str
    timing: Optional[measure.Timing]
    counted_flops: int
    analytic_flops: Optional[int] = None
    saved_bytes: Optional[int] = None
    peak_live_bytes: Optional[int] = None


def dense_hadamard(d: int, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    """H_d = (H_K ⊗ S) / sqrt(d) built directly in ``dtype`` (the float64 hadamard_matrix would double the memory)."""
    K, n = hadamard_factorization(d)
    H = torch.kron(hadamard_k_factor(K, dtype, device), hadamard_k_factor(1 << n, dtype, device))
    return H.mul_(1.0 / math.sqrt(d))


def fwht_analytic_flops(tokens: int, d: int) -> int:
    K, n = hadamard_factorization(d)
    return tokens * (d * n + (2 * K * d if K > 1 else 0) + d)


def _load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _meta_flops(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], tokens: int, d: int, dtype) -> int:
    x = torch.empty(tokens, d, dtype=dtype, device="meta")
    H = torch.empty(d, d, dtype=dtype, device="meta")
    return measure.flops(lambda: fn(x, H))


# --------------------------------------------------------------------------- 1. the transform
def transform_table(tokens: int, sizes, dtype, repeats: int, warmup: int, dense_limit: int) -> list[Row]:
    rows = []
    for d in sizes:
        x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(d)).to(dtype)
        providers = {"fastft": lambda x=x: hadamard_transform(x)}
        H = None
        if d <= dense_limit:
            H = dense_hadamard(d, dtype)
            providers["dense"] = lambda x=x, H=H: x @ H.t()
            err = (providers["fastft"]().float() - providers["dense"]().float()).abs().max().item()
            if err > 1e-2:
                raise AssertionError(f"d={d}: FWHT and dense matmul disagree by {err}")
        timings = measure.time_interleaved(providers, repeats=repeats, warmup=warmup)
        rows.append(Row("transform", d, "fastft", timings["fastft"], measure.flops(providers["fastft"]),
                        fwht_analytic_flops(tokens, d)))
        dense_flops = _meta_flops(lambda x, H: x @ H.t(), tokens, d, dtype)
        rows.append(Row("transform", d, "dense", timings.get("dense"), dense_flops, 2 * tokens * d * d))
        del H
    return rows


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


def _quant_rows(table: str, d: int, providers: dict, x: torch.Tensor, grad: torch.Tensor, constants: list,
                repeats: int, warmup: int) -> list[Row]:
    def step_of(fn):
        def step():
            x.grad = None
            fn(x).backward(grad)
        return step

    steps = {name: step_of(fn) for name, fn in providers.items()}
    memory = {name: (measure.saved_bytes(lambda fn=fn: fn(x), parameters=constants),
                     measure.peak_live_bytes(steps[name]), measure.flops(steps[name]))
              for name, fn in providers.items()}
    timings = measure.time_interleaved(steps, repeats=repeats, warmup=warmup)
    return [Row(table, d, name, timings[name], memory[name][2], None, memory[name][0], memory[name][1])
            for name in providers]


def rotate_quantize_table(tokens: int, d: int, dtype, repeats: int, warmup: int) -> tuple[list[Row], str]:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(tokens, d, generator=gen).to(dtype).requires_grad_(True)
    grad = torch.randn(tokens, d, generator=gen).to(dtype)
    H = dense_hadamard(d, dtype)
    providers = {
        "fastft": lambda t: fake_quantize(t, 8, "token", rotate=True),
        "fwht+composite": lambda t: composite_fake_quantize(hadamard_transform(t), 8, None, False),
        "dense+composite": lambda t: composite_fake_quantize(t @ H.t(), 8, None, False),
    }
    ao = torchao_quantizer(8, None, False)
    if ao is not None:
        providers["dense+torchao"] = lambda t: ao(t @ H.t())
    with torch.no_grad():
        got = providers["fastft"](x).float()
        want = providers["dense+composite"](x).float()
    step = ((want.amax(-1) - want.amin(-1)) / 255).max().item()
    agreement = (f"fastft vs dense+composite: max abs difference {(got - want).abs().max().item():.2e} "
                 f"(one 8-bit step of the widest row: {step:.2e}; the rotations round differently)")
    rows = _quant_rows("rotate+quantize", d, providers, x, grad, [H], repeats, warmup)
    return rows, agreement + ("" if ao is not None else "; torchao: not installed, its column is skipped")


def weight_quantize_table(d: int, dtype, repeats: int, warmup: int) -> tuple[list[Row], str]:
    gen = torch.Generator().manual_seed(8)
    w = (torch.randn(d, d, generator=gen) / math.sqrt(d)).to(dtype).requires_grad_(True)
    grad = torch.randn(d, d, generator=gen).to(dtype)
    providers = {
        "fastft": lambda t: fake_quantize(t, 4, "group", 128, symmetric=True),
        "composite": lambda t: composite_fake_quantize(t, 4, 128, True),
    }
    ao = torchao_quantizer(4, 128, True)
    if ao is not None:
        providers["torchao"] = lambda t: ao(t)
    with torch.no_grad():
        same = torch.equal(providers["fastft"](w), providers["composite"](w))
    rows = _quant_rows("weight 4-bit g128", d, providers, w, grad, [], repeats, warmup)
    return rows, f"fastft vs composite: {'identical' if same else 'DIFFERENT'} outputs"


# --------------------------------------------------------------------------- output
def _fmt_time(t: Optional[measure.Timing]) -> str:
    return "unmeasured" if t is None else f"{t.median_s * 1e3:.2f} ({t.p20_s * 1e3:.1f}-{t.p80_s * 1e3:.1f})"


def format_tables(rows: list[Row], context: dict) -> str:
    out = [
        f"machine: CPU, {context['threads']} threads, {os.cpu_count()} cores; torch {torch.__version__}; "
        f"{context['dtype']}; tokens={context['tokens']}; 1-min load average {context['load'][0]} before, "
        f"{context['load'][1]} after (a loaded machine: ratios within one table are the figures to read)",
        "backend: fastft ops on this CPU: " + ", ".join(f"{op} -> {backend_for(op, 'cpu')}" for op in
                                                      ("hadamard_transform", "fake_quantize"))
        + " (fastft's default dispatch; the Triton kernels: CUDA only, unmeasured here)",
        "",
        "1. Hadamard transform, forward (median ms (p20-p80); GFLOP counted = matmuls only; analytic = every add "
        "and multiply)",
        f"{'d':>6}  {'K·2^n':>9}  {'fastft ms':>20}  {'dense ms':>22}  {'dense/fastft':>12}  "
        f"{'fastft GFLOP cnt/anl':>21}  {'dense GFLOP':>11}  verdict",
    ]
    by = {}
    for r in rows:
        by.setdefault((r.table, r.d), {})[r.provider] = r
    for (table, d), group in by.items():
        if table != "transform":
            continue
        f, dn = group["fastft"], group["dense"]
        K, n = hadamard_factorization(d)
        ratio = "-" if dn.timing is None else f"{dn.timing.median_s / f.timing.median_s:.1f}x"
        faster = None if dn.timing is None else f.timing.median_s < dn.timing.median_s
        cheaper = f.analytic_flops < dn.analytic_flops
        verdict = ("met" if cheaper and faster else "NOT MET" if faster is False or not cheaper
                   else "FLOPs met, time unmeasured")
        out.append(
            f"{d:>6}  {f'{K}·2^{n}':>9}  {_fmt_time(f.timing):>20}  {_fmt_time(dn.timing):>22}  {ratio:>12}  "
            f"{f'{f.counted_flops / 1e9:.3f} / {f.analytic_flops / 1e9:.3f}':>21}  {dn.counted_flops / 1e9:>11.2f}  {verdict}"
        )
    for table, title in (("rotate+quantize", "2. Rotate + per-token 8-bit fake quantization, forward+backward"),
                         ("weight 4-bit g128", "3. Weight fake quantization, 4-bit symmetric, groups of 128, forward+backward")):
        groups = [(d, g) for (t, d), g in by.items() if t == table]
        if not groups:
            continue
        d, group = groups[0]
        base = group["fastft"].timing.median_s
        out += ["", f"{title}, d={d}" + (f", tokens={context['tokens']}" if table == "rotate+quantize" else f" (a {d}×{d} weight)"),
                f"{'provider':<16}  {'median ms':>9}  {'p20':>8}  {'p80':>8}  {'x fastft':>8}  {'saved bwd':>10}  "
                f"{'peak live':>10}  {'GFLOP':>7}"]
        for name, r in group.items():
            t = r.timing
            out.append(f"{name:<16}  {t.median_s * 1e3:>9.2f}  {t.p20_s * 1e3:>8.2f}  {t.p80_s * 1e3:>8.2f}  "
                       f"{t.median_s / base:>8.2f}  {measure.format_bytes(r.saved_bytes):>10}  "
                       f"{measure.format_bytes(r.peak_live_bytes):>10}  {r.counted_flops / 1e9:>7.2f}")
        fastft_row = group["fastft"]
        others = [r for name, r in group.items() if name != "fastft"]
        slowest_ok = all(fastft_row.timing.median_s <= r.timing.median_s for r in others)
        saved_ok = all(fastft_row.saved_bytes <= r.saved_bytes for r in others)
        out.append(f"fastft not slower than every peer: {'met' if slowest_ok else 'NOT MET'}; "
                   f"saves no more for backward than every peer: {'met' if saved_ok else 'NOT MET'}")
        out.append(context.get(table, ""))
    return "\n".join(out)


def write_csv(path: str, rows: list[Row], context: dict) -> None:
    fields = ["benchmark", "table", "d", "provider", "metric", "value", "unit", "tokens", "dtype", "threads", "device",
              "torch", "load_avg"]
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        common = dict(benchmark="hadamard", tokens=context["tokens"], dtype=context["dtype"],
                      threads=context["threads"], device="cpu", torch=torch.__version__, load_avg=context["load"][0])
        for r in rows:
            metrics = [("flops_counted", r.counted_flops, "flop"), ("flops_analytic", r.analytic_flops, "flop"),
                       ("saved_for_backward", r.saved_bytes, "bytes"), ("peak_live", r.peak_live_bytes, "bytes")]
            if r.timing is not None:
                metrics += [("time_median", r.timing.median_s, "s"), ("time_p20", r.timing.p20_s, "s"),
                            ("time_p80", r.timing.p80_s, "s")]
            for metric, value, unit in metrics:
                if value is not None:
                    writer.writerow(dict(common, table=r.table, d=r.d, provider=r.provider, metric=metric,
                                         value=value, unit=unit))


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hadamard", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="transform sizes d")
    parser.add_argument("--quant-features", type=int, default=4096, help="d of the fake-quantization tables")
    parser.add_argument("--dense-limit", type=int, default=max(SIZES), help="largest d whose dense matmul is timed")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    return cli.parse_standalone_args(parser, argv, QUICK, repeats=5, warmup=1)


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    load_before = _load_average()
    rows = transform_table(args.tokens, args.sizes, dtype, args.repeats, args.warmup, args.dense_limit)
    rq, agreement_rq = rotate_quantize_table(args.tokens, args.quant_features, dtype, args.repeats, args.warmup)
    wq, agreement_wq = weight_quantize_table(args.quant_features, dtype, args.repeats, args.warmup)
    load_after = _load_average()
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    context = dict(threads=torch.get_num_threads(), dtype=args.dtype, tokens=args.tokens,
                   load=(fmt(load_before), fmt(load_after)),
                   **{"rotate+quantize": agreement_rq, "weight 4-bit g128": agreement_wq})
    rows += rq + wq
    print(format_tables(rows, context))
    if args.csv:
        write_csv(args.csv, rows, context)
        print(f"wrote {args.csv}")
    return rows


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
    from .harness import DTYPES, Skipped, Subject, fastft_backends, forced_backend

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
    from .harness import Benchmark, layer_case, layer_estimate, sweep_points

    table = weight_sweeps or WEIGHT_SUITE_SWEEPS

    def cases(ctx) -> list:
        key = (ctx.device.type, ctx.sweep)
        if key not in table:
            raise ValueError(f"fake_quant_weight: no sweep for {key}; known: {sorted(table)}")
        base, variables = table[key]
        return [layer_case("fake_quant_weight", point, x_names, build=weight_quantize_subjects,
                           min_bytes=_weight_min_bytes,
                           estimate_s=lambda ctx, point=point: layer_estimate(0.0, 3, ctx))
                for point, x_names in sweep_points(base, variables)]

    return [Benchmark("fake_quant_weight", cases, "4-bit group fake quantization of a weight vs the composite, "
                      "forward + backward", tags=("layer", "qat"))]


if __name__ == "__main__":
    main(sys.argv[1:])

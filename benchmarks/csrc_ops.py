"""The C++ CPU kernels of csrc/ against the PyTorch reference and torch.compile of the reference.

    python -m benchmarks.csrc_ops                     # tokens=2048, d in {1024, 4096, 11008}, float32
    python -m benchmarks.csrc_ops --quick             # small shapes, no torch.compile, a few seconds
    python -m benchmarks.csrc_ops --csv csrc_ops.csv  # also one CSV row per measurement

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

import argparse
import csv
import os
import sys
import traceback
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fastft import _ext
from fastft.ops.fake_quantize import fake_quantize_backward_reference, fake_quantize_reference
from fastft.ops.hadamard import hadamard_factorization, hadamard_transform_reference

from fastft import measure

from . import cli

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SIZES = (1024, 4096, 11008)
QUICK = dict(tokens=128, sizes=[1024, 4096], repeats=3, warmup=1, compile=False)
TARGET_SPEEDUP = 3.0
TARGET_D = 4096
OPS = ("transform", "fused fq", "ste backward")


@dataclass
class Row:
    op: str
    d: int
    provider: str
    timing: Optional[measure.Timing]
    bytes_moved: int
    peak_live_bytes: Optional[int]
    note: str = ""


def _reference_fns():
    def transform(x):
        return hadamard_transform_reference(x)

    def fused(x):
        return fake_quantize_reference(x, 8, "token", 128, False, 1.0, True, True)

    def backward(grad, mask):
        return fake_quantize_backward_reference(grad, mask, True)

    return transform, fused, backward


def _cpp_fns():
    def transform(x):
        return _ext.hadamard_transform(x, False)

    def fused(x):
        return _ext.fake_quantize(x, 8, "token", 128, False, 1.0, True, True)

    def backward(grad, mask):
        return _ext.fake_quantize_backward(grad, mask, True)

    return transform, fused, backward


def _check(op: str, d: int, got, want) -> None:
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    exact = hadamard_factorization(d)[0] == 1
    for g, w in zip(got, want):
        if g.dtype == torch.bool or exact:
            if not torch.equal(g, w):
                raise AssertionError(f"{op} d={d}: cpp differs from the reference")
        else:
            torch.testing.assert_close(g.float(), w.float(), rtol=1e-5, atol=1e-5 if g.dtype == torch.float32 else 1e-2)


def bytes_moved(op: str, tokens: int, d: int, element: int) -> int:
    n = tokens * d
    return {"transform": 2 * n * element, "fused fq": 2 * n * element + n, "ste backward": 2 * n * element + n}[op]


def run(tokens: int, sizes, dtype: torch.dtype, repeats: int, warmup: int, compile_reference: bool) -> list[Row]:
    if not _ext.available("cpu"):
        raise SystemExit(f"the C++ CPU library is unavailable: {_ext.unavailable_reason('cpu')}")
    ref_fns = _reference_fns()
    cpp_fns = _cpp_fns()
    rows = []
    for d in sizes:
        gen = torch.Generator().manual_seed(d)
        x = torch.randn(tokens, d, generator=gen).to(dtype)
        grad = torch.randn(tokens, d, generator=gen).to(dtype)
        _, mask = ref_fns[1](x)
        inputs = {"transform": (x,), "fused fq": (x,), "ste backward": (grad, mask)}
        for op, ref, cpp in zip(OPS, ref_fns, cpp_fns):
            args = inputs[op]
            _check(op, d, cpp(*args), ref(*args))
            providers: dict[str, Callable[[], object]] = {
                "cpp": lambda cpp=cpp, args=args: cpp(*args),
                "reference": lambda ref=ref, args=args: ref(*args),
            }
            notes = {}
            if compile_reference:
                try:
                    compiled = torch.compile(ref, dynamic=False)
                    compiled(*args)  # compile outside the timing
                    providers["compiled"] = lambda compiled=compiled, args=args: compiled(*args)
                except Exception as error:  # reported, not hidden
                    notes["compiled"] = f"does not compile: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
                    if os.environ.get("FASTFT_BENCH_DEBUG"):
                        traceback.print_exc()
            peaks = {name: measure.peak_live_bytes(fn) for name, fn in providers.items()}
            timings = measure.time_interleaved(providers, repeats=repeats, warmup=warmup)
            moved = bytes_moved(op, tokens, d, x.element_size())
            for name in ("cpp", "reference", "compiled"):
                if name in providers:
                    rows.append(Row(op, d, name, timings[name], moved, peaks[name]))
                elif name in notes:
                    rows.append(Row(op, d, name, None, moved, None, notes[name]))
            torch._dynamo.reset() if compile_reference else None
    return rows


def _load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def verdicts(rows: list[Row]) -> list[str]:
    out = []
    for op in ("transform", "fused fq"):
        group = {r.provider: r for r in rows if r.op == op and r.d == TARGET_D}
        if "cpp" not in group or "reference" not in group:
            out.append(f"target: cpp >= {TARGET_SPEEDUP:.0f}x the reference for {op} at d={TARGET_D}: unmeasured")
            continue
        speedup = group["reference"].timing.median_s / group["cpp"].timing.median_s
        verdict = "met" if speedup >= TARGET_SPEEDUP else "NOT MET"
        out.append(f"target: cpp >= {TARGET_SPEEDUP:.0f}x the reference for {op} at d={TARGET_D}: {speedup:.1f}x, {verdict}")
    return out


def format_table(rows: list[Row], context: dict) -> str:
    lines = [
        f"machine: CPU, {context['threads']} threads, {os.cpu_count()} cores; torch {torch.__version__}; "
        f"{context['dtype']}; tokens={context['tokens']}; 1-min load average {context['load'][0]} before, "
        f"{context['load'][1]} after (a loaded machine: read the ratios within one row group)",
        f"cpp: {context['library']}",
        "",
        f"{'op':<13} {'d':>6}  {'provider':<10} {'median ms':>10} {'p20-p80 ms':>15}  {'x cpp':>6}  {'MB moved':>9}  "
        f"{'GB/s':>6}  {'peak live':>10}",
    ]
    for op in OPS:
        for d in sorted({r.d for r in rows}):
            group = [r for r in rows if r.op == op and r.d == d]
            base = next((r.timing.median_s for r in group if r.provider == "cpp"), None)
            for r in group:
                if r.timing is None:
                    lines.append(f"{op:<13} {d:>6}  {r.provider:<10} {'-':>10} {'':>15}  {'':>6}  {'':>9}  {'':>6}  "
                                 f"{'':>10}  {r.note}")
                    continue
                t = r.timing
                lines.append(
                    f"{op:<13} {d:>6}  {r.provider:<10} {t.median_s * 1e3:>10.2f} "
                    f"{f'{t.p20_s * 1e3:.2f}-{t.p80_s * 1e3:.2f}':>15}  {t.median_s / base:>6.2f}  "
                    f"{r.bytes_moved / 1e6:>9.1f}  {r.bytes_moved / t.median_s / 1e9:>6.2f}  "
                    f"{measure.format_bytes(r.peak_live_bytes):>10}"
                )
        lines.append("")
    lines += verdicts(rows)
    return "\n".join(lines)


def write_csv(path: str, rows: list[Row], context: dict) -> None:
    fields = ["benchmark", "op", "d", "provider", "metric", "value", "unit", "tokens", "dtype", "threads", "torch",
              "load_avg", "note"]
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        common = dict(benchmark="csrc_ops", tokens=context["tokens"], dtype=context["dtype"],
                      threads=context["threads"], torch=torch.__version__, load_avg=context["load"][0])
        for r in rows:
            metrics = [("bytes_moved", r.bytes_moved, "bytes"), ("peak_live", r.peak_live_bytes, "bytes")]
            if r.timing is not None:
                metrics += [("time_median", r.timing.median_s, "s"), ("time_p20", r.timing.p20_s, "s"),
                            ("time_p80", r.timing.p80_s, "s")]
            for metric, value, unit in metrics:
                if value is not None:
                    writer.writerow(dict(common, op=r.op, d=r.d, provider=r.provider, metric=metric, value=value,
                                         unit=unit, note=r.note))
            if r.timing is None:
                writer.writerow(dict(common, op=r.op, d=r.d, provider=r.provider, metric="time_median", value="",
                                     unit="s", note=r.note))


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.csrc_ops", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    return cli.parse_standalone_args(parser, argv, QUICK, repeats=10, warmup=2)


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*lru_cache.*")  # dynamo tracing the reference's cached helpers
    load_before = _load_average()
    rows = run(args.tokens, args.sizes, DTYPES[args.dtype], args.repeats, args.warmup, args.compile)
    load_after = _load_average()
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    built = _ext.built("cpu")
    context = dict(threads=torch.get_num_threads(), dtype=args.dtype, tokens=args.tokens,
                   load=(fmt(load_before), fmt(load_after)),
                   library=f"{built.path} ({built.compiler_version}; {' '.join(built.flags)})")
    print(format_table(rows, context))
    if args.csv:
        write_csv(args.csv, rows, context)
        print(f"wrote {args.csv}")
    return rows


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
    from .harness import Skipped, Subject, fastft_backends, forced_backend

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
    if ctx.quick:
        subjects.append(Skipped("torch.compile", "inductor", "peer",
                                "torch.compile of the dense version: full sweep only (a minute of compiling a shape)"))
    else:
        compiled = torch.compile(peer, dynamic=False)
        subjects.append(Subject("torch.compile", "inductor", "peer", lambda: compiled(x), grad, [x], parameters=[H]))
    return subjects


def _suite_min_bytes(op: str, config: dict, mode: str) -> int:
    from .harness import DTYPES as HARNESS_DTYPES

    n = config["tokens"] * config["d"]
    e = torch.empty(0, dtype=HARNESS_DTYPES[config["dtype"]]).element_size()
    mask = n if op == "rotate_quantize" else 0
    forward, backward = 2 * n * e + mask, 2 * n * e + mask
    return {"forward": forward, "backward": backward, "step": forward + backward}[mode]


def _suite_cases(op: str, sweeps: dict):
    from .harness import layer_case, sweep_points

    def estimate(ctx, point) -> float:
        if ctx.on_gpu:
            return 15.0
        calls = 4 * (7 + 3 * (ctx.warmup + ctx.repeats))  # providers x (passes + timed modes)
        compile_s = 0.0 if ctx.quick else 60.0
        return calls * point["tokens"] * point["d"] * 50e-9 * ctx.contention + compile_s + 2.0

    def cases(ctx) -> list:
        key = (ctx.device.type, ctx.sweep)
        if key not in sweeps:
            raise ValueError(f"{op}: no sweep for {key}; known: {sorted(sweeps)}")
        base, variables = sweeps[key]
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
    main(sys.argv[1:])

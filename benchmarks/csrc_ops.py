"""The C++ CPU kernels of csrc/ against the PyTorch reference and torch.compile of the reference.

    python -m benchmarks.csrc_ops                     # tokens=2048, d in {1024, 4096, 11008}, float32
    python -m benchmarks.csrc_ops --quick             # small shapes, no torch.compile, a few seconds
    python -m benchmarks.csrc_ops --csv csrc_ops.csv  # also one CSV row per measurement

Three ops, each on a tokens × d input, for every d:
  transform     ``hadamard_transform(x)``: y = x H_dᵀ;
  fused fq      ``fake_quantize(x, 8, "token", rotate=True, ste="clipped")``'s forward: rotate, per-token
                8-bit asymmetric quantize-dequantize, and the 1-byte "not clamped" mask;
  ste backward  its backward: dL/dx = (mask ⊙ dL/dout) H_d, the inverse rotation of the masked gradient.

Providers, interleaved in one process (``benchmarks.measure.time_interleaved``):
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

from . import measure

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
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads, also the C++ kernels'")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    parser.add_argument("--quick", action="store_true", help=f"small shapes: {QUICK}")
    parser.add_argument("--csv", metavar="PATH", help="append one row per measurement to this CSV file")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*lru_cache.*")  # dynamo tracing the reference's cached helpers
    if args.threads:
        torch.set_num_threads(args.threads)
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


if __name__ == "__main__":
    main(sys.argv[1:])
